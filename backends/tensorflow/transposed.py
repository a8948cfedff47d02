"""The transposed VJP: ``J t`` by differentiating the reverse-mode VJP ``u -> J^T u`` once more.

Invariant: the ``J`` of :meth:`TransposedVJP.vjp_transposed` is the very Jacobian :meth:`vjp` implements, with
the user's ``tf.custom_gradient`` rules, never a forward-mode rule; where the backward pass cannot be
differentiated (an op without a gradient, a rule computing through NumPy or cutting its cotangent off the tape)
it raises ModeUnsupportedError rather than return a ``J t`` that silently leaves a leaf out. The cotangent it
differentiates at is random (a zero one could hide a rule that is not linear in it) and fixed for the check.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from gradbridge import _process
from gradbridge._adapter import LeafSpec
from gradbridge._errors import ModeUnsupportedError

from .tensors import NO_GRADIENT, Forward, Source, dense, first_line, flat, joined, watch


def pullback(forward: Forward, sources: List[Source], leaves: Sequence[LeafSpec], u: tf.Tensor
              ) -> Tuple[tf.GradientTape, tf.Tensor, List[Optional[tf.Tensor]], List[bool]]:
    """The VJP at the sources for the cotangent ``u``, recorded by a persistent tape watching ``u``, so that
    differentiating it again with respect to ``u`` transposes it (``J t`` is the gradient of ``g = J^T u``
    along ``t``). Returns that tape, the flat ``g``, the per-leaf gradients (None where TensorFlow defines
    none) and, per leaf, whether the tape links its gradient to ``u`` (False where the backward pass cannot
    be differentiated). Raises ModeUnsupportedError where an op of the backward pass has no gradient."""
    with tf.GradientTape(watch_accessed_variables=False) as inner:
        watch(inner, sources)
        out = flat(forward(sources))
    with tf.GradientTape(persistent=True, watch_accessed_variables=False) as outer:
        outer.watch(u)
        gradients = [dense(g) for g in inner.gradient(out, sources, output_gradients=u)]
        g = joined(leaves, gradients)
    with second_derivatives():
        links = [grad is not None and outer.gradient(grad, u) is not None for grad in gradients]
    return outer, g, gradients, links


def transposed_row(tape: tf.GradientTape, g: tf.Tensor, u: tf.Tensor, tangent: tf.Tensor) -> tf.Tensor:
    """``J t`` for one tangent: the gradient of ``g = J^T u`` with respect to ``u`` along ``t``."""
    with second_derivatives():
        row = tape.gradient(g, u, output_gradients=tangent)
    return tf.zeros_like(u) if row is None else tf.cast(row, tf.float64)


@contextlib.contextmanager
def second_derivatives() -> Iterator[None]:
    """While differentiating a backward pass: TensorFlow's LookupError for an op without a registered gradient
    (``SoftsignGrad``, the gradient op of ``tf.nn.softsign``, for one) becomes ModeUnsupportedError."""
    try:
        yield
    except LookupError as exc:
        raise ModeUnsupportedError(f"cannot transpose the VJP (no transposed products J t): TensorFlow cannot "
                                   f"differentiate the backward pass ({first_line(exc)})") from exc



class TransposedVJP:
    """The transposed VJP of :class:`.prepared.TensorFlowPrepared`, batched through the graph of
    :func:`.graphs.transposed_graph` once its path is decided (see :class:`.batching.BatchedPaths`)."""

    @_process.runs_user_code
    def vjp_transposed(self, tangents: np.ndarray) -> np.ndarray:
        """``J t`` per row of ``tangents`` (k, n) -> (k, m), for the very ``J`` :meth:`vjp` implements (with the
        user's ``tf.custom_gradient`` rules): the VJP ``g = J^T u`` for a fixed random cotangent ``u`` is
        recorded by a tape watching ``u`` and differentiated again, ``J t = d<g, t>/du``. Raises
        ModeUnsupportedError where the backward pass cannot be differentiated."""
        tangents = np.asarray(tangents, dtype=np.float64)
        if self._worth_batching("transposed", len(tangents)):
            batched = self._transposed_batched(tangents)
            if batched is not None:
                return batched
        return self._transposed_loop(tangents)

    def _transpose_cotangent(self) -> tf.Tensor:
        """The cotangent ``u`` the transposed VJP differentiates at: random (a zero one could hide a rule
        that is not linear in its cotangent), fixed for the check."""
        if self._cotangent is None:
            m = sum(spec.size for spec in self.output_specs)
            self._cotangent = np.random.default_rng(self.problem.spec.seed).standard_normal(m)
        return tf.constant(self._cotangent, tf.float64)

    def _transposed_batched(self, tangents: np.ndarray) -> Optional[np.ndarray]:
        """All tangents at once through the graph of :func:`.graphs.transposed_graph`; None when the loop must run."""
        first = self._paths["transposed"].undecided
        if first:
            reason = self.problem.unbatchable() or self._graph("transposed")
            if reason is not None:
                return self._fall_back("transposed", reason)
        try:
            rows, g = self._run("transposed", tf.constant(self.x0, tf.float64), self._transpose_cotangent(),
                                tf.constant(tangents, tf.float64))
            rows, g = rows.numpy(), g.numpy()
        except Exception as exc:
            return self._fall_back("transposed", f"the vectorized graph raised {type(exc).__name__}: "
                                                 f"{first_line(exc)}", decided=not first)
        m = sum(spec.size for spec in self.output_specs)
        if rows.shape != (len(tangents), m):
            return self._fall_back("transposed", f"the vectorized graph returned shape {rows.shape}",
                                   decided=not first, stale=True)
        flags = self._flags["transposed"]
        self._check_transposable(g, flags["links"], flags["none"])
        if first:
            looped = self._transposed_loop(tangents[:1])
            mismatch = self._disagreement("transposed", rows[:1], looped)
            if mismatch is not None:
                return self._fall_back("transposed", f"its products differ from the eager tapes' ({mismatch})",
                                       stale=True)
            self._use_batched("transposed", len(tangents))
        return rows

    def _transposed_loop(self, tangents: np.ndarray) -> np.ndarray:
        """One eager recording of the VJP at ``x0``, one backward pass through it per tangent."""
        u = self._transpose_cotangent()
        rows = []
        with self.problem.applied(self.x0) as sources:
            tape, g, gradients, links = pullback(self.forward, sources, self.leaves, u)
            self._check_transposable(g.numpy(), links, [grad is None for grad in gradients])
            for tangent in tangents:
                rows.append(transposed_row(tape, g, u, tf.constant(tangent, tf.float64)).numpy())
            del tape
        return np.stack(rows) if rows else np.zeros((0, len(u)))

    def _check_transposable(self, g: np.ndarray, links: Sequence[bool], none: Sequence[bool]) -> None:
        """Record the leaves without a gradient (as :meth:`vjp` does), and raise ModeUnsupportedError for a
        leaf whose VJP is not zero yet does not depend on the cotangent on the tape: its backward pass cannot
        be differentiated, and ``J t`` would silently leave it out."""
        for leaf, linked, missing in zip(self.leaves, links, none):
            if missing:
                self.undefined_gradients[leaf.name] = NO_GRADIENT
            elif not linked and np.any(g[leaf.slice] != 0):
                raise ModeUnsupportedError(
                    f"cannot transpose the VJP (no transposed products J t): TensorFlow cannot differentiate the "
                    f"backward pass that gives the gradient of {leaf.name} with respect to its cotangent (the tape returned None: a "
                    "tf.custom_gradient rule computing through NumPy, tf.numpy_function or tf.stop_gradient on the "
                    "upstream gradient); use the dense Jacobian instead")
