"""TensorFlow batched evaluation and VJPs: which path runs (one vectorized ``tf.function`` per chunk, or the
eager loop) and why, agreement of the two paths, seeded bugs caught and correct functions passing either way.

Real TensorFlow throughout; ``TensorFlowPrepared.batching = False`` (the adapter's own switch) forces the loop.
"""

from __future__ import annotations

import functools
import gc
import time
import weakref
from typing import Any, Callable, List, Tuple

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import gradbridge as gb  # noqa: E402
from gradbridge._adapter import CheckSpec  # noqa: E402
from gradbridge.backends import tensorflow as tf_backend  # noqa: E402
from gradbridge.backends.tensorflow import batching as tf_batching  # noqa: E402

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
    monkeypatch.setattr(tf_batching, "MIN_BATCH_ROWS", 1)


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
        tangents = rng.normal(size=(4, n))
        transposed_batched = prepared.vjp_transposed(tangents)
        transposed_looped = prepared._transposed_loop(tangents)
        jacobian = prepared._vjp_loop(np.eye(m))  # row i: e_i^T J
    assert {which: choice.path for which, choice in prepared._paths.items()} == {
        "evaluate": "batched", "vjp": "batched", "transposed": "batched"}, prepared.notes
    np.testing.assert_allclose(batched, looped, rtol=1e-12, atol=1e-12 * np.abs(looped).max())
    np.testing.assert_allclose(vjp_batched, vjp_looped, rtol=1e-12, atol=1e-12 * np.abs(vjp_looped).max())
    expected = tangents @ jacobian.T
    np.testing.assert_allclose(transposed_batched, transposed_looped, rtol=1e-12,
                               atol=1e-12 * np.abs(transposed_looped).max())
    np.testing.assert_allclose(transposed_batched, expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())


def test_undefined_gradients_are_kept_by_the_batched_vjp() -> None:
    fn = lambda x, y: tf.reduce_sum(x ** 2) + tf.reduce_sum(tf.cast(tf.cast(y, tf.int32), tf.float64))  # noqa: E731
    prepared = _prepared(fn, _normal(3, seed=20), tf.constant([1.5, 2.5], tf.float64))
    with prepared.session():
        rows = prepared.vjp(np.ones((2, 1)))
    assert prepared._paths["vjp"].path == "batched", prepared.notes
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
    monkeypatch.setattr(tf_batching, "MIN_BATCH_ROWS", 64)
    small = gb.check(lambda x: tf.reduce_sum(tf.sin(x) * x ** 2), _normal(6, seed=21))
    assert small.passed and not _notes(small, BATCHED_EVAL), small.notes
    large = gb.check(lambda x: tf.reduce_sum(tf.sin(x) * x ** 2), _normal(100, seed=22))
    assert large.passed and _notes(large, BATCHED_EVAL), large.notes


# --- traced graphs kept across checks of the same function ---


def _counted(body: Callable[..., Any]) -> Tuple[Callable[..., Any], List[int]]:
    """``body`` wrapped in a function that counts its traces (graph-mode calls), as a user's Python counter."""
    traces: List[int] = []

    @functools.wraps(body)  # keeps body's argument names for wrt=
    def fn(*args: Any) -> Any:
        if not tf.executing_eagerly():
            traces.append(1)
        return body(*args)

    return fn, traces


@pytest.fixture
def fresh_cache() -> None:
    tf_backend.clear_cache()
    yield
    tf_backend.clear_cache()


def test_a_repeat_check_reuses_the_traced_graphs(fresh_cache: None) -> None:
    fn, traces = _counted(lambda x: tf.reduce_sum(tf.sin(x) * x ** 2))
    x = _normal(6, seed=30)
    first = gb.check(fn, x)
    assert first.passed and _notes(first, BATCHED_EVAL) and _notes(first, BATCHED_VJP), first.notes
    traced = len(traces)
    assert traced > 0 and tf_backend.cache_size() == 1
    for _ in range(2):
        again = gb.check(fn, x)
        assert again.passed and _notes(again, BATCHED_EVAL) and _notes(again, BATCHED_VJP), again.notes
    assert len(traces) == traced and tf_backend.cache_size() == 1  # nothing traced again
    gb.check(fn, _normal(6, seed=31))  # another point, same shapes: the same graphs
    assert len(traces) == traced and tf_backend.cache_size() == 1


def test_small_checks_trace_once_the_function_is_checked_again(fresh_cache: None,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """With the default MIN_BATCH_ROWS, a small check runs the eager loop (a one-off check does not pay for a
    trace); the second check of the same function traces, and later ones reuse its graphs."""
    monkeypatch.setattr(tf_batching, "MIN_BATCH_ROWS", 64)
    fn, traces = _counted(lambda x: tf.reduce_sum(tf.sin(x) * x ** 2))
    x = _normal(6, seed=32)
    once = gb.check(fn, x)
    assert once.passed and not _notes(once, BATCHED_EVAL) and not traces, once.notes
    twice = gb.check(fn, x)
    assert twice.passed and _notes(twice, BATCHED_EVAL) and _notes(twice, BATCHED_VJP), twice.notes
    traced = len(traces)
    thrice = gb.check(fn, x)
    assert thrice.passed and _notes(thrice, BATCHED_EVAL) and len(traces) == traced, thrice.notes


def _scaled_square(x: "tf.Tensor", c: "tf.Tensor") -> "tf.Tensor":
    """sum(c * x^2) through a custom gradient that forgets c: right only where c == 1."""

    @tf.custom_gradient
    def op(x):
        return c * x ** 2, lambda g: 2.0 * x * g

    return tf.reduce_sum(op(x))


def test_a_changed_unchecked_tensor_argument_gives_the_new_verdict(fresh_cache: None) -> None:
    """The unchecked argument is an input of the kept graph, not a constant captured in it."""
    fn, traces = _counted(_scaled_square)
    x = _normal(5, seed=33)
    right = gb.check(fn, x, tf.ones([5], tf.float64), wrt="x")
    assert right.passed and _notes(right, BATCHED_EVAL), str(right)
    traced = len(traces)
    wrong = gb.check(fn, x, tf.fill([5], tf.constant(3.0, tf.float64)), wrt="x")
    assert not wrong.passed and wrong.failures, str(wrong)
    assert _notes(wrong, BATCHED_EVAL) and _notes(wrong, BATCHED_VJP), wrong.notes  # no fallback: not stale
    assert len(traces) == traced and tf_backend.cache_size() == 1
    again = gb.check(fn, x, tf.ones([5], tf.float64), wrt="x")
    assert again.passed and len(traces) == traced, str(again)


def test_a_rebound_closure_tensor_is_a_new_key(fresh_cache: None) -> None:
    scale = tf.constant(2.0, tf.float64)

    def fn(x):
        return tf.reduce_sum(scale * tf.sin(x))

    x = _normal(4, seed=34)
    prepared = _prepared(fn, x)
    with prepared.session():
        before = prepared.evaluate(prepared.x0[None])
    scale = tf.constant(5.0, tf.float64)  # noqa: F841 - read by fn
    prepared = _prepared(fn, x)
    with prepared.session():
        after = prepared.evaluate(prepared.x0[None])
    assert prepared._paths["evaluate"].path == "batched" and tf_backend.cache_size() == 2, prepared.notes
    np.testing.assert_allclose(after, 2.5 * before, rtol=1e-14)


def test_a_different_shape_traces_again(fresh_cache: None) -> None:
    fn, traces = _counted(lambda x: tf.reduce_sum(tf.tanh(x) ** 2))
    assert gb.check(fn, _normal(4, seed=35)).passed
    traced = len(traces)
    report = gb.check(fn, _normal(5, seed=36))
    assert report.passed and _notes(report, BATCHED_EVAL), report.notes
    assert len(traces) > traced and tf_backend.cache_size() == 2
    traced = len(traces)
    assert gb.check(fn, _normal(4, seed=37)).passed and len(traces) == traced  # the first shape's entry is kept


@pytest.mark.parametrize("mode", ["full", "fast"])
def test_a_seeded_bug_is_caught_on_a_cached_repeat(fresh_cache: None, mode: str) -> None:
    for bug in (True, False):
        cube = _cube(bug)
        fn, traces = _counted(lambda x: tf.reduce_sum(cube(x)))
        x = _normal(3, 4, seed=38)
        verdicts = []
        for _ in range(3):
            report = gb.check(fn, x, mode=mode)
            assert _notes(report, BATCHED_EVAL), report.notes
            verdicts.append(report.passed)
        assert verdicts == [not bug] * 3
        traced = len(traces)
        assert gb.check(fn, x, mode=mode).passed is (not bug) and len(traces) == traced


def test_a_keras_model_check_reuses_its_graphs_and_reads_changed_weights(fresh_cache: None) -> None:
    """Only the head is checked: the hidden layer's float64 copies are graph inputs, so new hidden weights
    are used by the kept graph (not the values captured when it was traced)."""
    model = _mlp()
    fn, traces = _counted(lambda x: tf.reduce_sum(model(x) ** 2))
    x = tf.constant(np.random.default_rng(39).normal(size=(3, 4)).astype(np.float32))
    assert gb.check(fn, x, params=model, wrt="head").passed
    traced = len(traces)
    hidden = model.get_layer("hidden").kernel
    hidden.assign(hidden.numpy() * 1.5)
    prepared = tf_backend.ADAPTER.prepare(CheckSpec(fn=fn, args=(x,), kwargs={}, params=model, wrt=("head",),
                                                    grad=None, seed=0, train=False, arg_names=("x",)))
    points = prepared.x0 + 0.1 * np.random.default_rng(40).normal(size=(5, len(prepared.x0)))
    with prepared.session():
        batched = prepared.evaluate(points)
        looped = prepared._evaluate_loop(points)
    assert prepared._paths["evaluate"].path == "batched" and len(traces) == traced, prepared.notes
    np.testing.assert_allclose(batched, looped, rtol=1e-12)


def test_cache_entries_go_away_with_the_function(fresh_cache: None) -> None:
    def make() -> Callable[..., Any]:
        return lambda x: tf.reduce_sum(tf.exp(x) * x)

    fn = make()
    gone = weakref.ref(fn)
    assert gb.check(fn, _normal(5, seed=41)).passed and tf_backend.cache_size() == 1
    del fn
    gc.collect()
    assert gone() is None and tf_backend.cache_size() == 0
    other = make()
    gb.check(other, _normal(5, seed=42))
    assert tf_backend.cache_size() == 1
    tf_backend.clear_cache()
    assert tf_backend.cache_size() == 0


def test_order_2_and_uncacheable_checks_are_not_kept(fresh_cache: None) -> None:
    fn = lambda x, w: tf.reduce_sum(tf.sin(x @ w) ** 2)  # noqa: E731
    report = gb.check(fn, _normal(2, 3, seed=43), _normal(3, 2, seed=44), order=2)
    assert report.passed and tf_backend.cache_size() == 1, str(report)  # the first-order check only

    class Opaque:  # an argument that cannot be keyed by value
        pass

    report = gb.check(lambda x, o: tf.reduce_sum(x ** 2), _normal(3, seed=45), Opaque())
    assert report.passed and _notes(report, BATCHED_EVAL) and tf_backend.cache_size() == 1, report.notes


# --- Python scalars fn reads are keyed by value; counters fn bumps keep the cache ---

_SQUARE_WITH_GLOBAL_FACTOR = (
    "@tf.custom_gradient\n"
    "def op(x):\n"
    "    def grad(g):\n"
    "        return g * x * S\n"  # right only while S is 2
    "    return x * x, grad\n"
    "def fn(x):\n"
    "    return tf.reduce_sum(op(x))\n")


@pytest.mark.parametrize("right, wrong", [(2.0, 3.0), (2, 3)], ids=["float", "int"])
def test_a_rebound_global_scalar_read_by_the_gradient_gives_the_new_verdict(fresh_cache: None, right: Any,
                                                                            wrong: Any) -> None:
    """Each value has a graph of its own: the verdict comes from batched VJPs, not from the eager loop taking
    over after a stale graph disagreed with it."""
    namespace = {"tf": tf, "S": right}
    exec(_SQUARE_WITH_GLOBAL_FACTOR, namespace)
    fn, x = namespace["fn"], _normal(5, seed=46)
    for value, passes in ((right, True), (wrong, False), (right, True), (wrong, False)):
        namespace["S"] = value
        report = gb.check(fn, x)
        assert report.passed is passes, str(report)
        assert _notes(report, BATCHED_VJP) and not _notes(report, LOOP_VJP), report.notes
    assert tf_backend.cache_size() == 2


_COUNTED_SQUARE = (
    "@tf.custom_gradient\n"
    "def op(x):\n"
    "    def grad(g):\n"
    "        return g * x * SCALE\n"  # right only while SCALE is 2
    "    return x * x, grad\n"
    "def fn(x):\n"
    "    global CALLS, TRACES\n"
    "    CALLS += 1\n"  # every Python call: the eager ones and the traces
    "    if not tf.executing_eagerly():\n"
    "        TRACES += 1\n"
    "    return tf.reduce_sum(op(x))\n")


@pytest.mark.parametrize("min_rows", [1, 64])
def test_counters_fn_bumps_keep_the_cache_and_a_rebound_int_factor_does_not(
        fresh_cache: None, monkeypatch: pytest.MonkeyPatch, min_rows: int) -> None:
    """The counters fn bumps while it runs are not what its graphs depend on: checks reuse the graphs traced
    before (with MIN_BATCH_ROWS=64 the first small check runs the loop and the second one traces). The int
    factor is: rebinding it traces afresh and gives the new verdict."""
    monkeypatch.setattr(tf_batching, "MIN_BATCH_ROWS", min_rows)
    namespace = {"tf": tf, "CALLS": 0, "TRACES": 0, "SCALE": 2}
    exec(_COUNTED_SQUARE, namespace)
    fn, x = namespace["fn"], _normal(5, seed=47)
    assert gb.check(fn, x).passed
    if min_rows > 1:
        assert namespace["TRACES"] == 0
        assert gb.check(fn, x).passed
    traced = namespace["TRACES"]
    assert traced > 0 and tf_backend.cache_size() == 1
    for seed in (48, 49):
        again = gb.check(fn, _normal(5, seed=seed))
        assert again.passed and _notes(again, BATCHED_EVAL) and _notes(again, BATCHED_VJP), again.notes
    assert namespace["TRACES"] == traced and tf_backend.cache_size() == 1
    namespace["SCALE"] = 3
    for _ in range(2):  # no stale graph caught by the eager loop; the second check batches in any case
        wrong = gb.check(fn, x)
        assert not wrong.passed and not _notes(wrong, LOOP_VJP), wrong.notes
    assert _notes(wrong, BATCHED_VJP) and namespace["TRACES"] > traced, wrong.notes


class _Config:
    scale = 3.0


def test_a_kept_graph_gone_stale_is_still_caught(fresh_cache: None) -> None:
    """A custom gradient reading a class attribute: the cache key cannot see the attribute, so a repeat check
    finds the graph traced with the old value. Every check compares its first chunk with the eager loop, which
    catches the stale graph, so the now-wrong backward rule still fails (a regression test: trusting graphs
    verified by an earlier check let it pass)."""

    @tf.custom_gradient
    def f(x):
        def grad(g):
            return g * tf.cos(x) * _Config.scale  # right only while _Config.scale is 3

        return tf.sin(x) * 3.0, grad

    def fn(x):
        return tf.reduce_sum(f(x))

    x = tf.constant(np.linspace(0.1, 1.0, 16))
    try:
        for _ in range(2):
            assert gb.check(fn, x, mode="full").passed
        _Config.scale = 1.0
        assert not gb.check(fn, x, mode="full").passed
    finally:
        _Config.scale = 3.0


class _SlottedScale:
    """A callable whose factor lives in ``__slots__``, which the cache key does not see."""

    __slots__ = ("k", "__weakref__")

    def __init__(self, k: float) -> None:
        self.k = k

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        return tf.reduce_sum(tf.sin(x) * self.k)


def test_a_stale_evaluation_graph_is_caught_at_the_probed_point(fresh_cache: None) -> None:
    """The first chunk's comparison uses the probe's eager outputs where the chunk evaluates x0 (no second
    eager run there); a kept graph that went stale (a factor in __slots__ changed) still disagrees with
    them, and the check falls back to the eager loop and stays right."""
    fn = _SlottedScale(1.0)
    x = _normal(6, seed=41)
    first = gb.check(fn, x)
    assert first.passed and _notes(first, BATCHED_EVAL), first.notes
    fn.k = 2.0
    again = gb.check(fn, x)
    assert again.passed, again
    assert any(note.startswith("TensorFlow evaluations") and "differ from the eager loop" in note
               for note in again.notes), again.notes
