"""Layer by layer (``gb.compare(..., layers=True)``): the first layer where ports of one model diverge, forward or
backward. Real models in torch, Keras and JAX sharing one state_dict; seeded porting bugs."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

import gradbridge as gb
from backend_matrix import require_backend
from kit_torch import tanh_function

RNG = np.random.default_rng(7)
X = RNG.normal(size=(3, 4))
PARAMS = {"fc1.weight": RNG.normal(size=(5, 4)), "fc1.bias": RNG.normal(size=5),  # torch layouts (out, in)
          "norm.weight": 1 + 0.1 * RNG.normal(size=5), "norm.bias": 0.1 * RNG.normal(size=5),
          "fc2.weight": RNG.normal(size=(5, 5)), "fc2.bias": RNG.normal(size=5),
          "out.weight": RNG.normal(size=(2, 5)), "out.bias": RNG.normal(size=2)}


def _torch_model(wrong_tanh_backward: bool = False):
    require_backend("torch")
    import torch

    Tanh = tanh_function(wrong_backward=wrong_tanh_backward)

    class Act(torch.nn.Module):
        def forward(self, x):
            return Tanh.apply(x)

    return torch.nn.Sequential(OrderedDict(
        fc1=torch.nn.Linear(4, 5), act=Act(), norm=torch.nn.LayerNorm(5), fc2=torch.nn.Linear(5, 5),
        out=torch.nn.Linear(5, 2)))


def _keras_model(norm_eps: float = 1e-5, fused: bool = False):
    require_backend("tensorflow")
    keras = pytest.importorskip("keras")
    first = ([keras.layers.Dense(5, activation="tanh", name="fc1")] if fused else
             [keras.layers.Dense(5, name="fc1"), keras.layers.Activation("tanh", name="act")])
    model = keras.Sequential([keras.Input((4,)), *first, keras.layers.LayerNormalization(epsilon=norm_eps, name="norm"),
                              keras.layers.Dense(5, name="fc2"), keras.layers.Dense(2, name="out")])
    model(np.zeros((1, 4), dtype="float32"))
    return gb.Implementation(model, backend="tensorflow")


def _jax_mlp(norm_eps: float = 1e-5):
    require_backend("jax")
    import jax.numpy as jnp

    def mlp(p, x):
        h = gb.tap("fc1", x @ p["fc1.weight"].T + p["fc1.bias"])
        h = gb.tap("act", jnp.tanh(h))
        mu = h.mean(-1, keepdims=True)
        var = ((h - mu) ** 2).mean(-1, keepdims=True)
        h = gb.tap("norm", (h - mu) / jnp.sqrt(var + norm_eps) * p["norm.weight"] + p["norm.bias"])
        h = gb.tap("fc2", h @ p["fc2.weight"].T + p["fc2.bias"])
        return h @ p["out.weight"].T + p["out.bias"]

    return mlp


def _compare(implementations):
    return gb.compare(implementations, X, params=PARAMS, layers=True, own_check=False)


def _between(comparison, first, second):
    return next(d for d in comparison.layers if (d.first, d.second) == (first, second))


def test_faithful_ports_agree_layer_by_layer() -> None:
    comparison = _compare({"torch": _torch_model(), "keras": _keras_model(), "jax": _jax_mlp()})
    assert comparison.passed, comparison
    assert len(comparison.layers) == 3
    for divergence in comparison.layers:
        assert divergence.layer is None, divergence.sentence()
    assert len(_between(comparison, "torch", "keras").agreeing) == 5
    assert "Layer by layer:" in str(comparison) and "all 5 paired layers agree" in str(comparison)


@pytest.mark.parametrize("buggy", ["keras", "jax"])
def test_a_wrong_layernorm_epsilon_is_found_at_the_norm_layer(buggy) -> None:
    implementations = {"torch": _torch_model(), "keras": _keras_model(norm_eps=1e-3 if buggy == "keras" else 1e-5),
                       "jax": _jax_mlp(norm_eps=1e-3 if buggy == "jax" else 1e-5)}
    comparison = _compare(implementations)
    assert not comparison.passed
    divergence = _between(comparison, "torch", buggy)
    assert divergence.quantity == "value" and divergence.layer == ("norm", "norm"), divergence.sentence()
    assert [a for a, _ in divergence.agreeing] == ["fc1", "act"]
    other = "jax" if buggy == "keras" else "keras"
    assert _between(comparison, *sorted(("torch", other), key=list(implementations).index)).layer is None
    assert "first diverge at the output of layer 'norm'" in str(comparison)
    if buggy == "keras":  # both adapters read the layer's epsilon: the report names the setting
        assert divergence.settings == ["eps 1e-05 (torch) vs 0.001 (keras)"], divergence.sentence()
        assert "their settings differ: eps 1e-05 (torch) vs 0.001 (keras)" in divergence.sentence()
    else:  # a plain function's taps carry no settings: the layer is named, the cause left open
        assert divergence.settings == [] and "the bug is in that layer" in divergence.sentence()


def test_a_wrong_backward_inside_one_layer_is_named() -> None:
    comparison = _compare({"torch": _torch_model(wrong_tanh_backward=True), "keras": _keras_model()})
    assert not comparison.passed
    divergence = _between(comparison, "torch", "keras")
    assert divergence.quantity == "gradient", divergence.sentence()
    assert divergence.layer == ("fc1", "fc1") and divergence.culprit == ("act", "act"), divergence.sentence()
    assert "the backward pass of layer 'act' differs" in divergence.sentence()


def test_a_fused_keras_activation_is_matched_with_the_separate_one() -> None:
    comparison = _compare({"torch": _torch_model(), "keras": _keras_model(fused=True)})
    assert comparison.passed, comparison
    divergence = _between(comparison, "torch", "keras")
    assert divergence.layer is None, divergence.sentence()
    assert ("act", "fc1") in divergence.agreeing
    assert any("applies its activation inside" in note for note in comparison.notes), comparison.notes


def test_the_module_is_unchanged_and_no_hook_is_left() -> None:
    model = _torch_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _compare({"torch": model, "jax": _jax_mlp()})
    assert all(not m._forward_hooks for m in model.modules())
    assert all(v.dtype == before[k].dtype and (v == before[k]).all() for k, v in model.state_dict().items())


def test_an_implementation_without_layers_is_named_not_guessed() -> None:
    require_backend("jax")
    import jax.numpy as jnp

    def untapped(p, x):
        h = jnp.tanh(x @ p["fc1.weight"].T + p["fc1.bias"])
        mu = h.mean(-1, keepdims=True)
        h = (h - mu) / jnp.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * p["norm.weight"] + p["norm.bias"]
        return (h @ p["fc2.weight"].T + p["fc2.bias"]) @ p["out.weight"].T + p["out.bias"]

    comparison = _compare({"torch": _torch_model(), "jax": untapped})
    assert comparison.passed and comparison.layers == []
    assert any("jax has no layers to compare" in note for note in comparison.notes), comparison.notes


def test_tap_is_the_identity_outside_a_comparison() -> None:
    value = np.arange(3.0)
    assert gb.tap("fc1", value) is value
    with pytest.raises(gb.InvalidArgumentError, match="gb.tap: name"):
        from gradbridge._taps import tapping
        with tapping():
            gb.tap("", value)


def test_layers_must_be_a_bool() -> None:
    with pytest.raises(gb.InvalidArgumentError, match="layers: expected True or False"):
        gb.compare({"numpy": (np.sin, np.cos), "np2": gb.Implementation(np.sin, np.cos, "numpy")}, X, layers="yes")


def test_mapped_parameters_keep_their_measured_round_off() -> None:
    """A parameter mapped to another layout (Linear weight -> Dense kernel) used to make the precision measurement
    compare gradients in two layouts and drop every measured magnitude of that implementation."""
    comparison = gb.compare({"torch": _torch_model(), "keras": _keras_model()}, X, params=PARAMS, own_check=False)
    assert comparison.passed, comparison
    assert not any("round-off was not measured" in note for note in comparison.notes), comparison.notes


def test_layers_pair_by_name_then_by_shape() -> None:
    from gradbridge._comparing.layers import pair_layers

    a = [("encoder.fc1", np.zeros((2, 3))), ("head", np.zeros((2, 1)))]
    b = [("Encoder/FC1", np.zeros((2, 3))), ("dense_7", np.zeros((2, 1))), ("extra", np.zeros((4,)))]
    pairs, unpaired = pair_layers(a, b)
    assert pairs == [(0, 0), (1, 1)] and unpaired == ["extra"]


def test_gelu_tanh_against_exact_gelu_is_named_as_the_activation_setting() -> None:
    require_backend("torch")
    import torch

    keras = pytest.importorskip("keras")
    model = torch.nn.Sequential(OrderedDict(fc1=torch.nn.Linear(4, 5), act=torch.nn.GELU(approximate="tanh"),
                                            out=torch.nn.Linear(5, 2)))
    port = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, name="fc1"),
                             keras.layers.Activation("gelu", name="act"), keras.layers.Dense(2, name="out")])
    params = {k: v for k, v in PARAMS.items() if k.split(".")[0] in ("fc1", "out")}
    comparison = gb.compare({"torch": model, "keras": gb.Implementation(port, backend="tensorflow")}, 3 * X,
                            params=params, layers=True, own_check=False, points=1)
    assert not comparison.passed
    (divergence,) = comparison.layers
    assert divergence.layer == ("act", "act")
    assert divergence.settings == ["activation 'gelu_tanh' (torch) vs 'gelu' (keras)"], divergence.sentence()


def _fused_keras(activation: str = "tanh", names: bool = True):
    keras = pytest.importorskip("keras")
    name = (lambda n: {"name": n}) if names else (lambda n: {})
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation=activation, **name("fc1")),
                              keras.layers.Dense(2, **name("out"))])
    return gb.Implementation(model, backend="tensorflow")


def _two_layer_params(torch_names: bool = True):
    keys = ("fc1", "out") if torch_names else ("0", "2")
    return {f"{k}.{p}": PARAMS[f"{src}.{p}"] for k, src in zip(keys, ("fc1", "out")) for p in ("weight", "bias")}


def test_fused_activations_pair_by_position_with_default_names() -> None:
    """torch Sequential indices against Keras' default names: the fused Dense takes the place of torch's Tanh, not
    of its Linear (pairing by position used to name a divergence in this correct port)."""
    require_backend("torch")
    import torch

    keras = pytest.importorskip("keras")
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2))
    port = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"),
                             keras.layers.LayerNormalization(epsilon=1e-5), keras.layers.Dense(2)])
    params = {"0.weight": PARAMS["fc1.weight"], "0.bias": PARAMS["fc1.bias"], "2.weight": PARAMS["norm.weight"],
              "2.bias": PARAMS["norm.bias"], "3.weight": PARAMS["out.weight"], "3.bias": PARAMS["out.bias"]}
    comparison = gb.compare({"torch": model, "keras": gb.Implementation(port, backend="tensorflow")}, X,
                            params=params, layers=True, own_check=False, points=1)
    assert comparison.passed, comparison
    (divergence,) = comparison.layers
    assert divergence.layer is None and len(divergence.agreeing) == 3, divergence.sentence()
    assert divergence.agreeing[0][0] == "1"  # torch's Tanh, with the Dense that applies tanh inside


def test_an_activation_without_a_layer_of_its_own_is_not_compared_across() -> None:
    """torch applies tanh as a function call: there is no separate activation to pair the fused Dense with."""
    require_backend("torch")
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.out = torch.nn.Linear(4, 5), torch.nn.Linear(5, 2)

        def forward(self, x):
            return self.out(torch.tanh(self.fc1(x)))

    comparison = gb.compare({"torch": Net(), "keras": _fused_keras()}, X, params=_two_layer_params(), layers=True,
                            own_check=False, points=1)
    assert comparison.passed, comparison
    (divergence,) = comparison.layers
    assert divergence.layer is None, divergence.sentence()
    assert any("no separate activation layer after 'fc1'" in note for note in comparison.notes), comparison.notes


def test_a_wrong_fused_activation_is_named_by_its_setting() -> None:
    require_backend("torch")
    import torch

    model = torch.nn.Sequential(OrderedDict(fc1=torch.nn.Linear(4, 5), act=torch.nn.GELU(approximate="tanh"),
                                            out=torch.nn.Linear(5, 2)))
    comparison = gb.compare({"torch": model, "keras": _fused_keras("gelu")}, 3 * X, params=_two_layer_params(),
                            layers=True, own_check=False, points=1)
    (divergence,) = comparison.layers
    assert divergence.layer == ("act", "fc1"), divergence.sentence()
    assert divergence.settings == ["activation 'gelu_tanh' (torch) vs 'gelu' (keras)"], divergence.sentence()


def test_taps_keep_a_float32_port_in_float32() -> None:
    """A tap adds a zero of the tapped value's dtype: a float32 TensorFlow port is not broken by a float64 zero
    (it raised), and a float32 JAX port is not silently promoted to float64 after its first tap."""
    require_backend("tensorflow")
    require_backend("jax")
    import jax.numpy as jnp
    import tensorflow as tf

    seen = []

    def tf_port(p, x):
        p = {k: tf.cast(v, tf.float32) for k, v in p.items()}
        h = gb.tap("fc1", tf.cast(x, tf.float32) @ tf.transpose(p["fc1.weight"]) + p["fc1.bias"])
        return tf.cast(gb.tap("act", tf.tanh(h)), tf.float64)

    def jax_port(p, x):
        h = gb.tap("fc1", x.astype(jnp.float32) @ p["fc1.weight"].T.astype(jnp.float32) + p["fc1.bias"].astype(
            jnp.float32))
        seen.append(h.dtype)
        return gb.tap("act", jnp.tanh(h)).astype(jnp.float64)

    params = {k: PARAMS[k] for k in ("fc1.weight", "fc1.bias")}
    comparison = gb.compare({"tensorflow": tf_port, "jax": jax_port}, X, params=params, layers=True, own_check=False,
                            points=1)
    assert not any("could not be run layer by layer" in note for note in comparison.notes), comparison.notes
    (divergence,) = comparison.layers
    assert divergence.layer is None and len(divergence.agreeing) == 2, divergence.sentence()
    assert seen and all(dtype == jnp.float32 for dtype in seen), seen


def test_a_wrong_weight_gradient_is_attributed_to_its_layer() -> None:
    """Every layer's output and incoming gradient agree, only fc1.weight's gradient differs: layer mode says so
    and names the layer (it said 'all layers agree, outputs and gradients')."""
    require_backend("torch")
    import torch

    class WrongWeightGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, b):
            ctx.save_for_backward(x, w)
            return x @ w.T + b

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            return g @ w, 2 * g.T @ x, g.sum(0)

    class Linear(torch.nn.Linear):
        def forward(self, x):
            return WrongWeightGradient.apply(x, self.weight, self.bias)

    model = torch.nn.Sequential(OrderedDict(fc1=Linear(4, 5), act=torch.nn.Tanh(), norm=torch.nn.LayerNorm(5),
                                            fc2=torch.nn.Linear(5, 5), out=torch.nn.Linear(5, 2)))
    comparison = _compare({"torch": model, "jax": _jax_mlp()})
    (divergence,) = comparison.layers
    assert divergence.layer is None and divergence.parameters == [("fc1.weight", "fc1")], divergence.sentence()
    assert "the parameter gradients 'fc1.weight' (layer 'fc1') differ" in divergence.sentence()
