"""Per-backend kits that turn one NumPy-defined custom op into that framework's custom-gradient mechanism.

A shared test describes an op by a NumPy forward and a NumPy VJP (``backward(cotangent, *inputs)``);
``make_op(backend, forward, backward)`` returns ``(fn, to_native)`` where ``fn`` is the op as the
framework's users would write it (NumPy ``fn`` + ``grad=``, a ``torch.autograd.Function``, ...) and
``to_native`` converts NumPy inputs to that framework's arrays. The seeded bug lives in the backward,
so the same bug is checked identically on every backend.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import numpy as np

Op = Callable[..., np.ndarray]
Backward = Callable[..., Tuple[np.ndarray, ...]]


def _numpy_kit(forward: Op, backward: Backward):
    def vjp(cotangent, *inputs):
        return backward(np.asarray(cotangent), *inputs)

    return forward, (lambda a: np.array(a, dtype=np.float64)), {"grad": vjp}


def _torch_kit(forward: Op, backward: Backward):
    import torch

    class NumpyOp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            ctx.save_for_backward(*inputs)
            arrays = [t.detach().cpu().numpy() for t in inputs]
            return torch.as_tensor(np.asarray(forward(*arrays)), dtype=inputs[0].dtype)

        @staticmethod
        def backward(ctx, cotangent):
            arrays = [t.detach().cpu().numpy() for t in ctx.saved_tensors]
            grads = backward(cotangent.detach().cpu().numpy(), *arrays)
            return tuple(torch.as_tensor(np.asarray(g), dtype=cotangent.dtype) for g in grads)

    return NumpyOp.apply, (lambda a: torch.tensor(np.asarray(a), dtype=torch.float64)), {}


KITS: Dict[str, Callable[..., Any]] = {"numpy": _numpy_kit, "torch": _torch_kit}


def make_op(backend: str, forward: Op, backward: Backward):
    """``(fn, to_native, options)`` for ``backend``; options go to ``gb.check`` (e.g. ``grad=``)."""
    return KITS[backend](forward, backward)
