"""One block's result: the verdicts of its elements become one row with its status, grade, worst element,
kinks and message.

Invariant: the row's status follows from its elements' verdicts alone (the rule of
:mod:`gradbridge._checking.tolerance`); the message says what the numbers show.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from .._adapter import (LeafSpec, PreparedFunction)
from .determinism import SPREAD_EXPLAINS
from .diagnostics import element_map, step_sweep
from .directions import Directions, LeafDirections
from .evaluate import Evaluator
from .grading import ZERO, block_grade
from .ladder_codes import BACKWARD, FAIL, FORWARD, JUMP, KINK, METHOD_NAMES, UNRESOLVED, ElementVerdicts
from .._precision import PointRounder
from .._reporting.report import KinkPoint, RowResult, StepSweep, WorstElement
from .verified_groups import ColumnAnalytic
from .context import KINKS_LISTED, CheckContext
from .._complex import conjugation, is_complex_dtype

def as_elements(row: RowResult, worst_at: Optional[Tuple[int, int]], entry: LeafDirections, output: LeafSpec,
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


def element_sweep(evaluator: Evaluator, directions: Directions, rounder: PointRounder, entry: LeafDirections,
                   output: LeafSpec, worst_at: Tuple[int, int], row: RowResult, owners: np.ndarray,
                   scales: np.ndarray) -> StepSweep:
    """The step-size sweep of a compressed row's worst element (along its group), in the element's units."""
    out_i, g = worst_at
    s = float(scales[owners[g, output.offset + out_i]])
    w = row.worst
    label = f"{entry.leaf.name}{index_text(w.input_index)} -> {output.name}{index_text(output.unravel(out_i))}"
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
    return not unowned_failure(row, entry, output, verdicts, owners)


def unowned_failure(row: RowResult, entry: LeafDirections, output: LeafSpec, verdicts: ElementVerdicts,
                     owners: np.ndarray) -> bool:
    """A failing entry no element owns: a nonzero the analytic side is missing, somewhere in its group."""
    fails = verdicts.status[output.slice, entry.slice] == FAIL
    return row.status == "fail" and bool(np.any(fails & (owners[:, output.slice].T < 0)))


def clean(row: RowResult) -> bool:
    """A compressed row accepted as it is: passed, no kink, no one-sided difference."""
    return row.status == "pass" and not row.kinks and not row.jumps and not row.one_sided


def index_text(index: Sequence[int]) -> str:
    return "[" + ", ".join(str(i) for i in index) + "]" if index else ""


def spread_value(context: CheckContext, analytic_mode: str, order: int) -> float:
    spread = context.spreads.get(analytic_mode) if order == 1 else None
    return spread.value if spread is not None else 0.0


def block_row(entry: LeafDirections, output: LeafSpec, analytic: np.ndarray, verdicts: ElementVerdicts,
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
    complex_in, complex_out = is_complex_dtype(leaf.dtype), is_complex_dtype(output.dtype)
    if row.status == "fail" and entry.basis is None and not entry.compressed and (complex_in or complex_out):
        conjugated = conjugation(a, n, allowed, leaf.name, complex_in, output.name, complex_out)
        if conjugated:
            row.message = "; ".join(part for part in (conjugated, row.message) if part)
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


def mark_undefined(row: RowResult, reason: str) -> None:
    """A leaf without a defined gradient: neither a pass nor a silent zero. It is acceptable only where
    the numeric derivative is zero too."""
    row.status = "no-gradient"
    verdict = ("the numeric derivative is zero too" if row.mismatches == 0 else
               "but the numeric derivative is not zero: the gradient is missing")
    row.message = f"no gradient defined ({reason}); {verdict}"
