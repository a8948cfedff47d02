"""The transposed VJP: ``J t`` by transposing JAX's reverse-mode derivative ``u -> J^T u`` at the checked point.

Invariant: the ``J`` of every product is exactly the Jacobian the VJP implements (the user's custom_vjp bwd rules
included), never a forward-mode rule: each product is ``jax.linear_transpose`` of the very VJP map of its leaf
group (the same groups as the VJP's, so leaves JAX cannot differentiate are left out as the VJP leaves them out);
where JAX cannot transpose the VJP (a bwd not linear in its cotangent, a pure_callback applied to it) the answer is
ModeUnsupportedError, found when the maps are built, never a wrong number. The compiled path traces the transposed
maps once per cache entry (:func:`build_transposed`); the eager path transposes its own VJP closures
(:func:`transpose_pullbacks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from gradbridge._adapter import LeafSpec
from gradbridge._errors import GradbridgeError

from .derivatives import LinearMap, first_line, restricted

if TYPE_CHECKING:  # pragma: no cover
    from .compiled import Compiled, LinearPlan

_TRANSPOSED = "the transposed VJP (J t, by transposing JAX's reverse-mode derivative) "


def not_transposable(exc: BaseException) -> str:
    """Why ``jax.linear_transpose`` of the VJP failed, for a ModeUnsupportedError (JAX's own error is an
    AssertionError or a ValueError deep in its transpose rules)."""
    return (_TRANSPOSED + "is unavailable: JAX cannot transpose the VJP of fn, so a custom_vjp bwd (or another "
            "derivative rule) is not linear in its cotangent or applies an operation without a transpose rule "
            f"to it (jax.pure_callback, a while_loop, a comparison or product of cotangents) ({first_line(exc)})")


def apply_transposed(transposed: Callable[..., Any], *tangents: jax.Array) -> jax.Array:
    """``J t`` from a ``jax.linear_transpose``d VJP and one tangent per leaf of its group."""
    return transposed(tuple(tangents))[0]


def transposed_single(function: Callable[..., jax.Array], indices: List[int]) -> Callable[..., jax.Array]:
    """``(parts0, dyn, *tangents) -> J t`` for one tangent per leaf in ``indices``: the VJP ``u -> J^T u`` of
    ``function`` at ``parts0`` transposed with ``jax.linear_transpose``, so ``J`` is the one the VJP (the
    user's custom_vjp bwd) implements, never a forward-mode rule."""

    def single(parts0: Sequence[jax.Array], dyn: Any, *tangents: jax.Array) -> jax.Array:
        out, pullback = jax.vjp(restricted(function, indices, parts0, dyn), *[parts0[k] for k in indices])
        return jax.linear_transpose(pullback, out)(tuple(tangents))[0]
    return single


@dataclass
class TransposedPlan:
    """The transposed VJP maps of one entry or one check, one per map of its VJP (the same leaf groups), or
    why JAX cannot transpose the VJP (kept as text: the cache holds no traceback and no user array)."""

    maps: List[Tuple[List[int], Callable[..., Any]]]  # (leaf indices, batched map or transposed VJP)
    error: Optional[str] = None


def build_transposed(entry: "Compiled", plan: "LinearPlan", parts0: List[jax.Array], dyn: Any) -> TransposedPlan:
    """Trace the transposed map of each leaf group of ``plan`` (transposition errors surface while tracing)."""
    maps: List[Tuple[List[int], Callable[..., Any]]] = []
    for indices, _, _ in plan.maps:
        single = transposed_single(entry.function, indices)
        try:
            jax.make_jaxpr(single)(parts0, dyn, *[jnp.zeros_like(parts0[k]) for k in indices])
        except GradbridgeError:
            raise
        except Exception as exc:
            return TransposedPlan([], not_transposable(exc))
        maps.append((indices, jax.jit(jax.vmap(single, in_axes=(None, None) + (0,) * len(indices)))))
    return TransposedPlan(maps)


def transpose_pullbacks(pullbacks: List[LinearMap], leaves: Sequence[LeafSpec], output_size: int,
                        dtype: Any) -> TransposedPlan:
    """``jax.linear_transpose`` of each VJP map of the eager path, applied once to zero tangents (JAX raises
    only when a transposed map is applied)."""
    cotangent = jax.ShapeDtypeStruct((output_size,), dtype)
    maps: List[Tuple[List[int], Callable[..., Any]]] = []
    for indices, pullback in pullbacks:
        zeros = tuple(jnp.zeros(leaves[k].shape, dtype=dtype) for k in indices)
        try:
            transposed = jax.linear_transpose(pullback, cotangent)
            transposed(zeros)
        except GradbridgeError:
            raise
        except Exception as exc:
            return TransposedPlan([], not_transposable(exc))
        maps.append((indices, transposed))
    return TransposedPlan(maps)
