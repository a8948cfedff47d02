"""JAX backend: custom_vjp and custom_jvp rules with seeded bugs, pytrees, keys, jit, order 2, x64 state.

The seeded bugs of ``test_seeded_bugs.py`` run on JAX through ``kit_jax`` (a ``custom_vjp`` calling NumPy
via ``pure_callback``); here the same kinds of bug are written natively, once as ``custom_vjp`` rules and
once as ``custom_jvp`` rules, and checked in reverse mode (a ``custom_jvp`` by transposition) and forward
mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import gradbridge as gb  # noqa: E402
from gradbridge._errors import FunctionEvaluationError, InvalidArgumentError  # noqa: E402

pytestmark = pytest.mark.jax
RNG = np.random.default_rng(7)


def _array(*shape: int) -> jax.Array:
    """A float32 JAX array (the default dtype when x64 is off): checks must promote copies of it."""
    return jnp.asarray(RNG.normal(size=shape), dtype=jnp.float32)


# ----------------------------------------------------------------------------------------------------
# Seeded bugs, written as JAX rules. ``vjp(g, *xs)`` and ``jvp(xs, ts)`` are the correct rules; the
# ``bad_`` ones carry the bug. Every rule is linear in g / ts, so a custom_jvp can be transposed.
# ----------------------------------------------------------------------------------------------------

@dataclass
class RuleCase:
    name: str
    primal: Callable[..., jax.Array]
    vjp: Callable[..., Tuple[jax.Array, ...]]
    bad_vjp: Callable[..., Tuple[jax.Array, ...]]
    jvp: Callable[[Tuple[jax.Array, ...], Tuple[jax.Array, ...]], jax.Array]
    bad_jvp: Callable[[Tuple[jax.Array, ...], Tuple[jax.Array, ...]], jax.Array]
    inputs: Tuple[jax.Array, ...]
    failing: int
    worst_index: Optional[Tuple[int, ...]] = None


def _dtanh(x: jax.Array) -> jax.Array:
    return 1 - jnp.tanh(x) ** 2


ONE_ELEMENT = jnp.ones(50).at[7].set(1.01)

RULE_CASES = [
    RuleCase("sign flip", lambda x: x ** 3,
             lambda g, x: (3 * x ** 2 * g,), lambda g, x: (-3 * x ** 2 * g,),
             lambda xs, ts: 3 * xs[0] ** 2 * ts[0], lambda xs, ts: -3 * xs[0] ** 2 * ts[0],
             (_array(3, 4),), 0),
    RuleCase("missing factor 2", lambda x: x ** 2,
             lambda g, x: (2 * x * g,), lambda g, x: (x * g,),
             lambda xs, ts: 2 * xs[0] * ts[0], lambda xs, ts: xs[0] * ts[0],
             (_array(5),), 0),
    RuleCase("transposed matmul gradient", lambda a, b: a @ b,
             lambda g, a, b: (g @ b.T, a.T @ g), lambda g, a, b: (g @ b, a.T @ g),
             lambda xs, ts: ts[0] @ xs[1] + xs[0] @ ts[1], lambda xs, ts: ts[0] @ xs[1].T + xs[0] @ ts[1],
             (_array(3, 3), _array(3, 3)), 0),
    RuleCase("dropped product-rule term", lambda x: x * jnp.sin(x),
             lambda g, x: ((jnp.sin(x) + x * jnp.cos(x)) * g,), lambda g, x: (x * jnp.cos(x) * g,),
             lambda xs, ts: (jnp.sin(xs[0]) + xs[0] * jnp.cos(xs[0])) * ts[0],
             lambda xs, ts: xs[0] * jnp.cos(xs[0]) * ts[0],
             (_array(6),), 0),
    RuleCase("bias broadcast over the wrong axis", lambda x, b: x + b,
             lambda g, x, b: (g, g.sum(axis=0)), lambda g, x, b: (g, g.sum(axis=1)),
             lambda xs, ts: ts[0] + ts[1][None, :], lambda xs, ts: ts[0] + ts[1][:, None],
             (_array(4, 4), _array(4)), 1),
    RuleCase("wrong gradient for one of three inputs", lambda x, y, z: x * y + z,
             lambda g, x, y, z: (g * y, g * x, g), lambda g, x, y, z: (g * y, g * y, g),
             lambda xs, ts: ts[0] * xs[1] + xs[0] * ts[1] + ts[2], lambda xs, ts: ts[0] * xs[1] + xs[1] * ts[1] + ts[2],
             (_array(4), _array(4), _array(4)), 1),
    RuleCase("bug on one element of fifty", jnp.tanh,
             lambda g, x: (g * _dtanh(x),), lambda g, x: (g * _dtanh(x) * ONE_ELEMENT,),
             lambda xs, ts: _dtanh(xs[0]) * ts[0], lambda xs, ts: _dtanh(xs[0]) * ts[0] * ONE_ELEMENT,
             (_array(50),), 0, (7,)),
]


def _custom_vjp(primal: Callable[..., jax.Array],
                rule: Callable[..., Tuple[jax.Array, ...]]) -> Callable[..., jax.Array]:
    op = jax.custom_vjp(lambda *xs: primal(*xs))
    op.defvjp(lambda *xs: (primal(*xs), xs), lambda xs, g: tuple(rule(g, *xs)))
    return op


def _custom_jvp(primal: Callable[..., jax.Array], rule: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    op = jax.custom_jvp(lambda *xs: primal(*xs))
    op.defjvp(lambda xs, ts: (primal(*xs), rule(xs, ts)))
    return op


KINDS = [("custom_vjp", "rev"), ("custom_jvp", "rev"), ("custom_jvp", "fwd")]


def _rule_op(case: RuleCase, kind: str, buggy: bool) -> Callable[..., jax.Array]:
    if kind == "custom_vjp":
        return _custom_vjp(case.primal, case.bad_vjp if buggy else case.vjp)
    return _custom_jvp(case.primal, case.bad_jvp if buggy else case.jvp)


@pytest.mark.parametrize("kind,analytic", KINDS, ids=[f"{k}-{a}" for k, a in KINDS])
@pytest.mark.parametrize("case", RULE_CASES, ids=[c.name for c in RULE_CASES])
def test_correct_rule_passes(case: RuleCase, kind: str, analytic: str) -> None:
    report = gb.check(_rule_op(case, kind, buggy=False), *case.inputs, analytic=analytic)
    assert report.passed, str(report)
    assert {row.status for row in report.rows} == {"pass"}, str(report)
    assert len(report.rows) == len(case.inputs)


@pytest.mark.parametrize("kind,analytic", KINDS, ids=[f"{k}-{a}" for k, a in KINDS])
@pytest.mark.parametrize("case", RULE_CASES, ids=[c.name for c in RULE_CASES])
def test_seeded_bug_in_rule_is_caught_and_located(case: RuleCase, kind: str, analytic: str) -> None:
    report = gb.check(_rule_op(case, kind, buggy=True), *case.inputs, analytic=analytic)
    assert not report.passed, str(report)
    assert {row.input for row in report.failures} == {f"arg{case.failing}"}, str(report)
    worst = report.failures[0].worst
    assert worst is not None and worst.abs_error > worst.allowed
    if case.worst_index is not None:
        assert worst.input_index == case.worst_index, str(report)


def test_fast_mode_catches_a_bug_and_localizes_it() -> None:
    case = RULE_CASES[-1]
    report = gb.check(_rule_op(case, "custom_vjp", buggy=True), *case.inputs, mode="fast")
    assert not report.passed
    assert report.failures[0].worst.input_index == (7,), str(report)
    assert gb.check(_rule_op(case, "custom_vjp", buggy=False), *case.inputs, mode="fast").passed


# ----------------------------------------------------------------------------------------------------
# analytic="both", order=2
# ----------------------------------------------------------------------------------------------------

def test_both_on_custom_vjp_reports_forward_mode_unsupported() -> None:
    case = RULE_CASES[0]
    report = gb.check(_rule_op(case, "custom_vjp", buggy=False), *case.inputs, analytic="both")
    assert report.passed, str(report)
    forward = [row for row in report.rows if row.analytic_mode == "fwd"]
    assert forward and all(row.status == "unsupported" for row in forward), str(report)
    assert "custom_vjp" in forward[0].message
    assert [row.status for row in report.rows if row.analytic_mode == "rev"] == ["pass"]
    assert not any(row.input == "(all checked)" for row in report.rows)  # nothing to compare rev with


def test_both_on_custom_jvp_has_a_passing_consistency_row() -> None:
    case = RULE_CASES[2]
    report = gb.check(_rule_op(case, "custom_jvp", buggy=False), *case.inputs, analytic="both")
    assert report.passed, str(report)
    consistency = [row for row in report.rows if row.input == "(all checked)"]
    assert len(consistency) == 1 and consistency[0].status == "pass"
    assert {row.analytic_mode for row in report.rows} == {"rev", "fwd", "rev vs fwd"}


def test_both_on_custom_jvp_with_a_wrong_jvp_fails_in_both_modes() -> None:
    case = RULE_CASES[3]
    report = gb.check(_rule_op(case, "custom_jvp", buggy=True), *case.inputs, analytic="both")
    assert not report.passed
    assert {row.analytic_mode for row in report.failures} == {"rev", "fwd"}, str(report)


def test_order_two_on_a_smooth_function_passes() -> None:
    def energy(x, w):
        return jnp.sum(jnp.tanh(x @ w) ** 2) + jnp.sum(jnp.sin(w))

    report = gb.check(energy, _array(3, 4), _array(4, 2), order=2, analytic="both")
    assert report.passed, str(report)
    second = [row for row in report.rows if row.order == 2]
    assert {row.output for row in second} >= {"grad[x]", "grad[w]"}
    assert {row.status for row in second} == {"pass"}


def test_order_two_catches_a_rule_that_is_right_once_but_not_twice() -> None:
    cube = _custom_jvp(lambda x: x ** 3, lambda xs, ts: 3 * jax.lax.stop_gradient(xs[0]) ** 2 * ts[0])
    first = gb.check(cube, _array(4))
    assert first.passed
    report = gb.check(cube, _array(4), order=2)
    assert not report.passed
    assert [row.order for row in report.failures] == [2], str(report)


def test_order_two_on_a_callback_op_is_unsupported() -> None:
    from kit_jax import make

    op, native, _ = make(np.sin, lambda g, x: (g * np.cos(x),))
    report = gb.check(op, native(RNG.normal(size=3)), order=2)
    assert report.passed, str(report)
    second = [row for row in report.rows if row.order == 2]
    assert second and all(row.status == "unsupported" for row in second)
    assert "order=2" in second[0].message


# ----------------------------------------------------------------------------------------------------
# pytrees, pass-through leaves, keys, jit, MLP with dropout
# ----------------------------------------------------------------------------------------------------

class Batch(NamedTuple):
    x: jax.Array
    y: jax.Array


def _params() -> Dict[str, Dict[str, jax.Array]]:
    return {"dense1": {"w": _array(3, 5), "b": _array(5)}, "dense2": {"w": _array(5, 2), "b": _array(2)}}


def mlp_loss(params: Dict[str, Any], batch: Batch, key: jax.Array, rate: float = 0.5) -> jax.Array:
    h = jnp.tanh(batch.x @ params["dense1"]["w"] + params["dense1"]["b"])
    keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
    h = jnp.where(keep, h / (1.0 - rate), 0.0)
    logits = h @ params["dense2"]["w"] + params["dense2"]["b"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch.y[:, None], axis=1))


def _batch() -> Batch:
    return Batch(_array(4, 3), jnp.array([0, 1, 1, 0]))


def test_pytree_leaves_are_named_by_path_and_ints_pass_through() -> None:
    report = gb.check(mlp_loss, _params(), _batch(), jax.random.key(0))
    assert report.passed, str(report)
    assert [row.input for row in report.rows] == [
        "params['dense1']['b']", "params['dense1']['w']", "params['dense2']['b']", "params['dense2']['w']", "batch.x"]


def test_wrt_selects_a_subtree_by_path_prefix() -> None:
    report = gb.check(mlp_loss, _params(), _batch(), jax.random.key(0), wrt="params['dense1']")
    assert [row.input for row in report.rows] == ["params['dense1']['b']", "params['dense1']['w']"]
    with pytest.raises(InvalidArgumentError, match="not floating-point"):
        gb.check(mlp_loss, _params(), _batch(), jax.random.key(0), wrt="batch.y")


@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey], ids=["typed key", "legacy uint32 key"])
def test_mlp_with_key_driven_dropout_passes_and_keys_pass_through(make_key: Callable[[int], jax.Array]) -> None:
    key = make_key(3)
    params, batch = _params(), _batch()
    seen = []

    def loss(params, batch, key, rate):
        seen.append((key, batch.y, rate))
        return mlp_loss(params, batch, key, rate)

    report = gb.check(loss, params, batch, key, 0.5)
    assert report.passed, str(report)
    assert all(k is key and y is batch.y and r == 0.5 for k, y, r in seen)  # the same objects every time
    assert not any("key" in row.input or "rate" in row.input for row in report.rows)
    # the dropout really depends on the key: another key gives another loss (so the test can fail)
    assert float(mlp_loss(params, batch, make_key(3))) != float(mlp_loss(params, batch, make_key(4)))


def test_jit_compiled_function_passes() -> None:
    report = gb.check(jax.jit(mlp_loss), _params(), _batch(), jax.random.key(1))
    assert report.passed, str(report)
    assert len(report.rows) == 5


def test_numpy_float_arrays_are_checked_leaves() -> None:
    def affine(w, x):
        return jnp.tanh(x @ w)

    w = RNG.normal(size=(3, 2)).astype(np.float32)
    report = gb.check(affine, w, _array(4, 3), backend="jax")
    assert report.passed, str(report)
    assert [row.input for row in report.rows] == ["w", "x"]
    assert w.dtype == np.float32


def test_backend_is_detected_from_jax_arrays_and_jax_functions() -> None:
    assert gb.check(lambda x: jnp.sin(x), _array(3)).backend == "jax"
    op = _rule_op(RULE_CASES[0], "custom_vjp", buggy=False)
    assert gb.check(op, RNG.normal(size=3)).backend == "jax"  # NumPy input, JAX function


def test_function_that_cannot_be_traced_by_jit_falls_back_to_point_by_point() -> None:
    def branchy(x):
        return x ** 2 if jnp.sum(x) > -100 else x ** 3  # Python control flow on a value: fine for jax.vjp

    report = gb.check(branchy, _array(3))
    assert report.passed, str(report)
    assert any("point by point" in note for note in report.notes)


# ----------------------------------------------------------------------------------------------------
# "no gradient"
# ----------------------------------------------------------------------------------------------------

def test_stop_gradient_is_reported_as_missing_gradient() -> None:
    report = gb.check(lambda a, b: a * 2 + jax.lax.stop_gradient(b) ** 2, _array(3), _array(3))
    assert not report.passed
    (row,) = report.failures
    assert row.input == "b" and row.status == "no-gradient" and "missing" in row.message


def test_unused_input_has_no_gradient_and_passes() -> None:
    report = gb.check(lambda a, b: a * 2, _array(3), _array(3))
    assert report.passed, str(report)
    assert [row.status for row in report.rows] == ["pass", "no-gradient"]


def test_custom_vjp_returning_none_for_an_input_is_no_gradient() -> None:
    op = _custom_vjp(lambda x, y: jnp.sin(x) * y, lambda g, x, y: (g * jnp.cos(x) * y, None))
    report = gb.check(op, _array(3), _array(3))
    assert [(row.input, row.status) for row in report.rows] == [("arg0", "pass"), ("arg1", "no-gradient")]
    assert not report.passed  # y does change the output


def test_input_jax_cannot_differentiate_is_no_gradient_the_others_are_checked() -> None:
    def scaled(a, b):
        return a * jax.pure_callback(np.sin, jax.ShapeDtypeStruct(b.shape, b.dtype), b, vmap_method="sequential")

    report = gb.check(scaled, _array(3), _array(3))
    assert [(row.input, row.status) for row in report.rows] == [("a", "pass"), ("b", "no-gradient")]
    assert "Pure callbacks do not support JVP" in report.rows[1].message


def test_while_loop_has_forward_mode_but_no_reverse_mode() -> None:
    def power(x):
        return jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] * x, c[1] + 1), (x, 0))[0]

    x = _array(2)
    forward = gb.check(power, x, analytic="fwd")
    assert forward.passed and [row.status for row in forward.rows] == ["pass"], str(forward)
    both = gb.check(power, x, analytic="both")
    statuses = {row.analytic_mode: row.status for row in both.rows if row.input == "x"}
    assert statuses == {"rev": "no-gradient", "fwd": "pass"}, str(both)
    assert not both.passed  # the reverse-mode gradient is missing where the function is not constant


def test_forward_mode_on_a_custom_vjp_next_to_a_callback_is_unsupported_not_a_crash() -> None:
    sine = _custom_vjp(jnp.sin, lambda g, x: (g * jnp.cos(x),))

    def mixed(x, y):
        return sine(x) * jax.pure_callback(np.cos, jax.ShapeDtypeStruct(y.shape, y.dtype), y, vmap_method="sequential")

    report = gb.check(mixed, _array(2), _array(2), analytic="fwd")
    assert [row.status for row in report.rows] == ["unsupported", "unsupported"], str(report)


# ----------------------------------------------------------------------------------------------------
# state: the global x64 flag and the user's arrays
# ----------------------------------------------------------------------------------------------------

class UserError(RuntimeError):
    pass


def _outcome_fn(outcome: str) -> Callable[[jax.Array], jax.Array]:
    if outcome == "pass":
        return _custom_vjp(jnp.sin, lambda g, x: (g * jnp.cos(x),))
    if outcome == "fail":
        return _custom_vjp(jnp.sin, lambda g, x: (-g * jnp.cos(x),))

    def broken(x):
        raise UserError("boom")

    return broken


@pytest.fixture
def restore_x64():
    before = jax.config.jax_enable_x64
    yield
    jax.config.update("jax_enable_x64", before)


@pytest.mark.parametrize("outcome", ["pass", "fail", "raise"])
@pytest.mark.parametrize("x64", [False, True])
def test_x64_setting_is_unchanged_after_a_check(restore_x64, x64: bool, outcome: str) -> None:
    jax.config.update("jax_enable_x64", x64)
    local = jax.enable_x64.get_local()
    x = jnp.asarray(RNG.normal(size=4), dtype=jnp.float32)
    original = np.asarray(x).copy()
    dtypes_seen = []
    inner = _outcome_fn(outcome)

    def fn(x):
        dtypes_seen.append(x.dtype)
        return inner(x)

    if outcome == "raise":
        with pytest.raises(FunctionEvaluationError) as raised:
            gb.check(fn, x)
        assert isinstance(raised.value.__cause__, UserError)
    else:
        assert gb.check(fn, x).passed is (outcome == "pass")
    assert dtypes_seen and set(dtypes_seen) == {np.dtype(np.float64)}  # fn ran in float64
    assert jax.config.jax_enable_x64 is x64
    assert jax.enable_x64.get_global() is x64
    assert jax.enable_x64.get_local() is local
    assert jnp.zeros(1).dtype == (jnp.float64 if x64 else jnp.float32)
    assert x.dtype == jnp.float32 and np.array_equal(np.asarray(x), original)


def test_user_arrays_are_unchanged() -> None:
    params, batch = _params(), _batch()
    snapshot = jax.tree_util.tree_map(lambda a: np.asarray(a).copy(), (params, batch))
    numpy_w = RNG.normal(size=(3, 2)).astype(np.float32)
    numpy_copy = numpy_w.copy()
    gb.check(lambda p, b, k, w: mlp_loss(p, b, k) + jnp.sum(w), params, batch, jax.random.key(0), numpy_w)
    for before, after in zip(jax.tree_util.tree_leaves(snapshot), jax.tree_util.tree_leaves((params, batch))):
        assert after.dtype == before.dtype and np.array_equal(np.asarray(after), before)
    assert numpy_w.dtype == np.float32 and np.array_equal(numpy_w, numpy_copy)


# ----------------------------------------------------------------------------------------------------
# arguments the JAX backend rejects, errors from inside JAX
# ----------------------------------------------------------------------------------------------------

def test_params_and_grad_are_rejected_with_a_hint() -> None:
    with pytest.raises(InvalidArgumentError, match="pass the parameter pytree as an argument"):
        gb.check(lambda x: jnp.sum(x), _array(3), params={"w": _array(2)})
    with pytest.raises(InvalidArgumentError, match="custom_vjp"):
        gb.check(lambda x: jnp.sum(x), _array(3), grad=lambda x: x, backend="jax")


def test_shape_error_inside_fn_is_a_function_evaluation_error() -> None:
    with pytest.raises(FunctionEvaluationError, match="TypeError"):
        gb.check(lambda a, b: a @ b, _array(3, 2), _array(3, 2))


def test_integer_output_is_a_function_evaluation_error() -> None:
    with pytest.raises(FunctionEvaluationError, match="expected a floating-point array.*dtype int"):
        gb.check(lambda x: jnp.argsort(x), _array(3))


def test_bwd_rule_with_a_wrong_shape_is_a_function_evaluation_error() -> None:
    op = _custom_vjp(lambda x: jnp.sum(x ** 2), lambda g, x: (g * 2 * x[:2],))
    with pytest.raises(FunctionEvaluationError, match="VJP|bwd|shape"):
        gb.check(op, _array(3))
