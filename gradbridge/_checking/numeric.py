"""Numeric directional derivatives and the verdict of each element: the step ladder.

First pass, for every direction ``d`` (a unit vector or a tangent direction) at its base step ``h``:
central differences ``c = (f(x+h d) - f(x-h d)) / 2h`` and their round-off ``r ~ eps*|f|/h``. An
element whose analytic value lies within its tolerance of ``c`` with the round-off alone as the
numerical error passes at once: any truncation error would only widen the tolerance. Correct checks
mostly end here, at 2 evaluations per direction.

Everything else climbs down a ladder of steps ``h/2, h/4, ... h/2^K`` (only the directions that need
it). At each level the element gets the best estimate the evaluations allow, with an error estimate
computed from the evaluations themselves:

* central differences at two consecutive levels give the Richardson extrapolation
  ``(4 c_k - c_{k-1}) / 3`` with error ``max(|c_k - c_{k-1}|, |c_{k-1} - c_{k-2}|/4) + 2 r_k``;
* where one side of the central difference is not finite (``log`` near 0: a domain edge) the
  one-sided difference on the defined side is used the same way (``2 p_k - p_{k-1}``), and the
  report says so;
* the one-sided differences ``p = (f(x+h)-f(x))/h`` and ``q = (f(x)-f(x-h))/h`` of a smooth function
  differ by about ``h f''``, which halves with the step; at a kink (relu at 0, abs, max) their gap
  stays. A gap that is above its error and does not shrink marks a non-differentiable point: it is
  neither passed nor failed until the stencil leaves the kink (the input is merely near one) or the
  ladder ends (the input is at one, to the resolution the precision allows).

Where ``fn`` itself jumps at the point (an increment on one side converges to a constant instead of
vanishing), each side's derivative is measured from points on that side only and the analytic value
must be one of them (:meth:`StepLadder._jump_sides`). Elements that fail narrowly without converging,
or pass only because ``fn``'s measured noise widened their tolerance, are re-measured at coarser steps
``2h .. 256h`` (:meth:`StepLadder._coarse_steps`), and the resolution reached is reported.

An element fails when its mismatch is far beyond the estimated error (16x the tolerance, at once),
or still beyond it once the estimate stops improving; it passes when the analytic value is within
tolerance of an estimate that has converged. Every verdict is therefore relative to an error the
function's own evaluations measured, not to a tuned constant.
"""

from __future__ import annotations

from typing import Callable, Sequence, Tuple

import numpy as np

from .directions import Directions
from .evaluate import Evaluator
from .ladder_codes import BACKWARD, CENTRAL, CONVERGED, ElementVerdicts, FAIL, FAIL_AT_ONCE, FORWARD, KINK, KINK_PERSISTS, KINK_STEADY, MAX_LEVELS, NOISE_AGREE, NOISE_DIRECTIONS, NOISE_DOMINATED, NOISE_POINTS, NOT_IMPROVING, PASS, PENDING, RICHARDSON
from .coarse import CoarseSteps
from .jumps import JumpSides
from .tolerance import SAFETY, Tolerance



class StepLadder(JumpSides, CoarseSteps):
    """Computes :class:`ElementVerdicts` for an analytic matrix ``(m, D)`` of directional derivatives."""

    def __init__(self, evaluator: Evaluator, directions: Directions, f0: np.ndarray, precision: float,
                 rounder: Callable[[np.ndarray], np.ndarray], tolerance: Tolerance,
                 blocks: Sequence[Tuple[slice, slice]]) -> None:
        self.evaluator = evaluator
        self.directions = directions
        self.f0 = f0
        self.precision = precision
        self.rounder = rounder
        self.tolerance = tolerance
        self.blocks = blocks
        m = len(f0)
        self.sigma = np.zeros(m)

    # -- evaluations --------------------------------------------------------------------------------
    def _level(self, columns: np.ndarray, steps: np.ndarray):
        """Central, one-sided differences and their round-off at the given steps, for some directions."""
        chunk = max(1, self.evaluator.chunk_size // 2)
        parts = []
        positions = None if getattr(self.rounder, "slices", None) else self.directions.unit_positions(columns)
        for start in range(0, len(columns), chunk):
            cols, s = columns[start:start + chunk], steps[start:start + chunk]
            describe = _PointNames(self.directions, cols)
            if positions is not None:  # one element changed per point: the adapter may build the points itself
                at = positions[start:start + chunk]
                x = self.directions.x0[at]
                plus, minus = x + s, x - s
                h_plus, h_minus = plus - x, x - minus
                out = self.evaluator.evaluate_edits(np.concatenate([at, at]), np.concatenate([plus, minus]),
                                                    describe, allow_nonfinite=True)
            else:
                points = self.rounder(self.directions.stencil(cols, s))
                h_plus, h_minus = self.directions.taken(cols, points)
                out = self.evaluator.evaluate(points, describe, allow_nonfinite=True)
            parts.append((out[:len(cols)].T, out[len(cols):].T, h_plus, h_minus))
        f_plus = np.concatenate([p[0] for p in parts], axis=1)
        f_minus = np.concatenate([p[1] for p in parts], axis=1)
        h_plus = np.concatenate([p[2] for p in parts])
        h_minus = np.concatenate([p[3] for p in parts])
        f0 = self.f0[:, None]
        eps = self.precision
        noise = 2.0 * self.sigma[:, None]  # measured noise of fn's outputs (cancellation inside fn)
        with np.errstate(invalid="ignore", over="ignore"):
            span = h_plus + h_minus
            central = (f_plus - f_minus) / span
            central_error = (eps * (np.abs(f_plus) + np.abs(f_minus)) + noise) / span
            forward = (f_plus - f0) / h_plus
            forward_error = (eps * (np.abs(f_plus) + np.abs(f0)) + noise) / h_plus
            backward = (f0 - f_minus) / h_minus
            backward_error = (eps * (np.abs(f_minus) + np.abs(f0)) + noise) / h_minus
        self.last_spans = (h_plus, h_minus)
        return central, central_error, forward, forward_error, backward, backward_error

    def _noise_level(self) -> np.ndarray:
        """Noise of each output of ``fn`` near ``x0``, measured (Moré and Wild's ECnoise idea): the 6th
        difference of ``f`` along a random direction at a step far below ``h`` has no smooth part left,
        so what remains is round-off, with variance ``C(12, 6) sigma^2``. A function that cancels large
        terms inside (a variance from a large mean, a difference of big logits) is much noisier than
        ``eps*|f|`` says, and this keeps such noise from reading as a gradient bug. The stencil lies on
        one side of ``x0`` (``x0 + k delta u``, k = 1..7): a jump or a kink exactly at ``x0`` is the
        point's own property, judged by the ladder, and must not read as noise of the whole output."""
        x0 = self.directions.x0
        rng = np.random.default_rng(20240917)
        variance = np.zeros(len(self.f0))
        weights = np.array([1.0, -6.0, 15.0, -20.0, 15.0, -6.0, 1.0])
        for _ in range(NOISE_DIRECTIONS):
            u = np.zeros_like(x0)
            for entry in self.directions.per_leaf:
                where = entry.leaf.slice
                u[where] = rng.standard_normal(entry.leaf.size) * np.maximum(1.0, np.abs(x0[where]))
            sixths = []
            # two scales: noise has the same size at both; a kink in the stencil shrinks with the step
            # (and a smooth part with its 6th power), so the smaller of the two is the noise, and only
            # where the two agree within NOISE_AGREE: a 6th difference that shrinks by more is fn's
            # smooth part (log next to its edge, where the stencil is wide), not noise
            for step in (self.directions.relative_step / 16.0, self.directions.relative_step / 256.0):
                # on one side of x0, x0 itself excluded: a jump or kink exactly at x0 is not noise
                points = self.rounder(x0[None, :] + step * np.arange(1, NOISE_POINTS + 1)[:, None] * u[None, :])
                out = self.evaluator.evaluate(points, [f"x + {k}*delta*u (noise estimate)"
                                                       for k in range(1, NOISE_POINTS + 1)],
                                              allow_nonfinite=True)
                sixth = np.abs(weights @ out)
                sixths.append(np.where(np.isfinite(sixth), sixth, 0.0))
            smallest, largest = np.minimum(*sixths), np.maximum(*sixths)
            smallest = np.where(largest <= NOISE_AGREE * smallest, smallest, 0.0)
            variance = np.maximum(variance, smallest ** 2 / 924.0)
        return 3.0 * np.sqrt(variance)  # one sample of a noise variance: allow for a low draw

    # -- verdicts -----------------------------------------------------------------------------------
    def run(self, analytic: np.ndarray) -> ElementVerdicts:
        m, count = analytic.shape
        base = self.directions.steps
        tol = self.tolerance
        all_columns = np.arange(count)
        c, cr, p, pr, q, qr = self._level(all_columns, base)
        scale = self._block_scale(c)
        with np.errstate(invalid="ignore"):
            allowed = tol.allowed(c, cr, scale)
            agree = np.isfinite(c) & np.isfinite(allowed) & (np.abs(analytic - c) <= allowed)
        # before any refinement: is fn noisier than its magnitude says? (Not measurable when points are
        # rounded to a low-precision dtype: the rounded points no longer lie on a line.)
        noisy_pass = np.zeros_like(agree)
        if not agree.all() and not getattr(self.rounder, "slices", None):
            agree_without_noise = agree
            self.sigma = self._noise_level()
            h_plus, h_minus = self.last_spans
            noise = 2.0 * self.sigma[:, None]
            cr = cr + noise / (h_plus + h_minus)
            pr, qr = pr + noise / h_plus, qr + noise / h_minus
            with np.errstate(invalid="ignore"):
                allowed = tol.allowed(c, cr, scale)
                agree = np.isfinite(c) & np.isfinite(allowed) & (np.abs(analytic - c) <= allowed)
            # passes only thanks to fn's noise: re-measured at larger steps, where the noise weighs less
            noisy_pass = agree & ~agree_without_noise
        with np.errstate(invalid="ignore"):
            gap = np.abs(p - q)
            gap_allowed = tol.allowed(np.maximum(np.abs(p), np.abs(q)), 2 * (pr + qr), scale)
            suspect_kink = (gap > gap_allowed) & (gap > 0.1 * np.maximum(np.abs(p), np.abs(q)))
        result = ElementVerdicts(
            status=np.where(agree, PASS, PENDING), numeric=c.copy(), error=cr.copy(), allowed=allowed,
            method=np.full((m, count), CENTRAL), left=np.full((m, count), np.nan), right=np.full((m, count), np.nan),
            steps=base.copy(), levels=np.zeros(count, dtype=int), jump=np.full((m, count), np.nan),
            resolution=np.full((m, count), np.nan))
        pending = ~agree | suspect_kink
        provisional_pass = agree & suspect_kink  # keeps its pass unless a kink is confirmed
        if not pending.any():
            self._coarse_steps(result, analytic, scale, c, cr, np.zeros_like(agree), noisy_pass)
            return result

        first_central, first_error = c.copy(), cr.copy()
        # state per element, carried from level to level; "ip"/"iq" are the increments f(x+t)-f(x), f(x)-f(x-t)
        # at the previous level and "ip2"/"iq2" the level before, "tp"/"tq" (per direction) their steps
        h_plus, h_minus = self.last_spans
        prev = {"c": c, "p": p, "q": q, "gap": gap, "r": np.full((m, count), np.nan),
                "ip": p * h_plus, "iq": q * h_minus, "ip2": np.full((m, count), np.nan),
                "iq2": np.full((m, count), np.nan)}
        spans = {"tp": h_plus.copy(), "tq": h_minus.copy(), "tp2": np.full(count, np.nan),
                 "tq2": np.full(count, np.nan)}
        base = self._rebase_at_domain_edges(base, c, prev)
        clear_fail = np.zeros((m, count), dtype=bool)  # failed on an estimate that converged far from analytic
        # central differences at two steps equal but for the rounding of the steps: fn's output is quantised (a staircase, a bisection
        # whose bracket moves with x), and an estimate that "converges" that way has not converged at all
        frozen = np.zeros((m, count), dtype=bool)
        # a central difference that is exactly zero at a small step where the first pass measured a clear
        # slope: fn is flat below some scale, its output quantised (large terms cancelling inside, a lookup
        # table); ``quantum`` is the smallest nonzero change of fn seen, the size of its steps
        quantized = np.zeros((m, count), dtype=bool)
        quantum = np.full((m, count), np.inf)
        best_error = np.full((m, count), np.inf)
        kink_before = np.zeros((m, count), dtype=bool)
        ever_kink = suspect_kink.copy()  # near a kink, a stalling estimate is not evidence of a bug
        for level in range(1, MAX_LEVELS + 1):
            columns = np.nonzero(pending.any(axis=0))[0]
            if len(columns) == 0:
                break
            steps = base[columns] / 2.0 ** level
            c, cr, p, pr, q, qr = self._level(columns, steps)
            t_plus, t_minus = self.last_spans
            with np.errstate(invalid="ignore", over="ignore"):
                for increment in (np.abs(p * t_plus), np.abs(q * t_minus)):
                    quantum[:, columns] = np.fmin(quantum[:, columns], np.where(increment > 0, increment, np.inf))
                quantized[:, columns] |= (c == 0.0) & (np.abs(first_central[:, columns]) > 4.0 * first_error[:, columns])
            result.steps[columns] = steps
            result.levels[columns] = level
            a = analytic[:, columns]
            sc = scale[:, columns]
            with np.errstate(invalid="ignore", over="ignore"):
                # candidate estimates: Richardson on central, else on the defined one-sided difference
                d = np.abs(c - prev["c"][:, columns])
                frozen[:, columns] |= (d <= 2.0 * cr) & (c != 0.0)
                est = (4.0 * c - prev["c"][:, columns]) / 3.0
                # the error of an extrapolation: its change from the previous one (from the third level
                # on), else the change of the plain central differences (a generous bound)
                previous = prev["r"][:, columns]
                # round-off of (4 c_k - c_{k-1}) / 3 with c_{k-1}'s round-off half of c_k's: 1.5 r_k
                err = np.where(np.isfinite(previous), np.abs(est - previous), d) + 1.5 * cr
                noise = 1.5 * cr
                method = np.full(est.shape, RICHARDSON)
                central_ok = np.isfinite(est) & np.isfinite(err)
                for side, value, noise_side, code in (("p", p, pr, FORWARD), ("q", q, qr, BACKWARD)):
                    # the defined side of a domain edge: only where the central difference is not finite
                    one = 2.0 * value - prev[side][:, columns]
                    one_err = np.abs(value - prev[side][:, columns]) + 2.0 * noise_side
                    use = ~central_ok & np.isfinite(one) & np.isfinite(one_err) & ~(one_err >= err)
                    est = np.where(use, one, est)
                    err = np.where(use, one_err, err)
                    noise = np.where(use, 2.0 * noise_side, noise)
                    method = np.where(use, code, method)
                available = np.isfinite(est) & np.isfinite(err)
                lim = tol.allowed(est, err, sc)
                floor = tol.allowed(est, 0.0, sc)
                mismatch = np.abs(a - est)
                gap = np.abs(p - q)
                gap_allowed = tol.allowed(np.maximum(np.abs(p), np.abs(q)), 2 * (pr + qr), sc)
                kink = (np.isfinite(gap) & (gap > gap_allowed) & (gap > KINK_PERSISTS * prev["gap"][:, columns])
                        & ~(gap > KINK_STEADY * prev["gap"][:, columns]))
                h_plus, h_minus = self.last_spans
                sides = self._jump_sides(columns, p * h_plus, q * h_minus, h_plus, h_minus, prev, spans)
                jump = sides["jump"]
                kink &= ~jump

            todo = pending[:, columns]
            status = result.status[:, columns]
            improved = todo & available & (err < best_error[:, columns])
            self._record(result, columns, improved, est, err, lim, method)
            best = best_error[:, columns]
            # smaller steps stop paying only once round-off dominates the error; before that (a step still
            # large for the function's curvature, a domain edge) the ladder goes on
            not_improving = available & (err >= NOT_IMPROVING * best) & (err <= NOISE_DOMINATED * noise)
            best_error[:, columns] = np.where(improved, err, best)
            last = level == MAX_LEVELS

            # a kink: persists across levels; settled early when the central value no longer moves
            at_kink = todo & kink
            settled_kink = at_kink & kink_before[:, columns] & (d <= CONVERGED * np.abs(c) + floor)
            finish_kink = at_kink & (settled_kink | last)
            kink_before[:, columns] = kink
            ever_kink[:, columns] |= todo & kink

            # a jump: judged against the one-sided derivatives of each side, from points on that side only
            at_jump = todo & jump
            self._judge_jump(result, columns, at_jump, a, sides, last)
            status = result.status[:, columns]
            smooth = todo & ~kink & ~jump
            # an element that passed at once but looked like a kink: smooth after all, keep its pass
            keep = smooth & provisional_pass[:, columns]
            status = np.where(keep, PASS, status)
            judge = smooth & ~provisional_pass[:, columns]
            converged = err <= CONVERGED * np.abs(est) + floor
            fail_now = judge & available & converged & (mismatch > FAIL_AT_ONCE * lim)
            as_good_as_it_gets = (err <= NOISE_DOMINATED * noise) | (SAFETY * err <= floor)
            pass_now = judge & available & as_good_as_it_gets & (mismatch <= lim)
            near_kink = ever_kink[:, columns]
            unresolved_kink = judge & last & near_kink & ~fail_now & ~pass_now
            stalled = judge & ~fail_now & ~pass_now & ~unresolved_kink & ((not_improving & ~near_kink) | last)
            current = result.allowed[:, columns]
            best_mismatch = np.abs(a - result.numeric[:, columns])
            stalled_pass = stalled & (best_mismatch <= current)
            status = np.where(fail_now, FAIL, status)
            clear_fail[:, columns] |= fail_now & ~frozen[:, columns] & ~quantized[:, columns]
            status = np.where(pass_now, PASS, status)
            status = np.where(stalled & stalled_pass, PASS, status)
            status = np.where(stalled & ~stalled_pass, FAIL, status)
            finish_kink |= unresolved_kink  # the ladder ended while the stencil still straddled a kink
            status = np.where(finish_kink, KINK, status)
            result.left[:, columns] = np.where(finish_kink, q, result.left[:, columns])
            result.right[:, columns] = np.where(finish_kink, p, result.right[:, columns])
            if last:  # nothing measurable: the numeric side was never finite
                status = np.where(todo & (status == PENDING), FAIL, status)
            # the verdict of a settled element is judged on the estimate of this level when it decided now
            decided_now = todo & (fail_now | pass_now)
            self._record(result, columns, decided_now, est, err, lim, method)
            result.status[:, columns] = status
            pending[:, columns] = todo & (status == PENDING) | (todo & provisional_pass[:, columns] & kink & ~finish_kink)
            provisional_pass[:, columns] &= ~at_jump
            provisional_pass[:, columns] &= pending[:, columns]
            richardson = np.where(method == RICHARDSON, est, np.nan)
            for key, value in (("c", c), ("p", p), ("q", q), ("gap", gap), ("r", richardson)):
                prev[key][:, columns] = value
            prev["ip2"][:, columns], prev["iq2"][:, columns] = prev["ip"][:, columns], prev["iq"][:, columns]
            prev["ip"][:, columns], prev["iq"][:, columns] = p * h_plus, q * h_minus
            spans["tp2"][columns], spans["tq2"][columns] = spans["tp"][columns], spans["tq"][columns]
            spans["tp"][columns], spans["tq"][columns] = h_plus, h_minus
        self._coarse_steps(result, analytic, scale, first_central, first_error, clear_fail, noisy_pass,
                           np.where(quantized, quantum, np.nan), frozen)
        self._rescale_after_jumps(result, analytic)
        return result

    def _rebase_at_domain_edges(self, base: np.ndarray, central: np.ndarray, prev: dict) -> np.ndarray:
        """Directions whose first central difference left the domain (``log`` at 1e-7: ``x - h < 0``)
        restart the ladder from a step relative to ``|x_j|`` itself, the distance to an edge at 0, so the
        stencil fits inside the domain after a level or two instead of never; their earlier differences
        (at an unrelated step) are forgotten."""
        base = base.copy()
        x0 = self.directions.x0
        for entry in self.directions.per_leaf:
            if entry.basis is not None:
                continue
            columns = np.arange(entry.first, entry.first + entry.count)
            left = ~np.isfinite(central[:, columns]).all(axis=0)
            x = np.abs(x0[entry.leaf.offset + (columns - entry.first)])
            closer = 2.0 * self.directions.relative_step * x
            rebase = columns[left & (x > 0) & (closer < base[columns])]
            if len(rebase):
                base[rebase] = closer[np.isin(columns, rebase)]
                for key in ("c", "p", "q", "r", "ip", "iq", "ip2", "iq2"):
                    prev[key][:, rebase] = np.nan
                prev["gap"][:, rebase] = np.inf
        return base

    @staticmethod
    def _record(result: ElementVerdicts, columns: np.ndarray, where: np.ndarray, est, err, lim, method) -> None:
        for field, value in (("numeric", est), ("error", err), ("allowed", lim), ("method", method)):
            target = getattr(result, field)
            target[:, columns] = np.where(where, value, target[:, columns])

    def _block_scale(self, numeric: np.ndarray) -> np.ndarray:
        """Per element: the largest finite ``|numeric|`` of its block (one output, one leaf)."""
        scale = np.zeros_like(numeric)
        finite = np.where(np.isfinite(numeric), np.abs(numeric), 0.0)
        for rows, cols in self.blocks:
            block = finite[rows, cols]
            scale[rows, cols] = float(np.max(block)) if block.size else 0.0
        return scale


class _PointNames:
    """Lazy names of the points of one batch (``x[3] + h``), built only when an error needs one."""

    def __init__(self, directions: Directions, columns: np.ndarray) -> None:
        self.directions, self.columns = directions, columns

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        count = len(self.columns)
        d = int(self.columns[k % count])
        entry = self.directions.per_leaf[int(self.directions.owner[d])]
        return f"{entry.label(d - entry.first)} {'+' if k < count else '-'} h"

    def __len__(self) -> int:
        return 2 * len(self.columns)
