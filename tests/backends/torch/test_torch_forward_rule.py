"""A torch ``autograd.Function``'s own ``jvp``: found (``forward_rule``) and checked in forward mode.

Reverse mode never runs a Function's ``jvp``, so a bug only there passes ``analytic="rev"``. The prepared
function says which user-written forward-mode rules fn runs (``forward_rule``, e.g. ``"MyFunction.jvp"``;
None when there are none), so that the default check can compare forward mode too. Covered here: the
attribute for fn being ``SomeFunction.apply`` (the must-have case), for Functions used inside a plain
function, a helper it calls, a closure, a partial, a callable object and an ``nn.Module``, and None for
Functions without a ``jvp`` of their own, plain torch code and ``order=2``'s gradient function;
``analytic="fwd"`` and ``"both"`` pass a correct ``jvp`` and fail a buggy one (sign flip, 1e-4 relative);
a ``jvp`` torch cannot run in forward mode is a clean *unsupported* row naming the rule, not an exception.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gradbridge as gb  # noqa: E402
from gradbridge._adapter import CheckSpec  # noqa: E402
from gradbridge._registry import get_adapter  # noqa: E402

pytestmark = pytest.mark.torch


def _sin_function(jvp_factor=None, name: str = "SinJvp") -> type:
    """sin as a Function with a correct backward; ``jvp_factor`` None: no jvp of its own, else a jvp
    returning ``jvp_factor * cos(x) * t`` (1 is correct)."""

    class Sin(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            ctx.save_for_forward(x)
            return torch.sin(x)

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return grad * torch.cos(x)

    if jvp_factor is not None:
        def jvp(ctx, tangent):
            (x,) = ctx.saved_tensors
            return jvp_factor * tangent * torch.cos(x)

        Sin.jvp = staticmethod(jvp)
    Sin.__name__ = Sin.__qualname__ = name
    return Sin


SinJvp = _sin_function(1.0, "SinJvp")
SinNoJvp = _sin_function(None, "SinNoJvp")


class SinSubclass(SinJvp):
    """Inherits SinJvp's jvp: it runs it too."""


def _helper(x):
    return SinJvp.apply(x) * 2.0


def _calls_helper(x):
    return _helper(x).sum()


class SinLayer(torch.nn.Module):
    def __init__(self, function: type) -> None:
        super().__init__()
        self.function = function

    def forward(self, h):
        return self.function.apply(h)


class Net(torch.nn.Module):
    def __init__(self, function: type) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)
        self.act = SinLayer(function)

    def forward(self, x):
        return self.act(self.fc(x)).sum(dim=1)


def _closure():
    function = SinJvp
    return lambda x: function.apply(x) * x


class CallableLoss:
    """A callable object whose __call__ uses the Function through an attribute."""

    def __init__(self) -> None:
        self.function = SinJvp

    def __call__(self, x):
        return (self.function.apply(x) * x).sum()


def _x(n: int = 5, seed: int = 0) -> "torch.Tensor":
    generator = torch.Generator().manual_seed(seed)
    return 0.3 + torch.rand(n, generator=generator, dtype=torch.float64)


def _prepared(fn, *args, **spec):
    options = dict(kwargs={}, params=None, wrt=None, grad=None, seed=0, train=False,
                   arg_names=tuple(f"a{i}" for i in range(len(args))))
    options.update(spec)
    return get_adapter("torch").prepare(CheckSpec(fn=fn, args=tuple(args), **options))


FOUND = {
    "apply": (lambda: SinJvp.apply, "SinJvp.jvp"),
    "inherited": (lambda: SinSubclass.apply, "SinSubclass.jvp"),
    "plain_function": (lambda: (lambda x: (SinJvp.apply(x) * x).sum()), "SinJvp.jvp"),
    "helper_called_by_name": (lambda: _calls_helper, "SinJvp.jvp"),
    "closure": (_closure, "SinJvp.jvp"),
    "partial": (lambda: functools.partial(lambda x, k: SinJvp.apply(x) * k, k=2.0), "SinJvp.jvp"),
    "module": (lambda: Net(SinJvp).double(), "SinJvp.jvp"),
    "callable_object": (CallableLoss, "SinJvp.jvp"),
    "two_functions": (lambda: (lambda x: SinJvp.apply(x) + SinNoJvp.apply(x)), "SinJvp.jvp"),
    "no_jvp": (lambda: SinNoJvp.apply, None),
    "no_jvp_module": (lambda: Net(SinNoJvp).double(), None),
    "plain_torch": (lambda: (lambda x: torch.sin(x) * x), None),
    "torch_builtin": (lambda: torch.sin, None),
}


@pytest.mark.parametrize("case", list(FOUND))
def test_forward_rule_names_the_users_jvp(case: str) -> None:
    make, expected = FOUND[case]
    fn = make()
    args = (_x(6).reshape(2, 3),) if isinstance(fn, torch.nn.Module) else (_x(),)
    prepared = _prepared(fn, *args)
    assert prepared.forward_rule == expected


def test_forward_rule_is_none_for_the_gradient_function_of_order_2() -> None:
    prepared = _prepared(SinJvp.apply, _x())
    with prepared.session():
        prepared.evaluate(prepared.x0[None, :])
        second = prepared.gradient_function(np.ones(len(prepared.x0)))
    assert prepared.forward_rule == "SinJvp.jvp"
    assert second.forward_rule is None


def test_a_bug_only_in_jvp_is_flagged_by_forward_rule_and_caught_by_both() -> None:
    """Reverse mode alone cannot see this bug (its backward is right): forward_rule tells the core to look."""
    buggy = _sin_function(-1.0, "SinBuggyJvp")
    assert _prepared(buggy.apply, _x()).forward_rule == "SinBuggyJvp.jvp"
    report = gb.check(buggy.apply, _x(), analytic="both")
    assert not report.passed, str(report)


@pytest.mark.parametrize("analytic", ["fwd", "both"])
@pytest.mark.parametrize("factor", [1.0, -1.0, 1.0 + 1e-4], ids=["correct", "sign_flip", "rel_1e-4"])
def test_forward_and_both_modes_judge_the_jvp(analytic: str, factor: float) -> None:
    function = _sin_function(factor, "SinJvpUnderTest")
    report = gb.check(function.apply, _x(), analytic=analytic)
    by_mode = {row.analytic_mode: row for row in report.rows}
    assert by_mode["fwd"].status == ("pass" if factor == 1.0 else "fail"), str(report)
    assert report.passed == (factor == 1.0), str(report)
    if analytic == "both":
        assert by_mode["rev"].status == "pass", str(report)  # the backward is right


@pytest.mark.parametrize("analytic", ["fwd", "both"])
def test_jvp_inside_a_module_is_judged(analytic: str) -> None:
    torch.manual_seed(0)
    good = gb.check(Net(SinJvp).double(), _x(6).reshape(2, 3), analytic=analytic)
    assert good.passed, str(good)
    torch.manual_seed(0)
    bad = gb.check(Net(_sin_function(-1.0, "SinBad")).double(), _x(6).reshape(2, 3), analytic=analytic)
    assert not bad.passed and any(row.analytic_mode == "fwd" and row.status == "fail" for row in bad.rows), str(bad)


class SavedForBackwardOnly(torch.autograd.Function):
    """A jvp reading ctx.saved_tensors, with forward saving only for backward: empty in forward mode."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sin(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.cos(x)

    @staticmethod
    def jvp(ctx, tangent):
        (x,) = ctx.saved_tensors
        return tangent * torch.cos(x)


class JvpReturnsNone(SinJvp):
    @staticmethod
    def jvp(ctx, tangent):
        return None


class JvpWrongShape(SinJvp):
    @staticmethod
    def jvp(ctx, tangent):
        (x,) = ctx.saved_tensors
        return (tangent * torch.cos(x)).sum()


@pytest.mark.parametrize("function, words", [
    (SavedForBackwardOnly, ["SavedForBackwardOnly.jvp", "save_for_forward"]),
    (JvpReturnsNone, ["JvpReturnsNone.jvp"]),
    (JvpWrongShape, ["JvpWrongShape.jvp"]),
], ids=["saved_for_backward_only", "returns_none", "wrong_shape"])
@pytest.mark.parametrize("analytic", ["fwd", "both"])
def test_a_jvp_torch_cannot_run_is_a_clean_unsupported_row(function: type, words, analytic: str) -> None:
    report = gb.check(function.apply, _x(), analytic=analytic)
    by_mode = {row.analytic_mode: row for row in report.rows}
    assert by_mode["fwd"].status == "unsupported", str(report)
    for word in words:
        assert word in by_mode["fwd"].message, by_mode["fwd"].message
    if analytic == "both":
        assert by_mode["rev"].status == "pass", str(report)


@pytest.mark.parametrize("function, rule", [
    (SavedForBackwardOnly, "SavedForBackwardOnly.jvp"),
    (JvpReturnsNone, "JvpReturnsNone.jvp"),
    (JvpWrongShape, "JvpWrongShape.jvp"),
], ids=["saved_for_backward_only", "returns_none", "wrong_shape"])
def test_a_broken_jvp_fails_the_default_check(function: type, rule: str) -> None:
    """By default (analytic='auto') every rule fn defines is checked: a jvp that cannot run is a broken
    rule the user wrote, an ERROR row naming it, never an n/a row next to a passing check."""
    report = gb.check(function.apply, _x())
    assert not report.passed, str(report)
    by_mode = {row.analytic_mode: row for row in report.rows}
    assert by_mode["rev"].status == "pass", str(report)
    assert by_mode["fwd"].status == "error", str(report)
    assert rule in by_mode["fwd"].message and "analytic='rev'" in by_mode["fwd"].message, by_mode["fwd"].message
    assert "ERROR" in str(report) and rule in report.summary(), report.summary()
