"""JAX: compiled evaluation and derivative code is kept across checks of the same function.

Traces are counted with a Python side effect inside the user's function: it runs only while JAX traces
(compiled code does not run Python). No timing is asserted; the speed-up is printed.
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import sys
import textwrap
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import gradbridge as gb  # noqa: E402
import gradbridge.backends.jax as gbjax  # noqa: E402

pytestmark = pytest.mark.jax


def _x(n: int = 6, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=n), dtype=jnp.float32)


def _counting():
    traces = [0]

    def f(x, w):
        traces[0] += 1
        return jnp.sum(jnp.sin(x) * w ** 2)

    return f, traces


@pytest.mark.parametrize("analytic", ["rev", "fwd"])
def test_second_check_of_the_same_function_does_not_retrace(analytic: str) -> None:
    f, traces = _counting()
    x, w = _x(), _x(seed=1)
    start = time.perf_counter()
    first = gb.check(f, x, w, analytic=analytic)
    first_s = time.perf_counter() - start
    assert first.passed, str(first)
    after_first = traces[0]
    assert after_first > 0
    start = time.perf_counter()
    second = gb.check(f, _x(seed=2), _x(seed=3), analytic=analytic)  # new values, same shapes and dtypes
    second_s = time.perf_counter() - start
    assert second.passed, str(second)
    assert traces[0] == after_first
    print(f"\nJAX check ({analytic}): first {first_s:.4f} s, repeated {second_s:.4f} s")


def test_new_value_of_a_fixed_array_argument_is_used() -> None:
    """w is not checked: compiled code takes it as an argument, so a new w is never a stale constant."""

    @jax.custom_vjp
    def scaled(x, w):
        return jnp.sum(x * w)

    def fwd(x, w):
        return scaled(x, w), (x, w)

    def bwd(res, g):
        x, w = res
        return (g * jnp.where(w > 5.0, 0.0, w), jnp.zeros_like(w))  # wrong once w exceeds 5

    scaled.defvjp(fwd, bwd)
    x = _x()
    good = gb.check(scaled, x, jnp.full(6, 2.0), wrt=0)
    assert good.passed, str(good)
    bad = gb.check(scaled, x, jnp.full(6, 7.0), wrt=0)
    assert not bad.passed, str(bad)
    again = gb.check(scaled, x, jnp.full(6, 3.0), wrt=0)
    assert again.passed, str(again)


def test_different_shapes_retrace() -> None:
    f, traces = _counting()
    assert gb.check(f, _x(4), _x(4, seed=1)).passed
    after = traces[0]
    assert gb.check(f, _x(5), _x(5, seed=1)).passed
    assert traces[0] > after
    after = traces[0]
    assert gb.check(f, _x(5, seed=4), _x(5, seed=5)).passed
    assert traces[0] == after


def test_two_functions_never_share_an_entry() -> None:
    def right(x):
        return jnp.sum(x ** 3)

    @jax.custom_vjp
    def wrong(x):
        return jnp.sum(x ** 3)

    wrong.defvjp(lambda x: (wrong(x), x), lambda x, g: (-3 * x ** 2 * g,))
    x = _x()
    assert gb.check(right, x).passed
    assert not gb.check(wrong, x).passed
    assert gb.check(right, x).passed


def test_rebound_global_array_is_not_stale() -> None:
    """fn reads a global array in its custom rule: rebinding it must not reuse the old trace."""
    namespace = {"jax": jax, "jnp": jnp, "W": jnp.full(6, 2.0)}
    exec(
        "@jax.custom_vjp\n"
        "def f(x):\n"
        "    return jnp.sum(x * x)\n"
        "def fwd(x):\n"
        "    return f(x), x\n"
        "def bwd(x, g):\n"
        "    return (g * x * W,)\n"  # right only while W is 2
        "f.defvjp(fwd, bwd)\n", namespace)
    f = namespace["f"]
    x = _x()
    assert gb.check(f, x).passed
    namespace["W"] = jnp.full(6, 3.0)
    assert not gb.check(f, x).passed
    namespace["W"] = jnp.full(6, 2.0)
    assert gb.check(f, x).passed


def test_cache_does_not_keep_the_function_alive() -> None:
    def f(x):
        return jnp.sum(jnp.tanh(x) ** 2)

    assert gb.check(f, _x()).passed
    assert gbjax.cache_size() > 0
    ref = weakref.ref(f)
    del f
    gc.collect()
    assert ref() is None


def test_seeded_bugs_are_still_caught_on_repeated_checks() -> None:
    @jax.custom_vjp
    def square(x):
        return x ** 2

    square.defvjp(lambda x: (square(x), x), lambda x, g: (x * g,))  # missing factor 2
    for seed in range(3):
        report = gb.check(square, _x(seed=seed))
        assert not report.passed, str(report)


# --- Python scalars fn reads are keyed by value; counters fn bumps while traced keep the cache ---

_SQUARE_WITH_GLOBAL_FACTOR = (
    "@jax.custom_vjp\n"
    "def f(x):\n"
    "    return jnp.sum(x * x)\n"
    "def fwd(x):\n"
    "    return f(x), x\n"
    "def bwd(x, g):\n"
    "    return (g * x * S,)\n"  # right only while S is 2
    "f.defvjp(fwd, bwd)\n")


@pytest.mark.parametrize("right, wrong", [(2.0, 3.0), (2, 3), (np.float32(2.0), np.float32(3.0))],
                         ids=["float", "int", "numpy-scalar"])
def test_a_rebound_global_scalar_read_by_the_bwd_gives_the_new_verdict(right, wrong) -> None:
    namespace = {"jax": jax, "jnp": jnp, "S": right}
    exec(_SQUARE_WITH_GLOBAL_FACTOR, namespace)
    f, x = namespace["f"], _x()
    verdicts = []
    for value in (right, wrong, right, wrong):  # the last two find the entries of the first two
        namespace["S"] = value
        verdicts.append(gb.check(f, x).passed)
    assert verdicts == [True, False, True, False]


def test_a_rebound_closure_float_read_by_the_bwd_gives_the_new_verdict() -> None:
    scale = 2.0

    @jax.custom_vjp
    def f(x):
        return jnp.sum(x * x)

    def bwd(x, g):
        return (g * x * scale,)  # right only while scale is 2

    f.defvjp(lambda x: (f(x), x), bwd)
    x = _x()
    assert gb.check(f, x).passed
    scale = 2.5
    assert not gb.check(f, x).passed
    scale = 2.0  # noqa: F841 - read by bwd
    assert gb.check(f, x).passed


_COUNTED_SQUARE = (
    "@jax.custom_vjp\n"
    "def f(x):\n"
    "    global TRACES\n"
    "    TRACES += 1\n"  # runs only while JAX traces
    "    return jnp.sum(x * x)\n"
    "def fwd(x):\n"
    "    return f(x), x\n"
    "def bwd(x, g):\n"
    "    return (g * x * SCALE,)\n"  # right only while SCALE is 2
    "f.defvjp(fwd, bwd)\n")


def test_a_trace_counter_keeps_the_cache_and_a_rebound_int_factor_does_not() -> None:
    """The counter fn bumps while traced is not what the trace depends on: the second and third checks reuse
    the first one's trace. The int factor is: rebinding it traces afresh and gives the new verdict."""
    gbjax.clear_cache()
    namespace = {"jax": jax, "jnp": jnp, "TRACES": 0, "SCALE": 2}
    exec(_COUNTED_SQUARE, namespace)
    f = namespace["f"]
    assert gb.check(f, _x()).passed
    traced = namespace["TRACES"]
    assert traced > 0 and gbjax.cache_size() == 1
    for seed in (1, 2):
        assert gb.check(f, _x(seed=seed)).passed
    assert namespace["TRACES"] == traced and gbjax.cache_size() == 1
    namespace["SCALE"] = 3
    assert not gb.check(f, _x()).passed
    assert namespace["TRACES"] > traced and gbjax.cache_size() == 2
    traced = namespace["TRACES"]
    assert not gb.check(f, _x(seed=3)).passed and namespace["TRACES"] == traced
    namespace["SCALE"] = 2
    assert gb.check(f, _x()).passed
    gbjax.clear_cache()


# --- state fn reads through classes, user modules, partials, callable objects and dict keys ---
# Each bwd below is right only for the first state. No clear_cache() between the checks: the repeated check of
# the same function must trace afresh once the state changed, and so catch the now wrong rule.


def _verdicts(fn, change, restore) -> list:
    x = _x()
    verdicts = [gb.check(fn, x).passed]
    change()
    verdicts.append(gb.check(fn, x).passed)
    restore()
    verdicts.append(gb.check(fn, x).passed)
    return verdicts


def _square_reading(expression: str, **namespace):
    """f(x) = sum(x * x) with a bwd returning g * x * <expression>: right only while it is 2."""
    scope = {"__name__": "user_jax_module", "jax": jax, "jnp": jnp, **namespace}
    exec(textwrap.dedent(f"""
        @jax.custom_vjp
        def f(x):
            return jnp.sum(x * x)
        def fwd(x):
            return f(x), x
        def bwd(x, g):
            return (g * x * {expression},)
        f.defvjp(fwd, bwd)
        """), scope)
    return scope["f"], scope


def test_a_class_attribute_read_by_the_bwd_gives_the_new_verdict() -> None:
    class Config:
        scale = 2.0

    f, _ = _square_reading("Config.scale", Config=Config)

    def change() -> None:
        Config.scale = 3.0

    def restore() -> None:
        Config.scale = 2.0

    assert _verdicts(f, change, restore) == [True, False, True]


def test_a_user_module_attribute_read_by_the_bwd_gives_the_new_verdict(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "gb_user_settings.py"
    path.write_text("SCALE = 2.0\n")
    spec = importlib.util.spec_from_file_location("gb_user_settings", path)
    settings = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gb_user_settings", settings)
    spec.loader.exec_module(settings)
    f, _ = _square_reading("settings.SCALE", settings=settings)

    def change() -> None:
        settings.SCALE = 3.0

    def restore() -> None:
        settings.SCALE = 2.0

    assert _verdicts(f, change, restore) == [True, False, True]


def test_a_value_read_through_a_functools_partial_gives_the_new_verdict() -> None:
    """What the partial's function reads (here a global of its bwd) is followed through the partial."""
    f, scope = _square_reading("S", S=2.0)
    loss = functools.partial(lambda x, offset: f(x) + offset, offset=1.0)

    def change() -> None:
        scope["S"] = 3.0

    def restore() -> None:
        scope["S"] = 2.0

    assert _verdicts(loss, change, restore) == [True, False, True]


def test_an_argument_of_a_functools_partial_bwd_gives_the_new_verdict() -> None:
    factors = [2.0]

    @jax.custom_vjp
    def g(x):
        return jnp.sum(x * x)

    def g_bwd(factors, x, ct):
        return (ct * x * factors[0],)

    g.defvjp(lambda x: (g(x), x), functools.partial(g_bwd, factors))

    def change_argument() -> None:
        factors[0] = 3.0

    def restore_argument() -> None:
        factors[0] = 2.0

    assert _verdicts(g, change_argument, restore_argument) == [True, False, True]


def test_what_the_call_of_a_callable_object_reads_gives_the_new_verdict() -> None:
    """A callable object: what its class's __call__ reads (here a global of the bwd it calls)."""
    f, scope = _square_reading("S", S=2.0)

    class Loss:
        def __call__(self, x):
            return f(x)

    def change() -> None:
        scope["S"] = 3.0

    def restore() -> None:
        scope["S"] = 2.0

    assert _verdicts(Loss(), change, restore) == [True, False, True]


def test_an_attribute_of_a_callable_object_held_by_its_class_gives_the_new_verdict() -> None:
    @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
    def scaled(x, s):
        return s * jnp.sum(x * x) / 2.0

    def scaled_fwd(x, s):
        return scaled(x, s), x

    def scaled_bwd(s, x, g):
        return (g * x * 2.0,)  # ignores s: right only while s is 2

    scaled.defvjp(scaled_fwd, scaled_bwd)

    class Scaled:
        scale = 2.0

        def __call__(self, x):
            return scaled(x, self.scale)

    def change_attribute() -> None:
        Scaled.scale = 3.0

    def restore_attribute() -> None:
        Scaled.scale = 2.0

    assert _verdicts(Scaled(), change_attribute, restore_attribute) == [True, False, True]


def test_a_dict_with_renamed_keys_gives_the_new_verdict() -> None:
    f, scope = _square_reading("CFG.get('scale', 3.0)", CFG={"scale": 2.0})

    def change() -> None:
        scope["CFG"] = {"shift": 2.0}  # the same values under another key: bwd now reads the default

    def restore() -> None:
        scope["CFG"] = {"scale": 2.0}

    assert _verdicts(f, change, restore) == [True, False, True]
