"""TensorFlow backend: seeded bugs in ``tf.custom_gradient`` rules, ``tf.function``, several outputs, Keras
models checked by variable path in float64, the user's state after checks that pass, fail and raise,
TensorFlow's random state, inputs without a gradient, forward mode and second order.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import gradbridge as gb  # noqa: E402
from gradbridge._adapter import CheckSpec  # noqa: E402
from gradbridge.backends import tensorflow as tf_backend  # noqa: E402
from tensorflow.python.eager import context as tf_context  # noqa: E402
from tensorflow.python.ops import stateful_random_ops  # noqa: E402

pytestmark = pytest.mark.tensorflow

MODES = ("full", "fast")
OUTCOMES = ("pass", "fail", "raise", "raise_mid_forward")


def _normal(*shape: int, seed: int, low: Optional[float] = None, dtype=tf.float64) -> "tf.Tensor":
    """A random tensor; with ``low``, every magnitude is at least ``low`` (keeps factors away from zero)."""
    values = np.random.default_rng(seed).normal(size=shape)
    if low is not None:
        values = np.sign(values) * (low + np.abs(values))
    return tf.constant(values, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# tf.custom_gradient ops written with TensorFlow ops, each with a seeded bug in its gradient.
# --------------------------------------------------------------------------------------------------


def _cube(bug: bool):
    @tf.custom_gradient
    def cube(x):
        return x ** 3, lambda g: (-1.0 if bug else 1.0) * 3.0 * x ** 2 * g

    return cube


def _square(bug: bool):
    @tf.custom_gradient
    def square(x):
        return x ** 2, lambda g: (1.0 if bug else 2.0) * x * g

    return square


def _matmul(bug: bool):
    @tf.custom_gradient
    def matmul(a, b):
        def grad(g):
            return (g @ b if bug else g @ tf.transpose(b)), tf.transpose(a) @ g

        return a @ b, grad

    return matmul


def _x_sin_x(bug: bool):
    @tf.custom_gradient
    def x_sin_x(x):
        def grad(g):
            return (x * tf.cos(x) if bug else tf.sin(x) + x * tf.cos(x)) * g

        return x * tf.sin(x), grad

    return x_sin_x


def _add_bias(bug: bool):
    @tf.custom_gradient
    def add_bias(x, b):
        return x + b, lambda g: (g, tf.reduce_sum(g, axis=1 if bug else 0))

    return add_bias


def _fma(bug: bool):
    @tf.custom_gradient
    def fma(x, y, z):
        return x * y + z, lambda g: (g * y, g * (y if bug else x), g)

    return fma


def _tanh(bug: bool):
    """Bug on two of fifty elements: element 7 by 50%, element 20 by 1%; the worst must be 7."""
    factor = np.ones(50)
    if bug:
        factor[7], factor[20] = 1.5, 1.01

    @tf.custom_gradient
    def tanh(x):
        y = tf.tanh(x)
        return y, lambda g: g * (1 - y ** 2) * factor

    return tanh


@dataclass
class Case:
    name: str
    make: Callable[[bool], Callable[..., Any]]
    inputs: Callable[[], Tuple[Any, ...]]
    failing: str
    worst_index: Optional[Tuple[int, ...]] = None
    mismatches: Optional[int] = None


CASES = [
    Case("sign flip", _cube, lambda: (_normal(3, 4, seed=1),), "x"),
    Case("missing factor 2", _square, lambda: (_normal(5, seed=2, low=0.2),), "x"),
    Case("transposed matmul gradient", _matmul, lambda: (_normal(3, 3, seed=3), _normal(3, 3, seed=4)), "a"),
    Case("dropped product-rule term", _x_sin_x, lambda: (_normal(6, seed=5, low=0.2),), "x"),
    Case("wrong broadcast-sum axis", _add_bias, lambda: (_normal(4, 4, seed=6), _normal(4, seed=7)), "b"),
    Case("one of three inputs wrong", _fma, lambda: (_normal(4, seed=8), _normal(4, seed=9), _normal(4, seed=10)), "y"),
    Case("bug on two of fifty elements", _tanh, lambda: (_normal(50, seed=11),), "x", (7,), 2),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_seeded_bug_in_custom_gradient_is_caught_and_located(case: Case, mode: str) -> None:
    report = gb.check(case.make(True), *case.inputs(), mode=mode)
    assert not report.passed, str(report)
    assert {row.input for row in report.failures} == {case.failing}, str(report)
    row = report.failures[0]
    assert row.status == "fail" and row.worst is not None and row.worst.abs_error > row.worst.allowed
    if case.worst_index is not None:
        assert row.worst.input_index == case.worst_index, str(report)
    if case.mismatches is not None:
        assert row.mismatches == case.mismatches, str(report)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_correct_custom_gradient_passes(case: Case, mode: str) -> None:
    inputs = case.inputs()
    report = gb.check(case.make(False), *inputs, mode=mode)
    assert report.passed, str(report)
    assert report.backend == "tensorflow"
    assert len({row.input for row in report.rows}) == len(inputs)


def test_float32_inputs_are_checked_on_float64_copies() -> None:
    x = _normal(3, 4, seed=12, dtype=tf.float32)
    original = x.numpy().copy()
    report = gb.check(_cube(False), x)
    assert report.passed, str(report)
    assert "float64 eps" in report.step and any("float64 copies" in note for note in report.notes)
    assert x.dtype == tf.float32 and np.array_equal(x.numpy(), original)


# --------------------------------------------------------------------------------------------------
# tf.function, nested inputs, several outputs
# --------------------------------------------------------------------------------------------------


def test_tf_function_passes_and_its_trace_cache_is_untouched() -> None:
    compiled = tf.function(lambda a, b: tf.reduce_sum(tf.sin(_matmul(False)(a, b))))
    a, b = _normal(3, 3, seed=13), _normal(3, 3, seed=14)
    compiled(tf.cast(a, tf.float32), tf.cast(b, tf.float32))
    traces = compiled.experimental_get_tracing_count()
    for mode in MODES:
        report = gb.check(compiled, a, b, mode=mode, analytic="both", order=2)
        assert report.passed, str(report)
        assert {row.analytic_mode for row in report.rows if row.order == 1} == {"rev", "fwd", "rev vs fwd"}
    assert compiled.experimental_get_tracing_count() == traces


def test_tf_function_with_seeded_bug_is_caught_in_both_modes() -> None:
    compiled = tf.function(_matmul(True))
    report = gb.check(compiled, _normal(3, 3, seed=13), _normal(3, 3, seed=14), analytic="both")
    assert {(row.input, row.analytic_mode) for row in report.failures} == {("a", "rev"), ("a", "fwd")}, str(report)


def test_nested_inputs_and_several_outputs_give_one_row_per_output() -> None:
    def fn(inputs, scale):
        x, y = inputs["x"], inputs["y"]
        return {"sum": tf.reduce_sum(x * y), "vec": tf.sin(x) * scale}, x.shape[0], tf.exp(y[:2])

    inputs = {"x": _normal(3, seed=15), "y": _normal(3, seed=16)}
    report = gb.check(fn, inputs, 2.0)
    assert report.passed, str(report)
    outputs = ["out[0]['sum']", "out[0]['vec']", "out[2]"]
    assert [(row.input, row.output) for row in report.rows] == [
        (name, out) for name in ("inputs['x']", "inputs['y']") for out in outputs]


def test_wrt_selects_one_input_by_name() -> None:
    report = gb.check(_fma(True), _normal(4, seed=8), _normal(4, seed=9), _normal(4, seed=10), wrt="x")
    assert report.passed and [row.input for row in report.rows] == ["x"], str(report)


# --------------------------------------------------------------------------------------------------
# Inputs without a gradient: TensorFlow's None
# --------------------------------------------------------------------------------------------------


def test_input_used_only_through_an_integer_cast_is_reported_as_no_gradient() -> None:
    """Piecewise constant: no gradient, and the numeric derivative is zero too, so the row passes as such."""
    fn = lambda x, y: tf.reduce_sum(y ** 2) + tf.reduce_sum(tf.cast(tf.cast(10.0 * x, tf.int32), tf.float64))
    x = tf.constant([0.23, 0.51, -0.47], tf.float64)  # 10x is far from an integer boundary
    for mode, analytic in (("full", "rev"), ("fast", "rev"), ("full", "fwd")):
        report = gb.check(fn, x, _normal(3, seed=17), mode=mode, analytic=analytic)
        assert report.row("x").status == "no-gradient" and report.row("x").passed, str(report)
        assert report.row("y").status == "pass", str(report)
        assert report.passed


@pytest.mark.parametrize("mode", MODES)
def test_input_used_only_through_stop_gradient_has_no_gradient_and_fails(mode: str) -> None:
    """tf.stop_gradient(x)**2 depends on x, but TensorFlow defines no gradient: a missing gradient."""
    report = gb.check(lambda x: tf.reduce_sum(tf.stop_gradient(x) ** 2), _normal(4, seed=18, low=0.2), mode=mode)
    row = report.row("x")
    assert row.status == "no-gradient" and not row.passed and not report.passed, str(report)
    assert "not zero" in row.message


def test_stop_gradient_times_x_is_a_wrong_gradient_not_a_missing_one() -> None:
    """d/dx [stop_gradient(x) * x] is 2x, TensorFlow says x: a gradient exists and is wrong, so it is a plain fail."""
    report = gb.check(lambda x: tf.stop_gradient(x) * x, _normal(4, seed=19, low=0.2))
    assert report.row("x").status == "fail", str(report)
    assert report.row("x").worst.analytic == pytest.approx(0.5 * report.row("x").worst.numeric, rel=1e-6)


# --------------------------------------------------------------------------------------------------
# Forward mode and second order
# --------------------------------------------------------------------------------------------------


def test_forward_mode_cannot_check_an_eager_custom_gradient_so_it_is_unsupported() -> None:
    """ForwardAccumulator ignores an eager tf.custom_gradient rule (it differentiates the ops inside), so a
    buggy rule would pass forward mode: the fwd rows must be "unsupported", never a pass."""
    report = gb.check(_cube(True), _normal(3, seed=20), analytic="both")
    assert report.row("x").status == "fail"
    fwd = [row for row in report.rows if row.analytic_mode == "fwd"]
    assert fwd and all(row.status == "unsupported" and "custom_gradient" in row.message for row in fwd), str(report)


def test_forward_mode_without_a_rule_is_unsupported_not_zero() -> None:
    """tf.numpy_function has no forward-mode rule (TensorFlow returns None): unsupported, not a zero JVP."""
    from kit_tensorflow import make

    fn, native, _ = make(np.sin, lambda g, x: (g * np.cos(x),))
    report = gb.check(tf.function(fn), native(np.linspace(-1.0, 1.0, 4)), analytic="both")
    assert report.row("arg0", order=1).passed
    fwd = [row for row in report.rows if row.analytic_mode == "fwd"]
    assert fwd and all(row.status == "unsupported" for row in fwd), str(report)


def test_forward_mode_of_plain_ops_matches_reverse_mode() -> None:
    fn = lambda x, w: tf.tanh(x @ w)
    report = gb.check(fn, _normal(3, 2, seed=21), _normal(2, 4, seed=22), analytic="both", mode="fast")
    assert report.passed and {row.status for row in report.rows} == {"pass"}, str(report)


def test_first_order_right_but_second_order_wrong_is_caught_only_by_order_2() -> None:
    """A gradient computed from tf.stop_gradient(x): right values, but not differentiable any more."""

    @tf.custom_gradient
    def cube(x):
        return x ** 3, lambda g: 3.0 * tf.stop_gradient(x) ** 2 * g

    x = _normal(4, seed=23, low=0.3)
    assert gb.check(cube, x).passed
    report = gb.check(cube, x, order=2)
    assert not report.passed and {(row.input, row.order) for row in report.failures} == {("x", 2)}, str(report)


@pytest.mark.parametrize("mode", MODES)
def test_second_order_of_a_correct_function_passes(mode: str) -> None:
    report = gb.check(lambda x, w: tf.reduce_sum(tf.sin(x @ w) ** 2), _normal(2, 3, seed=24),
                      _normal(3, 2, seed=25), order=2, mode=mode)
    assert report.passed and {row.order for row in report.rows} == {1, 2}, str(report)


# --------------------------------------------------------------------------------------------------
# Keras models and tf.Variables as params=
# --------------------------------------------------------------------------------------------------


def _keras_model(kind: str = "sequential", activation: Any = "tanh") -> "keras.Model":
    """A small float32 model with BatchNormalization and Dropout, its BN statistics moved off their init."""
    keras.utils.set_random_seed(3)
    if kind == "sequential":
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="hidden"),
                                  keras.layers.Activation(activation), keras.layers.BatchNormalization(),
                                  keras.layers.Dropout(0.4), keras.layers.Dense(2, name="head")])
    else:
        inputs = keras.Input((3,))
        h = keras.layers.Activation(activation)(keras.layers.Dense(4, name="hidden")(inputs))
        h = keras.layers.Dropout(0.4)(keras.layers.BatchNormalization()(h))
        model = keras.Model(inputs, keras.layers.Dense(2, name="head")(h))
    x = np.random.default_rng(4).normal(size=(8, 3)).astype(np.float32)
    model(x, training=True)  # moves the BatchNorm statistics and the dropout seed
    return model


def _inputs32() -> "tf.Tensor":
    return tf.constant(np.random.default_rng(5).normal(size=(5, 3)), tf.float32)


def _mse(model: "keras.Model") -> Callable[[Any], Any]:
    return lambda x: tf.reduce_mean(keras.losses.mean_squared_error(tf.ones((5, 2)), model(x)))


@pytest.mark.parametrize("kind", ["sequential", "functional"])
@pytest.mark.parametrize("train", [False, True])
def test_keras_model_with_dropout_and_batchnorm_passes_in_float64(kind: str, train: bool) -> None:
    model = _keras_model(kind)
    report = gb.check(_mse(model), _inputs32(), params=model, train=train)
    assert report.passed, str(report)
    names = [v.path for v in model.trainable_variables]
    assert [row.input for row in report.rows] == ["x"] + names
    assert any("/kernel" in name for name in names) and any("gamma" in name for name in names)
    assert "float64 eps" in report.step and not any("ran in float32" in note for note in report.notes), str(report)
    assert any(("training" if train else "inference") + " mode" in note for note in report.notes)


def test_tf_function_closing_over_a_keras_model_is_checked_by_variable_path() -> None:
    model = _keras_model()
    compiled = tf.function(_mse(model))
    compiled(_inputs32())
    traces = compiled.experimental_get_tracing_count()
    report = gb.check(compiled, _inputs32(), params=model, mode="fast", train=True)
    assert report.passed and len(report.rows) == 1 + len(model.trainable_variables), str(report)
    assert "float64 eps" in report.step
    assert compiled.experimental_get_tracing_count() == traces


def test_seeded_bug_inside_a_keras_model_is_located_by_variable_path() -> None:
    @tf.custom_gradient
    def wrong_tanh(h):
        y = tf.tanh(h)
        return y, lambda g: g * (1 - y ** 2) * 1.05

    model = _keras_model(activation=wrong_tanh)
    report = gb.check(_mse(model), _inputs32(), params=model, wrt=["hidden"], mode="fast")
    kernel, bias = (v.path for v in model.layers[0].trainable_variables)
    assert [row.input for row in report.rows] == [kernel, bias], str(report)  # "hidden": a path component
    assert {row.input for row in report.failures} == {kernel, bias}, str(report)


def test_keras_float64_evaluation_is_exact() -> None:
    """The float32 model evaluated by the check agrees with a NumPy float64 forward to round-off, also at a
    point float32 cannot represent (inputs are not rounded on the way in), while the float32 model does not."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)])
    x = _inputs32()
    spec = CheckSpec(fn=model, args=(x,), kwargs={}, params=model, wrt=None, grad=None, seed=0, train=False,
                     arg_names=("x",))
    prepared = tf_backend.ADAPTER.prepare(spec)
    point = prepared.x0 + 1e-9 * np.random.default_rng(6).normal(size=prepared.x0.shape)  # not float32 numbers
    inputs, k1, b1, k2, b2 = (point[leaf.slice].reshape(leaf.shape) for leaf in prepared.leaves)
    reference = np.tanh(inputs @ k1 + b1) @ k2 + b2
    with prepared.session():
        value = prepared.evaluate(point[None, :])[0].reshape(5, 2)
    assert np.max(np.abs(value - reference)) < 1e-13
    float32_value = model(tf.constant(inputs, tf.float32)).numpy()
    assert np.max(np.abs(float32_value - reference)) > 1e-9
    assert prepared.working_eps == np.finfo(np.float64).eps


def test_keras_loss_object_computing_in_float32_is_checked_in_float32_and_says_so() -> None:
    model = _keras_model()
    loss = keras.losses.MeanSquaredError()  # converts its inputs to its own dtype, float32
    report = gb.check(lambda x: loss(tf.ones((5, 2)), model(x)), _inputs32(), params=model)
    assert report.passed, str(report)
    assert "float32 eps" in report.step
    assert any("ran in float32" in note and "below float64" in note for note in report.notes), str(report)


def test_unbuilt_keras_model_is_an_invalid_argument() -> None:
    model = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(gb.InvalidArgumentError, match="not built"):
        gb.check(lambda x: model(x), _normal(2, 3, seed=26), params=model)


def test_tf_variables_as_params_are_named_checked_and_restored() -> None:
    w = tf.Variable(_normal(3, 2, seed=27))
    b = tf.Variable(_normal(2, seed=28), trainable=False)
    before = (w.numpy().copy(), b.numpy().copy())
    fn = lambda x: tf.reduce_sum(tf.tanh(x @ w + b) ** 2)
    report = gb.check(fn, _normal(4, 3, seed=29), params=[w, b], order=2, analytic="both")
    assert report.passed, str(report)
    assert {row.input for row in report.rows if row.order == 1} >= {"x", "params[0]", "params[1]"}
    report = gb.check(fn, _normal(4, 3, seed=29), params={"weight": w, "bias": b}, wrt=["weight", "bias"])
    assert [row.input for row in report.rows] == ["weight", "bias"] and report.passed, str(report)
    assert np.array_equal(w.numpy(), before[0]) and np.array_equal(b.numpy(), before[1])


def test_tf_module_params_are_named_by_attribute_path_and_float32_runs_in_float32() -> None:
    class Affine(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(_normal(3, 2, seed=30, dtype=tf.float32))
            self.inner = [tf.Module()]
            self.inner[0].b = tf.Variable(_normal(2, seed=31, dtype=tf.float32))

        def __call__(self, x):
            return tf.reduce_sum(tf.sin(x @ self.w + self.inner[0].b))

    module = Affine()
    before = [v.numpy().copy() for v in (module.w, module.inner[0].b)]
    report = gb.check(module, _normal(4, 3, seed=32, dtype=tf.float32))
    assert report.passed, str(report)
    assert sorted(row.input for row in report.rows) == ["inner/0/b", "w", "x"]
    assert "float32 eps" in report.step
    assert any("ran in float32" in note for note in report.notes) and any(
        "cannot run in float64" in note for note in report.notes), str(report)
    assert all(np.array_equal(v.numpy(), b) for v, b in zip((module.w, module.inner[0].b), before))


def test_fn_mixing_inputs_with_float32_constants_falls_back_to_float32_with_a_note() -> None:
    scale = tf.constant([1.0, 2.0, 3.0])  # float32: a float64 input cannot be multiplied by it
    report = gb.check(lambda x: tf.reduce_sum(tf.sin(x) * scale), _normal(3, seed=33, dtype=tf.float32))
    assert report.passed, str(report)
    assert "float32 eps" in report.step
    assert any("cannot run in float64" in note for note in report.notes), str(report)


# --------------------------------------------------------------------------------------------------
# The user's state after checks that pass, fail and raise
# --------------------------------------------------------------------------------------------------


class UserError(RuntimeError):
    """What the user's gradient raises mid-check."""


def _activation(outcome: str):
    """tanh with a correct, wrong ("fail") or raising backward; "raise_mid_forward" raises in the 6th forward
    call, which is at a perturbed point (after the first evaluations at the unperturbed one)."""
    calls = []

    @tf.custom_gradient
    def activation(h):
        calls.append(1)
        if outcome == "raise_mid_forward" and len(calls) == 6:
            raise UserError("forward blew up at a perturbed point")
        y = tf.tanh(h)

        def grad(g):
            if outcome == "raise":
                raise UserError("backward blew up")
            return g * (1 - y ** 2) * (1.1 if outcome == "fail" else 1.0)

        return y, grad

    return activation


def _keras_state(model: "keras.Model") -> List[Tuple[Any, ...]]:
    layers = model._flatten_layers(include_self=True, recursive=True)
    return ([(v.path, v.dtype, v.trainable, v.numpy().copy()) for v in model.variables]
            + [(l.name, l.trainable, id(l.dtype_policy), l.dtype_policy.name, l.dtype, l.compute_dtype) for l in layers]
            + [("inputs", tuple(t.dtype for t in model.inputs))])


def _same(a: List[Tuple[Any, ...]], b: List[Tuple[Any, ...]]) -> bool:
    return len(a) == len(b) and all(
        len(x) == len(y) and all(np.array_equal(p, q) if isinstance(p, np.ndarray) else p == q for p, q in zip(x, y))
        for x, y in zip(a, b))


def _random_state() -> Tuple[Any, ...]:
    ctx = tf_context.context()
    op_seeds = getattr(ctx, "_rng", None)
    generator = stateful_random_ops.global_generator
    return (tf_context.global_seed(), op_seeds.getstate() if op_seeds is not None else None, generator,
            None if generator is None else generator.state.numpy().copy())


def _run(outcome: str, check: Callable[[], gb.Report]) -> None:
    if outcome.startswith("raise"):
        with pytest.raises(gb.FunctionEvaluationError) as raised:
            check()
        assert isinstance(raised.value.__cause__, UserError)
    else:
        assert check().passed == (outcome == "pass")


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("outcome", OUTCOMES)
def test_keras_model_and_random_state_are_untouched(outcome: str, train: bool) -> None:
    model = _keras_model(activation=_activation(outcome))
    tf.random.set_seed(1234)
    tf.random.uniform([2])  # advance the op-seed generator: the check must not reset it
    generator = tf.random.get_global_generator()
    generator.normal([3])
    model_before, random_before = _keras_state(model), _random_state()

    def fn(x):
        noise = 1e-3 * tf.random.normal([5, 2], dtype=tf.float64) + 1e-3 * generator.normal([5, 2], dtype=tf.float64)
        return tf.reduce_mean((model(x) - tf.ones((5, 2), tf.float64) + noise) ** 2)

    _run(outcome, lambda: gb.check(fn, _inputs32(), params=model, train=train, mode="fast"))
    assert _same(_keras_state(model), model_before)
    after = _random_state()
    assert after[:3] == random_before[:3] and np.array_equal(after[3], random_before[3])
    # the stream of unseeded random ops continues as if no check had run
    continued = tf.random.uniform([2]).numpy()
    tf.random.set_seed(1234)
    tf.random.uniform([2])
    assert np.array_equal(continued, tf.random.uniform([2]).numpy())


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_tf_variables_and_an_absent_global_seed_and_generator_are_restored(outcome: str,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    tf.random.set_seed(None)
    monkeypatch.setattr(stateful_random_ops, "global_generator", None)
    w = tf.Variable(_normal(3, 2, seed=34, dtype=tf.float32))
    v = tf.Variable(_normal(2, seed=35))
    before = (w.numpy().copy(), v.numpy().copy())
    act = _activation(outcome)

    def fn(x):
        noise = tf.random.get_global_generator().normal([2], dtype=tf.float64)  # the check's own generator
        return tf.reduce_sum(act(tf.cast(x @ w, tf.float64) + v + noise))

    _run(outcome, lambda: gb.check(fn, _normal(4, 3, seed=36, dtype=tf.float32), params=[w, v], wrt="params"))
    assert w.dtype == tf.float32 and v.dtype == tf.float64
    assert np.array_equal(w.numpy(), before[0]) and np.array_equal(v.numpy(), before[1])
    assert tf_context.global_seed() is None and stateful_random_ops.global_generator is None


def test_random_ops_inside_fn_are_pinned_for_every_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stateful_random_ops, "global_generator", None)  # the check's own generator stands in
    noisy = lambda x: (tf.sin(x) + tf.random.normal([4], dtype=tf.float64)
                       + tf.random.get_global_generator().normal([4], dtype=tf.float64))
    for fn in (noisy, tf.function(noisy)):
        report = gb.check(fn, _normal(4, seed=37))
        assert report.problem is None and report.passed, str(report)
        assert any("stateful random ops" in note for note in report.notes)
    assert stateful_random_ops.global_generator is None


def test_checking_a_deterministic_fn_keeps_explicitly_seeded_random_streams() -> None:
    """Only functions drawing from stateful random ops need TensorFlow's kernel cache cleared."""
    tf.random.set_seed(3)
    tf.random.uniform([2], seed=7)
    report = gb.check(lambda x: tf.sin(x) * tf.random.stateless_normal([4], seed=[1, 2], dtype=tf.float64),
                      _normal(4, seed=40))
    assert report.passed and not any("stateful random ops" in note for note in report.notes), str(report)
    continued = tf.random.uniform([2], seed=7).numpy()
    tf.random.set_seed(3)
    tf.random.uniform([2], seed=7)
    assert np.array_equal(continued, tf.random.uniform([2], seed=7).numpy())


def test_a_private_generator_drawn_inside_fn_is_reported_as_nondeterministic() -> None:
    generator = tf.random.Generator.from_seed(5)  # the check cannot know it: each call draws new numbers
    report = gb.check(lambda x: tf.sin(x) + generator.normal([4], dtype=tf.float64), _normal(4, seed=38))
    assert not report.passed and report.problem is not None and "not deterministic" in report.problem


def test_errors_inside_fn_are_wrapped_and_carry_the_cause() -> None:
    def fn(x):
        raise UserError("forward blew up")

    with pytest.raises(gb.FunctionEvaluationError, match="forward blew up"):
        gb.check(fn, _normal(3, seed=39))


def test_tf_log_level_is_set_only_when_unset(tmp_path) -> None:
    code = ("import os, importlib; os.environ.pop('TF_CPP_MIN_LOG_LEVEL', None); "
            "import gradbridge.backends.tensorflow as m; first = os.environ['TF_CPP_MIN_LOG_LEVEL']; "
            "os.environ['TF_CPP_MIN_LOG_LEVEL'] = '1'; importlib.reload(m); "
            "print(first, os.environ['TF_CPP_MIN_LOG_LEVEL'])")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path), env=env,
                            check=True)
    assert result.stdout.split() == ["2", "1"]
