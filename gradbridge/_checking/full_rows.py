"""``full`` mode: every directional derivative compared, from the dense analytic Jacobian, compressed columns,
or a verified diagonal.

Invariant: each (input, output) block is compared element by element with error-estimated tolerances, and a
failing element is named.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from .._adapter import LeafSpec, TransposedProducts, offered
from .compress import MIN_COLUMNS, diagonal_plan, plan as compression_plan
from .diagnostics import SWEEP_ROWS, step_sweep
from .directions import Directions
from .._errors import InvalidArgumentError, ModeUnsupportedError
from .evaluate import Evaluator
from .finite_diff import relative_step
from .memory import full_check_bytes, size_text
from .ladder_codes import ElementVerdicts
from .numeric import StepLadder
from .._options import Options
from .._precision import PointRounder
from .._reporting.report import RowResult
from .structure import Structure
from .verified_groups import ColumnAnalytic, analytic_by_columns
from .context import CheckContext, undefined_gradients, working_eps
from .fast_rows import unsupported_rows
from .rows import as_elements, block_row, clean, element_sweep, index_text, mark_undefined, _named, spread_value, unowned_failure
from .strategy import full_bytes

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


def full_rows(evaluator: Evaluator, context: CheckContext, leaves: Sequence[LeafSpec], f0: np.ndarray,
              analytic_mode: str, order: int, jacobian: Optional[np.ndarray] = None,
              compress: bool = True) -> List[RowResult]:
    """Every Jacobian entry of ``leaves``, compared. Leaves whose analytic sparsity allows it are
    checked with compressed finite differences (:mod:`gradbridge._checking.compress`); one that is not cleanly
    right that way is re-checked element by element, so a failure always names its element."""
    if compress and order == 1 and jacobian is None and context.diagonal is not None:
        return _diagonal_rows(evaluator, context, leaves, f0, analytic_mode, order)
    try:
        plan = _FullPlan.make(evaluator, context, leaves, analytic_mode, order, jacobian, compress)
    except ModeUnsupportedError as exc:
        return unsupported_rows(evaluator, leaves, analytic_mode, order, str(exc))
    prepared = evaluator.prepared
    rounder = PointRounder(prepared.leaves, context.options.promote)
    blocks = [(output.slice, entry.slice) for entry in plan.directions.per_leaf for output in prepared.output_specs]
    ladder = StepLadder(evaluator, plan.directions, f0, plan.precision, rounder, context.tolerance, blocks)
    verdicts = ladder.run(plan.analytic)
    rows = _compared_rows(evaluator, context, plan, verdicts, analytic_mode, order)
    _record_strategy(context, plan, analytic_mode, order)
    redo = [entry.leaf for entry in plan.directions.per_leaf
            if entry.compressed and not all(clean(row) or _named(row, entry, verdicts, plan.columns, prepared)
                                            for row in rows[entry.leaf.name])]
    _redo_element_by_element(evaluator, context, redo, rows, f0, analytic_mode, order, plan.jacobian)
    return [row for leaf in leaves for row in rows[leaf.name]]


@dataclasses.dataclass
class _FullPlan:
    """How a full comparison of some leaves runs: the analytic side (dense Jacobian or verified column groups),
    the perturbation directions (compressed where the sparsity allows), and the working precision."""

    precision: float
    jacobian: Optional[np.ndarray]
    columns: Optional[ColumnAnalytic]
    plans: Dict[str, Any]
    directions: Directions
    analytic: np.ndarray

    @classmethod
    def make(cls, evaluator: Evaluator, context: CheckContext, leaves: Sequence[LeafSpec], analytic_mode: str,
             order: int, jacobian: Optional[np.ndarray], compress: bool) -> "_FullPlan":
        """Raises ModeUnsupportedError when the analytic Jacobian cannot be computed in ``analytic_mode``."""
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
            jacobian = _analytic_jacobian(evaluator, analytic_mode, context.memory, sum(l.size for l in leaves))
        step = relative_step(options.eps, precision)
        if columns is not None:
            plans = columns.plans
            directions = Directions(prepared.x0, leaves, step, {}, plans)
            analytic = np.concatenate([columns.blocks[entry.leaf.name] for entry in directions.per_leaf], axis=1)
        else:
            # rounding to a low-precision dtype would bend a group's direction: compress only float64 checks
            plans = compression_plan(prepared.x0, leaves, jacobian, options.seed, excluded=list(structures)) \
                if compress and options.promote else {}
            directions = Directions(prepared.x0, leaves, step, structures, plans)
            analytic = directions.project(jacobian)
        return cls(precision, jacobian, columns, plans, directions, analytic)


def _compared_rows(evaluator: Evaluator, context: CheckContext, plan: _FullPlan, verdicts: ElementVerdicts,
                   analytic_mode: str, order: int) -> Dict[str, List[RowResult]]:
    """One row per (leaf, output) block from the elements' verdicts, with a step sweep for the first failing
    rows (at most :data:`SWEEP_ROWS`)."""
    prepared = evaluator.prepared
    options = context.options
    directions, columns, analytic = plan.directions, plan.columns, plan.analytic
    undefined = undefined_gradients(prepared)
    rows: Dict[str, List[RowResult]] = {}
    sweeps = 0
    for entry in directions.per_leaf:
        rows[entry.leaf.name] = []
        for output in prepared.output_specs:
            row, worst_at = block_row(entry, output, analytic, verdicts, options.kinks, analytic_mode, order,
                                      spread_value(context, analytic_mode, order))
            owners = columns.owners.get(entry.leaf.name) if columns is not None else None
            if owners is not None:
                group = plan.plans[entry.leaf.name]
                scales = group.basis[group.groups, np.arange(entry.leaf.size)]  # each element's scale in its group
                as_elements(row, worst_at, entry, output, analytic, verdicts, owners, scales,
                            f"full, {entry.count} verified column groups: every entry compared, element by element")
                nameable = not unowned_failure(row, entry, output, verdicts, owners)
                if row.status == "fail" and worst_at is not None and sweeps < SWEEP_ROWS and nameable:
                    row.step_sweep = element_sweep(evaluator, directions, PointRounder(prepared.leaves, options.promote),
                                                   entry, output, worst_at, row, owners, scales)
                    sweeps += 1
            if entry.leaf.name in undefined:
                mark_undefined(row, undefined[entry.leaf.name])
            if row.status == "fail" and worst_at is not None and sweeps < SWEEP_ROWS and not entry.compressed:
                out_i, d_j = worst_at
                label = f"{entry.label(d_j)} -> {output.name}{index_text(output.unravel(out_i))}"
                row.step_sweep = step_sweep(evaluator, directions, PointRounder(prepared.leaves, options.promote),
                                            entry.first + d_j, output.offset + out_i, label, row.worst.analytic,
                                            row.worst.numeric, row.worst.step, row.worst.allowed)
                sweeps += 1
            rows[entry.leaf.name].append(row)
    return rows


def _record_strategy(context: CheckContext, plan: _FullPlan, analytic_mode: str, order: int) -> None:
    """The notes and strategy lines of a full comparison: how each leaf was compared."""
    columns = plan.columns
    for name, group in ({} if columns is not None else plan.plans).items():
        context.notes.append(f"compressed finite differences: {name}'s {group.groups.size} elements in {group.count} "
                             "group(s) of columns that share no output (colouring of the analytic Jacobian's "
                             f"sparsity), {2 * group.count} evaluations instead of {2 * group.groups.size}")
    if columns is not None:
        context.notes.extend(columns.notes)
    for entry in plan.directions.per_leaf:
        _strategy(context, entry.leaf, order, analytic_mode,
                  columns.strategy[entry.leaf.name] if columns is not None else
                  f"{entry.count} column groups (colouring of the dense analytic Jacobian)" if entry.compressed else
                  f"along {entry.count} tangent directions ({entry.structure})" if entry.basis is not None else
                  "element by element, dense analytic Jacobian")


def _redo_element_by_element(evaluator: Evaluator, context: CheckContext, redo: List[LeafSpec],
                             rows: Dict[str, List[RowResult]], f0: np.ndarray, analytic_mode: str, order: int,
                             jacobian: Optional[np.ndarray]) -> None:
    """Leaves not cleanly right when compressed are compared again element by element (their rows replaced),
    so a failure names its element, unless that dense comparison would exceed the memory budget."""
    prepared = evaluator.prepared
    m = sum(spec.size for spec in prepared.output_specs)
    needed = full_check_bytes(m, sum(leaf.size for leaf in redo), len(prepared.x0), dense=jacobian is None)
    if redo and needed > context.memory:
        context.notes.append(f"{', '.join(leaf.name for leaf in redo)}: re-checking element by element would need "
                             f"about {size_text(needed)} (the dense {m:,} x {len(prepared.x0):,} comparison), above "
                             f"memory={size_text(context.memory)}; the failing groups are reported as they are "
                             "(check fewer inputs with wrt=, or pass a larger memory=, to name each element)")
        return
    if not redo:
        return
    for leaf in redo:
        rows[leaf.name] = []
    for row in full_rows(evaluator, context, redo, f0, analytic_mode, order, jacobian, compress=False):
        row.method = f"compressed, then element by element: {row.method}"
        rows[row.input].append(row)
    for leaf in redo:
        _strategy(context, leaf, order, analytic_mode, "compressed, then element by element (not cleanly right "
                                                       "compressed), dense analytic Jacobian")


def _strategy(context: CheckContext, leaf: LeafSpec, order: int, analytic_mode: str, how: str) -> None:
    """Record how ``leaf`` was compared, for the report's strategy line (a later pass replaces it)."""
    key = leaf.name + ("" if order == 1 else f" (order {order})")
    if analytic_mode != "rev" or context.options.analytic == "both":
        key += f" [{analytic_mode}]"
    context.strategy[key] = how


def columns_for_auto(evaluator: Evaluator, options: Options, structures: Mapping[str, Structure],
                      diagonal: bool, memory: Optional[int] = None) -> Optional[ColumnAnalytic]:
    """For ``mode='auto'`` when the dense full check is over budget (evaluations, or ``memory`` bytes):
    the verified column groups, whose cheaper full check may fit (found once, reused by the full check)."""
    prepared = evaluator.prepared
    if options.mode != "auto" or diagonal or options.analytic != "rev" or not options.promote or structures \
            or options.order != 1:
        return None
    m = sum(spec.size for spec in prepared.output_specs)
    if 2 * sum(leaf.size for leaf in prepared.leaves) + m <= options.budget and \
            (memory is None or full_bytes(prepared, False, None) <= memory):
        return None
    return _analytic_by_columns(evaluator, options, prepared.leaves, limit=options.budget)


def _analytic_by_columns(evaluator: Evaluator, options: Options, leaves: Sequence[LeafSpec],
                         limit: Optional[int] = None) -> Optional[ColumnAnalytic]:
    """The analytic side by column groups from transposed VJPs (:mod:`gradbridge._checking.verified_groups`),
    when that costs less than the dense Jacobian's VJPs; None to build the dense Jacobian instead."""
    prepared = evaluator.prepared
    m = sum(spec.size for spec in prepared.output_specs)
    if m < MIN_COLUMNS or offered(prepared, TransposedProducts, "vjp_transposed") is None:
        return None
    try:
        # a transposed VJP costs about two VJPs: worth it below half the dense Jacobian's m VJPs
        budget = m // 2 if limit is None else min(m // 2, limit)
        return analytic_by_columns(evaluator.vjp_transposed, evaluator.vjp, prepared.x0, leaves, m,
                                   working_eps(prepared, options), options.seed, budget)
    except ModeUnsupportedError:
        return None


def _diagonal_rows(evaluator: Evaluator, context: CheckContext, leaves: Sequence[LeafSpec], f0: np.ndarray,
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
            row, worst_at = block_row(entry, output, analytic, verdicts, options.kinks, analytic_mode, order,
                                       spread_value(context, analytic_mode, order))
            m = sum(s.size for s in prepared.output_specs)
            if not clean(row) and (row.kinks or row.jumps or row.one_sided) and \
                    full_check_bytes(m, len(prepared.x0), len(prepared.x0), dense=True) <= context.memory:
                return full_rows(evaluator, context, leaves, f0, analytic_mode, order, compress=False)
            owners = np.full((1, len(f0)), -1)
            owners[0, output.slice] = np.arange(output.offset, output.offset + output.size)  # output i is element i
            as_elements(row, worst_at, entry, output, analytic, verdicts, owners, scales,
                         f"full, diagonal Jacobian verified: all {entry.leaf.size} elements perturbed at once, "
                         "every entry compared")
            if entry.leaf.name in undefined:
                mark_undefined(row, undefined[entry.leaf.name])
            if row.status == "fail" and worst_at is not None and sweeps < SWEEP_ROWS:
                row.step_sweep = element_sweep(evaluator, directions, rounder, entry, output, worst_at, row, owners,
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
