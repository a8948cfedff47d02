"""PyTorch kit: the op becomes a classic-style ``torch.autograd.Function`` calling NumPy."""

from __future__ import annotations

import numpy as np


def make(forward, backward):
    import torch

    class NumpyOp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            ctx.save_for_backward(*inputs)
            arrays = [t.detach().cpu().numpy() for t in inputs]
            result = np.asarray(forward(*arrays))
            dtype = inputs[0].dtype  # a real result of complex inputs (a loss) stays real
            return torch.as_tensor(result, dtype=dtype if np.iscomplexobj(result) else dtype.to_real())

        @staticmethod
        def backward(ctx, cotangent):  # PyTorch's complex convention is gradbridge's
            arrays = [t.detach().cpu().numpy() for t in ctx.saved_tensors]
            grads = backward(cotangent.detach().cpu().numpy(), *arrays)
            return tuple(torch.as_tensor(np.asarray(g), dtype=x.dtype) for g, x in zip(grads, ctx.saved_tensors))

    return NumpyOp.apply, (lambda a: torch.tensor(np.asarray(a), dtype=torch.float64)), {}


def tanh_function(wrong_backward: bool = False):
    """A custom ``torch.autograd.Function`` for tanh saving its output; ``wrong_backward``: the classic bug of a
    backward multiplying by ``1 - y`` instead of ``1 - y**2``."""
    import torch

    class Tanh(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            h = torch.tanh(a)
            ctx.save_for_backward(h)
            return h

        @staticmethod
        def backward(ctx, grad):
            (h,) = ctx.saved_tensors
            return grad * ((1 - h) if wrong_backward else (1 - h ** 2))

    return Tanh


def tanh_with_jvp(jvp, vmap=None):
    """tanh as a torch.func-style ``Function`` (``setup_context`` saving its output for both modes): backward
    ``g * (1 - y**2)``, forward-mode rule ``jvp(t, y)``, and, where given, the hand-written batching rule ``vmap``
    (torch's ``Function.vmap`` signature); returns its ``apply``."""
    import torch

    def forward(x):
        return torch.tanh(x)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y ** 2)

    def forward_rule(ctx, t):
        (y,) = ctx.saved_tensors
        return jvp(t, y)

    members = {"forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
               "backward": staticmethod(backward), "jvp": staticmethod(forward_rule)}
    if vmap is not None:
        members["vmap"] = staticmethod(vmap)
    return type("Tanh", (torch.autograd.Function,), members).apply
