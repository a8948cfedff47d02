"""Is the analytic side deterministic? Two calls at the same cotangent (or tangent) must agree.

A backward pass with atomics, a race or uninitialised memory returns a slightly different gradient on
every call. Comparing one such call with finite differences would read its noise as a wrong gradient
(or, below the tolerance, pass without a word). So the analytic side is run twice at one random
unit-norm cotangent ``v`` (reverse mode: ``J^T v``) or tangent ``u`` (forward mode: ``J u``), in two
separate calls, and their largest difference is the **spread**. With a unit-norm ``v``, independent
per-entry noise of size ``s`` shows in ``J^T v`` at about ``s``, so the spread is on the scale of the
noise of each compared Jacobian entry.

A spread within round-off of the working precision (``SPREAD_NOTED * eps * max|J^T v|``) is not
non-determinism worth a word. Above it the report notes it, and a mismatch within
``allowed + SPREAD_EXPLAINS * spread`` is called non-determinism, not a wrong gradient (a larger one
still fails as a bug).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .._errors import ModeUnsupportedError
from .evaluate import Evaluator

#: Spreads below this many ulps of the largest entry are round-off, not non-determinism.
SPREAD_NOTED = 16.0
#: A mismatch up to the tolerance plus this many spreads is explained by the analytic side's noise.
SPREAD_EXPLAINS = 4.0

CALLS = {"rev": "VJPs (backward passes) at the same cotangent", "fwd": "JVPs (forward-mode rules) at the same tangent"}
SIDES = {"rev": "backward", "fwd": "forward-mode (JVP) rule"}


@dataclass(frozen=True)
class Spread:
    """How much two analytic calls in ``mode`` at the same unit-norm probe differ.

    ``value`` is the largest absolute difference, ``scale`` the largest absolute entry of the result.
    """

    mode: str
    value: float
    scale: float

    @property
    def relative(self) -> float:
        return self.value / self.scale if self.scale > 0 else float("inf")

    def describe(self) -> str:
        """``non-deterministic backward: two VJPs ... differ by up to 1e-11 (relative 3e-12)``."""
        return (f"non-deterministic {SIDES[self.mode]}: two {CALLS[self.mode]} differ by up to {self.value:.2g} "
                f"(relative {self.relative:.2g})")


def measure_spread(evaluator: Evaluator, mode: str, precision: float, seed: int) -> Optional[Spread]:
    """The spread of the analytic side in ``mode`` (``"rev"`` or ``"fwd"``), or None when it is within
    round-off (or the mode is unsupported: the check reports that itself). Costs two analytic calls."""
    prepared = evaluator.prepared
    size = sum(spec.size for spec in prepared.output_specs) if mode == "rev" else len(prepared.x0)
    probe = np.random.default_rng(seed + 3).standard_normal((1, size))
    probe /= max(float(np.linalg.norm(probe)), np.finfo(np.float64).tiny)
    call = evaluator.vjp if mode == "rev" else evaluator.jvp
    try:
        first, second = call(probe)[0], call(probe)[0]  # two separate calls: a batch may share its noise
    except ModeUnsupportedError:
        return None
    finite = np.isfinite(first) & np.isfinite(second)
    if not finite.any():
        return None
    value = float(np.max(np.abs(first[finite] - second[finite])))
    scale = float(np.max(np.abs(first[finite])))
    if not value > SPREAD_NOTED * precision * max(scale, np.finfo(np.float64).tiny):
        return None
    return Spread(mode, value, scale)
