"""gb.compare on complex functions: ports agree whatever each framework's convention, and a rule ported without
changing the convention is named as a conjugation, not as an unexplained "wrong gradient"."""

from __future__ import annotations

import numpy as np
import pytest

import gradbridge as gb
from backend_matrix import require_backend

Z = np.array([1.0 + 2.0j, -0.5 + 0.3j, 0.8 - 1.1j])
W = np.array([0.7 - 1.0j, 2.0 + 0.1j, -0.4 + 0.6j])


def _torch_energy():
    import torch

    class Energy(torch.autograd.Function):  # sum |z|^2 * Re w, PyTorch's convention: dL/dz = 2 z Re w
        @staticmethod
        def forward(ctx, z, w):
            ctx.save_for_backward(z, w)
            return (z * z.conj()).real.mul(w.real).sum()

        @staticmethod
        def backward(ctx, g):
            z, w = ctx.saved_tensors
            return 2 * z * w.real * g, (z * z.conj()).real * g + 0j

    return Energy.apply


def _jax_energy(convention: str):
    import jax
    import jax.numpy as jnp

    @jax.custom_vjp
    def energy(z, w):
        return jnp.sum(jnp.real(z * jnp.conj(z)) * jnp.real(w))

    def fwd(z, w):
        return energy(z, w), (z, w)

    def bwd(res, g):
        z, w = res
        gz = 2 * z * jnp.real(w) * g  # PyTorch's formula
        if convention == "jax":
            gz = jnp.conj(gz)  # JAX's convention: the conjugate
        return gz, jnp.real(z * jnp.conj(z)) * g + 0j

    energy.defvjp(fwd, bwd)
    return energy


def _tf_energy(z, w):
    import tensorflow as tf
    return tf.reduce_sum(tf.math.real(z * tf.math.conj(z)) * tf.math.real(w))


def test_ports_of_a_complex_function_agree_across_conventions() -> None:
    for name in ("torch", "jax", "tensorflow"):
        require_backend(name)
    comparison = gb.compare({"torch": _torch_energy(), "jax": _jax_energy("jax"), "tensorflow": _tf_energy,
                             "numpy": (lambda z, w: np.sum(np.abs(z) ** 2 * w.real),
                                       lambda z, w: (2 * z * w.real, np.abs(z) ** 2 + 0j))}, Z, W)
    assert comparison.passed, str(comparison)
    assert set(comparison.complex_leaves) >= {"z", "w"}, comparison.complex_leaves
    assert any("dL/dRe + i dL/dIm" in note for note in comparison.notes), comparison.notes


def test_a_rule_ported_without_its_convention_is_named_a_conjugation() -> None:
    for name in ("torch", "jax"):
        require_backend(name)
    comparison = gb.compare({"torch": _torch_energy(), "jax": _jax_energy("torch")}, Z, W)
    assert not comparison.passed, str(comparison)
    assert any("complex conjugate" in sentence and "'z'" in sentence for sentence in comparison.patterns), \
        str(comparison)
    assert any(v.startswith("jax") for v in comparison.verdicts), comparison.verdicts
    text = str(comparison)
    assert "z[" in text and (".real" in text or ".imag" in text), text


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_complex_values_are_compared(backend: str) -> None:
    require_backend(backend)
    require_backend("jax")
    import jax.numpy as jnp
    if backend == "torch":
        import torch
        other = lambda z: torch.exp(z) * z.conj()  # noqa: E731
    else:
        import tensorflow as tf
        other = lambda z: tf.exp(z) * tf.math.conj(z)  # noqa: E731
    comparison = gb.compare({backend: other, "jax": lambda z: jnp.exp(z) * jnp.conj(z)}, Z)
    assert comparison.passed, str(comparison)
    wrong = gb.compare({backend: other, "jax": lambda z: jnp.exp(z) * z}, Z)
    assert not wrong.passed and any(p.quantity == "value" and not p.passed for p in wrong.pairs), str(wrong)
