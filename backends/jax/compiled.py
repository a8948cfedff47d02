"""The compiled path: ``jax.jit(jax.vmap(...))`` of fn and of its derivative maps, traced once and kept across checks.

Invariant: every compiled piece is traced with the checked point and the unchecked arrays as arguments, never baked
in, so it holds for every check under the same cache key, and holds no user array; a compiled piece that cannot be
traced or run is marked on its entry and never decides anything: each operation of :class:`CompiledPath` then
returns None and the eager path (:mod:`.eager`) computes, and reports, the numbers exactly as it always does. The
leaves the compiled maps find without a derivative are those the eager path would find (:mod:`.derivatives`).

The operations are the eager path's: ``evaluate`` (a batch of points), ``evaluate_edits``, ``vjp``, ``jvp``,
``vjp_transposed`` (``J t`` through the VJP, see :mod:`.transposed`) and ``gradient`` (the entry of order 2);
:class:`.prepared.JaxPrepared` chooses between the two paths in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from gradbridge._errors import GradbridgeError, ModeUnsupportedError

from .cache import JaxFingerprint
from .derivatives import (FORWARD_UNSUPPORTED_HINTS, NO_DERIVATIVE_HINTS, SYMBOLIC_ZERO, dependencies, first_line,
                          mentions, restricted)
from .transposed import build_transposed
from .x64 import plumbing_dtype

if TYPE_CHECKING:  # pragma: no cover
    from gradbridge._adapter import LeafSpec

    from .prepared import JaxPrepared

Results = List[Tuple[List[int], Any]]  # (leaf indices, the batched result of their map)


@dataclass
class LinearPlan:
    """The compiled VJP (``"rev"``) or JVP (``"fwd"``) maps of one entry, traced with the checked point and
    the fixed arrays as arguments, so they hold for every check with the same key."""

    maps: List[Tuple[List[int], Callable[..., Any], Callable[..., Any]]]  # (leaf indices, batched, single)
    undefined: Dict[int, str]  # leaf index -> why JAX cannot differentiate fn with respect to it
    constant: List[Tuple[int, int]]  # (map index, position): outputs/tangents on which nothing depends


class Compiled:
    """The compiled pieces of one traced function ``function(parts, dyn) -> flat output``."""

    def __init__(self, function: Callable[..., jax.Array], layout: Sequence[Tuple[int, int, Tuple[int, ...]]],
                 fingerprint: Optional[JaxFingerprint], outputs: Optional[List["LeafSpec"]] = None) -> None:
        self.function = function
        self.layout = list(layout)  # (offset, size, shape) of each checked leaf in the flat vector
        self.fingerprint = fingerprint
        self.outputs = outputs
        self.low_precision_outputs: List[str] = []
        self.evaluation_fails = False
        self.eager_reason: Optional[str] = None  # why fn cannot be traced (it keeps state): checked eagerly
        self.linear: Dict[str, Any] = {}  # mode -> LinearPlan ("rev_t": TransposedPlan), or False: the eager path
        self.gradient: Optional[Compiled] = None
        self.gradient_error: Optional[BaseException] = None
        self.gradient_probed = False
        self._primal: Optional[Callable[..., jax.Array]] = None  # see primal_under_vjp

        def flat(x: jax.Array, dyn: Any) -> jax.Array:
            return function(self.split(x), dyn)

        self.evaluate = jax.jit(jax.vmap(flat, in_axes=(0, None)))

        def edited(x0: jax.Array, positions: jax.Array, values: jax.Array, dyn: Any) -> jax.Array:
            count = positions.shape[0]
            points = jnp.broadcast_to(x0, (count, x0.shape[0])).at[jnp.arange(count), positions].set(values)
            return jax.vmap(flat, in_axes=(0, None))(points, dyn)

        # the points of an element-by-element check built next to the computation (XLA fuses the edit in)
        self.evaluate_edits = jax.jit(edited)
        bind = getattr(function, "bind", None)
        if bind is not None:  # the traced call records the output layout here
            bind(self)

    def split(self, x: Any) -> List[Any]:
        return [jnp.reshape(x[offset:offset + size], shape) for offset, size, shape in self.layout]

    def primal_under_vjp(self, x: jax.Array, dyn: Any) -> jax.Array:
        """The primal output ``jax.vjp`` returns at ``x`` (a ``custom_vjp``'s ``fwd``), jitted once per entry."""
        if self._primal is None:
            function, split = self.function, self.split

            def primal(x: jax.Array, dyn: Any) -> jax.Array:
                return jax.vjp(lambda *parts: function(list(parts), dyn), *split(x))[0]

            self._primal = jax.jit(primal)
        return self._primal(x, dyn)

    def alive(self) -> bool:
        """Whether the objects its key names by identity still live (else an id may name another object)."""
        return self.fingerprint is not None and self.fingerprint.alive()

    def gradient_entry(self) -> "Compiled":
        """The entry of ``x -> J(x)^T v`` (order 2), with ``v`` passed as an argument next to ``dyn``."""
        if self.gradient is None:
            first = self.function

            def gradient(parts: Sequence[jax.Array], dyn2: Any) -> jax.Array:
                dyn, v = dyn2
                pulled = jax.vjp(lambda *p: first(list(p), dyn), *parts)[1](v)
                return jnp.concatenate([jnp.ravel(g) for g in pulled])

            self.gradient = Compiled(gradient, self.layout, None)
        return self.gradient


def linear_single(function: Callable[..., jax.Array], indices: List[int], mode: str) -> Callable[..., Any]:
    """``(parts0, dyn, *inputs) -> J^T v`` (rev, one cotangent, gradients of the leaves ``indices``) or
    ``J u`` (fwd, one tangent per leaf in ``indices``), the derivative taken inside the trace."""

    def restrict(parts0: Sequence[jax.Array], dyn: Any) -> Callable[..., jax.Array]:
        return restricted(function, indices, parts0, dyn)

    if mode == "rev":
        def single(parts0: Sequence[jax.Array], dyn: Any, v: jax.Array) -> Tuple[jax.Array, ...]:
            return tuple(jax.vjp(restrict(parts0, dyn), *[parts0[k] for k in indices])[1](v))
    else:
        def single(parts0: Sequence[jax.Array], dyn: Any, *tangents: jax.Array) -> jax.Array:  # type: ignore[misc]
            return jax.jvp(restrict(parts0, dyn), [parts0[k] for k in indices], list(tangents))[1]
    return single


def build_linear(entry: Compiled, parts0: List[jax.Array], dyn: Any, probe: Callable[[List[int]], Sequence[Any]],
                 mode: str) -> Any:
    """The entry's linear maps for ``mode``, or False where they cannot be traced with the point as an
    argument (Python control flow on values, a broken rule, forward mode of a custom_vjp): the check then
    takes the eager path, which reports those exactly as before."""
    everything = list(range(len(parts0)))
    traced: List[Tuple[List[int], Callable[..., Any], Any]] = []
    undefined: Dict[int, str] = {}
    try:
        single = linear_single(entry.function, everything, mode)
        traced.append((everything, single, jax.make_jaxpr(single)(parts0, dyn, *probe(everything))))
    except GradbridgeError:
        raise
    except Exception as exc:
        if not mentions(exc, NO_DERIVATIVE_HINTS) or (mode == "fwd" and mentions(exc, FORWARD_UNSUPPORTED_HINTS)):
            return False
        for k in everything:
            try:
                single = linear_single(entry.function, [k], mode)
                traced.append(([k], single, jax.make_jaxpr(single)(parts0, dyn, *probe([k]))))
            except GradbridgeError:
                raise
            except Exception as exc:
                if not mentions(exc, NO_DERIVATIVE_HINTS) or mentions(exc, FORWARD_UNSUPPORTED_HINTS):
                    return False
                undefined[k] = f"JAX cannot differentiate fn with respect to it: {first_line(exc)}"
    maps = []
    constant: List[Tuple[int, int]] = []
    for m, (indices, single, closed) in enumerate(traced):
        count = 1 if mode == "rev" else len(indices)
        total = len(closed.jaxpr.invars)
        linear_inputs = frozenset(range(total - count, total))
        depends = [d & linear_inputs for d in dependencies(closed.jaxpr)]
        if mode == "rev":
            constant += [(m, j) for j in range(len(indices)) if not depends[j]]
        else:
            used = frozenset().union(*depends)
            constant += [(m, j) for j in range(len(indices)) if total - count + j not in used]
        in_axes = (None, None) + (0,) * count
        maps.append((indices, jax.jit(jax.vmap(single, in_axes=in_axes)), jax.jit(single)))
    return LinearPlan(maps, undefined, constant)


class CompiledPath:
    """The compiled path of one prepared function: each operation returns its result, or None where this path
    declines (its piece failed to trace or run before, or fails now): the eager path then runs.

    ``compiled()`` gives the entry and the arguments passed to it besides the checked leaves (``dyn``).
    """

    def __init__(self, owner: "JaxPrepared", compiled: Callable[[], Tuple[Compiled, Any]]) -> None:
        self.owner = owner
        self.compiled = compiled

    def differentiated_primal(self, x: jax.Array) -> Optional[np.ndarray]:
        """The primal under ``jax.vjp`` at the point ``x``, compiled; None where the eager path must compute it."""
        entry, dyn = self.compiled()
        if entry.evaluation_fails or entry.linear.get("rev") is False:
            return None
        try:
            self.owner.problem.rng.reseed()
            return np.asarray(entry.primal_under_vjp(x, dyn), dtype=np.float64)
        except GradbridgeError:
            raise
        except Exception:  # the eager path computes it and reports what fails
            return None

    def evaluate(self, points: np.ndarray, x: jax.Array) -> Optional[np.ndarray]:
        owner, problem = self.owner, self.owner.problem
        entry, dyn = self.compiled()
        if entry.evaluation_fails:
            return None
        result = None
        try:
            problem.rng.reseed()
            result = np.asarray(entry.evaluate(x, dyn), dtype=np.float64)
        except GradbridgeError:
            raise
        except Exception:  # the eager path retries and reports it as before
            entry.evaluation_fails = True
        if result is not None and owner._outputs is None and problem.outputs is None:
            problem.outputs = entry.outputs
            problem.low_precision_outputs = entry.low_precision_outputs
        return result

    def evaluate_edits(self, positions: np.ndarray, values: np.ndarray) -> Optional[np.ndarray]:
        """The points built inside the compiled evaluation, once it has run (the outputs are known)."""
        owner = self.owner
        known = owner._outputs is not None or owner.problem.outputs is not None
        if not known or len(positions) <= 1:
            return None
        entry, dyn = self.compiled()
        if entry.evaluation_fails:
            return None
        dtype = plumbing_dtype()
        try:
            owner.problem.rng.reseed()
            return np.asarray(entry.evaluate_edits(jnp.asarray(owner.x0, dtype=dtype), jnp.asarray(positions),
                                                   jnp.asarray(values, dtype=dtype), dyn), dtype=np.float64)
        except GradbridgeError:
            raise
        except Exception:  # evaluate runs the same points its own way, and reports what fn raises
            return None

    def vjp(self, v: jax.Array) -> Optional[Results]:
        return self._apply("rev", self.owner.zero_cotangent, lambda _: [v])

    def jvp(self, parts: Callable[[List[int]], List[jax.Array]]) -> Optional[Results]:
        return self._apply("fwd", self.owner.zero_tangents, parts)

    def vjp_transposed(self, parts: Callable[[List[int]], List[jax.Array]]) -> Optional[Results]:
        """The transposed VJPs of each leaf group (traced once per entry), recording the leaves without a
        derivative as :meth:`vjp` does."""
        fast = self._linear("rev", self.owner.zero_cotangent)
        if fast is None:
            return None
        entry, plan, dyn, parts0 = fast
        transposed = entry.linear.get("rev_t")
        if transposed is None:
            transposed = entry.linear["rev_t"] = build_transposed(entry, plan, parts0, dyn)
        if transposed is False:
            return None
        if transposed.error is not None:
            raise ModeUnsupportedError(transposed.error)
        try:
            undefined = self._plan_undefined(plan, parts0, dyn, self.owner.zero_cotangent, "rev")
            results = [(indices, batched(parts0, dyn, *parts(indices))) for indices, batched in transposed.maps]
        except GradbridgeError:
            raise
        except Exception:  # the eager path retries, falls back or reports it
            entry.linear["rev_t"] = False
            return None
        self.owner.record_undefined("rev", undefined)
        return results

    def gradient(self, v: jax.Array, parts0: List[jax.Array],
                 zeros: jax.Array) -> Tuple[Callable[[], Tuple[Compiled, Any]], bool, Optional[BaseException]]:
        """The entry of order 2 (a thunk giving it and its arguments), whether JAX's ability to differentiate it
        was probed (once per entry), and the error saying it cannot."""
        entry, dyn = self.compiled()
        child = entry.gradient_entry()
        if not child.gradient_probed:  # can JAX differentiate the gradient? (traced once per entry)
            def probe(parts: Sequence[jax.Array], dyn2: Any, z: jax.Array) -> Any:
                return jax.vjp(lambda *p: child.function(list(p), dyn2), *parts)[1](z)

            try:
                jax.make_jaxpr(probe)(parts0, (dyn, v), zeros)
                child.gradient_probed = True
            except GradbridgeError:
                raise
            except Exception as exc:
                if mentions(exc, NO_DERIVATIVE_HINTS) or mentions(exc, FORWARD_UNSUPPORTED_HINTS):
                    child.gradient_error, child.gradient_probed = exc, True
        return (lambda: (child, (dyn, v))), child.gradient_probed, child.gradient_error

    def _linear(self, mode: str, probe: Callable[[List[int]], Sequence[jax.Array]]) -> Optional[Tuple[Any, ...]]:
        """The compiled linear maps of ``mode`` (built once per cache entry), or None: use the eager path."""
        entry, dyn = self.compiled()
        parts0 = self.owner.parts0()
        plan = entry.linear.get(mode)
        if plan is None:
            plan = entry.linear[mode] = build_linear(entry, parts0, dyn, probe, mode)
        return None if plan is False else (entry, plan, dyn, parts0)

    def _apply(self, mode: str, probe: Callable[[List[int]], Sequence[jax.Array]],
               inputs: Callable[[List[int]], Sequence[jax.Array]]) -> Optional[Results]:
        """``[(leaf indices, batched result)]`` from the compiled maps, recording the leaves without a
        derivative; None where the eager path must run instead."""
        fast = self._linear(mode, probe)
        if fast is None:
            return None
        entry, plan, dyn, parts0 = fast
        try:
            results = [(indices, batched(parts0, dyn, *inputs(indices))) for indices, batched, _ in plan.maps]
            undefined = self._plan_undefined(plan, parts0, dyn, probe, mode)
        except GradbridgeError:
            raise
        except Exception:  # the eager path retries, falls back or reports it as before
            entry.linear[mode] = False
            return None
        self.owner.record_undefined(mode, undefined)
        return results

    def _plan_undefined(self, plan: LinearPlan, parts0: List[jax.Array], dyn: Any,
                        probe: Callable[[List[int]], Sequence[jax.Array]], mode: str) -> Dict[str, str]:
        """``{leaf name: reason}`` for the leaves a compiled plan has no derivative for: those JAX cannot
        differentiate, and those whose derivative is a symbolic zero (a nonzero constant is a wrong rule)."""
        leaves = self.owner.leaves
        undefined = {leaves[k].name: reason for k, reason in plan.undefined.items()}
        for m, j in plan.constant:
            indices, _, single = plan.maps[m]
            if mode == "rev" and np.any(np.asarray(single(parts0, dyn, *probe(indices))[j])):
                continue  # a constant that is not zero: a wrong rule, not a missing one
            undefined.setdefault(leaves[indices[j]].name, SYMBOLIC_ZERO)
        return undefined
