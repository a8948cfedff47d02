"""``jax.jit`` functions: the "compiled = eager" contract compares the jitted function (one fused XLA computation)
with the Python function it wraps, traced op by op. It compiles ``jax.vjp`` of the jitted function anew (about
100 ms for a new function), so it runs with ``contracts="all"`` and is otherwise listed as not run. Python state
read at trace time (frozen into the jitted computation, read anew by the Python function) passes every row and
fails the contract."""

from __future__ import annotations

import numpy as np
import pytest

import gradbridge as gb
from backend_matrix import require_backend

pytestmark = pytest.mark.jax


def _args():
    import jax.numpy as jnp

    gen = np.random.default_rng(6)
    return jnp.asarray(gen.normal(size=(4, 5))), jnp.asarray(gen.normal(size=(5, 3)))


def _contract(report):
    found = [c for c in report.contracts if c.name == "compiled = eager"]
    assert len(found) == 1, str(report)
    return found[0]


def _layer(x, w):
    import jax.numpy as jnp

    return jnp.sum(jnp.tanh(x @ w), -1)


def test_a_jitted_function_equals_its_python_function_with_contracts_all() -> None:
    require_backend("jax")
    import jax

    default = _contract(gb.check(jax.jit(_layer), *_args()))
    assert not default.checked and "contracts='all' runs it" in default.message
    report = gb.check(jax.jit(_layer), *_args(), contracts="all")
    contract = _contract(report)
    assert report.passed and contract.checked and contract.passed, str(report)


def test_python_state_frozen_at_trace_time_fails_compiled_equals_eager() -> None:
    require_backend("jax")
    import jax

    calls = []

    def scaled(x, w):
        calls.append(1)  # read once while tracing under jit, on every call of the Python function
        return _layer(x, w) * float(len(calls))

    report = gb.check(jax.jit(scaled), *_args(), contracts="all")
    assert all(row.passed for row in report.rows), str(report)
    assert not report.passed and not _contract(report).passed, str(report)


def test_a_plain_function_gets_no_compiled_contract() -> None:
    require_backend("jax")
    report = gb.check(_layer, *_args(), contracts="all")
    assert report.passed and not [c for c in report.contracts if c.name == "compiled = eager"]
