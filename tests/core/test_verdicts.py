"""Verdicts that must not depend on the scale of inputs or outputs: no false alarms, no missed bugs.

Correct gradients pass at input magnitudes from 1e-4 to 2e3 and output scales from 1e-8 to 1e6, also
for functions that compute in float32 inside; the same functions with a seeded bug fail. (NumPy
``grad=`` functions, so these test the core algorithm itself.)
"""

from __future__ import annotations

import numpy as np
import pytest

import gradbridge as gb

RNG = np.random.default_rng(7)

SMOOTH = [
    ("sin at |x| in [1e3, 2e3]", np.sin, np.cos, 1000 + 1000 * RNG.random(8)),
    ("1/x at x ~ 1e-3", lambda x: 1 / x, lambda x: -1 / x ** 2, 1e-3 * (1 + RNG.random(6))),
    ("log at x ~ 1e-3", np.log, lambda x: 1 / x, 1e-3 * (1 + RNG.random(6))),
    ("sqrt at x ~ 1e-4", np.sqrt, lambda x: 0.5 / np.sqrt(x), 1e-4 * (1 + RNG.random(6))),
    ("1e-8 * sin (tiny outputs)", lambda x: 1e-8 * np.sin(x), lambda x: 1e-8 * np.cos(x), RNG.normal(size=5)),
    ("1e6 * sin (large outputs)", lambda x: 1e6 * np.sin(x), lambda x: 1e6 * np.cos(x), RNG.normal(size=5)),
    ("exp(3x)", lambda x: np.exp(3 * x), lambda x: 3 * np.exp(3 * x), RNG.normal(size=5)),
]


def _elementwise_vjp(derivative, factor=1.0):
    return lambda g, x: (g * derivative(x) * factor,)


@pytest.mark.parametrize("mode", ["full", "fast"])
@pytest.mark.parametrize("name, f, df, x", SMOOTH, ids=[c[0] for c in SMOOTH])
def test_correct_gradient_passes_at_any_scale(name, f, df, x, mode):
    report = gb.check(f, x, grad=_elementwise_vjp(df), mode=mode)
    assert report.passed, str(report)


@pytest.mark.parametrize("factor", [1.5, 1 + 1e-3])
@pytest.mark.parametrize("name, f, df, x", SMOOTH, ids=[c[0] for c in SMOOTH])
def test_relative_bug_fails_at_any_scale(name, f, df, x, factor):
    report = gb.check(f, x, grad=_elementwise_vjp(df, factor))
    assert not report.passed, str(report)
    assert report.row("x").grade in ("suspicious", "wrong", "acceptable")


def test_float32_computation_is_judged_at_float32_precision():
    def f(x):
        return np.sin(x.astype(np.float32))  # returns float32: only float32-accurate

    correct = gb.check(f, RNG.normal(size=6), grad=lambda g, x: (g * np.cos(x),))
    assert correct.passed, str(correct)
    assert "float32 eps" in correct.step
    buggy = gb.check(f, RNG.normal(size=6), grad=lambda g, x: (g * np.cos(x) * 1.01,))
    assert not buggy.passed, str(buggy)


def test_refinement_is_reported_and_costs_only_disagreeing_columns():
    x = 1000 + 1000 * RNG.random(8)
    from gradbridge._checking.ladder_codes import MAX_LEVELS, NOISE_DIRECTIONS

    report = gb.check(np.sin, x, grad=_elementwise_vjp(np.cos))
    refined = report.evaluations - (2 + 2 * 8)
    if refined:
        refined -= NOISE_DIRECTIONS * 2 * 6  # measured once, when some element needs a closer look
    assert 0 <= refined <= 2 * 8 * MAX_LEVELS and refined % 2 == 0
    assert report.row("x").refined <= 8
    if refined:
        assert "step ladder" in report.row("x").method
