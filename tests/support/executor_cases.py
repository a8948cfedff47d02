"""Module-level functions for tests/core/test_executor.py: worker processes import them by name (pickle)."""

from __future__ import annotations

import numpy as np


def mlp_loss(X, W1, b1, W2, y):
    h = np.tanh(X @ W1 + b1)
    return float(0.5 * np.sum((h @ W2 - y) ** 2))


def mlp_grads(X, W1, b1, W2, y):
    h = np.tanh(X @ W1 + b1)
    r = h @ W2 - y
    dh = (r @ W2.T) * (1 - h ** 2)
    return X.T @ dh, dh.sum(0), h.T @ r


def mlp_grads_buggy(X, W1, b1, W2, y):
    """One wrong element: dW1[2, 3] off by 0.5."""
    dW1, db1, dW2 = mlp_grads(X, W1, b1, W2, y)
    dW1 = dW1.copy()
    dW1[2, 3] += 0.5
    return dW1, db1, dW2


def mlp_args(seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(6, 4)), rng.normal(size=(4, 5)), rng.normal(size=5), rng.normal(size=(5, 2)),
            rng.normal(size=(6, 2)))


def raises_when_large(x):
    """Fails at perturbed points only: the check must name the point, as a local check does."""
    if x[1] > 0.5 + 1e-9:
        raise ValueError(f"x[1] = {x[1]!r} is out of range")
    return float(np.sum(x ** 2))


def raises_when_large_grad(x):
    return 2 * x


_SCALE = {"value": 1.0}


def process_local(x):
    """Depends on state this process set after import (the workers keep the module's default)."""
    return float(_SCALE["value"] * np.sum(np.sin(x)))


def process_local_grad(x):
    return _SCALE["value"] * np.cos(x)


def set_local_scale(value: float) -> None:
    _SCALE["value"] = value


# --- torch (imported only by the torch tests) ---

def torch_mlp(x, w1, w2):
    import torch

    return torch.tanh(x @ w1) @ w2


def torch_buggy_square(x):
    """A custom autograd Function whose backward is wrong for element [1] only."""
    return _BuggySquare().apply(x)


def _BuggySquare():
    import torch

    global _buggy_square_class
    try:
        return _buggy_square_class
    except NameError:
        pass

    class BuggySquare(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x ** 2

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            wrong = torch.ones_like(x)
            wrong[1] = 1.5
            return g * 2 * x * wrong

    _buggy_square_class = BuggySquare
    return BuggySquare
