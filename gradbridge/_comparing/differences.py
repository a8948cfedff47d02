"""The pairwise rule of :func:`gradbridge.compare`: when two implementations' values or gradients agree.

Two entries ``a`` and ``b`` (the same output or gradient entry of two implementations) agree when::

    |a - b| <= atol + rtol * (m + 1e-2 * max m of the leaf + 1e-4 * max m of all leaves of the quantity)
    m = max(|a|, |b|, r_a, r_b)
    rtol = 16 * max(eps_a, eps_b, sqrt(float64 eps))   (default; the user's rtol and atol exactly when given)

``eps_a`` is the machine epsilon of the precision implementation a really computes in (its adapter's working
precision, its outputs' dtypes, or measured: outputs that do not move in proportion when every input moves by a
small fraction of a float32 rounding come from a computation that rounds to float32 inside). ``r_a`` is the
magnitude the entry is computed from, measured in that implementation as how far the entry moves when every
input moves by one of its roundings, divided by that relative move
(:func:`gradbridge._comparing.runs.measure_precision`): it carries the entry's conditioning, and is the scale of
an entry that is zero only by cancellation (KL(p||p), a reconstruction residual). ``sqrt(float64 eps)`` = 1.5e-8
is the accuracy float64 ports can be expected to share, since float64 library functions are not all correctly
rounded (TensorFlow's float64 exact GELU is ~5e-9 off); :data:`SAFETY` = 16 covers the accumulation of round-off
over the computation. So rtol is 2.4e-7 between float64 ports and 1.9e-6 with a side in float32, while porting
bugs show at relative differences of 1e-4 and more. This is neither the verdict rule
(``gradbridge/_checking/tolerance.py``) nor the internal agreement rule (``gradbridge/_agreement.py``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from .._checking.finite_diff import precision_name
from .._errors import InvalidArgumentError
from .._precision import FLOAT64_EPS
from .result import PairDifference
from .runs import PERTURBATION_ULPS, ImplementationRun
from .render import joined

#: Factor over the coarser precision of a pair (round-off accumulates over the computation).
SAFETY = 16
#: The relative accuracy float64 ports of the same math can be expected to share: sqrt(float64 eps), 1.5e-8
#: (float64 library functions are not all correctly rounded: TensorFlow's exact GELU is ~5e-9 off).
FLOAT64_ACCURACY = math.sqrt(FLOAT64_EPS)
#: Share of the largest magnitude of the same leaf added to each entry's scale (entries near zero by cancellation).
LEAF_SCALE = 1e-2
#: The same share where one side computes below float64: its entries are judged against the leaf's largest entry
#: (normwise). Float32 library functions are not all correctly rounded either, and an entry computed by
#: cancellation carries a rounding of the numbers it came from: XLA's float32 tanh is exactly 1 from |x| ~ 8, so
#: 1 - tanh(x)^2 there is 0 instead of 2e-7, and the gradient it scales is off by a float32 rounding of the leaf's
#: scale, where the measured magnitude cannot see it (the function is flat there).
LOW_PRECISION_LEAF_SCALE = 1.0
#: Share of the largest magnitude of all leaves of the same quantity (a leaf that is zero up to round-off).
GLOBAL_SCALE = 1e-4
#: Most elements outside the tolerance listed per pair (the count is always complete).
OUTSIDE_LISTED = 20


@dataclass(frozen=True)
class PairTolerance:
    """The constants of the pairwise rule for one pair, and the rule that decided them, in words."""

    rtol: float
    atol: float
    rule: str
    atol_given: bool = False
    leaf_scale: float = LEAF_SCALE


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


def tolerances(rtol: Any, atol: Any) -> Tuple[Optional[float], Optional[float]]:
    """The user's rtol and atol, validated (None: derived per pair, see :func:`pair_tolerance`)."""
    values: List[Optional[float]] = []
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not np.isfinite(value) or value < 0):
            raise InvalidArgumentError(f"{name}: expected a non-negative finite number or None, got {value!r}")
        values.append(None if value is None else float(value))
    return values[0], values[1]


def pair_tolerance(one: ImplementationRun, other: ImplementationRun, rtol: Optional[float],
                   atol: Optional[float]) -> PairTolerance:
    """rtol and atol for one pair: the user's exactly when given; else rtol follows the coarser precision the two
    really compute in (never below the accuracy float64 ports share) and atol is 0."""
    atol_value, given = (0.0, False) if atol is None else (atol, True)
    if rtol is not None:
        return PairTolerance(rtol, atol_value, "as given", given)
    sides = [(run.entry.label, run.precision.eps if run.precision is not None else FLOAT64_EPS)
             for run in (one, other)]
    eps = max(e for _, e in sides)
    if eps > FLOAT64_ACCURACY:
        coarse = [label for label, e in sides if e == eps]
        name = precision_name(eps)
        return PairTolerance(SAFETY * eps, atol_value,
                             f"{SAFETY} x eps of {name} ({eps:.2g}): {joined(coarse)} "
                             f"{'computes' if len(coarse) == 1 else 'compute'} in {name}; with "
                             f"{LOW_PRECISION_LEAF_SCALE:g} x max m of the leaf in place of {LEAF_SCALE:g} x, as {name} "
                             "library functions are not all correctly rounded", given, LOW_PRECISION_LEAF_SCALE)
    return PairTolerance(SAFETY * FLOAT64_ACCURACY, atol_value,
                         f"{SAFETY} x {FLOAT64_ACCURACY:.2g}: both compute in float64, where ports of the same math "
                         f"agree to about sqrt(float64 eps) = {FLOAT64_ACCURACY:.2g}, as float64 library functions are "
                         "not all correctly rounded", given)


def describe_tolerance(tolerances: Dict[Tuple[str, str], PairTolerance]) -> str:
    """The rule in force and, per group of pairs with the same constants, rtol and what decided it."""
    groups: Dict[Tuple[float, str], List[str]] = {}
    for (first, second), tolerance in tolerances.items():
        groups.setdefault((tolerance.rtol, tolerance.rule), []).append(f"{first} vs {second}")
    parts = []
    for (rtol, rule), pairs in groups.items():
        which = "" if len(groups) == 1 else f" for {', '.join(pairs)}"
        parts.append(f"rtol = {rtol:.3g}{which} ({rule})")
    atols = sorted({t.atol for t in tolerances.values()})
    given = any(t.atol_given for t in tolerances.values())
    parts.append(f"atol = {', '.join(f'{a:.3g}' for a in atols) or '0'}{' (as given)' if given else ''}")
    return (f"|a - b| <= atol + rtol * (m + {LEAF_SCALE:g} * max m of the leaf + {GLOBAL_SCALE:g} * max m of all "
            f"leaves), m = max(|a|, |b|, the magnitude each side computes the entry from, measured by moving every "
            f"input by {PERTURBATION_ULPS} rounding{'s' if PERTURBATION_ULPS != 1 else ''}); " + "; ".join(parts))


def magnitudes(first: np.ndarray, second: np.ndarray, measured: Sequence[Optional[np.ndarray]]) -> np.ndarray:
    """``m`` per entry: the larger of ``|a|``, ``|b|`` and each side's measured magnitude (finite parts only)."""
    m = np.zeros(np.shape(first))
    for array in (first, second, *measured):
        if array is None or np.shape(array) != np.shape(first):
            continue
        values = np.abs(np.asarray(array, dtype=np.float64))
        m = np.maximum(m, np.where(np.isfinite(values), values, 0.0))
    return m


def difference(first: np.ndarray, second: np.ndarray, rtol: float, atol: float, scale_all: float,
               magnitude: Optional[np.ndarray] = None, leaf_scale: float = LEAF_SCALE
               ) -> Tuple[float, float, float, bool, Tuple[int, ...], float, float, int, List[Tuple[int, ...]]]:
    """Compare two arrays under the pairwise rule (``magnitude``: ``m`` per entry, default ``max(|a|, |b|)``;
    ``scale_all``: the largest ``m`` of all leaves of the quantity).

    Returns (max |a-b|, max relative difference, allowed at the worst element, passed, worst index,
    a and b there, number of elements outside, the first of them). Non-finite entries agree only when equal.
    The relative difference is ``|a - b|`` over ``max(|a|, |b|)`` plus the rule's two near-zero terms: relative
    to the entries themselves, so it can exceed rtol at an entry whose measured magnitude exceeds its size.
    """
    a = np.asarray(first, dtype=np.float64)
    b = np.asarray(second, dtype=np.float64)
    if a.size == 0:
        return 0.0, 0.0, atol, True, (), 0.0, 0.0, 0, []
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(invalid="ignore"):
        diff = np.where(same, 0.0, np.abs(a - b))
    diff = np.where(np.isnan(diff), np.inf, diff)
    size = magnitudes(a, b, [])
    m = size if magnitude is None else np.maximum(magnitude, size)
    floor = leaf_scale * float(m.max()) + GLOBAL_SCALE * scale_all
    allowed = atol + rtol * (m + floor)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(diff == 0, 0.0, diff / allowed)
        relative = np.where(diff == 0, 0.0, diff / (size + floor))  # relative to the entries, as users read it
    ratio = np.where(np.isnan(ratio), np.inf, ratio)
    flat = int(np.argmax(ratio))
    index = tuple(int(i) for i in np.unravel_index(flat, a.shape)) if a.shape else ()
    bad = np.argwhere(diff > allowed)
    listed = [tuple(int(i) for i in row) for row in bad[:OUTSIDE_LISTED]]
    return (float(diff.max()), float(np.nan_to_num(relative, nan=np.inf, posinf=np.inf).max()), float(allowed.reshape(-1)[flat]),
            len(bad) == 0, index, float(a.reshape(-1)[flat]), float(b.reshape(-1)[flat]), len(bad), listed)


def leaf_order(runs: Sequence[ImplementationRun]) -> List[str]:
    """Every gradient leaf's common name, inputs first (in argument order), then parameters in the order the
    first implementation lists them."""
    names = list(dict.fromkeys(n for r in runs for n in r.gradients))
    params = {n for r in runs for n in r.binding.names.values()}
    return [n for n in names if n not in params] + [n for n in names if n in params]


def _measured(run: ImplementationRun, quantity: str, leaf: str) -> Optional[np.ndarray]:
    if run.precision is None:
        return None
    return (run.precision.values if quantity == "value" else run.precision.gradients).get(leaf)


def _pairs(runs: Sequence[ImplementationRun], selected: Optional[Set[str]], rtol: Optional[float],
           atol: Optional[float]) -> Tuple[List[PairDifference], Dict[Tuple[str, str], PairTolerance]]:
    """Every pair of implementations: their common output values, then their common gradient leaves, by name;
    and each pair's tolerance."""
    pairs = []
    tolerances: Dict[Tuple[str, str], PairTolerance] = {}
    order = leaf_order(runs)
    for one, other in itertools.combinations(runs, 2):
        tolerance = tolerances[(one.entry.label, other.entry.label)] = pair_tolerance(one, other, rtol, atol)
        for quantity, a_side, b_side, names in (
                ("value", one.values, other.values, one.output_order),
                ("gradient", one.gradients, other.gradients, order)):
            leaves = [n for n in names if n in a_side and n in b_side and a_side[n].shape == b_side[n].shape
                      and (quantity == "value" or selected is None or n in selected)]
            m = {n: magnitudes(a_side[n], b_side[n], [_measured(one, quantity, n), _measured(other, quantity, n)])
                 for n in leaves}
            scale_all = max((float(v.max()) for v in m.values() if v.size), default=0.0)
            for leaf in leaves:
                abs_diff, rel, allowed, ok, index, a, b, count, listed = difference(
                    a_side[leaf], b_side[leaf], tolerance.rtol, tolerance.atol, scale_all, m[leaf], tolerance.leaf_scale)
                pairs.append(PairDifference(one.entry.label, other.entry.label, quantity, leaf, abs_diff, rel,
                                            allowed, ok, index, a, b, tuple(a_side[leaf].shape), count, listed,
                                            rtol=tolerance.rtol))
    return pairs, tolerances


def conversion_notes(source: Set[str], params: Optional[Dict[str, np.ndarray]],
                     runs: Sequence[ImplementationRun] = ()) -> List[str]:
    """How the inputs reached the implementations, and the precision each one really computed in."""
    given = f"{' and '.join(sorted(source))} arrays" if source else "Python values"
    how = (f"inputs{' and params' if params else ''} given as {given}, converted to float64 NumPy once, then to "
           "each framework's arrays")
    lower = [r for r in runs if r.precision is not None and r.precision.eps > FLOAT64_EPS]
    notes = []
    if not lower:
        notes.append(f"every implementation ran in float64 at the same point: {how}")
    else:
        exact = [r.entry.label for r in runs if r not in lower]
        groups: Dict[Tuple[str, Optional[str]], List[str]] = {}
        for r in lower:
            groups.setdefault((r.precision.name, r.precision.reason), []).append(r.entry.label)
        said = [f"{joined(labels)} in {name} ({reason})" for (name, reason), labels in groups.items()]
        labels = joined([r.entry.label for r in lower])
        notes.append(f"every implementation got the same float64 point ({how}), but not all computed in float64: "
                     + (f"{joined(exact)} in float64, " if exact else "") + "; ".join(said)
                     + f"; the tolerance of the pairs with {labels} follows that precision")
    notes.extend(f"{r.entry.label}: {r.precision.problem}; its entries are judged by their own sizes"
                 for r in runs if r.precision is not None and r.precision.problem)
    return notes


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
