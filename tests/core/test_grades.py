"""Verdict and grade tell one story.

The grade names the size of the relative error where it means something: a block that is zero on both
sides up to the tolerance grades ``zero``, not ``wrong`` with relative error 1 (a bias before a
BatchNorm). A failing row is graded on its failing entries (a bug on a few elements is not diluted by
the right ones), and a row whose verdict and grade still seem to disagree (FAIL with a small error,
ok with a large one) says why in its message.
"""

from __future__ import annotations

import numpy as np
import pytest

import gradbridge as gb

X = np.array([[0.2, 1.1, -0.5], [0.9, -0.3, 0.4], [1.3, 0.6, 0.0]])


def centred(x, b):
    """A bias followed by batch centring: d/db is exactly zero, the numeric side is round-off."""
    h = x + b
    return np.sum(np.tanh(h - h.mean(axis=0)) * np.array([1.0, -2.0, 0.5]))


def centred_grad(x, b, bias_error=0.0):
    """The gradient of the scalar ``centred`` (grad(*args) convention)."""
    h = x + b
    u = h - h.mean(axis=0)
    dh = (1.0 - np.tanh(u) ** 2) * np.array([1.0, -2.0, 0.5])
    dh = dh - dh.mean(axis=0)
    return dh, dh.sum(axis=0) + bias_error


def test_a_block_zero_on_both_sides_grades_zero_not_wrong():
    report = gb.check(centred, X, np.array([0.1, -0.3, 0.7]), grad=centred_grad)
    assert report.passed, str(report)
    row = report.row("b")
    assert row.grade == "zero" and row.rel_error == 0.0, str(report)
    assert report.row("x").grade == "correct", str(report)
    assert " zero " in str(report), str(report)


def test_a_nonzero_gradient_where_both_sides_should_be_zero_is_wrong():
    report = gb.check(centred, X, np.array([0.1, -0.3, 0.7]),
                      grad=lambda x, b: centred_grad(x, b, bias_error=np.array([0.0, 1e-3, 0.0])))
    row = report.row("b")
    assert row.status == "fail" and row.grade == "wrong", str(report)


def test_batchnorm_bias_is_graded_zero():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x = torch.randn(6, 3, dtype=torch.float64)
    report = gb.check(lambda x: net(x).sum(), x, params=net, train=True)
    assert report.passed, str(report)
    assert report.row("0.bias").grade == "zero", str(report)
    assert all(row.grade in ("correct", "zero") for row in report.rows), str(report)


def test_a_bug_on_one_element_is_graded_on_that_element():
    """One entry of 400 off by 1e-2 relative: the block's relative error would be ~1e-4 ('suspicious'
    at most), the failing entry's is 5e-3."""
    x = np.linspace(0.1, 2.0, 400)
    bug = np.zeros(400)
    bug[17] = 1e-2 * np.cos(x[17])
    report = gb.check(lambda x: np.sum(np.sin(x)), x, grad=lambda x: np.cos(x) + bug, mode="full")
    row = report.row("x")
    assert row.status == "fail" and row.worst.input_index == (17,), str(report)
    assert row.rel_error == pytest.approx(1e-2 / (2 + 1e-2), rel=1e-3), str(report)
    assert row.grade == "suspicious", str(report)


def test_a_fail_with_a_small_error_says_why():
    x = np.linspace(0.2, 1.4, 6)
    report = gb.check(np.exp, x, grad=lambda g, x: g * np.exp(x) * (1 + 6e-6), mode="full")
    row = report.row("x")
    assert row.status == "fail" and row.grade == "acceptable", str(report)
    assert "FAIL with grade 'acceptable'" in row.message and "not numerical error" in row.message, row.message
    assert "FAIL with grade 'acceptable'" in str(report)


def test_a_pass_with_a_large_error_says_why():
    x = np.linspace(0.2, 1.4, 6)
    report = gb.check(np.exp, x, grad=lambda g, x: g * np.exp(x) * (1 + 3e-2), rtol=0.1, mode="full")
    row = report.row("x")
    assert row.status == "pass" and row.grade == "wrong", str(report)
    assert "ok with grade 'wrong'" in row.message and "the tolerance you gave" in row.message, row.message
    assert "ok with grade 'wrong'" in str(report)


def test_no_row_contradicts_without_a_reason_on_the_seeded_bugs(backend):
    """Over correct and buggy ops on every backend: a failing row graded correct/acceptable, or a passing
    one graded suspicious/wrong, always carries its reason."""
    from kits import make_op

    forward = lambda x: np.tanh(x) * x
    for factor in (1.0, 1 + 1e-6, 1 + 1e-3, -1.0):
        backward = lambda g, x, f=factor: (g * (np.tanh(x) + x * (1 - np.tanh(x) ** 2)) * f,)
        fn, to_native, options = make_op(backend, forward, backward)
        report = gb.check(fn, to_native(np.linspace(-1.0, 1.0, 5)), **options)
        for row in report.rows:
            if not row.passed and row.grade in ("correct", "acceptable"):
                assert "FAIL with grade" in row.message, str(report)
            if row.passed and row.grade in ("suspicious", "wrong"):
                assert "ok with grade" in row.message, str(report)
