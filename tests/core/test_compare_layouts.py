"""Input and output layouts in ``gb.compare`` (``layouts={"keras": gb.channels_last()}``): a torch conv net (NCHW)
and its Keras port (NHWC) compared with one torch state_dict, values, gradients, points and layers."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

import gradbridge as gb
from backend_matrix import require_backend

RNG = np.random.default_rng(11)
X = RNG.normal(size=(2, 3, 6, 6))  # NCHW
PARAMS = {"conv.weight": 0.3 * RNG.normal(size=(4, 3, 3, 3)), "conv.bias": 0.1 * RNG.normal(size=4),
          "head.weight": RNG.normal(size=(2, 4)), "head.bias": RNG.normal(size=2)}


def _torch_net(head: bool = True):
    require_backend("torch")
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.act = torch.nn.Tanh()
            self.head = torch.nn.Linear(4, 2) if head else None

        def forward(self, x):
            h = self.act(self.conv(x))
            return self.head(h.mean(dim=(2, 3))) if head else h

    return Net()


def _keras_net(head: bool = True, activation: str = "tanh"):
    require_backend("tensorflow")
    keras = pytest.importorskip("keras")
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    h = keras.layers.Activation(activation, name="act")(h)
    if head:
        h = keras.layers.Dense(2, name="head")(keras.layers.GlobalAveragePooling2D(name="pool")(h))
    model = keras.Model(inputs, h)
    return gb.Implementation(model, backend="tensorflow")


def test_a_channels_last_port_agrees_with_its_channels_first_original() -> None:
    comparison = gb.compare({"torch": _torch_net(), "keras": _keras_net()}, X, params=PARAMS,
                            layouts={"keras": gb.channels_last()})
    assert comparison.passed, comparison
    gradient = next(p for p in comparison.pairs if p.quantity == "gradient" and p.leaf == "arg0")
    assert gradient.shape == X.shape  # the input's gradient compared in the common (NCHW) layout
    assert comparison.other_points and all(p.passed for p in comparison.other_points)


def test_channels_last_outputs_are_compared_in_the_common_layout() -> None:
    params = {k: v for k, v in PARAMS.items() if k.startswith("conv")}
    comparison = gb.compare({"torch": _torch_net(head=False), "keras": _keras_net(head=False)}, X, params=params,
                            layouts={"keras": gb.channels_last(outputs=("out",))}, own_check=False)
    assert comparison.passed, comparison
    (value,) = [p for p in comparison.pairs if p.quantity == "value"]
    assert value.shape == (2, 4, 6, 6)


def test_a_wrong_activation_in_the_port_is_found_at_its_layer() -> None:
    comparison = gb.compare({"torch": _torch_net(), "keras": _keras_net(activation="sigmoid")}, X, params=PARAMS,
                            layouts={"keras": gb.channels_last()}, layers=True, own_check=False, points=1)
    assert not comparison.passed
    (divergence,) = comparison.layers
    assert divergence.layer == ("act", "act") and [a for a, _ in divergence.agreeing] == ["conv"], \
        divergence.sentence()


def test_a_faithful_port_agrees_layer_by_layer_across_layouts() -> None:
    comparison = gb.compare({"torch": _torch_net(), "keras": _keras_net()}, X, params=PARAMS,
                            layouts={"keras": gb.channels_last()}, layers=True, own_check=False, points=1)
    (divergence,) = comparison.layers
    assert divergence.layer is None and ("conv", "conv") in divergence.agreeing, divergence.sentence()


def test_layouts_name_the_implementation_and_the_expected_value() -> None:
    implementations = {"torch": _torch_net(), "keras": _keras_net()}
    with pytest.raises(gb.InvalidArgumentError, match="layouts: 'jax' is not one of the implementations"):
        gb.compare(implementations, X, params=PARAMS, layouts={"jax": gb.channels_last()})
    with pytest.raises(gb.InvalidArgumentError, match=r"layouts\['keras'\]: expected gb.channels_last"):
        gb.compare(implementations, X, params=PARAMS, layouts={"keras": "NHWC"})
    with pytest.raises(gb.InvalidArgumentError, match=r"layouts\['keras'\]: input 'images' is not one of the"):
        gb.compare(implementations, X, params=PARAMS, layouts={"keras": gb.channels_last(inputs=("images",))})
    with pytest.raises(gb.InvalidArgumentError, match=r"layouts\['keras'\]: output 'output' is not one of the"):
        gb.compare(implementations, X, params=PARAMS, layouts={"keras": gb.channels_last(outputs=("output",))})


def test_token_activations_of_a_channels_last_port_are_not_transposed() -> None:
    """Only activations whose counterpart is channels-first are turned: a patch embedding's token activations
    (N, T, C) are the same in both layouts (they were transposed and reported as a divergence before)."""
    require_backend("torch")
    import torch

    keras = pytest.importorskip("keras")

    class Patches(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = torch.nn.Conv2d(3, 16, 2, stride=2)
            self.proj = torch.nn.Linear(16, 16)

        def forward(self, x):
            return self.proj(self.patch(x).flatten(2).transpose(1, 2))  # (N, 16 tokens, 16 features)

    torch.manual_seed(0)
    model = Patches()
    port = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(16, 2, strides=2, name="patch"),
                             keras.layers.Reshape((16, 16), name="tokens"), keras.layers.Dense(16, name="proj")])
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8))
    comparison = gb.compare({"torch": model, "keras": gb.Implementation(port, backend="tensorflow")}, x,
                            params=model.state_dict(), layouts={"keras": gb.channels_last()}, layers=True,
                            own_check=False, points=1)
    assert comparison.passed, comparison
    (divergence,) = comparison.layers
    assert divergence.layer is None and [a for a, _ in divergence.agreeing] == ["patch", "proj"], \
        divergence.sentence()
