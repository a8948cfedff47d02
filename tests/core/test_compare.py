"""gb.compare: one function ported to torch, JAX, TensorFlow/Keras, NumPy and autograd, compared in float64.

Every test runs the real frameworks (no mocks). The model is a small MLP with parameters named
``fc1.weight``, ``fc1.bias``, ``fc2.weight``, ``fc2.bias`` (torch's Linear layout, weight (out, in)):

    y = act(x @ fc1.weight.T + fc1.bias) @ fc2.weight.T + fc2.bias;   loss = sum(y ** 2)

Each framework's port is built by a ``*_mlp`` helper, optionally with a seeded bug:

* ``"backward"``: the activation's hand-written derivative is wrong (``1 - tanh`` instead of ``1 - tanh^2``)
  in a custom backward (torch ``autograd.Function``, ``jax.custom_vjp``, ``tf.custom_gradient``, the
  NumPy ``grad``, an autograd ``primitive`` with ``defvjp``), the forward is right;
* ``"forward"``: the port forgets ``fc1.bias`` (its autodiff gradient is consistent with that wrong forward).
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Callable, Dict, Optional

import numpy as np
import pytest

import gradbridge as gb
from gradbridge import _hooks

from kit_torch import tanh_function
from backend_matrix import require_backend

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BACKWARD, FORWARD = "backward", "forward"
PARAM_NAMES = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


def make_params(seed: int = 0) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"fc1.weight": rng.standard_normal((4, 3)), "fc1.bias": rng.standard_normal(4),
            "fc2.weight": rng.standard_normal((2, 4)), "fc2.bias": rng.standard_normal(2)}


def make_x(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((5, 3))


# --- NumPy port: (f, grad), with the flat parameter dict first ---

def numpy_mlp(bug: Optional[str] = None, vector: bool = False):
    """``(f, grad)``; ``grad(params, x)`` for the scalar loss, ``grad(cotangent, params, x)`` for ``vector``."""

    def forward(params, x):
        pre = x @ params["fc1.weight"].T + (0.0 if bug == FORWARD else params["fc1.bias"])
        h = np.tanh(pre)
        return h, h @ params["fc2.weight"].T + params["fc2.bias"]

    def f(params, x):
        y = forward(params, x)[1]
        return y if vector else np.sum(y ** 2)

    def pullback(gy, params, x):
        h, _ = forward(params, x)
        derivative = (1 - h) if bug == BACKWARD else (1 - h ** 2)
        ga = (gy @ params["fc2.weight"]) * derivative
        grads = {"fc1.weight": ga.T @ x, "fc1.bias": ga.sum(0) * (0.0 if bug == FORWARD else 1.0),
                 "fc2.weight": gy.T @ h, "fc2.bias": gy.sum(0)}
        return grads, ga @ params["fc1.weight"]

    if vector:
        return f, lambda cotangent, params, x: pullback(cotangent, params, x)
    return f, lambda params, x: pullback(2 * forward(params, x)[1], params, x)


# --- torch port: an nn.Module (state_dict names), the activation a custom autograd.Function ---

def torch_mlp(bug: Optional[str] = None, vector: bool = False):
    require_backend("torch")
    import torch

    Tanh = tanh_function(wrong_backward=bug == BACKWARD)

    class MLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(3, 4)
            self.fc2 = torch.nn.Linear(4, 2)

        def forward(self, x):
            pre = x @ self.fc1.weight.T if bug == FORWARD else self.fc1(x)
            y = self.fc2(Tanh.apply(pre))
            return y if vector else (y ** 2).sum()

    return MLP()


# --- JAX port: a function of the parameter dict (the pytree), the activation a custom_vjp ---

def jax_mlp(bug: Optional[str] = None, vector: bool = False):
    require_backend("jax")
    import jax
    import jax.numpy as jnp

    @jax.custom_vjp
    def act(a):
        return jnp.tanh(a)

    def act_fwd(a):
        h = jnp.tanh(a)
        return h, h

    def act_bwd(h, g):
        return (g * ((1 - h) if bug == BACKWARD else (1 - h ** 2)),)

    act.defvjp(act_fwd, act_bwd)

    def mlp_jax(params, x):
        pre = x @ params["fc1.weight"].T + (0.0 if bug == FORWARD else params["fc1.bias"])
        y = act(pre) @ params["fc2.weight"].T + params["fc2.bias"]
        return y if vector else jnp.sum(y ** 2)

    return mlp_jax


# --- TensorFlow ports: a plain function of the parameter dict (tf.custom_gradient), and a Keras model ---

def tf_mlp(bug: Optional[str] = None, vector: bool = False):
    require_backend("tensorflow")
    import tensorflow as tf

    @tf.custom_gradient
    def act(a):
        h = tf.tanh(a)

        def grad(g):
            return g * ((1 - h) if bug == BACKWARD else (1 - h ** 2))

        return h, grad

    def mlp_tf(params, x):
        pre = tf.matmul(x, params["fc1.weight"], transpose_b=True)
        if bug != FORWARD:
            pre = pre + params["fc1.bias"]
        y = tf.matmul(act(pre), params["fc2.weight"], transpose_b=True) + params["fc2.bias"]
        return y if vector else tf.reduce_sum(y ** 2)

    return mlp_tf


def keras_mlp(vector: bool = False):
    """A built Keras model whose variables are ``fc1/weight`` ... (float32, Keras' default)."""
    require_backend("tensorflow")
    import tensorflow as tf
    import keras

    class Linear(keras.layers.Layer):
        def __init__(self, n_in: int, n_out: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.weight = self.add_weight(name="weight", shape=(n_out, n_in))
            self.bias = self.add_weight(name="bias", shape=(n_out,), initializer="zeros")

        def call(self, x):
            return tf.matmul(x, self.weight, transpose_b=True) + self.bias

    class KerasMLP(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = Linear(3, 4, name="fc1")
            self.fc2 = Linear(4, 2, name="fc2")

        def call(self, x):
            y = self.fc2(tf.tanh(self.fc1(x)))
            return y if vector else tf.reduce_sum(y ** 2)

    model = KerasMLP()
    model(np.zeros((1, 3), np.float32))
    return model


# --- autograd port: a function of the parameter dict, the activation an autograd primitive with defvjp ---

def autograd_mlp(bug: Optional[str] = None, vector: bool = False):
    require_backend("autograd")
    import autograd.numpy as anp
    from autograd.extend import defvjp, primitive

    @primitive
    def act(a):
        return anp.tanh(a)

    def act_vjp(h, a):
        return lambda g: g * ((1 - h) if bug == BACKWARD else (1 - h ** 2))

    defvjp(act, act_vjp)

    def mlp_autograd(params, x):
        pre = anp.dot(x, anp.transpose(params["fc1.weight"])) + (0.0 if bug == FORWARD else params["fc1.bias"])
        y = anp.dot(act(pre), anp.transpose(params["fc2.weight"])) + params["fc2.bias"]
        return y if vector else anp.sum(y ** 2)

    return mlp_autograd


BUILDERS: Dict[str, Callable[..., Any]] = {"numpy": numpy_mlp, "torch": torch_mlp, "jax": jax_mlp,
                                           "tensorflow": tf_mlp, "autograd": autograd_mlp}


def references(buggy: str) -> list:
    """Two correct implementations from other frameworks than ``buggy`` (NumPy is always cheap)."""
    return ["torch", "jax"] if buggy == "numpy" else ["numpy", "jax" if buggy == "torch" else "torch"]


def pairs_of(comparison: gb.Comparison, quantity: str, leaf: str):
    return [p for p in comparison.pairs if p.quantity == quantity and p.leaf == leaf]


def involving(comparison: gb.Comparison, label: str):
    return [p for p in comparison.pairs if label in (p.first, p.second)]


def verdicts_about(comparison: gb.Comparison, label: str):
    return [v for v in comparison.verdicts if v.startswith(f"{label}:")]


# --- correct ports agree ---

def test_correct_ports_agree_across_all_four_frameworks():
    torch_model = torch_mlp()
    keras_model = keras_mlp()
    params = make_params()
    x = make_x()
    torch_before = {k: v.clone() for k, v in torch_model.state_dict().items()}
    keras_before = [np.array(v.numpy()) for v in keras_model.variables]
    params_before = copy.deepcopy(params)
    seen = []
    _hooks.add_listener(seen.append)
    try:
        comparison = gb.compare({"torch": torch_model, "jax": jax_mlp(), "tensorflow": keras_model,
                                 "numpy": numpy_mlp()}, x, params=params)
    finally:
        _hooks.remove_listener(seen.append)

    assert comparison.passed, str(comparison)
    assert comparison.verdicts == []
    assert comparison.implementations == ["torch", "jax", "tensorflow", "numpy"]
    assert set(comparison.checks) == {"torch", "jax", "tensorflow", "numpy"}
    assert all(report.passed for report in comparison.checks.values())
    # 6 pairs x (1 output value + gradients of x and the four parameters), every leaf by its common name
    assert len(comparison.pairs) == 6 * 6
    assert {p.leaf for p in comparison.pairs if p.quantity == "gradient"} == {"x", *PARAM_NAMES}
    assert max(p.max_rel_diff for p in comparison.pairs) < 1e-12
    assert seen == [comparison]
    # the user's objects are untouched
    assert all(torch_model.state_dict()[k].equal(v) for k, v in torch_before.items())
    assert all(np.array_equal(v.numpy(), before) for v, before in zip(keras_model.variables, keras_before))
    assert all(np.array_equal(params[k], params_before[k]) for k in params)
    # readable and machine-readable
    text = str(comparison)
    assert "PASSED" in text and "torch vs jax" in text and "fc1.weight" in text
    data = json.loads(json.dumps(comparison.to_dict()))
    assert data["passed"] is True and len(data["pairs"]) == 36 and data["checks"]["jax"]["passed"] is True


# --- seeded bugs are caught and attributed to the right side ---

def test_wrong_custom_backward_is_attributed_to_its_framework(backend):
    """A wrong hand-written derivative of tanh in one framework: values agree, that side's gradients of
    everything upstream of the activation disagree, and its own finite-difference check fails there."""
    buggy = backend
    others = references(buggy)
    for name in others:
        require_backend(name)
    implementations = {buggy: BUILDERS[buggy](BACKWARD), **{name: BUILDERS[name]() for name in others}}
    comparison = gb.compare(implementations, make_x(), params=make_params())

    assert not comparison.passed
    assert all(p.passed for p in comparison.pairs if p.quantity == "value")
    upstream = {"x", "fc1.weight", "fc1.bias"}
    failing = {(p.first, p.second, p.leaf) for p in comparison.failures}
    assert {p.leaf for p in comparison.failures} == upstream
    assert all(buggy in pair[:2] for pair in failing)
    assert all(p.passed for p in comparison.pairs if buggy not in (p.first, p.second))
    assert all(p.passed for p in pairs_of(comparison, "gradient", "fc2.weight"))
    assert not comparison.checks[buggy].passed
    assert all(comparison.checks[name].passed for name in others)
    failed_rows = {row.input for row in comparison.checks[buggy].failures}
    assert failed_rows  # named in the framework's own terms (params['fc1.bias'] or fc1.bias)
    (sentence,) = comparison.verdicts
    assert sentence.startswith(f"{buggy}: gradient of ")
    assert "backward pass is wrong" in sentence and "own finite-difference check fails" in sentence
    assert all(f"'{leaf}'" in sentence for leaf in upstream) and all(name in sentence for name in others)
    assert "look at" in sentence


@pytest.mark.parametrize("buggy", ["torch", "jax"])
def test_forward_porting_bug_is_attributed_by_majority(buggy):
    """One port forgets fc1.bias: its values disagree with the two others, its autodiff gradients follow its
    own (wrong) forward, so its own finite-difference check passes and the verdict blames the forward."""
    others = ["numpy", "jax" if buggy == "torch" else "torch"]
    implementations = {buggy: BUILDERS[buggy](FORWARD), **{name: BUILDERS[name]() for name in others}}
    comparison = gb.compare(implementations, make_x(), params=make_params())

    assert not comparison.passed
    value_pairs = pairs_of(comparison, "value", "out")
    assert [p.passed for p in value_pairs] == [buggy not in (p.first, p.second) for p in value_pairs]
    assert all(report.passed for report in comparison.checks.values())
    forward = verdicts_about(comparison, buggy)
    assert len(forward) == 1 and "forward pass is wrong" in forward[0]
    assert all(name in forward[0] for name in others) and "fix the forward first" in forward[0]
    assert not any(verdicts_about(comparison, name) for name in others)
    assert not any("backward pass is wrong" in v for v in comparison.verdicts)


def test_two_implementations_cannot_tell_which_forward_is_wrong():
    comparison = gb.compare({"torch": torch_mlp(FORWARD), "numpy": numpy_mlp()}, make_x(), params=make_params())

    assert not comparison.passed
    assert all(report.passed for report in comparison.checks.values())
    assert any("cannot tell which" in v and "'out'" in v and "third implementation" in v
               for v in comparison.verdicts)
    assert not any(v.startswith(("torch:", "numpy:")) for v in comparison.verdicts)


def test_two_implementations_still_find_a_wrong_backward():
    """With two sides there is no majority, but the own finite-difference check still names the wrong one."""
    comparison = gb.compare({"jax": jax_mlp(BACKWARD), "numpy": numpy_mlp()}, make_x(), params=make_params())

    assert not comparison.passed
    assert len(comparison.verdicts) == 1 and comparison.verdicts[0].startswith("jax: gradient of")
    assert "jax's backward pass is wrong" in comparison.verdicts[0]


def test_small_relative_error_in_a_few_gradient_elements_is_caught():
    """A backward rule 1e-4 off (relative) on three elements of one weight's gradient."""
    require_backend("torch")
    import torch

    class SlightlyOff(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w):
            return w.clone()

        @staticmethod
        def backward(ctx, grad):
            scale = torch.ones_like(grad)
            scale[0, 0] = scale[1, 2] = scale[3, 1] = 1 + 1e-4
            return grad * scale

    def mlp_torch(params, x):
        weight = SlightlyOff.apply(params["fc1.weight"])
        y = torch.tanh(x @ weight.T + params["fc1.bias"]) @ params["fc2.weight"].T + params["fc2.bias"]
        return (y ** 2).sum()

    comparison = gb.compare({"torch": mlp_torch, "jax": jax_mlp(), "numpy": numpy_mlp()}, make_x(),
                            params=make_params())

    assert not comparison.passed
    assert {p.leaf for p in comparison.failures} == {"fc1.weight"}
    for p in pairs_of(comparison, "gradient", "fc1.weight"):
        assert p.passed == ("torch" not in (p.first, p.second))
        if not p.passed:
            assert p.mismatches == 3 and 5e-5 < p.max_rel_diff < 2e-4
            assert p.worst_index in {(0, 0), (1, 2), (3, 1)}
    assert not comparison.checks["torch"].passed
    assert [v for v in comparison.verdicts if "backward pass is wrong" in v] == verdicts_about(comparison, "torch")


def test_small_relative_error_in_a_few_output_values_is_caught():
    """A non-scalar output 1e-4 off (relative) in two elements: a forward bug, named by majority; the
    gradients are vector-Jacobian products with one shared random cotangent."""
    require_backend("jax")

    correct = jax_mlp(vector=True)

    def off(params, x):
        y = correct(params, x)
        return y.at[1, 0].multiply(1 + 1e-4).at[3, 1].multiply(1 - 1e-4)

    comparison = gb.compare({"jax": off, "torch": torch_mlp(vector=True), "numpy": numpy_mlp(vector=True)},
                            make_x(), params=make_params(), own_check=False)

    assert not comparison.passed
    assert any("vector-Jacobian products" in n for n in comparison.notes)
    for p in pairs_of(comparison, "value", "out"):
        assert p.passed == ("jax" not in (p.first, p.second))
        if not p.passed:
            assert p.mismatches == 2 and p.worst_index in {(1, 0), (3, 1)}
    assert p.shape == (5, 2)
    (sentence,) = verdicts_about(comparison, "jax")
    assert "value of 'out' disagrees with torch and numpy" in sentence and "forward pass is wrong" in sentence


def test_without_own_checks_a_wrong_gradient_is_named_by_majority():
    comparison = gb.compare({"numpy": numpy_mlp(), "jax": jax_mlp(), "torch": torch_mlp(BACKWARD)}, make_x(),
                            params=make_params(), own_check=False)

    assert comparison.checks == {}
    assert not comparison.passed
    (sentence,) = comparison.verdicts
    assert sentence.startswith("torch: gradient of ") and "disagrees with numpy and jax" in sentence
    assert all(f"'{leaf}'" in sentence for leaf in ("x", "fc1.weight", "fc1.bias")) and "own_check=True" in sentence


def test_gradients_that_differ_where_values_agree_point_at_the_odd_function():
    """A port adds a term that is exactly zero at the compared point but not nearby: values agree, every own
    check passes (each gradient is right for its own function), and the verdict names the odd one out."""
    require_backend("torch")
    require_backend("jax")
    import jax.numpy as jnp
    import torch

    x0 = make_x()
    anchored = torch.tensor(x0)

    def torch_port(x):
        return (x ** 2).sum() + (x - anchored).sum()

    comparison = gb.compare({"torch": torch_port, "jax": lambda x: jnp.sum(x ** 2),
                             "numpy": (lambda x: np.sum(x ** 2), lambda x: 2 * x)}, x0)

    assert not comparison.passed
    assert all(p.passed for p in comparison.pairs if p.quantity == "value")
    assert all(report.passed for report in comparison.checks.values())
    (sentence,) = comparison.verdicts
    assert sentence.startswith("torch: gradient of 'x' disagrees with jax and numpy")
    assert "values agree" in sentence and "look at torch's forward pass" in sentence


def test_differences_at_a_kink_are_explained_as_subgradient_conventions():
    """abs at 0: torch says 0, JAX says 1, both valid subgradients. With kinks='fail' the own checks fail there
    too. Neither is called a wrong backward pass; options such as kinks= reach the own checks."""
    require_backend("torch")
    require_backend("jax")
    import jax.numpy as jnp
    import torch

    x = np.array([0.0, 1.5, -2.0])
    implementations = {"torch": lambda x: torch.abs(x).sum(), "jax": lambda x: jnp.sum(jnp.abs(x))}
    comparison = gb.compare(implementations, x)

    assert not comparison.passed and all(report.passed for report in comparison.checks.values())
    (pair,) = [p for p in comparison.pairs if not p.passed]
    assert pair.outside == [(0,)] and (pair.first_value, pair.second_value) == (0.0, 1.0)
    # the points drawn around x keep its zero: the same kink, the same element, at every point
    assert all(p.outside == [(0,)] for p in comparison.failures) and len(comparison.failures) == 3
    (sentence,) = comparison.verdicts
    assert "non-differentiable point" in sentence and "different subgradients there (x[0]: 0.0 vs 1.0)" in sentence
    assert "not a wrong gradient" in sentence

    strict = gb.compare(implementations, x, kinks="fail")
    assert not any(report.passed for report in strict.checks.values())
    (sentence,) = strict.verdicts
    assert "the own check of torch and jax fails only there" in sentence and "backward pass" not in sentence


# --- inputs, parameters and labels in other forms ---

def test_inputs_and_params_given_as_torch_tensors_are_converted_for_the_others():
    require_backend("torch")
    import torch

    model = torch_mlp()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}  # float32, as torch makes them
    x = torch.tensor(make_x(), dtype=torch.float32)
    comparison = gb.compare({"torch": model, "jax": jax_mlp(), "numpy": numpy_mlp()}, x, params=state)

    assert comparison.passed, str(comparison)
    assert any("given as torch arrays" in n for n in comparison.notes)
    assert x.dtype == torch.float32 and not x.requires_grad
    assert {p.leaf for p in comparison.pairs if p.quantity == "gradient"} == {"x", *PARAM_NAMES}


def test_labels_that_are_not_backend_names_take_an_implementation():
    require_backend("torch")
    import torch

    def functional(params, x):  # the same model through torch.func.functional_call
        return torch.func.functional_call(reference, params, (x,))

    reference = torch_mlp()
    comparison = gb.compare({"module": gb.Implementation(torch_mlp(), backend="torch"),
                             "functional_call": gb.Implementation(functional, backend="torch"),
                             "np": numpy_mlp()}, make_x(), params=make_params(), own_check=False)

    assert comparison.passed, str(comparison)
    assert comparison.backends["module"].startswith("torch") and comparison.backends["np"].startswith("numpy")
    assert {p.leaf for p in comparison.pairs if p.quantity == "gradient"} == {"x", *PARAM_NAMES}


def test_wrt_narrows_the_compared_gradients():
    comparison = gb.compare({"jax": jax_mlp(), "numpy": numpy_mlp()}, make_x(), params=make_params(), wrt="fc2")

    assert comparison.passed
    assert {p.leaf for p in comparison.pairs if p.quantity == "gradient"} == {"fc2.weight", "fc2.bias"}
    assert all(len(report.rows) == 2 for report in comparison.checks.values())


def test_integer_inputs_and_kwargs_pass_through_converted_and_tuple_outputs_compare_by_name():
    """An index array reaches each framework as its own integer array (never differentiated), kwargs
    arrays are converted too, and each output of a tuple is compared under its name."""
    require_backend("torch")
    require_backend("jax")
    import jax.numpy as jnp
    import torch

    def gather_torch(x, idx, scale):
        assert idx.dtype == torch.int64 and scale.dtype == torch.float64
        return (x[idx] * scale).sum(), torch.sin(x[idx])

    def gather_jax(x, idx, scale):
        assert idx.dtype == jnp.int64 and scale.dtype == jnp.float64
        return (x[idx] * scale).sum(), jnp.sin(x[idx])

    def gather_numpy(x, idx, scale):
        return (x[idx] * scale).sum(), np.sin(x[idx])

    def gather_vjp(cotangent, x, idx, scale):
        g = np.zeros_like(x)
        np.add.at(g, idx, cotangent[0] * scale + cotangent[1] * np.cos(x[idx]))
        return g

    comparison = gb.compare({"torch": gather_torch, "jax": gather_jax, "numpy": (gather_numpy, gather_vjp)},
                            make_x(), np.array([0, 2, 4, 2]), kwargs={"scale": np.array(2.0)})

    assert comparison.passed, str(comparison)
    assert {p.leaf for p in comparison.pairs if p.quantity == "value"} == {"out[0]", "out[1]"}
    assert {p.leaf for p in comparison.pairs if p.quantity == "gradient"} == {"x"}
    assert any("vector-Jacobian" in n for n in comparison.notes)


def test_different_output_structures_are_a_mismatch_and_the_common_outputs_still_compare():
    require_backend("jax")
    import jax.numpy as jnp

    def with_aux(x):
        return (jnp.sum(x ** 2), jnp.tanh(x))

    def loss_only(x):
        return (np.sum(x ** 2),)

    comparison = gb.compare({"jax": with_aux, "numpy": (loss_only, lambda x: 2 * x)},
                            make_x(), own_check=False)

    assert not comparison.passed and all(p.passed for p in comparison.pairs)
    assert [p.leaf for p in comparison.pairs if p.quantity == "value"] == ["out[0]"]
    (mismatch,) = comparison.mismatches
    assert "out[1] (5, 3)" in mismatch and comparison.verdicts == [mismatch]


def test_torch_buffers_may_be_given_and_are_loaded_into_the_copy():
    require_backend("torch")
    import torch

    class Normalized(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3, 2)
            self.bn = torch.nn.BatchNorm1d(2)

        def forward(self, x):
            return self.bn(self.fc(x))

    def normalized(params, x):
        y = x @ params["fc.weight"].T + params["fc.bias"]
        scale = params["bn.weight"] / np.sqrt(params["bn.running_var"] + 1e-5)
        return (y - params["bn.running_mean"]) * scale + params["bn.bias"]

    def normalized_vjp(cotangent, params, x):
        y = x @ params["fc.weight"].T + params["fc.bias"]
        root = np.sqrt(params["bn.running_var"] + 1e-5)
        g = cotangent * params["bn.weight"] / root
        centered = y - params["bn.running_mean"]
        grads = {"fc.weight": g.T @ x, "fc.bias": g.sum(0), "bn.weight": (cotangent * centered / root).sum(0),
                 "bn.bias": cotangent.sum(0), "bn.running_mean": -g.sum(0),
                 "bn.running_var": (-0.5 * g * centered / root ** 2).sum(0)}
        return grads, g @ params["fc.weight"]

    model = Normalized()
    params = {k: v.detach().double().numpy() + 0.5 for k, v in model.state_dict().items()
              if k != "bn.num_batches_tracked"}
    comparison = gb.compare({"torch": model, "numpy": (normalized, normalized_vjp)}, make_x(), params=params)

    assert comparison.passed, str(comparison)
    assert any("'bn.running_mean' is not compared: only numpy differentiates it" in n for n in comparison.notes)
    assert torch.equal(model.bn.running_var, torch.ones(2))  # the module itself was not loaded


@pytest.mark.parametrize("op", ["softmax", "logsumexp", "layernorm", "conv1d", "matmul_chain"])
def test_correct_ports_of_ordinary_ops_never_cry_wolf(op):
    """Large, badly scaled inputs through ops that cancel: rounding differences stay inside the tolerance."""
    require_backend("torch")
    require_backend("jax")
    import jax
    import jax.numpy as jnp
    import torch

    def torch_op(x, w):
        if op == "softmax":
            return torch.softmax(x * 30.0, dim=-1) @ w
        if op == "logsumexp":
            return torch.logsumexp(x * 50.0 + 1e3, dim=0) - 1e3 + w.sum()
        if op == "layernorm":
            return torch.nn.functional.layer_norm(x * 1e3 + 5e3, x.shape[-1:]) * w.sum()
        if op == "conv1d":
            return torch.nn.functional.conv1d(x[None], w[None, :, :3]).squeeze(0)
        return x @ w @ w.T @ x.T

    def jax_op(x, w):
        if op == "softmax":
            return jax.nn.softmax(x * 30.0, axis=-1) @ w
        if op == "logsumexp":
            return jax.scipy.special.logsumexp(x * 50.0 + 1e3, axis=0) - 1e3 + w.sum()
        if op == "layernorm":
            z = x * 1e3 + 5e3
            mean = z.mean(-1, keepdims=True)
            return (z - mean) / jnp.sqrt(((z - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * w.sum()
        if op == "conv1d":
            return jnp.stack([jnp.sum(x[:, i:i + 3] * w[:, :3]) for i in range(x.shape[1] - 2)])[None]
        return x @ w @ w.T @ x.T

    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((6, 6)), rng.standard_normal((6, 6))
    comparison = gb.compare({"torch": torch_op, "jax": jax_op}, x, w, own_check=False)
    assert comparison.passed, str(comparison)


# --- errors ---

def test_missing_extra_and_misshaped_params_name_the_implementation_and_the_parameter():
    params = make_params()
    missing = {k: v for k, v in params.items() if k != "fc2.bias"}
    with pytest.raises(gb.InvalidArgumentError,
                       match=r"implementations\['torch'\].*missing 'fc2.bias' \(shape \(2,\)\)"):
        gb.compare({"torch": torch_mlp(), "numpy": numpy_mlp()}, make_x(), params=missing)
    extra = {**params, "fc3.weight": np.zeros((2, 2))}
    with pytest.raises(gb.InvalidArgumentError, match=r"implementations\['tensorflow'\].*unexpected 'fc3.weight'"):
        gb.compare({"numpy": numpy_mlp(), "tensorflow": keras_mlp()}, make_x(), params=extra)
    misshaped = {**params, "fc1.weight": params["fc1.weight"].T}
    with pytest.raises(gb.InvalidArgumentError,
                       match=r"implementations\['torch'\].*'fc1.weight' has shape \(3, 4\) in params but \(4, 3\)"):
        gb.compare({"torch": torch_mlp(), "numpy": numpy_mlp()}, make_x(), params=misshaped)


def test_a_plain_function_looking_up_a_missing_parameter_gets_a_clear_error():
    params = {k: v for k, v in make_params().items() if k != "fc1.bias"}
    with pytest.raises(gb.InvalidArgumentError, match=r"looked up parameter 'fc1.bias'.*given: 'fc1.weight'"):
        gb.compare({"jax": jax_mlp(), "numpy": numpy_mlp()}, make_x(), params=params)


@pytest.mark.parametrize("implementations, message", [
    ({"mxnet": lambda x: x}, r"implementations\['mxnet'\]: 'mxnet' is not a backend name"),
    ({"jax": 3}, r"implementations\['jax'\]: expected a callable"),
    ({"torch": (np.sin, np.cos)}, r"implementations\['torch'\]: a \(fn, grad\) pair is the NumPy form"),
    ({"numpy": np.sin}, r"implementations\['numpy'\]: NumPy has no automatic differentiation"),
    ({"fused": gb.Implementation(np.sin, backend="caffe")}, r"implementations\['fused'\]: backend: unknown backend"),
    ("not a mapping", r"implementations: expected a mapping"),
])
def test_bad_implementations_are_rejected(implementations, message):
    if isinstance(implementations, dict) and len(implementations) == 1:
        implementations = {**implementations, "reference": numpy_mlp()}
    with pytest.raises(gb.InvalidArgumentError, match=message):
        gb.compare(implementations, make_x())


def test_one_implementation_and_unknown_options_are_rejected():
    with pytest.raises(gb.InvalidArgumentError, match="at least two"):
        gb.compare({"numpy": numpy_mlp()}, make_x(), params=make_params())
    with pytest.raises(gb.InvalidArgumentError, match="promote: not an option of gb.compare"):
        gb.compare({"numpy": numpy_mlp(), "np2": numpy_mlp()}, make_x(), params=make_params(), promote=False)
    with pytest.raises(gb.InvalidArgumentError, match="rtol"):
        gb.compare({"numpy": numpy_mlp(), "np2": numpy_mlp()}, make_x(), params=make_params(), rtol=-1)


def test_user_state_is_unchanged_also_when_an_implementation_raises():
    require_backend("torch")
    require_backend("jax")
    import jax
    import torch

    model = torch_mlp()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = make_params()
    params_before = copy.deepcopy(params)
    x = make_x()
    x_before = x.copy()
    dtype, x64 = torch.get_default_dtype(), jax.config.jax_enable_x64
    rng_state = torch.get_rng_state()

    def broken(params, x):
        raise ValueError("the port is unfinished")

    with pytest.raises(gb.FunctionEvaluationError, match=r"implementations\['jax'\]: fn raised ValueError: the port"):
        gb.compare({"torch": model, "jax": broken}, x, params=params)
    comparison = gb.compare({"torch": model, "numpy": numpy_mlp()}, x, params=params)
    assert comparison.passed

    assert model.training and all(m.training for m in model.modules())
    assert all(model.state_dict()[k].equal(v) and model.state_dict()[k].dtype == torch.float32
               for k, v in before.items())
    assert all(np.array_equal(params[k], params_before[k]) for k in params) and np.array_equal(x, x_before)
    assert torch.get_default_dtype() == dtype and jax.config.jax_enable_x64 == x64
    assert torch.equal(torch.get_rng_state(), rng_state)
