"""autograd backend: the user's ``defjvp`` rules (found, named and checked in forward mode), detection without
``backend=``, the transposed VJP, and the demo cases. Real autograd code throughout, never mocks.

A bug only in a ``defjvp`` rule passes reverse mode by construction (reverse mode never runs it); the default
``analytic='auto'`` must fail it, because the adapter names the rule (``forward_rule``). The same rule written
correctly passes, so each failing check is meaningful.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

autograd = pytest.importorskip("autograd")

import autograd.numpy as anp  # noqa: E402
import autograd.scipy.special as asp  # noqa: E402
from autograd.extend import defjvp, defvjp, primitive  # noqa: E402

import gradbridge as gb  # noqa: E402
from gradbridge._adapter import CheckSpec  # noqa: E402
from gradbridge._errors import ModeUnsupportedError  # noqa: E402
from gradbridge._registry import detect_adapter, get_adapter  # noqa: E402

pytestmark = pytest.mark.autograd
RNG = np.random.default_rng(1)


def make_sin(jvp_factor=None, vjp_factor=1.0):
    """sin as a primitive with a VJP (``vjp_factor`` 1 is right) and, unless ``jvp_factor`` is None, a JVP."""

    @primitive
    def my_sin(x):
        return np.sin(x)

    defvjp(my_sin, lambda ans, x: lambda g: vjp_factor * g * np.cos(x))
    if jvp_factor is not None:
        defjvp(my_sin, lambda g, ans, x: jvp_factor * g * np.cos(x))
    return my_sin


def _prepare(fn, *args):
    spec = CheckSpec(fn=fn, args=args, kwargs={}, params=None, wrt=None, grad=None, seed=0, train=False,
                     arg_names=tuple(f"a{i}" for i in range(len(args))))
    return get_adapter("autograd").prepare(spec)


# --- defjvp rules -----------------------------------------------------------------------------------------


def test_a_user_defjvp_is_named_as_forward_rule():
    my_sin = make_sin(jvp_factor=1.0)
    assert _prepare(lambda x: anp.sum(my_sin(x) * x), np.ones(3)).forward_rule == "make_sin.<locals>.my_sin (defjvp)"


def test_forward_rules_are_found_through_helpers_closures_partials_and_callable_objects():
    my_sin = make_sin(jvp_factor=1.0)

    def helper(x):
        return my_sin(x) * 2.0

    class Layer:
        def __call__(self, x):
            return anp.sum(helper(x))

    for fn in (lambda x: anp.sum(helper(x)), functools.partial(lambda x, k: k * anp.sum(my_sin(x)), k=2.0),
               Layer(), my_sin):
        assert _prepare(fn, np.ones(3)).forward_rule is not None, fn


def test_no_forward_rule_for_vjp_only_primitives_and_autograd_code():
    my_sin = make_sin(jvp_factor=None)
    assert _prepare(lambda x: anp.sum(my_sin(x)), np.ones(3)).forward_rule is None
    assert _prepare(lambda x: anp.sum(anp.sin(x)), np.ones(3)).forward_rule is None


def test_a_correct_defjvp_passes_in_both_modes():
    my_sin = make_sin(jvp_factor=1.0)
    report = gb.check(lambda x: my_sin(x) * x, RNG.normal(size=4), backend="autograd")
    assert report.passed, str(report)
    assert {row.analytic_mode for row in report.rows} == {"rev", "fwd", "rev vs fwd"}
    assert any("own forward-mode rule" in note for note in report.notes)


@pytest.mark.parametrize("factor", [-1.0, 1.0 + 1e-4, 2.0])
def test_a_bug_only_in_the_defjvp_fails_by_default_and_passes_reverse_mode(factor):
    my_sin = make_sin(jvp_factor=factor)
    fn = lambda x: my_sin(x) * x  # noqa: E731
    x = RNG.normal(size=4)
    report = gb.check(fn, x, backend="autograd")
    assert not report.passed, str(report)
    failed = {row.analytic_mode for row in report.failures}
    assert "fwd" in failed and "rev" not in failed, str(report)  # the forward rows fail, the reverse ones pass
    assert gb.check(fn, x, backend="autograd", analytic="rev").passed  # reverse mode never runs the rule


def test_forward_mode_of_autograd_code_agrees():
    report = gb.check(lambda x: anp.tanh(x) * anp.exp(x), RNG.normal(size=5), backend="autograd", analytic="fwd")
    assert report.passed, str(report)


def test_forward_mode_without_a_jvp_rule_is_unsupported():
    my_sin = make_sin(jvp_factor=None)
    prepared = _prepare(lambda x: my_sin(x), np.ones(3))
    with prepared.session():
        prepared.evaluate(prepared.x0[None])
        with pytest.raises(ModeUnsupportedError, match="no forward-mode"):
            prepared.jvp(np.eye(3))
    report = gb.check(lambda x: my_sin(x), RNG.normal(size=3), backend="autograd", analytic="fwd")
    assert not report.passed and {row.status for row in report.rows} == {"unsupported"}, str(report)


# --- detection --------------------------------------------------------------------------------------------


def _uses_anp(x):
    return anp.sum(anp.tanh(x))


def _calls_helper(x):
    return _uses_anp(x) * 2.0


def _plain_numpy(x):
    return np.sum(np.tanh(x))


def test_autograd_code_and_primitives_are_detected():
    my_sin = make_sin()
    for fn in (_uses_anp, _calls_helper, my_sin, lambda x: asp.expit(x).sum(), anp.tanh):
        assert detect_adapter([np.ones(3), fn]).name == "autograd", fn
    report = gb.check(_calls_helper, RNG.normal(size=3))
    assert report.backend == "autograd" and report.passed, str(report)


def test_plain_numpy_code_stays_on_numpy():
    assert detect_adapter([np.ones(3), _plain_numpy]).name == "numpy"
    report = gb.check(_plain_numpy, RNG.normal(size=3), grad=lambda x: 1.0 - np.tanh(x) ** 2)
    assert report.backend == "numpy" and report.passed, str(report)
    assert not get_adapter("autograd").owns(np.ones(3))


def test_autograd_code_with_a_hand_written_grad_stays_on_numpy():
    """The user's gradient is what a grad= check compares: autograd would not be used, so the report must not
    say it was."""
    assert detect_adapter([np.ones(3), _uses_anp], hand_written=True).name == "numpy"
    report = gb.check(_uses_anp, RNG.normal(size=3), grad=lambda x: 1.0 - np.tanh(x) ** 2)
    assert report.backend == "numpy" and report.passed, str(report)
    explicit = gb.check(_uses_anp, RNG.normal(size=3), grad=lambda x: 1.0 - np.tanh(x) ** 2, backend="autograd")
    assert explicit.backend == "autograd" and explicit.passed, str(explicit)


def test_a_primitive_is_named_by_the_function_the_user_wrote():
    @primitive
    def scaled_square(values, scale):
        return values ** 2 * scale

    defvjp(scaled_square, lambda ans, values, scale: lambda g: 2.0 * g * values * scale, None)
    report = gb.check(scaled_square, RNG.normal(size=3), 3.0)
    assert report.function == "scaled_square" and report.passed, str(report)
    assert [row.input for row in report.rows] == ["values"], str(report)


# --- the transposed VJP -----------------------------------------------------------------------------------


def test_transposed_products_are_the_vjps_jacobian():
    M = RNG.normal(size=(3, 4))
    my_sin = make_sin()
    prepared = _prepare(lambda x, w: anp.tanh(anp.dot(M, my_sin(x))) * w, RNG.normal(size=4), RNG.normal(size=3))
    with prepared.session():
        prepared.evaluate(prepared.x0[None])
        jacobian = prepared.vjp(np.eye(3))  # (m, n): row i is e_i^T J
        transposed = prepared.vjp_transposed(np.eye(7))  # (n, m): row j is J e_j
    np.testing.assert_allclose(transposed, jacobian.T, rtol=1e-12, atol=1e-14)


def test_transposed_products_of_a_seeded_wrong_rule_follow_the_rule():
    my_sin = make_sin(vjp_factor=-1.0)
    prepared = _prepare(lambda x: my_sin(x) * 2.0, RNG.normal(size=3))
    with prepared.session():
        prepared.evaluate(prepared.x0[None])
        np.testing.assert_allclose(prepared.vjp_transposed(np.eye(3)), prepared.vjp(np.eye(3)).T, rtol=1e-12)


def test_a_rule_that_drops_autograds_boxes_cannot_be_transposed():
    @primitive
    def double(x):
        return 2.0 * x

    defvjp(double, lambda ans, x: lambda g: 2.0 * np.asarray(g, dtype=np.float64))
    prepared = _prepare(double, RNG.normal(size=3))
    with prepared.session():
        prepared.evaluate(prepared.x0[None])
        with pytest.raises(ModeUnsupportedError, match="transposed VJP"):
            prepared.vjp_transposed(np.eye(3))


def test_a_banded_jacobian_is_checked_from_transposed_products_and_a_one_element_bug_is_named():
    x = RNG.normal(size=200)
    good = gb.check(lambda v: anp.sin(v)[1:] * v[:-1], x, backend="autograd", mode="full")
    assert good.passed, str(good)
    assert "compressed" in good.rows[0].method, good.rows[0].method  # column groups: J t by the transposed VJP

    scale = np.ones(200)
    scale[17] = 1.0 + 1e-4

    @primitive
    def my_sin(v):
        return np.sin(v)

    defvjp(my_sin, lambda ans, v: lambda g: g * anp.cos(v) * scale)
    bad = gb.check(lambda v: my_sin(v)[1:] * v[:-1], x, backend="autograd", mode="full")
    assert not bad.passed, str(bad)
    assert bad.rows[0].worst.input_index == (17,), str(bad)


# --- the kit and the demo ---------------------------------------------------------------------------------


def test_the_kit_op_passes_and_its_seeded_bug_fails():
    from kits import make_op

    A = RNG.normal(size=(2, 3))
    right = make_op("autograd", lambda x: A @ np.tanh(x), lambda g, x: ((1.0 - np.tanh(x) ** 2) * (A.T @ g),))
    wrong = make_op("autograd", lambda x: A @ np.tanh(x), lambda g, x: (-(1.0 - np.tanh(x) ** 2) * (A.T @ g),))
    x = RNG.normal(size=3)
    assert gb.check(right[0], right[1](x), **right[2]).passed
    assert not gb.check(wrong[0], wrong[1](x), **wrong[2]).passed


def test_demo_cases_give_their_expected_verdicts():
    from gradbridge.backends.demos import demo_results

    results = list(demo_results(["autograd"]))
    assert len(results) == 3 and all(result.as_expected for result in results), [r.error for r in results]


class _Touchy:
    """An object whose attribute lookups raise: reading fn's code must never call it."""

    def __getattr__(self, name):
        raise AssertionError(f"the check called __getattr__({name!r})")

    def __getattribute__(self, name):
        if name.startswith("__"):
            return object.__getattribute__(self, name)
        raise AssertionError(f"the check called __getattribute__({name!r})")


TOUCHY = _Touchy()


def _reads_touchy(x):
    return anp.sum(anp.sin(x)) if TOUCHY is not None else TOUCHY.scale


def test_reading_fns_code_calls_nothing_of_the_users():
    assert detect_adapter([np.ones(3), _reads_touchy]).name == "autograd"
    assert gb.check(_reads_touchy, RNG.normal(size=3)).passed


def test_a_float32_only_kernel_is_checked_in_float32_with_promote_false():
    def make(factor: float):
        @primitive
        def kernel(x):
            assert x.dtype == np.float32, x.dtype  # runs in float32 only
            return np.tanh(x)

        def vjp_maker(ans, x):
            def vjp(g):
                assert g.dtype == np.float32, g.dtype  # the cotangent comes in the output's dtype
                return (factor * g * (1.0 - np.tanh(x) ** 2)).astype(np.float32)

            return vjp

        defvjp(kernel, vjp_maker)
        return lambda x: kernel(x) * 2.0

    x = RNG.normal(size=5).astype(np.float32)
    assert gb.check(make(1.0), x, backend="autograd", promote=False).passed
    assert not gb.check(make(1.01), x, backend="autograd", promote=False).passed
    with pytest.raises(gb.FunctionEvaluationError, match="promote=False"):
        gb.check(make(1.0), x, backend="autograd")  # float64 copies: the kernel refuses them
