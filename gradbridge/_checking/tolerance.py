"""When an analytic derivative counts as equal to its finite-difference estimate, and how wrong it is.

The default rule is error-estimated, applied per element and never scaled with array size::

    |analytic - numeric| <= 4 * fd_error + sqrt(eps) * |numeric| + eps^(2/3) * max|numeric of the block|

``fd_error`` is the numerical error of the finite difference, estimated from the function's own
evaluations (round-off ``eps*|f|/h``; where the step ladder refines an element, the truncation error
seen between consecutive steps too: see :mod:`gradbridge._checking.numeric`). The two precision terms are the
floor below which no finite difference in that precision can tell two derivatives apart: half the
digits of the working precision relative to the entry (1.5e-8 in float64, 3.5e-4 in float32; the
analytic side's own round-off lives there), and ``eps^(2/3)`` of the block's largest entry for entries
that are zero or nearly so. ``eps`` is the working precision's machine epsilon.

When the caller passes ``atol`` or ``rtol``, exactly ``atol + rtol*|numeric|`` is used instead and the
report says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

SAFETY = 4.0
TINY = float(np.finfo(np.float64).tiny)  # keeps an exactly-zero block from demanding exact zeros of nothing

#: Relative-error grades: (upper bound, name); the first bound above the error names the grade.
GRADES = ((1e-7, "correct"), (1e-4, "acceptable"), (1e-2, "suspicious"), (np.inf, "wrong"))

Array = Union[np.ndarray, float]


@dataclass(frozen=True)
class Tolerance:
    """The tolerance rule of a check: error-estimated (default) or the caller's ``atol``/``rtol``.

    ``working_eps`` is the machine epsilon of the precision the function is evaluated in (float64
    normally; float32 for a function that computes in float32, or a check with ``promote=False``).
    """

    atol: Optional[float]
    rtol: Optional[float]
    working_eps: float = float(np.finfo(np.float64).eps)

    @property
    def relative_floor(self) -> float:
        return float(np.sqrt(self.working_eps))

    @property
    def absolute_floor(self) -> float:
        return float(self.working_eps ** (2.0 / 3.0))

    @property
    def user_given(self) -> bool:
        return self.atol is not None or self.rtol is not None

    @property
    def rule(self) -> str:
        """``"atol/rtol"`` when the caller gave them, else ``"error-estimated"``."""
        return "atol/rtol" if self.user_given else "error-estimated"

    def describe(self) -> str:
        if self.user_given:
            return (f"|analytic - numeric| <= atol + rtol*|numeric|  "
                    f"(atol={self.atol or 0.0:g}, rtol={self.rtol or 0.0:g}, given by the caller)")
        return (f"error-estimated: |analytic - numeric| <= {SAFETY:g}*fd_error + {self.relative_floor:.2g}*|numeric| "
                f"+ {self.absolute_floor:.2g}*max|numeric| per block  (fd_error: the finite difference's error, "
                "estimated from its own evaluations)")

    def allowed(self, numeric: Array, fd_error: Array, scale: Array) -> np.ndarray:
        """Allowed absolute difference per element; ``scale`` is the largest ``|numeric|`` of its block."""
        numeric = np.abs(np.asarray(numeric, dtype=np.float64))
        if self.user_given:
            return (self.atol or 0.0) + (self.rtol or 0.0) * numeric
        return SAFETY * np.asarray(fd_error) + self.relative_floor * numeric + self.absolute_floor * np.asarray(scale) + TINY

    def scalar_bound(self, numeric: float, magnitude: float, fd_error: float) -> float:
        """Allowed difference for a projected (scalar) comparison of expected size ``magnitude``."""
        if self.user_given:
            return (self.atol or 0.0) + (self.rtol or 0.0) * max(abs(numeric), magnitude)
        return float(SAFETY * fd_error + self.relative_floor * max(abs(numeric), magnitude)
                     + self.absolute_floor * magnitude + TINY)


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
