"""NumPy demo: the classic course exercise, a hand-written softmax-regression gradient.

Invariant: the correct gradients pass and the seeded bug fails (``gradbridge demo`` exits 0 only then).
"""

from __future__ import annotations

from typing import List

import numpy as np

from ..demos import DemoCase


def softmax_loss(X: np.ndarray, W: np.ndarray, b: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy of a linear softmax classifier."""
    logits = X @ W + b
    logits = logits - logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(y)), y].mean())


def softmax_loss_grads(X, W, b, y):
    """Correct gradients with respect to X, W and b."""
    logits = X @ W + b
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    probs[np.arange(len(y)), y] -= 1.0
    probs /= len(y)
    return probs @ W.T, X.T @ probs, probs.sum(axis=0)


def softmax_loss_grads_buggy(X, W, b, y):
    """Seeded bug: forgets to divide the bias gradient by the batch size."""
    dX, dW, db = softmax_loss_grads(X, W, b, y)
    return dX, dW, db * len(y)


def cases() -> List[DemoCase]:
    rng = np.random.default_rng(0)
    X, W, b = rng.normal(size=(5, 4)), rng.normal(size=(4, 3)), rng.normal(size=3)
    y = np.array([0, 2, 1, 2, 0])
    return [
        DemoCase("softmax regression, hand-written backprop", softmax_loss, (X, W, b, y),
                 {"grad": softmax_loss_grads}),
        DemoCase("softmax regression, bias gradient not averaged", softmax_loss, (X, W, b, y),
                 {"grad": softmax_loss_grads_buggy}, expect_pass=False),
    ]
