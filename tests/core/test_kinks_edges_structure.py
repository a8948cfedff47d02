"""Verdicts at kinks, at domain edges, on structured inputs, and the auto/fast budget (core algorithm,
through NumPy ``grad=`` functions; the corpus runs the same situations on every backend)."""

from __future__ import annotations

import numpy as np
import pytest

import gradbridge as gb

RNG = np.random.default_rng(11)


def relu(x):
    return np.maximum(x, 0.0)


def relu_vjp(factor=1.0, at_zero=0.0):
    return lambda g, x: (g * np.where(x > 0, factor, np.where(x == 0, at_zero, 0.0)),)


# -- kinks ---------------------------------------------------------------------------------------
def test_exactly_at_a_kink_is_a_nondifferentiable_point_not_a_bug():
    x = np.array([-1.0, 0.0, 2.0])
    report = gb.check(relu, x, grad=relu_vjp())
    assert report.passed, str(report)
    [kink] = report.nondifferentiable
    assert kink.input_index == (1,) and kink.output_index == (1,)
    assert (kink.left, kink.right) == pytest.approx((0.0, 1.0), abs=1e-6)
    assert kink.subgradient
    assert "non-differentiable point x[1] -> out[1]" in str(report)


@pytest.mark.parametrize("offset", [1e-7, -1e-7, 3e-7, -5e-7])
def test_near_a_kink_is_resolved_by_smaller_steps(offset):
    x = np.array([offset, 0.5, -0.5])
    report = gb.check(relu, x, grad=relu_vjp())
    assert report.passed, str(report)
    assert report.nondifferentiable == [], str(report)  # the function is differentiable there
    bug = gb.check(relu, x, grad=relu_vjp(factor=0.5))
    assert not bug.passed, str(bug)
    if offset > 0:
        assert bug.row("x").worst.input_index in ((0,), (1,))


def test_kinks_option_decides_what_a_kink_does():
    x = np.array([0.0, 1.0])
    assert gb.check(relu, x, grad=relu_vjp(), kinks="allow").passed
    assert not gb.check(relu, x, grad=relu_vjp(), kinks="fail").passed
    assert gb.check(relu, x, grad=relu_vjp(), kinks="subgradient").passed
    outside = relu_vjp(at_zero=5.0)  # 5 is not between the one-sided slopes 0 and 1
    allowed = gb.check(relu, x, grad=outside)
    assert allowed.passed and not allowed.nondifferentiable[0].subgradient
    assert "not a subgradient" in str(allowed)
    assert not gb.check(relu, x, grad=outside, kinks="subgradient").passed
    with pytest.raises(gb.InvalidArgumentError, match="kinks"):
        gb.check(relu, x, grad=relu_vjp(), kinks="ignore")


def test_abs_and_max_at_ties():
    x = np.array([0.0, -2.0, 3.0])
    assert gb.check(np.abs, x, grad=lambda g, x: (g * np.sign(x),)).passed
    pair = np.array([1.0, 1.0])
    report = gb.check(lambda v: np.max(v), pair, grad=lambda v: np.array([1.0, 0.0]))
    assert report.passed and report.nondifferentiable, str(report)


# -- domain edges --------------------------------------------------------------------------------
@pytest.mark.parametrize("name, f, df, x", [
    ("log near 0", np.log, lambda x: 1 / x, np.array([1e-6, 3e-7, 0.5])),
    ("sqrt near 0", np.sqrt, lambda x: 0.5 / np.sqrt(x), np.array([1e-7, 2e-6, 1.0])),
])
def test_domain_edge_gives_a_verdict_not_a_nan_error(name, f, df, x):
    with np.errstate(invalid="ignore", divide="ignore"):
        report = gb.check(f, x, grad=lambda g, x: (g * df(x),))
        assert report.passed, str(report)
        bug = gb.check(f, x, grad=lambda g, x: (g * df(x) * 1.01,))
    assert not bug.passed, str(bug)


def test_at_the_domain_edge_itself_a_one_sided_difference_is_used_and_reported():
    def f(x):  # defined for x >= 0 only (like igamma(a, x) at x = 0): linear there
        with np.errstate(invalid="ignore"):
            return np.where(x >= 0, 3 * x + x ** 2, np.nan)

    x = np.array([0.0, 1.0])
    report = gb.check(f, x, grad=lambda g, x: (g * (3 + 2 * x),))
    assert report.passed, str(report)
    assert report.row("x").one_sided == 1
    assert "one-sided" in str(report)
    bug = gb.check(f, x, grad=lambda g, x: (g * (3 + 2 * x) * np.array([0.9, 1.0]),))
    assert not bug.passed and bug.row("x").worst.input_index == (0,)
    assert "forward" in bug.row("x").worst.method


# -- error-estimated rule ------------------------------------------------------------------------
def test_failure_reports_the_mismatch_in_units_of_the_estimated_numerical_error():
    x = RNG.normal(size=4)
    report = gb.check(np.sin, x, grad=lambda g, x: (g * np.cos(x) * (1 + 1e-4),))
    assert not report.passed
    worst = report.row("x").worst
    assert worst.fd_error is not None and worst.fd_error > 0
    assert worst.times_error > 10
    assert report.rule == "error-estimated"
    assert "estimated numerical error" in str(report)


def test_explicit_atol_rtol_decide_and_the_report_says_so():
    x = RNG.normal(size=4)
    grad = lambda g, x: (g * np.cos(x) * (1 + 1e-4),)
    report = gb.check(np.sin, x, grad=grad, rtol=1e-3)
    assert report.passed and report.rule == "atol/rtol" and "given by the caller" in report.tolerance
    assert not gb.check(np.sin, x, grad=grad, rtol=1e-6).passed


@pytest.mark.parametrize("scale", [1e5, -1e5])
def test_inputs_of_magnitude_1e5(scale):
    x = scale * (1 + RNG.random(5))
    cases = [(lambda x: np.log(np.abs(x)), lambda x: 1 / x), (lambda x: np.sin(x / 1e5) * x, lambda x: np.cos(x / 1e5) * x / 1e5 + np.sin(x / 1e5)),
             (lambda x: x ** 2, lambda x: 2 * x)]
    for f, df in cases:
        assert gb.check(f, x, grad=lambda g, x: (g * df(x),)).passed
        assert not gb.check(f, x, grad=lambda g, x: (g * df(x) * (1 + 1e-4),)).passed


# -- structured inputs ---------------------------------------------------------------------------
def lower_triangle_function(a):
    """A function of a symmetric matrix that reads only its lower triangle."""
    s = np.tril(a) + np.tril(a, -1).T
    return np.sum(np.sin(s) * s)


def symmetric_gradient(a):
    s = np.tril(a) + np.tril(a, -1).T
    return np.cos(s) * s + np.sin(s)


def test_symmetric_structure_removes_the_false_alarm_and_keeps_real_bugs():
    a = RNG.normal(size=(4, 4))
    a = a + a.T
    assert not gb.check(lower_triangle_function, a, grad=symmetric_gradient).passed  # entries one by one leave the set
    report = gb.check(lower_triangle_function, a, grad=symmetric_gradient, structure={"a": "symmetric"})
    assert report.passed, str(report)
    assert report.row("a").compared == 10 and "tangent direction" in report.row("a").method
    bug = gb.check(lower_triangle_function, a, grad=lambda a: symmetric_gradient(a) + 0.1 * np.eye(4),
                   structure={"a": "symmetric"})
    assert not bug.passed and bug.row("a").worst.direction.startswith("a[")


def entropy(p):
    return -np.sum(p * np.log(p))


def projected_entropy_gradient(p):
    g = -(np.log(p) + 1)
    return g - g.mean()  # the gradient along the simplex: correct only for directions summing to zero


@pytest.mark.parametrize("mode", ["full", "fast"])
def test_simplex_structure(mode):
    p = np.array([0.2, 0.3, 0.1, 0.4])
    assert not gb.check(entropy, p, grad=projected_entropy_gradient, mode=mode).passed
    assert gb.check(entropy, p, grad=projected_entropy_gradient, structure={"p": "simplex"}, mode=mode).passed
    bug = gb.check(entropy, p, grad=lambda p: projected_entropy_gradient(p) * np.array([1, 1, 1.05, 1]),
                   structure={"p": "simplex"}, mode=mode)
    assert not bug.passed


def test_structure_callable_and_errors():
    q, _ = np.linalg.qr(RNG.normal(size=(3, 3)))

    def rotations(x):  # tangent space of the orthogonal group at x: x @ (skew-symmetric)
        out = []
        for i in range(3):
            for j in range(i + 1, 3):
                k = np.zeros((3, 3))
                k[i, j], k[j, i] = 1.0, -1.0
                out.append(x @ k)
        return np.array(out)

    def f(x):  # depends on x only through x @ x.T... plus a rotation-sensitive term
        return np.sum(x[:, 0] ** 3)

    assert gb.check(f, q, grad=lambda x: np.stack([3 * x[:, 0] ** 2, 0 * x[:, 0], 0 * x[:, 0]], axis=1),
                    structure={"x": rotations}).passed
    with pytest.raises(gb.InvalidArgumentError, match="no checked input or parameter is named 'y'"):
        gb.check(f, q, grad=lambda x: x, structure={"y": "symmetric"})
    with pytest.raises(gb.InvalidArgumentError, match=r"structure\['x'\]"):
        gb.check(f, q, grad=lambda x: x, structure={"x": "orthogonal"})
    with pytest.raises(gb.InvalidArgumentError, match=r"shape \(k, 3, 3\)"):
        gb.check(f, q, grad=lambda x: x, structure={"x": lambda x: np.ones((2, 3))})


# -- auto mode and fast-mode power ---------------------------------------------------------------
def weighted_sort(x):
    return np.sort(x) * np.arange(1, len(x) + 1) / len(x)


def weighted_sort_vjp(wrong_element=None):
    def vjp(g, x):
        out = np.zeros_like(x)
        out[np.argsort(x)] = g * np.arange(1, len(x) + 1) / len(x)
        if wrong_element is not None:
            out[wrong_element] *= 1.01
        return (out,)
    return vjp


def test_auto_goes_fast_above_the_budget_and_still_finds_one_wrong_element():
    n = 20000
    x = RNG.permutation(n).astype(float) + 0.3 * RNG.random(n)  # well-separated values: no ties to kink at
    correct = gb.check(weighted_sort, x, grad=weighted_sort_vjp())
    assert correct.passed and correct.mode == "fast", str(correct)
    assert any("mode='auto' chose fast" in n for n in correct.notes)
    assert "caught with probability" in correct.row("x").message
    bug = gb.check(weighted_sort, x, grad=weighted_sort_vjp(wrong_element=1234))
    assert not bug.passed, str(bug)
    assert bug.row("x").worst.input_index == (1234,), str(bug)
    assert bug.evaluations < 200


def test_auto_is_full_within_the_budget():
    x = RNG.normal(size=50)
    report = gb.check(np.tanh, x, grad=lambda g, x: (g / np.cosh(x) ** 2,))
    assert report.mode == "full"
    assert gb.check(np.tanh, x, grad=lambda g, x: (g / np.cosh(x) ** 2,), budget=10).mode == "fast"
    with pytest.raises(gb.InvalidArgumentError, match="budget"):
        gb.check(np.tanh, x, grad=lambda g, x: (g,), budget=0)
