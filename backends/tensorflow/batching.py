"""Batched or one at a time: the path of each computation of a check (evaluate, vjp, transposed).

Invariant: a vectorized graph (see :mod:`.graphs`) replaces the eager per-point loop only after it ran on the
check's first batched chunk and agreed with the loop there under the internal agreement rule
(:func:`gradbridge._agreement.disagreement`, through :class:`~backends.common.batching.PathChoice`: one decision
per computation, kept for the rest of the check and said once in the notes). A graph that raises, returns the
wrong shape or disagrees never decides a number: the loop computes it, and a graph that disagreed is dropped
from the cache too (the next check traces afresh rather than trusting it). Small chunks of a function's first
check run the loop (tracing costs more than it saves), which changes speed only, never a result.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from ..common.batching import PathChoice, path_choices
from . import graphs
from .cache import CACHE, Traced, entry_for, environment_of
from .tensors import NO_GRADIENT, first_line

#: Smallest chunk that triggers tracing the vectorized graph (smaller ones take the eager loop).
MIN_BATCH_ROWS = 64

#: What each computation is called in the notes, and what one of its rows is.
WHAT = {"evaluate": "evaluations", "vjp": "reverse-mode products (VJPs)",
        "transposed": "transposed reverse-mode products (J t from the VJP)"}
UNIT = {"evaluate": "point", "vjp": "cotangent", "transposed": "tangent"}


def batched_note(which: str) -> Callable[[int], str]:
    """The note of a computation decided batched (the same whatever the batch size)."""
    note = (f"TensorFlow {WHAT[which]} batched: all {UNIT[which]}s of a chunk in one tf.function through "
            "tf.vectorized_map (checked against the eager loop on the first chunk)")
    return lambda largest: note


def loop_note(which: str, reason: str, later: bool) -> str:
    """The note of a computation that runs the eager loop (``later``: after batched chunks had run)."""
    when = "from then on, after vectorized chunks," if later else ""
    return f"TensorFlow {WHAT[which]} {when} one {UNIT[which]} at a time (eager loop): {reason}".replace("  ", " ")


class BatchedPaths:
    """The batched paths of :class:`.prepared.TensorFlowPrepared` and the decision between them and the loop.

    ``_paths``: one :class:`PathChoice` per computation; ``_graphs``: the graphs this check runs, by
    computation; ``_flags``: what tracing found, per computation and leaf (see :func:`.graphs.trace`).
    """

    #: Try one vectorized ``tf.function`` per chunk before the eager per-point loop (False: always the loop).
    batching = True
    _paths: Dict[str, PathChoice]

    def _init_paths(self) -> None:
        """No computation decided yet, no graph; the cache entry is looked up on first use."""
        self._paths = path_choices(self.notes, {which: batched_note(which) for which in WHAT})
        self._graphs: Dict[str, Any] = {}
        # found while tracing, per path and per leaf: "none" (the gradient is None), "links" (see transposed.pullback)
        self._flags: Dict[str, Dict[str, List[bool]]] = {}
        self._entry: Optional[Traced] = None  # this check's entry in the cache of traced graphs
        self._entry_known = False  # whether an earlier check of the same function and key had made it
        self._key: Optional[Tuple[Any, Any]] = None  # the key the entry is kept under
        self._keyed = False

    def _cache_entry(self) -> Optional[Traced]:
        """This check's entry in the cache of traced graphs (looked up, or made, on first use); None for a
        check that is not cached (order 2, or something in the key cannot be keyed safely)."""
        if not self._keyed:
            self._keyed = True
            if self.forward == self.problem.call:
                self._entry, self._entry_known, self._key = entry_for(self.problem)
        return self._entry

    def _keep_after_run(self) -> None:
        """Keep the cache entries of the state this check started from also under the state fn left behind,
        where the two differ in ints only (a counter fn bumps): the next check starts from it."""
        if self._entry is None or self._key is None:
            return
        environment = environment_of(self.problem.spec.fn)
        if environment is not None and CACHE.keep_after_run(self.problem.spec.fn, self._key[1], environment[0]):
            self._key = (self._key[0], environment[0])

    def _worth_batching(self, path: str, rows: int) -> bool:
        """Whether this chunk tries the vectorized graph. Tracing one costs about 0.05-0.1 s, about 200 eager
        calls, so a small chunk runs the loop unless its graph is kept from an earlier check, or an earlier
        check of the same function and key ran (a function checked again is worth one trace: later checks
        reuse it), or a chunk of :data:`MIN_BATCH_ROWS` rows has paid for the trace."""
        if rows <= 0 or not self.batching or self._paths[path].looped:
            return False
        if self._paths[path].batched or rows >= MIN_BATCH_ROWS:
            return True
        if self.problem.unbatchable() is not None:
            return False
        entry = self._cache_entry()
        return entry is not None and (path in entry.graphs or self._entry_known)


    def _evaluate_batched(self, points: np.ndarray) -> Optional[np.ndarray]:
        """All rows at once through ``tf.vectorized_map`` in one ``tf.function``; None when the loop must run."""
        first = self._paths["evaluate"].undecided
        if first:
            reason = self.problem.unbatchable() or self._graph("evaluate")
            if reason is not None:
                return self._fall_back("evaluate", reason)
        try:
            no_edits = (tf.constant(1, tf.int32), tf.zeros([0], tf.int32), tf.zeros([0], tf.float64))
            result = self._run("evaluate", tf.constant(points, tf.float64), *no_edits).numpy()
        except Exception as exc:  # the loop runs the chunk again and raises, with its point, if fn does
            return self._fall_back("evaluate", f"the vectorized graph raised {type(exc).__name__}: "
                                               f"{first_line(exc)}", decided=not first)
        expected = sum(spec.size for spec in self.output_specs)
        if result.shape != (len(points), expected):
            return self._fall_back("evaluate", f"the vectorized graph returned shape {result.shape}, expected "
                                               f"{(len(points), expected)}", decided=not first, stale=True)
        if first:
            rows = sorted({0, len(points) - 1})
            try:
                looped = self._eager_outputs(points[rows])
            except Exception:
                self._fall_back("evaluate", "the eager loop raised where the vectorized graph did not")
                raise
            mismatch = self._disagreement("evaluate", result[rows], looped)
            if mismatch is not None:
                return self._fall_back("evaluate", f"its outputs differ from the eager loop's ({mismatch})",
                                       stale=True)
            self._use_batched("evaluate", len(points))
        return result

    # --- the vectorized graphs: traced once per function and key, kept across checks ---

    def _graph(self, which: str) -> Optional[str]:
        """Make the vectorized graph of ``which`` ready: kept from an earlier check of the same function and
        key, or traced now (and kept). Returns why it cannot be used (also kept), or None."""
        entry = self._cache_entry()
        if entry is not None and which in entry.graphs:
            self._graphs[which] = entry.graphs[which]
            self._flags[which] = entry.flags.get(which, {})
            return None
        if entry is not None and which in entry.refused:
            return entry.refused[which]
        reason = self._trace(which)
        if entry is not None:
            if reason is None:
                entry.graphs[which] = self._graphs[which]
                entry.flags[which] = self._flags.get(which, {})
            else:
                entry.refused[which] = reason
        return reason

    def _run(self, which: str, *inputs: tf.Tensor) -> Any:
        """Run the graph of ``which`` on ``inputs`` and this check's fixed inputs (see ``fixed_inputs``)."""
        return self._graphs[which](*inputs, *self.problem.fixed_inputs())

    def _trace(self, which: str) -> Optional[str]:
        """Build (trace) the vectorized ``tf.function`` for ``which``; returns why it cannot be used, or None.
        Everything that changes between checks is an input of the graph (the points or ``x0``, the
        cotangents or tangents, the fixed inputs), so a graph holds for every check with the same key."""
        m = sum(spec.size for spec in self.output_specs)
        concrete, flags, reason = graphs.trace(which, self.problem, self.forward, self.leaves, len(self.x0), m)
        if reason is not None:
            return reason
        self._graphs[which] = concrete
        self._flags[which] = flags
        return None

    # --- the decision: PathChoice, one per computation ---

    def _disagreement(self, which: str, batched: np.ndarray, looped: np.ndarray) -> Optional[str]:
        """None when the batched rows agree with the looped ones under the internal agreement rule (at the
        precision the check really runs in); otherwise why not."""
        return self._paths[which].verify(batched, looped, self.working_eps)

    def _use_batched(self, which: str, rows: int) -> None:
        """The vectorized graph from now on (its first chunk agreed with the loop); said in the notes."""
        self._paths[which].use_batched(rows)

    def _fall_back(self, which: str, reason: str, decided: bool = False, stale: bool = False) -> None:
        """The eager loop from now on (``decided``: after batched chunks had run); the caller runs it.
        ``stale``: the graph disagreed with the loop, so it is dropped from the cache too (the next check
        traces afresh rather than trusting it)."""
        if stale and self._entry is not None:
            self._entry.graphs.pop(which, None)
        self._graphs.pop(which, None)
        self._paths[which].use_loop(loop_note(which, reason, later=decided))

    def _vjp_batched(self, cotangents: np.ndarray) -> Optional[np.ndarray]:
        """All cotangents at once: one recorded forward pass at ``x0``, ``tape.gradient`` vectorized over the
        cotangents; None when the loop must run."""
        first = self._paths["vjp"].undecided
        if first:
            reason = self.problem.unbatchable() or self._graph("vjp")
            if reason is not None:
                return self._fall_back("vjp", reason)
        try:
            result = self._run("vjp", tf.constant(self.x0, tf.float64), tf.constant(cotangents, tf.float64)).numpy()
        except Exception as exc:
            return self._fall_back("vjp", f"the vectorized graph raised {type(exc).__name__}: {first_line(exc)}",
                                   decided=not first)
        if result.shape != (len(cotangents), len(self.x0)):
            return self._fall_back("vjp", f"the vectorized graph returned shape {result.shape}", decided=not first,
                                   stale=True)
        none = self._flags["vjp"].get("none", [False] * len(self.leaves))
        if first:
            looped = self._vjp_loop(cotangents[:1])  # also records the loop's None gradients
            undefined = {leaf.name for leaf, missing in zip(self.leaves, none) if missing}
            if undefined != set(self.undefined_gradients):
                return self._fall_back("vjp", "its undefined (None) gradients differ from the eager tape's", stale=True)
            mismatch = self._disagreement("vjp", result[:1], looped)
            if mismatch is not None:
                return self._fall_back("vjp", f"its gradients differ from the eager tape's ({mismatch})", stale=True)
            self._use_batched("vjp", len(cotangents))
        for leaf, missing in zip(self.leaves, none):
            if missing:
                self.undefined_gradients[leaf.name] = NO_GRADIENT
        return result
