"""autograd backend: autograd's own derivatives, the user's ``defvjp`` rules (correct and with seeded bugs),
undefined gradients, arguments (pytrees, integers, ``wrt=``, ``promote=False``, a parameter dict), ``grad=``,
the NumPy RNG left as it was, and ``order=2``. Real autograd code throughout, never mocks.

Each seeded bug lives in the test's own rule, so its check fails by construction; the same rule written
correctly passes (``test_the_correct_rule_passes``), which is what makes each failing check meaningful.
"""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest

autograd = pytest.importorskip("autograd")

import autograd.numpy as anp  # noqa: E402
from autograd.extend import defvjp, primitive  # noqa: E402

import gradbridge as gb  # noqa: E402
from gradbridge._errors import InvalidArgumentError  # noqa: E402

pytestmark = pytest.mark.autograd
RNG = np.random.default_rng(0)


# --- autograd's own derivatives ---------------------------------------------------------------------------


def mlp_loss(W1, b1, W2, X, y):
    hidden = anp.tanh(anp.dot(X, W1) + b1)
    return anp.mean((anp.dot(hidden, W2) - y) ** 2)


def test_tanh_mlp_passes_with_every_leaf_checked():
    args = (RNG.normal(size=(3, 4)), RNG.normal(size=4), RNG.normal(size=(4, 2)), RNG.normal(size=(5, 3)),
            RNG.normal(size=(5, 2)))
    report = gb.check(mlp_loss, *args, backend="autograd")
    assert report.passed, str(report)
    assert report.backend == "autograd"
    assert [row.input for row in report.rows] == ["W1", "b1", "W2", "X", "y"]


def softmax_cross_entropy(W, X, labels):
    logits = anp.dot(X, W)
    logits = logits - anp.max(logits, axis=1, keepdims=True)
    log_probs = logits - anp.log(anp.sum(anp.exp(logits), axis=1, keepdims=True))
    return -anp.mean(log_probs[np.arange(len(labels)), labels])


def test_softmax_cross_entropy_passes_and_integer_labels_are_not_checked():
    labels = np.array([0, 2, 1, 2])
    report = gb.check(softmax_cross_entropy, RNG.normal(size=(3, 3)), RNG.normal(size=(4, 3)), labels,
                      backend="autograd")
    assert report.passed, str(report)
    assert [row.input for row in report.rows] == ["W", "X"]


def loss_with_params(params, x):
    return anp.sum(anp.sin(anp.dot(x, params["w"]) + params["b"]) ** 2)


def test_a_loss_with_a_params_dict_checks_each_parameter_by_name():
    params = {"w": RNG.normal(size=(3, 2)), "b": RNG.normal(size=2)}
    report = gb.check(loss_with_params, params, RNG.normal(size=(4, 3)), backend="autograd", wrt=["params"])
    assert report.passed, str(report)
    assert [row.input for row in report.rows] == ["params['w']", "params['b']"]


def test_pytrees_of_inputs_and_outputs():
    def f(xs):
        return {"sum": anp.sum(xs[0] * xs[1][0]), "prod": xs[1][0] * anp.exp(xs[1][1])}

    report = gb.check(f, [RNG.normal(size=3), (RNG.normal(size=3), RNG.normal(size=3))], backend="autograd")
    assert report.passed, str(report)
    assert {row.output for row in report.rows} == {"out['sum']", "out['prod']"}


def test_wrt_narrows_the_check():
    report = gb.check(mlp_loss, RNG.normal(size=(3, 4)), RNG.normal(size=4), RNG.normal(size=(4, 2)),
                      RNG.normal(size=(5, 3)), RNG.normal(size=(5, 2)), backend="autograd", wrt=["b1", 2])
    assert report.passed, str(report)
    assert [row.input for row in report.rows] == ["b1", "W2"]


def test_params_keyword_is_refused_as_on_numpy():
    with pytest.raises(InvalidArgumentError, match="the autograd backend has no modules"):
        gb.check(lambda x: anp.sum(x), np.ones(3), params={"w": np.ones(2)}, backend="autograd")


def test_promote_false_checks_float32_in_float32():
    x = RNG.normal(size=6).astype(np.float32)
    report = gb.check(lambda v: anp.tanh(v) * 2.0, x, backend="autograd", promote=False)
    assert report.passed, str(report)
    assert any(note.startswith("promote=False") and "float32" in note for note in report.notes), report.notes


# --- the user's defvjp rules: correct and with seeded bugs ------------------------------------------------

A = RNG.normal(size=(3, 4))


def make_matvec(bug: str = ""):
    """``y = M @ x`` as a primitive; its VJP for M and x is right unless ``bug`` names a seeded one."""

    @primitive
    def matvec(M, x):
        return M @ x

    def dM(ans, M, x):
        def vjp(g):
            grad = np.outer(g, x)
            if bug == "transposed":
                grad = grad.T.reshape(grad.shape)  # transposed-then-reshaped: the right numbers, wrong places
            return grad

        return vjp

    def dx(ans, M, x):
        def vjp(g):
            grad = M.T @ g
            if bug == "sign":
                grad = -grad
            elif bug == "relative":
                grad = grad * (1.0 + 1e-4)
            elif bug == "few":
                grad = grad.copy()
                grad[[1, 3]] += 0.05
            return grad

        return vjp

    defvjp(matvec, dM, dx)
    return matvec


def make_square_sum(bug: bool):
    @primitive
    def square_sum(x):
        return np.sum(x ** 2)

    defvjp(square_sum, lambda ans, x: lambda g: (1.0 if bug else 2.0) * g * x)  # bug: the factor 2 is missing
    return square_sum


def check_matvec(bug: str) -> gb.Report:
    matvec = make_matvec(bug)
    return gb.check(lambda M, x: anp.tanh(matvec(M, x)), A.copy(), RNG.normal(size=4), backend="autograd")


def test_the_correct_rule_passes():
    assert check_matvec("").passed
    square_sum = make_square_sum(bug=False)
    assert gb.check(lambda x: anp.sqrt(square_sum(x) + 1.0), RNG.normal(size=5), backend="autograd").passed


@pytest.mark.parametrize("bug, wrong", [("sign", "x"), ("relative", "x"), ("few", "x"), ("transposed", "M")])
def test_a_seeded_bug_in_a_defvjp_rule_fails_on_its_input(bug, wrong):
    report = check_matvec(bug)
    assert not report.passed, str(report)
    assert [row.input for row in report.failures] == [wrong], str(report)


def test_a_bug_on_a_few_elements_is_located():
    report = check_matvec("few")
    assert report.row("x").worst.input_index in {(1,), (3,)}, str(report)


def test_a_missing_factor_two_fails():
    square_sum = make_square_sum(bug=True)
    report = gb.check(lambda x: anp.sqrt(square_sum(x) + 1.0), RNG.normal(size=5), backend="autograd")
    assert not report.passed, str(report)


def test_autograd_detects_a_primitive_without_backend():
    matvec = make_matvec("sign")
    report = gb.check(matvec, A.copy(), RNG.normal(size=4))
    assert report.backend == "autograd" and not report.passed


# --- undefined gradients ----------------------------------------------------------------------------------


def test_an_argument_without_a_vjp_is_reported_as_no_gradient():
    @primitive
    def scaled(x, k):
        return x * k

    defvjp(scaled, lambda ans, x, k: lambda g: g * k)  # no rule for k

    report = gb.check(lambda x, k: anp.sum(scaled(x, k)), RNG.normal(size=3), RNG.normal(size=3) + 2.0,
                      backend="autograd")
    assert report.row("x").status == "pass", str(report)
    assert report.row("k").status == "no-gradient", str(report)
    assert "not defined" in report.row("k").message
    assert not report.row("k").passed  # the numeric derivative is not zero: the gradient is missing


# --- grad=, state, order=2 --------------------------------------------------------------------------------


def test_grad_option_checks_the_hand_written_gradient():
    f = lambda x: anp.sum(anp.sin(x) * x)  # noqa: E731
    x = RNG.normal(size=4)
    good = gb.check(f, x, backend="autograd", grad=lambda v: np.sin(v) + v * np.cos(v))
    bad = gb.check(f, x, backend="autograd", grad=lambda v: np.sin(v) - v * np.cos(v))
    assert good.passed and not bad.passed
    assert any("grad= function you passed" in note for note in good.notes)


def test_numpy_and_python_generators_are_restored_and_pinned_inside():
    def noisy(x):
        return anp.sum(anp.sin(x)) + 0.0 * np.random.rand() + 0.0 * random.random()

    np.random.seed(11)
    random.seed(11)
    expected = (np.random.rand(3), random.random())
    np.random.seed(11)
    random.seed(11)
    report = gb.check(noisy, RNG.normal(size=4), backend="autograd", seed=3)
    assert report.passed, str(report)
    np.testing.assert_array_equal(np.random.rand(3), expected[0])
    assert random.random() == expected[1]


def test_draws_inside_fn_are_pinned_so_dropout_style_code_is_deterministic():
    def dropout_loss(x):
        mask = np.random.rand(*x.shape) > 0.3
        return anp.sum(anp.tanh(x) * mask)

    assert gb.check(dropout_loss, RNG.normal(size=8), backend="autograd").passed


def test_order_two_differentiates_autograd_twice():
    report = gb.check(lambda x: anp.sum(anp.sin(x) * x ** 2), RNG.normal(size=4), backend="autograd", order=2)
    assert report.passed, str(report)
    assert [row.order for row in report.rows] == [1, 2]


def test_order_two_catches_a_bug_that_only_the_backward_pass_differentiated_again_runs():
    """cube_sum's rule is right (3 x^2 g) but computes x^2 with a primitive whose own rule is wrong (x instead
    of 2 x): first derivatives pass, the second derivative (autograd differentiating the rule) fails."""

    def make(square_factor: float):
        @primitive
        def square(x):
            return x ** 2

        defvjp(square, lambda ans, x: lambda g: square_factor * g * x)

        @primitive
        def cube_sum(x):
            return np.sum(x ** 3)

        defvjp(cube_sum, lambda ans, x: lambda g: 3.0 * g * square(x))
        return cube_sum

    x = np.array([0.5, -1.2, 2.0])
    assert gb.check(make(2.0), x, backend="autograd", order=2).passed
    report = gb.check(make(1.0), x, backend="autograd", order=2)
    assert not report.passed, str(report)
    assert [row.order for row in report.failures] == [2], str(report)


def test_order_two_with_a_rule_autograd_cannot_differentiate_is_unsupported_not_wrong():
    @primitive
    def square_sum(x):
        return np.sum(x ** 2)

    def vjp_maker(ans, x):
        def vjp(g):
            grad = np.array(x, dtype=np.float64)  # plain NumPy: autograd's boxes are lost here
            grad *= 2.0 * np.asarray(g, dtype=np.float64)
            return grad

        return vjp

    defvjp(square_sum, vjp_maker)
    report = gb.check(square_sum, RNG.normal(size=3), backend="autograd", order=2)
    assert report.row("x").status == "pass", str(report)  # the primitive's own argument name
    second = report.row("x", order=2)
    assert second.status in ("unsupported", "error"), str(report)
    assert "cannot differentiate" in second.message, second.message


def test_import_gradbridge_does_not_import_autograd():
    code = "import sys, gradbridge; print('autograd' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
