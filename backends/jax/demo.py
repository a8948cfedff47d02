"""JAX demo: a custom_vjp linear layer (correct and with a seeded bug) and an MLP with key-driven dropout.

Invariant: every case is built deterministically (fixed PRNG keys and seeded generators) and states its expected
outcome: the correct gradients pass and the seeded bug fails, so ``gradbridge demo`` succeeds only when both hold.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ..demos import DemoCase


@jax.custom_vjp
def linear(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """y = x @ w.T + b with a hand-written VJP."""
    return x @ w.T + b


def _linear_fwd(x: jax.Array, w: jax.Array, b: jax.Array) -> Tuple[jax.Array, Tuple[jax.Array, jax.Array]]:
    return x @ w.T + b, (x, w)


def _linear_bwd(residuals: Tuple[jax.Array, jax.Array], g: jax.Array) -> Tuple[jax.Array, jax.Array, jax.Array]:
    x, w = residuals
    return g @ w, g.T @ x, g.sum(0)


linear.defvjp(_linear_fwd, _linear_bwd)


@jax.custom_vjp
def linear_buggy(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """Seeded bug: the weight gradient uses only the first sample of the batch (a dropped sum)."""
    return x @ w.T + b


def _linear_buggy_bwd(residuals: Tuple[jax.Array, jax.Array], g: jax.Array) -> Tuple[jax.Array, jax.Array, jax.Array]:
    x, w = residuals
    return g @ w, g[:1].T @ x[:1], g.sum(0)


linear_buggy.defvjp(_linear_fwd, _linear_buggy_bwd)


def mlp_loss(params: Dict[str, Dict[str, jax.Array]], x: jax.Array, labels: jax.Array, key: jax.Array,
             rate: float = 0.2) -> jax.Array:
    """Cross-entropy of a two-layer tanh MLP with dropout drawn from ``key`` (the same mask at every evaluation)."""
    h = jnp.tanh(x @ params["dense1"]["w"] + params["dense1"]["b"])
    keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
    h = jnp.where(keep, h / (1.0 - rate), 0.0)
    logits = h @ params["dense2"]["w"] + params["dense2"]["b"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


def cases() -> List[DemoCase]:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 3)), dtype=jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, 3)), dtype=jnp.float32)
    b = jnp.asarray(rng.standard_normal(2), dtype=jnp.float32)
    params: Dict[str, Any] = {
        "dense1": {"w": jnp.asarray(rng.standard_normal((3, 5)), dtype=jnp.float32), "b": jnp.zeros(5, jnp.float32)},
        "dense2": {"w": jnp.asarray(rng.standard_normal((5, 2)), dtype=jnp.float32), "b": jnp.zeros(2, jnp.float32)},
    }
    labels = jnp.array([0, 1, 1, 0])
    return [
        DemoCase("jax.custom_vjp: linear layer", linear, (x, w, b)),
        DemoCase("jax.custom_vjp: linear layer whose weight gradient forgets the batch sum", linear_buggy, (x, w, b),
                 expect_pass=False),
        DemoCase("MLP over a params pytree with key-driven dropout, leaves checked by path", mlp_loss,
                 (params, x, labels, jax.random.key(0)), {"wrt": "params"}),
    ]
