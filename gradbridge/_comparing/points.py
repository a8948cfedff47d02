"""More than one point: the comparison repeated at a few points drawn around the given one.

A port can agree at the given inputs and differ elsewhere (a bug that shows only at large inputs: an overflow, a
clamp, a branch, a different approximation). After the comparison at the given point, every implementation is
evaluated and differentiated again, with the same cotangent, at ``points - 1`` more points, and its precision is
measured there as at the first: the inputs (never the parameters) are moved element by element to
``x * exp(s * z)``, ``z`` standard normal from the comparison's seed, ``s`` cycling through :data:`DRAWS`, so
signs, zeros (masks, padding) and the domain of ``log`` or ``sqrt`` are kept while magnitudes change by factors up
to ``exp(2 s)`` or so; every second point moves outward only (``|z|``: every magnitude grows), where bugs of
large inputs live; an input that is zero everywhere moves by ``s * z`` instead.

Invariant: every implementation sees exactly the same inputs at each point, its ``x0`` is put back whatever
happens, and a point where an implementation cannot run is skipped with a note, never counted as a disagreement.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from .._errors import GradbridgeError
from .runs import ImplementationRun, evaluate_run, gradient_run, measure_precision

#: ``(s, outward)`` of each extra point in turn (cycling): around the given point, then outward (``|z|``), then
#: further around. Measured on inputs uniform in (-1.9, 1.9) (20 elements, 200 seeds) with a port that clamps at c:
#: two extra points catch c = 3 in 94% of draws and c = 4 in 85% (80% and 59% with all three around the point).
DRAWS = ((0.5, False), (1.0, True), (2.0, False))


def moved(value: np.ndarray, point: int, seed: int, name: str) -> np.ndarray:
    """The input leaf ``name`` at extra point ``point`` (1, 2, ...)."""
    spread, outward = DRAWS[(point - 1) % len(DRAWS)]
    rng = np.random.default_rng([seed, 17, point, zlib.crc32(name.encode())])
    z = rng.standard_normal(value.shape)
    if outward:
        z = np.abs(z)
    if not np.any(value):
        return value + spread * z
    return value * np.exp(spread * z)


def movable_inputs(runs: Sequence[ImplementationRun], arg_names: Sequence[str], selected: Optional[Set[str]]
                   ) -> Set[str]:
    """The common names of the input leaves the points move: leaves of the user's positional arguments (never a
    module's or model's own parameters, never ``params``), among those ``wrt`` selects, whose values are not all
    whole numbers at the given point (masks, one-hot targets, counts keep their values)."""
    found: Set[str] = set()
    for run in runs:
        for leaf in run.prepared.leaves:
            name = run.common(leaf)
            if not any(name == a or name.startswith((a + "[", a + ".")) for a in arg_names):
                continue
            if selected is not None and name not in selected:
                continue
            value = run.prepared.x0[leaf.slice]
            if value.size and np.all(np.isfinite(value)) and np.all(value == np.round(value)):
                continue
            found.add(name)
    return found


def became_non_finite(given: Sequence[ImplementationRun], moved_runs: Sequence[ImplementationRun]) -> List[str]:
    """``label: what`` for each implementation whose outputs or gradients are finite at the given point and not at
    the moved one (the inputs left the function's domain: acos beyond 1, log below 0)."""
    found = []
    for before, after in zip(given, moved_runs):
        for kind, old, new in (("outputs", before.values, after.values), ("gradients", before.gradients, after.gradients)):
            bad = [n for n in new if n in old and np.all(np.isfinite(old[n])) and not np.all(np.isfinite(new[n]))]
            if bad:
                found.append(f"{after.entry.label}'s {kind} {', '.join(repr(n) for n in bad[:3])}")
    return found


def describe(points: int, seed: int) -> str:
    """The note saying where the implementations were compared."""
    spreads = []
    for k in range(1, points):
        spread, outward = DRAWS[(k - 1) % len(DRAWS)]
        spreads.append(f"{spread:g} outward (|z|)" if outward else f"{spread:g}")
    spread_list = ", ".join(spreads)
    return (f"compared at {points} points: the given one and {points - 1} drawn around it (each input element x "
            f"moved to x * exp(s z), z standard normal, seed {seed}; s = {spread_list}; parameters, inputs left out "
            "by wrt= and inputs of whole numbers (masks, one-hot targets) as given)")


def runs_at(point: int, runs: Sequence[ImplementationRun], inputs: Set[str], seed: int, cotangents: Dict[str, np.ndarray],
            conversions: Tuple[Dict[str, Any], Callable[[ImplementationRun], None], Callable[[ImplementationRun], None]],
            drawn: Dict[str, np.ndarray]
            ) -> Tuple[Optional[List[ImplementationRun]], Optional[str]]:
    """Every implementation evaluated, differentiated and measured at extra point ``point``; or None and why not.

    ``inputs``: the common names of the input leaves to move; ``conversions``: each label's layout arranger, and
    the functions turning a run's values, then its gradients and magnitudes, to the common names and layouts (as at
    the given point); ``drawn`` receives the inputs there (common layout)."""
    arrangers, common_values, finish = conversions
    moved_runs: List[ImplementationRun] = []
    saved = [np.array(run.prepared.x0, copy=True) for run in runs]
    try:
        for run in runs:
            x = np.array(run.prepared.x0, dtype=np.float64, copy=True)
            arranger = arrangers[run.entry.label]
            for leaf in run.prepared.leaves:
                name = run.common(leaf)
                if name in inputs:  # drawn in the common layout, so every implementation gets the same point
                    common = moved(arranger.input_from(name, x[leaf.slice].reshape(leaf.shape)), point, seed, name)
                    x[leaf.slice] = arranger.input_to(name, common).reshape(-1)
                    if not moved_runs:
                        drawn[name] = common
            run.prepared.x0 = x
            at = dataclasses.replace(run, values={}, output_order=[], gradients={}, precision=None)
            evaluate_run(at, None)
            common_values(at)
            gradient_run(at, cotangents[run.entry.label], None)
            measure_precision(at, cotangents[run.entry.label], seed)
            finish(at)
            moved_runs.append(at)
    except (GradbridgeError, ArithmeticError, ValueError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"point {point + 1} skipped: {text}"
    finally:
        for run, x0 in zip(runs, saved):
            run.prepared.x0 = x0
    outside = became_non_finite(runs, moved_runs)
    if outside:
        return None, (f"point {point + 1} skipped: {'; '.join(outside)} are not finite there but were at the given "
                      "point (inputs outside the function's domain?)")
    return moved_runs, None
