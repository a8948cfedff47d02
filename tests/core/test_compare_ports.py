"""gb.compare on realistic ports between torch, JAX and Keras/TensorFlow: no false alarms on correct ports (an
implementation computing in float32 inside, TensorFlow's float64 exact GELU, dict outputs in another key order,
outputs and gradients that are zero up to round-off), while the usual porting bugs are still flagged.

Every test runs the real frameworks (no mocks). The port is a small classifier head with torch's parameter names
and layouts (weight (out, in)), shared through ``params=``:

    probs = softmax(fc2(gelu(layer_norm(fc1(x)))), axis=-1),  fc1 square (4 -> 4), fc2 (4 -> 3)

built as a torch ``nn.Module``, a JAX function of the parameter dict and a Keras model of custom layers.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import numpy as np
import pytest

import gradbridge as gb
from backend_matrix import require_backend

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# the seeded porting bugs (each a real one seen in ports)
UNTRANSPOSED = "untransposed square kernel"  # x @ W instead of x @ W.T for fc1 (4 x 4, so the shapes fit)
SOFTMAX_AXIS = "softmax over the wrong axis"
LN_EPS = "LayerNorm eps 1e-3 instead of 1e-5"
GELU_TANH = "GELU tanh approximation instead of exact"
NO_BIAS = "fc2's bias forgotten"
WEIGHT_OFF = "one weight 1e-4 off (relative)"
BUGS = (UNTRANSPOSED, SOFTMAX_AXIS, LN_EPS, GELU_TANH, NO_BIAS, WEIGHT_OFF)


def make_params(seed: int = 0) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"fc1.weight": rng.standard_normal((4, 4)) / 2, "fc1.bias": rng.standard_normal(4) / 4,
            "ln.weight": 1 + rng.standard_normal(4) / 4, "ln.bias": rng.standard_normal(4) / 4,
            "fc2.weight": rng.standard_normal((3, 4)), "fc2.bias": rng.standard_normal(3)}


def make_x(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((6, 4))


def _eps(bug: Optional[str]) -> float:
    return 1e-3 if bug == LN_EPS else 1e-5


def _off(bug: Optional[str]) -> np.ndarray:
    """The factor the WEIGHT_OFF port multiplies fc2.weight by (1 + 1e-4 at one element)."""
    factor = np.ones((3, 4))
    if bug == WEIGHT_OFF:
        factor[1, 2] += 1e-4
    return factor


# --- torch: an nn.Module with state_dict names ---

def torch_port(bug: Optional[str] = None, float32: Optional[str] = None):
    """``float32="out"``: computes and returns float32; ``"inside"``: casts to float32 inside and back to float64."""
    require_backend("torch")
    import torch

    class Port(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(4, 4)
            self.ln = torch.nn.LayerNorm(4, eps=_eps(bug))
            self.fc2 = torch.nn.Linear(4, 3)

        def forward(self, x):
            cast = (lambda t: t.float()) if float32 else (lambda t: t)
            w1 = cast(self.fc1.weight)
            h = cast(x) @ (w1 if bug == UNTRANSPOSED else w1.T) + cast(self.fc1.bias)
            h = torch.nn.functional.layer_norm(h, (4,), cast(self.ln.weight), cast(self.ln.bias), _eps(bug))
            h = torch.nn.functional.gelu(h, approximate="tanh" if bug == GELU_TANH else "none")
            w2 = cast(self.fc2.weight) * torch.tensor(_off(bug), dtype=h.dtype)
            y = h @ w2.T + (0.0 if bug == NO_BIAS else cast(self.fc2.bias))
            probs = torch.softmax(y, dim=0 if bug == SOFTMAX_AXIS else -1)
            return probs.double() if float32 == "inside" else probs

    return Port()


# --- JAX: a function of the parameter dict ---

def jax_port(bug: Optional[str] = None):
    require_backend("jax")
    import jax
    import jax.numpy as jnp

    def port(params, x):
        w1 = params["fc1.weight"]
        h = x @ (w1 if bug == UNTRANSPOSED else w1.T) + params["fc1.bias"]
        mean = h.mean(-1, keepdims=True)
        var = ((h - mean) ** 2).mean(-1, keepdims=True)
        h = (h - mean) / jnp.sqrt(var + _eps(bug)) * params["ln.weight"] + params["ln.bias"]
        h = jax.nn.gelu(h, approximate=bug == GELU_TANH)
        y = h @ (params["fc2.weight"] * _off(bug)).T + (0.0 if bug == NO_BIAS else params["fc2.bias"])
        return jax.nn.softmax(y, axis=0 if bug == SOFTMAX_AXIS else -1)

    return port


# --- Keras: a model of custom layers whose variables are named as torch's (fc1/weight ...) ---

def keras_port(bug: Optional[str] = None, float32: bool = False):
    """``float32``: the model casts its input and weights to float32 inside (its output is float32)."""
    require_backend("tensorflow")
    import keras
    import tensorflow as tf

    cast = (lambda t: tf.cast(t, tf.float32)) if float32 else (lambda t: t)

    class Linear(keras.layers.Layer):
        def __init__(self, n_in: int, n_out: int, untransposed: bool = False, factor=None, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.weight = self.add_weight(name="weight", shape=(n_out, n_in))
            self.bias = self.add_weight(name="bias", shape=(n_out,), initializer="zeros")
            self.untransposed, self.factor = untransposed, factor

        def call(self, x, use_bias: bool = True):
            w = cast(self.weight)
            if self.factor is not None:
                w = w * tf.constant(self.factor, w.dtype)
            y = tf.matmul(x, w, transpose_b=not self.untransposed)
            return y + cast(self.bias) if use_bias else y

    class LayerNorm(keras.layers.Layer):
        def __init__(self, n: int, epsilon: float, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.weight = self.add_weight(name="weight", shape=(n,), initializer="ones")
            self.bias = self.add_weight(name="bias", shape=(n,), initializer="zeros")
            self.epsilon = epsilon

        def call(self, h):
            mean, var = tf.nn.moments(h, axes=[-1], keepdims=True)
            return (h - mean) * tf.math.rsqrt(var + self.epsilon) * cast(self.weight) + cast(self.bias)

    class Port(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = Linear(4, 4, untransposed=bug == UNTRANSPOSED, name="fc1")
            self.ln = LayerNorm(4, _eps(bug), name="ln")
            self.fc2 = Linear(4, 3, factor=_off(bug), name="fc2")

        def call(self, x):
            h = tf.nn.gelu(self.ln(self.fc1(cast(x))), approximate=bug == GELU_TANH)
            return tf.nn.softmax(self.fc2(h, use_bias=bug != NO_BIAS), axis=0 if bug == SOFTMAX_AXIS else -1)

    model = Port()
    model(np.zeros((1, 4), np.float32))
    return model


# --- correct ports agree ---

def test_correct_ports_in_torch_jax_and_keras_agree_with_exact_gelu():
    """The central porting scenario: TensorFlow's float64 exact GELU is ~5e-9 off, which is not a porting bug."""
    comparison = gb.compare({"torch": torch_port(), "jax": jax_port(), "keras": keras_port()}, make_x(),
                            params=make_params())

    assert comparison.passed, str(comparison)
    assert len(comparison.pairs) == 3 * 8  # per pair: the value of probs, the gradients of x and 6 parameters
    assert {p.leaf for p in comparison.pairs if p.quantity == "gradient"} == {"x", *make_params()}
    assert any("float64" in note for note in comparison.notes)
    assert not any("float32" in note for note in comparison.notes)
    # the rule that decided: the accuracy float64 ports share, not a constant of its own
    assert "both compute in float64" in comparison.tolerance
    assert all(2e-7 < p.rtol < 3e-7 for p in comparison.pairs)


def test_exact_gelu_in_tensorflow_agrees_with_torch():
    require_backend("torch")
    require_backend("tensorflow")
    import tensorflow as tf
    import torch

    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((8, 5)) * 2, rng.standard_normal((5, 5))

    def gelu_torch(x, w):
        return torch.nn.functional.gelu(x @ w.T)

    def gelu_tf(x, w):
        return tf.nn.gelu(tf.matmul(x, w, transpose_b=True), approximate=False)

    comparison = gb.compare({"torch": gelu_torch, "tensorflow": gelu_tf}, x, w)
    assert comparison.passed, str(comparison)
    assert "both compute in float64" in comparison.tolerance
    scalar = gb.compare({"torch": lambda x, w: gelu_torch(x, w).sum(),
                         "tensorflow": lambda x, w: tf.reduce_sum(gelu_tf(x, w))}, x, w, own_check=False)
    assert scalar.passed, str(scalar)


def test_keras_port_computing_in_float32_agrees_and_the_report_says_so():
    comparison = gb.compare({"torch": torch_port(), "jax": jax_port(), "keras": keras_port(float32=True)},
                            make_x(), params=make_params(), own_check=False)

    assert all(p.passed for p in comparison.pairs), str(comparison)
    assert comparison.passed, str(comparison)
    text = str(comparison)
    (note,) = [n for n in comparison.notes if "float32" in n]
    assert "keras" in note and "torch" in note and "jax" in note and "float64" in note
    assert "keras" in comparison.tolerance and "float32" in comparison.tolerance
    assert "every implementation ran in float64" not in text
    # the float64 pair keeps the tight float64 tolerance; pairs with keras follow float32
    rtols = {frozenset((p.first, p.second)): p.rtol for p in comparison.pairs}
    assert rtols[frozenset(("torch", "jax"))] < 1e-6 <= rtols[frozenset(("torch", "keras"))] < 3e-5


def test_torch_port_casting_to_float32_inside_and_back_agrees_and_is_named():
    """The outputs are float64 again, so only the measurement tells: when every input moves by a small fraction of
    a float32 rounding, they do not move as a float64 computation's would (they stay put or jump)."""
    comparison = gb.compare({"torch32": gb.Implementation(torch_port(float32="inside"), backend="torch"),
                             "jax": jax_port(), "torch": torch_port()}, make_x(), params=make_params(),
                            own_check=False)

    assert comparison.passed, str(comparison)
    (note,) = [n for n in comparison.notes if "float32" in n]
    assert "torch32" in note
    assert "'torch32'" in comparison.tolerance or "torch32" in comparison.tolerance


def test_a_float32_port_through_saturated_tanh_agrees():
    """XLA's float32 tanh is exactly 1 from |x| ~ 8 (correctly rounded it is 1 - 1.2e-7 there), so its 1 - tanh^2
    is 0 instead of ~2e-7: the gradient entries through saturated units are off by a float32 rounding of the leaf's
    scale, which no input move can show (tanh is flat there). A float32 side is judged against each leaf's largest
    entry, so this correct port agrees; measured as a false alarm before."""
    require_backend("torch")
    import jax.numpy as jnp
    import torch

    x = np.array([[8.33, 0.4, -1.1], [-9.0, 0.7, 8.6], [0.2, -0.3, 1.5]])
    v = np.random.default_rng(5).normal(size=(3, 2))

    def torch_f(x, v):
        return torch.tanh(x) @ v

    def jax_f32(x, v):
        return (jnp.tanh(x.astype(jnp.float32)) @ v.astype(jnp.float32)).astype(jnp.float64)

    comparison = gb.compare({"torch": torch_f, "jax": jax_f32}, x, v, own_check=False, points=1)
    assert comparison.passed, str(comparison)
    assert "jax computes in float32" in comparison.tolerance


def test_dict_outputs_in_another_key_order_compare_by_name():
    """torch and TensorFlow keep a dict's insertion order, JAX sorts the keys: the same outputs by name."""
    require_backend("torch")
    require_backend("jax")
    require_backend("tensorflow")
    import jax
    import jax.numpy as jnp
    import tensorflow as tf
    import torch

    def torch_heads(x, w):
        logits = x @ w
        return {"probs": torch.softmax(logits, -1), "loss": torch.logsumexp(logits, -1).sum()}

    def jax_heads(x, w):
        logits = x @ w
        return {"probs": jax.nn.softmax(logits, -1), "loss": jax.nn.logsumexp(logits, -1).sum()}

    def tf_heads(x, w):
        logits = tf.matmul(x, w)
        return {"probs": tf.nn.softmax(logits, -1), "loss": tf.reduce_sum(tf.reduce_logsumexp(logits, -1))}

    rng = np.random.default_rng(2)
    comparison = gb.compare({"torch": torch_heads, "jax": jax_heads, "tensorflow": tf_heads},
                            rng.standard_normal((5, 4)), rng.standard_normal((4, 3)))

    assert comparison.mismatches == [], comparison.mismatches
    assert comparison.passed, str(comparison)
    assert {p.leaf for p in comparison.pairs if p.quantity == "value"} == {"out['probs']", "out['loss']"}
    del jnp


def test_kl_of_a_distribution_with_itself_is_zero_up_to_round_off_and_agrees():
    """KL(p || p): the value and every gradient are zero mathematically; each framework's round-off differs."""
    require_backend("torch")
    require_backend("jax")
    import jax
    import jax.numpy as jnp
    import torch

    def kl_torch(a, b):
        p = torch.softmax(a, -1)
        return (p * (torch.log(p) - torch.log_softmax(b, -1))).sum()

    def kl_jax(a, b):
        return jnp.sum(jax.nn.softmax(a, -1) * (jax.nn.log_softmax(a, -1) - jnp.log(jax.nn.softmax(b, -1))))

    a = np.random.default_rng(4).standard_normal((3, 7)) * 3
    comparison = gb.compare({"torch": kl_torch, "jax": kl_jax}, a, a.copy(), own_check=False)

    assert comparison.passed, str(comparison)
    assert max(abs(p.first_value) + abs(p.second_value) for p in comparison.pairs) < 1e-12
    assert not any("float32" in note for note in comparison.notes)  # round-off noise is not taken for a cast


def test_reconstruction_residual_that_is_zero_up_to_round_off_agrees():
    """x - decode(encode(x)): values and gradients are zero mathematically, round-off of each framework's solve."""
    require_backend("torch")
    require_backend("jax")
    import jax.numpy as jnp
    import torch

    def residual_torch(x, w):
        return x - (x @ w) @ torch.linalg.inv(w)

    def residual_jax(x, w):
        return x - jnp.linalg.solve(w.T, (x @ w).T).T

    rng = np.random.default_rng(6)
    x, w = rng.standard_normal((5, 4)) * 10, rng.standard_normal((4, 4)) + 3 * np.eye(4)
    comparison = gb.compare({"torch": residual_torch, "jax": residual_jax}, x, w, own_check=False)

    assert comparison.passed, str(comparison)
    assert all(p.max_abs_diff < 1e-10 for p in comparison.pairs)
    assert not any("float32" in note for note in comparison.notes)


def test_user_tolerances_are_used_exactly_and_said():
    comparison = gb.compare({"torch": torch_port(), "jax": jax_port()}, make_x(), params=make_params(),
                            rtol=1e-3, atol=1e-9, own_check=False)

    assert comparison.passed
    assert all(p.rtol == 1e-3 for p in comparison.pairs)
    assert "rtol = 0.001" in comparison.tolerance and "atol = 1e-09" in comparison.tolerance
    assert "given" in comparison.tolerance


# --- seeded porting bugs are still flagged ---

@pytest.mark.parametrize("buggy", ["jax", "keras"])
@pytest.mark.parametrize("bug", BUGS)
def test_seeded_porting_bugs_differ(bug, buggy):
    builders = {"torch": torch_port, "jax": jax_port, "keras": keras_port}
    implementations = {name: build(bug if name == buggy else None) for name, build in builders.items()}
    comparison = gb.compare(implementations, make_x(), params=make_params(), own_check=False)

    assert not comparison.passed, str(comparison)
    assert comparison.failures and all(buggy in (p.first, p.second) for p in comparison.failures), str(comparison)
    others = {p.second if p.first == buggy else p.first for p in comparison.failures}
    assert others == {"torch", "jax", "keras"} - {buggy}  # the bug shows against both correct ports


@pytest.mark.parametrize("bug", BUGS)
def test_seeded_porting_bugs_differ_also_against_a_float32_port(bug):
    """A float32 side loosens the tolerance of its pairs only as far as float32 needs: the bugs still show."""
    comparison = gb.compare({"keras32": gb.Implementation(keras_port(float32=True), backend="tensorflow"),
                             "jax": jax_port(bug)}, make_x(), params=make_params(), own_check=False)

    assert not comparison.passed, str(comparison)


def test_an_implementation_whose_outputs_change_between_calls_is_not_measured():
    """Noise that is not round-off (state that changes between calls) would be taken for the round-off of a huge
    magnitude: such an implementation is judged by its entries' own sizes, and the notes say why."""
    require_backend("torch")
    import itertools

    calls = itertools.count()

    def drifting(x):
        return x * (1 + 1e-9 * next(calls))

    comparison = gb.compare({"torch": drifting, "numpy": (lambda x: x * 1.0, lambda cotangent, x: cotangent)},
                            make_x(), own_check=False)

    assert any(n.startswith("torch: its round-off was not measured: two calls at the same point give different")
               for n in comparison.notes), comparison.notes
    assert comparison.checks == {} and all(p.max_rel_diff < 1e-7 for p in comparison.pairs)
