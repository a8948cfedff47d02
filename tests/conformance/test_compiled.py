"""Compiled functions on every backend that compiles (``torch.compile``, ``jax.jit``, ``tf.function`` with and
without ``jit_compile``): the "compiled = eager" contract compares the compiled function with the eager function it
was made from. A correct function holds it; Python state read once while tracing (frozen into the compiled
computation, read anew by the eager function) passes every row, since the compiled function is consistent with its
own finite differences, and fails it. torch.compile guards on such state and recompiles, so torch's seeded bug is a
miscompiling backend (``tests/backends/torch/test_torch_compiled.py``). JAX's comparison compiles ``jax.vjp`` of the
jitted function anew, so it runs with ``contracts="all"``."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest

import gradbridge as gb
from backend_matrix import require_backend

VARIANTS = ["torch", "jax", "tensorflow", "tensorflow-xla"]
FROZEN_STATE = ["jax", "tensorflow", "tensorflow-xla"]


def _framework(variant: str) -> str:
    return variant.split("-")[0]


def _compile(variant: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    if variant == "torch":
        import torch

        return torch.compile(fn, backend="aot_eager")
    if variant == "jax":
        import jax

        return jax.jit(fn)
    import tensorflow as tf

    return tf.function(fn, jit_compile=variant == "tensorflow-xla")


def _layer(variant: str) -> Callable[..., Any]:
    framework = _framework(variant)
    if framework == "torch":
        import torch

        return lambda x, w: torch.tanh(x @ w).sum(-1)
    if framework == "jax":
        import jax.numpy as jnp

        return lambda x, w: jnp.sum(jnp.tanh(x @ w), -1)
    import tensorflow as tf

    return lambda x, w: tf.reduce_sum(tf.tanh(x @ w), -1)


def _args(variant: str):
    gen = np.random.default_rng(6)
    arrays = gen.normal(size=(4, 5)), gen.normal(size=(5, 3))
    framework = _framework(variant)
    if framework == "torch":
        import torch

        return tuple(torch.tensor(a) for a in arrays)
    if framework == "jax":
        import jax.numpy as jnp

        return tuple(jnp.asarray(a) for a in arrays)
    import tensorflow as tf

    return tuple(tf.constant(a) for a in arrays)


def _contract(report):
    found = [c for c in report.contracts if c.name == "compiled = eager"]
    assert len(found) == 1, str(report)
    return found[0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_compiled_function_equals_its_eager_function(variant: str) -> None:
    require_backend(_framework(variant))
    report = gb.check(_compile(variant, _layer(variant)), *_args(variant), contracts="all")
    contract = _contract(report)
    assert report.passed and contract.checked and contract.passed, str(report)
    if variant.startswith("tensorflow"):
        assert ("XLA" in contract.message) == variant.endswith("xla"), contract.message


@pytest.mark.parametrize("variant", FROZEN_STATE)
def test_python_state_frozen_at_trace_time_fails_compiled_equals_eager(variant: str) -> None:
    require_backend(_framework(variant))
    calls = []
    layer = _layer(variant)

    def scaled(x, w):
        calls.append(1)  # read once while tracing, on every call of the eager function
        return layer(x, w) * float(len(calls))

    report = gb.check(_compile(variant, scaled), *_args(variant), contracts="all")
    assert all(row.passed for row in report.rows), str(report)
    assert not report.passed and not _contract(report).passed, str(report)


def test_jax_runs_the_comparison_only_when_asked() -> None:
    require_backend("jax")
    report = gb.check(_compile("jax", _layer("jax")), *_args("jax"))
    contract = _contract(report)
    assert not contract.checked and "contracts='all' runs it" in contract.message
    assert any(note.startswith("fn is a jax.jit function") for note in report.notes), report.notes


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_plain_function_gets_no_compiled_contract(variant: str) -> None:
    require_backend(_framework(variant))
    report = gb.check(_layer(variant), *_args(variant), contracts="all")
    assert report.passed and not [c for c in report.contracts if c.name == "compiled = eager"]
