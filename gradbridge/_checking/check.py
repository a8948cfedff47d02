"""The check algorithm: compare analytic derivatives with finite differences, element by element.

``full`` mode compares every directional derivative ``J d`` (one direction per input element, or per
tangent direction of a structured input) both ways: the analytic side from unit VJPs (one per output
element) or JVPs, the numeric side from central differences refined by the step ladder of
:mod:`gradbridge._checking.numeric` where the first pass is not conclusive (kinks, domain edges, curvature).
``fast`` mode compares random projections ``v . (J u)`` (numeric) with ``(J^T v) . u`` (analytic) for
several Gaussian probes per leaf and re-runs ``full`` on any leaf that fails so the report still names
the element; ``auto`` (the default) runs ``full`` unless its cost is above the budget. ``order=2``
then checks ``x -> J(x)^T v`` for a random ``v`` the same way (the gradient of the gradient).
"""

from __future__ import annotations

import dataclasses
import math
import time
from functools import lru_cache
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .._adapter import (ForwardRules, LeafSpec, PreparedFunction, TransposedProducts, UndefinedGradients, WorkingPrecision,
                       offered)
from .compress import MIN_COLUMNS, diagonal_jacobian, diagonal_plan, plan as compression_plan
from .determinism import SPREAD_EXPLAINS, Spread, measure_spread
from .diagnostics import SWEEP_ROWS, element_map, step_sweep
from .directions import Directions, LeafDirections
from .._errors import FunctionEvaluationError, GradbridgeError, InvalidArgumentError, ModeUnsupportedError
from .evaluate import Evaluator
from .finite_diff import relative_step, step_description
from .grading import ZERO, block_grade, explain_grade
from .localize import bisection_row
from .memory import budget_bytes, full_check_bytes, size_text
from .numeric import BACKWARD, FAIL, FORWARD, JUMP, KINK, METHOD_NAMES, UNRESOLVED, ElementVerdicts, StepLadder
from .._options import Options
from .._precision import DTYPE_EPS, FLOAT64_EPS, PointRounder
from .._reporting.progress import CheckProgress
from .._reporting.report import KinkPoint, Report, RowResult, StepSweep, WorstElement
from .structure import Structure
from .tolerance import Tolerance, grade, relative_error
from .verified_groups import ColumnAnalytic, analytic_by_columns

#: Most non-differentiable points listed per row (the count is always complete).
KINKS_LISTED = 10
#: Probability with which ``fast`` mode's stated detectable error is caught.
FAST_CONFIDENCE = 0.999


class _Counts:
    """Evaluation counts summed over the first- and second-order evaluators."""

    def __init__(self) -> None:
        self.evaluators: List[Evaluator] = []

    def add(self, evaluator: Evaluator) -> Evaluator:
        self.evaluators.append(evaluator)
        return evaluator

    def fill(self, report: Report) -> None:
        report.evaluations = sum(e.evaluations for e in self.evaluators)
        report.vjps = sum(e.vjps for e in self.evaluators)
        report.jvps = sum(e.jvps for e in self.evaluators)


class _Context:
    """What every part of one check needs: options, tolerance, structures, the point's outputs."""

    def __init__(self, options: Options, tolerance: Tolerance, structures: Mapping[str, Structure],
                 mode: str, progress: CheckProgress) -> None:
        self.progress = progress
        self.notes: List[str] = []
        self.diagonal: Optional[np.ndarray] = None  # the verified diagonal of an elementwise analytic Jacobian
        self.strategy: Dict[str, str] = {}  # leaf name (and order) -> how it was compared
        self.columns: Optional[ColumnAnalytic] = None  # verified column groups found while choosing the mode
        self.automatic = False  # analytic='auto': fall back to forward mode where reverse mode is unsupported
        self.spreads: Dict[str, Spread] = {}  # analytic mode -> spread of two calls, where not deterministic
        self.options = options
        self.memory = budget_bytes(options.memory)  # bytes the comparison may allocate
        self.tolerance = tolerance
        self.structures = structures
        self.mode = mode


def run_check(prepared: PreparedFunction, options: Options, report: Report,
              structures: Optional[Mapping[str, Structure]] = None) -> Report:
    """Run the whole check inside the adapter's deterministic session and fill ``report``."""
    started = time.perf_counter()
    counts = _Counts()
    _check_structure_names(prepared, structures or {})
    progress = CheckProgress(f"checking {report.function}", options.progress)
    evaluator = counts.add(Evaluator(prepared, options.chunk_size, progress=progress))
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
            diagonal = _verified_diagonal(evaluator, options, structures or {}, precision)
            columns = _columns_for_auto(evaluator, options, structures or {}, diagonal is not None, memory)
            mode = _choose_mode(prepared, options, structures or {}, report, diagonal is not None, columns, memory)
            progress.expect(options.order * _planned_cost(prepared, options, mode))
            context = _Context(options, tolerance, structures or {}, mode, progress)
            context.automatic = automatic
            context.diagonal = diagonal
            context.columns = columns
            report.rows.extend(_check_order(evaluator, context, f0, order=1))
            _spread_notes(context, report.rows)
            if options.order == 2:
                report.rows.extend(_second_order(evaluator, context, counts))
            for row in report.rows:
                explain_grade(row, tolerance.user_given)
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


def working_eps(prepared: PreparedFunction, options: Optional[Options] = None) -> float:
    """Machine epsilon of the precision ``fn`` really computes in: the coarsest of what the adapter says
    (``working_eps``), the dtypes of the outputs (a function that casts to float32 inside is only as
    accurate as float32, whatever its inputs were) and, without promotion, the checked leaves' dtypes.
    Known after the first evaluation."""
    coarsest = float(offered(prepared, WorkingPrecision, "working_eps") or FLOAT64_EPS)
    try:
        outputs = prepared.output_specs
    except RuntimeError:  # not evaluated yet
        outputs = []
    for spec in outputs:
        coarsest = max(coarsest, DTYPE_EPS.get(spec.dtype, FLOAT64_EPS))
    if options is not None and not options.promote:
        coarsest = PointRounder(prepared.leaves, promote=False).eps(coarsest)
    return coarsest


def _nondeterminism(evaluator: Evaluator, x0: np.ndarray) -> Tuple[Optional[str], np.ndarray]:
    """Evaluate twice at ``x0``; a difference means finite differences would measure noise.
    Returns the problem (or None) and the outputs at ``x0``."""
    outputs = evaluator.evaluate(np.stack([x0, x0]), ["the unperturbed input", "the unperturbed input"])
    if outputs.shape[1] == 0:
        raise FunctionEvaluationError("fn: returned no floating-point output to differentiate")
    difference = float(np.max(np.abs(outputs[0] - outputs[1])))
    scale = max(1.0, float(np.max(np.abs(outputs[0]))))
    if difference > 1e3 * working_eps(evaluator.prepared) * scale:
        return (f"fn is not deterministic: two evaluations at the same input differ by {difference:.3g} even with "
                "every random generator re-seeded before each evaluation, so finite differences would measure "
                "noise, not gradients. Make the randomness depend on a seed or key the check controls "
                "(the framework's global seed or generator, NumPy's and Python's global RNGs, a JAX key argument; "
                "private generator objects cannot be pinned), or remove it."), outputs[0]
    return None, outputs[0]


def _transient_faults(counts: _Counts) -> Optional[str]:
    """The problem of a fn that was not finite at a point once and finite there on re-evaluation."""
    faults = [fault for evaluator in counts.evaluators for fault in evaluator.transients]
    if not faults:
        return None
    more = f" (and {len(faults) - 1} more point(s))" if len(faults) > 1 else ""
    return (f"fn is not deterministic: it returned {faults[0]}{more}. A value that is not finite once and finite "
            "when the same point was evaluated again is a transient fault (a race, uninitialised memory, a flaky "
            "kernel), not a domain edge, so the finite differences cannot be trusted; make fn deterministic")


def _planned_cost(prepared: PreparedFunction, options: Options, mode: str) -> int:
    """Evaluations plus analytic calls a check is expected to take (the progress bar's total)."""
    m = sum(spec.size for spec in prepared.output_specs)
    n = len(prepared.x0)
    if mode == "fast":
        return 2 * options.probes * len(prepared.leaves) + options.probes
    return 2 * n + {"rev": m, "fwd": n, "both": m + n}[options.analytic]


def _verified_diagonal(evaluator: Evaluator, options: Options, structures: Mapping[str, Structure],
                       precision: float) -> Optional[np.ndarray]:
    """The analytic Jacobian's diagonal when it is verified diagonal (elementwise ops, float64, reverse
    mode, no structures, a full or auto check); None otherwise. Costs three VJPs when eligible."""
    prepared = evaluator.prepared
    if options.mode == "fast" or options.analytic != "rev" or not options.promote or structures:
        return None
    m = sum(spec.size for spec in prepared.output_specs)
    try:
        return diagonal_jacobian(evaluator.vjp, prepared.leaves, m, precision, options.seed)
    except ModeUnsupportedError:
        return None


def _choose_mode(prepared: PreparedFunction, options: Options, structures: Mapping[str, Structure],
                 report: Report, diagonal: bool = False, columns: Optional[ColumnAnalytic] = None,
                 memory: Optional[int] = None) -> str:
    """``full`` or ``fast``: ``auto`` compares the cost of a full check with ``options.budget`` and its
    memory with ``memory`` (bytes); a verified diagonal Jacobian makes a full check cost a handful of
    evaluations."""
    if options.mode != "auto":
        report.mode = options.mode
        return options.mode
    m = sum(spec.size for spec in prepared.output_specs)
    n = len(prepared.x0)
    directions = sum(leaf.size for leaf in prepared.leaves)  # structured inputs have fewer; an upper bound
    analytic_calls = {"rev": m, "fwd": n, "both": m + n}[options.analytic]
    cost = 2 * directions + analytic_calls
    if diagonal:
        cost = 2 * len(prepared.leaves)
    elif columns is not None:  # the verified groups' evaluations; their analytic calls are already spent
        cost = 2 * sum(columns.plans[leaf.name].count if leaf.name in columns.plans else leaf.size
                       for leaf in prepared.leaves)
    mode = "full" if cost <= options.budget else "fast"
    needed = _full_bytes(prepared, diagonal, columns)
    if mode == "full" and memory is not None and needed > memory:
        mode = "fast"
        report.mode = mode
        report.notes.append(
            f"mode='auto' chose fast: a full check would need about {size_text(needed)} of memory for its "
            f"{m:,} x {directions:,} comparison, above memory={size_text(memory)}. Random projections check every "
            "leaf; a failing leaf is localised by bisection. Pass memory= (or check fewer inputs with wrt=) for a "
            "full check.")
        return mode
    if mode == "full" and columns is not None:
        report.notes.append(f"mode='auto' chose full: the dense check would cost {2 * directions + analytic_calls:,} "
                            f"evaluations and analytic calls, above budget={options.budget:,}, but verified column "
                            f"groups need {cost:,} evaluations")
    report.mode = mode
    if mode == "fast":
        report.notes.append(
            f"mode='auto' chose fast: a full check would take about {cost:,} evaluations and analytic calls "
            f"({2 * directions:,} perturbed points, {analytic_calls:,} {options.analytic} calls), above "
            f"budget={options.budget:,}. Random projections check every leaf; a failing leaf is re-checked "
            "element by element. Pass mode='full' (or a larger budget) to compare every element.")
    return mode


def _full_bytes(prepared: PreparedFunction, diagonal: bool, columns: Optional[ColumnAnalytic]) -> int:
    """Estimated memory of a full first-order check along the path it would take."""
    m = sum(spec.size for spec in prepared.output_specs)
    n = len(prepared.x0)
    if diagonal:
        return full_check_bytes(m, len(prepared.leaves))
    if columns is not None:
        return full_check_bytes(m, sum(columns.plans[leaf.name].count if leaf.name in columns.plans else leaf.size
                                       for leaf in prepared.leaves))
    return full_check_bytes(m, sum(leaf.size for leaf in prepared.leaves), n, dense=True)


def _second_order(first: Evaluator, context: _Context, counts: _Counts) -> List[RowResult]:
    output_size = sum(spec.size for spec in first.prepared.output_specs)
    cotangent = np.random.default_rng(context.options.seed + 1).standard_normal(output_size)
    try:
        derived = first.prepared.gradient_function(cotangent)
    except GradbridgeError as exc:
        if not isinstance(exc, ModeUnsupportedError):
            raise
        return [RowResult(input=leaf.name, output="gradient", shape=leaf.shape, kind=leaf.kind, order=2,
                          status="unsupported", message=str(exc)) for leaf in first.prepared.leaves]
    except Exception as exc:  # the framework refused to build the gradient function: the user's code is at fault
        raise FunctionEvaluationError(f"building the gradient of fn for order=2 raised {type(exc).__name__}: {exc}") from exc
    evaluator = counts.add(Evaluator(derived, context.options.chunk_size, what="the gradient of fn",
                                     progress=context.progress))
    f0 = evaluator.evaluate(derived.x0[None, :], ["the unperturbed input"])[0]
    return _check_order(evaluator, context, f0, order=2)


def _check_order(evaluator: Evaluator, context: _Context, f0: np.ndarray, order: int) -> List[RowResult]:
    return _broken_forward_rules(evaluator, context, _compare_order(evaluator, context, f0, order), order)


def _broken_forward_rules(evaluator: Evaluator, context: _Context, rows: List[RowResult],
                          order: int) -> List[RowResult]:
    """Under ``analytic='auto'`` forward mode is checked because fn defines its own forward rule: when
    that mode cannot run, the user's rule is broken (it raised, returned None or the wrong shape), an
    error, not an unsupported mode the user never asked for."""
    rule = offered(evaluator.prepared, ForwardRules, "forward_rule")
    if not context.automatic or order != 1 or not rule:
        return rows
    for row in rows:
        if row.analytic_mode == "fwd" and row.status == "unsupported":
            row.status = "error"
            reason = row.message.rstrip(".")
            row.message = (f"your forward-mode rule ({rule}) could not run, so it was not checked: {reason}. "
                           "analytic='auto' checks every rule fn defines: fix it, or pass analytic='rev' to check "
                           "the backward only")
    return rows


def _compare_order(evaluator: Evaluator, context: _Context, f0: np.ndarray, order: int) -> List[RowResult]:
    options = context.options
    leaves = list(evaluator.prepared.leaves)
    modes = ("rev", "fwd") if options.analytic == "both" else (options.analytic,)
    rows: List[RowResult] = []
    if order == 1:
        _measure_spreads(evaluator, context, modes)
    if options.analytic == "both":
        rows.extend(_consistency_rows(evaluator, options, order, context.spreads))
    if context.mode == "full":
        for analytic_mode in modes:
            rows.extend(_full_rows(evaluator, context, leaves, f0, analytic_mode, order))
        return _forward_instead(evaluator, context, leaves, f0, order, rows, modes)
    m = sum(spec.size for spec in evaluator.prepared.output_specs)
    for analytic_mode in modes:
        fast_rows, probes = _fast_rows(evaluator, context, leaves, f0, analytic_mode, order)
        for row in fast_rows:
            leaf = next(l for l in leaves if l.name == row.input)
            _strategy(context, leaf, order, analytic_mode, f"{options.probes} random projections")
            if row.passed:
                rows.append(row)
                continue
            full_cost = 2 * leaf.size + (m if analytic_mode == "rev" else leaf.size)
            too_large = full_check_bytes(m, leaf.size, len(evaluator.prepared.x0), dense=True) > context.memory
            if (full_cost > options.budget or too_large) and leaf.name not in context.structures:
                precision = working_eps(evaluator.prepared, options)
                v, gradient = probes[leaf.name]
                rows.append(bisection_row(evaluator, leaf, row, v, gradient, relative_step(options.eps, precision),
                                          precision, context.tolerance,
                                          PointRounder(evaluator.prepared.leaves, options.promote), options.seed,
                                          analytic_mode, order))
                _strategy(context, leaf, order, analytic_mode, f"{options.probes} random projections failed, then "
                                                               "localised by bisection")
                continue
            for localized in _full_rows(evaluator, context, [leaf], f0, analytic_mode, order):
                localized.method = f"fast ({options.probes} probes) then {localized.method} on this leaf"
                if localized.status == "pass":
                    localized.message = ("the projection check failed but every element agrees: "
                                         f"projection detail: {row.message}")
                rows.append(localized)
    return rows


def _forward_instead(evaluator: Evaluator, context: _Context, leaves: Sequence[LeafSpec], f0: np.ndarray,
                     order: int, rows: List[RowResult], modes: Sequence[str]) -> List[RowResult]:
    """Under ``analytic='auto'``, a function that supports only forward mode (a forward-only adjoint, a
    library that raises on reverse mode) is checked in forward mode rather than reported unsupported."""
    lacking = ("unsupported", "no-gradient")
    if not context.automatic or order != 1 or modes != ("rev",) or not rows \
            or any(r.status not in lacking for r in rows) \
            or all(r.passed for r in rows):
        return rows
    _measure_spreads(evaluator, context, ("fwd",))
    forward = _full_rows(evaluator, context, leaves, f0, "fwd", order)
    if any(r.status in lacking for r in forward):
        return rows
    for leaf in leaves:
        context.strategy.pop(leaf.name + ("" if order == 1 else f" (order {order})"), None)
    reason = rows[0].message.split("; but")[0]
    context.notes.append(f"reverse mode is not available for fn ({reason}): checked in forward mode "
                         "(JVPs) instead (analytic='auto'); pass analytic='rev' to require reverse mode")
    return forward


def _measure_spreads(evaluator: Evaluator, context: _Context, modes: Sequence[str]) -> None:
    """Run the analytic side twice per mode at one probe (first order only; see
    :mod:`gradbridge._checking.determinism`) and keep the spread of each mode that is not deterministic."""
    precision = working_eps(evaluator.prepared, context.options)
    for mode in modes:
        if mode not in context.spreads:
            spread = measure_spread(evaluator, mode, precision, context.options.seed)
            if spread is not None:
                context.spreads[mode] = spread


def _spread_notes(context: _Context, rows: Sequence[RowResult]) -> None:
    """One note per non-deterministic analytic mode: its spread, and what it did to the verdict."""
    for mode, spread in context.spreads.items():
        named = [r for r in rows if r.status == "nondeterministic" and r.analytic_mode in (mode, "rev vs fwd")]
        wrong = [r for r in rows if r.status == "fail" and r.analytic_mode in (mode, "rev vs fwd")]
        if named:
            effect = (f"above the tolerance: {len(named)} block(s) differ from finite differences only within that "
                      "spread and read NONDET, not wrong. Make it deterministic (the framework's deterministic "
                      "algorithms, no atomic scatter-adds or races) or pass an atol above the spread")
        elif wrong:
            effect = "the failing blocks differ by more than that spread: wrong values, not noise"
        else:
            effect = "below the tolerance: the verdict stands"
        context.notes.append(f"{spread.describe()}; {effect}")


def _analytic_jacobian(evaluator: Evaluator, analytic_mode: str, memory: int, directions: int) -> np.ndarray:
    """The whole Jacobian (m, n) from unit cotangents (rev) or unit tangents (fwd), chunk by chunk (no
    identity matrix, no second copy); refused before anything is allocated when the full comparison of
    ``directions`` directions would not fit in ``memory`` bytes."""
    m = sum(spec.size for spec in evaluator.prepared.output_specs)
    n = len(evaluator.prepared.x0)
    needed = full_check_bytes(m, directions, n, dense=True)
    if needed > memory:
        raise InvalidArgumentError(
            f"memory: a full check compares the whole {m:,} x {n:,} Jacobian and needs about {size_text(needed)}, "
            f"above memory={size_text(memory)}; use mode='auto' or 'fast' (random projections, a failing leaf "
            "localised by bisection), check fewer inputs (wrt=), or pass a larger memory=")
    size = m if analytic_mode == "rev" else n
    jacobian = np.empty((m, n))
    step = evaluator.chunk_size
    for start in range(0, size, step):
        count = min(step, size - start)
        units = np.zeros((count, size))
        units[np.arange(count), start + np.arange(count)] = 1.0
        if analytic_mode == "rev":
            jacobian[start:start + count] = evaluator.vjp(units)
        else:
            jacobian[:, start:start + count] = evaluator.jvp(units).T
    return jacobian


def _full_rows(evaluator: Evaluator, context: _Context, leaves: Sequence[LeafSpec], f0: np.ndarray,
               analytic_mode: str, order: int, jacobian: Optional[np.ndarray] = None,
               compress: bool = True) -> List[RowResult]:
    """Every Jacobian entry of ``leaves``, compared. Leaves whose analytic sparsity allows it are
    checked with compressed finite differences (:mod:`gradbridge._checking.compress`); one that is not cleanly
    right that way is re-checked element by element, so a failure always names its element."""
    if compress and order == 1 and jacobian is None and context.diagonal is not None:
        return _diagonal_rows(evaluator, context, leaves, f0, analytic_mode, order)
    prepared = evaluator.prepared
    options = context.options
    precision = working_eps(prepared, options)
    structures = {name: s for name, s in context.structures.items() if name in {l.name for l in leaves}}
    columns = None
    if compress and order == 1 and jacobian is None and analytic_mode == "rev" and options.promote \
            and not structures:
        same = context.columns is not None and [l.name for l in leaves] == [l.name for l in prepared.leaves]
        columns = context.columns if same else _analytic_by_columns(evaluator, options, leaves)
    if columns is None and jacobian is None:
        try:
            jacobian = _analytic_jacobian(evaluator, analytic_mode, context.memory, sum(l.size for l in leaves))
        except ModeUnsupportedError as exc:
            return _unsupported_rows(evaluator, leaves, analytic_mode, order, str(exc))
    if columns is not None:
        plans = columns.plans
        directions = Directions(prepared.x0, leaves, relative_step(options.eps, precision), {}, plans)
        analytic = np.concatenate([columns.blocks[entry.leaf.name] for entry in directions.per_leaf], axis=1)
    else:
        # rounding to a low-precision dtype would bend a group's direction: compress only float64 checks
        plans = compression_plan(prepared.x0, leaves, jacobian, options.seed, excluded=list(structures)) \
            if compress and options.promote else {}
        directions = Directions(prepared.x0, leaves, relative_step(options.eps, precision), structures, plans)
        analytic = directions.project(jacobian)
    blocks = [(output.slice, entry.slice) for entry in directions.per_leaf for output in prepared.output_specs]
    ladder = StepLadder(evaluator, directions, f0, precision, PointRounder(prepared.leaves, options.promote),
                        context.tolerance, blocks)
    verdicts = ladder.run(analytic)
    undefined = undefined_gradients(prepared)
    rows: Dict[str, List[RowResult]] = {}
    sweeps = 0
    for entry in directions.per_leaf:
        rows[entry.leaf.name] = []
        for output in prepared.output_specs:
            row, worst_at = _block_row(entry, output, analytic, verdicts, options.kinks, analytic_mode, order,
                                       _spread_value(context, analytic_mode, order))
            owners = columns.owners.get(entry.leaf.name) if columns is not None else None
            if owners is not None:
                plan = plans[entry.leaf.name]
                scales = plan.basis[plan.groups, np.arange(entry.leaf.size)]  # each element's scale in its group
                _as_elements(row, worst_at, entry, output, analytic, verdicts, owners, scales,
                             f"full, {entry.count} verified column groups: every entry compared, element by element")
                nameable = not _unowned_failure(row, entry, output, verdicts, owners)
                if row.status == "fail" and worst_at is not None and sweeps < SWEEP_ROWS and nameable:
                    row.step_sweep = _element_sweep(evaluator, directions, PointRounder(prepared.leaves, options.promote),
                                                    entry, output, worst_at, row, owners, scales)
                    sweeps += 1
            if entry.leaf.name in undefined:
                _mark_undefined(row, undefined[entry.leaf.name])
            if row.status == "fail" and worst_at is not None and sweeps < SWEEP_ROWS and not entry.compressed:
                out_i, d_j = worst_at
                label = f"{entry.label(d_j)} -> {output.name}{_index_text(output.unravel(out_i))}"
                row.step_sweep = step_sweep(evaluator, directions, PointRounder(prepared.leaves, options.promote),
                                            entry.first + d_j, output.offset + out_i, label, row.worst.analytic,
                                            row.worst.numeric, row.worst.step, row.worst.allowed)
                sweeps += 1
            rows[entry.leaf.name].append(row)
    for name, plan in ({} if columns is not None else plans).items():
        context.notes.append(f"compressed finite differences: {name}'s {plan.groups.size} elements in {plan.count} "
                             "group(s) of columns that share no output (colouring of the analytic Jacobian's "
                             f"sparsity), {2 * plan.count} evaluations instead of {2 * plan.groups.size}")
    if columns is not None:
        context.notes.extend(columns.notes)
    for entry in directions.per_leaf:
        _strategy(context, entry.leaf, order, analytic_mode,
                  columns.strategy[entry.leaf.name] if columns is not None else
                  f"{entry.count} column groups (colouring of the dense analytic Jacobian)" if entry.compressed else
                  f"along {entry.count} tangent directions ({entry.structure})" if entry.basis is not None else
                  "element by element, dense analytic Jacobian")
    redo = [entry.leaf for entry in directions.per_leaf
            if entry.compressed and not all(_clean(row) or _named(row, entry, verdicts, columns, prepared)
                                            for row in rows[entry.leaf.name])]
    m = sum(spec.size for spec in prepared.output_specs)
    needed = full_check_bytes(m, sum(leaf.size for leaf in redo), len(prepared.x0), dense=jacobian is None)
    if redo and needed > context.memory:
        context.notes.append(f"{', '.join(leaf.name for leaf in redo)}: re-checking element by element would need "
                             f"about {size_text(needed)} (the dense {m:,} x {len(prepared.x0):,} comparison), above "
                             f"memory={size_text(context.memory)}; the failing groups are reported as they are "
                             "(check fewer inputs with wrt=, or pass a larger memory=, to name each element)")
        redo = []
    if redo:
        for leaf in redo:
            rows[leaf.name] = []
        for row in _full_rows(evaluator, context, redo, f0, analytic_mode, order, jacobian, compress=False):
            row.method = f"compressed, then element by element: {row.method}"
            rows[row.input].append(row)
        for leaf in redo:
            _strategy(context, leaf, order, analytic_mode, "compressed, then element by element (not cleanly right "
                                                           "compressed), dense analytic Jacobian")
    return [row for leaf in leaves for row in rows[leaf.name]]


def _strategy(context: _Context, leaf: LeafSpec, order: int, analytic_mode: str, how: str) -> None:
    """Record how ``leaf`` was compared, for the report's strategy line (a later pass replaces it)."""
    key = leaf.name + ("" if order == 1 else f" (order {order})")
    if analytic_mode != "rev" or context.options.analytic == "both":
        key += f" [{analytic_mode}]"
    context.strategy[key] = how


def _columns_for_auto(evaluator: Evaluator, options: Options, structures: Mapping[str, Structure],
                      diagonal: bool, memory: Optional[int] = None) -> Optional[ColumnAnalytic]:
    """For ``mode='auto'`` when the dense full check is over budget (evaluations, or ``memory`` bytes):
    the verified column groups, whose cheaper full check may fit (found once, reused by the full check)."""
    prepared = evaluator.prepared
    if options.mode != "auto" or diagonal or options.analytic != "rev" or not options.promote or structures \
            or options.order != 1:
        return None
    m = sum(spec.size for spec in prepared.output_specs)
    if 2 * sum(leaf.size for leaf in prepared.leaves) + m <= options.budget and \
            (memory is None or _full_bytes(prepared, False, None) <= memory):
        return None
    return _analytic_by_columns(evaluator, options, prepared.leaves, limit=options.budget)


def _analytic_by_columns(evaluator: Evaluator, options: Options, leaves: Sequence[LeafSpec],
                         limit: Optional[int] = None) -> Optional[ColumnAnalytic]:
    """The analytic side by column groups from transposed VJPs (:mod:`gradbridge._checking.verified_groups`),
    when that costs less than the dense Jacobian's VJPs; None to build the dense Jacobian instead."""
    prepared = evaluator.prepared
    m = sum(spec.size for spec in prepared.output_specs)
    if m < MIN_COLUMNS or not isinstance(prepared, TransposedProducts):
        return None
    try:
        # a transposed VJP costs about two VJPs: worth it below half the dense Jacobian's m VJPs
        budget = m // 2 if limit is None else min(m // 2, limit)
        return analytic_by_columns(evaluator.vjp_transposed, evaluator.vjp, prepared.x0, leaves, m,
                                   working_eps(prepared, options), options.seed, budget)
    except ModeUnsupportedError:
        return None


def _diagonal_rows(evaluator: Evaluator, context: _Context, leaves: Sequence[LeafSpec], f0: np.ndarray,
                   analytic_mode: str, order: int) -> List[RowResult]:
    """A verified diagonal Jacobian: every element of a leaf perturbed at once (one group), so output row
    i measures element i alone and the comparison is element by element without the dense Jacobian.
    A row with kinks or one-sided differences is re-checked densely where the Jacobian fits in memory."""
    prepared = evaluator.prepared
    options = context.options
    precision = working_eps(prepared, options)
    plans = diagonal_plan(prepared.x0, leaves, options.seed)
    directions = Directions(prepared.x0, leaves, relative_step(options.eps, precision), {}, plans)
    analytic = np.concatenate([(context.diagonal[leaf.slice] * plans[leaf.name].basis[0])[:, None]
                               for leaf in leaves], axis=1)
    blocks = [(output.slice, entry.slice) for entry in directions.per_leaf for output in prepared.output_specs]
    rounder = PointRounder(prepared.leaves, options.promote)
    verdicts = StepLadder(evaluator, directions, f0, precision, rounder, context.tolerance, blocks).run(analytic)
    undefined = undefined_gradients(prepared)
    rows: List[RowResult] = []
    sweeps = 0
    for entry in directions.per_leaf:
        scales = plans[entry.leaf.name].basis[0]
        for output in prepared.output_specs:
            row, worst_at = _block_row(entry, output, analytic, verdicts, options.kinks, analytic_mode, order,
                                       _spread_value(context, analytic_mode, order))
            m = sum(s.size for s in prepared.output_specs)
            if not _clean(row) and (row.kinks or row.jumps or row.one_sided) and \
                    full_check_bytes(m, len(prepared.x0), len(prepared.x0), dense=True) <= context.memory:
                return _full_rows(evaluator, context, leaves, f0, analytic_mode, order, compress=False)
            owners = np.full((1, len(f0)), -1)
            owners[0, output.slice] = np.arange(output.offset, output.offset + output.size)  # output i is element i
            _as_elements(row, worst_at, entry, output, analytic, verdicts, owners, scales,
                         f"full, diagonal Jacobian verified: all {entry.leaf.size} elements perturbed at once, "
                         "every entry compared")
            if entry.leaf.name in undefined:
                _mark_undefined(row, undefined[entry.leaf.name])
            if row.status == "fail" and worst_at is not None and sweeps < SWEEP_ROWS:
                row.step_sweep = _element_sweep(evaluator, directions, rounder, entry, output, worst_at, row, owners,
                                                scales)
                sweeps += 1
            rows.append(row)
    for leaf in leaves:
        _strategy(context, leaf, order, analytic_mode, f"diagonal Jacobian verified with 3 VJPs, all {leaf.size} "
                                                       "elements perturbed at once")
        context.notes.append(f"{leaf.name}: the analytic Jacobian is diagonal (verified with 3 VJPs), so all "
                             f"{leaf.size} elements were perturbed at once: every entry compared in "
                             "2 evaluations per step instead of 2 per element")
    return rows


def _as_elements(row: RowResult, worst_at: Optional[Tuple[int, int]], entry: LeafDirections, output: LeafSpec,
                 analytic: np.ndarray, verdicts: ElementVerdicts, owners: np.ndarray, scales: np.ndarray,
                 method: str) -> None:
    """A compressed row in element terms, where each output row of each group measures one known element:
    ``owners[g, i]`` (-1 for none: the entry compared is zero on the analytic side). Values are divided by
    the element's scale in its group direction, ``scales[j]``; the worst entry and the maps name elements."""
    leaf = entry.leaf
    where = (output.slice, entry.slice)
    a, n = analytic[where], verdicts.numeric[where]
    own = owners[:, output.slice].T  # (outputs, groups)
    owned = own >= 0
    s = np.where(owned, scales[np.maximum(own, 0)], 1.0)
    with np.errstate(invalid="ignore"):
        signed = (a - n) / s
    difference = np.abs(signed)
    row.method = method
    row.max_abs_error = float(np.max(np.where(np.isfinite(difference), difference, 0.0), initial=0.0))
    if row.worst is not None and worst_at is not None and owned[worst_at]:
        out_i, g = worst_at
        j, k, w = int(own[out_i, g]), float(s[out_i, g]), row.worst
        row.worst = WorstElement(
            input_index=leaf.unravel(j), output_index=w.output_index, analytic=w.analytic / k,
            numeric=w.numeric / k, abs_error=w.abs_error / k, allowed=w.allowed / k,
            step=None if w.step is None else w.step * k, fd_error=None if w.fd_error is None else w.fd_error / k,
            method=w.method)
    if row.status == "fail" and leaf.size:
        elements, values = own[owned], signed[owned]
        order = np.argsort(np.where(np.isfinite(values), np.abs(values), np.inf), kind="stable")
        error_map = np.zeros(leaf.size)
        error_map[elements[order]] = values[order]  # the largest error of each element is written last
        outside = np.zeros(leaf.size, dtype=bool)
        outside[own[owned & (verdicts.status[where] == FAIL)]] = True
        row.error_map, row.outside_map = error_map.reshape(leaf.shape), outside.reshape(leaf.shape)


def _element_sweep(evaluator: Evaluator, directions: Directions, rounder: PointRounder, entry: LeafDirections,
                   output: LeafSpec, worst_at: Tuple[int, int], row: RowResult, owners: np.ndarray,
                   scales: np.ndarray) -> StepSweep:
    """The step-size sweep of a compressed row's worst element (along its group), in the element's units."""
    out_i, g = worst_at
    s = float(scales[owners[g, output.offset + out_i]])
    w = row.worst
    label = f"{entry.leaf.name}{_index_text(w.input_index)} -> {output.name}{_index_text(output.unravel(out_i))}"
    sweep = step_sweep(evaluator, directions, rounder, entry.first + g, output.offset + out_i, label,
                       w.analytic * s, w.numeric * s, (w.step or 0.0) / s, w.allowed * s)
    return StepSweep(element=sweep.element, steps=[h * s for h in sweep.steps], numeric=[v / s for v in sweep.numeric],
                     analytic=w.analytic, reference=w.numeric, used_step=w.step or 0.0, allowed=w.allowed)


def _named(row: RowResult, entry: LeafDirections, verdicts: ElementVerdicts, columns: Optional[ColumnAnalytic],
           prepared: PreparedFunction) -> bool:
    """A failed row of verified column groups that already names its elements (every failing entry has
    its element, no kink, no one-sided difference): it needs no element-by-element re-check."""
    owners = columns.owners.get(entry.leaf.name) if columns is not None else None
    if owners is None or row.status != "fail" or row.kinks or row.jumps or row.one_sided:
        return False
    output = next(spec for spec in prepared.output_specs if spec.name == row.output)
    return not _unowned_failure(row, entry, output, verdicts, owners)


def _unowned_failure(row: RowResult, entry: LeafDirections, output: LeafSpec, verdicts: ElementVerdicts,
                     owners: np.ndarray) -> bool:
    """A failing entry no element owns: a nonzero the analytic side is missing, somewhere in its group."""
    fails = verdicts.status[output.slice, entry.slice] == FAIL
    return row.status == "fail" and bool(np.any(fails & (owners[:, output.slice].T < 0)))


def _clean(row: RowResult) -> bool:
    """A compressed row accepted as it is: passed, no kink, no one-sided difference."""
    return row.status == "pass" and not row.kinks and not row.jumps and not row.one_sided


def _index_text(index: Sequence[int]) -> str:
    return "[" + ", ".join(str(i) for i in index) + "]" if index else ""


def _spread_value(context: _Context, analytic_mode: str, order: int) -> float:
    spread = context.spreads.get(analytic_mode) if order == 1 else None
    return spread.value if spread is not None else 0.0


def _block_row(entry: LeafDirections, output: LeafSpec, analytic: np.ndarray, verdicts: ElementVerdicts,
               kinks: str, analytic_mode: str, order: int,
               spread: float = 0.0) -> Tuple[RowResult, Optional[Tuple[int, int]]]:
    """The row of one (input, output) block, and the (output, direction) position of its worst element.

    ``spread`` is how much two analytic calls at the same probe differ (0 when deterministic): a block
    whose every mismatch lies within ``allowed + SPREAD_EXPLAINS * spread`` is ``nondeterministic``."""
    leaf = entry.leaf
    where = (output.slice, entry.slice)
    a, n, allowed = analytic[where], verdicts.numeric[where], verdicts.allowed[where]
    status, error, method = verdicts.status[where], verdicts.error[where], verdicts.method[where]
    left, right = verdicts.left[where], verdicts.right[where]
    at_jump = status == JUMP
    unresolved = status == UNRESOLVED
    at_kink = (status == KINK) | at_jump | unresolved  # non-differentiable: not part of the smooth comparison
    with np.errstate(invalid="ignore"):
        subgradient = (a >= np.fmin(left, right) - allowed) & (a <= np.fmax(left, right) + allowed)
        # at a jump the analytic value must be one of the one-sided derivatives, not between them
        subgradient = np.where(at_jump | unresolved, at_jump, subgradient)
    bad = status == FAIL
    if kinks == "fail":
        bad |= at_kink & ~unresolved
    elif kinks == "subgradient":
        bad |= at_kink & ~subgradient & ~unresolved
    difference = np.abs(a - n)
    noise = (status == FAIL) & (difference <= allowed + SPREAD_EXPLAINS * spread) if spread > 0 else np.zeros_like(bad)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(np.isfinite(difference), difference / np.where(allowed > 0, allowed, np.inf), np.inf)
    ratio = np.nan_to_num(ratio, nan=np.inf)
    candidates = bad if bad.any() else ~at_kink
    ranked = np.where(candidates, ratio, -1.0)
    smooth = ~at_kink
    rel, graded = block_grade(a, n, allowed, bad, smooth)
    steps = verdicts.steps[entry.slice]
    refined = int(np.count_nonzero(verdicts.levels[entry.slice]))
    one_sided = int(np.count_nonzero(((method == FORWARD) | (method == BACKWARD)) & ~at_kink))
    row = RowResult(input=leaf.name, output=output.name, shape=leaf.shape, kind=leaf.kind, order=order,
                    method="full", analytic_mode=analytic_mode,
                    status="fail" if (bad & ~noise).any() else "nondeterministic" if bad.any()
                    else "unresolved" if unresolved.any() else "pass",
                    max_abs_error=float(np.max(np.where(smooth, difference, 0.0))) if difference.size else 0.0,
                    rel_error=rel, grade=graded, mismatches=int(bad.sum()), compared=int(a.size),
                    kinks=int((at_kink & ~at_jump & ~unresolved).sum()), jumps=int((at_jump | unresolved).sum()),
                    unresolved=int(unresolved.sum()), one_sided=one_sided, refined=refined)
    if verdicts.resolution is not None:
        resolution = verdicts.resolution[where]
        if np.isfinite(resolution).any() and graded != ZERO:  # no relative resolution of a zero derivative
            row.resolution = float(np.nanmax(resolution))
    if entry.compressed:
        row.method = (f"full, compressed: {leaf.size} columns in {entry.count} group(s), every entry compared")
        row.compared = int(output.size * leaf.size)
    elif entry.basis is not None:
        row.method = f"full along {entry.count} tangent direction(s) ({entry.structure})"
    if refined:
        deepest = int(np.max(verdicts.levels[entry.slice]))
        row.method += f", step ladder on {refined} direction(s) (down to h/{2 ** deepest})"
    worst_at = None
    if bad.any() and entry.basis is None:
        maps = element_map(a - n, ratio, bad, leaf.shape)
        if maps is not None:
            row.error_map, row.outside_map = maps
    if ranked.size and np.max(ranked) >= 0:
        out_i, d_j = np.unravel_index(int(np.argmax(ranked)), ranked.shape)
        worst_at = (int(out_i), int(d_j))
        row.worst = WorstElement(
            input_index=leaf.unravel(int(d_j)) if entry.basis is None else (),
            output_index=output.unravel(int(out_i)), analytic=float(a[out_i, d_j]), numeric=float(n[out_i, d_j]),
            abs_error=float(difference[out_i, d_j]), allowed=float(allowed[out_i, d_j]), step=float(steps[d_j]),
            fd_error=float(error[out_i, d_j]), method=METHOD_NAMES[int(method[out_i, d_j])],
            direction="" if entry.basis is None else entry.label(int(d_j)))
    jumped = np.isfinite(verdicts.jump[where]) if verdicts.jump is not None else np.zeros(a.shape, dtype=bool)
    row.jumps += int((jumped & bad).sum())  # a wrong derivative at a jump is still a jump
    for out_i, d_j in list(zip(*np.nonzero(at_kink | (jumped & bad))))[:KINKS_LISTED]:
        row.nondifferentiable.append(KinkPoint(
            input_index=leaf.unravel(int(d_j)) if entry.basis is None else (),
            output_index=output.unravel(int(out_i)), analytic=float(a[out_i, d_j]), left=float(left[out_i, d_j]),
            right=float(right[out_i, d_j]), subgradient=bool(subgradient[out_i, d_j]),
            direction="" if entry.basis is None else entry.label(int(d_j)),
            jump=float(verdicts.jump[where][out_i, d_j]) if jumped[out_i, d_j] else None))
    row.message = _row_message(row, kinks, int((at_kink & ~at_jump & ~unresolved & ~subgradient).sum()))
    if spread > 0 and bad.any():
        row.message = "; ".join(part for part in (_noise_message(row, spread, int(noise.sum())), row.message) if part)
    return row, worst_at


def _noise_message(row: RowResult, spread: float, explained: int) -> str:
    side = "backward" if row.analytic_mode == "rev" else "forward-mode rule"
    if row.status == "nondeterministic":
        return (f"the {side} is not deterministic: two calls at the same probe differ by up to {spread:.2g} (the "
                f"spread), and all {explained} mismatch(es) lie within it: a non-deterministic {side}, not a wrong "
                "gradient")
    return (f"the {side} is also non-deterministic (spread {spread:.2g}), but {row.mismatches - explained} "
            "mismatch(es) are larger than the spread explains: a wrong gradient")


def _row_message(row: RowResult, kinks: str, outside: int) -> str:
    parts = []
    if row.jumps:
        solved = row.jumps - row.unresolved
        if solved:
            parts.append(f"{solved} element(s) where fn itself is discontinuous at the point (its one-sided limits differ "
                         "and do not converge as the step shrinks): judged against the derivative on each side, "
                         "measured from points on that side only")
        if row.unresolved:
            parts.append(f"{row.unresolved} element(s) where fn jumps and the derivative on one side could not be "
                         "measured (fn is not finite there): UNRESOLVED, not a pass; check at a point away from the jump")
    if row.resolution is not None:
        parts.append(f"fn is not smooth below the default step here (internal adaptivity, a solver's stopping "
                     f"tolerance, or noise): derivatives were measured at larger steps, to a relative resolution of "
                     f"about {row.resolution:.1g}; errors below that cannot be seen in this function")
    if row.kinks:
        effect = {"allow": "shown, not failed (kinks='allow')",
                  "subgradient": "failed only where the analytic value is not between the one-sided values "
                                 "(kinks='subgradient')",
                  "fail": "each one fails the check (kinks='fail')"}[kinks]
        parts.append(f"{row.kinks} element(s) at non-differentiable points (the one-sided differences disagree "
                     f"and do not converge): {effect}")
        if outside:
            parts.append(f"{outside} of them have an analytic value outside the one-sided values (not a subgradient)")
    if row.one_sided:
        parts.append(f"{row.one_sided} element(s) near a domain edge (fn is not finite on one side of the "
                     "central difference): one-sided differences used")
    return "; ".join(parts)


def undefined_gradients(prepared: PreparedFunction) -> dict:
    """Leaf name -> reason, for leaves whose framework defines no gradient (filled by the adapter)."""
    return dict(offered(prepared, UndefinedGradients, "undefined_gradients") or {})


def _mark_undefined(row: RowResult, reason: str) -> None:
    """A leaf without a defined gradient: neither a pass nor a silent zero. It is acceptable only where
    the numeric derivative is zero too."""
    row.status = "no-gradient"
    verdict = ("the numeric derivative is zero too" if row.mismatches == 0 else
               "but the numeric derivative is not zero: the gradient is missing")
    row.message = f"no gradient defined ({reason}); {verdict}"


def _consistency_rows(evaluator: Evaluator, options: Options, order: int,
                      spreads: Optional[Mapping[str, Spread]] = None) -> List[RowResult]:
    """<J^T v, u> from the VJP must equal <v, J u> from the JVP to round-off: no finite differences.
    A disagreement within what the modes' spreads (non-deterministic rules) explain is ``nondeterministic``."""
    prepared = evaluator.prepared
    rng = np.random.default_rng(options.seed + 2)
    m = sum(spec.size for spec in prepared.output_specs)
    v = rng.standard_normal((1, m))
    u = rng.standard_normal((1, len(prepared.x0)))
    try:
        pulled = evaluator.vjp(v)[0]
        pushed = evaluator.jvp(u)[0]
    except ModeUnsupportedError:
        return []
    eps = working_eps(prepared, options)
    reverse, forward = float(pulled @ u[0]), float(v[0] @ pushed)
    allowed = 1e3 * eps * (float(np.abs(pulled) @ np.abs(u[0])) + float(np.abs(v[0]) @ np.abs(pushed))) + 1e-300
    difference = abs(reverse - forward)
    rel = relative_error(np.array([reverse]), np.array([forward]))
    # a unit-norm probe's spread s shows in <J^T v, u> as about s |v| |u|
    noise = sum(spread.value for spread in (spreads or {}).values()) * float(np.linalg.norm(v) * np.linalg.norm(u))
    status = "pass" if difference <= allowed else \
        "nondeterministic" if difference <= allowed + SPREAD_EXPLAINS * noise else "fail"
    return [RowResult(input="(all checked)", output="(all)", shape=(len(prepared.x0),), order=order,
                      method="consistency <J^T v, u> = <v, J u>", analytic_mode="rev vs fwd",
                      status=status, max_abs_error=difference, rel_error=rel,
                      grade=grade(rel), mismatches=int(not difference <= allowed), compared=1,
                      worst=WorstElement((), (), reverse, forward, difference, allowed, None),
                      message="" if status == "pass" else
                      "reverse mode (value 'analytic') and forward mode (value 'numeric') disagree: one of your "
                      "VJP/JVP rules is wrong" if status == "fail" else
                      "reverse mode and forward mode disagree only within the spread of two calls of each: the "
                      "rules are not deterministic, not shown wrong")]


def _unsupported_rows(evaluator, leaves, analytic_mode, order, message) -> List[RowResult]:
    return [RowResult(input=leaf.name, output=output.name, shape=leaf.shape, kind=leaf.kind, order=order,
                      method="full", analytic_mode=analytic_mode, status="unsupported", message=message)
            for leaf in leaves for output in evaluator.prepared.output_specs]


@lru_cache(maxsize=None)
def product_quantile(probability: float) -> float:
    """``t`` with ``P(|Z1 Z2| <= t) = probability`` for independent standard normals ``Z1, Z2``.

    A single wrong Jacobian entry ``e`` shows in a probe as ``v_i u_j e`` with ``v, u`` Gaussian, so it
    escapes one probe when ``|v_i u_j|`` is below ``allowed / |e|``; this quantile turns the probe count
    into the smallest error that is caught with a stated probability."""
    z = np.linspace(1e-6, 9.0, 6001)
    weights = np.exp(-z * z / 2.0) * math.sqrt(2.0 / math.pi)  # density of |Z2|
    erf = np.vectorize(math.erf)

    def cdf(t: float) -> float:
        return float(np.trapezoid(weights * erf(t / (math.sqrt(2.0) * z)), z)
                     if hasattr(np, "trapezoid") else np.trapz(weights * erf(t / (math.sqrt(2.0) * z)), z))

    low, high = 1e-12, 10.0
    for _ in range(80):
        mid = math.sqrt(low * high)
        if cdf(mid) < probability:
            low = mid
        else:
            high = mid
    return low


def _fast_rows(evaluator: Evaluator, context: _Context, leaves: Sequence[LeafSpec], f0: np.ndarray,
               analytic_mode: str, order: int) -> Tuple[List[RowResult], Dict[str, Tuple[np.ndarray, Optional[np.ndarray]]]]:
    """Projection check: per probe p and leaf L, compare v_p . (J u_pL) both ways.

    Returns the rows and, per leaf, the cotangent (and analytic ``J^T v``, in rev mode) of its worst
    probe, from which a failing leaf too large for a full check is bisected."""
    options, tolerance = context.options, context.tolerance
    prepared = evaluator.prepared
    x0 = prepared.x0
    rng = np.random.default_rng(options.seed)
    m = sum(spec.size for spec in prepared.output_specs)
    precision = working_eps(prepared, options)
    step = relative_step(options.eps, precision)
    scale = np.maximum(1.0, np.abs(x0))
    cotangents = rng.standard_normal((options.probes, m))
    directions = np.zeros((options.probes * len(leaves), len(x0)))
    bases: Dict[str, np.ndarray] = {}
    for leaf in leaves:
        if leaf.name in context.structures:
            basis, _ = context.structures[leaf.name].basis(leaf.name, x0[leaf.slice].reshape(leaf.shape))
            bases[leaf.name] = basis * max(1.0, float(np.max(np.abs(x0[leaf.slice]))))
    for p in range(options.probes):
        for k, leaf in enumerate(leaves):
            if leaf.name in bases:
                basis = bases[leaf.name]
                direction = rng.standard_normal(len(basis)) @ basis / math.sqrt(len(basis))
            else:
                direction = rng.standard_normal(leaf.size) * scale[leaf.slice]
            directions[p * len(leaves) + k, leaf.slice] = direction
    rounder = PointRounder(leaves, options.promote)
    plus_points = rounder(x0 + step * directions)
    minus_points = rounder(x0 - step * directions)
    directions = (plus_points - minus_points) / (2.0 * step)  # the directions really taken, after rounding
    try:
        if analytic_mode == "rev":
            gradients = evaluator.vjp(cotangents)
            analytic = np.array([gradients[i // len(leaves)] @ directions[i] for i in range(len(directions))])
        else:
            pushed = evaluator.jvp(directions)
            analytic = np.array([cotangents[i // len(leaves)] @ pushed[i] for i in range(len(directions))])
            gradients = None
    except ModeUnsupportedError as exc:
        return _unsupported_rows(evaluator, leaves, analytic_mode, order, str(exc)), {}
    labels = [f"{leaves[i % len(leaves)].name} probe {i // len(leaves) + 1}" for i in range(len(directions))]
    outputs = evaluator.evaluate(np.concatenate([plus_points, minus_points]),
                                 [f"x + h*u ({l})" for l in labels] + [f"x - h*u ({l})" for l in labels],
                                 allow_nonfinite=True)
    f_plus, f_minus = outputs[: len(directions)], outputs[len(directions):]
    undefined = undefined_gradients(prepared)
    quantile = product_quantile((1.0 - FAST_CONFIDENCE) ** (1.0 / options.probes))
    rows = []
    probes: Dict[str, Tuple[np.ndarray, Optional[np.ndarray]]] = {}
    for k, leaf in enumerate(leaves):
        worst: Optional[WorstElement] = None
        failed = 0
        pairs = []
        largest_allowed = 0.0
        for p in range(options.probes):
            i = p * len(leaves) + k
            v = cotangents[p]
            with np.errstate(invalid="ignore", over="ignore"):
                numeric = float(v @ (f_plus[i] - f_minus[i])) / (2.0 * step)
                fd_error = precision * float(np.abs(v) @ (np.abs(f_plus[i]) + np.abs(f_minus[i]))) / (2.0 * step)
            if gradients is not None:
                magnitude = float(np.linalg.norm(gradients[p, leaf.slice] * scale[leaf.slice]))
            else:
                magnitude = float(np.linalg.norm(v)) * float(np.linalg.norm(pushed[i])) / max(1.0, np.sqrt(m))
            allowed = tolerance.scalar_bound(numeric, magnitude, fd_error)
            largest_allowed = max(largest_allowed, allowed) if np.isfinite(allowed) else largest_allowed
            difference = abs(analytic[i] - numeric)
            is_bad = not (difference <= allowed) or not np.isfinite(allowed)
            pairs.append((analytic[i], numeric, allowed, is_bad))
            failed += int(is_bad)
            candidate = WorstElement((), (), float(analytic[i]), numeric, float(difference), float(allowed), step,
                                     fd_error=fd_error, method="central difference along a random direction")
            if worst is None or candidate.ratio > worst.ratio or not np.isfinite(candidate.abs_error):
                worst = candidate
                probes[leaf.name] = (v, gradients[p] if gradients is not None else None)
        a_values, n_values, allowed_values, bad_values = (np.array(column) for column in zip(*pairs))
        rel, graded = block_grade(a_values, n_values, allowed_values, bad_values.astype(bool),
                                  np.ones(len(pairs), dtype=bool))
        detectable = largest_allowed / quantile
        power = (f"{options.probes} random probes: an error confined to a single Jacobian entry d out_i / d "
                 f"{leaf.name}[j] is caught with probability >= {FAST_CONFIDENCE:.1%} when it exceeds "
                 f"{detectable:.2g} / max(1, |{leaf.name}[j]|)")
        row = RowResult(
            input=leaf.name, output="v.out", shape=leaf.shape, kind=leaf.kind, order=order,
            method=f"fast ({options.probes} probes)", analytic_mode=analytic_mode,
            status="fail" if failed else "pass", max_abs_error=float(np.max(np.abs(a_values - n_values))),
            rel_error=rel, grade=graded, mismatches=failed, compared=options.probes, worst=worst,
            message=(f"{failed} of {options.probes} probes outside tolerance" if failed else power))
        if leaf.name in undefined:
            _mark_undefined(row, undefined[leaf.name])
        rows.append(row)
    return rows, probes
