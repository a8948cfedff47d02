"""The check algorithm: compare analytic derivatives with finite differences, element by element.

``full`` mode compares every directional derivative ``J d`` (one direction per input element, or per
tangent direction of a structured input) both ways: the analytic side from unit VJPs (one per output
element) or JVPs, the numeric side from central differences refined by the step ladder of
:mod:`gradbridge._checking.numeric` where the first pass is not conclusive (kinks, domain edges, curvature).
``fast`` mode compares random projections ``v . (J u)`` (numeric) with ``(J^T v) . u`` (analytic) for
several Gaussian probes per leaf and re-runs ``full`` on any leaf that fails so the report still names
the element; ``auto`` (the default) runs ``full`` unless its cost is above the budget. ``order=2``
then checks ``x -> J(x)^T v`` for a random ``v`` the same way (the gradient of the gradient).

This module is the entry (:func:`run_check`) and the checks that come before any comparison: the function
is deterministic, its faults are not transient. The rest, in the order a check runs it: :mod:`.strategy`
(which mode, at what cost), :mod:`.orders` (each derivative order and mode), :mod:`.full_rows` and
:mod:`.fast_rows` (the comparisons), :mod:`.rows` (a block's verdict, grade and message).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Mapping, Optional, Tuple

import numpy as np

from .._agreement import agreement_bound
from .._adapter import (ForwardRules, PreparedFunction, offered)
from .._errors import FunctionEvaluationError, InvalidArgumentError
from .evaluate import Evaluator
from .executor import RemoteEvaluation
from .finite_diff import step_description
from .grading import explain_grade
from .memory import budget_bytes
from .._options import Options
from .._reporting.progress import CheckProgress
from .._reporting.report import Report
from .structure import Structure
from .tolerance import Tolerance
from .context import CheckContext, EvaluationCounts, working_eps
from .full_rows import columns_for_auto
from .orders import check_order, higher_orders, spread_notes
from .strategy import choose_mode, planned_cost, verified_diagonal
from .._complex import mark_complex
from .contracts import run_contracts

def run_check(prepared: PreparedFunction, options: Options, report: Report,
              structures: Optional[Mapping[str, Structure]] = None,
              remote: Optional[RemoteEvaluation] = None) -> Report:
    """Run the whole check inside the adapter's deterministic session and fill ``report``; ``remote`` (from
    ``executor=``) evaluates the function's chunks in other processes."""
    started = time.perf_counter()
    counts = EvaluationCounts()
    _check_structure_names(prepared, structures or {})
    progress = CheckProgress(f"checking {report.function}", options.progress)
    evaluator = counts.add(Evaluator(prepared, options.chunk_size, progress=progress, remote=remote))
    automatic = options.analytic == "auto"
    options = dataclasses.replace(options, analytic=_analytic_modes(prepared, options, report))
    try:
        with prepared.session():
            problem, f0 = _nondeterminism(evaluator, prepared.x0)
            # the adapter knows the precision fn really computes in only after the first evaluation
            precision = working_eps(prepared, options)
            tolerance = Tolerance(options.atol, options.rtol, precision)
            report.tolerance = tolerance.describe()
            report.rule = tolerance.rule
            report.step = step_description(options.eps, precision)
            if problem:
                report.problem = problem
                return report
            memory = budget_bytes(options.memory)
            diagonal = verified_diagonal(evaluator, options, structures or {}, precision)
            columns = columns_for_auto(evaluator, options, structures or {}, diagonal is not None, memory)
            mode = choose_mode(prepared, options, structures or {}, report, diagonal is not None, columns, memory)
            progress.expect(options.order * planned_cost(prepared, options, mode))
            context = CheckContext(options, tolerance, structures or {}, mode, progress)
            context.automatic = automatic
            context.diagonal = diagonal
            context.columns = columns
            report.rows.extend(check_order(evaluator, context, f0, order=1))
            spread_notes(context, report.rows)
            if options.contracts:
                report.contracts.extend(run_contracts(evaluator, context, f0, precision, report.rows))
            if options.order >= 2:
                report.rows.extend(higher_orders(evaluator, context, counts, report.contracts))
            for row in report.rows:
                explain_grade(row, tolerance.user_given)
            mark_complex(report.rows, prepared.leaves, prepared.output_specs, report.notes)
            report.notes.extend(n for n in context.notes if n not in report.notes)
            report.strategy = [f"{name}: {how}" for name, how in context.strategy.items()]
            report.problem = _transient_faults(counts)
    finally:
        progress.close()
        counts.fill(report)
        report.notes.extend(n for n in prepared.notes if n not in report.notes)
        report.seconds = time.perf_counter() - started
    return report


def _analytic_modes(prepared: PreparedFunction, options: Options, report: Report) -> str:
    """``analytic='auto'``: reverse mode, and forward mode too where fn carries a forward rule of its
    own (the adapter's ``forward_rule``: a torch ``Function.jvp`` reverse mode never calls)."""
    if options.analytic != "auto":
        return options.analytic
    rule = offered(prepared, ForwardRules, "forward_rule")
    if rule:
        report.notes.append(f"fn has its own forward-mode rule ({rule}): checked in both modes (analytic='auto'), "
                            "since reverse mode never calls it")
        return "both"
    return "rev"


def _check_structure_names(prepared: PreparedFunction, structures: Mapping[str, Structure]) -> None:
    names = [leaf.name for leaf in prepared.leaves]
    for name in structures:
        if name not in names:
            raise InvalidArgumentError(f"structure: no checked input or parameter is named {name!r}; "
                                       f"the checked ones are {', '.join(repr(n) for n in names)}")


def _nondeterminism(evaluator: Evaluator, x0: np.ndarray) -> Tuple[Optional[str], np.ndarray]:
    """Evaluate twice at ``x0``; a difference means finite differences would measure noise.
    Returns the problem (or None) and the outputs at ``x0``."""
    outputs = evaluator.evaluate(np.stack([x0, x0]), ["the unperturbed input", "the unperturbed input"])
    if outputs.shape[1] == 0:
        raise FunctionEvaluationError("fn: returned no floating-point output to differentiate")
    difference = float(np.max(np.abs(outputs[0] - outputs[1])))
    scale = max(1.0, float(np.max(np.abs(outputs[0]))))
    if difference > agreement_bound(working_eps(evaluator.prepared), scale):
        return (f"fn is not deterministic: two evaluations at the same input differ by {difference:.3g} even with "
                "every random generator re-seeded before each evaluation, so finite differences would measure "
                "noise, not gradients. Make the randomness depend on a seed or key the check controls "
                "(the framework's global seed or generator, NumPy's and Python's global RNGs, a JAX key argument; "
                "private generator objects cannot be pinned), or remove it."), outputs[0]
    return None, outputs[0]


def _transient_faults(counts: EvaluationCounts) -> Optional[str]:
    """The problem of a fn that was not finite at a point once and finite there on re-evaluation."""
    faults = [fault for evaluator in counts.evaluators for fault in evaluator.transients]
    if not faults:
        return None
    more = f" (and {len(faults) - 1} more point(s))" if len(faults) > 1 else ""
    return (f"fn is not deterministic: it returned {faults[0]}{more}. A value that is not finite once and finite "
            "when the same point was evaluated again is a transient fault (a race, uninitialised memory, a flaky "
            "kernel), not a domain edge, so the finite differences cannot be trusted; make fn deterministic")
