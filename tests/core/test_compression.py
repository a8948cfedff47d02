"""Compressed finite differences on every backend: few evaluations for sparse Jacobians, and every
wrong entry still caught and named, including a nonzero the analytic side is missing.

Each op is written once in NumPy (forward and VJP) and turned into the backend's own custom-gradient
op by ``kits.make_op``; the seeded bug lives in the backward.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np
import pytest

import gradbridge as gb
from gradbridge._checking.compress import MIN_COLUMNS, colour_columns
from kits import make_op

RNG = np.random.default_rng(99)
N = 256


def _check(backend, forward, backward, *inputs, **options):
    fn, native, kit_options = make_op(backend, forward, backward)
    return gb.check(fn, *[native(a) for a in inputs], backend=backend, **kit_options, **options)


def _tanh_vjp(bug: Optional[Callable[[np.ndarray], np.ndarray]] = None):
    def vjp(g, x):
        grad = g * (1 - np.tanh(x) ** 2)
        return (grad if bug is None else bug(grad.copy()),)
    return vjp


def _shift(x):
    """out_i = x_i * x_{i+1}: two nonzeros per output row (a bidiagonal Jacobian)."""
    return x * np.roll(x, -1)


def _shift_vjp(drop_neighbour: bool = False, spurious: bool = False):
    def vjp(g, x):
        grad = g * np.roll(x, -1)
        if not drop_neighbour:
            grad = grad + np.roll(g * x, 1)  # d out_{i-1} / d x_i = x_{i-1}
        if spurious:
            grad = grad + 1e-3 * np.roll(g, 2)  # an entry that should be zero
        return (grad,)
    return vjp


def test_an_elementwise_op_is_checked_in_one_group(backend):
    x = RNG.normal(size=N)
    report = _check(backend, np.tanh, _tanh_vjp(), x)
    assert report.passed, str(report)
    row = report.row(report.rows[0].input)
    assert row.method.startswith("full, diagonal Jacobian verified: all 256 elements perturbed at once"), str(report)
    assert row.compared == N * N  # every entry of the block, the zeros included
    assert report.evaluations <= 2 + 2 * 1 + 4 * 6, str(report)  # determinism, one group, at worst the noise check
    # the diagonal, two random verifications and the determinism probe (two calls), not one VJP per output; the
    # contract checks' own calls besides
    assert report.vjps - report.contract_calls() == 3 + 2, str(report)
    assert any("the analytic Jacobian is diagonal (verified" in note for note in report.notes)


@pytest.mark.parametrize("element", [0, 77, N - 1])
def test_one_wrong_diagonal_entry_is_caught_and_named(backend, element):
    def bug(grad):
        grad[element] *= 1 + 1e-5
        return grad

    report = _check(backend, np.tanh, _tanh_vjp(bug), RNG.normal(size=N))
    assert not report.passed, str(report)
    row = report.failures[0]
    assert row.worst.input_index == (element,), str(report)
    assert row.mismatches == 1, str(report)
    assert list(zip(*np.nonzero(row.outside_map))) == [(element,)], str(report)
    assert row.step_sweep is not None and row.step_sweep.element.startswith(f"{row.input}[{element}]")


def test_an_elementwise_op_at_65536_inputs_is_checked_element_by_element(backend):
    """Every element compared in a handful of evaluations; a 1e-6 relative bug on one element is found
    and named with the true values."""
    n = 65536
    x = RNG.normal(size=n)

    def bug(grad):
        grad[40000] *= 1 + 1e-6
        return grad

    report = _check(backend, np.tanh, _tanh_vjp(), x, mode="full")
    assert report.passed and report.evaluations <= 30 and report.vjps - report.contract_calls() == 3 + 2, str(report)
    buggy = _check(backend, np.tanh, _tanh_vjp(bug), x, mode="full")
    assert not buggy.passed, str(buggy)
    worst = buggy.failures[0].worst
    assert worst.input_index == (40000,) and buggy.failures[0].mismatches == 1, str(buggy)
    true = 1 - np.tanh(x[40000]) ** 2  # (a kit may hand the framework float32 inputs: 1e-6 slack)
    assert worst.numeric == pytest.approx(true, rel=1e-6)
    assert worst.analytic / worst.numeric == pytest.approx(1 + 1e-6, rel=1e-8)


def test_a_wrong_entry_of_a_compressed_non_diagonal_jacobian_is_named_element_by_element(backend):
    def vjp(g, x):
        grad = g * np.roll(x, -1) + np.roll(g * x, 1)
        grad[100] *= 1 + 1e-5
        return (grad,)

    report = _check(backend, _shift, vjp, RNG.normal(size=N))
    assert not report.passed, str(report)
    row = report.failures[0]
    assert row.worst.input_index == (100,), str(report)
    assert row.method.startswith("compressed, then element by element"), str(report)


def test_a_nonzero_missing_from_the_analytic_jacobian_is_caught(backend):
    """The analytic pattern says diagonal (the neighbour term is dropped), so the colouring puts every
    column in one group; the numeric side still sees the missing entries in every row."""
    report = _check(backend, _shift, _shift_vjp(drop_neighbour=True), RNG.normal(size=N))
    assert not report.passed, str(report)
    row = report.failures[0]
    assert row.mismatches == N, str(report)  # found element by element once the compressed check failed


def test_a_spurious_nonzero_is_caught(backend):
    report = _check(backend, _shift, _shift_vjp(spurious=True), RNG.normal(size=N))
    assert not report.passed, str(report)
    assert report.failures[0].mismatches == N, str(report)


def test_a_bidiagonal_jacobian_needs_two_groups_and_passes(backend):
    report = _check(backend, _shift, _shift_vjp(), RNG.normal(size=N))
    assert report.passed, str(report)
    assert "in 2 group(s)" in report.rows[0].method, str(report)


def test_batched_matmul_groups_by_feature(backend):
    """x (64, 8) @ w (8, 5): d out[i, :] / d x[i, k] touches row i only, so x needs 8 groups; w's
    columns all touch every output row of their column, so w stays element by element (too small)."""
    w = RNG.normal(size=(8, 5))
    report = _check(backend, lambda x: x @ w, lambda g, x: (g @ w.T,), RNG.normal(size=(64, 8)))
    assert report.passed, str(report)
    assert "512 columns in 8 group(s)" in report.rows[0].method, str(report)


def test_small_leaves_and_dense_jacobians_are_not_compressed():
    x = RNG.normal(size=MIN_COLUMNS - 1)
    small = gb.check(np.tanh, x, grad=_tanh_vjp())
    assert small.passed and small.rows[0].method == "full"
    y = RNG.normal(size=N)
    dense = gb.check(lambda y: float(np.sum(np.tanh(y))), y, grad=lambda y: 1 - np.tanh(y) ** 2)
    assert dense.passed and dense.rows[0].method == "full"  # one output row: every column shares it


def test_low_precision_checks_are_not_compressed():
    x = RNG.normal(size=N).astype(np.float32)
    report = gb.check(np.tanh, x, grad=_tanh_vjp(), promote=False)
    assert report.passed, str(report)
    assert not report.rows[0].method.startswith("full, compressed")


def test_colouring_puts_no_two_columns_of_a_row_together():
    pattern = RNG.random((120, 90)) < 0.03
    colours = colour_columns(pattern, limit=90)
    assert colours is not None
    for colour in range(colours.max() + 1):
        assert pattern[:, colours == colour].sum(axis=1).max() <= 1
    assert colour_columns(np.ones((1, 90), dtype=bool), limit=45) is None  # a dense row needs 90 colours
