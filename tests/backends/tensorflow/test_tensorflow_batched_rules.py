"""The batched-backward contract on TensorFlow: the backward under ``tf.vectorized_map`` (what ``tape.jacobian`` and
per-example gradients run, a ``tf.custom_gradient`` included) equals the backward one cotangent at a time.
TensorFlow has no user-written batching rules (pfor converts the rule's own ops), so the contract's value is in
saying which rules cannot be vectorized, reported and never failed, and in confirming the others; it runs free on
the check's own vectorized graph, and costs a trace (more than a small check) only with ``contracts="all"``."""

from __future__ import annotations

import numpy as np
import pytest

import gradbridge as gb
from backend_matrix import require_backend

pytestmark = pytest.mark.tensorflow

NAME = "batched (vmap)"


def _tanh_rule(through_numpy: bool):
    import tensorflow as tf

    @tf.custom_gradient
    def tanh(x):
        y = tf.tanh(x)

        def grad(g):
            if through_numpy:  # a backward computed in NumPy: right values, no vectorization rule
                slope = tf.numpy_function(lambda t: (1 - np.tanh(t) ** 2).astype(t.dtype), [x], x.dtype)
                return g * tf.reshape(slope, tf.shape(x))
            return g * (1 - y * y)

        return y, grad

    return tanh


def _batched(report):
    found = [c for c in report.contracts if c.name == NAME]
    assert len(found) == 1, str(report)
    return found[0]


def _x():
    import tensorflow as tf

    return tf.constant(np.random.default_rng(5).normal(size=(4, 5)))


def test_a_small_check_says_the_contract_was_not_run_and_how_to_run_it() -> None:
    require_backend("tensorflow")
    report = gb.check(_tanh_rule(False), _x())
    contract = _batched(report)
    assert report.passed and not contract.checked and "contracts='all' runs it" in contract.message, str(report)


def test_contracts_all_runs_it_and_a_later_check_reuses_the_graph() -> None:
    require_backend("tensorflow")
    rule, x = _tanh_rule(False), _x()
    report = gb.check(rule, x, contracts="all")
    contract = _batched(report)
    assert report.passed and contract.checked and contract.passed, str(report)
    again = _batched(gb.check(rule, x))  # the traced graph is kept: free from now on
    assert again.checked and again.passed


def test_a_backward_that_cannot_be_vectorized_is_reported_not_failed() -> None:
    require_backend("tensorflow")
    report = gb.check(_tanh_rule(True), _x(), contracts="all")
    contract = _batched(report)
    assert report.passed and not contract.checked, str(report)
    assert "cannot run under vmap" in contract.message and "vectorized_map" in contract.message, contract.message


def test_contracts_rejects_other_values() -> None:
    require_backend("tensorflow")
    with pytest.raises(gb.InvalidArgumentError, match="contracts: expected True.*'all'"):
        gb.check(_tanh_rule(False), _x(), contracts="some")
