"""One derivative order at a time: the analytic modes to compare, forward mode where reverse mode cannot run,
the spreads of a non-deterministic analytic side, and the second order (the gradient of the gradient).

Invariant: every analytic mode the user asked for (or ``analytic='auto'`` chose) gives rows, or an error
or unsupported row saying why; nothing is silently left unchecked.
"""

from __future__ import annotations

import dataclasses
from typing import List, Sequence

import numpy as np

from .._adapter import (ForwardRules, LeafSpec, offered)
from .determinism import measure_spread
from .._errors import FunctionEvaluationError, GradbridgeError, ModeUnsupportedError
from .evaluate import Evaluator
from .finite_diff import relative_step
from .localize import bisection_row
from .memory import full_check_bytes
from .._precision import PointRounder
from .._options import LEVEL_MODES
from .._reporting.report import Contract, RowResult
from .contracts import hessian_symmetry
from .context import CheckContext, EvaluationCounts, working_eps
from .fast_rows import consistency_rows, _fast_rows
from .full_rows import full_rows, _strategy

#: How each mode builds the next level's function, and what the report calls it.
_BUILT_BY = {"rev": ("gradient_function", "the gradient of", "x -> J(x)^T v, reverse mode"),
             "both": ("gradient_function", "the gradient of", "x -> J(x)^T v, reverse mode"),
             "fwd": ("tangent_function", "the directional derivative of", "x -> J(x) t, forward mode")}
_MODE_NAMES = {"rev": "reverse", "fwd": "forward", "both": "reverse and forward"}


def higher_orders(first: Evaluator, context: CheckContext, counts: EvaluationCounts,
                  contracts: List[Contract]) -> List[RowResult]:
    """Levels 2..order: each differentiates the function the level below built (``x -> J(x)^T v`` from reverse
    mode, ``x -> J(x) t`` from forward mode, at a random ``v`` or ``t``) and checks it in its own mode, so
    ``analytic=("rev", "fwd")`` checks forward-over-reverse, ``("fwd", "fwd")`` forward-over-forward. A scalar
    fn's reverse-mode level 2 also gets the Hessian-symmetry contract (appended to ``contracts``)."""
    options = context.options
    modes = options.level_modes()
    rows: List[RowResult] = []
    current, what = first, "fn"
    for level in range(2, options.order + 1):
        below, mode = modes[level - 2], modes[level - 1]
        method, prefix, formula = _BUILT_BY[below]
        size = (sum(spec.size for spec in current.prepared.output_specs) if method == "gradient_function"
                else len(current.prepared.x0))
        direction = np.random.default_rng(options.seed + level - 1).standard_normal(size)
        build = getattr(current.prepared, method, None)
        try:
            if build is None:
                raise ModeUnsupportedError(f"this backend cannot build {formula} as a function to differentiate again")
            derived = build(direction)
        except GradbridgeError as exc:
            if not isinstance(exc, ModeUnsupportedError):
                raise
            return rows + [RowResult(input=leaf.name, output="derivative", shape=leaf.shape, kind=leaf.kind,
                                     order=order, analytic_mode=each, status="unsupported",
                                     message=f"order {order}: {exc}")
                           for order in range(level, options.order + 1)
                           for each in (LEVEL_MODES if modes[order - 1] == "both" else (modes[order - 1],))
                           for leaf in first.prepared.leaves]
        except Exception as exc:  # the framework refused to build the derivative function: the user's code is at fault
            raise FunctionEvaluationError(f"building {prefix} {what} ({formula}) for order={level} raised "
                                          f"{type(exc).__name__}: {exc}") from exc
        what = f"{prefix} {what}"
        evaluator = counts.add(Evaluator(derived, options.chunk_size, what=what, progress=context.progress))
        f0 = evaluator.evaluate(derived.x0[None, :], ["the unperturbed input"])[0]
        context.notes.append(f"order {level}: {what} ({formula} at a random {'v' if 'v,' in formula else 't'}), "
                             f"checked in {_MODE_NAMES[mode]} mode"
                             + (f": {_MODE_NAMES[mode]}-over-{_MODE_NAMES[below]}" if mode in LEVEL_MODES
                                and below in LEVEL_MODES else ""))
        saved = context.options
        context.options = dataclasses.replace(saved, analytic=mode)
        try:
            rows.extend(check_order(evaluator, context, f0, order=level))
        finally:
            context.options = saved
        if level == 2 and method == "gradient_function" and size == 1 and options.contracts:
            symmetric = hessian_symmetry(evaluator, options.seed, working_eps(evaluator.prepared, options))
            if symmetric is not None:
                contracts.append(symmetric)
        current = evaluator
    return rows


def check_order(evaluator: Evaluator, context: CheckContext, f0: np.ndarray, order: int) -> List[RowResult]:
    return _broken_forward_rules(evaluator, context, _compare_order(evaluator, context, f0, order), order)


def _broken_forward_rules(evaluator: Evaluator, context: CheckContext, rows: List[RowResult],
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


def _compare_order(evaluator: Evaluator, context: CheckContext, f0: np.ndarray, order: int) -> List[RowResult]:
    options = context.options
    leaves = list(evaluator.prepared.leaves)
    modes = ("rev", "fwd") if options.analytic == "both" else (options.analytic,)
    rows: List[RowResult] = []
    if order == 1:
        _measure_spreads(evaluator, context, modes)
    if options.analytic == "both":
        rows.extend(consistency_rows(evaluator, options, order, context.spreads))
    if context.mode == "full":
        for analytic_mode in modes:
            rows.extend(full_rows(evaluator, context, leaves, f0, analytic_mode, order))
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
            for localized in full_rows(evaluator, context, [leaf], f0, analytic_mode, order):
                localized.method = f"fast ({options.probes} probes) then {localized.method} on this leaf"
                if localized.status == "pass":
                    localized.message = ("the projection check failed but every element agrees: "
                                         f"projection detail: {row.message}")
                rows.append(localized)
    return rows


def _forward_instead(evaluator: Evaluator, context: CheckContext, leaves: Sequence[LeafSpec], f0: np.ndarray,
                     order: int, rows: List[RowResult], modes: Sequence[str]) -> List[RowResult]:
    """Under ``analytic='auto'``, a function that supports only forward mode (a forward-only adjoint, a
    library that raises on reverse mode) is checked in forward mode rather than reported unsupported."""
    lacking = ("unsupported", "no-gradient")
    if not context.automatic or order != 1 or modes != ("rev",) or not rows \
            or any(r.status not in lacking for r in rows) \
            or all(r.passed for r in rows):
        return rows
    _measure_spreads(evaluator, context, ("fwd",))
    forward = full_rows(evaluator, context, leaves, f0, "fwd", order)
    if any(r.status in lacking for r in forward):
        return rows
    for leaf in leaves:
        context.strategy.pop(leaf.name + ("" if order == 1 else f" (order {order})"), None)
    reason = rows[0].message.split("; but")[0]
    context.notes.append(f"reverse mode is not available for fn ({reason}): checked in forward mode "
                         "(JVPs) instead (analytic='auto'); pass analytic='rev' to require reverse mode")
    return forward


def _measure_spreads(evaluator: Evaluator, context: CheckContext, modes: Sequence[str]) -> None:
    """Run the analytic side twice per mode at one probe (first order only; see
    :mod:`gradbridge._checking.determinism`) and keep the spread of each mode that is not deterministic."""
    precision = working_eps(evaluator.prepared, context.options)
    for mode in modes:
        if mode not in context.spreads:
            spread = measure_spread(evaluator, mode, precision, context.options.seed)
            if spread is not None:
                context.spreads[mode] = spread


def spread_notes(context: CheckContext, rows: Sequence[RowResult]) -> None:
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
