"""Bad input gets a gradbridge error that names the argument and says what was expected."""

from __future__ import annotations

import numpy as np
import pytest

import gradbridge as gb

X = np.linspace(0.1, 1.0, 4)


def square(x):
    return float(np.sum(x ** 2))


def square_grad(x):
    return 2 * x


@pytest.mark.parametrize("options, argument", [
    ({"mode": "slow"}, "mode"),
    ({"order": 5}, "order"),
    ({"eps": -1.0}, "eps"),
    ({"eps": "small"}, "eps"),
    ({"atol": -1}, "atol"),
    ({"rtol": float("nan")}, "rtol"),
    ({"seed": -2}, "seed"),
    ({"probes": 0}, "probes"),
    ({"analytic": "sideways"}, "analytic"),
    ({"train": "yes"}, "train"),
    ({"backend": "mxnet"}, "backend"),
    ({"kwargs": [1, 2]}, "kwargs"),
    ({"wrt": "nope"}, "wrt"),
    ({"wrt": []}, "wrt"),
    ({"grad": 3}, "grad"),
])
def test_bad_option_names_the_argument(options, argument):
    kwargs = {"grad": square_grad, **options}
    with pytest.raises(gb.InvalidArgumentError) as raised:
        gb.check(square, X, **kwargs)
    assert str(raised.value).startswith(argument + ":") or f"{argument}:" in str(raised.value)
    assert isinstance(raised.value, ValueError)


def test_fn_must_be_callable():
    with pytest.raises(gb.InvalidArgumentError, match="^fn:"):
        gb.check("square", X, grad=square_grad)


def test_no_floating_input():
    with pytest.raises(gb.InvalidArgumentError, match="no floating-point input"):
        gb.check(lambda n: float(n), np.arange(3), grad=lambda n: n)


def test_numpy_without_grad_says_what_to_pass():
    with pytest.raises(gb.InvalidArgumentError, match="^grad: .*pass grad="):
        gb.check(square, X)


def test_fn_returning_a_non_array():
    with pytest.raises(gb.FunctionEvaluationError, match="fn: expected a float .* as output, got str"):
        gb.check(lambda x: "loss", X, grad=square_grad)


def test_fn_returning_an_integer_array_names_its_dtype():
    with pytest.raises(gb.FunctionEvaluationError, match="got an array of dtype int64"):
        gb.check(lambda x: np.argsort(x), X, grad=square_grad)


def test_integer_outputs_beside_floats_are_passed_over():
    report = gb.check(lambda x: (np.sin(x), np.argsort(x)), X, grad=lambda g, x: (g[0] * np.cos(x),))
    assert report.passed, str(report)
    assert [row.output for row in report.rows] == ["out[0]"]


def test_transposed_gradient_of_the_same_size_is_a_shape_error():
    with pytest.raises(gb.FunctionEvaluationError, match=r"gradient for W has shape \(3, 2\), expected \(2, 3\)"):
        gb.check(lambda W: float(np.sum(np.sin(W))), np.ones((2, 3)), grad=lambda W: np.cos(W).T)


def test_seed_out_of_range():
    with pytest.raises(gb.InvalidArgumentError, match="^seed:"):
        gb.check(square, X, grad=square_grad, seed=2 ** 70)


def test_exception_inside_a_batch_names_the_failing_point():
    def f(x):
        if x[2] < 1.0 - 1e-7:
            raise ValueError("bad point")
        return float(np.sum(x ** 2))

    with pytest.raises(gb.FunctionEvaluationError, match=r"evaluation 8 at x\[2\] - h: bad point"):
        gb.check(f, np.array([0.2, 0.5, 1.0]), grad=lambda x: 2 * x)


def test_nan_output_names_the_evaluation():
    with pytest.raises(gb.FunctionEvaluationError, match=r"returned nan .* at the unperturbed input \(evaluation 1\)"):
        gb.check(lambda x: float(np.sum(np.log(x - 1))), X, grad=lambda x: 1 / (x - 1))


def test_inf_on_one_side_of_a_central_difference_uses_the_other_side_and_says_so():
    def f(x):
        return float(np.sum(np.where(x > 0.4 + 1e-7, np.inf, x)))

    report = gb.check(f, np.array([0.1, 0.4, 0.2]), grad=lambda x: np.ones_like(x))
    assert report.passed, str(report)
    assert report.row("x").one_sided == 1
    assert "one-sided" in str(report) and "domain edge" in str(report)
    wrong = gb.check(f, np.array([0.1, 0.4, 0.2]), grad=lambda x: np.array([1.0, 2.0, 1.0]))
    assert not wrong.passed and wrong.row("x").worst.input_index == (1,)
    assert "backward" in wrong.row("x").worst.method


def test_exception_in_fn_is_wrapped_with_the_cause():
    def broken(x):
        raise KeyError("boom")

    with pytest.raises(gb.FunctionEvaluationError, match="fn raised KeyError during evaluation 1") as raised:
        gb.check(broken, X, grad=square_grad)
    assert isinstance(raised.value.__cause__, KeyError)


def test_unavailable_backend_says_how_to_install(monkeypatch):
    from gradbridge import _registry

    monkeypatch.setattr(_registry, "framework_installed", lambda name: name == "numpy")
    monkeypatch.setattr(_registry, "_loaded", {})
    with pytest.raises(gb.BackendNotAvailableError, match=r'pip install "gradbridge\[torch\]"'):
        gb.check(square, X, backend="torch")


def test_a_full_check_too_large_to_hold_its_jacobian_says_what_to_do_instead():
    import numpy as np

    with pytest.raises(gb.InvalidArgumentError, match=r"memory: a full check compares the whole 20,000 x 20,000 "
                                                      r"Jacobian and needs about .* GiB, above memory=.*use "
                                                      r"mode='auto' or 'fast'"):
        gb.check(np.cumsum, np.ones(20000), grad=lambda g, x: (np.cumsum(g[::-1])[::-1],), mode="full")
