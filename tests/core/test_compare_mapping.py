"""gb.compare's weight and layout mapping (gradbridge/_comparing/mapping.py) on real torch, Keras and JAX models.

One set of weights, a torch ``state_dict`` as NumPy arrays, reaches each implementation in its own names and
layouts: Linear (out, in) -> Dense kernel (in, out), Conv2d OIHW -> Conv2D HWIO, LayerNorm weight/bias ->
gamma/beta (Keras) or scale/bias (flax-style JAX tree), BatchNorm running statistics -> Keras' non-trainable
moving statistics. Each implementation runs through its adapter exactly as ``gb.compare`` runs it (bind_params,
prepare, the parameter leaves of ``x0`` set by their common names, evaluate, vjp), and must give torch's
outputs and, mapped back, torch's gradients, to 1e-12. No mocks.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any, Dict, Optional, Tuple

import numpy as np
import pytest

from gradbridge import _registry
from gradbridge._adapter import CheckSpec
import gradbridge as gb
from gradbridge._comparing import mapping
from gradbridge._errors import InvalidArgumentError

from backend_matrix import require_backend

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TOL = dict(rtol=1e-12, atol=1e-12)
EPS = 1e-5


def adapter(name: str) -> Any:
    require_backend(name)
    return _registry.get_adapter(name)


def entry(label: str, fn: Any, backend: str) -> Any:
    """What gb.compare's implementation entries offer map_params: a label, the function, its adapter."""
    return SimpleNamespace(label=label, fn=fn, adapter=adapter(backend))


def run_through_adapter(backend: str, fn: Any, mapped: Optional[mapping.MappedParams], x: np.ndarray,
                        cotangent: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """fn's output at ``x`` with the mapped parameters, and (for a cotangent) the VJP of every parameter by its
    name in params, in the layout of params: the path gb.compare takes (implementations.bind, runs._prepare,
    evaluate_run, gradient_run) with the mapping applied where the lead wires it."""
    a = adapter(backend)
    params = mapped.params if mapped is not None else None
    binding = a.bind_params(fn, params)
    if mapped is not None:
        binding = mapped.rename(binding)
    spec = CheckSpec(fn=binding.fn, args=tuple(binding.leading_args) + (a.from_numpy(x),), kwargs={},
                     params=binding.params, wrt=None, grad=None, seed=0, train=False,
                     arg_names=tuple(binding.leading_names) + ("x",), promote=True)
    prepared = a.prepare(spec)
    x0 = np.array(prepared.x0, dtype=np.float64, copy=True)
    at_source = mapped.at_source() if mapped is not None else {}
    for leaf in prepared.leaves:
        name = binding.names.get(leaf.name, leaf.name)
        if name in at_source:
            x0[leaf.slice] = at_source[name].reshape(-1)
    prepared.x0 = x0
    with prepared.session():
        flat = prepared.evaluate(x0[None, :])[0]
    (spec_out,) = prepared.output_specs
    out = np.asarray(flat[spec_out.slice]).reshape(spec_out.shape)
    gradients: Dict[str, np.ndarray] = {}
    if cotangent is not None:
        with prepared.session():
            vjp = prepared.vjp(cotangent.reshape(1, -1))[0]
        for leaf in prepared.leaves:
            if leaf.kind == "param" or leaf.name.startswith("params"):
                gradients[binding.names.get(leaf.name, leaf.name)] = vjp[leaf.slice].reshape(leaf.shape)
        if mapped is not None:
            gradients = mapped.gradients_to_source(gradients)
    return out, gradients


# --- the models: the same MLP with LayerNorm in torch, Keras and JAX ---

def torch_mlp(sequential: bool = False) -> Any:
    require_backend("torch")
    import torch

    torch.manual_seed(0)
    if sequential:
        return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4, eps=EPS), torch.nn.Tanh(),
                                   torch.nn.Linear(4, 2))

    class MLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(3, 4)
            self.ln = torch.nn.LayerNorm(4, eps=EPS)
            self.fc2 = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.fc2(torch.tanh(self.ln(self.fc1(x))))

    return MLP()


def keras_mlp(names: Tuple[str, ...] = ("fc1", "ln", "fc2"), extra: bool = False) -> Any:
    require_backend("tensorflow")
    import keras

    layers = [keras.Input((3,)), keras.layers.Dense(4, name=names[0]),
              keras.layers.LayerNormalization(epsilon=EPS, name=names[1]), keras.layers.Activation("tanh"),
              keras.layers.Dense(2, name=names[2])]
    if extra:
        layers.append(keras.layers.Dense(2, name="fc3"))
    return keras.Sequential(layers, name="mlp")


def jax_mlp():
    """A JAX function of a flax-style ``variables`` tree (flax's automatic layer names), and its template."""
    require_backend("jax")
    import jax.numpy as jnp

    def f(variables, x):
        p = variables["params"]
        h = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
        mean = h.mean(-1, keepdims=True)
        var = ((h - mean) ** 2).mean(-1, keepdims=True)
        h = (h - mean) / jnp.sqrt(var + EPS) * p["LayerNorm_0"]["scale"] + p["LayerNorm_0"]["bias"]
        return jnp.tanh(h) @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]

    template = {"params": {"Dense_0": {"kernel": np.zeros((3, 4)), "bias": np.zeros(4)},
                           "LayerNorm_0": {"scale": np.zeros(4), "bias": np.zeros(4)},
                           "Dense_1": {"kernel": np.zeros((4, 2)), "bias": np.zeros(2)}}}
    return f, template


def state_dict(model: Any, seed: int = 0) -> Dict[str, np.ndarray]:
    """The module's state_dict as float64 NumPy, floating entries redrawn (LayerNorm's scale away from 1)."""
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(tuple(t.shape)) if t.is_floating_point() else t.numpy().copy())
            for name, t in model.state_dict().items()}


def make_x(shape=(5, 3), seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


# --- the MLP: torch -> Keras and torch -> JAX ---

def test_a_torch_state_dict_reaches_keras_and_jax_in_their_names_and_layouts():
    torch_model, keras_model = torch_mlp(), keras_mlp()
    f_jax, template = jax_mlp()
    params = state_dict(torch_model)
    entries = [entry("torch", torch_model, "torch"), entry("keras", keras_model, "tensorflow"),
               entry("jax", f_jax, "jax")]
    mapped = mapping.map_params(entries, params, templates={"jax": template})

    assert mapped["torch"].identity and all(mapped["torch"].params[n] is params[n] for n in params)
    keras_params = mapped["keras"].params
    assert set(keras_params) == {"fc1.kernel", "fc1.bias", "ln.gamma", "ln.beta", "fc2.kernel", "fc2.bias"}
    np.testing.assert_array_equal(keras_params["fc1.kernel"], params["fc1.weight"].T)
    np.testing.assert_array_equal(keras_params["ln.gamma"], params["ln.weight"])
    assert mapped["keras"].source_of["ln.beta"] == "ln.bias"
    jax_params = mapped["jax"].params
    np.testing.assert_array_equal(jax_params["params.Dense_1.kernel"], params["fc2.weight"].T)
    np.testing.assert_array_equal(jax_params["params.LayerNorm_0.bias"], params["ln.bias"])
    assert jax_params.path("params.LayerNorm_0.scale") == ("params", "LayerNorm_0", "scale")
    assert "fc1.weight -> fc1.kernel (transposed)" in mapped["keras"].note
    assert mapped["torch"].note == ""

    x = make_x()
    cotangent = np.random.default_rng(2).standard_normal((5, 2))
    expected, torch_grads = run_through_adapter("torch", torch_model, mapped["torch"], x, cotangent)
    assert set(torch_grads) == set(params)
    for label, backend, fn in (("keras", "tensorflow", keras_model), ("jax", "jax", f_jax)):
        out, grads = run_through_adapter(backend, fn, mapped[label], x, cotangent)
        np.testing.assert_allclose(out, expected, **TOL, err_msg=label)
        assert set(grads) == set(params), label  # compared under the names in params ...
        for name in params:  # ... in the layout of params
            np.testing.assert_allclose(grads[name], torch_grads[name], **TOL, err_msg=f"{label} {name}")


def test_names_that_do_not_match_pair_by_the_order_of_layers_with_the_same_role():
    """torch's nn.Sequential (0.weight, 1.weight, 3.weight) and a Keras model of automatic names."""
    torch_model, keras_model = torch_mlp(sequential=True), keras_mlp(names=("dense_a", "norm", "dense_b"))
    params = state_dict(torch_model, seed=3)
    mapped = mapping.map_params([entry("torch", torch_model, "torch"), entry("keras", keras_model, "tensorflow")],
                                params)
    assert mapped["keras"].source_of == {"dense_a.kernel": "0.weight", "dense_a.bias": "0.bias",
                                         "norm.gamma": "1.weight", "norm.beta": "1.bias",
                                         "dense_b.kernel": "3.weight", "dense_b.bias": "3.bias"}
    x = make_x()
    expected, _ = run_through_adapter("torch", torch_model, mapped["torch"], x)
    out, _ = run_through_adapter("tensorflow", keras_model, mapped["keras"], x)
    np.testing.assert_allclose(out, expected, **TOL)


def test_keras_weights_map_back_onto_torch():
    """The mapping is symmetric: params in a Keras model's names reach the torch module as a state_dict."""
    torch_model, keras_model = torch_mlp(), keras_mlp()
    rng = np.random.default_rng(4)
    params = {name: rng.standard_normal(tuple(v.shape)) for name, v in
              ((mapping.normalized(v.path.split("/", 1)[1]), v) for v in keras_model.trainable_variables)}
    mapped = mapping.map_params([entry("torch", torch_model, "torch"), entry("keras", keras_model, "tensorflow")],
                                params)
    assert mapped["keras"].identity
    np.testing.assert_array_equal(mapped["torch"].params["fc2.weight"], params["fc2.kernel"].T)
    x = make_x()
    out, _ = run_through_adapter("torch", torch_model, mapped["torch"], x)
    expected, _ = run_through_adapter("tensorflow", keras_model, mapped["keras"], x)
    np.testing.assert_allclose(out, expected, **TOL)


# --- convolution, BatchNorm statistics, channels-last inputs ---

def test_conv_and_batchnorm_torch_nchw_to_keras_nhwc():
    require_backend("torch")
    require_backend("tensorflow")
    import keras
    import torch

    torch_model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, eps=EPS))
    keras_model = keras.Sequential([keras.Input((6, 6, 3)), keras.layers.Conv2D(4, 3, name="conv"),
                                    keras.layers.BatchNormalization(epsilon=EPS, name="bn")], name="net")
    params = state_dict(torch_model, seed=5)
    params["1.running_var"] = np.abs(params["1.running_var"]) + 0.5
    before = [np.array(v.numpy()) for v in keras_model.variables]
    mapped = mapping.map_params([entry("torch", torch_model, "torch"), entry("keras", keras_model, "tensorflow")],
                                params)
    keras_params = mapped["keras"].params
    assert keras_params["conv.kernel"].shape == (3, 3, 3, 4)
    np.testing.assert_array_equal(keras_params["conv.kernel"], np.transpose(params["0.weight"], (2, 3, 1, 0)))
    np.testing.assert_array_equal(keras_params["bn.moving_variance"], params["1.running_var"])
    assert "1.num_batches_tracked" not in mapped["keras"].source_of.values()
    expected_keras = _registry.get_adapter("tensorflow").expected_params(keras_model)
    assert {"bn.moving_mean", "bn.moving_variance"} <= set(expected_keras.optional)

    layout = mapping.channels_last(inputs=(0,), outputs=("out",))
    x = make_x((2, 3, 6, 6), seed=6)  # NCHW, as torch takes it
    cotangent = np.random.default_rng(7).standard_normal((2, 4, 4, 4))
    expected, torch_grads = run_through_adapter("torch", torch_model, mapped["torch"], x, cotangent)
    out, grads = run_through_adapter("tensorflow", keras_model, mapped["keras"], layout.input_to_implementation(0, x),
                                     layout.output_to_implementation("out", cotangent))
    np.testing.assert_allclose(layout.output_from_implementation("out", out), expected, **TOL)
    for name in ("0.weight", "0.bias", "1.weight", "1.bias"):
        np.testing.assert_allclose(grads[name], torch_grads[name], **TOL, err_msg=name)
    assert all(np.array_equal(v.numpy(), b) for v, b in zip(keras_model.variables, before))  # never written


def test_layout_round_trips():
    layout = mapping.channels_last(inputs=("images",), outputs=("out",))
    x = make_x((2, 3, 4, 5))
    there = layout.input_to_implementation("images", x)
    assert there.shape == (2, 4, 5, 3)
    np.testing.assert_array_equal(layout.input_from_implementation("images", there), x)
    back = layout.output_from_implementation("out", layout.output_to_implementation("out", x))
    np.testing.assert_array_equal(back, x)
    assert layout.input_to_implementation("other", x) is x
    volume = make_x((2, 3, 4, 5, 6))
    assert layout.input_to_implementation("images", volume).shape == (2, 4, 5, 6, 3)
    role = mapping.ParamRole(mapping.CONV_KERNEL, mapping.out_in_spatial(5), shape=(8, 3, 2, 4, 5))
    assert role.canonical_shape == (2, 4, 5, 3, 8)
    kernel = make_x(role.shape)
    np.testing.assert_array_equal(mapping.from_canonical(mapping.to_canonical(kernel, role), role), kernel)


# --- what cannot be paired, and explicit names ---

def test_an_unpairable_parameter_is_an_error_naming_it():
    torch_model, keras_model = torch_mlp(), keras_mlp(extra=True)
    params = state_dict(torch_model)
    with pytest.raises(InvalidArgumentError) as info:
        mapping.map_params([entry("torch", torch_model, "torch"), entry("keras", keras_model, "tensorflow")], params)
    message = str(info.value)
    assert "'fc3.kernel'" in message and "no counterpart" in message
    assert "param_map={'keras': {'fc3.kernel': '<name in params>'}}" in message

    with pytest.raises(InvalidArgumentError) as info:  # a torch parameter Keras lacks
        mapping.map_params([entry("torch", torch_model, "torch"), entry("keras", keras_mlp(), "tensorflow")],
                           {**params, **state_dict(_with_extra_linear(torch_model))})
    assert "'extra.weight'" in str(info.value)


def test_a_bias_follows_its_layer_so_a_missing_bias_is_named():
    """Names differ (pairing by order): the kernels pair in order, each bias with its own layer's kernel, so
    the port that forgot the first layer's bias is told exactly which bias has no counterpart."""
    require_backend("tensorflow")
    import keras

    torch_model = torch_mlp(sequential=True)
    keras_model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, use_bias=False, name="dense_a"),
                                    keras.layers.LayerNormalization(epsilon=EPS, name="norm"),
                                    keras.layers.Activation("tanh"), keras.layers.Dense(2, name="dense_b")],
                                   name="nobias")
    with pytest.raises(InvalidArgumentError) as info:
        mapping.map_params([entry("torch", torch_model, "torch"), entry("keras", keras_model, "tensorflow")],
                           state_dict(torch_model))
    message = str(info.value)
    assert "'0.bias' in params (torch's names) (bias of Linear layer '0', shape (4,)) has no counterpart in keras" \
        in message
    assert message.count("no counterpart") == 1 and "'3.bias'" not in message  # dense_b.bias went with 3.weight


def _with_extra_linear(model: Any) -> Any:
    import torch

    model.extra = torch.nn.Linear(2, 2)
    return model


def test_parameters_of_unknown_role_pair_by_name_only():
    require_backend("torch")
    import torch

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones(2))

    source = mapping.ParamRole(None, None, "", (2,))
    roles = adapter("torch").parameter_roles(Scaled())
    assert roles == {"gain": mapping.ParamRole(None, None, "", (2,), True, "Scaled")}
    assert mapping.pair_params({"gain": source}, roles) == {"gain": "gain"}
    with pytest.raises(InvalidArgumentError, match=r"'gain'.*its role is unknown, so it pairs by name only"):
        mapping.pair_params({"alpha": source}, roles, target_label="torch")


def test_an_explicit_mapping_overrides_names_and_order():
    require_backend("torch")
    import torch

    torch_model = torch.nn.Sequential()
    torch_model.add_module("fc1", torch.nn.Linear(3, 3))
    torch_model.add_module("fc2", torch.nn.Linear(3, 3))
    keras_model = _keras_square("fc1", "fc2")
    params = state_dict(torch_model, seed=8)
    entries = [entry("torch", torch_model, "torch"), entry("keras", keras_model, "tensorflow")]
    swap = {"fc1.kernel": "fc2.weight", "fc2.kernel": "fc1.weight", "fc1.bias": "fc2.bias", "fc2.bias": "fc1.bias"}
    mapped = mapping.map_params(entries, params, overrides={"keras": swap})
    assert mapped["keras"].source_of == swap
    np.testing.assert_array_equal(mapped["keras"].params["fc1.kernel"], params["fc2.weight"].T)
    plain = mapping.map_params(entries, params)
    np.testing.assert_array_equal(plain["keras"].params["fc1.kernel"], params["fc1.weight"].T)

    with pytest.raises(InvalidArgumentError, match=r"param_map maps 'fc1.kernel' to 'fc9.weight', which is not"):
        mapping.map_params(entries, params, overrides={"keras": {"fc1.kernel": "fc9.weight"}})
    with pytest.raises(InvalidArgumentError, match=r"param_map names 'nope.kernel', which keras does not have"):
        mapping.map_params(entries, params, overrides={"keras": {"nope.kernel": "fc1.weight"}})
    with pytest.raises(InvalidArgumentError, match=r"param_map: 'jax' is none of the implementations"):
        mapping.map_params(entries, params, overrides={"jax": {}})


def _keras_square(*names: str) -> Any:
    require_backend("tensorflow")
    import keras

    return keras.Sequential([keras.Input((3,))] + [keras.layers.Dense(3, name=n) for n in names], name="square")


def test_params_no_implementation_owns_cannot_be_converted():
    keras_model = keras_mlp()
    f_jax, template = jax_mlp()
    params = {"w1": np.zeros((4, 3))}
    with pytest.raises(InvalidArgumentError, match=r"no implementation's own, so their layouts are unknown"):
        mapping.map_params([entry("keras", keras_model, "tensorflow"), entry("jax", f_jax, "jax")], params,
                           templates={"jax": template})
    # named explicitly, values of unknown layout pass unchanged (laid out as the implementation takes them)
    square = _keras_square("a")
    given = {"w": make_x((3, 3)), "b": np.ones(3)}
    entries = [entry("keras", square, "tensorflow"), entry("jax", f_jax, "jax")]
    mapped = mapping.map_params(entries, given, overrides={"keras": {"a.kernel": "w", "a.bias": "b"}})
    np.testing.assert_array_equal(mapped["keras"].params["a.kernel"], given["w"])
    assert mapped["jax"].params.keys() == given.keys()  # a plain function takes params as given


# --- nested params for JAX (issue 16, item 6) ---

def test_a_nested_params_tree_reaches_a_jax_function_as_a_tree():
    jax_adapter = adapter("jax")
    import jax.numpy as jnp

    f_jax, template = jax_mlp()
    rng = np.random.default_rng(9)
    tree = {"params": {layer: {leaf: rng.standard_normal(v.shape) for leaf, v in leaves.items()}
                       for layer, leaves in template["params"].items()}}
    flat = mapping.flat_params(tree)  # what gb.compare makes of params=tree: dotted names ...
    assert "params.Dense_0.kernel" in flat
    given = mapping.keep_structure(dict(flat), tree)  # ... remembering the nesting
    binding = jax_adapter.bind_params(f_jax, given)
    (native,) = binding.leading_args
    assert isinstance(native["params"]["LayerNorm_0"], dict)
    assert native["params"]["Dense_1"]["kernel"].dtype == jnp.float64
    assert binding.names["params['params']['Dense_0']['kernel']"] == "params.Dense_0.kernel"
    assert set(binding.names.values()) == set(flat)

    nested = jax_adapter.bind_params(f_jax, tree)  # a nested mapping given as it is
    assert set(nested.leading_args[0]["params"]) == {"Dense_0", "LayerNorm_0", "Dense_1"}
    plain = jax_adapter.bind_params(f_jax, dict(flat))  # a flat mapping stays flat (as before)
    assert "params.Dense_0.kernel" in plain.leading_args[0]

    # the nested params are the source: torch gets them in its names and layouts, the same outputs come out
    torch_model = torch_mlp()
    entries = [entry("torch", torch_model, "torch"), entry("jax", f_jax, "jax")]
    mapped = mapping.map_params(entries, given)
    assert mapped["jax"].identity and mapped["jax"].params.nested
    np.testing.assert_array_equal(mapped["torch"].params["fc1.weight"], tree["params"]["Dense_0"]["kernel"].T)
    x = make_x()
    expected, _ = run_through_adapter("jax", f_jax, mapped["jax"], x)
    out, _ = run_through_adapter("torch", torch_model, mapped["torch"], x)
    np.testing.assert_allclose(out, expected, **TOL)


def test_slash_and_dot_names_are_the_same_names():
    f_jax, template = jax_mlp()
    jax_adapter = adapter("jax")
    flat = mapping.flat_params(template)
    slashed = {name.replace(".", "/"): value + 1.0 for name, value in flat.items()}
    mapped = mapping.map_params([entry("jax", f_jax, "jax"), entry("keras", keras_mlp(), "tensorflow")], slashed,
                                templates={"jax": template})
    assert mapped["jax"].source_of["params.Dense_0.kernel"] == "params/Dense_0/kernel"
    binding = mapped["jax"].rename(jax_adapter.bind_params(f_jax, mapped["jax"].params))
    assert isinstance(binding.leading_args[0]["params"]["Dense_0"], dict)
    assert binding.names["params['params']['Dense_0']['kernel']"] == "params/Dense_0/kernel"
    assert mapped["keras"].source_of["fc1.kernel"] == "params/Dense_0/kernel"


def test_the_jax_adapter_reads_roles_from_leaf_names():
    jax_adapter = adapter("jax")
    roles = jax_adapter.parameter_roles(None, {
        "params": {"Conv_0": {"kernel": np.zeros((3, 3, 2, 4)), "bias": np.zeros(4)},
                   "BatchNorm_0": {"scale": np.zeros(4), "bias": np.zeros(4)},
                   "Embed_0": {"embedding": np.zeros((10, 4))}},
        "batch_stats": {"BatchNorm_0": {"mean": np.zeros(4), "var": np.zeros(4)}}})
    assert {n: (r.role, r.layer) for n, r in roles.items()} == {
        "params.Conv_0.kernel": (mapping.CONV_KERNEL, "Conv_0"), "params.Conv_0.bias": (mapping.BIAS, "Conv_0"),
        "params.BatchNorm_0.scale": (mapping.NORM_SCALE, "BatchNorm_0"),
        "params.BatchNorm_0.bias": (mapping.NORM_OFFSET, "BatchNorm_0"),
        "params.Embed_0.embedding": (mapping.EMBEDDING, "Embed_0"),
        "batch_stats.BatchNorm_0.mean": (mapping.NORM_MEAN, "BatchNorm_0"),
        "batch_stats.BatchNorm_0.var": (mapping.NORM_VARIANCE, "BatchNorm_0")}
    assert jax_adapter.parameter_roles(None, {"w1": np.zeros(3)}) is None
    assert jax_adapter.parameter_roles(None) is None


def test_the_adapters_offer_the_capability():
    for name in ("torch", "tensorflow", "jax"):
        assert isinstance(adapter(name), mapping.ParameterRoles), name
    assert adapter("torch").parameter_roles(lambda x: x) is None
    assert adapter("tensorflow").parameter_roles(lambda x: x) is None


# --- through gb.compare: one state_dict, three frameworks ---

def test_gb_compare_takes_one_state_dict_for_torch_keras_and_jax():
    torch_model, keras_model = torch_mlp(), keras_mlp()
    f_jax, template = jax_mlp()
    params = state_dict(torch_model)
    comparison = gb.compare({"torch": torch_model, "keras": keras_model, "jax": f_jax}, make_x(), params=params,
                            param_templates={"jax": template})
    assert comparison.passed, str(comparison)
    assert any("transposed" in note for note in comparison.notes), comparison.notes
    assert {p.leaf for p in comparison.pairs if p.quantity == "gradient"} >= {"fc1.weight", "ln.weight", "fc2.bias"}


def test_gb_compare_with_the_mapping_still_flags_a_porting_bug():
    require_backend("tensorflow")
    import keras

    torch_model = torch_mlp()
    buggy = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="fc1"),
                              keras.layers.LayerNormalization(epsilon=1e-3, name="ln"),  # torch's is 1e-5
                              keras.layers.Activation("tanh"), keras.layers.Dense(2, name="fc2")], name="mlp")
    comparison = gb.compare({"torch": torch_model, "keras": buggy}, make_x(), params=state_dict(torch_model))
    assert not comparison.passed
    assert any(not p.passed and p.quantity == "value" for p in comparison.pairs), str(comparison)
