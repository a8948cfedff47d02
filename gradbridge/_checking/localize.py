"""Find a wrong Jacobian entry of a large leaf by bisection, after the projection check failed.

When ``fast`` mode finds a leaf wrong and a full check of that leaf would cost more than the budget
(a million-element leaf, a 20000-element ``sort``), the wrong entry is found by group testing
instead: random projections restricted to half of the leaf's elements say which half holds a wrong
column (2 evaluations per projection; the analytic side is the already computed ``J^T v``), down to
one element ``j``; then cotangents restricted to half of the outputs find the output ``i`` (one VJP
each, against the numeric column ``J e_j``). About ``4 log2(n) + 2`` evaluations and ``log2(m) + 2``
analytic calls in all, and the report names the element like a full check would.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np

from .._adapter import LeafSpec
from .evaluate import Evaluator
from .._reporting.report import RowResult, WorstElement
from .tolerance import Tolerance, grade, relative_error

#: Random projections per half: an error escapes one projection with small probability, rarely two.
TRIALS = 2


class Bisection:
    """Group testing of one leaf's columns, then of the outputs of the column found."""

    def __init__(self, evaluator: Evaluator, leaf: LeafSpec, step: float, precision: float,
                 tolerance: Tolerance, rounder: Callable[[np.ndarray], np.ndarray], seed: int,
                 analytic_mode: str) -> None:
        self.evaluator = evaluator
        self.leaf = leaf
        self.step = step
        self.precision = precision
        self.tolerance = tolerance
        self.rounder = rounder
        self.rng = np.random.default_rng(seed + 17)
        self.mode = analytic_mode
        self.x0 = evaluator.prepared.x0
        self.m = sum(spec.size for spec in evaluator.prepared.output_specs)
        self.tests = 0

    def _projection(self, v: np.ndarray, gradient: Optional[np.ndarray], columns: np.ndarray) -> Tuple[bool, float, float, float, float]:
        """One random projection on ``columns``: (disagrees, analytic, numeric, allowed, fd_error)."""
        u = np.zeros(len(self.x0))
        u[columns] = self.rng.standard_normal(len(columns)) * np.maximum(1.0, np.abs(self.x0[columns]))
        plus = self.rounder(self.x0 + self.step * u)
        minus = self.rounder(self.x0 - self.step * u)
        u = (plus - minus) / (2.0 * self.step)
        out = self.evaluator.evaluate(np.stack([plus, minus]), ["x + h*u (bisection)", "x - h*u (bisection)"],
                                      allow_nonfinite=True)
        with np.errstate(invalid="ignore", over="ignore"):
            numeric = float(v @ (out[0] - out[1])) / (2.0 * self.step)
            fd_error = self.precision * float(np.abs(v) @ (np.abs(out[0]) + np.abs(out[1]))) / (2.0 * self.step)
        if gradient is not None:
            analytic = float(gradient @ u)
            magnitude = float(np.linalg.norm(gradient[columns] * np.maximum(1.0, np.abs(self.x0[columns]))))
        else:
            pushed = self.evaluator.jvp(u[None, :])[0]
            analytic = float(v @ pushed)
            magnitude = abs(analytic)
        allowed = self.tolerance.scalar_bound(numeric, magnitude, fd_error)
        self.tests += 1
        bad = not (abs(analytic - numeric) <= allowed) or not np.isfinite(allowed)
        return bad, analytic, numeric, allowed, fd_error

    def _disagrees(self, v, gradient, columns) -> bool:
        return any(self._projection(v, gradient, columns)[0] for _ in range(TRIALS))

    def find_column(self, v: np.ndarray, gradient: Optional[np.ndarray]) -> Optional[int]:
        """A column of the leaf holding a wrong entry (flat position in x), or None if none shows."""
        columns = np.arange(self.leaf.offset, self.leaf.offset + self.leaf.size)
        if not self._disagrees(v, gradient, columns):
            return None
        while len(columns) > 1:
            half = len(columns) // 2
            first, second = columns[:half], columns[half:]
            if self._disagrees(v, gradient, first):
                columns = first
            elif self._disagrees(v, gradient, second):
                columns = second
            else:  # the error needs both halves together (or hid twice): report the smallest group found
                return None
        return int(columns[0])

    def column(self, j: int) -> Tuple[np.ndarray, np.ndarray, float]:
        """Numeric column ``J e_j`` by central differences, its round-off error, and the step."""
        h = self.step * max(1.0, abs(float(self.x0[j])))
        plus, minus = self.x0.copy(), self.x0.copy()
        plus[j] += h
        minus[j] -= h
        plus, minus = self.rounder(plus), self.rounder(minus)
        span = float(plus[j] - minus[j])
        out = self.evaluator.evaluate(np.stack([plus, minus]), [f"{self.leaf.name} element + h", "- h"],
                                      allow_nonfinite=True)
        return (out[0] - out[1]) / span, self.precision * (np.abs(out[0]) + np.abs(out[1])) / span, span / 2.0

    def analytic_entry(self, i: int, j: int) -> float:
        if self.mode == "rev":
            e = np.zeros((1, self.m))
            e[0, i] = 1.0
            return float(self.evaluator.vjp(e)[0, j])
        e = np.zeros((1, len(self.x0)))
        e[0, j] = 1.0
        return float(self.evaluator.jvp(e)[0, i])

    def find_output(self, j: int, numeric: np.ndarray, error: np.ndarray) -> int:
        """The output ``i`` whose entry ``J_ij`` is wrong, by cotangents restricted to halves."""
        outputs = np.arange(self.m)
        scale = float(np.max(np.abs(numeric))) if numeric.size else 0.0

        def wrong(rows: np.ndarray) -> bool:
            for _ in range(TRIALS):
                v = np.zeros(self.m)
                v[rows] = self.rng.standard_normal(len(rows))
                if self.mode == "rev":
                    analytic = float(self.evaluator.vjp(v[None, :])[0, j])
                else:
                    e = np.zeros((1, len(self.x0)))
                    e[0, j] = 1.0
                    analytic = float(v @ self.evaluator.jvp(e)[0])
                value = float(v @ numeric)
                allowed = float(self.tolerance.allowed(value, float(np.abs(v) @ error), scale * np.linalg.norm(v)))
                self.tests += 1
                if not abs(analytic - value) <= allowed:
                    return True
            return False

        while len(outputs) > 1:
            half = len(outputs) // 2
            if wrong(outputs[:half]):
                outputs = outputs[:half]
            elif wrong(outputs[half:]):
                outputs = outputs[half:]
            else:
                break
        return int(outputs[0])


def bisection_row(evaluator: Evaluator, leaf: LeafSpec, failed: RowResult, v: np.ndarray,
                  gradient: Optional[np.ndarray], step: float, precision: float, tolerance: Tolerance,
                  rounder, seed: int, analytic_mode: str, order: int) -> RowResult:
    """The row of a leaf whose projection check failed, with a wrong element found by bisection."""
    search = Bisection(evaluator, leaf, step, precision, tolerance, rounder, seed, analytic_mode)
    j = search.find_column(v, gradient)
    row = RowResult(input=leaf.name, output=failed.output, shape=leaf.shape, kind=leaf.kind, order=order,
                    method=f"{failed.method} then bisection over {leaf.size} elements", analytic_mode=analytic_mode,
                    status="fail", max_abs_error=failed.max_abs_error, rel_error=failed.rel_error, grade=failed.grade,
                    mismatches=failed.mismatches, compared=failed.compared, worst=failed.worst)
    if j is None:
        row.message = (f"{failed.message}; bisection could not isolate a single element (the error is spread over "
                       "many elements); run mode='full' to see every element")
        return row
    numeric, error, h = search.column(j)
    i = search.find_output(j, numeric, error)
    analytic = search.analytic_entry(i, j)
    scale = float(np.max(np.abs(numeric[np.isfinite(numeric)]))) if np.isfinite(numeric).any() else 0.0
    allowed = float(tolerance.allowed(numeric[i], error[i], scale))
    output = next(s for s in evaluator.prepared.output_specs if s.offset <= i < s.offset + s.size)
    row.output = output.name
    row.worst = WorstElement(input_index=leaf.unravel(j - leaf.offset), output_index=output.unravel(i - output.offset),
                             analytic=analytic, numeric=float(numeric[i]), abs_error=abs(analytic - float(numeric[i])),
                             allowed=allowed, step=h, fd_error=float(error[i]), method="central difference")
    rel = relative_error(np.array([analytic]), np.array([numeric[i]]))
    row.rel_error, row.grade = rel, grade(rel)
    row.max_abs_error = max(row.max_abs_error, row.worst.abs_error)
    row.message = (f"{failed.message}; a full check of this leaf is above the budget, so a wrong element was "
                   f"found by bisection ({search.tests} projections): others may be wrong too")
    return row
