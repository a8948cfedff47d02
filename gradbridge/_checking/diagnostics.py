"""The data behind a failing row's pictures: the element map and the step-size sweep.

* The **element map** gives, for every element of a failing input, the signed difference
  analytic - numeric of its worst output entry (the one furthest outside its tolerance), and whether
  any of its entries is outside tolerance. The HTML report draws it as a heatmap over the input's own
  shape, so a wrong row, column, diagonal or single element is visible at a glance.
* The **step-size sweep** re-evaluates the worst element's central difference at steps spanning twelve
  decades. Plotted against the step, its distance to the analytic value is the classic V of truncation
  error (large steps) and round-off error (small steps) when the analytic value is right, and levels
  off at the size of the bug when it is wrong.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .directions import Directions
from .evaluate import Evaluator
from .._precision import PointRounder
from .._reporting.report import StepSweep

#: Largest input leaf (elements) whose element map is kept in the report.
MAP_LIMIT = 65536
#: Steps of the sweep, relative to max(1, |x_j|): 1e-1 down to 1e-13, one per decade.
SWEEP_EXPONENTS = tuple(range(-1, -14, -1))
#: Failing rows per check that get a sweep (2 evaluations per step each).
SWEEP_ROWS = 4


def element_map(signed: np.ndarray, ratio: np.ndarray, outside: np.ndarray,
                shape: Tuple[int, ...]) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Per input element (a column of the block), the signed error of its worst output entry and
    whether any of its entries is outside tolerance; both in the input's shape. None above
    :data:`MAP_LIMIT` elements."""
    columns = signed.shape[1]
    if columns == 0 or columns > MAP_LIMIT:
        return None
    worst_output = np.argmax(np.where(np.isfinite(ratio), ratio, np.finfo(float).max), axis=0)
    errors = signed[worst_output, np.arange(columns)]
    return errors.reshape(shape), outside.any(axis=0).reshape(shape)


def step_sweep(evaluator: Evaluator, directions: Directions, rounder: PointRounder, direction: int,
               output: int, label: str, analytic: float, reference: float, used_step: float,
               allowed: float) -> StepSweep:
    """Central differences of output entry ``output`` along ``direction`` at every step of
    :data:`SWEEP_EXPONENTS` (scaled like the check's own steps)."""
    base = directions.steps[direction] / directions.relative_step  # max(1, |x_j|), or its structured analogue
    steps = np.array([base * 10.0 ** k for k in SWEEP_EXPONENTS])
    index = np.full(len(steps), direction)
    points = rounder(directions.stencil(index, steps))
    h_plus, h_minus = directions.taken(index, points)
    taken = (h_plus + h_minus) / 2.0  # the steps really taken, after rounding
    outputs = evaluator.evaluate(points,
                                 [f"step-size sweep of {label}"] * (2 * len(steps)), allow_nonfinite=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        numeric = (outputs[: len(steps), output] - outputs[len(steps):, output]) / (2.0 * taken)
    numeric = np.where(np.isfinite(numeric) & (taken != 0), numeric, np.nan)
    return StepSweep(element=label, steps=[float(s) for s in steps], numeric=[float(v) for v in numeric],
                     analytic=float(analytic), reference=float(reference), used_step=float(used_step),
                     allowed=float(allowed))
