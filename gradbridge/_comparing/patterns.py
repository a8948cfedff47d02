"""What two implementations' differing arrays have in common: the shape of the difference, in a person's words.

A failing pair says how far apart two arrays are; a porting bug usually has a shape that names it: one side is
the other transposed (a kernel stored (out, in) read as (in, out)), a constant multiple (a missing factor 2, a
sign flip), the other plus a constant (a missing bias or term), or the two differ only in one row, one column or
one element. :func:`describe` finds the first such shape that explains every entry to a tight tolerance.

Invariant: a pattern is named only when it accounts for every entry (to ``1e-6`` of the arrays' scale), never as
a guess from a few entries; otherwise nothing is said.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

#: How closely a pattern must explain every entry, relative to the arrays' largest magnitude.
EXPLAINS = 1e-6


def describe(first: np.ndarray, second: np.ndarray, first_name: str, second_name: str, leaf: str,
             complex_view: bool = False) -> Optional[str]:
    """A sentence naming the pattern of the difference between ``first`` and ``second`` (the same leaf of two
    implementations), or None when no simple pattern explains every entry. ``complex_view``: the leaf is a complex
    value's real view (last axis: real, imaginary part), where one side being the other's conjugate is a pattern."""
    a = np.asarray(first, dtype=np.float64)
    b = np.asarray(second, dtype=np.float64)
    if a.shape != b.shape or a.size < 2 or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return None
    scale = max(float(np.max(np.abs(a))), float(np.max(np.abs(b))))
    if scale == 0.0:
        return None
    tight = EXPLAINS * scale

    def explains(model: np.ndarray) -> bool:
        return bool(np.all(np.abs(a - model) <= tight))

    if explains(b):
        return None
    if complex_view and a.shape[-1] == 2 and explains(b * np.array([1.0, -1.0])):
        return (f"{leaf}: {first_name}'s is {second_name}'s complex conjugate: a rule written in one framework's "
                "convention and run in the other's (PyTorch's and TensorFlow's gradients are dL/dRe + i dL/dIm, a "
                "JAX custom_vjp returns the conjugate), or a missing or extra conj()")
    if a.ndim == 2 and a.shape[0] == a.shape[1] and explains(b.T):
        return (f"{leaf}: {first_name}'s is {second_name}'s transposed: they would agree if one side's layout "
                "were transposed (a kernel stored (out, in) read as (in, out)?)")
    denominator = float(b.ravel() @ b.ravel())
    if denominator > 0:
        factor = float(a.ravel() @ b.ravel()) / denominator
        if explains(factor * b):
            if abs(factor + 1.0) <= 1e-6:
                return f"{leaf}: {first_name}'s is {second_name}'s with the sign flipped"
            return (f"{leaf}: {first_name}'s is {factor:.6g} x {second_name}'s, entry by entry (a missing or extra "
                    "constant factor)")
    offset = float(np.mean(a - b))
    if explains(b + offset):
        return (f"{leaf}: {first_name}'s is {second_name}'s plus {offset:.6g} in every entry (a missing bias or "
                "constant term)")
    wrong = np.abs(a - b) > tight
    count = int(np.count_nonzero(wrong))
    if count == 1:
        index = tuple(int(i) for i in np.argwhere(wrong)[0])
        return f"{leaf}: {first_name} and {second_name} differ only at {leaf}{list(index)}"
    if a.ndim == 2 and count > 1:
        rows = np.flatnonzero(wrong.any(axis=1))
        columns = np.flatnonzero(wrong.any(axis=0))
        if len(rows) == 1 and a.shape[0] > 1:
            return f"{leaf}: {first_name} and {second_name} differ only in row {leaf}[{int(rows[0])}, :]"
        if len(columns) == 1 and a.shape[1] > 1:
            return f"{leaf}: {first_name} and {second_name} differ only in column {leaf}[:, {int(columns[0])}]"
    return None
