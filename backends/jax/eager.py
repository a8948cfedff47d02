"""The eager path: fn run and differentiated at this check's point, used where the compiled path cannot run.

Invariant: every number of this path comes from fn itself or from JAX's derivatives of it taken at the checked
point in this check (``jax.vjp``/``jax.linearize`` of a closure over the point, applied batched or vector by vector,
see :mod:`.batching`), so it holds for a stateful fn too (one that rebinds a key it keeps: it runs point by point,
eagerly, with no trace baking its state in); the leaves without a derivative are found as on the compiled path
(:mod:`.derivatives`); and an error fn or its rules raise here is the one the check reports.

It runs where the compiled path declines: fn keeps state (:mod:`.state`), the compiled piece failed to trace or
run, or the function was not cached. The operations are the compiled path's (``evaluate``, ``evaluate_edits``,
``vjp``, ``jvp``, ``vjp_transposed``, plus the order-2 probe), chosen between in :class:`.prepared.JaxPrepared`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

import jax
import numpy as np

from gradbridge._errors import FunctionEvaluationError, GradbridgeError, ModeUnsupportedError

from ..common.batching import PathChoice
from ..common.lowprec import promotion_hint
from .batching import COMPILED, DERIVATIVES, EVALUATE, apply_batched, apply_vmapped, evaluate_batched
from .compiled import Results
from .derivatives import (FORWARD_UNSUPPORTED_HINTS, NO_DERIVATIVE_HINTS, SYMBOLIC_ZERO, LinearMap, dependencies,
                          first_line, mentions, reraise_unless_no_derivative)
from .state import StatefulFunction
from .transposed import TransposedPlan, apply_transposed, transpose_pullbacks
from .x64 import plumbing_dtype

if TYPE_CHECKING:  # pragma: no cover
    from .prepared import JaxPrepared


def eager_on_leak(method: Callable[..., Any]) -> Callable[..., Any]:
    """A prepared function's method that starts again once a traced run of fn left tracers in the user's state:
    the problem is stateful by then, so the second run takes the eager paths only."""

    @functools.wraps(method)
    def run(self: "JaxPrepared", *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except StatefulFunction:
            if self.problem.eager_reason is None:  # pragma: no cover - raised only after marking
                raise
            return method(self, *args, **kwargs)
    return run


class EagerPath:
    """The eager path of one prepared function: its derivative maps are built once, at the check's point."""

    def __init__(self, owner: "JaxPrepared", paths: Dict[str, PathChoice]) -> None:
        self.owner = owner
        self.paths = paths
        self._batched: Optional[Callable[[jax.Array], jax.Array]] = None
        self._apply = jax.jit(apply_vmapped)
        self.pullbacks: Optional[List[LinearMap]] = None
        self.pushforwards: Optional[List[LinearMap]] = None
        self.transposes: Optional[TransposedPlan] = None

    @property
    def looped(self) -> bool:
        """Whether fn is evaluated point by point: it keeps state, or ``jax.jit(jax.vmap(fn))`` raised."""
        return self.paths[COMPILED].looped or self.paths[EVALUATE].looped

    def evaluate(self, points: np.ndarray, x: jax.Array) -> np.ndarray:
        owner, problem = self.owner, self.owner.problem
        result = None
        if not self.looped:
            if self._batched is None:
                self._batched = jax.jit(jax.vmap(owner.flat))
            result = evaluate_batched(self.paths[EVALUATE], self._batched, x, problem.rng.reseed)
        if result is not None:
            return result
        rows = []
        for k, point in enumerate(x):
            problem.rng.reseed()
            try:
                rows.append(np.asarray(owner.flat(point), dtype=np.float64))
            except Exception as exc:
                if (problem.low_precision and not isinstance(exc, GradbridgeError)
                        and np.array_equal(points[k], owner.x0)):
                    # fn fails on the float64 copies at the user's own point: it may only run in its own dtypes
                    raise FunctionEvaluationError(
                        f"fn raised {first_line(exc)} (at the unperturbed input). "
                        f"{promotion_hint(problem.low_precision)}") from exc
                raise
        return np.stack(rows)

    def evaluate_edits(self, positions: np.ndarray, values: np.ndarray) -> np.ndarray:
        """The edited copies of ``x0`` written as NumPy points and evaluated as any others."""
        x0 = self.owner.x0
        points = np.empty((len(positions), len(x0)))
        points[:] = x0
        points[np.arange(len(positions)), positions] = values
        return self.owner.evaluate(points)

    def vjp(self, v: jax.Array) -> Results:
        return [(indices, self._applied(pullback, v)) for indices, pullback in self.pullbacks_built()]

    def jvp(self, parts: Callable[[List[int]], List[jax.Array]]) -> Results:
        if self.pushforwards is None:
            zeros = self.owner.zero_tangents
            self.pushforwards = self._linear_maps(lambda f, primals: jax.linearize(f, *primals)[1], zeros, "fwd")
            self._mark_symbolic_zeros(self.pushforwards, zeros, "fwd")
        return [(indices, self._applied(pushforward, *parts(indices))) for indices, pushforward in self.pushforwards]

    def vjp_transposed(self, parts: Callable[[List[int]], List[jax.Array]]) -> Results:
        """The transposed VJPs of each leaf group of this path's VJP maps, applied with jit + vmap."""
        if self.transposes is None:
            owner = self.owner
            self.transposes = transpose_pullbacks(self.pullbacks_built(), owner.leaves, owner.output_size(),
                                                   plumbing_dtype())
        if self.transposes.error is not None:
            raise ModeUnsupportedError(self.transposes.error)
        return [(indices, self._applied(jax.tree_util.Partial(apply_transposed, transposed), *parts(indices)))
                for indices, transposed in self.transposes.maps]

    def gradient_error(self, gradient: Callable[..., jax.Array], parts0: List[jax.Array],
                       zeros: jax.Array) -> Optional[BaseException]:
        """Why JAX cannot differentiate ``gradient`` (order 2), or None; errors of other kinds surface when it is
        evaluated."""
        try:
            jax.vjp(gradient, *parts0)[1](zeros)
        except Exception as exc:
            if mentions(exc, NO_DERIVATIVE_HINTS) or mentions(exc, FORWARD_UNSUPPORTED_HINTS):
                return exc
            if isinstance(exc, GradbridgeError):
                raise
        return None

    def pullbacks_built(self) -> List[LinearMap]:
        """The VJP maps of this path (built once, recording the leaves without a derivative)."""
        if self.pullbacks is None:
            zero = self.owner.zero_cotangent
            self.pullbacks = self._linear_maps(lambda f, primals: jax.vjp(f, *primals)[1], zero, "rev")
            self._mark_symbolic_zeros(self.pullbacks, zero, "rev")
        return self.pullbacks

    def _applied(self, function: Callable[..., Any], *batched: jax.Array) -> Any:
        return apply_batched(self.paths[DERIVATIVES], self._apply, function, *batched)

    def _linear_maps(self, build: Callable[[Callable[..., jax.Array], Sequence[jax.Array]], Callable[..., Any]],
                     probe_inputs: Callable[[List[int]], Sequence[jax.Array]], mode: str) -> List[LinearMap]:
        """Build the derivative map at ``x0`` over all leaves at once, or, where JAX has no derivative
        rule for some input, one map per leaf, recording the leaves JAX cannot differentiate.

        ``build(function, primals)`` returns the map; each map is called once on ``probe_inputs`` so that
        errors JAX raises only when the map is applied (transpose rules) surface here.
        """
        owner = self.owner
        parts0 = owner.parts0()
        everything = list(range(len(owner.leaves)))
        try:
            linear = build(owner.function, parts0)
            linear(*probe_inputs(everything))
            return [(everything, linear)]
        except Exception as exc:
            reraise_unless_no_derivative(exc, mode)
        maps: List[LinearMap] = []
        for k, leaf in enumerate(owner.leaves):
            def only(part: jax.Array, k: int = k) -> jax.Array:
                return owner.function(*parts0[:k], part, *parts0[k + 1:])

            try:
                linear = build(only, [parts0[k]])
                linear(*probe_inputs([k]))
            except Exception as exc:
                reraise_unless_no_derivative(exc, mode)
                owner.record_undefined(mode, {
                    leaf.name: f"JAX cannot differentiate fn with respect to it: {first_line(exc)}"}, replace=True)
                continue
            maps.append(([k], linear))
        return maps

    def _mark_symbolic_zeros(self, maps: List[LinearMap], probe_inputs: Callable[[List[int]], Sequence[jax.Array]],
                             mode: str) -> None:
        """Record leaves whose derivative JAX builds as a constant zero (it depends on no input of the map).

        For a VJP (``mode="rev"``) each output is one leaf's gradient; for a JVP each input is one leaf's
        tangent. A constant that is not zero is left alone: that is a wrong rule, not a missing one.
        """
        for indices, linear in maps:
            inputs = probe_inputs(indices)
            try:
                closed = jax.make_jaxpr(linear)(*inputs)
                values = jax.tree_util.tree_leaves(linear(*inputs))
            except Exception:  # the analysis is a refinement; without it rows are plain pass/fail
                continue
            depends = dependencies(closed.jaxpr)
            if mode == "rev":
                constant = [not depends[j] and not np.any(np.asarray(values[j])) for j in range(len(indices))]
            else:
                used = frozenset().union(*depends)
                constant = [j not in used for j in range(len(indices))]
            owner = self.owner
            owner.record_undefined(mode, {owner.leaves[k].name: SYMBOLIC_ZERO
                                          for j, k in enumerate(indices) if constant[j]})
