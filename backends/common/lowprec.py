"""Shared by the adapters: what ``promote=False`` (a check in the arrays' own dtypes) tells the core and the user.

No framework is imported here. With ``promote=False`` each adapter keeps every floating leaf in its own
dtype; the core rounds the points it evaluates to those dtypes and takes its steps and tolerances from
``prepared.working_eps``, the coarsest machine epsilon among the checked leaves' dtypes, which
:func:`own_precision` computes together with the note the report shows.

With ``promote=True`` (the default) a function that only runs in its arrays' own dtypes (a custom
float32 kernel) raises on the float64 copies; :func:`promotion_hint` says what to do instead.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from gradbridge._adapter import LeafSpec
from gradbridge._precision import FLOAT64_EPS, dtype_name, eps_of

LOW_PRECISIONS = ("float32", "float16", "bfloat16")


def _listed(leaves: Sequence[LeafSpec], limit: int = 8) -> str:
    items = [f"{leaf.name}: {dtype_name(leaf.dtype)}" for leaf in leaves[:limit]]
    if len(leaves) > limit:
        items.append(f"... and {len(leaves) - limit} more")
    return ", ".join(items)


def own_precision(leaves: Sequence[LeafSpec], outputs: Sequence[LeafSpec] = ()) -> Tuple[float, Optional[str]]:
    """``(working_eps, note)`` for a check without promotion.

    ``working_eps`` is the coarsest machine epsilon among the checked leaves' dtypes (float64's when all
    are float64). ``note`` names each leaf's dtype and the precision the steps and tolerances follow (the
    core also takes the outputs' dtypes into account: pass ``outputs`` once known and the note says when
    an output is coarser than every leaf); ``None`` when leaves and outputs are all float64.
    """
    working = max([FLOAT64_EPS] + [eps_of(leaf.dtype) for leaf in leaves])
    overall = max([working] + [eps_of(spec.dtype) for spec in outputs])
    if overall == FLOAT64_EPS:
        return FLOAT64_EPS, None
    if overall > working:
        coarse = [spec for spec in outputs if eps_of(spec.dtype) == overall]
        follow = (f"{dtype_name(coarse[0].dtype)}, the dtype fn returns "
                  f"{', '.join(spec.name for spec in coarse)} in")
    else:
        follow = next(dtype_name(leaf.dtype) for leaf in leaves if eps_of(leaf.dtype) == working)
    note = (f"promote=False: checked in the arrays' own dtypes ({_listed(leaves)}); "
            f"steps and tolerances follow {follow}")
    return working, note


def refresh_note(notes: List[str], leaves: Sequence[LeafSpec], outputs: Sequence[LeafSpec]) -> None:
    """Replace the ``promote=False`` note in ``notes`` by one that knows the outputs' dtypes (in place)."""
    _, note = own_precision(leaves, outputs)
    kept = [n for n in notes if not n.startswith("promote=False:")]
    notes[:] = ([note] if note else []) + kept


def low_precision_names(named_dtypes: Sequence[Tuple[str, str]]) -> str:
    """``"x (float32), w (bfloat16)"`` for the given (name, dtype) pairs below float64 (empty if none)."""
    low = [(name, dtype_name(dtype)) for name, dtype in named_dtypes if dtype_name(dtype) in LOW_PRECISIONS]
    return ", ".join(f"{name} ({dtype})" for name, dtype in low)


def promotion_hint(low: str) -> str:
    """What to tell the user when ``fn`` fails on the float64 copies of arrays it was given in low precision."""
    return (f"The check ran fn on float64 copies of {low}; if fn only runs in its arrays' own dtypes "
            "(a float32 or bfloat16 kernel, say), check it with promote=False: the check then runs in those "
            "dtypes, with steps and tolerances for that precision")
