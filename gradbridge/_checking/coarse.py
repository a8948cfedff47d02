"""Coarser steps for functions whose own resolution is coarser than the base step (quantised, iterative or
noisy code).

Invariant: an element that failed narrowly without converging, or passed only because measured noise widened
its tolerance, is re-measured at steps ``2h .. 256h`` before its verdict stands, and the resolution reached
is reported.
"""
from typing import Optional

import numpy as np

from .ladder_codes import CLEAR_BUG, COARSE, COARSE_LEVELS, ElementVerdicts, FAIL, PASS
from .tolerance import SAFETY



class CoarseSteps:
    """The coarse-step part of :class:`gradbridge._checking.numeric.StepLadder` (a mixin: it uses the
    ladder's state)."""

    def _coarse_steps(self, result: ElementVerdicts, analytic: np.ndarray, scale: np.ndarray,
                      first_central: np.ndarray, first_error: np.ndarray, clear_fail: np.ndarray,
                      noisy_pass: np.ndarray, quantum: Optional[np.ndarray] = None,
                      frozen: Optional[np.ndarray] = None) -> None:
        """Failed elements whose estimates never converged near the analytic value, re-measured at steps
        above ``h`` (numdifftools' and FiniteDifferences.jl's answer to noisy functions).

        A function with internal adaptivity (an adaptive ODE solver, an iteration that stops at a
        tolerance, a bisection) is smooth only down to its own resolution: below some step its output
        moves in small jumps and every finite difference measures them. Its derivative is best measured
        at the step where the total error, truncation (growing with the step) plus that noise (shrinking
        as 1/step), is least. Central differences at ``2h, 4h, ... 2^K h`` are extrapolated pairwise; the
        change between consecutive extrapolations measures their error, and the element is judged at
        the step where that measured error is smallest, against a tolerance built from it; where that
        estimate and the default step's disagree beyond both their errors (a staircase, a solver whose
        discretisation bends the derivative at small scales), the disagreement is part of the error. The
        relative error reached is the function's resolution, reported so the user knows which bugs a
        check of this function cannot see. A clear bug (the analytic value far from every estimate) is
        not re-measured. Elements that passed only because fn's measured noise widened their tolerance
        are re-measured too: a coarser step may resolve a bug that noise hid at ``h``. An element keeps
        its first verdict where the coarse steps measure no better than it was measured.

        ``quantum`` (NaN elsewhere) marks elements whose output is quantised: flat below some scale, so
        the ladder's small steps measured zero. Their small-step estimates are discarded, whatever the
        mismatch, and every coarse estimate carries the quantisation error ``quantum / step``. Elements
        whose estimate stopped moving between two steps (``frozen``: equal to round-off) are re-measured
        whatever their mismatch too: a quantised fn's estimate can freeze far from its derivative."""
        with np.errstate(invalid="ignore", over="ignore"):
            mismatch = np.abs(analytic - result.numeric)
            size = np.fmax(np.abs(analytic), np.abs(result.numeric))
            failed = (result.status == FAIL) & ~clear_fail & np.isfinite(result.numeric) & (mismatch <= CLEAR_BUG * size)
            quantized = np.isfinite(quantum) if quantum is not None else np.zeros_like(failed)
            # a pass whose estimate never settled (its error is a sizeable part of the block's scale) says little
            # (not where points are rounded to a low-precision dtype: there every estimate is that loose)
            loose_pass = (result.status == PASS) & (SAFETY * result.error > CLEAR_BUG * scale) & \
                (not getattr(self.rounder, "slices", None))
            candidates = failed | ((noisy_pass | loose_pass) & (result.status == PASS)) | \
                (quantized & (result.status == FAIL))
        columns = np.nonzero(candidates.any(axis=0))[0]
        if len(columns) == 0:
            return
        tol = self.tolerance
        base = self.directions.steps[columns]
        wanted = candidates[:, columns]
        a, sc = analytic[:, columns], scale[:, columns]
        steps_of_quanta = np.where(quantized[:, columns], quantum[:, columns], 0.0) if quantum is not None \
            else np.zeros(a.shape)
        previous_c, previous_r = first_central[:, columns], None
        best = np.full(a.shape, np.inf)
        best_value = np.full(a.shape, np.nan)
        best_step = np.full(a.shape, np.nan)
        stale = 0
        for level in range(1, COARSE_LEVELS + 1):
            steps = base * 2.0 ** level
            c, cr = self._level(columns, steps)[:2]
            with np.errstate(invalid="ignore", over="ignore"):
                r = (4.0 * previous_c - c) / 3.0
                change = np.abs(c - previous_c) if previous_r is None else np.abs(r - previous_r)
                err = change + 1.5 * cr + steps_of_quanta / steps[None, :]
                better = wanted & np.isfinite(r) & np.isfinite(err) & (err < best)
            best = np.where(better, err, best)
            best_value = np.where(better, r, best_value)
            best_step = np.where(better, steps[None, :] / 2.0, best_step)
            stale = 0 if better.any() else stale + 1
            if stale >= 2:  # truncation dominates now: larger steps only get worse
                break
            previous_c, previous_r = c, r
        with np.errstate(invalid="ignore", over="ignore"):
            fine, fine_error = result.numeric[:, columns], result.error[:, columns]
            fine_error = np.where(quantized[:, columns], np.inf, fine_error)  # a quantised fn's small steps measured 0
            # estimates at the default step and at coarser ones that disagree beyond both their errors:
            # fn's derivative depends on the scale it is measured at, by that much (its resolution)
            disagreement = np.abs(best_value - fine)
            scale_dependent = np.isfinite(fine) & (disagreement > SAFETY * (best + fine_error))
            found = wanted & np.isfinite(best) & ((best < fine_error) | scale_dependent)
            best = np.where(scale_dependent, np.fmax(best, disagreement), best)
            lim = tol.allowed(best_value, best, sc)
            passed = found & (np.abs(a - best_value) <= lim)
            failed = found & ~passed
            resolution = best / np.fmax(np.fmax(np.abs(best_value), sc), 1e-300)  # relative to the block near zero
        status = result.status[:, columns]
        result.status[:, columns] = np.where(passed, PASS, np.where(failed, FAIL, status))
        self._record(result, columns, found, best_value, best, lim, COARSE)
        # a resolution only worth reporting where it is coarser than any float64 derivative's floor
        coarse = found & (resolution > tol.relative_floor)
        result.resolution[:, columns] = np.where(coarse, resolution, np.nan)
        mismatch_now = np.where(found, np.abs(a - best_value), -1.0)
        worst = np.argmax(mismatch_now, axis=0)
        chosen = best_step[worst, np.arange(len(columns))]
        result.steps[columns] = np.where(np.isfinite(chosen), chosen, result.steps[columns])
