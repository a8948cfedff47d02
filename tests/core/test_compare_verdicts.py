"""The sentences of ``gb.compare`` say only what the numbers show: the pair quoted next to names is theirs, an
own check that could not run is never described as passing, and "the values agree" only where they do.

Real torch, JAX and NumPy implementations; the functions differ by a term that vanishes at the compared point
(so values agree and gradients do not), the classic "different function near this point" case.
"""

from __future__ import annotations

import itertools

import numpy as np

import gradbridge as gb
from backend_matrix import require_backend

X0 = np.array([0.3, -1.2, 0.7, 2.0])


def _numpy(c: float):
    def f(x):
        return float(np.sum(x ** 2) + c * np.sum(x - X0))

    return f, (lambda x: 2 * x + c)


def _torch(c: float, noisy: bool = False):
    require_backend("torch")
    import torch

    calls = itertools.count()
    x0 = torch.tensor(X0)

    def f(x):
        noise = 1e-9 * next(calls) if noisy else 0.0  # a counter fn reads: two calls at one point differ
        return (x ** 2).sum() + c * (x - x0).sum() + noise

    return f


def _jax(c: float):
    require_backend("jax")
    import jax.numpy as jnp

    def f(x):
        return jnp.sum(x ** 2) + c * jnp.sum(x - jnp.asarray(X0))

    return f


def test_an_own_check_that_could_not_run_is_not_described_as_passing() -> None:
    comparison = gb.compare({"numpy": _numpy(0.0), "torch": _torch(0.5, noisy=True), "jax": _jax(0.0)}, X0,
                            rtol=1e-6)
    assert not comparison.passed
    assert comparison.checks["torch"].problem is not None
    text = " ".join(comparison.verdicts)
    assert "torch" in text and "could not run" in text, comparison.verdicts
    assert "every own finite-difference check passes" not in text, comparison.verdicts


def _jax_wrong_backward():
    require_backend("jax")
    import jax
    import jax.numpy as jnp

    @jax.custom_vjp
    def f(x):
        return jnp.sum(x ** 2)

    f.defvjp(lambda x: (f(x), x), lambda x, g: (g * 6.0 * x,))  # a backward bug: 6x instead of 2x
    return f


def test_the_numbers_quoted_are_those_of_the_implementations_named() -> None:
    # numpy, shifted and torch differ from each other by terms that vanish at X0 (own checks pass), jax has a
    # wrong backward (its own check fails) and the largest differences of all: the sentence about the first
    # three must quote a pair among them, not one with jax
    comparison = gb.compare({"numpy": _numpy(0.0), "shifted": _numpy(0.5), "torch": _torch(0.8),
                             "jax": _jax_wrong_backward()}, X0)
    assert "x" in comparison.checks["jax"].failures[0].input
    about_others = [s for s in comparison.verdicts if "compute different gradients" in s and not s.startswith("jax")]
    assert about_others, comparison.verdicts
    where = about_others[0].split("largest relative difference", 1)[1]
    assert "(jax)" not in where, about_others[0]


def test_an_infinite_difference_is_reported_as_infinite() -> None:
    from gradbridge._comparing.differences import difference

    abs_diff, rel_diff, _, passed = difference(np.array([1.0, np.inf]), np.array([1.0, 2.0]), 1e-7, 0.0, 2.0)[:4]
    assert not passed and abs_diff == np.inf and rel_diff == np.inf  # not 1.80e+308, the largest float
