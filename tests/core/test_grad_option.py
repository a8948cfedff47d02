"""``grad=`` on torch and TensorFlow is the analytic side, never silently ignored.

A hand-written gradient follows the NumPy backend's convention: a scalar ``fn`` gets ``grad(*args)``
returning one gradient per checked argument, a non-scalar ``fn`` gets ``grad(cotangent, *args)`` (a VJP,
the cotangent shaped like fn's output). ``args`` are the framework's tensors; gradients may come back as
tensors or NumPy arrays. Covered on both backends: a correct gradient passes; a sign flip on one element
and a missing factor 2 fail, and the failing row names the input (and the element); the VJP form with a
single and a structured output (a dict; a tuple with an integer part that gets a zero cotangent); ``wrt=``;
the report says the analytic side is the hand-written grad; forward mode and ``order=2`` are *unsupported*
(not autodiff in disguise); a wrong number of gradients is a clear ``grad:`` error. torch only: a module's
parameters (their gradients after the inputs') with grad seeing the check's float64 parameter values,
and plain tensors given as ``params=``.
"""

from __future__ import annotations

import numpy as np
import pytest

import gradbridge as gb

BACKENDS = [pytest.param("torch", marks=pytest.mark.torch), pytest.param("tensorflow", marks=pytest.mark.tensorflow)]


class Ops:
    """The handful of framework operations the tests' functions and gradients need."""

    def __init__(self, backend: str) -> None:
        self.name = backend
        if backend == "torch":
            self.torch = pytest.importorskip("torch")
        else:
            self.tf = pytest.importorskip("tensorflow")

    def tensor(self, values, dtype="float64"):
        if self.name == "torch":
            return self.torch.tensor(np.asarray(values), dtype=getattr(self.torch, dtype))
        return self.tf.constant(np.asarray(values), dtype=getattr(self.tf, dtype))

    def sin(self, x):
        return self.torch.sin(x) if self.name == "torch" else self.tf.sin(x)

    def cos(self, x):
        return self.torch.cos(x) if self.name == "torch" else self.tf.cos(x)

    def sum(self, x):
        return x.sum() if self.name == "torch" else self.tf.reduce_sum(x)

    def argmax(self, x):
        return self.torch.argmax(x) if self.name == "torch" else self.tf.argmax(x)


@pytest.fixture(params=BACKENDS)
def ops(request) -> Ops:
    return Ops(request.param)


X = [0.3, -1.2, 0.7, 1.1]
W = [1.5, 0.5, -2.0, 0.8]
FLIP = np.array([1.0, 1.0, -1.0, 1.0])  # a sign flip on element 2


def _energy(ops: Ops):
    def energy(x, w):
        return ops.sum(x ** 2 * w + ops.sin(w))
    return energy


def _energy_grad(ops: Ops, bug: str = ""):
    def grad(x, w):
        gx = 2 * x * w
        if bug == "sign_flip":
            gx = gx * ops.tensor(FLIP)
        elif bug == "missing_factor_2":
            gx = x * w
        return gx, x ** 2 + ops.cos(w)
    return grad


def test_correct_hand_written_gradient_passes(ops: Ops) -> None:
    report = gb.check(_energy(ops), ops.tensor(X), ops.tensor(W), grad=_energy_grad(ops))
    assert report.passed, str(report)
    assert {row.input for row in report.rows} == {"x", "w"}
    assert any("analytic side: the grad= function you passed" in note for note in report.notes), report.notes


@pytest.mark.parametrize("bug", ["sign_flip", "missing_factor_2"])
def test_wrong_hand_written_gradient_fails_and_names_the_input(ops: Ops, bug: str) -> None:
    report = gb.check(_energy(ops), ops.tensor(X), ops.tensor(W), grad=_energy_grad(ops, bug))
    assert not report.passed, str(report)
    assert [row.input for row in report.failures] == ["x"], str(report)
    assert report.row("w").status == "pass"
    if bug == "sign_flip":
        assert report.row("x").worst.input_index == (2,)
        assert report.row("x").mismatches == 1


def test_the_gradient_is_the_users_even_where_autodiff_is_right(ops: Ops) -> None:
    """The bug is only in grad (fn is plain framework code autodiff gets right): a check ignoring grad passes."""
    calls = []

    def grad(x, w):
        calls.append(type(x).__module__)
        return 3 * x * w, x ** 2 + ops.cos(w)  # 3, not 2

    report = gb.check(_energy(ops), ops.tensor(X), ops.tensor(W), grad=grad)
    assert not report.passed and report.row("x").status == "fail", str(report)
    assert calls and all(module.split(".")[0] in ("torch", "tensorflow") for module in calls), calls


@pytest.mark.parametrize("wrong", [False, True])
def test_gradients_may_come_as_a_dict_by_leaf_name(ops: Ops, wrong: bool) -> None:
    def grad(x, w):
        return {"w": x ** 2 + ops.cos(w), "x": (-2 if wrong else 2) * x * w}

    report = gb.check(_energy(ops), ops.tensor(X), ops.tensor(W), grad=grad)
    assert report.passed == (not wrong), str(report)
    assert [row.input for row in report.failures] == (["x"] if wrong else [])


def test_gradients_may_be_numpy_arrays(ops: Ops) -> None:
    def grad(x, w):
        x, w = np.asarray(x), np.asarray(w)
        return 2 * x * w, x ** 2 + np.cos(w)

    assert gb.check(_energy(ops), ops.tensor(X), ops.tensor(W), grad=grad).passed


@pytest.mark.parametrize("bug", ["", "sign_flip", "missing_factor_2"])
def test_vjp_form_for_a_non_scalar_function(ops: Ops, bug: str) -> None:
    def fn(x):
        return ops.sin(x) * 2.0

    def grad(cotangent, x):
        factor = 1.0 if bug == "missing_factor_2" else 2.0
        g = cotangent * factor * ops.cos(x)
        return g * ops.tensor(FLIP) if bug == "sign_flip" else g

    report = gb.check(fn, ops.tensor(X), grad=grad)
    assert report.passed == (bug == ""), str(report)
    if bug:
        assert [row.input for row in report.failures] == ["x"]


@pytest.mark.parametrize("wrong", [False, True])
def test_vjp_form_with_a_dict_output(ops: Ops, wrong: bool) -> None:
    def fn(x, w):
        return {"a": ops.sin(x) * w, "b": ops.sum(x * x)}

    def grad(cotangent, x, w):
        gx = cotangent["a"] * ops.cos(x) * w + cotangent["b"] * 2 * x
        gw = cotangent["a"] * ops.sin(x)
        return gx, (-gw if wrong else gw)

    report = gb.check(fn, ops.tensor(X), ops.tensor(W), grad=grad)
    assert report.passed == (not wrong), str(report)
    if wrong:
        assert {row.input for row in report.failures} == {"w"}
        assert {row.output for row in report.failures} == {"out['a']"}


def test_non_floating_outputs_get_zero_cotangents(ops: Ops) -> None:
    seen = []

    def fn(x):
        return ops.sin(x), ops.argmax(x)

    def grad(cotangent, x):
        values, index = cotangent
        seen.append(float(np.max(np.abs(np.asarray(index)))))
        return values * ops.cos(x)

    assert gb.check(fn, ops.tensor(X), grad=grad).passed
    assert seen and set(seen) == {0.0}


def test_wrt_narrows_the_checked_arguments(ops: Ops) -> None:
    """grad returns one gradient per floating argument (as with NumPy); only w is compared."""
    good = gb.check(_energy(ops), ops.tensor(X), ops.tensor(W), grad=_energy_grad(ops, "sign_flip"), wrt="w")
    assert good.passed and {row.input for row in good.rows} == {"w"}, str(good)
    bad = gb.check(_energy(ops), ops.tensor(X), ops.tensor(W), grad=_energy_grad(ops, "sign_flip"), wrt="x")
    assert not bad.passed and {row.input for row in bad.failures} == {"x"}, str(bad)


def test_forward_mode_and_second_order_are_unsupported_not_autodiff(ops: Ops) -> None:
    wrong = _energy_grad(ops, "missing_factor_2")
    forward = gb.check(_energy(ops), ops.tensor(X), ops.tensor(W), grad=wrong, analytic="fwd")
    assert {row.status for row in forward.rows} == {"unsupported"}, str(forward)
    assert "grad=" in forward.rows[0].message
    both = gb.check(_energy(ops), ops.tensor(X), ops.tensor(W), grad=wrong, analytic="both")
    assert not both.passed and both.row("x").status == "fail", str(both)
    second = gb.check(_energy(ops), ops.tensor(X), ops.tensor(W), grad=_energy_grad(ops), order=2)
    assert {row.status for row in second.rows if row.order == 2} == {"unsupported"}, str(second)


def test_wrong_number_of_gradients_is_a_clear_error(ops: Ops) -> None:
    with pytest.raises(gb.FunctionEvaluationError, match="grad: returned 1 gradient"):
        gb.check(_energy(ops), ops.tensor(X), ops.tensor(W), grad=lambda x, w: 2 * x * w)
    with pytest.raises(gb.FunctionEvaluationError, match="grad: the gradient for w has shape"):
        gb.check(_energy(ops), ops.tensor(X), ops.tensor(W), grad=lambda x, w: (2 * x * w, ops.sum(w)))


# --------------------------------------------------------------------------------------------------
# torch: modules and params=
# --------------------------------------------------------------------------------------------------


@pytest.mark.torch
@pytest.mark.parametrize("wrong", [False, True])
def test_torch_module_parameters_after_the_inputs(wrong: bool) -> None:
    torch = pytest.importorskip("torch")

    class Affine(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.inner(x)

    torch.manual_seed(0)
    model = Affine().double()
    layer = model.inner
    x = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]], dtype=torch.float64)
    seen = []

    def grad(cotangent, x):  # read the module's parameters as the check sets them
        seen.append(layer.weight.dtype)
        gw = cotangent.T @ x
        return cotangent @ layer.weight, (-gw if wrong else gw), cotangent.sum(0)  # input, then parameters

    before = layer.weight.detach().clone()
    report = gb.check(model, x, grad=grad)
    assert report.passed == (not wrong), str(report)
    if wrong:
        assert [row.input for row in report.failures] == ["inner.weight"]
    assert seen and set(seen) == {torch.float64}
    assert torch.equal(layer.weight.detach(), before)


@pytest.mark.torch
def test_torch_plain_tensor_params() -> None:
    torch = pytest.importorskip("torch")
    w = torch.tensor([1.5, 0.5, -2.0, 0.8], dtype=torch.float64)

    def fn(x):
        return (x ** 2 * w).sum()

    def grad(x):
        return 2 * x * w, x ** 2  # x, then params[0]

    def wrong(x):
        return 2 * x * w, 2 * x ** 2

    assert gb.check(fn, torch.tensor(X, dtype=torch.float64), params=[w], grad=grad).passed
    report = gb.check(fn, torch.tensor(X, dtype=torch.float64), params=[w], grad=wrong)
    assert [row.input for row in report.failures] == ["params[0]"], str(report)
    assert torch.equal(w, torch.tensor([1.5, 0.5, -2.0, 0.8], dtype=torch.float64)) and not w.requires_grad
