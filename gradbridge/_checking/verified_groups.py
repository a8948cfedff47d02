"""The analytic side of a full check by columns, from transposed VJPs, with a verified sparsity pattern.

The dense analytic Jacobian costs one VJP per output (``m`` of them), far more than a compressed
finite-difference check needs when the Jacobian is sparse: ``x @ W`` at 4096 outputs is compressed into
32 column groups. Where the adapter can transpose its VJP (``J t`` from differentiating
``u -> J^T u``, the same Jacobian, the user's backward rules included), the analytic side of each
group comes from one such product instead, and the pattern the grouping relies on is verified rather
than read off the dense Jacobian:

* Candidate groupings of a leaf's elements are tried, fewest groups first: all elements at once, then
  the elements sharing an index along one axis (``x[:, k]`` for a batch of feature vectors,
  ``W[k, :]`` for a weight), then plain columns.
* Each group is pushed through ``J`` twice, with per-column scales ``s_j`` and ``s_j rho_j``
  (``rho_j`` random in [0.5, 2]). An output row holding exactly one nonzero of the group shows the
  ratio ``rho_j`` of that column; a row holding two or more shows a mixture that matches none of the
  group's ratios (with probability one). A grouping is accepted only when every row of every group
  shows zero or one of its ratios: each output row of a group then measures one Jacobian entry, which
  is what makes the compressed comparison element by element.
* A dot test ``<J^T u, t> = <u, J t>`` with random ``u`` against the adapter's own VJPs confirms that
  the transposed products are the VJP's Jacobian (a backward pass that is not linear in its cotangent
  fails it), and every accepted grouping is re-verified this way.

Nothing here trusts the pattern for the numeric side: a nonzero the analytic side misses, or a wrong
entry, still shows as a mismatch in its output row (see :mod:`gradbridge._checking.compress`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .._agreement import agreement_bound
from .._adapter import LeafSpec
from .compress import MAX_GROUP_FRACTION, MIN_COLUMNS, CompressedLeaf, column_scales

#: Relative agreement of a row's ratio with its column's ratio (far above rounding, far below chance).
RATIO_TOLERANCE = 1e-9
#: Range of the second pass's extra per-column factor rho_j.
RATIO_RANGE = (0.5, 2.0)

Products = Callable[[np.ndarray], np.ndarray]


@dataclass
class ColumnAnalytic:
    """The analytic side of some leaves by columns: ``blocks[name]`` is ``(m, count)``, one column per
    group of a compressed leaf (``plans[name]``) or per element of a plain one."""

    plans: Dict[str, CompressedLeaf] = field(default_factory=dict)
    blocks: Dict[str, np.ndarray] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    strategy: Dict[str, str] = field(default_factory=dict)
    owners: Dict[str, np.ndarray] = field(default_factory=dict)


def groupings(leaf: LeafSpec) -> Iterator[Tuple[str, np.ndarray]]:
    """Candidate groupings of a leaf's elements, fewest groups first: ``(description, group of each
    element)``. Plain columns (one group per element) come last and are always valid."""
    if leaf.size >= MIN_COLUMNS:
        limit = MAX_GROUP_FRACTION * leaf.size
        yield "all elements at once", np.zeros(leaf.size, dtype=np.int64)
        index = np.indices(leaf.shape).reshape(len(leaf.shape), -1) if leaf.shape else np.zeros((0, 1))
        for axis in sorted(range(len(leaf.shape)), key=lambda a: leaf.shape[a]):
            if 1 < leaf.shape[axis] <= limit:
                yield f"by index along axis {axis}", index[axis].astype(np.int64)
    yield "column by column", np.arange(leaf.size, dtype=np.int64)


def single_entry_rows(first: np.ndarray, second: np.ndarray, groups: np.ndarray,
                      rho: np.ndarray) -> Optional[np.ndarray]:
    """The element each output row of each group measures, when every row holds at most one nonzero of
    its group: ``owners[g, r]`` is that element (-1 for a row with none); None when a row holds more.

    ``first[g]`` and ``second[g]`` are ``J c_g`` with scales ``s`` and ``s * rho``: a row with one
    nonzero ``j`` has ``second / first = rho_j``; zero rows are zero in both."""
    if not (np.all(np.isfinite(first)) and np.all(np.isfinite(second))):
        return None
    owners = np.full(first.shape, -1, dtype=np.int64)
    for g in range(first.shape[0]):
        a, b = first[g], second[g]
        zero = (a == 0) & (b == 0)
        if np.any((a == 0) & ~zero):
            return None
        members = np.nonzero(groups == g)[0]
        order = np.argsort(rho[members])
        ratios = rho[members][order]
        observed = b[~zero] / a[~zero]
        at = np.clip(np.searchsorted(ratios, observed), 1, max(1, len(ratios) - 1))
        below, above = at - 1, np.minimum(at, len(ratios) - 1)
        nearer = np.where(np.abs(observed - ratios[below]) <= np.abs(observed - ratios[above]), below, above)
        if np.any(np.abs(observed - ratios[nearer]) > RATIO_TOLERANCE * np.abs(observed)):
            return None
        owners[g, ~zero] = members[order][nearer]
    return owners


def dot_test(vjp: Products, tangents: np.ndarray, products: np.ndarray, output_size: int, eps: float,
             seed: int) -> bool:
    """``<J^T u, t> = <u, J t>`` to rounding for two random ``u`` and every tangent ``t``: the products
    are the Jacobian the VJP implements (a backward pass not linear in its cotangent fails)."""
    u = np.random.default_rng(seed).standard_normal((2, output_size))
    pulled = vjp(u)
    # (k, 2) products, big operand first: OpenBLAS takes a very slow path for (2, n) @ (n, k)
    reverse = tangents @ pulled.T
    forward = products @ u.T
    size = np.abs(tangents) @ np.abs(pulled).T + np.abs(products) @ np.abs(u).T
    return bool(np.all(np.isfinite(reverse)) and np.all(np.abs(reverse - forward) <= agreement_bound(eps, size) + 1e-300))


def analytic_by_columns(products: Products, vjp: Products, x0: np.ndarray, leaves: Sequence[LeafSpec],
                        output_size: int, eps: float, seed: int, budget: int) -> Optional[ColumnAnalytic]:
    """The analytic side of ``leaves`` from at most ``budget`` column products ``J t`` (a dense
    Jacobian costs ``output_size`` VJPs; pass that as the budget), or None when that is not enough, when
    the products are unavailable, or when they disagree with the VJP.

    ``products`` raises the adapter's ModeUnsupportedError when it cannot transpose its VJP."""
    rng = np.random.default_rng(seed + 13)
    result = ColumnAnalytic()
    tangents_used: List[np.ndarray] = []
    products_used: List[np.ndarray] = []
    spent = 0
    for leaf in leaves:
        for description, groups in groupings(leaf):
            count = int(groups.max()) + 1 if leaf.size else 0
            plain = count == leaf.size
            cost = count if plain else 2 * count
            if spent + cost > budget:
                if plain:
                    return None
                continue
            scales = column_scales(rng, x0, leaf)
            first_t = np.zeros((count, len(x0)))
            first_t[groups, leaf.offset + np.arange(leaf.size)] = 1.0 if plain else scales
            first = products(first_t)
            spent += count
            if plain:
                result.blocks[leaf.name] = first.T
                result.strategy[leaf.name] = f"element by element, analytic from {count} transposed VJPs"
                tangents_used.append(first_t)
                products_used.append(first)
                break
            rho = rng.uniform(*RATIO_RANGE, size=leaf.size)
            second_t = np.zeros_like(first_t)
            second_t[groups, leaf.offset + np.arange(leaf.size)] = scales * rho
            second = products(second_t)
            spent += count
            owners = single_entry_rows(first, second, groups, rho)
            if owners is None:
                continue
            result.owners[leaf.name] = owners
            basis = first_t[:, leaf.slice]
            result.plans[leaf.name] = CompressedLeaf(basis, groups)
            result.blocks[leaf.name] = first.T
            tangents_used += [first_t, second_t]
            products_used += [first, second]
            result.strategy[leaf.name] = (f"{count} verified column groups ({description}), analytic from "
                                          f"{2 * count} transposed VJPs")
            result.notes.append(
                f"{leaf.name}: {leaf.size} elements in {count} group(s) ({description}); the analytic side of "
                f"each group from J t by the transposed VJP, its pattern (one nonzero per output row and group) "
                f"verified with {2 * count} such products, instead of {output_size} VJPs for the dense Jacobian")
            break
    if tangents_used and not dot_test(vjp, np.concatenate(tangents_used), np.concatenate(products_used),
                                      output_size, eps, seed + 17):
        return None
    return result
