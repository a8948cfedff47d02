"""Full checks of a custom matmul op whose analytic side comes from verified column groups.

``x (64, 16) @ w (16, 16)`` has 1024 outputs: the dense analytic Jacobian would take 1024 VJPs.
Where the adapter can transpose its VJP (torch, JAX, TensorFlow, autograd) the check groups x's columns by
feature and w's by row (16 groups each), verifies that grouping, and compares every entry with about
70 analytic calls; NumPy's hand-written ``grad=`` cannot be transposed and takes the dense path. Each
backend's op is written with its own custom-gradient mechanism and its own ops, so the backward pass
is differentiable; the seeded bugs live in that backward pass, as masks and factors applied to the
cotangent-linear gradients (so they stay linear in the cotangent, as real backward bugs do).
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import numpy as np
import pytest

import gradbridge as gb

RNG = np.random.default_rng(2024)
X = RNG.normal(size=(64, 16))
W = RNG.normal(size=(16, 16))
TRANSPOSABLE = ("torch", "jax", "tensorflow", "autograd")


def _masks(bug: str) -> Dict[str, object]:
    """Per bug: multipliers of the x and w gradients, and whether x's gradient uses w untransposed."""
    mx, mw = np.ones(X.shape), np.ones(W.shape)
    transposed = False
    if bug == "sign of one x element":
        mx[3, 5] = -1.0
    elif bug == "missing factor on w":
        mw[:] = 0.5
    elif bug == "small relative error on one w element":
        mw[2, 7] = 1 + 1e-6
    elif bug == "w transposed":
        transposed = True
    elif bug == "dropped term on a few x elements":
        mx[[0, 30, 60], [1, 2, 3]] = 0.0
    return {"mx": mx, "mw": mw, "transposed": transposed}


def _torch_op(bug: str) -> Tuple[Callable, tuple, dict]:
    torch = pytest.importorskip("torch")
    spec = _masks(bug)
    mx, mw = torch.tensor(spec["mx"]), torch.tensor(spec["mw"])

    class MatMul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return x @ w

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            gx = g @ (w if spec["transposed"] else w.t())
            return gx * mx, (x.t() @ g) * mw

    return MatMul.apply, (torch.tensor(X, requires_grad=True), torch.tensor(W, requires_grad=True)), {}


def _jax_op(bug: str) -> Tuple[Callable, tuple, dict]:
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    spec = _masks(bug)

    @jax.custom_vjp
    def matmul(x, w):
        return x @ w

    def fwd(x, w):
        return x @ w, (x, w)

    def bwd(res, g):
        x, w = res
        gx = g @ (w if spec["transposed"] else w.T)
        return gx * spec["mx"], (x.T @ g) * spec["mw"]

    matmul.defvjp(fwd, bwd)
    with jax.enable_x64(True):
        args = (jnp.asarray(X), jnp.asarray(W))
    return matmul, args, {}


def _tensorflow_op(bug: str) -> Tuple[Callable, tuple, dict]:
    tf = pytest.importorskip("tensorflow")
    spec = _masks(bug)
    mx, mw = tf.constant(spec["mx"]), tf.constant(spec["mw"])

    @tf.custom_gradient
    def matmul(x, w):
        def grad(g):
            gx = tf.matmul(g, w, transpose_b=not spec["transposed"])
            return gx * mx, tf.matmul(x, g, transpose_a=True) * mw
        return tf.matmul(x, w), grad

    return matmul, (tf.constant(X), tf.constant(W)), {}


def _numpy_op(bug: str) -> Tuple[Callable, tuple, dict]:
    spec = _masks(bug)

    def grad(g, x, w):
        gx = g @ (w if spec["transposed"] else w.T)
        return gx * spec["mx"], (x.T @ g) * spec["mw"]

    return (lambda x, w: x @ w), (X.copy(), W.copy()), {"grad": grad}


def _autograd_op(bug: str) -> Tuple[Callable, tuple, dict]:
    pytest.importorskip("autograd")
    import autograd.numpy as anp
    from autograd.extend import defvjp, primitive

    spec = _masks(bug)

    @primitive
    def matmul(x, w):
        return x @ w

    def x_vjp(ans, x, w):
        return lambda g: anp.dot(g, w if spec["transposed"] else anp.transpose(w)) * spec["mx"]

    def w_vjp(ans, x, w):
        return lambda g: anp.dot(anp.transpose(x), g) * spec["mw"]

    defvjp(matmul, x_vjp, w_vjp)
    return matmul, (X.copy(), W.copy()), {}


MAKERS = {"torch": _torch_op, "jax": _jax_op, "tensorflow": _tensorflow_op, "numpy": _numpy_op,
          "autograd": _autograd_op}


def _check(backend: str, bug: str = "", **extra) -> gb.Report:
    fn, args, options = MAKERS[backend](bug)
    return gb.check(fn, *args, mode="full", backend=backend, **options, **extra)


def test_a_correct_matmul_passes_with_verified_column_groups(backend):
    report = _check(backend)
    assert report.passed, str(report)
    if backend in TRANSPOSABLE:
        # not one VJP per output (1024); the contract checks' own calls besides
        assert report.vjps - report.contract_calls() <= 2 * (2 + 32) + 2 + 3, str(report)
        assert report.evaluations <= 2 + 2 * 32 + 24, str(report)
        strategy = " ".join(report.strategy)
        assert "x: 16 verified column groups (by index along axis 1)" in strategy, str(report)
        assert "w: 16 verified column groups (by index along axis 0)" in strategy, str(report)
        for row in report.rows:
            assert row.compared == 1024 * row_size(row), str(report)  # every entry, zeros included
    else:
        # one per output and the determinism probe; the contract checks' own calls besides
        assert report.vjps - report.contract_calls() == 1024 + 2, str(report)


def row_size(row) -> int:
    return int(np.prod(row.shape))


@pytest.mark.parametrize("bug, leaf, element", [
    ("sign of one x element", "x", (3, 5)),
    ("small relative error on one w element", "w", (2, 7)),
    ("dropped term on a few x elements", "x", None),
    ("missing factor on w", "w", None),
    ("w transposed", "x", None),
])
def test_seeded_backward_bugs_are_caught_and_named(backend, bug, leaf, element):
    report = _check(backend, bug)
    assert not report.passed, str(report)
    failed = {row.input for row in report.failures}
    assert failed == {leaf}, str(report)
    row = report.failures[0]
    assert row.worst is not None and row.worst.input_index != (), str(report)  # named element by element
    if backend in TRANSPOSABLE and bug == "dropped term on a few x elements":
        # the analytic side is zero where the truth is not: the rows that disagree belong to no element of
        # the analytic pattern, so the leaf is re-checked element by element (with the dense Jacobian)
        assert row.method.startswith("compressed, then element by element"), str(report)
    elif backend in TRANSPOSABLE:  # each output row of a group measures one known element: named at once
        assert row.method.startswith("full, 16 verified column groups"), str(report)
        assert f"{leaf}: 16 verified column groups" in " ".join(report.strategy), str(report)
        # no dense Jacobian to localise the bug; the contract checks' own calls besides
        assert report.vjps - report.contract_calls() <= 2 * (2 + 32) + 2 + 3, str(report)
        assert row.step_sweep is not None and row.step_sweep.element.startswith(f"{leaf}["), str(report)
    if element is not None:
        assert row.worst.input_index == element, str(report)
        # x[i, k] reaches the 16 outputs of row i, w[k, o] the 64 outputs of column o
        assert row.mismatches == (16 if leaf == "x" else 64), str(report)
    if bug == "dropped term on a few x elements":
        wrong = {tuple(int(i) for i in index) for index in zip(*np.nonzero(row.outside_map))}
        assert wrong == {(0, 1), (30, 2), (60, 3)}, str(report)


@pytest.mark.parametrize("bug", ["sign of one x element", "dropped term on a few x elements"])
def test_a_jacobian_too_large_to_build_is_still_checked_in_full(backend, bug):
    """With the dense comparison (~370 MB) over the memory budget (64 MiB here, standing for a 65536-input
    op on a real machine), a full check still compares every entry through the verified groups (~8 MB):
    a wrong entry is named at once; rows that no element of the analytic pattern owns (a dropped term)
    fail as a group, with a note."""
    if backend not in TRANSPOSABLE:  # NumPy's grad= cannot be transposed: a full check needs the dense Jacobian
        with pytest.raises(gb.InvalidArgumentError, match="memory: .*use mode='auto'"):
            _check(backend, bug, memory="64MiB")
        return
    assert _check(backend, memory="64MiB").passed
    report = _check(backend, bug, memory="64MiB")
    assert not report.passed and {row.input for row in report.failures} == {"x"}, str(report)
    row = report.failures[0]
    if bug == "sign of one x element":
        assert row.worst.input_index == (3, 5) and row.mismatches == 16, str(report)
    else:
        assert row.method.startswith("full, 16 verified column groups"), str(report)
        assert any("re-checking element by element would need about" in note for note in report.notes)


def test_auto_mode_runs_in_full_when_the_verified_groups_fit_the_budget(backend):
    """Dense full check: 2 * 1280 evaluations + 1024 VJPs, over budget=500; the 32 verified groups need
    64 evaluations, so auto compares every entry where the VJP transposes, and projects elsewhere."""
    fn, args, options = MAKERS[backend]("sign of one x element")
    report = gb.check(fn, *args, backend=backend, budget=500, **options)
    assert not report.passed, str(report)
    if backend in TRANSPOSABLE:
        assert report.mode == "full", str(report)
        assert any("mode='auto' chose full" in note for note in report.notes), str(report)
        assert report.failures[0].worst.input_index == (3, 5), str(report)
    else:
        assert report.mode == "fast", str(report)
