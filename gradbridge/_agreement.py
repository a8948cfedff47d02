"""The internal agreement rule: when two computations of the same numbers count as the same.

gradbridge computes some numbers twice on purpose: a batched evaluation and the point-by-point loop, a remote
chunk and a local one, a VJP and its transpose (the dot test ``<J^T u, t> = <u, J t>``), a derivative read from
the diagonal of a pulled-back probe. Neither side is the exact answer: both are floating-point computations of
one mathematical value, in a different order. They agree when they differ by at most

    |a - b| <= AGREEMENT_ULPS * eps * max(|a|, |b|, scale)

where ``eps`` is the machine epsilon of the precision the computation really ran in (float64's unless a check
runs in the user's float32, ...) and ``scale`` the largest finite magnitude of the row (an entry near zero is
judged against the size of the numbers it was computed from, not against itself). Non-finite entries must
match: NaN where the other side has NaN, infinities of the same sign.

This is not the verdict rule (``_tolerance.py``: is the analytic gradient right, within error estimates of
finite differences) nor the pairwise rule of ``gb.compare`` (do two implementations agree); it only decides
whether a faster path may replace a slower one, so it is strict: 1e3 ulps is far below any gradient bug the
verdict exists to catch (the smallest seeded bugs are 1e-4 relative) and far above reordering round-off.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

#: Agreement of two computations of the same numbers, in machine epsilons.
AGREEMENT_ULPS = 1e3


def agreement_bound(eps: float, size: "np.ndarray | float") -> "np.ndarray | float":
    """The largest difference two computations of numbers of magnitude ``size`` may show and still agree."""
    return AGREEMENT_ULPS * eps * size


def disagreement(a: np.ndarray, b: np.ndarray, eps: float, rows: bool = True) -> Optional[str]:
    """None when ``a`` and ``b`` agree under the rule above; otherwise why not, in a few words.

    ``rows``: for 2-d inputs, ``scale`` is each row's largest finite magnitude (one row per point or probe);
    otherwise the whole array's.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return f"shapes {a.shape} and {b.shape} differ"
    if np.array_equal(a, b):  # the usual case, bit for bit
        return None
    finite = np.isfinite(a) & np.isfinite(b)
    if not np.array_equal(a[~finite], b[~finite], equal_nan=True):
        return "not finite in different places"
    if not finite.any():
        return None
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf where both sides agree on an infinity
        return _finite_disagreement(a, b, finite, eps, rows)


def _finite_disagreement(a: np.ndarray, b: np.ndarray, finite: np.ndarray, eps: float, rows: bool) -> Optional[str]:
    magnitude = np.where(finite, np.maximum(np.abs(a), np.abs(b)), 0.0)
    if rows and a.ndim == 2:
        scale = np.max(magnitude, axis=1, keepdims=True)
    else:
        scale = np.max(magnitude)
    error = np.where(finite, np.abs(a - b), 0.0)
    bad = error > agreement_bound(eps, np.maximum(magnitude, scale))
    if bad.any():
        return f"largest difference {float(error[bad].max()):.3g}"
    return None


def agree(a: np.ndarray, b: np.ndarray, eps: float, rows: bool = True) -> bool:
    """True when ``a`` and ``b`` agree under the rule above."""
    return disagreement(a, b, eps, rows) is None
