"""Any order, any mode per level: ``order=k`` checks each level's derivative of the level below, built in the mode
the level below is checked in (``x -> J^T v`` from reverse mode, ``x -> J t`` from forward mode), so
``analytic=("rev", "fwd")`` is forward-over-reverse and ``analytic="fwd"`` at order 2 forward-over-forward. A scalar
fn's second order also gets the Hessian-symmetry contract.

The rule bugs here live only in a second derivative (a tangent rule that is right at first order but detaches what
its own derivative needs), so only the level and mode that run them can see them.
"""

from __future__ import annotations

import numpy as np
import pytest

import gradbridge as gb
from backend_matrix import require_backend

X = np.array([0.3, -0.7, 1.1, 0.5])


def _native(backend: str, value: np.ndarray):
    if backend == "torch":
        import torch
        return torch.tensor(value)
    if backend == "jax":
        import jax
        import jax.numpy as jnp
        with jax.enable_x64(True):
            return jnp.asarray(value)
    if backend == "tensorflow":
        import tensorflow as tf
        return tf.constant(value)
    return np.array(value)


def _smooth(backend: str):
    if backend == "torch":
        import torch
        return lambda x: torch.sin(x) * torch.exp(0.3 * x)
    if backend == "jax":
        import jax.numpy as jnp
        return lambda x: jnp.sin(x) * jnp.exp(0.3 * x)
    if backend == "tensorflow":
        import tensorflow as tf
        return lambda x: tf.sin(x) * tf.exp(0.3 * x)
    import autograd.numpy as anp
    return lambda x: anp.sin(x) * anp.exp(0.3 * x)


@pytest.mark.parametrize("backend", ["torch", "jax", "tensorflow", "autograd"])
def test_third_order_of_a_smooth_function_passes(backend: str) -> None:
    require_backend(backend)
    report = gb.check(_smooth(backend), _native(backend, X), order=3,
                      **({"backend": "autograd"} if backend == "autograd" else {}))
    assert report.passed, str(report)
    assert sorted({row.order for row in report.rows}) == [1, 2, 3], str(report)
    assert sum("order 3:" in note for note in report.notes) == 1, report.notes


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_forward_over_forward_and_mixed_levels_of_a_smooth_function_pass(backend: str) -> None:
    require_backend(backend)
    fn, x = _smooth(backend), _native(backend, X)
    for analytic in ("fwd", ("fwd", "rev"), ("rev", "rev"), ("rev", "fwd")):
        report = gb.check(fn, x, order=2, analytic=analytic)
        assert report.passed, f"{analytic}: {report}"
        level2 = [row for row in report.rows if row.order == 2]
        expected = analytic[1] if isinstance(analytic, tuple) else analytic
        assert level2 and all(row.analytic_mode == expected for row in level2), str(report)
        assert all(row.status != "unsupported" for row in level2), f"{analytic}: {report}"


def _jax_sine(detach: bool):
    import jax
    import jax.numpy as jnp

    @jax.custom_jvp
    def sine(x):
        return jnp.sin(x)

    @sine.defjvp
    def rule(primals, tangents):
        (x,), (t,) = primals, tangents
        slope = jnp.cos(jax.lax.stop_gradient(x) if detach else x)  # detached: right at first order only
        return jnp.sin(x), slope * t

    return sine


def test_jax_forward_over_forward_catches_a_rule_right_only_at_first_order() -> None:
    require_backend("jax")
    x = _native("jax", X)
    assert gb.check(_jax_sine(True), x).passed  # first order: the rule is right
    assert gb.check(_jax_sine(False), x, order=2, analytic="fwd").passed
    report = gb.check(_jax_sine(True), x, order=2, analytic="fwd")
    assert not report.passed, str(report)
    failing = {(row.order, row.analytic_mode) for row in report.failures}
    assert failing == {(2, "fwd")}, str(report)
    assert any("forward-over-forward" in note for note in report.notes), report.notes


def _torch_sine(detach: bool):
    import torch

    class Sine(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return torch.sin(x)

        @staticmethod
        def setup_context(ctx, inputs, output):
            (x,) = inputs
            ctx.save_for_backward(x)
            ctx.save_for_forward(x)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * torch.cos(x)

        @staticmethod
        def jvp(ctx, t):
            (x,) = ctx.saved_tensors
            return t * torch.cos(x.detach() if detach else x)  # detached: right at first order only

    return Sine.apply


@pytest.mark.parametrize("detach", [True, False])
def test_torch_forward_over_forward_through_a_function_jvp_is_caught(detach: bool) -> None:
    """torch.func.jacfwd(jacfwd(f)) through an autograd.Function with a jvp gives wrong second derivatives (zeros
    here) even for a right rule, an open torch bug, while reverse-over-reverse (what gradgradcheck checks) passes;
    a rule right only at first order (detached) is wrong the same way. gradbridge's analytic side is what torch.func
    computes, and fails against finite differences; a plain torch function passes the same check."""
    require_backend("torch")
    import torch

    x = _native("torch", X)
    sine = _torch_sine(detach)
    assert gb.check(sine, x).passed
    assert gb.check(sine, x, order=2, analytic="rev").passed  # what gradgradcheck sees
    report = gb.check(sine, x, order=2, analytic="fwd")
    assert not report.passed, str(report)
    assert {(row.order, row.analytic_mode) for row in report.failures} == {(2, "fwd")}, str(report)
    t, u = torch.tensor([1.0, -0.5, 0.25, 2.0], dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    torch_says = torch.func.jvp(lambda p: torch.func.jvp(sine, (p,), (t,))[1], (x,), (u,))[1]
    assert torch.allclose(torch_says, torch.zeros(4, dtype=torch.float64))  # what torch.func computes
    assert gb.check(torch.sin, x, order=2, analytic="fwd").passed


def _torch_elementwise_rule(forward, slope, tangent_slope=None):
    """An elementwise torch Function: ``forward(x)``, backward ``g * slope(x)``, jvp ``t * tangent_slope(x)`` (the
    slope itself unless given)."""
    import torch

    class Rule(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x):
            return forward(x)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])
            ctx.save_for_forward(inputs[0])

        @staticmethod
        def backward(ctx, g):
            return g * slope(ctx.saved_tensors[0])

        @staticmethod
        def jvp(ctx, t):
            return t * (tangent_slope or slope)(ctx.saved_tensors[0])

    return Rule.apply


def _torch_sine_with_cos_rule(jvp_bug: bool):
    """sin as a Function whose backward multiplies by a custom cos Function: the cos rule's backward is right, its
    ``jvp`` (``jvp_bug``) has the sign of -sin(x) lost. Reverse-over-reverse (gradgradcheck) runs the backward only;
    forward-over-reverse, what ``torch.func.hessian`` runs, runs the jvp."""
    import torch

    cos = _torch_elementwise_rule(torch.cos, lambda x: -torch.sin(x), torch.sin if jvp_bug else None)
    return _torch_elementwise_rule(torch.sin, cos)


def test_torch_forward_over_reverse_runs_the_jvp_rules_of_the_backward() -> None:
    require_backend("torch")
    import torch

    x = _native("torch", X)
    assert gb.check(_torch_sine_with_cos_rule(False), x, order=2, analytic=("rev", "fwd")).passed
    buggy = _torch_sine_with_cos_rule(True)
    assert gb.check(buggy, x, order=2, analytic="rev").passed  # what gradgradcheck sees
    report = gb.check(buggy, x, order=2, analytic=("rev", "fwd"))
    assert not report.passed, str(report)
    assert {(row.order, row.analytic_mode) for row in report.failures} == {(2, "fwd")}, str(report)
    # what a user computing Hessians with torch.func gets from this rule: the diagonal's sign flipped
    hessian = torch.func.hessian(lambda p: buggy(p).sum())(x)
    assert torch.allclose(torch.diagonal(hessian), torch.sin(x))


def test_an_asymmetric_second_derivative_breaks_the_hessian_symmetry_contract() -> None:
    require_backend("torch")
    import torch

    def make(bug: bool):
        class Product(torch.autograd.Function):  # sum(x * y)
            @staticmethod
            def forward(ctx, x, y):
                ctx.save_for_backward(x, y)
                return (x * y).sum()

            @staticmethod
            def backward(ctx, g):
                x, y = ctx.saved_tensors
                return g * y, g * (x.detach() if bug else x)  # d(grad_y)/dx lost: H_yx = 0, H_xy = I

        return Product.apply

    x, y = _native("torch", X), _native("torch", X[::-1].copy())
    right = gb.check(make(False), x, y, order=2)
    assert right.passed and [c.name for c in right.contracts if c.name == "Hessian symmetric"], str(right)
    report = gb.check(make(True), x, y, order=2)
    assert not report.passed, str(report)
    assert [c.name for c in report.contracts if not c.passed] == ["Hessian symmetric"], str(report)
    assert all(row.passed for row in report.rows if row.order == 1), str(report)


def test_a_level_the_backend_cannot_build_is_reported_unsupported() -> None:
    report = gb.check(lambda x: np.sin(x), X, grad=lambda g, x: g * np.cos(x), order=2)
    level2 = [row for row in report.rows if row.order == 2]
    assert level2 and all(row.status == "unsupported" for row in level2), str(report)


@pytest.mark.parametrize("options, match", [
    ({"order": 5}, r"^order: expected an integer from 1"),
    ({"order": 0}, r"^order: expected an integer from 1"),
    ({"order": 2, "analytic": ("rev",)}, r"^analytic: a sequence gives the mode of each derivative level"),
    ({"order": 2, "analytic": ("rev", "both")}, r"^analytic: a sequence"),
])
def test_bad_orders_and_level_modes_are_named(options, match) -> None:
    with pytest.raises(gb.InvalidArgumentError, match=match):
        gb.check(lambda x: np.sin(x), X, grad=lambda g, x: g * np.cos(x), **options)
