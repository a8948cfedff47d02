"""Compressed finite differences: perturb many columns at once where the Jacobian allows it.

Many Jacobians are sparse: an elementwise op's is diagonal, a batched matmul's is block-structured.
Columns (input elements) that share no output row can be perturbed together: one central difference
along ``sum_j s_j e_j`` then measures, in every output row, the single entry of that row among the
group (Curtis, Powell and Reid, 1974). The columns are grouped by greedy graph colouring of the
*analytic* Jacobian's sparsity pattern, and each column gets a random scale ``s_j`` in [0.5, 1].

Every entry is still compared, not sampled: an output row with one analytic nonzero in a group
compares that entry (times ``s_j``), and a row with none compares zero. An entry the analytic side
has wrong, including a nonzero it is missing, therefore shows as a mismatch in its row; the random
scales keep two wrong entries of one row from cancelling. A compressed leaf that is not cleanly right
(any mismatch, kink or one-sided difference) is re-checked element by element, so the report always
names the element.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Mapping, Optional, Sequence

import numpy as np

from .._agreement import agreement_bound
from .._adapter import LeafSpec

#: Leaves smaller than this are checked column by column (the saving is small, the report plainer).
MIN_COLUMNS = 64
#: Compress only when it needs at most this fraction of the columns' evaluations.
MAX_GROUP_FRACTION = 0.5
#: Range of the random per-column scales.
SCALE_RANGE = (0.5, 1.0)


@dataclass
class CompressedLeaf:
    """The groups of one leaf: ``basis[g]`` is the displacement direction of group ``g`` (already scaled
    by ``s_j * max(1, |x_j|)``), ``groups[j]`` the group of column ``j``."""

    basis: np.ndarray
    groups: np.ndarray

    @property
    def count(self) -> int:
        return len(self.basis)

    def labels(self) -> List[str]:
        sizes = np.bincount(self.groups, minlength=self.count)
        return [f"group {g} ({int(sizes[g])} column(s))" for g in range(self.count)]


def colour_columns(pattern: np.ndarray, limit: int) -> Optional[np.ndarray]:
    """Greedy colouring of the columns of a boolean (m, n) pattern: columns of one colour share no row.

    Returns the colour of each column, or None as soon as more than ``limit`` colours would be needed
    (or a row alone forces that many: its nonzeros all need distinct colours)."""
    m, n = pattern.shape
    rows, cols = np.nonzero(pattern)
    if n == 0 or int(np.bincount(rows, minlength=m).max(initial=0)) > limit:
        return None
    by_column = np.argsort(cols, kind="stable")
    column_counts = np.bincount(cols, minlength=n)
    rows_of = np.split(rows[by_column], np.cumsum(column_counts)[:-1])
    row_used = [0] * m  # per row, a bit set of the colours its columns already have
    colours = np.empty(n, dtype=np.int64)
    for j in np.argsort(-column_counts, kind="stable"):  # most-connected columns first
        used = 0
        for r in rows_of[j].tolist():
            used |= row_used[r]
        colour = (~used & (used + 1)).bit_length() - 1  # the lowest colour no row of j has
        if colour >= limit:
            return None
        bit = 1 << colour
        for r in rows_of[j].tolist():
            row_used[r] |= bit
        colours[j] = colour
    return colours


def column_scales(rng: np.random.Generator, x0: np.ndarray, leaf: LeafSpec) -> np.ndarray:
    """Each column's displacement in its group: a random ``s_j`` in :data:`SCALE_RANGE` times
    ``max(1, |x_j|)`` (the relative step is applied on top)."""
    return rng.uniform(*SCALE_RANGE, size=leaf.size) * np.maximum(1.0, np.abs(x0[leaf.slice]))


def plan(x0: np.ndarray, leaves: Sequence[LeafSpec], jacobian: np.ndarray, seed: int,
         excluded: Sequence[str] = ()) -> Mapping[str, CompressedLeaf]:
    """The compressed leaves of a full check: those of at least :data:`MIN_COLUMNS` elements whose
    columns fit in at most :data:`MAX_GROUP_FRACTION` of their count of groups."""
    rng: Optional[np.random.Generator] = None  # made when needed: a small check compresses nothing
    plans = {}
    for leaf in leaves:
        if leaf.size < MIN_COLUMNS or leaf.name in excluded:
            continue
        pattern = jacobian[:, leaf.slice] != 0
        groups = colour_columns(pattern, int(MAX_GROUP_FRACTION * leaf.size))
        if groups is None:
            continue
        rng = rng or np.random.default_rng(seed + 7)
        count = int(groups.max()) + 1
        basis = np.zeros((count, leaf.size))
        basis[groups, np.arange(leaf.size)] = column_scales(rng, x0, leaf)
        plans[leaf.name] = CompressedLeaf(basis, groups)
    return plans


def diagonal_jacobian(vjp: Callable[[np.ndarray], np.ndarray], leaves: Sequence[LeafSpec], output_size: int,
                      eps: float, seed: int) -> Optional[np.ndarray]:
    """The analytic Jacobian's diagonal when every block of ``leaves`` is diagonal (elementwise ops),
    from three VJPs instead of one per output; None when it is not (or cannot be).

    ``J^T 1`` gives ``d`` if J is diagonal; two random cotangents ``r`` then verify it: ``J^T r`` must
    equal ``d * r`` to rounding, which fails (with probability one) for any off-diagonal entry of the
    analytic side. The numeric side needs no such trust: it compares every output row anyway."""
    if output_size < MIN_COLUMNS or not leaves or any(leaf.size != output_size for leaf in leaves):
        return None
    probes = np.random.default_rng(seed + 11).standard_normal((2, output_size))
    pulled = vjp(np.vstack([np.ones(output_size), probes]))
    diagonal = pulled[0]
    for k, probe in enumerate(probes, start=1):
        for leaf in leaves:
            want = diagonal[leaf.slice] * probe
            got = pulled[k, leaf.slice]
            bound = agreement_bound(eps, np.abs(want)) + eps * float(np.max(np.abs(want), initial=0.0))
            if not (np.all(np.isfinite(got)) and np.all(np.abs(got - want) <= bound)):
                return None
    return diagonal


def diagonal_plan(x0: np.ndarray, leaves: Sequence[LeafSpec], seed: int) -> Mapping[str, CompressedLeaf]:
    """One group per leaf (every element perturbed at once), for verified diagonal Jacobians."""
    rng = np.random.default_rng(seed + 7)
    plans = {}
    for leaf in leaves:
        plans[leaf.name] = CompressedLeaf(column_scales(rng, x0, leaf)[None, :], np.zeros(leaf.size, dtype=np.int64))
    return plans
