"""Randomness in ports (dropout in train mode): named as randomness, never blamed on a forward pass."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

import gradbridge as gb
from backend_matrix import require_backend

RNG = np.random.default_rng(3)
X = RNG.normal(size=(4, 6))
PARAMS = {"fc.weight": RNG.normal(size=(5, 6)), "fc.bias": RNG.normal(size=5)}


def _torch_model():
    require_backend("torch")
    import torch

    return torch.nn.Sequential(OrderedDict(fc=torch.nn.Linear(6, 5), drop=torch.nn.Dropout(0.5)))


def _keras_model():
    require_backend("tensorflow")
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, name="fc"), keras.layers.Dropout(0.5, name="drop")])
    model(np.zeros((1, 6), dtype="float32"))
    return gb.Implementation(model, backend="tensorflow")


def test_dropout_in_train_mode_is_named_as_randomness() -> None:
    comparison = gb.compare({"torch": _torch_model(), "keras": _keras_model()}, X, params=PARAMS, train=True,
                            points=1)
    assert not comparison.passed  # nothing could be verified: never a silent pass
    assert all(report.passed for report in comparison.checks.values())  # each pins its own generators
    text = " ".join(comparison.verdicts)
    # torch's dropout follows the seed it is given; Keras' follows its layer's own seed generator, so only
    # torch is caught changing with the seed, and that is enough to explain the pair
    assert "torch draws random numbers" in text and "train=False" in text
    assert "forward pass is wrong" not in text and "at least one forward pass" not in text, comparison.verdicts


def test_the_same_ports_in_eval_mode_agree() -> None:
    comparison = gb.compare({"torch": _torch_model(), "keras": _keras_model()}, X, params=PARAMS)
    assert comparison.passed, comparison


def test_a_real_forward_bug_is_still_blamed_when_nothing_is_random() -> None:
    require_backend("torch")
    import torch

    comparison = gb.compare({"torch": lambda x: torch.tanh(x),
                             "numpy": (lambda x: np.tanh(x) * 1.001, lambda g, x: g * 1.001 * (1 - np.tanh(x) ** 2))},
                            X, own_check=False, points=1)
    assert not comparison.passed
    assert "random" not in " ".join(comparison.verdicts)


def test_layer_mode_does_not_blame_a_layer_of_a_random_implementation() -> None:
    comparison = gb.compare({"torch": _torch_model(), "keras": _keras_model()}, X, params=PARAMS, train=True,
                            points=1, own_check=False, layers=True)
    (divergence,) = comparison.layers
    assert divergence.random == ["torch"], divergence.sentence()
    assert "draws random numbers" in divergence.sentence() and "the bug is in" not in divergence.sentence()
