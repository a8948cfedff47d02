"""The prepared TensorFlow function: evaluations, VJPs, JVPs and the gradient function over the flat vector.

Invariant: every number handed to the core comes from the eager tape or the eager loop, or from a vectorized
graph that agreed with them on the check's first chunk (see :mod:`.batching`); every call into the user's code
runs inside the problem's window and :meth:`TensorFlowProblem.applied` (pinned randomness, the user's objects
back as they were on exit); a gradient TensorFlow gives as None is recorded in ``undefined_gradients`` and
reported, never a silent zero; forward mode refuses what TensorFlow's ForwardAccumulator cannot check
(``tf.custom_gradient`` rules run eagerly, ops without a forward rule) rather than give a wrong number.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from gradbridge import _process
from gradbridge._adapter import (EditedEvaluation, ForwardRules, LeafSpec, ProblemBackedFunction, TransposedProducts,
                                 UndefinedGradients, WorkingPrecision)
from gradbridge._errors import CostlyProbeSkipped, ModeUnsupportedError

from . import compat
from ..common.outputs import gradient_output_specs
from .batching import BatchedPaths
from .problem import TensorFlowProblem
from .tensors import NO_GRADIENT, Forward, Source, dense, first_line, flat, watch
from .transposed import TransposedVJP


class TensorFlowPrepared(BatchedPaths, TransposedVJP, ProblemBackedFunction, WorkingPrecision, UndefinedGradients,
                         TransposedProducts, EditedEvaluation, ForwardRules):
    """A TensorFlow function over the flat float64 vector; ``forward`` maps sources to output tensors.

    ``batching`` (see :class:`.batching.BatchedPaths`): False makes every computation run the eager loop.
    """

    analytic_source = "TensorFlow autodiff (GradientTape, ForwardAccumulator; your tf.custom_gradient rules)"
    #: TensorFlow has no user-written forward-mode rules (tf.custom_gradient defines the VJP only): None.
    forward_rule: Optional[str] = None

    def __init__(self, problem: TensorFlowProblem, forward: Forward, x0: np.ndarray, order: int = 1,
                 outputs: Optional[List[LeafSpec]] = None, notes: Optional[List[str]] = None) -> None:
        self.problem = problem
        self.forward = forward
        self.leaves = problem.leaves
        self.x0 = x0
        self.order = order
        self._outputs = outputs
        self.notes = list(notes or [])
        self.working_eps = problem.working_eps
        self.undefined_gradients: Dict[str, str] = {}
        self._links: Optional[np.ndarray] = None
        self._init_paths()  # batched paths: undecided until the first call, then batched or the loop for good
        self._cotangent: Optional[np.ndarray] = None  # the fixed cotangent the transposed VJP starts from

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """The problem's session; on leaving it normally, the cache entries follow the counters fn bumped."""
        with self.problem.session():
            yield
            self._keep_after_run()


    @_process.runs_user_code
    def evaluate(self, points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, dtype=np.float64)
        if self._worth_batching("evaluate", len(points)):
            batched = self._evaluate_batched(points)
            if batched is not None:
                return batched
        return self._evaluate_loop(points)

    @_process.runs_user_code
    def evaluate_edits(self, positions: np.ndarray, values: np.ndarray) -> np.ndarray:
        """``evaluate`` of the copies of ``x0`` with element ``positions[k]`` set to ``values[k]``. Once the
        points run batched, the vectorized graph builds them from ``x0`` itself, next to the computation."""
        if self._paths["evaluate"].batched and "evaluate" in self._graphs and len(positions) > 1:
            try:
                result = self._run("evaluate", tf.constant(self.x0[None, :], tf.float64),
                                   tf.constant(len(positions), tf.int32), tf.constant(positions, tf.int32),
                                   tf.constant(values, tf.float64)).numpy()
            except Exception:  # the points path runs the chunk again and raises, with its point, if fn does
                result = None
            if result is not None and result.shape == (len(positions), sum(s.size for s in self.output_specs)):
                return result
        points = np.empty((len(positions), len(self.x0)))
        points[:] = self.x0
        points[np.arange(len(positions)), positions] = values
        return self.evaluate(points)

    def _eager_outputs(self, points: np.ndarray) -> np.ndarray:
        """What the eager loop gives at ``points``: the probe's kept outputs where a point is the one it ran
        (the probe found fn deterministic there), the loop for the others."""
        kept = self.problem.eager_at
        if kept is None or self.forward != self.problem.call:
            return self._evaluate_loop(points)
        point, outputs = kept
        same = [np.array_equal(row, point) for row in points]
        if not any(same):
            return self._evaluate_loop(points)
        rows = np.empty((len(points), len(outputs)))
        rows[same] = outputs
        others = [k for k, hit in enumerate(same) if not hit]
        if others:
            rows[others] = self._evaluate_loop(points[others])
        return rows

    def _evaluate_loop(self, points: np.ndarray) -> np.ndarray:
        rows = []
        for point in points:
            with self.problem.applied(point) as sources:
                rows.append(flat(self.forward(sources)).numpy())
        return np.stack(rows)

    def _gradient_rows(self, gradients: Sequence[Any]) -> np.ndarray:
        """One flat float64 row from per-leaf gradients; ``None`` becomes zeros and is recorded."""
        parts = []
        for leaf, gradient in zip(self.leaves, gradients):
            gradient = dense(gradient)
            if gradient is None:
                self.undefined_gradients[leaf.name] = NO_GRADIENT
                parts.append(np.zeros(leaf.size))
            else:
                parts.append(np.asarray(gradient.numpy(), dtype=np.float64).reshape(-1))
        return np.concatenate(parts)

    # --- reverse mode: VJPs ---

    @_process.runs_user_code
    def differentiated_primal(self) -> np.ndarray:
        """fn's output at ``x0`` as recorded on a ``GradientTape`` watching the checked leaves (a
        ``tf.custom_gradient``'s forward under a tape), for the contract check that it equals ``fn(x0)``."""
        with self.problem.applied(self.x0) as sources:
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                watch(tape, sources)
                out = flat(self.forward(sources))
            del tape
        return out.numpy().astype(np.float64)

    @_process.runs_user_code
    def vjp(self, cotangents: np.ndarray) -> np.ndarray:
        cotangents = np.asarray(cotangents, dtype=np.float64)
        if self._worth_batching("vjp", len(cotangents)):
            batched = self._vjp_batched(cotangents)
            if batched is not None:
                return batched
        return self._vjp_loop(cotangents)

    def _vjp_loop(self, cotangents: np.ndarray) -> np.ndarray:
        rows = []
        with self.problem.applied(self.x0) as sources:
            with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
                watch(tape, sources)
                out = flat(self.forward(sources))
            for cotangent in cotangents:  # one recorded forward pass, one backward pass per cotangent
                gradients = tape.gradient(out, sources, output_gradients=tf.constant(cotangent, tf.float64))
                rows.append(self._gradient_rows(gradients))
            del tape
        return np.stack(rows)

    @_process.runs_user_code
    def vjp_batched_and_looped(self, cotangents: np.ndarray, thorough: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """The VJPs of ``cotangents``, ``tape.gradient`` under ``tf.vectorized_map`` (what ``tape.jacobian`` and
        per-example gradients run, the user's ``tf.custom_gradient`` included) and one cotangent at a time, for the
        batched-backward contract. The batched side is the check's own vectorized VJP graph: free where the check
        traced it or an earlier check of the function kept it; tracing it anew (50-100 ms, more than a small check)
        only when ``thorough``. One that cannot be built or run is reported, not failed."""
        if self.order != 1:
            raise ModeUnsupportedError("batched VJPs are checked for first derivatives")
        reason = self.problem.unbatchable()
        if reason is not None:
            raise ModeUnsupportedError(f"tf.vectorized_map cannot run it: {reason}")
        entry = self._cache_entry()
        if not (thorough or "vjp" in self._graphs or (entry is not None and "vjp" in entry.graphs)):
            raise CostlyProbeSkipped("this check ran its VJPs one cotangent at a time, and tracing tf.vectorized_map "
                                     "of the backward for a new function costs 50-100 ms, more than the check")
        reason = self._graph("vjp")
        if reason is not None:
            raise ModeUnsupportedError(f"tf.vectorized_map of its tape.gradient cannot run: {reason}")
        cotangents = np.asarray(cotangents, dtype=np.float64)
        try:
            batched = self._run("vjp", tf.constant(self.x0, tf.float64), tf.constant(cotangents, tf.float64)).numpy()
        except Exception as exc:  # an op without a vectorization rule (a py_function, NumPy) in fn or its gradient
            raise ModeUnsupportedError(f"tf.vectorized_map of its tape.gradient raised {type(exc).__name__}: "
                                       f"{first_line(exc)}") from exc
        return batched.reshape(len(cotangents), -1), self._vjp_loop(cotangents)

    @_process.runs_user_code
    def compiled_and_eager(self, cotangents: np.ndarray, thorough: bool = False
                           ) -> Tuple[Tuple[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray], str]:
        """For a ``tf.function`` fn (``jit_compile`` or not): its outputs and VJPs at ``x0`` through the check's
        fresh copy of the tf.function and through its Python function run eagerly (see
        :class:`gradbridge._adapter.CompiledFunction`); the note counts the copy's traces."""
        problem = self.problem
        if self.order != 1 or problem.fn is problem.spec.fn or self.forward != problem.call:
            raise ModeUnsupportedError("fn is not a tf.function")
        if problem.tf_rng.clear_kernel_cache:  # a graph and eager execution draw other streams from one seed
            return None, None, ("fn draws from stateful random ops, which a graph and eager execution draw in other "
                                "streams from one seed")
        compiled_fn = problem.fn
        results = []
        try:
            for fn in (compiled_fn, problem.spec.fn.python_function):
                problem.fn = fn
                with problem.applied(self.x0) as sources:
                    with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
                        watch(tape, sources)
                        out = flat(problem.call(sources))
                    rows = [self._gradient_rows(tape.gradient(out, sources,
                                                              output_gradients=tf.constant(v, tf.float64)))
                            for v in cotangents]
                    del tape
                results.append((out.numpy().astype(np.float64), np.stack(rows)))
        finally:
            problem.fn = compiled_fn
        traces = compiled_fn.experimental_get_tracing_count()
        how = "XLA (jit_compile=True)" if getattr(compiled_fn, "_jit_compile", None) else "a graph"
        return results[0], results[1], f"tf.function traced {traces} time(s) during the check, compiled to {how}"

    def _output_links(self) -> np.ndarray:
        """``links[k, j]``: whether output block k depends differentiably on leaf j (from reverse mode)."""
        if self._links is None:
            with self.problem.applied(self.x0) as sources:
                with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
                    watch(tape, sources)
                    outs = [tf.cast(t, tf.float64) for t in self.forward(sources)]
                self._links = np.array([[g is not None for g in tape.gradient(out, sources)] for out in outs])
                del tape
        return self._links

    @_process.runs_user_code
    def jvp(self, tangents: np.ndarray) -> np.ndarray:
        if self.order != 1:
            raise ModeUnsupportedError("forward mode is checked for first derivatives only")
        rows = []
        for tangent in tangents:
            with self.problem.applied(self.x0) as sources, compat.eager_custom_gradients() as custom:
                directions = [tf.cast(tf.constant(tangent[leaf.slice].reshape(leaf.shape), tf.float64), s.dtype)
                              for leaf, s in zip(self.leaves, sources)]
                try:
                    with tf.autodiff.ForwardAccumulator(sources, directions) as accumulator:
                        outs = self.forward(sources)
                except LookupError as exc:  # forward mode goes through gradient rules an op may lack
                    raise ModeUnsupportedError(f"forward mode unsupported: {str(exc).splitlines()[0]}") from exc
                pushed = [accumulator.jvp(t) for t in outs]
            if custom:
                names = ", ".join(sorted(set(custom)))
                raise ModeUnsupportedError(
                    f"forward mode cannot check tf.custom_gradient rules run eagerly ({names}): TensorFlow's "
                    "ForwardAccumulator ignores them and differentiates the ops inside instead; use analytic='rev' "
                    "(inside a tf.function, forward mode does use the rule)")
            rows.append(self._pushed_row(outs, pushed))
        return np.stack(rows)

    def _pushed_row(self, outs: Sequence[tf.Tensor], pushed: Sequence[Optional[tf.Tensor]]) -> np.ndarray:
        links = self._output_links()
        for j, leaf in enumerate(self.leaves):
            if not links[:, j].any():
                self.undefined_gradients[leaf.name] = NO_GRADIENT
        parts = []
        for k, (out, tangent) in enumerate(zip(outs, pushed)):
            if tangent is None:
                if links[k].any():
                    raise ModeUnsupportedError(
                        f"forward mode unsupported: TensorFlow has no forward-mode rule for an op between the "
                        f"checked inputs and output {self.output_specs[k].name} (ForwardAccumulator returned None, "
                        "while reverse mode finds a gradient; e.g. tf.numpy_function)")
                parts.append(np.zeros(int(np.prod(out.shape))))
            else:
                parts.append(np.asarray(tf.cast(tangent, tf.float64).numpy()).reshape(-1))
        return np.concatenate(parts)

    def gradient_function(self, cotangent: np.ndarray) -> "TensorFlowPrepared":
        v = tf.constant(cotangent, tf.float64)
        first = self.forward
        leaves = self.leaves

        def gradient(sources: List[Source]) -> List[tf.Tensor]:
            with tf.GradientTape(watch_accessed_variables=False) as inner:
                watch(inner, sources)
                out = flat(first(sources))
            grads = inner.gradient(out, sources, output_gradients=v)  # recorded by an enclosing tape, if any
            return [tf.zeros(leaf.shape, tf.float64) if g is None else tf.cast(dense(g), tf.float64)
                    for leaf, g in zip(leaves, grads)]

        return TensorFlowPrepared(self.problem, gradient, self.x0, order=self.order + 1,
                                  outputs=gradient_output_specs(leaves), notes=self.notes)

