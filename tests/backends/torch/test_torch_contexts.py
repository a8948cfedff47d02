"""A torch check gives the same verdict whatever grad mode the caller is in, and leaves that mode alone.

Covered: ``torch.inference_mode()`` (where autograd records nothing and every new tensor is an inference
tensor), ``torch.no_grad()``, ``torch.set_grad_enabled(False)`` (as a context and as a plain call), and
inference mode nested in ``no_grad``; inputs and modules created under inference mode and checked
outside it (or inside it). For a custom ``autograd.Function``, a plain function using it and an
``nn.Module`` using it: the correct code passes, a sign flip and a 1e-4 relative error in the backward
fail and name the input. ``torch.is_grad_enabled()`` and ``torch.is_inference_mode_enabled()`` are the
caller's after every check, also when fn raises mid-check or switches grad mode itself.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Callable, ContextManager, Dict

import pytest

torch = pytest.importorskip("torch")

import gradbridge as gb  # noqa: E402

pytestmark = pytest.mark.torch


@contextlib.contextmanager
def _grad_disabled_by_call():
    """``torch.set_grad_enabled(False)`` called as a function (the caller's global switch), undone after."""
    before = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try:
        yield
    finally:
        torch.set_grad_enabled(before)


@contextlib.contextmanager
def _inference_in_no_grad():
    with torch.no_grad(), torch.inference_mode():
        yield


CONTEXTS: Dict[str, Callable[[], ContextManager[Any]]] = {
    "inference_mode": torch.inference_mode,
    "no_grad": torch.no_grad,
    "set_grad_enabled_False": lambda: torch.set_grad_enabled(False),
    "set_grad_enabled_False_call": _grad_disabled_by_call,
    "inference_mode_in_no_grad": _inference_in_no_grad,
    "enable_grad_in_inference_mode": lambda: _nested(torch.inference_mode(), torch.enable_grad()),
}

# backward(x) = factor * 3 x^2: 1 is correct, -1 a sign flip, 1 + 1e-4 a small relative error
FACTORS = {"correct": 1.0, "sign_flip": -1.0, "rel_1e-4": 1.0 + 1e-4}


@contextlib.contextmanager
def _nested(*managers: ContextManager[Any]):
    with contextlib.ExitStack() as stack:
        for manager in managers:
            stack.enter_context(manager)
        yield


def _cube(factor: float) -> type:
    class Cube(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x ** 3

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return grad * factor * 3 * x ** 2

    return Cube


class CubeNet(torch.nn.Module):
    """Linear, then the (possibly buggy) cube Function, then a sum per row."""

    def __init__(self, function: type) -> None:
        super().__init__()
        self.function = function
        self.fc = torch.nn.Linear(3, 4)

    def forward(self, x):
        return self.function.apply(self.fc(x)).sum(dim=1)


def _points(n: int = 4, seed: int = 0) -> "torch.Tensor":
    generator = torch.Generator().manual_seed(seed)
    return 0.5 + torch.rand(n, generator=generator, dtype=torch.float64)  # away from 0: 3 x^2 not tiny


def _case(kind: str, factor: float):
    """``(fn, args, input named in a failing row)`` for one kind of user code."""
    function = _cube(factor)
    if kind == "function":
        return function.apply, (_points(),), "x"
    if kind == "plain":
        def energy(x, w):
            return (torch.tanh(w * function.apply(x)) + x).sum()
        return energy, (_points(), _points(seed=1)), "x"
    torch.manual_seed(0)
    net = CubeNet(function).double()
    with torch.no_grad():
        net.fc.weight.mul_(0.5)
        net.fc.bias.fill_(0.7)  # fc(x) away from 0
    return net, (_points(6).reshape(2, 3),), "fc.weight"


def _flags():
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled()


def _check_in(context: str, fn, *args, **options) -> gb.Report:
    """``gb.check`` inside ``context``; the grad/inference flags must be the caller's after it (also
    after leaving the context)."""
    outside = _flags()
    with CONTEXTS[context]():
        inside = _flags()
        report = gb.check(fn, *args, **options)
        assert _flags() == inside, f"grad/inference mode changed by the check: {_flags()} != {inside}"
    assert _flags() == outside
    return report


@pytest.mark.parametrize("bug", list(FACTORS))
@pytest.mark.parametrize("kind", ["function", "plain", "module"])
@pytest.mark.parametrize("context", list(CONTEXTS))
def test_verdict_does_not_depend_on_the_callers_grad_mode(context: str, kind: str, bug: str) -> None:
    fn, args, named = _case(kind, FACTORS[bug])
    report = _check_in(context, fn, *args)
    if bug == "correct":
        assert report.passed, str(report)
        assert all(row.status == "pass" for row in report.rows), str(report)
    else:
        assert not report.passed, str(report)
        assert named in {row.input for row in report.failures}, str(report)


@pytest.mark.parametrize("context", ["inference_mode", "no_grad"])
@pytest.mark.parametrize("analytic", ["fwd", "both"])
def test_forward_mode_and_second_order_under_the_callers_mode(context: str, analytic: str) -> None:
    report = _check_in(context, lambda x: torch.sin(x) * x, _points(), analytic=analytic)
    assert report.passed and {row.status for row in report.rows} == {"pass"}, str(report)
    report = _check_in(context, lambda x: (torch.sin(x) * x).sum(), _points(), order=2)
    assert report.passed and any(row.order == 2 and row.status == "pass" for row in report.rows), str(report)


@pytest.mark.parametrize("inside", [False, True], ids=["checked_outside", "checked_inside"])
@pytest.mark.parametrize("bug", ["correct", "sign_flip"])
def test_inference_tensors_as_inputs(inside: bool, bug: str) -> None:
    """Tensors (and a module's parameters) created under inference mode, checked outside it or in it."""
    function = _cube(FACTORS[bug])
    with torch.inference_mode():
        x = _points()
        index = torch.tensor([0, 2])
        scale = _points(seed=3)  # unchecked (wrt narrows): copied by the check
        torch.manual_seed(0)
        net = CubeNet(function).double()
        net.fc.bias.fill_(0.7)
        batch = _points(6).reshape(2, 3)
    assert x.is_inference() and net.fc.weight.is_inference()
    context = "inference_mode" if inside else "set_grad_enabled_False"
    reports = [
        _check_in(context, function.apply, x),
        _check_in(context, lambda x, i, s: (function.apply(x)[i] * s[i]).sum(), x, index, scale, wrt=[0]),
        _check_in(context, net, batch),
    ]
    for report in reports:
        assert report.passed == (bug == "correct"), str(report)
    assert x.is_inference() and net.fc.weight.is_inference() and scale.is_inference()


class UserError(RuntimeError):
    """What the user's function raises mid-check."""


@pytest.mark.parametrize("where", ["forward", "backward"])
@pytest.mark.parametrize("context", list(CONTEXTS))
def test_flags_are_restored_when_fn_raises(context: str, where: str) -> None:
    counter = itertools.count(1)

    class Fragile(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            if where == "forward" and next(counter) == 4:
                raise UserError("forward failed")
            ctx.save_for_backward(x)
            return x ** 3

        @staticmethod
        def backward(ctx, grad):
            if where == "backward":
                raise UserError("backward failed")
            (x,) = ctx.saved_tensors
            return grad * 3 * x ** 2

    outside = _flags()
    with CONTEXTS[context]():
        inside = _flags()
        with pytest.raises(gb.FunctionEvaluationError) as info:
            gb.check(Fragile.apply, _points())
        assert isinstance(info.value.__cause__, UserError)
        assert _flags() == inside
    assert _flags() == outside


@pytest.mark.parametrize("context", list(CONTEXTS))
def test_fn_switching_grad_mode_itself_is_undone(context: str) -> None:
    """fn calling ``torch.set_grad_enabled(...)`` (a global switch) does not leak out of the check."""
    def switching(x):
        torch.set_grad_enabled(True)
        return (torch.sin(x) * x).sum()

    report = _check_in(context, switching, _points())
    assert report.passed, str(report)


def test_a_closed_over_inference_tensor_is_a_clear_error() -> None:
    """autograd cannot record a computation with an inference tensor: the error says what to do."""
    with torch.inference_mode():
        w = _points(seed=5)
    with pytest.raises(gb.FunctionEvaluationError, match="inference tensor"):
        gb.check(lambda x: (x * w).sum(), _points())
    with pytest.raises(gb.InvalidArgumentError, match="params: params\\[0\\] is an inference tensor"):
        gb.check(lambda x: (x * w).sum(), _points(), params=[w])
    assert w.is_inference() and not w.requires_grad
