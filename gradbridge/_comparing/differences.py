"""The pairwise rule of :func:`gradbridge.compare`: when two implementations' values or gradients agree.

Two entries agree when ``|a - b| <= atol + rtol * scale``, where ``scale`` is the larger magnitude of the two
plus :data:`LEAF_SCALE` times the largest entry of the same leaf plus :data:`GLOBAL_SCALE` times the largest
entry of the same quantity (so an entry that is zero up to cancellation is judged against the numbers it was
computed from). This is neither the verdict rule (``gradbridge/_checking/tolerance.py``) nor the internal
agreement rule (``gradbridge/_agreement.py``).
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from .._defaults import COMPARE_RTOL
from .._errors import InvalidArgumentError
from .result import PairDifference
from .runs import ImplementationRun
from .render import joined

#: Default relative tolerance of the pairwise comparison (float64 ports of the same math agree to ~1e-13).
DEFAULT_RTOL = COMPARE_RTOL  # from gradbridge._defaults
#: Share of the largest entry of the same leaf added to each entry's scale (entries near zero by cancellation).
LEAF_SCALE = 1e-2
#: Share of the largest entry of all leaves of the same quantity (a leaf that is zero up to round-off).
GLOBAL_SCALE = 1e-4
#: Most elements outside the tolerance listed per pair (the count is always complete).
OUTSIDE_LISTED = 20
# --- selection and pairwise differences ---

def select(wrt: Any, runs: Sequence[ImplementationRun], arg_names: Tuple[str, ...]) -> Optional[Set[str]]:
    """The common leaf names ``wrt`` selects (None: all)."""
    if wrt is None:
        return None
    entries = list(wrt) if isinstance(wrt, (list, tuple)) else [wrt]
    names = list(dict.fromkeys(n for r in runs for n in r.leaf_names))
    chosen: Set[str] = set()
    for entry in entries:
        if isinstance(entry, bool) or not isinstance(entry, (int, str)):
            raise InvalidArgumentError(f"wrt: expected argument positions (int) or leaf names (str), got {entry!r}")
        if isinstance(entry, int):
            if not 0 <= entry < len(arg_names):
                raise InvalidArgumentError(f"wrt: argument position {entry} is out of range ({len(arg_names)} "
                                           "positional argument(s))")
            entry = arg_names[entry]
        hits = [n for n in names if n == entry or n.startswith((entry + ".", entry + "["))]
        if not hits:
            raise InvalidArgumentError(f"wrt: {entry!r} selects nothing; the compared leaves are "
                                       f"{', '.join(names)}")
        chosen.update(hits)
    return chosen


def tolerances(rtol: Any, atol: Any) -> Tuple[float, float]:
    values = []
    for name, value, default in (("rtol", rtol, DEFAULT_RTOL), ("atol", atol, 0.0)):
        if value is None:
            values.append(default)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
            raise InvalidArgumentError(f"{name}: expected a non-negative finite number or None, got {value!r}")
        values.append(float(value))
    return values[0], values[1]


def describe_tolerance(rtol: float, atol: float) -> str:
    return (f"|a - b| <= atol + rtol * (max(|a|, |b|) + {LEAF_SCALE:g} * max|leaf| + {GLOBAL_SCALE:g} * max|all "
            f"leaves|), rtol = {rtol:g}, atol = {atol:g}")


def difference(first: np.ndarray, second: np.ndarray, rtol: float, atol: float, scale_all: float
               ) -> Tuple[float, float, float, bool, Tuple[int, ...], float, float, int, List[Tuple[int, ...]]]:
    """Compare two arrays under the pairwise rule.

    Returns (max |a-b|, max relative difference, allowed at the worst element, passed, worst index,
    a and b there, number of elements outside, the first of them). Non-finite entries agree only when equal.
    """
    a = np.asarray(first, dtype=np.float64)
    b = np.asarray(second, dtype=np.float64)
    if a.size == 0:
        return 0.0, 0.0, atol, True, (), 0.0, 0.0, 0, []
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(invalid="ignore"):
        diff = np.where(same, 0.0, np.abs(a - b))
    diff = np.where(np.isnan(diff), np.inf, diff)
    magnitude = np.maximum(np.abs(np.where(np.isfinite(a), a, 0.0)), np.abs(np.where(np.isfinite(b), b, 0.0)))
    scale = magnitude + LEAF_SCALE * float(magnitude.max()) + GLOBAL_SCALE * scale_all
    allowed = atol + rtol * scale
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(diff == 0, 0.0, diff / allowed)
        relative = np.where(diff == 0, 0.0, diff / scale)
    ratio = np.where(np.isnan(ratio), np.inf, ratio)
    flat = int(np.argmax(ratio))
    index = tuple(int(i) for i in np.unravel_index(flat, a.shape)) if a.shape else ()
    bad = np.argwhere(diff > allowed)
    listed = [tuple(int(i) for i in row) for row in bad[:OUTSIDE_LISTED]]
    return (float(diff.max()), float(np.nan_to_num(relative, nan=np.inf).max()), float(allowed.reshape(-1)[flat]),
            len(bad) == 0, index, float(a.reshape(-1)[flat]), float(b.reshape(-1)[flat]), len(bad), listed)


def _finite_max(arrays: Sequence[np.ndarray]) -> float:
    best = 0.0
    for array in arrays:
        finite = np.abs(array[np.isfinite(array)])
        if finite.size:
            best = max(best, float(finite.max()))
    return best


def leaf_order(runs: Sequence[ImplementationRun]) -> List[str]:
    """Every gradient leaf's common name, inputs first (in argument order), then parameters in the order the
    first implementation lists them."""
    names = list(dict.fromkeys(n for r in runs for n in r.gradients))
    params = {n for r in runs for n in r.binding.names.values()}
    return [n for n in names if n not in params] + [n for n in names if n in params]


def _pairs(runs: Sequence[ImplementationRun], selected: Optional[Set[str]], rtol: float, atol: float) -> List[PairDifference]:
    """Every pair of implementations: their common output values, then their common gradient leaves."""
    pairs = []
    order = leaf_order(runs)
    for one, other in itertools.combinations(runs, 2):
        for quantity, a_side, b_side, names in (
                ("value", one.values, other.values, one.output_order),
                ("gradient", one.gradients, other.gradients, order)):
            leaves = [n for n in names if n in a_side and n in b_side and a_side[n].shape == b_side[n].shape
                      and (quantity == "value" or selected is None or n in selected)]
            scale_all = _finite_max([a_side[n] for n in leaves] + [b_side[n] for n in leaves])
            for leaf in leaves:
                abs_diff, rel, allowed, ok, index, a, b, count, listed = difference(a_side[leaf], b_side[leaf], rtol,
                                                                                   atol, scale_all)
                pairs.append(PairDifference(one.entry.label, other.entry.label, quantity, leaf, abs_diff, rel,
                                            allowed, ok, index, a, b, tuple(a_side[leaf].shape), count, listed))
    return pairs


def conversion_notes(source: Set[str], params: Optional[Dict[str, np.ndarray]]) -> List[str]:
    given = f"{' and '.join(sorted(source))} arrays" if source else "Python values"
    return [f"every implementation ran in float64 at the same point: inputs{' and params' if params else ''} "
            f"given as {given}, converted to float64 NumPy once, then to each framework's arrays"]


def coverage_notes(runs: Sequence[ImplementationRun], selected: Optional[Set[str]]) -> List[str]:
    """Leaves that only some implementations differentiate (compared among those only)."""
    notes = []
    for name in leaf_order(runs):
        if selected is not None and name not in selected:
            continue
        having = [r.entry.label for r in runs if name in r.gradients]
        if len(having) < len(runs):
            lacking = [r.entry.label for r in runs if name not in r.gradients]
            why = (f"{joined(lacking)} {'holds' if len(lacking) == 1 else 'hold'} it fixed (a buffer, a frozen "
                   f"parameter, a non-floating value) or {'does' if len(lacking) == 1 else 'do'} not take it")
            if len(having) == 1:
                notes.append(f"the gradient of {name!r} is not compared: only {having[0]} differentiates it; {why}")
            else:
                notes.append(f"the gradient of {name!r} is compared among {joined(having)} only: {why}")
    return notes
