"""Example check cases for ``gradbridge check`` (run: ``gradbridge check examples/gradcheck_cases.py``).

Each case is a zero-argument function decorated with ``@gb.case`` that builds its inputs and returns
the report of ``gb.check(...)``. Cases that need a framework say so with ``requires=`` and import it
inside the function, so this file imports with NumPy alone and the others are reported as skipped.
Run one case with ``gradbridge check examples/gradcheck_cases.py::NAME``.
"""

import numpy as np

import gradbridge as gb


# --- NumPy: a hand-written backward pass -------------------------------------------------------------

def mlp_loss(W1, b1, W2, X, y):
    """Mean squared error of a one-hidden-layer tanh network."""
    h = np.tanh(X @ W1 + b1)
    return float(np.mean((h @ W2 - y) ** 2))


def mlp_loss_grads(W1, b1, W2, X, y):
    """Backpropagation by hand: gradients with respect to W1, b1 and W2 (X and y are data)."""
    h = np.tanh(X @ W1 + b1)
    d_out = 2.0 * (h @ W2 - y) / y.size
    d_pre = (d_out @ W2.T) * (1.0 - h ** 2)
    return X.T @ d_pre, d_pre.sum(axis=0), h.T @ d_out


def _mlp_inputs():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(3, 4)), rng.normal(size=4), rng.normal(size=(4, 2)), rng.normal(size=(5, 3)),
            rng.normal(size=(5, 2)))


@gb.case
def numpy_mlp_backprop():
    return gb.check(mlp_loss, *_mlp_inputs(), grad=mlp_loss_grads, wrt=("W1", "b1", "W2"))


@gb.case(name="numpy_mlp_backprop_forgets_tanh_derivative", expect="fail")
def numpy_mlp_backprop_seeded_bug():
    """A seeded bug the check must catch: the bias gradient skips the tanh derivative."""

    def buggy_grads(W1, b1, W2, X, y):
        dW1, _, dW2 = mlp_loss_grads(W1, b1, W2, X, y)
        h = np.tanh(X @ W1 + b1)
        d_out = 2.0 * (h @ W2 - y) / y.size
        return dW1, (d_out @ W2.T).sum(axis=0), dW2

    return gb.check(mlp_loss, *_mlp_inputs(), grad=buggy_grads, wrt=("W1", "b1", "W2"))


# --- PyTorch: a custom autograd.Function --------------------------------------------------------------

@gb.case(requires="torch")
def torch_silu_function():
    import torch

    class SiLU(torch.autograd.Function):
        """x * sigmoid(x) with a hand-written backward."""

        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * torch.sigmoid(x)

        @staticmethod
        def backward(ctx, grad_out):
            (x,) = ctx.saved_tensors
            s = torch.sigmoid(x)
            return grad_out * s * (1 + x * (1 - s))

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return gb.check(SiLU.apply, x)


# --- JAX: a custom_vjp --------------------------------------------------------------------------------

@gb.case(requires="jax")
def jax_softplus_custom_vjp():
    import jax
    import jax.numpy as jnp

    @jax.custom_vjp
    def softplus(x):
        """log(1 + exp(x)), computed without overflow, with a hand-written VJP."""
        return jnp.logaddexp(x, 0.0)

    def softplus_fwd(x):
        return softplus(x), x

    def softplus_bwd(x, g):
        return (g * jax.nn.sigmoid(x),)

    softplus.defvjp(softplus_fwd, softplus_bwd)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3)) * 3)
    return gb.check(softplus, x)
