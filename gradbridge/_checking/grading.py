"""The grade of a row: how large its relative error is, computed where that means something.

The verdict (pass/FAIL) says whether the analytic side differs from finite differences by more than
their error allows; the grade names the size of the difference (:func:`gradbridge._checking.tolerance.grade`).
They must tell one story:

- a block that is zero on both sides up to the tolerance (a bias before a BatchNorm) has no relative
  error worth the name (``||a - n|| / (||a|| + ||n||)`` of two round-off values is about 1): its grade
  is ``zero``;
- a passing block is graded on its entries that are not zero up to the tolerance;
- a failing block is graded on its failing entries, so a bug on a few elements is not diluted by the
  right ones;
- a row whose verdict and grade still point different ways (FAIL with a small error: real but small;
  ok with a large one: a loose tolerance or a noisy fn) says why in its message.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from .._reporting.report import RowResult
from .tolerance import grade, relative_error

ZERO = "zero"
PASSING_GRADES = ("correct", "acceptable", ZERO)


def block_grade(analytic: np.ndarray, numeric: np.ndarray, allowed: np.ndarray, bad: np.ndarray,
                compared: np.ndarray) -> Tuple[float, str]:
    """``(relative error, grade)`` of a block: over its failing entries ``bad`` when there are any, else
    over the ``compared`` entries that are not zero on both sides up to ``allowed``; ``zero`` when none is."""
    graded = bad & compared
    if not graded.any():
        with np.errstate(invalid="ignore"):
            graded = compared & ~((np.abs(analytic) <= allowed) & (np.abs(numeric) <= allowed))
        if not graded.any():
            return 0.0, ZERO if compared.any() else "correct"
    rel = relative_error(analytic[graded], numeric[graded])
    return rel, grade(rel) if np.isfinite(rel) else "wrong"


def explain_grade(row: RowResult, user_tolerance: bool) -> None:
    """Add to ``row.message`` why its verdict and grade point different ways, when they do."""
    if row.status in ("unsupported", "error") or row.worst is None:
        return
    failing = not row.passed and row.status in ("fail", "nondeterministic")
    if failing and row.grade in PASSING_GRADES:
        worst = row.worst
        measured = (f", {worst.times_error:.3g}x the finite difference's estimated error"
                    if worst.times_error is not None and np.isfinite(worst.times_error) else "")
        reason = (f"FAIL with grade '{row.grade}': the error is small ({row.rel_error:.2g} relative) but "
                  f"{worst.ratio:.3g}x the allowed difference{measured}, so it is real, not numerical error "
                  "(a slightly wrong constant or formula, lower-precision arithmetic inside the rule)")
    elif row.passed and row.status == "pass" and row.grade not in PASSING_GRADES:
        limit = ("the tolerance you gave (atol/rtol) allows it" if user_tolerance else
                 "the finite differences' own estimated error is that large here (fn is noisy, steep or nearly "
                 "non-smooth at this point), so the tolerance is too")
        reason = (f"ok with grade '{row.grade}': the entries differ by {row.rel_error:.2g} relative, within the "
                  f"tolerance because {limit}: not shown wrong, but not checked more finely than that")
    else:
        return
    row.message = f"{reason}; {row.message}" if row.message else reason
