"""JAX: functions that keep and rebind their own state (a model splitting its own PRNG key) while they run.

Traced under jax.jit/jax.vmap such a function stores tracers into the user's objects. The check must never leave
one there: afterwards every place fn rebinds holds exactly what it held before (the very same key object, the same
bits), also when the check raises. Such a function is still checked, eagerly: where its output depends on the key
it advances it is reported as not deterministic, where it does not it gets its normal verdict (a right rule
passes, a wrong one fails). A check called on tracers (inside jax.jit or jax.grad) raises a clear error.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Tuple

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import gradbridge as gb  # noqa: E402
from gradbridge import FunctionEvaluationError, InvalidArgumentError  # noqa: E402

pytestmark = pytest.mark.jax


def _x(n: int = 5, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).uniform(0.3, 1.5, size=n), dtype=jnp.float32)


def _square_sum(scale: float) -> Callable[[jax.Array], jax.Array]:
    """``sum(x * x)`` as a custom_vjp whose bwd is right only for ``scale == 2``."""

    @jax.custom_vjp
    def f(x):
        return jnp.sum(x * x)

    def fwd(x):
        return f(x), x

    def bwd(x, g):
        return (g * x * scale,)

    f.defvjp(fwd, bwd)
    return f


def _sin_sum(scale: float) -> Callable[[jax.Array], jax.Array]:
    """``sum(sin(x))`` as a custom_jvp whose rule is right only for ``scale == 1`` (forward mode)."""

    @jax.custom_jvp
    def f(x):
        return jnp.sum(jnp.sin(x))

    @f.defjvp
    def f_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return f(x), jnp.sum(scale * jnp.cos(x) * t)

    return f


def _noise(key: jax.Array, x: jax.Array) -> jax.Array:
    return 1.0 + 0.1 * jax.random.normal(key, x.shape, dtype=x.dtype)


# --- where the key lives: each factory returns (fn, extra args, the state to compare afterwards) -------------


class _Model:
    """Keeps its key as an attribute; uses the fresh subkey only when ``noisy`` (training mode)."""

    def __init__(self, op: Callable, noisy: bool) -> None:
        self.key = jax.random.key(0)
        self.op = op
        self.noisy = noisy

    def __call__(self, x):
        self.key, sub = jax.random.split(self.key)
        return self.op(x * _noise(sub, x) if self.noisy else x)


def _attribute(op, noisy):
    model = _Model(op, noisy)
    return model, (), lambda: [model.key]


def _bound_method(op, noisy):
    class Net:
        def __init__(self):
            self.key = jax.random.key(1)

        def loss(self, x):
            self.key, sub = jax.random.split(self.key)
            return op(x * _noise(sub, x) if noisy else x)

    net = Net()
    return net.loss, (), lambda: [net.key]


def _closure(op, noisy):
    key = jax.random.key(2)

    def f(x):
        nonlocal key
        key, sub = jax.random.split(key)
        return op(x * _noise(sub, x) if noisy else x)

    return f, (), lambda: [key]


_GLOBAL = {"op": None, "noisy": False}
_GLOBAL_KEY = jax.random.key(3)


def _global_keyed(x):
    global _GLOBAL_KEY
    _GLOBAL_KEY, sub = jax.random.split(_GLOBAL_KEY)
    return _GLOBAL["op"](x * _noise(sub, x) if _GLOBAL["noisy"] else x)


def _global(op, noisy):
    _GLOBAL.update(op=op, noisy=noisy)
    return _global_keyed, (), lambda: [_GLOBAL_KEY]


class _Variable:
    def __init__(self, value):
        self.value = value


class _RngStream:
    """flax.nnx style: a key and a counter, each in a variable object, folded together for every draw."""

    def __init__(self, seed: int) -> None:
        self.key = _Variable(jax.random.key(seed))
        self.count = _Variable(jnp.zeros((), dtype=jnp.uint32))

    def __call__(self):
        self.count.value = self.count.value + 1
        return jax.random.fold_in(self.key.value, self.count.value)


class _Rngs:
    def __init__(self, seed: int) -> None:
        self.dropout = _RngStream(seed)


class _NnxStyle:
    def __init__(self, op, noisy, rngs: _Rngs) -> None:
        self.op, self.noisy, self.rngs = op, noisy, rngs

    def __call__(self, x):
        sub = self.rngs.dropout()
        return self.op(x * _noise(sub, x) if self.noisy else x)


def _nnx_style(op, noisy):
    model = _NnxStyle(op, noisy, _Rngs(4))
    return model, (), lambda: [model.rngs.dropout.key.value, model.rngs.dropout.count.value]


@dataclasses.dataclass(frozen=True)
class _EqxStyle:
    """equinox style: a frozen dataclass that writes its key with object.__setattr__."""

    op: Any
    noisy: bool
    key: Any

    def __call__(self, x):
        new, sub = jax.random.split(self.key)
        object.__setattr__(self, "key", new)
        return self.op(x * _noise(sub, x) if self.noisy else x)


def _eqx_style(op, noisy):
    model = _EqxStyle(op, noisy, jax.random.key(5))
    return model, (), lambda: [model.key]


class _Slotted:
    __slots__ = ("key", "op", "noisy")

    def __init__(self, op, noisy):
        self.key, self.op, self.noisy = jax.random.key(6), op, noisy

    def __call__(self, x):
        self.key, sub = jax.random.split(self.key)
        return self.op(x * _noise(sub, x) if self.noisy else x)


def _slots(op, noisy):
    model = _Slotted(op, noisy)
    return model, (), lambda: [model.key]


class _Holder:
    def __init__(self):
        self.key = jax.random.key(7)


def _passed_state(op, noisy):
    """The state comes as an argument (a non-array value: the same object at every run)."""
    holder = _Holder()

    def f(x, state):
        state.key, sub = jax.random.split(state.key)
        return op(x * _noise(sub, x) if noisy else x)

    return f, (holder,), lambda: [holder.key]


PLACES = {"attribute": _attribute, "bound method": _bound_method, "closure": _closure, "global": _global,
          "nnx style": _nnx_style, "equinox style": _eqx_style, "slots": _slots, "argument": _passed_state}


def _saved(values: List[Any]) -> List[Tuple[Any, np.ndarray]]:
    return [(v, np.array(jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v))
            for v in values]


def _assert_untouched(now: List[Any], saved: List[Tuple[Any, np.ndarray]]) -> None:
    for value, (original, bits) in zip(now, saved):
        assert not isinstance(value, jax.core.Tracer), f"a tracer was left in the user's state: {value!r}"
        assert value is original, "fn's state does not hold the very object it held before the check"
        data = jax.random.key_data(value) if jnp.issubdtype(value.dtype, jax.dtypes.prng_key) else value
        assert np.array_equal(np.asarray(data), bits)


@pytest.mark.parametrize("place", list(PLACES))
def test_a_key_fn_advances_but_does_not_use_gets_its_normal_verdict(place: str) -> None:
    x = _x()
    x64 = jax.config.jax_enable_x64
    for scale, expected in ((2.0, True), (3.0, False)):
        fn, extra, state = PLACES[place](_square_sum(scale), noisy=False)
        saved = _saved(state())
        for _ in range(2):  # the second check of the same function starts from what the first one learnt
            report = gb.check(fn, x, *extra)
            assert report.problem is None, str(report)
            assert report.passed is expected, str(report)
            assert [row.input for row in report.rows] == ["x"]
            _assert_untouched(state(), saved)
    assert jax.config.jax_enable_x64 == x64


@pytest.mark.parametrize("place", list(PLACES))
def test_a_key_fn_advances_and_uses_is_reported_not_deterministic(place: str) -> None:
    x = _x()
    fn, extra, state = PLACES[place](_square_sum(2.0), noisy=True)
    saved = _saved(state())
    report = gb.check(fn, x, *extra)
    assert not report.passed
    assert report.problem is not None and "not deterministic" in report.problem, str(report)
    _assert_untouched(state(), saved)
    # the model is not broken: it runs (eagerly and under jit) and advances its own key as before
    assert np.isfinite(float(fn(x, *extra)))
    assert any(now is not original for now, (original, _) in zip(state(), saved))
    jax.jit(lambda x: x * 2.0)(x)


@pytest.mark.parametrize("options", [{"order": 2}, {"mode": "fast"}, {"analytic": "rev", "kinks": "fail"}],
                         ids=["order 2", "fast", "rev"])
def test_stateful_model_under_other_options(options) -> None:
    x = _x(4)
    for scale, expected in ((2.0, True), (3.0, False)):
        model = _Model(_square_sum(scale), noisy=False)
        saved = _saved([model.key])
        report = gb.check(model, x, **options)
        assert report.passed is expected, str(report)
        _assert_untouched([model.key], saved)


@pytest.mark.parametrize("analytic", ["fwd", "both"])
def test_stateful_model_in_forward_mode(analytic: str) -> None:
    x = _x(4)
    for scale, expected in ((1.0, True), (1.5, False)):
        model = _Model(_sin_sum(scale), noisy=False)
        saved = _saved([model.key])
        report = gb.check(model, x, analytic=analytic)
        assert report.passed is expected, str(report)
        _assert_untouched([model.key], saved)


class _Bookkeeping:
    """Advances its key, caches its input, counts its calls and logs shapes: the key and the cached input are put
    back, the int counter and the log (bookkeeping) stay as fn left them."""

    def __init__(self, op) -> None:
        self.key = jax.random.key(8)
        self.last_input = None
        self.calls = 0
        self.shapes: List[Tuple[int, ...]] = []
        self.op = op

    def __call__(self, x):
        self.calls += 1
        self.shapes.append(tuple(x.shape))
        self.key, _ = jax.random.split(self.key)
        self.last_input = x
        return self.op(x)


def test_cached_inputs_are_put_back_and_counters_kept() -> None:
    x = _x()
    for scale, expected in ((2.0, True), (3.0, False)):
        model = _Bookkeeping(_square_sum(scale))
        saved = _saved([model.key])
        report = gb.check(model, x)
        assert report.passed is expected, str(report)
        _assert_untouched([model.key], saved)
        assert model.last_input is None
        assert model.calls > 0 and len(model.shapes) == model.calls and set(model.shapes) == {(5,)}


class _Failing(_Model):
    def __call__(self, x):
        self.key, sub = jax.random.split(self.key)
        raise ValueError("the model is broken")


def test_state_is_put_back_when_the_check_raises() -> None:
    model = _Failing(_square_sum(2.0), noisy=False)
    saved = _saved([model.key])
    with pytest.raises(FunctionEvaluationError) as raised:
        gb.check(model, _x())
    assert "the model is broken" in str(raised.value)
    _assert_untouched([model.key], saved)


# --- gb.check on tracers ---------------------------------------------------------------------------------------


def _loss(x):
    return jnp.sum(jnp.sin(x) * x)


@pytest.mark.parametrize("transform", ["jit", "grad", "vmap"])
def test_check_called_on_a_tracer_raises_a_clear_error(transform: str) -> None:
    def checked_inside(x):
        gb.check(_loss, x)
        return jnp.sum(x * x)

    wrapped = {"jit": jax.jit, "grad": jax.grad, "vmap": jax.vmap}[transform](checked_inside)
    with pytest.raises(InvalidArgumentError, match=r"args: x is a JAX tracer.*inside a JAX transformation"):
        wrapped(jnp.ones((2, 3)) if transform == "vmap" else jnp.ones(3))


def test_check_of_a_function_closing_over_a_tracer_raises_a_clear_error() -> None:
    def checked_inside(w):
        gb.check(lambda y: jnp.sum(jnp.sin(y) * w), np.ones(3), backend="jax")
        return jnp.sum(w)

    with pytest.raises(InvalidArgumentError, match=r"fn: a value fn reads \(fn\.<closure w>\) is a JAX tracer"):
        jax.jit(checked_inside)(jnp.ones(3))


def test_check_nested_inside_a_checked_function() -> None:
    """fn calls gb.check on a sub-function: with values that do not depend on fn's input that works (fn is then
    evaluated eagerly); with values that do, the derivative cannot be taken eagerly either: a clear error."""
    inner: List[bool] = []

    def outer_constant(x):
        inner.append(gb.check(_loss, np.linspace(0.5, 1.0, 3), backend="jax").passed)
        return jnp.sum(jnp.sin(x) * x)

    report = gb.check(outer_constant, _x())
    assert report.passed, str(report)
    assert inner and all(inner)

    def outer_dependent(x):
        gb.check(_loss, x)
        return jnp.sum(jnp.sin(x) * x)

    with pytest.raises(InvalidArgumentError, match=r"args: x is a JAX tracer.*a function that gradbridge itself"):
        gb.check(outer_dependent, _x())
