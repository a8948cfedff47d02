"""The vectorized graphs: one ``tf.function`` through ``tf.vectorized_map`` per computation of a check.

Invariant: a traced graph takes as inputs everything that changes between checks with the same cache key (the
points or ``x0``, the cotangents or tangents, the problem's fixed inputs: see
:meth:`TensorFlowProblem.fixed_inputs`), so it holds for every such check; and a graph is handed out only when
it has no op that would make it differ from the eager loop by construction (ops calling back into Python,
random ops reseeded before each point in the loop, ops with side effects that would run once for all points).
A graph that cannot be vectorized without a while_loop is refused, never silently looped.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import tensorflow as tf

from gradbridge._adapter import LeafSpec

from . import compat
from .problem import TensorFlowProblem
from .tensors import Forward, dense, first_line, flat, joined, watch
from .transposed import pullback, transposed_row

#: Ops calling back into Python (``tf.py_function``, ``tf.numpy_function``).
PYTHON_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}

#: Stateful op types that are safe in a vectorized graph: reads, and containers whose bodies are scanned too.
HARMLESS_STATEFUL = {"ReadVariableOp", "VarHandleOp", "StatefulPartitionedCall", "PartitionedCall", "If",
                     "While", "Case", "NoOp", "Placeholder", "PlaceholderWithDefault"}

#: What a graph builder returns: the Python function to trace and its input signature (before the fixed inputs).
Built = Tuple[Callable[..., Any], list]


def unsafe_ops(graph: Any) -> Optional[str]:
    """Why a traced vectorized graph must not replace the eager loop: ops calling back into Python
    (``tf.py_function``, ``tf.numpy_function``), or random ops (reseeded before each point in the loop;
    one graph would draw differently). None when there are none."""
    definition = graph.as_graph_def()
    types = {node.op for node in definition.node}
    types.update(node.op for function in definition.library.function for node in function.node_def)
    python = sorted(types & PYTHON_OPS)
    if python:
        return f"fn calls Python through {', '.join(python)} (tf.py_function or tf.numpy_function)"
    random_ops = sorted(t for t in types if "Random" in t or "Multinomial" in t or t.startswith("Rng")
                        or (t.startswith("Stateful") and t != "StatefulPartitionedCall"))
    if random_ops:
        return (f"fn draws random numbers ({', '.join(random_ops[:3])}; e.g. dropout in training mode), "
                "reseeded before each point")
    # any other op with an effect (an assertion, a print, a variable update) would run for one point only
    effects = sorted(t for t in types if t not in HARMLESS_STATEFUL and compat.op_is_stateful(t))
    if effects:
        return (f"fn runs ops with side effects ({', '.join(effects[:3])}: assertions, prints, variable updates), "
                "which a vectorized graph would run for one point only")
    return None


def trace(which: str, problem: TensorFlowProblem, forward: Forward, leaves: Sequence[LeafSpec], n: int, m: int
          ) -> Tuple[Optional[Any], Dict[str, List[bool]], Optional[str]]:
    """Build (trace) the vectorized ``tf.function`` for ``which`` (``"evaluate"``, ``"vjp"``, ``"transposed"``)
    over ``n`` inputs and ``m`` outputs. Returns the concrete function, the flags found while tracing (per
    leaf: ``"none"``, the gradient is None; ``"links"``, see :func:`.transposed.pullback`) and None, or
    ``(None, {}, why it cannot be used)``."""
    flags: Dict[str, List[bool]] = {}
    build = {"evaluate": evaluate_graph, "vjp": vjp_graph, "transposed": transposed_graph}
    graph, signature = build[which](problem, forward, leaves, n, m, flags)
    fixed = [tf.TensorSpec(t.shape, t.dtype) for t in problem.fixed_inputs()]
    try:
        with compat.quiet_pfor_errors():
            concrete = tf.function(graph, input_signature=signature + fixed, autograph=False).get_concrete_function()
    except Exception as exc:  # not vectorizable (an op without a pfor rule), or graph-only trouble in fn
        return None, {}, f"it could not be vectorized ({type(exc).__name__}: {first_line(exc)})"
    unsafe = unsafe_ops(concrete.graph)
    if unsafe is not None:
        return None, {}, unsafe
    return concrete, flags, None


def evaluate_graph(problem: TensorFlowProblem, forward: Forward, leaves: Sequence[LeafSpec], n: int, m: int,
                   flags: Dict[str, List[bool]]) -> Built:
    """``(base, repeat, positions, values, *fixed) -> outputs``, one row per point. The points are the rows
    of ``base`` repeated ``repeat`` times with element ``positions[k]`` of row k set to ``values[k]``: given
    points (``repeat`` 1, no edits), or ``x0`` and the edits of an element-by-element check (built here,
    next to the computation, rather than written by NumPy and copied in)."""

    def graph(base: tf.Tensor, repeat: tf.Tensor, positions: tf.Tensor, values: tf.Tensor,
              *fixed: tf.Tensor) -> tf.Tensor:
        def one_point(x: tf.Tensor) -> tf.Tensor:
            with problem.symbolic(x, fixed) as sources:
                return flat(forward(sources))

        points = tf.tile(base, tf.stack([repeat, 1]))
        edits = tf.stack([tf.range(tf.shape(positions)[0]), positions], axis=1)
        points = tf.tensor_scatter_nd_update(points, edits, values)
        return tf.vectorized_map(one_point, points, fallback_to_while_loop=False)

    return graph, [tf.TensorSpec([None, n], tf.float64), tf.TensorSpec([], tf.int32),
                   tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.float64)]


def vjp_graph(problem: TensorFlowProblem, forward: Forward, leaves: Sequence[LeafSpec], n: int, m: int,
              flags: Dict[str, List[bool]]) -> Built:
    """``(x, cotangents, *fixed) -> VJPs``: one recorded forward pass at ``x``, ``tape.gradient``
    vectorized over the cotangents; ``flags["none"]``: the leaves whose gradient is None."""

    def graph(x: tf.Tensor, cotangents: tf.Tensor, *fixed: tf.Tensor) -> tf.Tensor:
        with problem.symbolic(x, fixed) as sources:
            with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
                watch(tape, sources)
                out = flat(forward(sources))

            def one_cotangent(cotangent: tf.Tensor) -> tf.Tensor:
                gradients = [dense(g) for g in tape.gradient(out, sources, output_gradients=cotangent)]
                flags["none"] = [g is None for g in gradients]
                return joined(leaves, gradients)

            return tf.vectorized_map(one_cotangent, cotangents, fallback_to_while_loop=False)

    return graph, [tf.TensorSpec([n], tf.float64), tf.TensorSpec([None, m], tf.float64)]


def transposed_graph(problem: TensorFlowProblem, forward: Forward, leaves: Sequence[LeafSpec], n: int, m: int,
                     flags: Dict[str, List[bool]]) -> Built:
    """``(x, u, tangents, *fixed) -> (J t per tangent, J^T u)``: the VJP for the cotangent ``u``, recorded
    once, differentiated with respect to ``u`` vectorized over the tangents (see :func:`.transposed.pullback`)."""

    def graph(x: tf.Tensor, u: tf.Tensor, tangents: tf.Tensor, *fixed: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
        with problem.symbolic(x, fixed) as sources:
            tape, g, gradients, links = pullback(forward, sources, leaves, u)
            flags["none"] = [grad is None for grad in gradients]
            flags["links"] = links
            rows = tf.vectorized_map(lambda t: transposed_row(tape, g, u, t), tangents,
                                     fallback_to_while_loop=False)
            return rows, g

    return graph, [tf.TensorSpec([n], tf.float64), tf.TensorSpec([m], tf.float64),
                   tf.TensorSpec([None, n], tf.float64)]
