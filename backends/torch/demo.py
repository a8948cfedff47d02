"""PyTorch demo: a custom linear Function (correct and with a transposed weight gradient) and an MLP.

Invariant: each case states the verdict it must get (the correct cases pass, the seeded bug is caught) for
any values of its inputs and of the MLP's initial parameters, so ``gradbridge demo`` succeeds exactly when the
check gets every verdict right.
"""

from __future__ import annotations

from typing import List

import torch

from ..demos import DemoCase


class LinearFunction(torch.autograd.Function):
    """y = x @ w.T + b with a hand-written backward."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return x @ w.t() + b

    @staticmethod
    def backward(ctx, grad_out):
        x, w = ctx.saved_tensors
        return grad_out @ w, grad_out.t() @ x, grad_out.sum(0)


class LinearFunctionBuggy(LinearFunction):
    """Seeded bug: the weight gradient uses only the first sample of the batch (a dropped sum)."""

    @staticmethod
    def backward(ctx, grad_out):
        x, w = ctx.saved_tensors
        return grad_out @ w, grad_out[:1].t() @ x[:1], grad_out.sum(0)


def cases() -> List[DemoCase]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=generator)
    w = torch.randn(2, 3, generator=generator)
    b = torch.randn(2, generator=generator)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(5, 2))
    target = torch.tensor([0, 1, 1, 0])
    loss = lambda inputs: torch.nn.functional.cross_entropy(model(inputs), target)
    return [
        DemoCase("custom autograd.Function: linear layer", LinearFunction.apply, (x, w, b)),
        DemoCase("custom autograd.Function: linear layer whose weight gradient forgets the batch sum", LinearFunctionBuggy.apply,
                 (x, w, b), expect_pass=False),
        DemoCase("nn.Module MLP with dropout, parameters checked by name", loss, (x,), {"params": model}),
    ]
