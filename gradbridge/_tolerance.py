"""When an analytic derivative counts as equal to its finite-difference estimate, and how wrong it is.

One documented rule, applied per element and never scaled with array size::

    |analytic - numeric| <= atol + rtol * |numeric| + safety * fd_error

``fd_error`` is the estimated error of the finite difference for that element (round-off, plus the
truncation error where a column was refined by Richardson extrapolation). With the default tolerance,
``atol`` is relative to the largest numeric entry of the block being compared (``1e-7 * max|numeric|``),
so a function's overall scale, large or tiny, does not decide the verdict. When the
user passes ``atol`` or ``rtol``, exactly ``atol + rtol*|numeric|`` is used and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

DEFAULT_RTOL = 1e-5
DEFAULT_ATOL_FACTOR = 1e-7
SAFETY = 10.0
TINY = float(np.finfo(np.float64).tiny)  # keeps an exactly-zero block from demanding exact zeros of nothing

#: Relative-error grades: (upper bound, name); the first bound above the error names the grade.
GRADES = ((1e-7, "correct"), (1e-4, "acceptable"), (1e-2, "suspicious"), (np.inf, "wrong"))


@dataclass(frozen=True)
class Tolerance:
    """The tolerance rule of a check: user-given ``atol``/``rtol``, or the defaults.

    ``working_eps`` is the machine epsilon of the precision the function is evaluated in (float64
    normally; an adapter that cannot promote, e.g. a float32-only model, says so); the default
    ``rtol``/``atol`` grow to ``100*eps^(2/3)``/``10*eps^(2/3)`` when that is larger (float32: 2.4e-3, 2.4e-4).
    """

    atol: Optional[float]
    rtol: Optional[float]
    working_eps: float = float(np.finfo(np.float64).eps)

    @property
    def default_rtol(self) -> float:
        return max(DEFAULT_RTOL, 100.0 * self.working_eps ** (2.0 / 3.0))

    @property
    def default_atol_factor(self) -> float:
        return max(DEFAULT_ATOL_FACTOR, 10.0 * self.working_eps ** (2.0 / 3.0))

    @property
    def user_given(self) -> bool:
        return self.atol is not None or self.rtol is not None

    def describe(self) -> str:
        if self.user_given:
            return (f"|analytic - numeric| <= atol + rtol*|numeric|  "
                    f"(atol={self.atol or 0.0:g}, rtol={self.rtol or 0.0:g}, given by the caller)")
        return (f"|analytic - numeric| <= atol + rtol*|numeric| + {SAFETY:g}*fd_error  "
                f"(rtol={self.default_rtol:.3g}, atol={self.default_atol_factor:.3g}*max|numeric| per block, "
                "fd_error = estimated error of the finite difference)")

    def bounds(self, numeric: np.ndarray, fd_error: np.ndarray) -> np.ndarray:
        """Allowed absolute difference per element of a block of the Jacobian."""
        if self.user_given:
            return (self.atol or 0.0) + (self.rtol or 0.0) * np.abs(numeric)
        scale = float(np.max(np.abs(numeric))) if numeric.size else 0.0
        return (self.default_atol_factor * scale + self.default_rtol * np.abs(numeric) + SAFETY * fd_error
                + TINY)

    def scalar_bound(self, numeric: float, magnitude: float, fd_error: float) -> float:
        """Allowed difference for a projected (scalar) comparison of expected size ``magnitude``."""
        if self.user_given:
            return (self.atol or 0.0) + (self.rtol or 0.0) * max(abs(numeric), magnitude)
        return (self.default_atol_factor * magnitude + self.default_rtol * max(abs(numeric), magnitude)
                + SAFETY * fd_error + TINY)


def relative_error(analytic: np.ndarray, numeric: np.ndarray) -> float:
    """``||a - n|| / (||a|| + ||n||)`` (0 when both are zero): in [0, 1], size-independent."""
    denominator = float(np.linalg.norm(analytic) + np.linalg.norm(numeric))
    if denominator == 0.0:
        return 0.0
    return float(np.linalg.norm(analytic - numeric)) / denominator


def grade(rel_error: float) -> str:
    """Name the relative error: correct (< 1e-7), acceptable (< 1e-4), suspicious (< 1e-2), wrong."""
    for bound, name in GRADES:
        if rel_error < bound:
            return name
    return "wrong"
