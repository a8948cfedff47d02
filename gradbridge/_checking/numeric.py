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

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import numpy as np

from .directions import Directions
from .evaluate import Evaluator
from .tolerance import SAFETY, Tolerance

PENDING, PASS, FAIL, KINK, JUMP, UNRESOLVED = 0, 1, 2, 3, 4, 5
CENTRAL, RICHARDSON, FORWARD, BACKWARD, COARSE, SIDES = 0, 1, 2, 3, 4, 5
METHOD_NAMES = {CENTRAL: "central difference", RICHARDSON: "Richardson-extrapolated central differences",
                FORWARD: "one-sided (forward) difference", BACKWARD: "one-sided (backward) difference",
                COARSE: "Richardson-extrapolated central differences at the step with the least measured error "
                        "(larger than the default: fn is not smooth below it)",
                SIDES: "one-sided derivatives on each side of a jump, from points on that side only"}

MAX_LEVELS = 8           # smallest step h/256
FAIL_AT_ONCE = 16.0      # a mismatch this many tolerances away fails without further refinement
CONVERGED = 1e-2         # an estimate whose error is within 1% of its value (or the floor) is settled
NOT_IMPROVING = 0.75     # the error estimate shrinks by 4x (central) or 2x (one-sided) while truncation dominates
NOISE_DOMINATED = 8.0   # an error estimate within 8x its round-off part is noise, not truncation
NOISE_DIRECTIONS = 2    # random directions of the noise estimate (2 scales x NOISE_POINTS evaluations each)
NOISE_POINTS = 7        # a 6th difference from points on one side of x0
NOISE_AGREE = 30.0      # noise is scale-free: its 6th differences at two scales agree within this factor
KINK_PERSISTS = 0.7      # a smooth function's one-sided gap halves per level; a kink's stays
KINK_STEADY = 1.5        # ... and does not grow: a gap that doubles per level is noise over t (or a jump)
JUMP_STEADY = 0.25       # a jump's increment f(x+-t) - f(x) converges to a constant; a smooth one halves
JUMP_OVER_SLOPE = 4.0    # ... and is far above what the one-sided slopes change fn by over the step
COARSE_LEVELS = 8        # steps up to 256 h for functions whose own resolution is coarser than h
CLEAR_BUG = 1e-2         # a mismatch this large relative to the derivative is not a resolution question


@dataclass
class ElementVerdicts:
    """Per element ``(output i, direction d)`` of the compared Jacobian: the verdict and its evidence."""

    status: np.ndarray     # PENDING/PASS/FAIL/KINK
    numeric: np.ndarray    # best numeric estimate
    error: np.ndarray      # its estimated error (truncation + round-off)
    allowed: np.ndarray    # the tolerance the verdict used
    method: np.ndarray     # CENTRAL/RICHARDSON/FORWARD/BACKWARD
    left: np.ndarray       # backward one-sided difference (kinks), NaN elsewhere
    right: np.ndarray      # forward one-sided difference (kinks), NaN elsewhere
    steps: np.ndarray      # (D,) the last step used per direction
    levels: np.ndarray     # (D,) refinement levels used per direction (0: first pass only)
    jump: Optional[np.ndarray] = None        # size of the jump of fn at a JUMP/UNRESOLVED element, NaN elsewhere
    resolution: Optional[np.ndarray] = None  # relative error fn could be resolved to, where coarse steps were needed


class StepLadder:
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

    def _jump_sides(self, columns, ip, iq, tp, tq, prev, spans) -> dict:
        """Is fn discontinuous at ``x0`` along these directions, and its derivative on each side.

        A continuous function's increments ``f(x+t) - f(x)`` vanish with ``t`` (they halve, or faster, per
        level); at a jump the increment on one side converges to the jump itself, a constant. A jump is
        confirmed when that side's increment stayed within ``JUMP_STEADY`` of itself over three levels and
        is far above the output's noise. A kink's increments vanish, so kinks are never jumps.

        Each side's derivative is then measured from two points on that side (never ``f(x)``, which may
        belong to the other side): ``D_k = (f(x+t_{k-1}) - f(x+t_k)) / (t_{k-1} - t_k)``, extrapolated
        linearly in the midpoints of consecutive pairs (its error is first order in t), with the change
        between the pairs as its error estimate plus the round-off and noise of the differences."""
        eps = self.precision
        f0 = np.abs(self.f0)[:, None]
        noise = 2.0 * self.sigma[:, None]
        floor = 1e3 * eps * f0 + 10.0 * noise + 1e-300
        out = {}
        jump = np.zeros(ip.shape, dtype=bool)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            # the slope on each side, from two points on it: a jump must be far above what a slope this
            # size changes fn by over the step (a kink at distance d < t from x0 leaves a steady increment
            # of d * slope < t * slope on its flat side, which is no jump)
            slope = np.fmax(*[np.abs((prev["i" + side][:, columns] - inc) / (spans["t" + side][columns] - t))
                              for side, inc, t in (("p", ip, tp), ("q", iq, tq))])
            slope = np.where(np.isfinite(slope), slope, np.inf)
            for side, inc, t in (("p", ip, tp), ("q", iq, tq)):
                inc1, inc2 = prev["i" + side][:, columns], prev["i" + side + "2"][:, columns]
                t1, t2 = spans["t" + side][columns], spans["t" + side + "2"][columns]
                steady = ((np.abs(inc - inc1) <= JUMP_STEADY * np.abs(inc))
                          & (np.abs(inc1 - inc2) <= JUMP_STEADY * np.abs(inc1)) & (np.abs(inc) > floor)
                          & (np.abs(inc) > JUMP_OVER_SLOPE * t1 * slope))
                jump |= steady & np.isfinite(inc) & np.isfinite(inc1) & np.isfinite(inc2)
                d_near = (inc1 - inc) / (t1 - t)       # from f(x +- t_{k-1}) and f(x +- t_k)
                d_far = (inc2 - inc1) / (t2 - t1)
                m_near, m_far = (t1 + t) / 2.0, (t2 + t1) / 2.0
                estimate = d_near - m_near * (d_far - d_near) / (m_far - m_near)
                round_off = 3.0 * (2.0 * eps * (f0 + np.abs(inc1)) + 2.0 * noise) / (t1 - t)
                error = np.abs(d_far - d_near) + round_off
                out[side] = (estimate, error, inc)
        out["jump"] = jump
        return out

    def _judge_jump(self, result: ElementVerdicts, columns, where, analytic, sides, last: bool) -> None:
        """A confirmed jump: JUMP when the analytic value is one of the one-sided derivatives (within
        their tolerance), FAIL when it is neither (both resolved, or far outside both, or the ladder ended),
        UNRESOLVED when the ladder ended without a finite derivative on both sides; undecided elements
        stay pending for a finer level."""
        if not where.any():
            return
        tol = self.tolerance
        (right, right_err, right_jump), (left, left_err, left_jump) = sides["p"], sides["q"]
        with np.errstate(invalid="ignore", over="ignore"):
            local = np.fmax(np.abs(np.where(np.isfinite(right), right, 0.0)), np.abs(np.where(np.isfinite(left), left, 0.0)))
            ok, resolved, allowed = [], [], []
            for value, error in ((right, right_err), (left, left_err)):
                lim = tol.allowed(value, error, local)
                floor = tol.allowed(value, 0.0, local)
                finite = np.isfinite(value) & np.isfinite(error)
                ok.append(finite & (np.abs(analytic - value) <= lim))
                resolved.append(finite & (error <= CONVERGED * np.abs(value) + floor))
                allowed.append(lim)
            matches = ok[0] | ok[1]
            nearer_right = np.abs(analytic - right) <= np.abs(analytic - left)
            nearer_right = np.where(np.isfinite(right) & ~np.isfinite(left), True, nearer_right)
            finite = np.isfinite(right) & np.isfinite(left) & np.isfinite(right_err) & np.isfinite(left_err)
            far = ((np.abs(analytic - right) > FAIL_AT_ONCE * allowed[0])
                   & (np.abs(analytic - left) > FAIL_AT_ONCE * allowed[1]))
            wrong = finite & ~matches & ((resolved[0] & resolved[1]) | far | last)
        status = result.status[:, columns]
        decided = where & (matches | wrong | last)
        new = np.where(matches, JUMP, np.where(wrong, FAIL, UNRESOLVED))
        status = np.where(decided, new, status)
        result.status[:, columns] = status
        use_right = np.where(ok[0], True, np.where(ok[1], False, nearer_right))
        for field, value in (("numeric", np.where(use_right, right, left)),
                             ("error", np.where(use_right, right_err, left_err)),
                             ("allowed", np.where(use_right, allowed[0], allowed[1])),
                             ("left", left), ("right", right),
                             ("jump", right_jump + left_jump)):  # f(x+) - f(x-)
            target = getattr(result, field)
            target[:, columns] = np.where(decided, value, target[:, columns])
        result.method[:, columns] = np.where(decided, SIDES, result.method[:, columns])

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

    def _rescale_after_jumps(self, result: ElementVerdicts, analytic: np.ndarray) -> None:
        """The first pass took each block's scale from its central differences, which a jump inflates to
        about jump/h: the tolerances of the block's other elements are recomputed without it, and a pass
        that only held under the inflated scale becomes a failure."""
        jumps = np.isin(result.status, (JUMP, UNRESOLVED)) & np.isfinite(result.jump)
        if not jumps.any():
            return
        magnitude = np.where(jumps, np.fmax(np.abs(np.nan_to_num(result.left)), np.abs(np.nan_to_num(result.right))),
                             np.abs(np.where(np.isfinite(result.numeric), result.numeric, 0.0)))
        scale = np.zeros_like(magnitude)
        for rows, cols in self.blocks:
            block = magnitude[rows, cols]
            scale[rows, cols] = float(np.max(block)) if block.size else 0.0
        with np.errstate(invalid="ignore"):
            allowed = self.tolerance.allowed(result.numeric, result.error, scale)
            recheck = (result.status == PASS) & ~(np.abs(analytic - result.numeric) <= allowed)
        result.status = np.where(recheck, FAIL, result.status)
        result.allowed = np.where(result.status == PASS, np.minimum(result.allowed, allowed), result.allowed)

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
