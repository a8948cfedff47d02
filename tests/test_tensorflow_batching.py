"""TensorFlow batched evaluation and VJPs: which path runs (one vectorized ``tf.function`` per chunk, or the
eager loop) and why, agreement of the two paths, seeded bugs caught and correct functions passing either way.

Real TensorFlow throughout; ``TensorFlowPrepared.batching = False`` (the adapter's own switch) forces the loop.
"""

from __future__ import annotations

import time
from typing import Any, Callable, List, Tuple

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import gradbridge as gb  # noqa: E402
from gradbridge._adapter import CheckSpec  # noqa: E402
from gradbridge.backends import tensorflow as tf_backend  # noqa: E402

pytestmark = pytest.mark.tensorflow

BATCHED_EVAL = "TensorFlow evaluations batched"
LOOP_EVAL = "TensorFlow evaluations one point at a time"
BATCHED_VJP = "TensorFlow reverse-mode products (VJPs) batched"
LOOP_VJP = "TensorFlow reverse-mode products (VJPs) one cotangent at a time"


def _normal(*shape: int, seed: int, dtype=tf.float64) -> "tf.Tensor":
    return tf.constant(np.random.default_rng(seed).normal(size=shape), dtype=dtype)


def _notes(report: Any, prefix: str) -> List[str]:
    return [note for note in report.notes if note.startswith(prefix)]


@pytest.fixture(autouse=True)
def batch_every_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests check the batched path on small inputs: trace it from the first chunk, whatever its
    size (by default chunks under MIN_BATCH_ROWS run the loop; tested at the end of this file)."""
    monkeypatch.setattr(tf_backend, "MIN_BATCH_ROWS", 1)


@pytest.fixture
def loop_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tf_backend.TensorFlowPrepared, "batching", False)


def _mlp() -> "keras.Model":
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh", name="hidden"),
                              keras.layers.Dense(2, name="head")])
    model(np.zeros((1, 4), np.float32))
    return model


def _dropout_model() -> "keras.Model":
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dropout(0.4),
                              keras.layers.Dense(2)])
    model(np.zeros((1, 4), np.float32))
    return model


# --- which path runs ---


@pytest.mark.parametrize("mode", ["full", "fast"])
def test_plain_functions_take_the_batched_path(mode: str) -> None:
    for fn, args in [(lambda x: tf.reduce_sum(tf.sin(x) * x ** 2), (_normal(6, seed=1),)),
                     (tf.tanh, (_normal(3, 2, seed=2),)),
                     (tf.function(lambda a, b: tf.matmul(a, b)), (_normal(2, 3, seed=3), _normal(3, 2, seed=4)))]:
        report = gb.check(fn, *args, mode=mode)
        assert report.passed, str(report)
        assert _notes(report, BATCHED_EVAL) and not _notes(report, LOOP_EVAL), report.notes
        if mode == "full":
            assert _notes(report, BATCHED_VJP) and not _notes(report, LOOP_VJP), report.notes


def test_keras_model_takes_the_batched_path() -> None:
    model = _mlp()
    before = [v.numpy().copy() for v in model.variables]
    x = np.random.default_rng(5).normal(size=(3, 4)).astype(np.float32)
    report = gb.check(lambda x: tf.reduce_sum(model(x) ** 2), tf.constant(x), params=model)
    assert report.passed, str(report)
    assert _notes(report, BATCHED_EVAL) and _notes(report, BATCHED_VJP), report.notes
    assert any("float64" in note and "Keras model" in note for note in report.notes), report.notes
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, model.variables))  # the model is untouched


def test_py_function_falls_back_to_the_loop() -> None:
    def fn(x):
        return tf.py_function(lambda t: tf.sin(t) * 2.0, [x], tf.float64)

    def wrapped(x):
        @tf.custom_gradient
        def op(x):
            return fn(x), lambda g: g * 2.0 * tf.cos(x)

        return tf.reduce_sum(op(x))

    report = gb.check(wrapped, _normal(5, seed=6))
    assert report.passed, str(report)
    assert _notes(report, LOOP_EVAL) and not _notes(report, BATCHED_EVAL), report.notes


def test_numpy_call_in_fn_falls_back_to_the_loop() -> None:
    def fn(x):
        scale = float(np.max(np.abs(x.numpy())))  # eager only: graph tracing raises, so the loop runs
        return tf.reduce_sum(x ** 2) * scale

    report = gb.check(fn, tf.constant([0.5, -2.0, 1.0], tf.float64), mode="fast")
    assert _notes(report, LOOP_EVAL), report.notes


def test_data_dependent_python_control_flow_falls_back_to_the_loop() -> None:
    def fn(x):
        if tf.reduce_sum(x) > 0:  # a Python branch on a tensor value
            return tf.reduce_sum(x ** 2)
        return tf.reduce_sum(x ** 3)

    report = gb.check(fn, _normal(4, seed=7) + 3.0)
    assert report.passed, str(report)
    assert _notes(report, LOOP_EVAL) and _notes(report, LOOP_VJP), report.notes


def test_train_mode_dropout_falls_back_to_the_loop() -> None:
    model = _dropout_model()
    x = np.random.default_rng(8).normal(size=(3, 4)).astype(np.float32)
    report = gb.check(lambda x: tf.reduce_sum(model(x) ** 2), tf.constant(x), params=model, train=True,
                      mode="fast")
    assert report.passed, str(report)
    notes = _notes(report, LOOP_EVAL)
    assert notes and "random" in notes[0], report.notes
    # in inference mode the same model is batched
    report = gb.check(lambda x: tf.reduce_sum(model(x) ** 2), tf.constant(x), params=model, mode="fast")
    assert report.passed and _notes(report, BATCHED_EVAL), report.notes


def test_stateful_random_ops_fall_back_to_the_loop() -> None:
    report = gb.check(lambda x: tf.reduce_sum(x * tf.random.normal([4], dtype=tf.float64)), _normal(4, seed=9))
    assert report.passed, str(report)
    assert _notes(report, LOOP_EVAL), report.notes


def test_plain_tf_variables_fall_back_to_the_loop() -> None:
    w = tf.Variable(np.random.default_rng(10).normal(size=(3,)), dtype=tf.float64)
    before = w.numpy().copy()
    report = gb.check(lambda x: tf.reduce_sum(tf.sin(x * w)), _normal(3, seed=11), params=[w])
    assert report.passed, str(report)
    assert any("tf.Variables" in note for note in _notes(report, LOOP_EVAL)), report.notes
    assert np.array_equal(w.numpy(), before)


def test_a_raising_function_still_names_the_point() -> None:
    def fn(x):
        tf.debugging.assert_less(x, tf.constant(1.0, tf.float64))
        return tf.reduce_sum(x ** 2)

    with pytest.raises(gb.FunctionEvaluationError) as info:
        gb.check(fn, tf.constant([0.5, 1.0 - 1e-9], tf.float64), mode="full")
    assert "InvalidArgumentError" in str(info.value) and "+ h" in str(info.value), str(info.value)


# --- the two paths agree ---


def _prepared(fn: Callable[..., Any], *args: Any, params: Any = None, train: bool = False):
    spec = CheckSpec(fn=fn, args=tuple(args), kwargs={}, params=params, wrt=None, grad=None, seed=0, train=train,
                     arg_names=tuple(f"arg{i}" for i in range(len(args))))
    return tf_backend.ADAPTER.prepare(spec)


AGREEMENT = [
    ("sin-x-squared", lambda: (lambda x: tf.reduce_sum(tf.sin(x) * x ** 2), (_normal(7, seed=12),), None)),
    ("softmax-matmul", lambda: (lambda a, b: tf.nn.softmax(a @ b, axis=-1), (_normal(3, 4, seed=13),
                                                                             _normal(4, 5, seed=14)), None)),
    ("several-outputs", lambda: (lambda x, y: (tf.exp(x) * y, {"s": tf.reduce_sum(x * tf.cos(y))}),
                                 (_normal(4, seed=15), _normal(4, seed=16)), None)),
    ("custom-gradient", lambda: (lambda x: tf.reduce_sum(_cube(False)(x)), (_normal(3, 2, seed=17),), None)),
    ("gather-and-logsumexp", lambda: (lambda x: tf.reduce_logsumexp(tf.gather(x, [2, 0, 2, 1]) * 3.0),
                                      (_normal(3, seed=18),), None)),
    ("keras-mlp", lambda: ((lambda m: (lambda x: m(x)))(_mlp()), (tf.constant(np.ones((2, 4), np.float32)),),
                           "model")),
]


@pytest.mark.parametrize("name,make", AGREEMENT, ids=[a[0] for a in AGREEMENT])
def test_batched_and_looped_results_agree(name: str, make: Callable[[], Tuple[Any, tuple, Any]]) -> None:
    fn, args, params = make()
    if params == "model":
        params = fn.__closure__[0].cell_contents
    prepared = _prepared(fn, *args, params=params)
    n = len(prepared.x0)
    rng = np.random.default_rng(19)
    points = prepared.x0 + 0.1 * rng.normal(size=(9, n))
    with prepared.session():
        batched = prepared.evaluate(points)
        looped = prepared._evaluate_loop(points)
        m = looped.shape[1]
        cotangents = rng.normal(size=(5, m))
        vjp_batched = prepared.vjp(cotangents)
        vjp_looped = prepared._vjp_loop(cotangents)
    assert prepared._paths == {"evaluate": "batched", "vjp": "batched"}, prepared.notes
    np.testing.assert_allclose(batched, looped, rtol=1e-12, atol=1e-12 * np.abs(looped).max())
    np.testing.assert_allclose(vjp_batched, vjp_looped, rtol=1e-12, atol=1e-12 * np.abs(vjp_looped).max())


def test_undefined_gradients_are_kept_by_the_batched_vjp() -> None:
    fn = lambda x, y: tf.reduce_sum(x ** 2) + tf.reduce_sum(tf.cast(tf.cast(y, tf.int32), tf.float64))  # noqa: E731
    prepared = _prepared(fn, _normal(3, seed=20), tf.constant([1.5, 2.5], tf.float64))
    with prepared.session():
        rows = prepared.vjp(np.ones((2, 1)))
    assert prepared._paths["vjp"] == "batched", prepared.notes
    assert set(prepared.undefined_gradients) == {"arg1"}
    np.testing.assert_array_equal(rows[:, 3:], 0.0)
    report = gb.check(fn, _normal(3, seed=20), tf.constant([1.5, 2.5], tf.float64))
    assert report.row("y").status == "no-gradient" and report.row("y").passed, str(report)


# --- seeded bugs through both paths ---


def _cube(bug: bool):
    @tf.custom_gradient
    def cube(x):
        return x ** 3, lambda g: (-1.0 if bug else 1.0) * 3.0 * x ** 2 * g

    return cube


def _matmul(bug: bool):
    @tf.custom_gradient
    def matmul(a, b):
        return a @ b, lambda g: ((g @ b) if bug else g @ tf.transpose(b), tf.transpose(a) @ g)

    return matmul


def _tanh(bug: bool):
    factor = np.ones(50)
    if bug:
        factor[7] = 1.5

    @tf.custom_gradient
    def tanh(x):
        y = tf.tanh(x)
        return y, lambda g: g * (1 - y ** 2) * factor

    return tanh


BUGS = [
    ("sign flip", _cube, lambda: (_normal(3, 4, seed=21),), "x"),
    ("transposed matmul gradient", _matmul, lambda: (_normal(3, 3, seed=22), _normal(3, 3, seed=23)), "a"),
    ("one element of fifty", _tanh, lambda: (_normal(50, seed=24),), "x"),
]


@pytest.mark.parametrize("batching", [True, False], ids=["batched", "loop"])
@pytest.mark.parametrize("mode", ["full", "fast"])
@pytest.mark.parametrize("name,make,inputs,failing", BUGS, ids=[b[0] for b in BUGS])
def test_seeded_bugs_caught_and_fixes_pass(name: str, make: Callable[[bool], Any], inputs: Callable[[], tuple],
                                           failing: str, mode: str, batching: bool,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tf_backend.TensorFlowPrepared, "batching", batching)
    bad = gb.check(make(True), *inputs(), mode=mode)
    assert not bad.passed and bad.failures, str(bad)
    good = gb.check(make(False), *inputs(), mode=mode)
    assert good.passed, str(good)
    expected = BATCHED_EVAL if batching else None
    if expected:
        assert _notes(good, BATCHED_EVAL), good.notes
    else:
        assert not _notes(good, BATCHED_EVAL) and not _notes(good, LOOP_EVAL), good.notes


def test_second_order_through_the_batched_path() -> None:
    fn = lambda x, w: tf.reduce_sum(tf.sin(x @ w) ** 2)  # noqa: E731
    report = gb.check(fn, _normal(2, 3, seed=25), _normal(3, 2, seed=26), order=2)
    assert report.passed and {row.order for row in report.rows} == {1, 2}, str(report)


def test_loop_only_switch(loop_only: None) -> None:
    report = gb.check(lambda x: tf.reduce_sum(x ** 3), _normal(4, seed=27))
    assert report.passed and not _notes(report, BATCHED_EVAL), report.notes


# --- speed (printed, not asserted) ---


def test_speed_sanity(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    x = _normal(1024, seed=28)
    fn = lambda x: tf.reduce_sum(tf.sin(x) * x ** 2)  # noqa: E731
    times = {}
    for batching in (True, False):
        monkeypatch.setattr(tf_backend.TensorFlowPrepared, "batching", batching)
        gb.check(fn, x, mode="full")  # warm-up
        start = time.perf_counter()
        report = gb.check(fn, x, mode="full")
        times[batching] = time.perf_counter() - start
        assert report.passed, str(report)
    with capsys.disabled():
        print(f"\n[speed] gb.check full, n=1024: batched {times[True]:.3f}s, loop {times[False]:.3f}s, "
              f"x{times[False] / times[True]:.1f}")


def test_small_checks_skip_the_trace_and_large_ones_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """By default a check whose chunks are all smaller than MIN_BATCH_ROWS runs the eager loop (tracing
    would cost more than it saves); a larger one traces the vectorized graph."""
    monkeypatch.setattr(tf_backend, "MIN_BATCH_ROWS", 64)
    small = gb.check(lambda x: tf.reduce_sum(tf.sin(x) * x ** 2), _normal(6, seed=21))
    assert small.passed and not _notes(small, BATCHED_EVAL), small.notes
    large = gb.check(lambda x: tf.reduce_sum(tf.sin(x) * x ** 2), _normal(100, seed=22))
    assert large.passed and _notes(large, BATCHED_EVAL), large.notes
