"""The perturbation directions of a check: one unit vector per element, or a tangent basis per input.

An ordinary checked leaf is perturbed one element at a time (direction ``e_j``, step
``h_j = rel * max(1, |x_j|)``), which measures column ``j`` of the Jacobian. A leaf given a
``structure`` is perturbed along the tangent directions ``t_k`` of its set instead (step
``rel * max(1, max|x_leaf|) / max|t_k|``), which measures the directional derivatives ``J t_k``. The
analytic side is projected the same way (:meth:`Directions.project`), so both sides always answer the
same question.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence

import numpy as np

from .._adapter import LeafSpec
from .compress import CompressedLeaf
from .._errors import InvalidArgumentError
from .structure import Structure


@dataclass
class LeafDirections:
    """The directions of one leaf: ``basis`` is None for unit directions, else ``(k, leaf.size)``."""

    leaf: LeafSpec
    first: int  # index of the leaf's first direction among all directions
    basis: Optional[np.ndarray] = None
    labels: Optional[List[str]] = None
    structure: str = ""
    compressed: bool = False

    @property
    def count(self) -> int:
        return self.leaf.size if self.basis is None else len(self.basis)

    @property
    def slice(self) -> slice:
        return slice(self.first, self.first + self.count)

    def label(self, k: int) -> str:
        """``x[1, 2]`` for an element, ``a[0, 1]+[1, 0]`` for a tangent direction."""
        if self.basis is not None and self.labels is not None:
            label = self.labels[k]
            return f"{self.leaf.name}{label}" if label.startswith("[") else f"{self.leaf.name} {label}"
        index = self.leaf.unravel(k)
        return self.leaf.name + ("[" + ", ".join(str(i) for i in index) + "]" if index else "")


class Directions:
    """All directions of a check, leaf after leaf, with their base steps."""

    def __init__(self, x0: np.ndarray, leaves: Sequence[LeafSpec], relative_step: float,
                 structures: Optional[Mapping[str, Structure]] = None,
                 compressed: Optional[Mapping[str, "CompressedLeaf"]] = None) -> None:
        structures = dict(structures or {})
        compressed = dict(compressed or {})
        names = [leaf.name for leaf in leaves]
        unknown = [name for name in structures if name not in names]
        if unknown:
            raise InvalidArgumentError(f"structure: no checked input or parameter is named {unknown[0]!r}; "
                                       f"the checked ones are {', '.join(repr(n) for n in names)}")
        self.x0 = x0
        self.relative_step = relative_step
        self.per_leaf: List[LeafDirections] = []
        steps: List[np.ndarray] = []
        first = 0
        for leaf in leaves:
            if leaf.name in compressed:  # groups of columns, each column already scaled by s_j*max(1, |x_j|)
                plan = compressed[leaf.name]
                entry = LeafDirections(leaf, first, plan.basis, plan.labels(), "compressed", compressed=True)
                steps.append(np.full(plan.count, relative_step))
            elif leaf.name in structures:
                structure = structures[leaf.name]
                basis, labels = structure.basis(leaf.name, x0[leaf.slice].reshape(leaf.shape))
                entry = LeafDirections(leaf, first, basis, labels, structure.name)
                size = max(1.0, float(np.max(np.abs(x0[leaf.slice])))) if leaf.size else 1.0
                steps.append(relative_step * size / np.max(np.abs(basis), axis=1))
            else:
                entry = LeafDirections(leaf, first)
                steps.append(relative_step * np.maximum(1.0, np.abs(x0[leaf.slice])))
            self.per_leaf.append(entry)
            first += entry.count
        self.count = first
        self.steps = np.concatenate(steps) if steps else np.zeros(0)
        self.owner = np.concatenate([np.full(e.count, i) for i, e in enumerate(self.per_leaf)]) \
            if self.per_leaf else np.zeros(0, dtype=int)
        # every direction a unit vector, leaves in flat order: direction j changes element j
        self._directions_are_elements = all(e.basis is None and e.first == e.leaf.offset for e in self.per_leaf)

    def of(self, leaf: LeafSpec) -> LeafDirections:
        return next(e for e in self.per_leaf if e.leaf.name == leaf.name)

    def stencil(self, indices: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """The points ``x0 + scales[k] d_k`` followed by ``x0 - scales[k] d_k``: shape (2k, n), written
        in place over copies of ``x0`` (no dense displacement matrices: a unit direction touches one
        element), so building a batch costs one pass over its memory."""
        indices = np.asarray(indices)
        scales = np.asarray(scales, dtype=np.float64)
        k = len(indices)
        points = np.empty((2 * k, len(self.x0)))
        points[:] = self.x0
        self._add(points[:k], indices, scales)
        self._add(points[k:], indices, -scales)
        return points

    def _add(self, rows: np.ndarray, indices: np.ndarray, scales: np.ndarray) -> None:
        """``rows[k] += scales[k] * d_{indices[k]}``, leaf by leaf, vectorized for unit directions."""
        owners = self.owner[indices] if len(indices) else np.zeros(0, dtype=int)
        for owner in np.unique(owners):
            entry = self.per_leaf[int(owner)]
            mine = np.nonzero(owners == owner)[0]
            local = indices[mine] - entry.first
            if entry.basis is None:
                rows[mine, entry.leaf.offset + local] += scales[mine]
            else:
                rows[mine, entry.leaf.slice] += scales[mine, None] * entry.basis[local]

    def unit_positions(self, indices: np.ndarray) -> Optional[np.ndarray]:
        """The positions in the flat vector that directions ``indices`` change, when every one of them is
        a unit direction (one element each); None when any is a tangent or compressed direction."""
        indices = np.asarray(indices)
        if self._directions_are_elements:
            return indices.astype(np.int64)
        owners = self.owner[indices] if len(indices) else np.zeros(0, dtype=int)
        positions = np.empty(len(indices), dtype=np.int64)
        for owner in np.unique(owners):
            entry = self.per_leaf[int(owner)]
            if entry.basis is not None:
                return None
            mine = owners == owner
            positions[mine] = entry.leaf.offset + indices[mine] - entry.first
        return positions

    def taken(self, indices: np.ndarray, points: np.ndarray) -> "tuple[np.ndarray, np.ndarray]":
        """The steps really taken by the stencil ``points`` (from :meth:`stencil`, possibly rounded):
        ``x0 + h_plus d`` and ``x0 - h_minus d`` as floating point represents them."""
        indices = np.asarray(indices)
        k = len(indices)
        h_plus = np.zeros(k)
        h_minus = np.zeros(k)
        owners = self.owner[indices] if k else np.zeros(0, dtype=int)
        for owner in np.unique(owners):
            entry = self.per_leaf[int(owner)]
            mine = np.nonzero(owners == owner)[0]
            local = indices[mine] - entry.first
            if entry.basis is None:
                at = entry.leaf.offset + local
                h_plus[mine] = points[mine, at] - self.x0[at]
                h_minus[mine] = self.x0[at] - points[k + mine, at]
            else:
                t = entry.basis[local]
                norm = np.einsum("kj,kj->k", t, t)
                x = self.x0[entry.leaf.slice]
                h_plus[mine] = np.einsum("kj,kj->k", points[mine, entry.leaf.slice] - x, t) / norm
                h_minus[mine] = np.einsum("kj,kj->k", x - points[k + mine, entry.leaf.slice], t) / norm
        return h_plus, h_minus

    def project(self, jacobian: np.ndarray) -> np.ndarray:
        """The analytic Jacobian ``(m, n)`` as directional derivatives ``(m, count)``."""
        parts = []
        for entry in self.per_leaf:
            block = jacobian[:, entry.leaf.slice]
            parts.append(block if entry.basis is None else block @ entry.basis.T)
        return np.concatenate(parts, axis=1) if parts else np.zeros((jacobian.shape[0], 0))
