"""``evaluate_edits``: the points of an element-by-element check built by the adapter, not by the core.

An element-by-element check evaluates ``x0`` with one element moved, 2n times. Adapters that can build
those points next to the computation implement ``evaluate_edits(positions, values)``; it must give
exactly what ``evaluate`` gives for the same points, batched or not, and a check through it must still
catch and name a bug on one element far into the vector, across many chunks. Backends without the method
(and checks with an executor) go through ``evaluate`` with points the core builds. Real frameworks only.
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import numpy as np
import pytest

import gradbridge as gb
from gradbridge._adapter import CheckSpec
from gradbridge._checking.evaluate import Evaluator
from gradbridge._registry import get_adapter
from kits import make_op

from backend_matrix import require_backend

EDITING_BACKENDS = ("torch", "jax", "tensorflow")


def _prepare(backend: str, fn: Callable[..., Any], *args: Any):
    spec = CheckSpec(fn=fn, args=args, kwargs={}, params=None, wrt=None, grad=None, seed=0, train=False,
                     arg_names=tuple(f"arg{i}" for i in range(len(args))), promote=True)
    return get_adapter(backend).prepare(spec)


def _edited(x0: np.ndarray, positions: np.ndarray, values: np.ndarray) -> np.ndarray:
    points = np.tile(x0, (len(positions), 1))
    points[np.arange(len(positions)), positions] = values
    return points


def _native(backend: str) -> Tuple[Callable[..., Any], Callable[[np.ndarray], Any]]:
    """``sum(sin(x) * x**2) + x[3] * x[-1]`` written in the backend's own ops, and its array converter."""
    if backend == "torch":
        import torch
        return (lambda x: (torch.sin(x) * x ** 2).sum() + x[3] * x[-1]), torch.from_numpy
    if backend == "jax":
        import jax.numpy as jnp
        return (lambda x: jnp.sum(jnp.sin(x) * x ** 2) + x[3] * x[-1]), jnp.asarray
    import tensorflow as tf
    return (lambda x: tf.reduce_sum(tf.sin(x) * x ** 2) + x[3] * x[-1]), tf.constant


def _built_natively(backend: str, prepared: Any) -> bool:
    """Whether the adapter's own way of building the points is in use (not the NumPy points fallback)."""
    if backend == "torch":
        return prepared.paths["evaluate"].batched
    if backend == "jax":
        return not prepared.eager_path.looped and prepared._compiled is not None
    return prepared._paths["evaluate"].batched and "evaluate" in prepared._graphs


@pytest.mark.parametrize("backend", EDITING_BACKENDS)
def test_edits_equal_evaluating_the_same_points(backend: str) -> None:
    require_backend(backend)
    fn, native = _native(backend)
    x = np.random.default_rng(0).normal(size=300)
    rng = np.random.default_rng(1)
    positions = rng.integers(0, 300, size=40)
    prepared = _prepare(backend, fn, native(x))
    values = prepared.x0[positions] + rng.normal(size=40) * 1e-3
    with prepared.session():
        prepared.evaluate(np.tile(prepared.x0, (64, 1)))  # the first batch decides the path
        edited = prepared.evaluate_edits(positions, values)
        expected = prepared.evaluate(_edited(prepared.x0, positions, values))
        single = prepared.evaluate_edits(positions[:1], values[:1])
        expected_single = prepared.evaluate(_edited(prepared.x0, positions[:1], values[:1]))
    assert _built_natively(backend, prepared)
    assert edited.dtype == np.float64 and edited.shape == (40, 1)
    np.testing.assert_array_equal(edited, expected)
    np.testing.assert_array_equal(single, expected_single)
    assert not np.array_equal(edited[:, 0], np.full(40, edited[0, 0]))  # the edits did change the points


@pytest.mark.parametrize("backend", EDITING_BACKENDS)
def test_edits_leave_x0_alone_and_count_as_evaluations(backend: str) -> None:
    require_backend(backend)
    fn, native = _native(backend)
    prepared = _prepare(backend, fn, native(np.linspace(-1.0, 1.0, 64)))
    before = prepared.x0.copy()
    evaluator = Evaluator(prepared, chunk_size=16)
    with prepared.session():
        evaluator.evaluate(np.tile(prepared.x0, (16, 1)))
        out = evaluator.evaluate_edits(np.arange(50), prepared.x0[:50] + 0.5)
    assert evaluator.evaluations == 66 and out.shape == (50, 1)
    np.testing.assert_array_equal(prepared.x0, before)


def test_without_the_method_the_core_builds_the_points() -> None:
    spec = CheckSpec(fn=lambda x: np.sum(np.sin(x) * x ** 2), args=(np.linspace(-1.0, 1.0, 20),), kwargs={},
                     params=None, wrt=None, grad=lambda x: (np.cos(x) * x ** 2 + 2 * x * np.sin(x),), seed=0,
                     train=False, arg_names=("x",), promote=True)
    prepared = get_adapter("numpy").prepare(spec)
    assert not hasattr(prepared, "evaluate_edits")
    evaluator = Evaluator(prepared, chunk_size=7)
    positions = np.array([0, 5, 19, 5])
    values = np.array([3.0, -1.0, 0.25, 2.0])
    with prepared.session():
        out = evaluator.evaluate_edits(positions, values)
        expected = prepared.evaluate(_edited(prepared.x0, positions, values))
    np.testing.assert_array_equal(out, expected)
    assert evaluator.evaluations == 4


@pytest.mark.parametrize("backend", EDITING_BACKENDS)
def test_a_native_scalar_loss_passes_through_edits(backend: str) -> None:
    require_backend(backend)
    fn, native = _native(backend)
    report = gb.check(fn, native(np.random.default_rng(2).normal(size=500)), mode="full", chunk_size=64)
    assert report.passed and report.rows[0].kinks == 0, report
    assert report.evaluations >= 1000


def _native_custom_loss(backend: str, scale: np.ndarray) -> Tuple[Callable[..., Any], Callable[[np.ndarray], Any]]:
    """``sum(sin(x) * x**2)`` with a custom backward written in the backend's own ops (so it runs batched),
    its gradient multiplied by ``scale`` elementwise (ones: correct)."""
    grad = lambda sin, cos, x: cos(x) * x ** 2 + 2 * x * sin(x)
    if backend == "torch":
        import torch
        factor = torch.from_numpy(scale)

        class SinLoss(torch.autograd.Function):
            generate_vmap_rule = True

            @staticmethod
            def forward(x):
                return (torch.sin(x) * x ** 2).sum()

            @staticmethod
            def setup_context(ctx, inputs, output):
                ctx.save_for_backward(inputs[0])

            @staticmethod
            def backward(ctx, g):
                (x,) = ctx.saved_tensors
                return g * grad(torch.sin, torch.cos, x) * factor

        return SinLoss.apply, torch.from_numpy
    if backend == "jax":
        import jax
        import jax.numpy as jnp
        factor = jnp.asarray(scale)

        @jax.custom_vjp
        def loss(x):
            return jnp.sum(jnp.sin(x) * x ** 2)

        loss.defvjp(lambda x: (loss(x), x), lambda x, g: (g * grad(jnp.sin, jnp.cos, x) * factor,))
        return loss, jnp.asarray
    import tensorflow as tf
    factor = tf.constant(scale)

    @tf.custom_gradient
    def loss(x):
        return tf.reduce_sum(tf.sin(x) * x ** 2), lambda g: g * grad(tf.sin, tf.cos, x) * factor

    return loss, tf.constant


@pytest.mark.parametrize("backend", EDITING_BACKENDS)
@pytest.mark.parametrize("relative_error", [-2.0, 1e-6])
def test_a_bug_on_one_element_deep_in_a_scalar_loss_is_named(backend: str, relative_error: float) -> None:
    """A sign flip (relative error -2) or a 1e-6 relative error on element 437 of 500, many batches in."""
    require_backend(backend)
    x = np.random.default_rng(3).normal(size=500) + 2.0
    fn, native = _native_custom_loss(backend, np.ones(500))
    for _ in range(2):  # the second check of a function reuses what the first kept (traced graphs, compiled code)
        good = gb.check(fn, native(x), mode="full", chunk_size=64)
        assert good.passed and good.rows[0].kinks == 0, good  # smooth: no element may read as a kink
        assert any("batch" in note for note in good.notes) or backend == "jax", good.notes
    scale = np.ones(500)
    scale[437] += relative_error
    fn, native = _native_custom_loss(backend, scale)
    for _ in range(2):
        report = gb.check(fn, native(x), mode="full", chunk_size=64)
        assert not report.passed
        (failing,) = [row for row in report.rows if not row.passed]
        assert failing.worst.input_index == (437,)
        assert failing.mismatches == 1


@pytest.mark.parametrize("relative_error", [-2.0, 1e-6])
def test_a_bug_on_one_element_is_named_through_a_classic_function(relative_error: float) -> None:
    """The same bug in a classic torch Function calling NumPy (no vmap: the points are built for the loop)."""
    require_backend("torch")

    def backward(g, x):
        return (g * (np.cos(x) * x ** 2 + 2 * x * np.sin(x)),)

    def buggy(g, x):
        grad = backward(g, x)[0].copy()
        grad[437] *= 1 + relative_error
        return (grad,)

    forward = lambda x: np.sum(np.sin(x) * x ** 2)
    x = np.random.default_rng(3).normal(size=500) + 2.0
    fn, to_native, _ = make_op("torch", backward=buggy, forward=forward)
    report = gb.check(fn, to_native(x), mode="full", chunk_size=64)
    (failing,) = [row for row in report.rows if not row.passed]
    assert failing.worst.input_index == (437,) and failing.mismatches == 1
