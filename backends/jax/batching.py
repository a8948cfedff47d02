"""Batched or one at a time: the decisions of one check (``PathChoice``) and the batched runs they guard.

Invariant: a computation runs batched (``jax.jit(jax.vmap(...))`` of the very function the loop calls, point by
point or vector by vector) until that raises once; from then on it runs the loop for the rest of the check, which
computes and reports the numbers (what fn raises there is what the check reports), and the decision is said once
in the notes. A batched run that raises never decides a verdict. Each decision is a
:class:`backends.common.batching.PathChoice`, one per computation:

* ``compiled``: the compiled path (:mod:`.compiled`, traced once and kept across checks) or the eager path for
  good, because fn keeps state (it leaves tracers in its objects under a trace, :mod:`.state`): said with the
  reason;
* ``evaluate``: the eager path's evaluations batched, or point by point once ``jax.jit(jax.vmap(fn))`` raised;
* ``derivatives``: the eager path's VJP, JVP and transposed maps applied batched, or vector by vector once that
  raised (one decision for the three, as they apply maps of the same derivative of fn).

Only the loop is ever said (the batched path is the default and says nothing, as the JAX backend always did).
Unlike the vectorized paths of other frameworks, ``jax.vmap`` is JAX's own batching of the same traced function,
not a different computation, so it is not compared with the loop on a first chunk (which would re-run fn eagerly
point by point in every check): a batched run that raises is the only reason to leave it.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gradbridge._errors import GradbridgeError

from ..common.batching import PathChoice, path_choices
from .derivatives import first_line

COMPILED, EVALUATE, DERIVATIVES = "compiled", "evaluate", "derivatives"


def choices(notes: List[str]) -> Dict[str, PathChoice]:
    """The three decisions of one prepared function, saying the loop in ``notes``."""
    return path_choices(notes, {
        COMPILED: lambda _: "fn is traced and compiled once (jax.jit(jax.vmap(...))), kept across checks",
        EVALUATE: lambda largest: f"fn evaluated with jax.jit(jax.vmap(fn)), up to {largest} points at once",
        DERIVATIVES: lambda largest: f"derivatives applied with jax.jit(jax.vmap(...)), up to {largest} at once",
    })


def apply_vmapped(function: Callable[..., Any], *batched: Any) -> Any:
    """``function`` applied to each row of the ``batched`` arrays (``function`` may be a pytree, e.g. a VJP)."""
    return jax.vmap(function)(*batched)


def evaluate_batched(choice: PathChoice, batched: Callable[[jax.Array], jax.Array], x: jax.Array,
                     reseed: Callable[[], None]) -> Optional[np.ndarray]:
    """``batched(x)`` (every point at once), or None once that raised (the loop then runs, and says why)."""
    if choice.looped:
        return None
    try:
        reseed()
        return np.asarray(batched(x), dtype=np.float64)
    except GradbridgeError:
        raise
    except Exception as exc:  # not traceable under jit/vmap: fall back to plain calls, which may work
        choice.use_loop(f"fn could not run under jax.jit(jax.vmap(...)) ({first_line(exc)}); "
                        "it is evaluated point by point")
        return None


def apply_batched(choice: PathChoice, apply: Callable[..., Any], function: Callable[..., Any],
                  *batched: jax.Array) -> Any:
    """``function`` on every row of ``batched``: ``apply`` (jit + vmap); vector by vector once that raised."""
    if not choice.looped:
        try:
            return apply(function, *batched)
        except GradbridgeError:
            raise
        except Exception as exc:
            choice.use_loop(f"the derivative of fn could not run under jax.jit(jax.vmap(...)) ({first_line(exc)}); "
                            "it is applied vector by vector")
    results = [function(*(b[i] for b in batched)) for i in range(len(batched[0]))]
    return jax.tree_util.tree_map(lambda *rows: jnp.stack(rows), *results)
