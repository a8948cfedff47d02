"""The audit of the user's custom rules on torch: what a backward returns before torch's engine casts or sums it
to its input (a float32 gradient of a float64 input, an unreduced gradient of a broadcast input, both silent in
torch), and what it writes in place (its saved tensors, an input kept on ctx). Correct rules must pass with every
contract held; each seeded bug must fail on its own contract, naming the rule and the input."""

from __future__ import annotations

import numpy as np
import pytest

import gradbridge as gb
from backend_matrix import require_backend

pytestmark = pytest.mark.torch

AUDIT = ("inputs untouched", "saved tensors untouched", "gradients match their inputs")


def _tanh(bug: str):
    import torch

    class Tanh(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            y = torch.tanh(x)
            ctx.save_for_backward(y)
            ctx.x = x
            return y

        @staticmethod
        def backward(ctx, g):
            y, = ctx.saved_tensors
            if bug == "saved":
                return g * (1 - y.pow_(2))  # right values, the saved output squared in place
            if bug == "input":
                ctx.x.mul_(1.0)  # no value changes, but a write: the version moves
                ctx.x.add_(1e-3)
            if bug == "float32":
                return (g * (1 - y * y)).float()
            return g * (1 - y * y)

    return Tanh.apply


def _bias(bug: str):
    import torch

    class AddBias(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, b):
            return x + b

        @staticmethod
        def backward(ctx, g):
            # the bias is broadcast over rows: its gradient is the column sums; "unreduced" leaves that to torch
            return g, (g if bug == "unreduced" else g.sum(0))

    return AddBias.apply


def _failed(report) -> list:
    return [c.name for c in report.contracts if not c.passed]


def _point():
    import torch

    gen = np.random.default_rng(3)
    return torch.tensor(gen.normal(size=(4, 3))), torch.tensor(gen.normal(size=3))


def test_correct_rules_hold_every_audited_contract() -> None:
    require_backend("torch")
    x, b = _point()
    for report in (gb.check(_tanh(""), x), gb.check(_bias(""), x, b)):
        assert report.passed, str(report)
        held = {c.name for c in report.contracts if c.passed}
        assert set(AUDIT) <= held, str(report)


def test_a_backward_writing_its_saved_tensors_fails_with_right_rows() -> None:
    require_backend("torch")
    x, _ = _point()
    report = gb.check(_tanh("saved"), x)
    assert all(row.passed for row in report.rows), str(report)
    assert not report.passed and _failed(report) == ["saved tensors untouched"], str(report)
    violated = next(c for c in report.contracts if not c.passed)
    assert "Tanh" in violated.message and "saved tensor 0" in violated.message


def test_a_backward_writing_an_input_it_kept_fails() -> None:
    require_backend("torch")
    x, _ = _point()
    before = x.clone()
    report = gb.check(_tanh("input"), x)
    assert not report.passed and "inputs untouched" in _failed(report), str(report)
    violated = next(c for c in report.contracts if c.name == "inputs untouched")
    assert "the backward writes the input(s) x" in violated.message
    assert x.equal(before)  # the check's own copies were written, never the user's tensor


def test_a_float32_gradient_of_a_float64_input_fails_naming_rule_and_input() -> None:
    require_backend("torch")
    x, _ = _point()
    report = gb.check(_tanh("float32"), x)
    assert not report.passed and "gradients match their inputs" in _failed(report), str(report)
    violated = next(c for c in report.contracts if c.name == "gradients match their inputs")
    assert "Tanh's backward returns a float32 tensor" in violated.message and "(x)" in violated.message
    assert "dtype differs" in violated.message


def test_an_unreduced_gradient_of_a_broadcast_input_fails_though_torch_sums_it_right() -> None:
    require_backend("torch")
    import torch

    x, b = _point()
    report = gb.check(_bias("unreduced"), x, b)
    # torch sums the (4, 3) gradient down to b's (3,): the values are right, the rule is not
    assert all(row.passed for row in report.rows), str(report)
    assert _failed(report) == ["gradients match their inputs"], str(report)
    violated = next(c for c in report.contracts if not c.passed)
    assert "shape (4, 3) on cpu for its input 1 (b)" in violated.message and "shape differs" in violated.message
    leaf = b.clone().requires_grad_(True)
    assert torch.autograd.grad(_bias("unreduced")(x, leaf).sum(), leaf)[0].shape == (3,)


def test_a_library_custom_op_is_audited_under_its_qualified_name() -> None:
    require_backend("torch")
    import torch

    # the schema is given: this module's postponed annotations are strings torch cannot resolve
    @torch.library.custom_op("gradbridge_audit::scaled_sq", mutates_args=(), schema="(Tensor x) -> Tensor")
    def scaled_sq(x):
        return x * x * 0.5

    @scaled_sq.register_fake
    def _(x):
        return torch.empty_like(x)

    def setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def backward(ctx, g):
        x, = ctx.saved_tensors
        return (g * x).to(torch.float32)

    scaled_sq.register_autograd(backward, setup_context=setup)
    x, _ = _point()
    report = gb.check(scaled_sq, x)
    violated = [c for c in report.contracts if c.name == "gradients match their inputs"]
    assert violated and not violated[0].passed, str(report)
    assert "gradbridge_audit::scaled_sq's backward" in violated[0].message


def test_autodiff_through_torch_formulas_only_reports_no_rule_audit() -> None:
    require_backend("torch")
    import torch

    x, _ = _point()
    report = gb.check(lambda t: torch.tanh(t) * t, x)
    names = {c.name for c in report.contracts}
    assert report.passed and "saved tensors untouched" not in names and "gradients match their inputs" not in names
