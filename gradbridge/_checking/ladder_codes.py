"""The step ladder's vocabulary: element statuses, estimate methods, the thresholds every rung uses, and the
verdicts of a block (:class:`ElementVerdicts`).

Invariant: every threshold of the ladder is defined here once, with the reason for its value beside it.
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np




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
