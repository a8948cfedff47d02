"""TensorFlow's own logging during a check: pfor's conversion errors (about 180 lines per Conv2D of a Keras model
when ``tf.vectorized_map`` cannot vectorize it) do not reach the user, and TensorFlow's logger is left as it was.
Run in a fresh interpreter, where the records would reach stderr."""

from __future__ import annotations

import subprocess
import sys

import pytest

from backend_matrix import require_backend

SCRIPT = '''
import logging, sys
import numpy as np, keras, tensorflow as tf
import gradbridge as gb
model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(3, 3, name="conv"), keras.layers.Flatten(),
                          keras.layers.Dense(2, name="out")])
x = np.random.default_rng(0).normal(size=(2, 6, 6, 2))
logger = logging.getLogger("tensorflow")
before = (list(logger.filters), logger.level)
report = gb.check(lambda x: tf.reduce_sum(model(x) ** 2), tf.constant(x, tf.float64), params=model)
assert (list(logger.filters), logger.level) == before
print("PASSED" if report.passed else "FAILED")
'''


def test_pfor_conversion_errors_do_not_reach_the_user() -> None:
    require_backend("tensorflow")
    pytest.importorskip("keras")
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("PASSED")
    assert "pfor" not in result.stderr and "ERROR:tensorflow" not in result.stderr, result.stderr[:2000]
