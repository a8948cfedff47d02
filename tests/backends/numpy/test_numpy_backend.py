"""NumPy backend: hand-written gradients (the classic course exercise), VJPs, and grad= mistakes."""

from __future__ import annotations

import random

import numpy as np
import pytest

import gradbridge as gb
from executor_cases import mlp_grads, mlp_loss  # the MLP and its hand-written backprop

pytestmark = pytest.mark.numpy
RNG = np.random.default_rng(0)


@pytest.fixture
def mlp_args():
    return (RNG.normal(size=(6, 4)), RNG.normal(size=(4, 5)), RNG.normal(size=5), RNG.normal(size=(5, 2)),
            RNG.normal(size=(6, 2)))


def test_hand_written_backprop_passes_with_wrt(mlp_args):
    report = gb.check(mlp_loss, *mlp_args, grad=mlp_grads, wrt=["W1", "b1", "W2"])
    assert report.passed, str(report)
    assert [row.input for row in report.rows] == ["W1", "b1", "W2"]
    assert report.evaluations == 2 + 2 * (20 + 5 + 10)


def test_wrt_by_position_selects_the_same_leaves(mlp_args):
    by_name = gb.check(mlp_loss, *mlp_args, grad=mlp_grads, wrt=["W1", "b1", "W2"])
    by_position = gb.check(mlp_loss, *mlp_args, grad=mlp_grads, wrt=[1, 2, 3])
    assert [r.input for r in by_name.rows] == [r.input for r in by_position.rows]


def test_grad_returning_all_floating_gradients_is_accepted_with_wrt(mlp_args):
    def all_grads(X, W1, b1, W2, y):
        h = np.tanh(X @ W1 + b1)
        r = h @ W2 - y
        dh = (r @ W2.T) * (1 - h ** 2)
        return dh @ W1.T, X.T @ dh, dh.sum(0), h.T @ r, -r

    assert gb.check(mlp_loss, *mlp_args, grad=all_grads, wrt="W2").passed


def test_bug_in_hand_written_backprop_is_located(mlp_args):
    def buggy(X, W1, b1, W2, y):
        dW1, db1, dW2 = mlp_grads(X, W1, b1, W2, y)
        return dW1, db1, dW2.T.reshape(dW2.shape)  # a transposed-then-reshaped gradient

    report = gb.check(mlp_loss, *mlp_args, grad=buggy, wrt=["W1", "b1", "W2"])
    assert not report.passed
    assert [r.input for r in report.failures] == ["W2"]


def test_vector_output_uses_a_vjp():
    def f(x, w):
        return np.sin(x) * w

    def vjp(g, x, w):
        return g * np.cos(x) * w, g * np.sin(x)

    x, w = RNG.normal(size=(3, 2)), RNG.normal(size=(3, 2))
    report = gb.check(f, x, w, grad=vjp)
    assert report.passed, str(report)
    # one per output element and the determinism probe (two calls); the contract checks' own calls besides
    assert report.vjps - report.contract_calls() == 6 + 2


def test_several_outputs_give_one_row_per_input_and_output():
    def f(x):
        return {"a": x ** 2, "b": np.sum(x)}

    def vjp(g, x):
        return (2 * x * g["a"] + g["b"],)

    report = gb.check(f, RNG.normal(size=3), grad=vjp)
    assert report.passed, str(report)
    assert sorted(r.output for r in report.rows) == ["out['a']", "out['b']"]


def test_numpy_randomness_is_pinned_and_restored():
    np.random.seed(7)
    random.seed(7)
    before = np.random.get_state()[1].copy(), random.getstate()

    def noisy(x):  # a "dropout" that draws from the global RNG
        mask = np.random.rand(*x.shape) > 0.3
        return float(np.sum(np.sin(x) * mask)) + random.random() * 0

    def noisy_grad(x):
        mask = np.random.rand(*x.shape) > 0.3
        return np.cos(x) * mask

    report = gb.check(noisy, RNG.normal(size=8), grad=noisy_grad)
    assert report.passed, str(report)
    assert np.array_equal(np.random.get_state()[1], before[0])
    assert random.getstate() == before[1]


def test_user_arrays_are_not_modified_and_float32_is_promoted_on_copies():
    x = RNG.normal(size=5).astype(np.float32)
    copy = x.copy()

    def f(x):
        x *= 1.0  # in-place on its argument: must not reach the caller's array
        return float(np.sum(x ** 2))

    report = gb.check(f, x, grad=lambda x: 2 * x)
    assert report.passed, str(report)
    assert x.dtype == np.float32 and np.array_equal(x, copy)
    assert any("float32" in note for note in report.notes)


def test_order_2_and_forward_mode_are_reported_as_unsupported_not_failed():
    report = gb.check(lambda x: float(np.sum(x ** 3)), RNG.normal(size=3), grad=lambda x: 3 * x ** 2,
                      order=2, analytic="both")
    assert report.passed, str(report)
    statuses = {(r.order, r.analytic_mode): r.status for r in report.rows}
    assert statuses[(1, "rev")] == "pass"
    assert statuses[(1, "fwd")] == "unsupported"
    assert statuses[(2, "rev")] == "unsupported"


@pytest.mark.parametrize("result, message", [
    (lambda x, w: (x,), "returned 1 gradient(s), expected 2"),
    (lambda x, w: (x, np.zeros((4, 4))), "the gradient for w has shape (4, 4), expected (3,)"),
])
def test_wrong_gradient_count_or_shape_names_the_argument(result, message):
    with pytest.raises(gb.FunctionEvaluationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        gb.check(lambda x, w: float(np.sum(x * w)), np.ones(3), np.ones(3), grad=result)
