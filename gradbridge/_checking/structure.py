"""Inputs that live on a set: perturb them only along the set's tangent directions.

Some functions are only defined on a set: a symmetric matrix read from one triangle, a probability
vector on the simplex, a basis defined up to rotation. Perturbing such an input one entry at a time
leaves the set, and the finite difference then measures something the function was never meant to
answer, so a correct gradient would be reported wrong. ``check(..., structure={"name": ...})``
replaces the unit perturbations of that input by a basis of tangent directions ``t_k`` and compares the
directional derivatives ``J t_k`` both ways (analytic: the Jacobian times ``t_k``; numeric: central
differences along ``t_k``).

A structure is ``"symmetric"``, ``"simplex"``, or a callable ``directions(x) -> array (k, *x.shape)``
returning tangent directions at the point ``x`` (a float64 NumPy array of the leaf's shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from .._errors import InvalidArgumentError

Basis = Tuple[np.ndarray, List[str]]  # (k, size) directions on the flattened leaf, and one label each


def symmetric_directions(x: np.ndarray) -> Basis:
    """Symmetric matrices (square, last two axes): ``E_ii`` and ``E_ij + E_ji`` for ``i < j``."""
    if x.ndim < 2 or x.shape[-1] != x.shape[-2]:
        raise InvalidArgumentError(f"structure: 'symmetric' needs square matrices (shape (..., n, n)), got shape {x.shape}")
    n = x.shape[-1]
    batch = int(np.prod(x.shape[:-2], dtype=np.int64))
    rows, labels = [], []
    for b in range(batch):
        prefix = list(np.unravel_index(b, x.shape[:-2])) if x.ndim > 2 else []
        for i in range(n):
            for j in range(i, n):
                t = np.zeros((batch, n, n))
                t[b, i, j] = t[b, j, i] = 1.0
                rows.append(t.reshape(-1))
                at = lambda r, c: "[" + ", ".join(str(v) for v in prefix + [r, c]) + "]"
                labels.append(at(i, i) if i == j else f"{at(i, j)}+{at(j, i)}")
    return np.array(rows), labels


def simplex_directions(x: np.ndarray) -> Basis:
    """Vectors summing to one along the last axis: ``e_i - e_r`` per row, ``r`` the row's largest entry
    (so a small step never makes the smallest entries negative)."""
    if x.ndim < 1 or x.shape[-1] < 2:
        raise InvalidArgumentError(f"structure: 'simplex' needs at least 2 entries on the last axis, got shape {x.shape}")
    flat = x.reshape(-1, x.shape[-1])
    rows, labels = [], []
    for r, row in enumerate(flat):
        ref = int(np.argmax(row))
        prefix = list(np.unravel_index(r, x.shape[:-1])) if x.ndim > 1 else []
        at = lambda c: "[" + ", ".join(str(v) for v in prefix + [c]) + "]"
        for i in range(len(row)):
            if i == ref:
                continue
            t = np.zeros_like(flat)
            t[r, i], t[r, ref] = 1.0, -1.0
            rows.append(t.reshape(-1))
            labels.append(f"{at(i)}-{at(ref)}")
    return np.array(rows), labels


BUILT_INS: Dict[str, Callable[[np.ndarray], Basis]] = {"symmetric": symmetric_directions,
                                                       "simplex": simplex_directions}


@dataclass(frozen=True)
class Structure:
    """The tangent directions of one input: a built-in by name, or the user's callable."""

    name: str
    directions: Callable[[np.ndarray], Any]

    def basis(self, leaf_name: str, x: np.ndarray) -> Basis:
        """Directions ``(k, x.size)`` and their labels, validated."""
        if self.name in BUILT_INS:
            return BUILT_INS[self.name](x)
        try:
            raw = np.asarray(self.directions(x.copy()), dtype=np.float64)
        except Exception as exc:
            raise InvalidArgumentError(f"structure[{leaf_name!r}]: the directions callable raised "
                                       f"{type(exc).__name__}: {exc}") from exc
        if raw.ndim != x.ndim + 1 or raw.shape[1:] != x.shape or raw.shape[0] == 0:
            raise InvalidArgumentError(f"structure[{leaf_name!r}]: the directions callable must return an array of "
                                       f"shape (k, {', '.join(str(s) for s in x.shape)}) with k >= 1, got shape "
                                       f"{raw.shape}")
        flat = raw.reshape(raw.shape[0], -1)
        norms = np.max(np.abs(flat), axis=1)
        if not np.all(np.isfinite(flat)) or np.any(norms == 0):
            raise InvalidArgumentError(f"structure[{leaf_name!r}]: every direction must be finite and non-zero")
        return flat, [f"direction {k}" for k in range(len(flat))]


def validate_structure(structure: Optional[Mapping[str, Any]]) -> Dict[str, Structure]:
    """``{leaf name: Structure}`` from the user's mapping; raises naming the bad entry."""
    if structure is None:
        return {}
    if not isinstance(structure, Mapping):
        raise InvalidArgumentError("structure: expected a dict {input name: 'symmetric' | 'simplex' | callable}, "
                                   f"got {type(structure).__name__}")
    result = {}
    for name, value in structure.items():
        if not isinstance(name, str):
            raise InvalidArgumentError(f"structure: keys must be input names (str), got {name!r}")
        if isinstance(value, str):
            if value not in BUILT_INS:
                raise InvalidArgumentError(f"structure[{name!r}]: expected 'symmetric', 'simplex' or a callable "
                                           f"directions(x) -> (k, *x.shape), got {value!r}")
            result[name] = Structure(value, BUILT_INS[value])
        elif callable(value):
            result[name] = Structure(getattr(value, "__name__", "callable"), value)
        else:
            raise InvalidArgumentError(f"structure[{name!r}]: expected 'symmetric', 'simplex' or a callable, "
                                       f"got {type(value).__name__}")
    return result
