"""Tests that pin the verdict numerics: the step ladder, the tolerance rule, grades and localisation.

Each test measures a number the verdict depends on against a value derived independently: an analytic
derivative (exp, sin, polynomials, log near its domain edge), the documented tolerance formula
(``gradbridge._checking.tolerance``), the documented grade bounds, or the element a seeded bug was put in. They
are meant to fail when the numerics drift (Richardson extrapolation dropped, a floor lost or scaled
wrongly, a threshold moved, bisection off by one); ``tools/mutations.py`` applies such slips one at a
time and reports which of them these tests catch.

Most tests use NumPy functions with ``grad=`` (the core algorithm without a framework); a few drive
:class:`gradbridge._checking.numeric.StepLadder` directly on a minimal prepared function, to read the per-element
evidence (estimate, error estimate, method, levels) that a report only shows for the worst element.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import gradbridge as gb
from gradbridge._adapter import LeafSpec
from gradbridge._checking.directions import Directions
from gradbridge._checking.evaluate import Evaluator
from gradbridge._checking.finite_diff import relative_step
from gradbridge._checking.ladder_codes import BACKWARD, FAIL, FORWARD, KINK, PASS, RICHARDSON
from gradbridge._checking.numeric import StepLadder
from gradbridge._precision import PointRounder
from gradbridge._checking.tolerance import TINY, Tolerance, grade, relative_error

pytestmark = pytest.mark.numpy

EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)
SQRT_EPS = float(np.sqrt(EPS64))          # documented relative floor (float64)
ABS_FLOOR = EPS64 ** (2.0 / 3.0)          # documented absolute floor factor (float64)
H = EPS64 ** (1.0 / 3.0)                  # documented default relative step cbrt(eps)


# -- a step ladder on a plain function, without an adapter ------------------------------------------
class _Prepared:
    """The smallest prepared function the core accepts: ``fn`` maps a flat float64 vector to outputs."""

    def __init__(self, fn, x0, sizes=None):
        self.fn = fn
        self.x0 = np.asarray(x0, dtype=np.float64).ravel()
        sizes = sizes or [len(self.x0)]
        self.leaves, offset = [], 0
        for k, size in enumerate(sizes):
            self.leaves.append(LeafSpec(f"x{k}" if len(sizes) > 1 else "x", (size,), "float64", offset))
            offset += size
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f0 = np.atleast_1d(np.asarray(fn(self.x0), dtype=np.float64))
        self.output_specs = [LeafSpec("y", (len(f0),), "float64", 0, "output")]

    def evaluate(self, points):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # log of a negative number: NaN, a domain edge
            return np.stack([np.atleast_1d(np.asarray(self.fn(p), dtype=np.float64)) for p in points])


def ladder(fn, x0, jacobian, sizes=None, atol=None, rtol=None, eps=None):
    """ElementVerdicts of ``fn`` at ``x0`` for the analytic ``jacobian`` (m, n), as a full check builds them."""
    prepared = _Prepared(fn, x0, sizes)
    directions = Directions(prepared.x0, prepared.leaves, relative_step(eps))
    f0 = prepared.evaluate(prepared.x0[None, :])[0]
    blocks = [(out.slice, entry.slice) for entry in directions.per_leaf for out in prepared.output_specs]
    steps = StepLadder(Evaluator(prepared, 256), directions, f0, EPS64, PointRounder(prepared.leaves, True),
                       Tolerance(atol, rtol), blocks)
    return steps.run(np.atleast_2d(np.asarray(jacobian, dtype=np.float64)))


def elementwise(derivative, factor=1.0):
    """VJP of an elementwise function (``grad(cotangent, x)``)."""
    return lambda g, x: (g * derivative(x) * factor,)


def diagonal(values):
    return np.diag(np.asarray(values, dtype=np.float64))


# == the tolerance rule: the documented formula ======================================================
@pytest.mark.parametrize("eps", [EPS64, EPS32])
def test_element_tolerance_is_the_documented_formula(eps):
    # |a - n| <= 4 * fd_error + sqrt(eps) * |numeric| + eps^(2/3) * max|numeric of the block|
    numeric = np.array([0.0, -3.0, 2.5e-7, 1e5])
    fd_error = np.array([1e-9, 0.0, 2e-12, 3e-3])
    scale = np.array([7.0, 7.0, 0.0, 1e5])
    allowed = Tolerance(None, None, eps).allowed(numeric, fd_error, scale)
    expected = 4.0 * fd_error + np.sqrt(eps) * np.abs(numeric) + eps ** (2.0 / 3.0) * scale
    np.testing.assert_allclose(allowed - TINY, expected, rtol=1e-14, atol=0)


def test_projection_tolerance_uses_the_larger_of_numeric_and_magnitude():
    tol = Tolerance(None, None)
    # a projection that cancels to ~0 while the vectors it projects are of size 1: floors from the magnitude
    for numeric, magnitude, fd_error in ((0.0, 1.0, 0.0), (1e-9, 2.0, 1e-12), (-5.0, 2.0, 3e-10)):
        expected = 4.0 * fd_error + SQRT_EPS * max(abs(numeric), magnitude) + ABS_FLOOR * magnitude
        assert tol.scalar_bound(numeric, magnitude, fd_error) == pytest.approx(expected, rel=1e-13, abs=1e-300)


def test_user_tolerance_is_exactly_atol_plus_rtol():
    tol = Tolerance(1e-3, 1e-2)
    np.testing.assert_array_equal(tol.allowed(np.array([0.0, -2.0]), np.array([5.0, 5.0]), np.array([9.0, 9.0])),
                                  np.array([1e-3, 1e-3 + 1e-2 * 2.0]))
    assert tol.scalar_bound(-2.0, 10.0, 5.0) == pytest.approx(1e-3 + 1e-2 * 10.0, rel=1e-15)


# == grades at their bounds ==========================================================================
def test_grades_at_their_bounds():
    # the first bound above the error names the grade: correct < 1e-7 <= acceptable < 1e-4 <= suspicious < 1e-2
    below = lambda b: float(np.nextafter(b, 0.0))
    assert grade(0.0) == "correct"
    assert grade(below(1e-7)) == "correct"
    assert grade(1e-7) == "acceptable"
    assert grade(below(1e-4)) == "acceptable"
    assert grade(1e-4) == "suspicious"
    assert grade(below(1e-2)) == "suspicious"
    assert grade(1e-2) == "wrong"
    assert grade(0.5) == "wrong"


@pytest.mark.parametrize("factor", [1 + 6e-6, 1 + 6e-4, 1 + 6e-3, 1.2])
def test_grade_of_a_scaled_gradient(factor):
    x = np.linspace(0.2, 1.4, 6)
    report = gb.check(np.exp, x, grad=elementwise(np.exp, factor), mode="full")
    row = report.row("x")
    exact = np.exp(x)
    # relative error ||a - n|| / (||a|| + ||n||) with n the exact derivative (the numeric side is accurate
    # to ~1e-10 here, far below the distance of any of these errors from a grade bound)
    rel = relative_error(factor * exact, exact)
    assert row.rel_error == pytest.approx(rel, rel=1e-3)
    bounds = [(1e-7, "correct"), (1e-4, "acceptable"), (1e-2, "suspicious")]
    assert row.grade == next((name for bound, name in bounds if rel < bound), "wrong")
    assert not report.passed


# == Richardson extrapolation: accuracy of the estimate and of its error =============================
SMOOTH_CASES = [
    # name, f, f', f''' (for the central difference's leading truncation term f''' h^2 / 6), x
    ("sin at |x| ~ 1.5e3", np.sin, np.cos, lambda x: -np.cos(x), np.array([1500.0, 1000.3, 1800.7])),
    ("exp(200 x)", lambda x: np.exp(200 * x), lambda x: 200 * np.exp(200 * x),
     lambda x: 200 ** 3 * np.exp(200 * x), np.array([0.01, -0.02, 0.003])),
    ("x^100 at x ~ 1", lambda x: x ** 100, lambda x: 100 * x ** 99, lambda x: 100 * 99 * 98 * x ** 97,
     np.array([1.1, -1.1])),  # equal |f'|: the block floor is not larger than the elements' own
]


@pytest.mark.parametrize("name, f, df, d3f, x", SMOOTH_CASES, ids=[c[0] for c in SMOOTH_CASES])
def test_richardson_estimate_beats_plain_central_differences(name, f, df, d3f, x):
    exact = df(x)
    v = ladder(f, x, diagonal(exact))
    numeric, error = np.diag(v.numeric), np.diag(v.error)
    assert (np.diag(v.status) == PASS).all()
    assert (np.diag(v.method) == RICHARDSON).all(), "the first pass alone should not settle these"
    assert (v.levels >= 1).all()
    actual = np.abs(numeric - exact)
    # the error estimate bounds the true error
    assert (actual <= error).all(), (actual, error)
    # Richardson's O(h^4) estimate is far better than a plain central difference at the final step,
    # whose leading error is |f'''| h^2 / 6 (the step actually used is in ``steps``)
    plain = np.abs(d3f(x)) * v.steps ** 2 / 6.0
    assert (actual <= 1e-2 * plain).all(), (actual / plain)


@pytest.mark.parametrize("name, f, df, d3f, x", SMOOTH_CASES, ids=[c[0] for c in SMOOTH_CASES])
def test_refined_correct_gradient_passes_and_small_bug_fails(name, f, df, d3f, x):
    # a bug of 1e-6 relative is far above the float64 floor (1.5e-8) and above the truncation error
    # the ladder removes: it must fail, while the exact derivative passes
    assert gb.check(f, x, grad=elementwise(df), mode="full").passed
    report = gb.check(f, x, grad=elementwise(df, 1 + 1e-6), mode="full")
    assert not report.passed
    assert report.row("x").mismatches == len(x)


# == one-sided differences at a domain edge ===========================================================
def _exp_right_of_one(x):
    return np.where(x >= 1.0, np.exp(np.maximum(x, 1.0)), np.nan)  # defined on [1, inf)


def _exp_left_of_one(x):
    return np.where(x <= 1.0, np.exp(np.minimum(x, 1.0)), np.nan)  # defined on (-inf, 1]


@pytest.mark.parametrize("f, method", [(_exp_right_of_one, FORWARD), (_exp_left_of_one, BACKWARD)])
def test_one_sided_richardson_at_a_domain_edge(f, method):
    # at x = 1 the stencil never fits inside the domain (the distance to the edge is 0): every level is
    # one-sided. 2 p_k - p_{k-1} removes the first-order term h f''/2 of a plain one-sided difference.
    v = ladder(f, np.array([1.0]), [[np.e]])
    assert v.status[0, 0] == PASS
    assert v.method[0, 0] == method
    actual = abs(v.numeric[0, 0] - np.e)
    assert actual <= v.error[0, 0]
    plain = np.e * v.steps[0] / 2.0  # |f''| h / 2 at the final step
    assert actual <= 0.2 * plain, actual / plain


def test_one_sided_edge_is_reported_and_a_bug_there_fails():
    x = np.array([1.0, 1.5])  # element 0 at the edge, element 1 inside
    good = gb.check(_exp_right_of_one, x, grad=elementwise(np.exp), mode="full")
    assert good.passed, str(good)
    assert good.row("x").one_sided == 1
    bad = gb.check(_exp_right_of_one, x, grad=lambda g, x: (g * np.exp(x) * np.array([1.001, 1.0]),), mode="full")
    assert not bad.passed
    assert bad.row("x").worst.input_index == (0,)


def test_log_near_zero_restarts_the_ladder_at_a_step_relative_to_x():
    # x - h < 0 at the default step: the ladder restarts from a step relative to |x| and uses central
    # differences again (not one-sided ones), accurate to far better than 1e-8 relative
    x = np.array([1e-7, 3e-6, 2e-5])
    v = ladder(np.log, x, diagonal(1.0 / x))
    assert (np.diag(v.status) == PASS).all()
    assert (np.diag(v.method) == RICHARDSON).all()
    assert (v.steps < 0.1 * x).all()
    np.testing.assert_allclose(np.diag(v.numeric) * x, 1.0, rtol=1e-9)


@pytest.mark.parametrize("factor", [1.01, 1 + 1e-4])
def test_log_near_zero_catches_small_bugs(factor):
    # near the edge the ladder's steps are ~1e-12: the output's noise must be measured at that scale, not
    # at steps relative to max(1, |x|) (which straddle the edge there and would read log's own curvature
    # as noise, widening the tolerance by orders of magnitude)
    x = np.array([1e-7, 1e-7])
    report = gb.check(np.log, x, grad=elementwise(lambda x: 1.0 / x, factor), mode="full")
    assert not report.passed, str(report)
    assert report.row("x").mismatches == 2
    assert gb.check(np.log, x, grad=elementwise(lambda x: 1.0 / x), mode="full").passed


# == the tolerance's floors on near-zero entries =====================================================
def _product(x):
    return x[0] * x[1]


def test_zero_entry_tolerates_round_off_of_the_block_scale():
    # d(x0 x1)/dx0 = x1 = 0 exactly, d/dx1 = x0 = 1: the block's largest entry is 1, so an analytic
    # round-off of 1e-12 on the zero entry is within eps^(2/3) * 1 = 3.7e-11 and passes ...
    x = np.array([1.0, 0.0])
    report = gb.check(_product, x, grad=lambda x: (np.array([x[1] + 1e-12, x[0]]),), mode="full")
    assert report.passed, str(report)
    worst = report.row("x").worst
    assert worst.input_index == (0,)
    assert worst.allowed == pytest.approx(ABS_FLOOR * 1.0, rel=1e-3)
    # ... but 1e-9 (27x the floor) is a bug
    report = gb.check(_product, x, grad=lambda x: (np.array([x[1] + 1e-9, x[0]]),), mode="full")
    assert not report.passed
    assert report.row("x").worst.input_index == (0,)


def test_absolute_floor_scales_with_the_block_and_only_the_block():
    # two outputs: y0 = 1e6 * x1 (its block's largest entry is 1e6), y1 = x0 * x1 at x1 = 0 (largest
    # entry 1). A 1e-9 error on dy1/dx0 = 0 is 27x y1's floor; y0's block must not lend it its floor (3.7e-5).
    def f(x):
        return 1e6 * x[1], x[0] * x[1]

    def vjp(g, x, error):
        g0, g1 = g
        return (g0 * np.array([0.0, 1e6]) + g1 * np.array([x[1] + error, x[0]]),)

    x = np.array([1.0, 0.0])
    good = gb.check(f, x, grad=lambda g, x: vjp(g, x, 1e-12), mode="full")
    assert good.passed, str(good)
    bad = gb.check(f, x, grad=lambda g, x: vjp(g, x, 1e-9), mode="full")
    assert not bad.passed
    failing = [row for row in bad.rows if row.status == "fail"]
    assert len(failing) == 1 and failing[0].worst.input_index == (0,)
    assert failing[0].worst.allowed == pytest.approx(ABS_FLOOR * 1.0, rel=1e-3)


def test_absolute_floor_per_leaf_block():
    # one output, two leaves: a's entries are 1e6, b's are 1 and 0. The zero entry's floor is eps^(2/3)
    # times b's largest entry, not a's.
    def f(a, b):
        return 1e6 * np.sum(a) + b[0] * b[1]

    a, b = np.zeros(2), np.array([1.0, 0.0])  # f = 0 there: no round-off of a large value to hide behind
    good = gb.check(f, a, b, grad=lambda a, b: (np.full(2, 1e6), np.array([b[1] + 1e-12, b[0]])), mode="full")
    assert good.passed, str(good)
    bad = gb.check(f, a, b, grad=lambda a, b: (np.full(2, 1e6), np.array([b[1] + 1e-9, b[0]])), mode="full")
    assert not bad.passed
    assert bad.row("b").status == "fail" and bad.row("b").worst.input_index == (0,)
    assert bad.row("a").status == "pass"


@pytest.mark.parametrize("k, passes", [(0.6, True), (0.9, True), (1.4, False), (3.0, False), (67.0, False)])
def test_relative_floor_is_sqrt_eps(k, passes):
    # at x in [0.1, 0.9] exp's first pass has round-off ~1e-10 relative and negligible truncation, so the
    # tolerance is sqrt(eps) * |numeric| (1.49e-8 relative) to within a few percent: k * sqrt(eps) passes iff k < 1
    x = np.array([0.1, 0.5, 0.9])
    report = gb.check(np.exp, x, grad=elementwise(np.exp, 1 + k * SQRT_EPS), mode="full")
    assert report.passed == passes, str(report)
    worst = report.row("x").worst
    assert worst.abs_error / abs(worst.numeric) == pytest.approx(k * SQRT_EPS, rel=1e-3)
    assert worst.allowed / abs(worst.numeric) == pytest.approx(SQRT_EPS, rel=0.1)


# == the pass test at equality ========================================================================
def test_first_pass_accepts_a_difference_equal_to_the_tolerance():
    # f = 2x at x = 1: x +- h are exact and so is 2(x+h) - 2(x-h) = 2 * span: the central difference is 2
    # exactly. analytic = 2 + 2^-20 with atol = 2^-20: |a - n| equals the tolerance, which passes at once.
    x = np.array([1.0, 1.0])
    report = gb.check(lambda x: 2.0 * x, x, grad=lambda g, x: (g * (2.0 + 2.0 ** -20),), atol=2.0 ** -20, rtol=0.0,
                      mode="full")
    assert report.passed, str(report)
    row = report.row("x")
    assert row.worst.numeric == 2.0 and row.worst.abs_error == row.worst.allowed == 2.0 ** -20
    assert row.refined == 0, "an element within its tolerance at the first pass needs no refinement"


def test_ladder_accepts_a_difference_equal_to_the_tolerance():
    # f = x^3 at x = 1 with steps that are powers of two (eps = 2^-10): the central differences are
    # 3 + h^2 exactly, Richardson's (4 c_k - c_{k-1}) / 3 is 3 exactly from level 1 on, and at level 2
    # it has stopped changing (converged). analytic = 3 + 2^-24 with atol = 2^-24 fails the first pass
    # (3 + 2^-20 is 2^-20 - 2^-24 away) and is exactly at the tolerance from level 1 on: it passes at level 2.
    v = ladder(lambda x: x ** 3, np.array([1.0]), [[3.0 + 2.0 ** -24]], atol=2.0 ** -24, rtol=0.0, eps=2.0 ** -10)
    assert v.status[0, 0] == PASS
    assert v.numeric[0, 0] == 3.0
    assert v.levels[0] == 2


# == failing at once, or after refinement ============================================================
def test_gross_error_fails_at_once_small_error_after_refinement():
    # sin at x = 1500: h = 9e-3, the first central difference is off by ~h^2/6 = 1.4e-5 relative, so level 1's
    # error estimate is ~1e-5 and its tolerance ~4e-5 relative. A 1e-2 error is far beyond 16 tolerances and
    # fails at level 1; a 2e-4 error is within 16 tolerances there and fails only at level 2, where the
    # estimate is accurate to ~1e-10.
    x = np.array([1500.0])
    exact = np.cos(x)
    gross = ladder(np.sin, x, [exact * (1 + 1e-2)])
    assert gross.status[0, 0] == FAIL and gross.levels[0] == 1
    small = ladder(np.sin, x, [exact * (1 + 2e-4)])
    assert small.status[0, 0] == FAIL and small.levels[0] >= 2
    assert abs(small.numeric[0, 0] - exact[0]) <= 1e-9 * abs(exact[0])
    assert small.allowed[0, 0] < 1e-7 * abs(exact[0])


# == round-off of the first pass =======================================================================
def test_round_off_of_a_large_output_is_estimated_at_the_first_pass():
    # 1e6 + sin(x): the central difference carries round-off eps * 1e6 / h ~ 4e-5, far above the relative
    # floor. Its documented estimate eps * (|f(x+h)| + |f(x-h)|) / span covers it at the first pass: the
    # exact derivative passes there, at 2 evaluations per direction, without refinement or noise estimate.
    x = np.array([0.3, -1.2, 2.0])

    def f(x):
        return 1e6 + np.sin(x)

    v = ladder(f, x, diagonal(np.cos(x)))
    assert (np.diag(v.status) == PASS).all() and (v.levels == 0).all()
    h = H * np.maximum(1.0, np.abs(x))
    plus, minus = x + h, x - h
    expected = EPS64 * (np.abs(f(plus)) + np.abs(f(minus))) / ((plus - x) + (x - minus))
    np.testing.assert_allclose(np.diag(v.error), expected, rtol=1e-12)
    assert (np.abs(np.diag(v.numeric) - np.cos(x)) <= np.diag(v.error)).all()
    report = gb.check(f, x, grad=elementwise(np.cos), mode="full")
    assert report.passed and report.row("x").refined == 0
    assert report.evaluations == 2 + 2 * len(x)  # the determinism check at x0, then x +- h per element


# == noise of the function ============================================================================
def test_cancellation_noise_is_not_a_gradient_bug():
    # the variance as mean(x^2) - mean(x)^2 at x ~ 1e4 cancels terms of 1e8: its output carries round-off
    # ~eps * 1e8, far above eps * |f|. Measured, that noise widens the tolerance; a 1% bug still fails.
    x = 1e4 + np.random.default_rng(3).normal(size=8)

    def variance(x):
        return np.mean(x ** 2) - np.mean(x) ** 2

    good = gb.check(variance, x, grad=lambda x: (2.0 * (x - x.mean()) / len(x),), mode="full")
    assert good.passed, str(good)
    bad = gb.check(variance, x, grad=lambda x: (1.01 * 2.0 * (x - x.mean()) / len(x),), mode="full")
    assert not bad.passed


# == kinks ============================================================================================
def test_relu_at_zero_is_a_kink_with_its_one_sided_derivatives():
    x = np.array([0.0, 0.5, -0.5])
    v = ladder(lambda x: np.maximum(x, 0.0), x, diagonal([0.0, 1.0, 0.0]))
    assert v.status[0, 0] == KINK
    assert v.left[0, 0] == pytest.approx(0.0, abs=1e-9) and v.right[0, 0] == pytest.approx(1.0, rel=1e-9)
    assert v.status[1, 1] == PASS and v.status[2, 2] == PASS
    report = gb.check(lambda x: np.maximum(x, 0.0), x, grad=elementwise(lambda x: (x > 0).astype(float)),
                      kinks="subgradient", mode="full")
    assert report.passed and report.row("x").kinks == 1
    point = report.row("x").nondifferentiable[0]
    assert point.input_index == (0,) and point.subgradient


def test_smooth_function_with_a_large_one_sided_gap_is_not_a_kink():
    # sin at x ~ 1e5: h = 0.6, the one-sided differences differ by ~h |sin x| (up to 60% of the derivative)
    # but the gap halves with the step (slightly slower than half at these steps): smooth, no kink
    x = 1e5 + np.array([0.3, 1.1, 2.9])
    v = ladder(np.sin, x, diagonal(np.cos(x)))
    assert (np.diag(v.status) == PASS).all()
    assert not (v.status == KINK).any()
    np.testing.assert_allclose(np.diag(v.numeric), np.cos(x), rtol=1e-8)
    assert gb.check(np.sin, x, grad=elementwise(np.cos), mode="full").row("x").kinks == 0


# == compressed rows with kinks are re-checked element by element ====================================
KINK_AT = [3, 17, 40, 77]


def _relu_input(n=96):
    x = np.random.default_rng(11).uniform(0.2, 1.0, size=n) * np.where(np.arange(n) % 2, 1.0, -1.0)
    x[KINK_AT] = 0.0
    return x


def _check_kinks_named(report, n):
    row = report.row("x")
    assert report.passed, str(report)
    assert row.kinks == len(KINK_AT)
    named = sorted(point.input_index for point in row.nondifferentiable)
    assert named == [(j,) for j in KINK_AT]
    for point in row.nondifferentiable:  # relu: left derivative 0, right 1, in the element's own units
        assert point.left == pytest.approx(0.0, abs=1e-9) and point.right == pytest.approx(1.0, rel=1e-9)
        assert point.output_index == point.input_index


def test_elementwise_kinks_are_named_after_the_all_at_once_check():
    x = _relu_input()
    report = gb.check(lambda x: np.maximum(x, 0.0), x, grad=elementwise(lambda x: (x > 0).astype(float)),
                      mode="full")
    _check_kinks_named(report, len(x))


def test_compressed_kinks_are_named_element_by_element():
    # a banded (non-diagonal) Jacobian: y_i = relu(x_i) + 0.5 x_{i+1}, compressed into a few groups
    x = _relu_input()

    def f(x):
        return np.maximum(x, 0.0) + 0.5 * np.append(x[1:], 0.0)

    def vjp(g, x):
        return (g * (x > 0) + 0.5 * np.insert(g[:-1], 0, 0.0),)

    report = gb.check(f, x, grad=vjp, mode="full")
    _check_kinks_named(report, len(x))


# == localisation by bisection in fast mode ==========================================================
@pytest.mark.parametrize("wrong_output, wrong_input", [(2, 700), (0, 0), (3, 1023), (1, 511), (2, 512)])
def test_bisection_names_the_wrong_element_and_output(wrong_output, wrong_input):
    n, m = 1024, 4
    rng = np.random.default_rng(5)
    A, x = rng.normal(size=(m, n)), rng.normal(size=n)

    def f(x):
        return A @ np.sin(x)

    def vjp(g, x):
        gradient = (A.T @ g) * np.cos(x)
        gradient[wrong_input] += 0.5 * g[wrong_output]  # J[wrong_output, wrong_input] off by 0.5
        return (gradient,)

    report = gb.check(f, x, grad=vjp, mode="fast", budget=100)  # a full check of x would cost 2052
    row = report.row("x")
    assert not report.passed and "bisection" in row.method
    worst = row.worst
    assert worst.input_index == (wrong_input,)
    assert worst.output_index == (wrong_output,)
    exact = A[wrong_output, wrong_input] * np.cos(x[wrong_input])
    assert worst.analytic == pytest.approx(exact + 0.5, rel=1e-12, abs=1e-12)
    assert worst.numeric == pytest.approx(exact, rel=1e-7, abs=1e-9)
    assert worst.allowed < 1e-6


def test_fast_mode_tolerates_errors_below_the_floor_of_the_projected_magnitude():
    # a linear loss g.x with an analytic error orthogonal to g of relative size sqrt(eps)/8: each
    # projection's error is below sqrt(eps) * ||J^T v|| (8 standard deviations below it), so no probe may
    # fail, even one whose projection v.(J u) happens to be nearly zero. (budget=1: a failing probe would
    # go to bisection and fail the row.)
    n = 16
    g = np.ones(n)
    delta = np.tile([1.0, -1.0], n // 2)
    error = SQRT_EPS / 8.0 * np.linalg.norm(g) / np.linalg.norm(delta)
    for seed in range(12):
        report = gb.check(lambda x: g @ x, np.zeros(n), grad=lambda x: (g + error * delta,), mode="fast", budget=1,
                          seed=seed)
        assert report.passed, (seed, str(report))
    bad = gb.check(lambda x: g @ x, np.zeros(n), grad=lambda x: (g + 1e-4 * delta,), mode="fast", budget=1)
    assert not bad.passed


# == the same numerics through torch ==================================================================
@pytest.mark.torch
def test_torch_refined_estimate_and_bisection():
    from backend_matrix import require_backend

    require_backend("torch")
    import torch

    # Richardson through the torch adapter: sin at |x| ~ 1.5e3 needs the ladder; the worst element's
    # estimate is accurate far below plain central differences at its step (|f'''| h^2 / 6)
    x = torch.tensor([1500.0, 1000.3, 1800.7], dtype=torch.float64)
    report = gb.check(lambda x: torch.sin(x), x, mode="full")
    assert report.passed, str(report)
    worst = report.row("x").worst
    exact = float(np.cos(x.numpy()[worst.input_index[0]]))
    assert abs(worst.numeric - exact) <= min(worst.fd_error, 1e-2 * abs(exact) * worst.step ** 2 / 6.0)

    # a backward wrong in one entry of a large leaf: fast mode, bisection names element and output
    n, wrong_input, wrong_output = 2048, 1337, 1
    A = torch.tensor(np.random.default_rng(9).normal(size=(3, n)))

    class Mix(torch.autograd.Function):
        @staticmethod
        def forward(ctx, v):
            ctx.save_for_backward(v)
            return A @ torch.tanh(v)

        @staticmethod
        def backward(ctx, g):
            (v,) = ctx.saved_tensors
            gradient = (A.T @ g) * (1 - torch.tanh(v) ** 2)
            gradient[wrong_input] = gradient[wrong_input] + 0.25 * g[wrong_output]
            return gradient

    v = torch.tensor(np.random.default_rng(10).normal(size=n))
    report = gb.check(Mix.apply, v, mode="fast", budget=100)
    row = report.rows[0]
    assert not report.passed and "bisection" in row.method
    assert row.worst.input_index == (wrong_input,) and row.worst.output_index == (wrong_output,)
    exact = float(A[wrong_output, wrong_input]) * (1 - np.tanh(float(v[wrong_input])) ** 2)
    assert row.worst.numeric == pytest.approx(exact, rel=1e-7, abs=1e-9)
    assert row.worst.analytic == pytest.approx(exact + 0.25, rel=1e-12)
