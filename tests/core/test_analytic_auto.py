"""``analytic='auto'`` (the default) checks every rule the user wrote and falls back to forward mode for
functions that support only forward mode, instead of reporting "no gradient / the gradient is missing"."""

from __future__ import annotations

import numpy as np
import pytest

import gradbridge as gb

jax = pytest.importorskip("jax")
jnp = jax.numpy


def newton_sqrt(x):
    """sqrt by 30 Newton steps in a while_loop: JAX differentiates it in forward mode only."""
    def body(carry):
        y, i = carry
        return 0.5 * (y + x / y), i + 1

    y, _ = jax.lax.while_loop(lambda carry: carry[1] < 30, body, (jnp.ones_like(x), 0))
    return y


def looped_cube(terms):
    """x**3 whose forward rule sums ``terms`` copies of x**2 t in a while_loop (3 is right)."""

    @jax.custom_jvp
    def cube(x):
        return x ** 3

    @cube.defjvp
    def cube_jvp(primals, tangents):
        (x,), (t,) = primals, tangents

        def body(carry):
            total, i = carry
            return total + t * x ** 2, i + 1

        total, _ = jax.lax.while_loop(lambda carry: carry[1] < terms, body, (jnp.zeros_like(t), 0))
        return x ** 3, total

    return cube


def _x():
    with jax.enable_x64(True):
        return jnp.array([1.5, 2.0, 4.0])


@pytest.mark.jax
def test_forward_only_function_is_checked_in_forward_mode_by_default():
    report = gb.check(newton_sqrt, _x())
    assert report.passed, str(report)
    assert [row.analytic_mode for row in report.rows] == ["fwd"], str(report)
    assert any("checked in forward mode" in note for note in report.notes), str(report)


@pytest.mark.jax
def test_asking_for_reverse_mode_still_reports_it_missing():
    report = gb.check(newton_sqrt, _x(), analytic="rev")
    assert not report.passed and report.rows[0].status == "no-gradient", str(report)


@pytest.mark.jax
def test_a_forward_rule_bug_in_a_forward_only_function_fails_by_default():
    assert gb.check(looped_cube(3), _x()).passed
    report = gb.check(looped_cube(2), _x())
    assert not report.passed, str(report)
    row = report.failures[0]
    assert row.analytic_mode == "fwd" and row.input == "x", str(report)


def _torch_cube(jvp_factor: float):
    torch = pytest.importorskip("torch")

    class Cube(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x ** 3

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])
            ctx.save_for_forward(inputs[0])

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 3 * x ** 2 * g

        @staticmethod
        def jvp(ctx, t):
            (x,) = ctx.saved_tensors
            return jvp_factor * x ** 2 * t

    return Cube, torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)


@pytest.mark.torch
def test_a_bug_only_in_a_torch_jvp_fails_by_default():
    right, x = _torch_cube(3.0)
    assert gb.check(right.apply, x).passed
    wrong, x = _torch_cube(2.0)
    report = gb.check(wrong.apply, x)
    assert not report.passed, str(report)
    assert {row.analytic_mode for row in report.failures} >= {"fwd"}, str(report)
    assert any("Cube.jvp" in note for note in report.notes), str(report)
    assert gb.check(wrong.apply, x, analytic="rev").passed  # asked for reverse mode only: the jvp is not called
