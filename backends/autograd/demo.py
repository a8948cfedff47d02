"""autograd demo: a tanh MLP differentiated by autograd, and a user primitive whose ``defvjp`` is right or wrong.

Invariant: the correct cases pass and the seeded bug (a ``defvjp`` rule that forgets the factor 2) fails
(``gradbridge demo`` exits 0 only then); the runner passes ``backend="autograd"`` (the arrays are NumPy's).
"""

from __future__ import annotations

from typing import List

import autograd.numpy as anp
import numpy as np
from autograd.extend import defvjp, primitive

from ..demos import DemoCase


def mlp_loss(params, X, y):
    """Mean squared error of a one-hidden-layer tanh MLP, written with autograd.numpy."""
    hidden = anp.tanh(anp.dot(X, params["W1"]) + params["b1"])
    return anp.mean((anp.dot(hidden, params["W2"]) - y) ** 2)


@primitive
def squared_norm(x):
    """sum(x**2), an operation autograd learns from the rule below."""
    return np.sum(x ** 2)


defvjp(squared_norm, lambda ans, x: lambda g: 2.0 * g * x)


@primitive
def squared_norm_buggy(x):
    return np.sum(x ** 2)


defvjp(squared_norm_buggy, lambda ans, x: lambda g: g * x)  # seeded bug: the factor 2 is missing


def cases() -> List[DemoCase]:
    rng = np.random.default_rng(0)
    params = {"W1": rng.normal(size=(3, 5)), "b1": rng.normal(size=5), "W2": rng.normal(size=(5, 2))}
    X, y = rng.normal(size=(4, 3)), rng.normal(size=(4, 2))
    x = rng.normal(size=6)
    options = {"wrt": [0]}  # the parameters (the demo runner passes backend="autograd")
    return [
        DemoCase("tanh MLP written with autograd.numpy, parameters in a dict", mlp_loss, (params, X, y), options),
        DemoCase("primitive squared_norm with its defvjp rule", lambda v: anp.tanh(squared_norm(v)), (x,)),
        DemoCase("primitive squared_norm whose defvjp forgets the factor 2", lambda v: anp.tanh(squared_norm_buggy(v)),
                 (x,), expect_pass=False),
    ]
