"""Floating-point formats below float64: their machine epsilon, and rounding to them.

With ``promote=False`` a check runs in the user's own dtypes (float32, float16, bfloat16). The core
then rounds every perturbed point to the dtype of its leaf *before* measuring the step, so a finite
difference divides by the step the function really saw; the adapter's own cast of such a point is
exact. NumPy has no bfloat16, so rounding to it is done on the bits (round to nearest, ties to even:
what torch, JAX and TensorFlow do).
"""

from __future__ import annotations

import numpy as np

FLOAT64_EPS = float(np.finfo(np.float64).eps)

#: Machine epsilon by dtype name (the unit roundoff times two).
DTYPE_EPS = {"float64": FLOAT64_EPS, "float32": float(np.finfo(np.float32).eps),
             "float16": float(np.finfo(np.float16).eps), "bfloat16": 2.0 ** -7,
             # complex leaves are checked through their real views: their parts' precision
             "complex64": float(np.finfo(np.float32).eps), "complex128": FLOAT64_EPS}


def dtype_name(dtype: object) -> str:
    """``torch.float32``, ``<dtype: 'float32'>``, ``dtype('float32')`` and ``"float32"`` all give ``"float32"``."""
    text = str(dtype)
    for name in ("bfloat16", "float16", "float32", "float64", "complex64", "complex128"):  # bfloat16 before the float16 it contains
        if name in text:
            return name
    return text


def eps_of(dtype: object) -> float:
    """Machine epsilon of ``dtype``; float64's for anything that is not a known lower precision."""
    return DTYPE_EPS.get(dtype_name(dtype), FLOAT64_EPS)


def _round_to_bfloat16(values: np.ndarray) -> np.ndarray:
    single = np.asarray(values, dtype=np.float32)
    bits = single.view(np.uint32).astype(np.uint64)
    rounding = np.uint64(0x7FFF) + ((bits >> np.uint64(16)) & np.uint64(1))
    rounded = ((bits + rounding) >> np.uint64(16)) << np.uint64(16)
    finite = np.isfinite(single)
    out = np.where(finite, rounded, bits).astype(np.uint32).view(np.float32)
    return out.astype(np.float64)


def round_to(values: np.ndarray, dtype: object) -> np.ndarray:
    """``values`` (float64) rounded to the nearest number representable in ``dtype``, still as float64."""
    name = dtype_name(dtype)
    if name in ("float32", "complex64"):  # a complex64 leaf's real view holds float32 parts
        return np.asarray(values, dtype=np.float32).astype(np.float64)
    if name == "float16":
        return np.asarray(values, dtype=np.float16).astype(np.float64)
    if name == "bfloat16":
        return _round_to_bfloat16(values)
    return np.asarray(values, dtype=np.float64)


class PointRounder:
    """Rounds perturbed points (rows of the flat vector) to each checked leaf's own dtype.

    Used when a check runs without promotion: a point the function cannot represent would be rounded
    by the framework's cast anyway, and the finite difference must divide by the step really taken.
    With promotion (every leaf float64) it leaves points unchanged.
    """

    def __init__(self, leaves, promote: bool) -> None:
        self.slices = [] if promote else [(leaf.slice, leaf.dtype) for leaf in leaves
                                          if dtype_name(leaf.dtype) in ("float32", "float16", "bfloat16", "complex64")]

    def __call__(self, points: np.ndarray) -> np.ndarray:
        if not self.slices:
            return points
        points = np.array(points, dtype=np.float64, copy=True)
        for where, dtype in self.slices:
            points[..., where] = round_to(points[..., where], dtype)
        return points

    def eps(self, default: float) -> float:
        """The coarsest machine epsilon among the rounded leaves (``default`` when none is)."""
        return max([default] + [eps_of(dtype) for _, dtype in self.slices])
