"""Layer by layer: the first layer where a torch model and its Keras port diverge (real models, shared weights)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from backend_matrix import require_backend
from gradbridge._comparing.layers import first_divergence, pair_layers

RNG = np.random.default_rng(7)
X = RNG.normal(size=(3, 4))
W1, B1 = RNG.normal(size=(5, 4)), RNG.normal(size=5)  # torch layout (out, in)
W2, B2 = RNG.normal(size=(5, 5)), RNG.normal(size=5)
W3, B3 = RNG.normal(size=(2, 5)), RNG.normal(size=2)


def _torch_model():
    require_backend("torch")
    import torch

    model = torch.nn.Sequential(OrderedDict(
        fc1=torch.nn.Linear(4, 5), act=torch.nn.Tanh(), norm=torch.nn.LayerNorm(5), fc2=torch.nn.Linear(5, 5),
        out=torch.nn.Linear(5, 2))).double()
    with torch.no_grad():
        for layer, (w, b) in ((model.fc1, (W1, B1)), (model.fc2, (W2, B2)), (model.out, (W3, B3))):
            layer.weight.copy_(torch.tensor(w))
            layer.bias.copy_(torch.tensor(b))
    return model, (torch.tensor(X),)


def _keras_model(norm_eps: float = 1e-5, untransposed_fc2: bool = False):
    require_backend("tensorflow")
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, name="fc1", dtype="float64"),
                              keras.layers.Activation("tanh", name="act", dtype="float64"),
                              keras.layers.LayerNormalization(epsilon=norm_eps, name="norm", dtype="float64"),
                              keras.layers.Dense(5, name="fc2", dtype="float64"),
                              keras.layers.Dense(2, name="out", dtype="float64")])
    model.get_layer("fc1").set_weights([W1.T, B1])
    model.get_layer("fc2").set_weights([W2 if untransposed_fc2 else W2.T, B2])
    model.get_layer("out").set_weights([W3.T, B3])
    return model, (np.asarray(X),)


def _layers(backend: str, model, args):
    from gradbridge import _registry
    from gradbridge.backends import torch as torch_backend, tensorflow as tf_backend  # noqa: F401

    module = {"torch": "gradbridge.backends.torch.layers", "tensorflow": "gradbridge.backends.tensorflow.layers"}
    import importlib

    _registry.get_adapter(backend)
    return importlib.import_module(module[backend]).layer_outputs(model, args)


# Keras' float64 LayerNormalization differs from torch's by up to ~2e-7 of the layer's scale (its own accuracy,
# not a bug), so layers are judged at rtol 1e-6: far below the smallest real porting bug (1e-4 relative).
def test_a_faithful_port_agrees_layer_by_layer() -> None:
    torch_layers = _layers("torch", *_torch_model())
    keras_layers = _layers("tensorflow", *_keras_model())
    assert [name for name, _ in torch_layers] == ["fc1", "act", "norm", "fc2", "out"]
    found = first_divergence("torch", torch_layers, "keras", keras_layers, rtol=1e-6)
    assert found.layer is None and len(found.agreeing) == 5 and not found.unpaired, found.sentence()


@pytest.mark.parametrize("bug, layer", [(dict(norm_eps=1e-3), "norm"), (dict(untransposed_fc2=True), "fc2")])
def test_the_first_diverging_layer_is_named(bug, layer) -> None:
    torch_layers = _layers("torch", *_torch_model())
    keras_layers = _layers("tensorflow", *_keras_model(**bug))
    found = first_divergence("torch", torch_layers, "keras", keras_layers, rtol=1e-6)
    assert found.layer == (layer, layer), found.sentence()
    assert layer in found.sentence() and "first diverge" in found.sentence()


def test_the_hooks_are_removed_and_the_model_is_unchanged() -> None:
    model, args = _torch_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _layers("torch", model, args)
    assert all(not m._forward_hooks for m in model.modules())
    assert all((before[k] == v).all() for k, v in model.state_dict().items())


def test_layers_pair_by_name_then_by_shape() -> None:
    a = [("encoder.fc1", np.zeros((2, 3))), ("head", np.zeros((2, 1)))]
    b = [("Encoder/FC1", np.zeros((2, 3))), ("dense_7", np.zeros((2, 1))), ("extra", np.zeros((4,)))]
    pairs, unpaired = pair_layers(a, b)
    assert pairs == [(0, 0), (1, 1)] and unpaired == ["extra"]
