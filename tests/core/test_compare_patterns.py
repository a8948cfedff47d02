"""``Comparison.patterns``: the shape of a porting bug, named from the numbers (real torch and JAX ports)."""

from __future__ import annotations

import numpy as np
import pytest

import gradbridge as gb
from backend_matrix import require_backend
from gradbridge._comparing.patterns import describe

RNG = np.random.default_rng(4)
X = RNG.normal(size=(5, 4))
W = RNG.normal(size=(4, 4))


def _torch_matmul(backward_bug: str = ""):
    require_backend("torch")
    import torch

    class MatMul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return x @ w

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            gw = x.T @ g
            if backward_bug == "transposed":
                gw = gw.T
            if backward_bug == "half":
                gw = 0.5 * gw
            if backward_bug == "column":
                gw = gw.clone()
                gw[:, 2] *= 1.5
            return g @ w.T, gw

    return lambda x, w: MatMul.apply(x, w).sum()


def _jax_matmul(offset: float = 0.0):
    require_backend("jax")
    import jax.numpy as jnp

    return lambda x, w: jnp.sum(x @ w + offset)


@pytest.mark.parametrize("bug, words", [("transposed", "transposed"), ("half", "0.5 x"), ("column", "column")])
def test_a_backward_bug_is_named_by_its_shape(bug: str, words: str) -> None:
    comparison = gb.compare({"torch": _torch_matmul(bug), "jax": _jax_matmul()}, X, W)
    assert not comparison.passed
    about_w = [s for s in comparison.patterns if "'arg1'" in s or "'w'" in s]
    assert about_w and words in about_w[0], comparison.patterns
    assert "Patterns of the differences" in str(comparison)


def test_a_missing_constant_term_is_named_as_an_offset() -> None:
    require_backend("jax")
    import jax.numpy as jnp

    comparison = gb.compare({"jax": lambda x: x @ jnp.asarray(W) + 0.25,
                             "numpy": (lambda x: x @ W, lambda g, x: g @ W.T)}, X)
    assert any("plus" in s and "0.25" in s for s in comparison.patterns), comparison.patterns


def test_agreeing_ports_and_unstructured_differences_name_no_pattern() -> None:
    assert gb.compare({"torch": _torch_matmul(), "jax": _jax_matmul()}, X, W).patterns == []
    noise = W + RNG.normal(size=W.shape) * 1e-3
    assert describe(W, noise, "a", "b", "w") is None  # no shape explains every entry: nothing is guessed


def test_each_shape_on_plain_arrays() -> None:
    assert "transposed" in describe(W.T, W, "a", "b", "w")
    assert "sign flipped" in describe(-W, W, "a", "b", "w")
    assert "2 x" in describe(2 * W, W, "a", "b", "w")
    edited = W.copy()
    edited[1, 2] += 1.0
    assert "only at w[1, 2]" in describe(edited, W, "a", "b", "w")
    edited[1, 0] += 1.0
    assert "row w[1, :]" in describe(edited, W, "a", "b", "w")
