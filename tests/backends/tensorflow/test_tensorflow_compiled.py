"""``tf.function`` (graph and ``jit_compile=True``): the check runs a fresh copy of the compiled function and the
"compiled = eager" contract compares it with its Python function run eagerly. A tf.function that reads Python
state at trace time (a value frozen into the graph while the eager function reads it anew) passes every row, since
the graph is consistent with its own finite differences, and fails the contract."""

from __future__ import annotations

import numpy as np
import pytest

import gradbridge as gb
from backend_matrix import require_backend

pytestmark = pytest.mark.tensorflow


def _args():
    import tensorflow as tf

    gen = np.random.default_rng(4)
    return tf.constant(gen.normal(size=(4, 5))), tf.constant(gen.normal(size=(5, 3)))


def _contract(report):
    found = [c for c in report.contracts if c.name == "compiled = eager"]
    assert len(found) == 1, str(report)
    return found[0]


@pytest.mark.parametrize("jit_compile", [False, True])
def test_a_tf_function_equals_its_eager_function(jit_compile: bool) -> None:
    require_backend("tensorflow")
    import tensorflow as tf

    fn = tf.function(lambda x, w: tf.reduce_sum(tf.tanh(x @ w), -1), jit_compile=jit_compile)
    report = gb.check(fn, *_args())
    contract = _contract(report)
    assert report.passed and contract.checked and contract.passed, str(report)
    assert ("XLA" in contract.message) == jit_compile, contract.message


def test_python_state_frozen_at_trace_time_fails_compiled_equals_eager() -> None:
    require_backend("tensorflow")
    import tensorflow as tf

    calls = []

    @tf.function
    def scaled(x, w):
        calls.append(1)  # Python state: read once while tracing, on every call eagerly
        return tf.reduce_sum(tf.tanh(x @ w), -1) * float(len(calls))

    report = gb.check(scaled, *_args())
    assert all(row.passed for row in report.rows), str(report)
    assert not report.passed and not _contract(report).passed, str(report)


def test_a_plain_function_gets_no_compiled_contract() -> None:
    require_backend("tensorflow")
    import tensorflow as tf

    report = gb.check(lambda x, w: tf.reduce_sum(tf.tanh(x @ w), -1), *_args())
    assert report.passed and not [c for c in report.contracts if c.name == "compiled = eager"]
