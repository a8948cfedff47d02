"""The batched-backward contract on torch (``check_batched_grad``): the backward run under vmap (per-sample
gradients, ``jacrev``: ``torch.autograd.grad(is_grads_batched=True)``) must give what it gives one cotangent at a
time. A rule whose vmap path is wrong fails the check even though every Jacobian entry is right (the check's own
VJPs fall back to the loop); a rule that cannot run under vmap is reported, not failed."""

from __future__ import annotations

import numpy as np
import pytest

import gradbridge as gb
from backend_matrix import require_backend
from kit_torch import tanh_with_jvp

pytestmark = pytest.mark.torch


def _kernel_mul(vmap_bug: bool):
    """a * b as a custom op with a hand-written vmap rule (a kernel wrapper's); ``vmap_bug``: the rule mixes the
    samples of the batch (right for a batch of one only)."""
    import torch

    class Mul(torch.autograd.Function):
        @staticmethod
        def forward(a, b):
            return a * b

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def vmap(info, in_dims, a, b):
            a_dim, b_dim = in_dims
            a = a.movedim(a_dim, 0) if a_dim is not None else a.expand(info.batch_size, *a.shape)
            b = b.movedim(b_dim, 0) if b_dim is not None else b.expand(info.batch_size, *b.shape)
            out = a * b
            if vmap_bug:
                out = out.mean(0, keepdim=True).expand_as(out)
            return out, 0

    return Mul


def _scaled_square(vmap_bug: bool):
    """x**2 whose backward multiplies through a custom op with a hand-written vmap rule (a kernel wrapper's)."""
    import torch

    Mul = _kernel_mul(vmap_bug)

    class Square(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x * x

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return Mul.apply(g, 2 * x)

    return Square.apply


def test_a_rule_whose_vmap_path_is_wrong_fails_the_batched_contract() -> None:
    require_backend("torch")
    import torch

    x = torch.tensor(np.array([[0.3, -0.7, 1.1], [0.5, 2.0, -1.4]]))
    right = gb.check(_scaled_square(False), x)
    assert right.passed, str(right)
    assert [c for c in right.contracts if c.name == "batched (vmap)" and c.passed and c.checked], str(right)
    wrong = gb.check(_scaled_square(True), x)
    assert not wrong.passed, str(wrong)
    assert all(row.passed for row in wrong.rows), str(wrong)  # every Jacobian entry is right
    assert [c.name for c in wrong.contracts if not c.passed] == ["batched (vmap)"], str(wrong)
    assert "contract VIOLATED: batched (vmap)" in str(wrong)


def test_a_rule_that_cannot_run_under_vmap_is_reported_not_failed() -> None:
    require_backend("torch")
    import torch

    class NumpySquare(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x ** 2

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return torch.from_numpy(2 * x.numpy() * g.numpy())

    report = gb.check(NumpySquare.apply, torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64))
    assert report.passed, str(report)
    batched = [c for c in report.contracts if c.name == "batched (vmap)"]
    assert batched and not batched[0].checked and "cannot run under vmap" in batched[0].message
    assert "contract not checked: batched (vmap)" in str(report)


def _tanh_with_jvp(vmap_bug: bool):
    """tanh as a torch.func-style Function whose jvp multiplies through the kernel op above."""
    import torch

    Mul = _kernel_mul(vmap_bug)
    return tanh_with_jvp(lambda t, y: Mul.apply(t, 1 - y ** 2),
                         vmap=lambda info, in_dims, x: (torch.tanh(x), in_dims[0]))


def test_a_jvp_whose_vmap_path_is_wrong_fails_the_batched_forward_contract() -> None:
    require_backend("torch")
    import torch

    x = torch.tensor(np.array([[0.3, -0.7, 1.1], [0.5, 2.0, -1.4]]))
    right = gb.check(_tanh_with_jvp(False), x)
    assert right.passed and [c for c in right.contracts if c.name == "batched forward (vmap)" and c.checked], \
        str(right)
    wrong = gb.check(_tanh_with_jvp(True), x)
    assert not wrong.passed and all(row.passed for row in wrong.rows), str(wrong)
    assert [c.name for c in wrong.contracts if not c.passed] == ["batched forward (vmap)"], str(wrong)
