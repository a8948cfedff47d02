"""What JAX can differentiate: the errors meaning "no derivative rule", and symbolic zeros found in a jaxpr.

Invariant: a leaf is reported as having no derivative only where JAX itself says so (an error naming a missing
differentiation or transpose rule, matched by the texts below) or where the derivative JAX builds depends on
none of the map's inputs (a symbolic zero); any other error out of the user's function or rules is re-raised
unchanged, so a broken rule is reported as broken, never as "no gradient". The compiled path
(:mod:`.compiled`) and the eager path (:mod:`.eager`) both decide with these functions, so they agree.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, FrozenSet, List, Sequence, Tuple

import jax

from gradbridge._errors import GradbridgeError, ModeUnsupportedError

from .compat import CALL_PRIMITIVES, Literal

#: Substrings of JAX errors meaning "this input has no derivative rule" (not a bug in the user's rule).
NO_DERIVATIVE_HINTS = ("differentiation rule for", "transpose rule", "do not support jvp", "does not support jvp",
                       "reverse-mode differentiation does not work", "does not support reverse-mode")
#: Substrings of JAX errors meaning "forward mode is not available for this function".
FORWARD_UNSUPPORTED_HINTS = ("forward-mode autodiff (jvp) to a custom_vjp",)

SYMBOLIC_ZERO = ("JAX's derivative for it is a symbolic zero: fn does not depend on it differentiably "
                 "(jax.lax.stop_gradient, an unused input, or a custom rule returning None/zeros)")

LinearMap = Tuple[List[int], Callable[..., Any]]  # (indices of the leaves it takes or returns, the map)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def mentions(exc: BaseException, hints: Sequence[str]) -> bool:
    return not isinstance(exc, GradbridgeError) and any(hint in str(exc).lower() for hint in hints)


def reraise_unless_no_derivative(exc: Exception, mode: str) -> None:
    """Called in an ``except`` block while building a derivative map: return only when ``exc`` says JAX has
    no derivative rule for some input; raise ModeUnsupportedError for forward mode on a custom_vjp
    function; re-raise anything else (the user's rule or function is broken: the core reports it)."""
    if mode == "fwd" and mentions(exc, FORWARD_UNSUPPORTED_HINTS):
        raise ModeUnsupportedError(f"forward mode unsupported: {first_line(exc)} "
                                   "(a jax.custom_vjp function defines reverse mode only)") from exc
    if not mentions(exc, NO_DERIVATIVE_HINTS):
        raise exc


def dependencies(jaxpr: Any) -> List[FrozenSet[int]]:
    """For each output of ``jaxpr``, the indices of the inputs it depends on.

    Conservative: an equation's outputs depend on all its inputs, except calls of jit-compiled
    sub-jaxprs, which are followed inside. An output with no input dependency is a constant of the
    map: with a linear map, a (symbolic) zero.
    """
    deps: Dict[Any, FrozenSet[int]] = {v: frozenset([i]) for i, v in enumerate(jaxpr.invars)}

    def read(v: Any) -> FrozenSet[int]:
        return frozenset() if isinstance(v, Literal) else deps.get(v, frozenset())

    for eqn in jaxpr.eqns:
        inputs = [read(v) for v in eqn.invars]
        inner = eqn.params.get("jaxpr") if eqn.primitive.name in CALL_PRIMITIVES else None
        inner = getattr(inner, "jaxpr", inner)  # ClosedJaxpr -> Jaxpr
        if inner is not None and len(inner.invars) == len(inputs) and len(inner.outvars) == len(eqn.outvars):
            outputs = [frozenset().union(*(inputs[j] for j in d)) for d in dependencies(inner)]
        else:
            union = frozenset().union(*inputs)
            outputs = [union] * len(eqn.outvars)
        for v, d in zip(eqn.outvars, outputs):
            deps[v] = d
    return [read(v) for v in jaxpr.outvars]


def restricted(function: Callable[..., jax.Array], indices: List[int], parts0: Sequence[jax.Array],
               dyn: Any) -> Callable[..., jax.Array]:
    """``function(parts, dyn)`` as a function of the leaves ``indices`` only, the others fixed at ``parts0``."""

    def g(*sub: jax.Array) -> jax.Array:
        parts = list(parts0)
        for k, s in zip(indices, sub):
            parts[k] = s
        return function(parts, dyn)
    return g
