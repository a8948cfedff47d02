"""Discontinuities of fn itself and functions that are smooth only down to their own resolution.

A jump at the point must never read as ok: it is named, and the analytic value is judged against the
derivative on each side, measured from points on that side only. A function with internal adaptivity
(a bisection to a tolerance: a staircase) is re-measured at larger steps, where its noise weighs less,
and the report says how finely it could be resolved. Cases that run on every backend live in the
corpus (categories ``jump`` and ``adaptive``); these pin the report's details on NumPy.
"""

from __future__ import annotations

import numpy as np
import pytest

import adaptive
import gradbridge as gb

X = np.array([0.0, 0.5, 1.0])  # x[0] sits exactly on the jump


def step_loss(x):
    """sum(x^2 + 30 [x >= 0] (x + 1)): jumps by 30 at x = 0, smooth elsewhere."""
    return np.sum(x ** 2 + 30.0 * (x >= 0.0) * (x + 1.0))


def step_grad(error=(0.0, 0.0, 0.0)):
    return lambda x: 2 * x + 30.0 * (x >= 0.0) + np.asarray(error)


def test_a_jump_is_named_and_judged_against_the_branch_taken():
    report = gb.check(step_loss, X, grad=step_grad())
    assert report.passed, str(report)
    row = report.row("x")
    assert row.jumps == 1 and row.kinks == 0, str(report)
    point = report.nondifferentiable[0]
    assert point.discontinuous and point.input_index == (0,)
    assert point.jump == pytest.approx(30.0, rel=1e-3)
    assert point.left == pytest.approx(0.0, abs=1e-4) and point.right == pytest.approx(30.0, rel=1e-6)
    text = str(report)
    assert "discontinuity x[0]" in text and "fn jumps by 30" in text
    assert " jump " in text.splitlines()[[i for i, l in enumerate(text.splitlines()) if l.strip().startswith("x ")][0]]


@pytest.mark.parametrize("wrong", [7.0, -60.0, 1e-3 * 30.0])
def test_a_wrong_derivative_at_a_jump_fails(wrong):
    """30 + 7 and 30 - 60 match neither side (0 on the left, 30 on the right); 30.03 is a 1e-3 relative error
    on the right side's derivative."""
    report = gb.check(step_loss, X, grad=step_grad((wrong, 0.0, 0.0)))
    assert not report.passed, str(report)
    row = report.row("x")
    assert row.status == "fail" and row.worst.input_index == (0,), str(report)
    assert report.nondifferentiable[0].discontinuous and not report.nondifferentiable[0].subgradient


def test_a_jump_does_not_hide_a_small_bug_elsewhere_in_the_block():
    """The jump once inflated the noise estimate (and the block's scale) of the whole output."""
    report = gb.check(step_loss, X, grad=step_grad((0.0, 1e-4, 0.0)))
    assert not report.passed, str(report)
    assert report.row("x").worst.input_index == (1,), str(report)


def test_a_kink_is_not_a_jump():
    relu_sum = lambda x: np.sum(np.maximum(x, 0.0))
    report = gb.check(relu_sum, X, grad=lambda x: (x > 0).astype(float))
    assert report.passed and report.row("x").kinks == 1 and report.row("x").jumps == 0, str(report)


KEPLER = (np.array([0.3, 1.2, 2.5, 4.0]), np.array([0.1, 0.5, 0.7, 0.3]))


@pytest.mark.parametrize("xtol", [1e-8, 1e-9, 1e-10, 1e-11, 1e-12])
def test_a_staircase_passes_when_right_and_fails_on_a_1e4_bug(xtol):
    """At xtol 1e-10 the central differences at h and h/2 are bit-identical (the bracket moves with M,
    so the output is quantised) and 1e-6 off: an estimate that only looks converged."""
    fn = lambda m, e: adaptive.kepler_bisection(m, e, xtol)
    right = gb.check(fn, *KEPLER, grad=lambda g, m, e: adaptive.kepler_vjp(g, m, e, xtol))
    assert right.passed, str(right)
    wrong = gb.check(fn, *KEPLER, grad=lambda g, m, e: adaptive.kepler_vjp(g, m, e, xtol, bug="relative"))
    assert not wrong.passed and {row.input for row in wrong.failures} == {"e"}, str(wrong)


def test_the_resolution_of_a_staircase_is_reported():
    fn = lambda m, e: adaptive.kepler_bisection(m, e, 1e-9)
    report = gb.check(fn, *KEPLER, grad=lambda g, m, e: adaptive.kepler_vjp(g, m, e, 1e-9))
    resolutions = [row.resolution for row in report.rows if row.resolution is not None]
    assert resolutions, str(report)
    # xtol 1e-9 over steps up to 256 h (about 1.6e-3): a resolution well below 1e-4, above float64's floor
    assert all(1.5e-8 < r < 1e-4 for r in resolutions), resolutions
    assert "cannot be seen in this function" in str(report)


def test_a_smooth_function_reports_no_resolution():
    report = gb.check(lambda x: np.sum(np.sin(x) * x), X, grad=lambda x: np.cos(x) * x + np.sin(x))
    assert report.passed and all(row.resolution is None for row in report.rows), str(report)


@pytest.mark.parametrize("seed", range(15))
def test_a_sign_flip_in_a_quantised_function_is_never_hidden_by_its_noise(seed):
    """(x + 1e10) - 1e10 rounds x to steps of 2e-6: at the default step the finite differences are off
    by tens of percent, and an estimate that never settles has a large error bound. A pass may not rest
    on such a bound: the element is re-measured at coarser steps, where one entry's sign flip shows."""
    rng = np.random.default_rng(seed)
    x, w = rng.normal(size=5), rng.normal(size=5)
    flipped = w.copy()
    flipped[2] = -flipped[2]
    report = gb.check(lambda x: np.sum(w * ((x + 1e10) - 1e10)), x, grad=lambda x: flipped)
    assert not report.passed, str(report)
    assert report.row("x").outside_map[2], str(report)  # the flipped entry is among those named
