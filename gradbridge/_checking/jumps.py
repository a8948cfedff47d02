"""Where ``fn`` jumps at the checked point: each side's derivative from points on that side only.

Invariant: at a jump the analytic value must equal one of the one-sided derivatives, each measured from
evaluations on its own side, and the block's scale is taken without the jump's inflated central differences.
"""

import numpy as np

from .ladder_codes import CONVERGED, ElementVerdicts, FAIL, FAIL_AT_ONCE, JUMP, JUMP_OVER_SLOPE, JUMP_STEADY, PASS, SIDES, UNRESOLVED



class JumpSides:
    """The jump part of :class:`gradbridge._checking.numeric.StepLadder` (a mixin: it uses the ladder's state)."""

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
