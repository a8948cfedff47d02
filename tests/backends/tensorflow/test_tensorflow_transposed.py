"""TensorFlow ``vjp_transposed``: ``J t`` obtained by differentiating the VJP ``u -> J^T u`` again.

The ``J`` it must give is the one :meth:`vjp` implements, with the user's ``tf.custom_gradient`` rules, right or
wrong: checked against the dense Jacobian built from ``vjp`` itself (``vjp`` of the identity), on the vectorized
graph and on the eager loop. A backward pass that cannot be differentiated raises ModeUnsupportedError.

Real TensorFlow throughout; ``TensorFlowPrepared.batching = False`` (the adapter's own switch) forces the loop.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from gradbridge._adapter import CheckSpec  # noqa: E402
from gradbridge._errors import ModeUnsupportedError  # noqa: E402
from gradbridge.backends import tensorflow as tf_backend  # noqa: E402
from gradbridge.backends.tensorflow import batching as tf_batching  # noqa: E402

pytestmark = pytest.mark.tensorflow


@pytest.fixture(autouse=True)
def batch_every_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small chunks take the vectorized graph from the first call (by default they run the eager loop)."""
    monkeypatch.setattr(tf_batching, "MIN_BATCH_ROWS", 1)


@pytest.fixture(params=[True, False], ids=["batched", "loop"])
def batching(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    monkeypatch.setattr(tf_backend.TensorFlowPrepared, "batching", request.param)
    return request.param


def _normal(*shape: int, seed: int, dtype=tf.float64) -> "tf.Tensor":
    return tf.constant(np.random.default_rng(seed).normal(size=shape), dtype=dtype)


def _prepared(fn: Callable[..., Any], *args: Any, params: Any = None, wrt: Optional[tuple] = None,
              names: Optional[List[str]] = None) -> "tf_backend.TensorFlowPrepared":
    spec = CheckSpec(fn=fn, args=tuple(args), kwargs={}, params=params, wrt=wrt, grad=None, seed=0, train=False,
                     arg_names=tuple(names or [f"arg{i}" for i in range(len(args))]))
    return tf_backend.ADAPTER.prepare(spec)


def _products(prepared: "tf_backend.TensorFlowPrepared", count: int = 5, seed: int = 1):
    """(J t from vjp_transposed, J t from the dense Jacobian vjp gives, the tangents), inside the session."""
    tangents = np.random.default_rng(seed).normal(size=(count, len(prepared.x0)))
    with prepared.session():
        m = prepared.evaluate(prepared.x0[None]).shape[1]
        transposed = prepared.vjp_transposed(tangents)
        jacobian = prepared.vjp(np.eye(m))  # row i is e_i^T J, so this is J itself
    return transposed, tangents @ jacobian.T, tangents


def _assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-10 * max(1.0, np.abs(expected).max()))


def _path(prepared: "tf_backend.TensorFlowPrepared", batching: bool) -> None:
    """The transposed products ran on the path the test asked for."""
    assert prepared._paths["transposed"].path == ("batched" if batching else None), prepared.notes


# --- J t equals the Jacobian vjp implements ---


def test_plain_function(batching: bool) -> None:
    prepared = _prepared(lambda x, w: tf.tanh(x @ w) * tf.reduce_sum(x), _normal(3, 4, seed=2), _normal(4, 2, seed=3))
    transposed, dense, _ = _products(prepared)
    _assert_close(transposed, dense)
    _path(prepared, batching)


def test_several_outputs_and_an_unused_input(batching: bool) -> None:
    """An input without a gradient (used through an integer cast) gives zero columns and is recorded."""
    def fn(x, y):
        steps = tf.cast(tf.cast(y, tf.int32), tf.float64)  # piecewise constant: TensorFlow gives None
        return tf.exp(x) * 2.0, {"s": tf.reduce_sum(x ** 3) + tf.reduce_sum(steps)}

    prepared = _prepared(fn, _normal(4, seed=4), tf.constant([1.5, 2.5], tf.float64))
    transposed, dense, tangents = _products(prepared)
    _assert_close(transposed, dense)
    assert set(prepared.undefined_gradients) == {"arg1"}
    moved = tangents.copy()
    moved[:, 4:] += 1.0  # the unused input's columns of J are zero
    with prepared.session():
        _assert_close(prepared.vjp_transposed(moved), transposed)


def test_keras_model(batching: bool) -> None:
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh", name="hidden"),
                              keras.layers.Dense(2, name="head")])
    model(np.zeros((1, 4), np.float32))
    before = [v.numpy().copy() for v in model.variables]
    x = tf.constant(np.random.default_rng(6).normal(size=(3, 4)).astype(np.float32))
    prepared = _prepared(lambda x: model(x), x, params=model)
    assert len(prepared.x0) == 12 + 4 * 5 + 5 + 5 * 2 + 2  # the input and every weight
    transposed, dense, _ = _products(prepared)
    _assert_close(transposed, dense)
    _path(prepared, batching)
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, model.variables))


def test_plain_tf_variables_as_params(batching: bool) -> None:
    """Checked tf.Variables are assigned per call, so the eager loop runs; they are restored afterwards."""
    w = tf.Variable(_normal(3, 2, seed=7))
    before = w.numpy().copy()
    prepared = _prepared(lambda x: tf.sin(x @ w), _normal(4, 3, seed=8), params=[w])
    transposed, dense, _ = _products(prepared)
    _assert_close(transposed, dense)
    assert np.array_equal(w.numpy(), before)


def _cube(kind: str) -> Callable[[Any], Any]:
    """x^3 through a custom gradient: right, with its sign flipped, or missing the factor 3."""
    factor = {"right": 3.0, "sign flip": -3.0, "missing factor": 1.0}[kind]

    @tf.custom_gradient
    def cube(x):
        return x ** 3, lambda g: factor * x ** 2 * g

    return cube


def _matmul(bug: bool) -> Callable[[Any, Any], Any]:
    @tf.custom_gradient
    def matmul(a, b):
        return a @ b, lambda g: ((g @ b) if bug else g @ tf.transpose(b), tf.transpose(a) @ g)

    return matmul


def test_custom_gradient_op(batching: bool) -> None:
    cube, matmul = _cube("right"), _matmul(False)
    prepared = _prepared(lambda a, b: tf.tanh(matmul(cube(a), b)), _normal(3, 3, seed=9), _normal(3, 3, seed=10))
    transposed, dense, tangents = _products(prepared)
    _assert_close(transposed, dense)
    _path(prepared, batching)
    true = _prepared(lambda a, b: tf.tanh((a ** 3) @ b), _normal(3, 3, seed=9), _normal(3, 3, seed=10))
    with true.session():
        _assert_close(transposed, true.vjp_transposed(tangents))


@pytest.mark.parametrize("kind", ["sign flip", "missing factor"])
def test_a_wrong_custom_gradient_gives_the_wrong_jacobian_vjp_implies(kind: str, batching: bool) -> None:
    x = _normal(6, seed=11)
    prepared = _prepared(lambda x: _cube(kind)(x) * tf.reduce_sum(x), x)
    transposed, dense, tangents = _products(prepared)
    _assert_close(transposed, dense)  # the J of the rule, as vjp has it
    true = _prepared(lambda x: x ** 3 * tf.reduce_sum(x), x)
    with true.session():
        right = true.vjp_transposed(tangents)
    assert not np.allclose(transposed, right, rtol=1e-3), "the seeded bug must show in J t"


def test_a_transposed_matmul_bug_is_consistent_with_vjp(batching: bool) -> None:
    matmul = _matmul(True)
    prepared = _prepared(lambda a, b: matmul(a, b), _normal(3, 3, seed=12), _normal(3, 3, seed=13))
    transposed, dense, _ = _products(prepared)
    _assert_close(transposed, dense)


# --- a backward pass that cannot be differentiated ---


def _numpy_rule(x):
    @tf.custom_gradient
    def cube(x):
        def grad(g):
            return tf.numpy_function(lambda g, x: 3.0 * x ** 2 * g, [g, x], tf.float64)

        return x ** 3, grad

    return tf.reduce_sum(tf.sin(cube(x)))


def _stopped_rule(x):
    @tf.custom_gradient
    def cube(x):
        return x ** 3, lambda g: 3.0 * x ** 2 * tf.stop_gradient(g)

    return tf.sin(cube(x))


@pytest.mark.parametrize("fn", [_numpy_rule, _stopped_rule], ids=["numpy rule", "stop_gradient rule"])
def test_an_untransposable_rule_raises_mode_unsupported(fn: Callable[[Any], Any], batching: bool) -> None:
    prepared = _prepared(fn, _normal(4, seed=14))
    with prepared.session():
        assert np.all(np.isfinite(prepared.vjp(np.ones((1, 4 if fn is _stopped_rule else 1)))))  # vjp is fine
        with pytest.raises(ModeUnsupportedError, match="cannot transpose the VJP.*arg0"):
            prepared.vjp_transposed(np.ones((2, 4)))


def test_an_op_whose_gradient_has_no_gradient_raises_mode_unsupported(batching: bool) -> None:
    """tf.nn.softsign's gradient is the op SoftsignGrad, for which TensorFlow registers no gradient."""
    prepared = _prepared(lambda x: tf.nn.softsign(x) * 2.0, _normal(4, seed=15))
    with prepared.session():
        with pytest.raises(ModeUnsupportedError, match="cannot transpose the VJP.*SoftsignGrad"):
            prepared.vjp_transposed(np.ones((1, 4)))


def test_a_fused_loss_without_a_second_derivative_still_transposes(batching: bool) -> None:
    """TensorFlow forbids differentiating sparse_softmax_cross_entropy_with_logits twice with respect to the
    logits, but its VJP is linear in the cotangent and transposes fine."""
    labels = tf.constant([0, 2, 1])
    prepared = _prepared(lambda logits: tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits),
                         _normal(3, 3, seed=15))
    transposed, dense, _ = _products(prepared)
    _assert_close(transposed, dense)
    _path(prepared, batching)


def test_only_the_untransposable_leaf_matters(batching: bool) -> None:
    """A leaf whose rule cannot be transposed raises even when the others can: J t would silently miss it."""
    def fn(x, y):
        return _stopped_rule(x) + tf.reduce_sum(y ** 2)

    prepared = _prepared(fn, _normal(3, seed=16), _normal(3, seed=17), names=["x", "y"])
    with prepared.session():
        with pytest.raises(ModeUnsupportedError, match="gradient of x"):
            prepared.vjp_transposed(np.ones((1, 6)))
    only_y = _prepared(fn, _normal(3, seed=16), _normal(3, seed=17), wrt=("y",), names=["x", "y"])
    transposed, dense, _ = _products(only_y)
    _assert_close(transposed, dense)


# --- kept across checks ---


def test_the_transposed_graph_is_kept_for_the_next_check() -> None:
    tf_backend.clear_cache()
    cube = _cube("sign flip")
    fn = lambda x: tf.reduce_sum(cube(x) * x)  # noqa: E731
    first = _prepared(fn, _normal(5, seed=18))
    transposed, dense, _ = _products(first)
    _assert_close(transposed, dense)
    graph = first._graphs["transposed"]
    second = _prepared(fn, _normal(5, seed=19))  # another point, the same graph
    transposed, dense, _ = _products(second, seed=2)
    _assert_close(transposed, dense)
    assert second._graphs["transposed"] is graph and tf_backend.cache_size() == 1, second.notes
    tf_backend.clear_cache()
