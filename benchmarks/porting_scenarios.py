"""False alarms and missed bugs of ``gb.compare`` on realistic porting scenarios, in one run.

Each scenario is one model (or op) ported across frameworks (torch ``nn.Module``s and ``autograd.Function``s,
Keras models on TensorFlow, JAX functions of the parameter dict, TensorFlow functions with
``tf.custom_gradient``, NumPy ``(f, grad)`` pairs), compared with ``gb.compare`` on float64 NumPy inputs and one
torch ``state_dict``-style ``params`` dict (names like ``fc1.weight``, torch layouts; Keras models get them
through the automatic mapping: Dense kernels transposed, LayerNorm gamma/beta, BatchNorm moving statistics,
conv kernels OIHW -> HWIO). Scenarios come in two kinds:

  correct port  every implementation computes the same function with a correct backward pass (checked by
                reasoning: the same math, only written differently: another framework, another layout,
                another key order, a float32 computation inside, dropout off in eval mode, a custom
                gradient). Failing one (``comparison.passed`` False) is a *false alarm*.
  seeded bug    exactly one implementation carries a real porting bug (an untransposed square kernel, a
                softmax over the wrong axis, a framework's default epsilon, tanh-GELU for exact GELU, a
                forgotten bias, batch statistics in eval mode, padding that differs at stride 2, a wrong
                custom backward, a clamp that only bites at larger inputs, ...). Passing one is a *miss*.

Every seeded bug has three or more implementations, so a majority exists: "blamed right" says whether the
verdict sentences (``comparison.verdicts``) name the buggy label, and only it, as the wrong side: a sentence
that starts with "<label>:" (also after an "at point N (...):" prefix), or says "<label>'s forward pass is
wrong", "<label>'s backward pass ...", or "<label> draws random numbers". Scenarios run with ``layers=True``
also name the layer where the buggy implementation first diverges from the others (the diverging layer's
output for a forward bug; the layer whose backward pass differs, ``LayerDivergence.culprit``, for a backward
bug): "layers named right" counts the buggy scenarios whose expected layer is named in every pair with the
buggy implementation. ``own_check=True`` (each implementation's own finite-difference check) runs where the
blame needs it (the wrong-backward scenarios) and on a few correct ports; elsewhere ``own_check=False``.
``points`` is left at its default (3: the given inputs and two points drawn around them) unless said.

    python benchmarks/porting_scenarios.py                     # every scenario (about 3 minutes on 2 CPU cores)
    python benchmarks/porting_scenarios.py --only batchnorm    # the scenarios whose name contains "batchnorm"
    python benchmarks/porting_scenarios.py --json out.json     # also every outcome, verdicts included

Output: one markdown table (scenario, expected, got, blamed right?, first diverging layer, seconds) and a
summary line (correct ports, false alarms; seeded bugs, misses; blamed correctly; layers named right; total
time). An exception inside a scenario is reported as "error" (and counted apart). The exit code is 0 always:
this is a measurement, not a test. Needs torch, JAX, TensorFlow and Keras 3 installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np

import gradbridge as gb


# --------------------------------------------------------------------------------------- scenario records
@dataclass
class Scenario:
    name: str
    implementations: Dict[str, Any]
    args: Tuple[Any, ...]
    options: Dict[str, Any]          # keyword arguments of gb.compare (params=, layers=, own_check=, ...)
    expect: str                      # "pass" (a correct port) or "fail" (a seeded bug)
    buggy: Optional[str] = None      # the label that carries the bug
    layer: Optional[str] = None      # with layers=True: the layer the bug is in
    bug: str = ""                    # the bug, in words


@dataclass
class Outcome:
    scenario: str
    expect: str
    got: str                         # "pass", "fail" or "error"
    buggy: Optional[str] = None
    bug: str = ""
    blamed: Optional[List[str]] = None   # labels the verdicts name as the wrong side (buggy scenarios)
    blamed_right: Optional[bool] = None
    expected_layer: Optional[str] = None
    found_layer: Optional[str] = None    # where the buggy implementation first diverges ("none": nowhere)
    layer_right: Optional[bool] = None
    seconds: float = 0.0
    verdicts: List[str] = field(default_factory=list)
    layer_sentences: List[str] = field(default_factory=list)
    report: str = ""                     # print(comparison) for a wrong verdict (false alarm or miss)
    error: str = ""

    @property
    def right(self) -> bool:
        return self.got == self.expect


def _lazy_imports() -> Tuple[Any, Any, Any, Any, Any]:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import keras
    import tensorflow as tf
    import torch

    return torch, jax, jnp, tf, keras


# --------------------------------------------------------------------------------------- the MLP
# fc1 (4 -> 5) - tanh - LayerNorm(5) - fc2 (5 -> 5, square) - GELU - out (5 -> 3), torch's names and layouts

def mlp_params(seed: int) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"fc1.weight": rng.standard_normal((5, 4)) / 2, "fc1.bias": rng.standard_normal(5) / 4,
            "norm.weight": 1 + 0.1 * rng.standard_normal(5), "norm.bias": 0.1 * rng.standard_normal(5),
            "fc2.weight": rng.standard_normal((5, 5)) / np.sqrt(5), "fc2.bias": rng.standard_normal(5) / 4,
            "out.weight": rng.standard_normal((3, 5)) / np.sqrt(5), "out.bias": rng.standard_normal(3) / 4}


def mlp_x(seed: int, scale: float = 1.0) -> np.ndarray:
    return scale * np.random.default_rng(100 + seed).standard_normal((6, 4))


def torch_mlp(norm_eps: float = 1e-5, gelu: str = "none", tanh_backward_bug: bool = False,
              float32_inside: bool = False) -> Any:
    torch, *_ = _lazy_imports()
    F = torch.nn.functional

    class Tanh(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            y = torch.tanh(a)
            ctx.save_for_backward(y)
            return y

        @staticmethod
        def backward(ctx, g):
            (y,) = ctx.saved_tensors
            return g * (1 - y) if tanh_backward_bug else g * (1 - y * y)  # the bug: 1 - y instead of 1 - y^2

    class Act(torch.nn.Module):
        def forward(self, a):
            return Tanh.apply(a)

    class MLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(4, 5)
            self.act = Act()
            self.norm = torch.nn.LayerNorm(5, eps=norm_eps)
            self.fc2 = torch.nn.Linear(5, 5)
            self.gelu = torch.nn.GELU(approximate=gelu)
            self.out = torch.nn.Linear(5, 3)

        def forward(self, x):
            if not float32_inside:
                return self.out(self.gelu(self.fc2(self.norm(self.act(self.fc1(x))))))
            c = (lambda t: t.float())  # computes in float32 and hands float64 back
            h = torch.tanh(F.linear(c(x), c(self.fc1.weight), c(self.fc1.bias)))
            h = F.layer_norm(h, (5,), c(self.norm.weight), c(self.norm.bias), norm_eps)
            h = F.gelu(F.linear(h, c(self.fc2.weight), c(self.fc2.bias)), approximate=gelu)
            return F.linear(h, c(self.out.weight), c(self.out.bias)).double()

    return MLP()


def keras_mlp(norm_eps: float = 1e-5, gelu_approximate: bool = False) -> Any:
    *_, keras = _lazy_imports()
    gelu = "gelu" if not gelu_approximate else (lambda t: keras.activations.gelu(t, approximate=True))
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, name="fc1"),
                              keras.layers.Activation("tanh", name="act"),
                              keras.layers.LayerNormalization(epsilon=norm_eps, name="norm"),
                              keras.layers.Dense(5, name="fc2"), keras.layers.Activation(gelu, name="gelu"),
                              keras.layers.Dense(3, name="out")])
    model(np.zeros((1, 4), dtype="float32"))
    return gb.Implementation(model, backend="tensorflow")


def jax_mlp(norm_eps: float = 1e-5, gelu_approximate: bool = False, untransposed: bool = False,
            no_out_bias: bool = False, gelu_backward_bug: bool = False, float32_inside: bool = False) -> Any:
    _, jax, jnp, _, _ = _lazy_imports()
    from jax.scipy.special import erf

    @jax.custom_vjp
    def exact_gelu(a):
        return 0.5 * a * (1 + erf(a / np.sqrt(2)))

    def gelu_fwd(a):
        return exact_gelu(a), a

    def gelu_bwd(a, g):
        cdf = 0.5 * (1 + erf(a / np.sqrt(2)))
        pdf = jnp.exp(-0.5 * a * a) / np.sqrt(2 * np.pi)
        return (g * cdf,) if gelu_backward_bug else (g * (cdf + a * pdf),)  # the bug: the a * pdf term dropped

    exact_gelu.defvjp(gelu_fwd, gelu_bwd)

    def mlp(p, x):
        if float32_inside:
            p = {k: v.astype(jnp.float32) for k, v in p.items()}
            x = x.astype(jnp.float32)
        h = gb.tap("fc1", x @ p["fc1.weight"].T + p["fc1.bias"])
        h = gb.tap("act", jnp.tanh(h))
        mu = h.mean(-1, keepdims=True)
        var = ((h - mu) ** 2).mean(-1, keepdims=True)
        h = gb.tap("norm", (h - mu) / jnp.sqrt(var + norm_eps) * p["norm.weight"] + p["norm.bias"])
        w2 = p["fc2.weight"]
        h = gb.tap("fc2", h @ (w2 if untransposed else w2.T) + p["fc2.bias"])  # the bug: W instead of W.T
        if gelu_backward_bug:
            h = exact_gelu(h)
        else:
            h = jax.nn.gelu(h, approximate=gelu_approximate)
        h = gb.tap("gelu", h)
        y = h @ p["out.weight"].T + (0.0 if no_out_bias else p["out.bias"])
        return y.astype(jnp.float64) if float32_inside else y

    return mlp


def mlp_scenario(name: str, seed: int = 0, scale: float = 1.0, buggy: Optional[str] = None, bug: str = "",
                 layer: Optional[str] = None, torch_kw: Optional[dict] = None, keras_kw: Optional[dict] = None,
                 jax_kw: Optional[dict] = None, **options: Any) -> Scenario:
    implementations = {"torch": torch_mlp(**(torch_kw or {})), "keras": keras_mlp(**(keras_kw or {})),
                       "jax": jax_mlp(**(jax_kw or {}))}
    options.setdefault("own_check", False)
    return Scenario(name, implementations, (mlp_x(seed, scale),), dict(params=mlp_params(seed), **options),
                    "fail" if buggy else "pass", buggy, layer, bug)


# --------------------------------------------------------------------------------------- classifier heads
# head (6 -> 4): cross-entropy (scalar), log_softmax or softmax (per row); torch vs JAX vs NumPy

def head_params(seed: int) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"head.weight": rng.standard_normal((4, 6)) / np.sqrt(6), "head.bias": rng.standard_normal(4) / 4}


def head_inputs(seed: int, scale: float = 1.0) -> Tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(200 + seed)
    return scale * rng.standard_normal((8, 6)), rng.integers(0, 4, size=8)


def _np_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(z - z.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def torch_head(kind: str) -> Any:
    torch, *_ = _lazy_imports()
    F = torch.nn.functional

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(6, 4)

        def forward(self, x, labels=None):
            logits = self.head(x)
            if kind == "ce":
                return F.cross_entropy(logits, labels)
            return F.log_softmax(logits, -1) if kind == "log_softmax" else torch.softmax(logits, -1)

    return Head()


def jax_head(kind: str, softmax_axis: int = -1, float32_inside: bool = False) -> Any:
    _, jax, jnp, _, _ = _lazy_imports()

    def head(p, x, labels=None):
        w, b = p["head.weight"], p["head.bias"]
        if float32_inside:
            x, w, b = x.astype(jnp.float32), w.astype(jnp.float32), b.astype(jnp.float32)
        logits = x @ w.T + b
        if kind == "ce":
            out = -jnp.mean(jax.nn.log_softmax(logits, -1)[jnp.arange(x.shape[0]), labels])
        elif kind == "log_softmax":
            out = jax.nn.log_softmax(logits, -1)
        else:
            out = jax.nn.softmax(logits, axis=softmax_axis)  # the bug: axis=0 (over the batch)
        return out.astype(jnp.float64) if float32_inside else out

    return head


def numpy_head(kind: str, reduction: str = "mean") -> Tuple[Callable[..., Any], Callable[..., Any]]:
    """``(f, grad)``: ``grad(params, x, labels)`` for the scalar loss, ``grad(cotangent, params, x)`` otherwise."""

    def logits_of(p, x):
        return x @ p["head.weight"].T + p["head.bias"]

    def backward(p, x, dlogits):
        return {"head.weight": dlogits.T @ x, "head.bias": dlogits.sum(0)}, dlogits @ p["head.weight"]

    if kind == "ce":
        def f(p, x, labels):
            z = logits_of(p, x)
            m = z.max(-1, keepdims=True)
            logp = z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))
            picked = -logp[np.arange(len(labels)), labels]
            return picked.sum() if reduction == "sum" else picked.mean()  # the bug: sum instead of mean

        def grad(p, x, labels):
            d = _np_softmax(logits_of(p, x))
            d[np.arange(len(labels)), labels] -= 1.0
            return backward(p, x, d if reduction == "sum" else d / len(labels))

        return f, grad

    if kind == "log_softmax":
        def f(p, x):
            z = logits_of(p, x)
            m = z.max(-1, keepdims=True)
            return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))

        def grad(g, p, x):
            return backward(p, x, g - _np_softmax(logits_of(p, x)) * g.sum(-1, keepdims=True))

        return f, grad

    def f(p, x):
        return _np_softmax(logits_of(p, x))

    def grad(g, p, x):
        s = _np_softmax(logits_of(p, x))
        return backward(p, x, s * (g - (g * s).sum(-1, keepdims=True)))

    return f, grad


def head_scenario(name: str, kind: str, seed: int = 0, scale: float = 1.0, buggy: Optional[str] = None,
                  bug: str = "", jax_kw: Optional[dict] = None, numpy_kw: Optional[dict] = None,
                  **options: Any) -> Scenario:
    implementations = {"torch": torch_head(kind), "jax": jax_head(kind, **(jax_kw or {})),
                       "numpy": numpy_head(kind, **(numpy_kw or {}))}
    x, labels = head_inputs(seed, scale)
    options.setdefault("own_check", False)
    return Scenario(name, implementations, (x, labels) if kind == "ce" else (x,),
                    dict(params=head_params(seed), **options), "fail" if buggy else "pass", buggy, None, bug)


# --------------------------------------------------------------------------------------- BatchNorm (eval mode)
# fc (4 -> 5) - BatchNorm(5) with running statistics - tanh - out (5 -> 2)

def bn_params(seed: int) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"fc.weight": rng.standard_normal((5, 4)) / 2, "fc.bias": rng.standard_normal(5) / 4,
            "bn.weight": 1 + 0.1 * rng.standard_normal(5), "bn.bias": 0.1 * rng.standard_normal(5),
            "bn.running_mean": 0.3 * rng.standard_normal(5), "bn.running_var": 0.5 + rng.uniform(size=5),
            "out.weight": rng.standard_normal((2, 5)) / np.sqrt(5), "out.bias": rng.standard_normal(2) / 4}


def torch_bn(eps: float = 1e-5) -> Any:
    torch, *_ = _lazy_imports()
    return torch.nn.Sequential(OrderedDict(fc=torch.nn.Linear(4, 5), bn=torch.nn.BatchNorm1d(5, eps=eps),
                                           act=torch.nn.Tanh(), out=torch.nn.Linear(5, 2)))


def keras_bn(eps: float = 1e-5) -> Any:
    *_, keras = _lazy_imports()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, name="fc"),
                              keras.layers.BatchNormalization(epsilon=eps, name="bn"),
                              keras.layers.Activation("tanh", name="act"), keras.layers.Dense(2, name="out")])
    model(np.zeros((1, 4), dtype="float32"))
    return gb.Implementation(model, backend="tensorflow")


def jax_bn(eps: float = 1e-5, batch_statistics: bool = False, no_sqrt: bool = False) -> Any:
    _, _, jnp, _, _ = _lazy_imports()

    def net(p, x):
        h = gb.tap("fc", x @ p["fc.weight"].T + p["fc.bias"])
        if batch_statistics:  # the bug: normalizes with the batch's statistics (train mode) in eval
            mean, var = h.mean(0), h.var(0)
        else:
            mean, var = p["bn.running_mean"], p["bn.running_var"]
        scale = (var + eps) if no_sqrt else jnp.sqrt(var + eps)  # the bug: variance used as the std
        h = gb.tap("bn", (h - mean) / scale * p["bn.weight"] + p["bn.bias"])
        h = gb.tap("act", jnp.tanh(h))
        return h @ p["out.weight"].T + p["out.bias"]

    return net


def bn_scenario(name: str, seed: int = 0, buggy: Optional[str] = None, bug: str = "", layer: Optional[str] = None,
                torch_kw: Optional[dict] = None, keras_kw: Optional[dict] = None, jax_kw: Optional[dict] = None,
                **options: Any) -> Scenario:
    implementations = {"torch": torch_bn(**(torch_kw or {})), "keras": keras_bn(**(keras_kw or {})),
                       "jax": jax_bn(**(jax_kw or {}))}
    x = np.random.default_rng(300 + seed).standard_normal((8, 4))
    options.setdefault("own_check", False)
    return Scenario(name, implementations, (x,), dict(params=bn_params(seed), **options),
                    "fail" if buggy else "pass", buggy, layer, bug)


# --------------------------------------------------------------------------------------- conv nets
# conv (3 -> 4, 3x3, padding 1) - [BatchNorm2d] - tanh - global mean pool - head (4 -> 2); torch NCHW,
# Keras NHWC (layouts={"keras": gb.channels_last()}), JAX NCHW through lax.conv_general_dilated

def conv_params(seed: int, bn: bool = False) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = {"conv.weight": 0.3 * rng.standard_normal((4, 3, 3, 3)), "conv.bias": 0.1 * rng.standard_normal(4),
              "head.weight": rng.standard_normal((2, 4)), "head.bias": rng.standard_normal(2)}
    if bn:
        params.update({"bn.weight": 1 + 0.1 * rng.standard_normal(4), "bn.bias": 0.1 * rng.standard_normal(4),
                       "bn.running_mean": 0.2 * rng.standard_normal(4), "bn.running_var": 0.5 + rng.uniform(size=4)})
    return params


def torch_conv(stride: int = 1, bn: bool = False) -> Any:
    torch, *_ = _lazy_imports()

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, stride=stride, padding=1)
            self.bn = torch.nn.BatchNorm2d(4, eps=1e-5) if bn else None
            self.act = torch.nn.Tanh()
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x):
            h = self.conv(x)
            if self.bn is not None:
                h = self.bn(h)
            return self.head(self.act(h).mean(dim=(2, 3)))

    return Net()


def keras_conv(stride: int = 1, bn: bool = False, explicit_padding: bool = False) -> Any:
    """``explicit_padding``: ZeroPadding2D(1) + 'valid' (torch's padding=1 at any stride); else 'same'."""
    *_, keras = _lazy_imports()
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.ZeroPadding2D(1, name="pad")(inputs) if explicit_padding else inputs
    h = keras.layers.Conv2D(4, 3, strides=stride, padding="valid" if explicit_padding else "same", name="conv")(h)
    if bn:
        h = keras.layers.BatchNormalization(epsilon=1e-5, name="bn")(h)
    h = keras.layers.Activation("tanh", name="act")(h)
    h = keras.layers.Dense(2, name="head")(keras.layers.GlobalAveragePooling2D(name="pool")(h))
    return gb.Implementation(keras.Model(inputs, h), backend="tensorflow")


def jax_conv(stride: int = 1, bn: bool = False, kernel_permutation: Tuple[int, ...] = (2, 3, 1, 0)) -> Any:
    """OIHW -> HWIO by ``kernel_permutation``; (3, 2, 1, 0) (W, H, I, O: the spatial axes swapped) is the bug."""
    _, jax, jnp, _, _ = _lazy_imports()

    def net(p, x):
        kernel = jnp.transpose(p["conv.weight"], kernel_permutation)
        h = jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((1, 1), (1, 1)),
                                         dimension_numbers=("NCHW", "HWIO", "NCHW"))
        h = gb.tap("conv", h + p["conv.bias"][None, :, None, None])
        if bn:
            c = (None, slice(None), None, None)
            h = gb.tap("bn", (h - p["bn.running_mean"][c]) / jnp.sqrt(p["bn.running_var"][c] + 1e-5)
                       * p["bn.weight"][c] + p["bn.bias"][c])
        h = gb.tap("act", jnp.tanh(h))
        return h.mean(axis=(2, 3)) @ p["head.weight"].T + p["head.bias"]

    return net


def conv_scenario(name: str, seed: int = 0, stride: int = 1, bn: bool = False, buggy: Optional[str] = None,
                  bug: str = "", layer: Optional[str] = None, keras_kw: Optional[dict] = None,
                  jax_kw: Optional[dict] = None, **options: Any) -> Scenario:
    implementations = {"torch": torch_conv(stride, bn), "keras": keras_conv(stride, bn, **(keras_kw or {})),
                       "jax": jax_conv(stride, bn, **(jax_kw or {}))}
    x = np.random.default_rng(400 + seed).standard_normal((2, 3, 6, 6))  # NCHW
    options.setdefault("own_check", False)
    return Scenario(name, implementations, (x,),
                    dict(params=conv_params(seed, bn), layouts={"keras": gb.channels_last()}, **options),
                    "fail" if buggy else "pass", buggy, layer, bug)


# --------------------------------------------------------------------------------------- custom ops
# f(x, w) = op(x) @ w with op written with a custom gradient in all four frameworks

OPS = {  # forward and derivative in NumPy (also the reference the others are written after)
    "softplus": (lambda x: np.logaddexp(x, 0.0), lambda x: 0.5 * (1 + np.tanh(x / 2))),
    "scaled_tanh": (lambda x: 1.7159 * np.tanh(2 * x / 3), lambda x: 1.7159 * 2 / 3 * (1 - np.tanh(2 * x / 3) ** 2)),
    "cauchy": (lambda x: np.log1p(x * x), lambda x: 2 * x / (1 + x * x)),
}


def custom_op_impls(op: str, bugs: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """{"torch", "jax", "tensorflow", "numpy"} implementations of ``op(x) @ w``; ``bugs``: {framework: bug}."""
    torch, jax, jnp, tf, _ = _lazy_imports()
    bugs = bugs or {}

    def derivative(lib: Any, x: Any, bug: Optional[str]) -> Any:
        t = lib.tanh
        if op == "softplus":
            d = 0.5 * (1 + t(x / 2))  # sigmoid
            if bug == "sign":
                return -d
            if bug == "threshold":  # torch's softplus is linear above 20: the bug gives that branch slope 0
                return lib.where(x > 20, 0.0 * x, d)
            return d
        if op == "scaled_tanh":
            a = 1.7161 if bug == "constant" else 1.7159  # the bug: the constant mistyped in the backward (1.2e-4)
            return a * 2 / 3 * (1 - t(2 * x / 3) ** 2)
        if op == "cauchy":
            return (1.0 if bug == "factor" else 2.0) * x / (1 + x * x)  # the bug: the factor 2 forgotten
        raise ValueError(op)

    def torch_forward(x):
        if op == "softplus":
            return torch.nn.functional.softplus(x)
        if op == "scaled_tanh":
            return 1.7159 * torch.tanh(2 * x / 3)
        return torch.log1p(x * x)

    class TorchOp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch_forward(x)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * derivative(torch, x, bugs.get("torch"))

    def jax_forward(x):
        if op == "softplus":
            return jnp.logaddexp(x, 0.0)
        if op == "scaled_tanh":
            return 1.7159 * jnp.tanh(2 * x / 3)
        return jnp.log1p(x * x)

    @jax.custom_vjp
    def jax_op(x):
        return jax_forward(x)

    jax_op.defvjp(lambda x: (jax_forward(x), x), lambda x, g: (g * derivative(jnp, x, bugs.get("jax")),))

    def tf_forward(x):
        if op == "softplus":
            return tf.math.softplus(x)
        if op == "scaled_tanh":
            return 1.7159 * tf.tanh(2 * x / 3)
        return tf.math.log1p(x * x)

    class _TF:  # the array functions derivative() needs, in TensorFlow
        tanh = staticmethod(tf.tanh)
        where = staticmethod(tf.where)

    @tf.custom_gradient
    def tf_op(x):
        def grad(g):
            return g * derivative(_TF, x, bugs.get("tensorflow"))
        return tf_forward(x), grad

    forward_np, _ = OPS[op]

    def np_f(x, w):
        return forward_np(x) @ w

    def np_vjp(g, x, w):
        return (g @ w.T) * derivative(np, x, bugs.get("numpy")), forward_np(x).T @ g

    return {"torch": lambda x, w: TorchOp.apply(x) @ w, "jax": lambda x, w: jax_op(x) @ w,
            "tensorflow": lambda x, w: tf.matmul(tf_op(x), w), "numpy": (np_f, np_vjp)}


def op_inputs(seed: int, scale: float = 1.0) -> Tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(500 + seed)
    return scale * rng.standard_normal((5, 4)), rng.standard_normal((4, 3))


def op_scenario(name: str, op: str, seed: int = 0, scale: float = 1.0, buggy: Optional[str] = None,
                bug: str = "", bug_kind: Optional[str] = None, x: Optional[np.ndarray] = None,
                **options: Any) -> Scenario:
    implementations = custom_op_impls(op, {buggy: bug_kind} if buggy else None)
    x0, w = op_inputs(seed, scale)
    options.setdefault("own_check", False)
    return Scenario(name, implementations, (x0 if x is None else x, w), options, "fail" if buggy else "pass",
                    buggy, None, bug)


# --------------------------------------------------------------------------------------- small plain-function ports

def dict_outputs_scenario(name: str) -> Scenario:
    """torch and TensorFlow return {"probs", "loss"} and {"loss", "probs"} (insertion order kept), JAX sorts."""
    torch, jax, _, tf, _ = _lazy_imports()

    def torch_heads(x, w):
        logits = x @ w
        return {"probs": torch.softmax(logits, -1), "loss": torch.logsumexp(logits, -1).sum()}

    def jax_heads(x, w):
        logits = x @ w
        return {"loss": jax.nn.logsumexp(logits, -1).sum(), "probs": jax.nn.softmax(logits, -1)}

    def tf_heads(x, w):
        logits = tf.matmul(x, w)
        return {"loss": tf.reduce_sum(tf.reduce_logsumexp(logits, -1)), "probs": tf.nn.softmax(logits, -1)}

    rng = np.random.default_rng(2)
    return Scenario(name, {"torch": torch_heads, "jax": jax_heads, "tensorflow": tf_heads},
                    (rng.standard_normal((5, 4)), rng.standard_normal((4, 3))), dict(own_check=False), "pass")


def kl_scenario(name: str) -> Scenario:
    """KL(p || p) with both arguments equal: value and gradients are zero mathematically."""
    torch, jax, jnp, tf, _ = _lazy_imports()

    def kl_torch(a, b):
        p = torch.softmax(a, -1)
        return (p * (torch.log(p) - torch.log_softmax(b, -1))).sum()

    def kl_jax(a, b):
        return jnp.sum(jax.nn.softmax(a, -1) * (jax.nn.log_softmax(a, -1) - jnp.log(jax.nn.softmax(b, -1))))

    def kl_tf(a, b):
        p = tf.nn.softmax(a, -1)
        return tf.reduce_sum(p * (tf.nn.log_softmax(a, -1) - tf.nn.log_softmax(b, -1)))

    a = np.random.default_rng(4).standard_normal((3, 7)) * 3
    return Scenario(name, {"torch": kl_torch, "jax": kl_jax, "tensorflow": kl_tf}, (a, a.copy()),
                    dict(own_check=False), "pass")


def dropout_scenario(name: str, functional_dropout_bug: bool = False) -> Scenario:
    """fc1 (4 -> 6) - Dropout(0.5) - tanh - out (6 -> 2), compared in eval mode (train=False, the default).
    The bug: torch calls ``F.dropout(h, 0.5)``, whose ``training`` defaults to True, so it drops in eval too."""
    torch, _, jnp, _, keras = _lazy_imports()

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(4, 6)
            self.drop = torch.nn.Dropout(0.5)
            self.out = torch.nn.Linear(6, 2)

        def forward(self, x):
            h = self.fc1(x)
            h = torch.nn.functional.dropout(h, 0.5) if functional_dropout_bug else self.drop(h)
            return self.out(torch.tanh(h))

    port = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, name="fc1"),
                             keras.layers.Dropout(0.5, name="drop"), keras.layers.Activation("tanh", name="act"),
                             keras.layers.Dense(2, name="out")])
    port(np.zeros((1, 4), dtype="float32"))

    def jax_net(p, x):  # inference: no dropout
        return jnp.tanh(x @ p["fc1.weight"].T + p["fc1.bias"]) @ p["out.weight"].T + p["out.bias"]

    rng = np.random.default_rng(6)
    params = {"fc1.weight": rng.standard_normal((6, 4)) / 2, "fc1.bias": rng.standard_normal(6) / 4,
              "out.weight": rng.standard_normal((2, 6)) / 2, "out.bias": rng.standard_normal(2) / 4}
    return Scenario(name, {"torch": Net(), "keras": gb.Implementation(port, backend="tensorflow"), "jax": jax_net},
                    (rng.standard_normal((8, 4)),), dict(params=params, own_check=False),
                    "fail" if functional_dropout_bug else "pass", "torch" if functional_dropout_bug else None, None,
                    "F.dropout(h, 0.5) in forward: training=True by default, drops in eval mode"
                    if functional_dropout_bug else "")


def clamp_scenario(name: str) -> Scenario:
    """softplus(x) @ w; the JAX port clamps softplus's input at 3.0 "for safety". The given x are all in (-1.9, 1.9),
    so the clamp is inactive there; only the points drawn around them (points=3, the default) reach x > 3."""
    torch, jax, jnp, tf, _ = _lazy_imports()
    rng = np.random.default_rng(8)
    x, w = rng.uniform(-1.9, 1.9, size=(5, 4)), rng.standard_normal((4, 3))
    implementations = {"torch": lambda x, w: torch.nn.functional.softplus(x) @ w,
                       "jax": lambda x, w: jax.nn.softplus(jnp.minimum(x, 3.0)) @ w,
                       "tensorflow": lambda x, w: tf.matmul(tf.math.softplus(x), w)}
    return Scenario(name, implementations, (x, w), dict(own_check=False), "fail", "jax", None,
                    "softplus input clamped at 3.0 (inputs given all below 2)")


# --------------------------------------------------------------------------------------- the list

def scenarios() -> List[Tuple[str, Callable[[], Scenario]]]:
    """(name, builder) in run order; a builder makes the models only when its scenario runs."""
    out: List[Tuple[str, Callable[[], Scenario]]] = []

    def add(name: str, build: Callable[..., Scenario], *a: Any, **kw: Any) -> None:
        out.append((name, lambda: build(name, *a, **kw)))

    # ---- correct ports
    add("mlp torch/keras/jax, seed 0", mlp_scenario, seed=0)
    add("mlp torch/keras/jax, seed 1, inputs x10", mlp_scenario, seed=1, scale=10.0)
    add("mlp torch/keras/jax, seed 2, inputs x0.1", mlp_scenario, seed=2, scale=0.1)
    add("mlp torch/keras/jax, seed 3, own_check", mlp_scenario, seed=3, own_check=True)
    add("mlp torch/keras/jax, seed 4, layers", mlp_scenario, seed=4, layers=True)
    add("mlp tanh-GELU in all three", mlp_scenario, seed=5, torch_kw=dict(gelu="tanh"),
        keras_kw=dict(gelu_approximate=True), jax_kw=dict(gelu_approximate=True))
    add("mlp LayerNorm eps 1e-3 in all three", mlp_scenario, seed=6, torch_kw=dict(norm_eps=1e-3),
        keras_kw=dict(norm_eps=1e-3), jax_kw=dict(norm_eps=1e-3))
    add("mlp torch computing in float32 inside", mlp_scenario, seed=7, torch_kw=dict(float32_inside=True))
    add("mlp jax computing in float32 inside, inputs x10", mlp_scenario, seed=8, scale=10.0,
        jax_kw=dict(float32_inside=True))
    add("cross-entropy head torch/jax/numpy", head_scenario, "ce", seed=0)
    add("cross-entropy head, logits x30, own_check", head_scenario, "ce", seed=1, scale=30.0, own_check=True)
    add("log_softmax head torch/jax/numpy", head_scenario, "log_softmax", seed=2)
    add("softmax head torch/jax/numpy, own_check", head_scenario, "softmax", seed=3, own_check=True)
    add("softmax head, jax in float32 inside", head_scenario, "softmax", seed=4, jax_kw=dict(float32_inside=True))
    add("batchnorm eval torch/keras(eps=1e-5)/jax", bn_scenario, seed=0)
    add("batchnorm eval, layers", bn_scenario, seed=1, layers=True)
    add("conv NCHW torch / NHWC keras / jax", conv_scenario, seed=0)
    add("conv + batchnorm2d eval, layers", conv_scenario, seed=1, bn=True, layers=True)
    add("conv stride 2, keras ZeroPadding2D(1)+valid", conv_scenario, seed=2, stride=2,
        keras_kw=dict(explicit_padding=True))
    add("custom softplus in 4 frameworks, own_check", op_scenario, "softplus", seed=0, own_check=True)
    add("custom softplus in 4 frameworks, inputs x10", op_scenario, "softplus", seed=1, scale=10.0)
    add("custom scaled tanh in 4 frameworks, own_check", op_scenario, "scaled_tanh", seed=2, own_check=True)
    add("custom log1p(x^2) in 4 frameworks", op_scenario, "cauchy", seed=3)
    add("dict outputs, keys in other orders", dict_outputs_scenario)
    add("KL(p||p), zero up to round-off", kl_scenario)
    add("dropout in eval mode torch/keras/jax", dropout_scenario)

    # ---- seeded bugs
    add("BUG untransposed 5x5 fc2 in jax", mlp_scenario, seed=0, buggy="jax", layer="fc2", layers=True,
        bug="h @ W instead of h @ W.T for the square fc2", jax_kw=dict(untransposed=True))
    add("BUG keras LayerNorm default eps 1e-3", mlp_scenario, seed=1, buggy="keras", layer="norm", layers=True,
        bug="LayerNormalization(epsilon=1e-3) vs torch's 1e-5", keras_kw=dict(norm_eps=1e-3))
    add("BUG jax LayerNorm eps 1e-6 (flax default)", mlp_scenario, seed=2, buggy="jax", layer="norm", layers=True,
        bug="eps 1e-6 vs 1e-5", jax_kw=dict(norm_eps=1e-6))
    add("BUG torch GELU tanh-approximate", mlp_scenario, seed=3, buggy="torch", layer="gelu", layers=True,
        bug="nn.GELU(approximate='tanh') vs exact", torch_kw=dict(gelu="tanh"))
    add("BUG jax.nn.gelu default (approximate=True)", mlp_scenario, seed=4, buggy="jax", layer="gelu",
        layers=True, bug="jax.nn.gelu(h) defaults to the tanh approximation", jax_kw=dict(gelu_approximate=True))
    add("BUG missing output bias in jax", mlp_scenario, seed=5, buggy="jax", bug="out.bias forgotten",
        jax_kw=dict(no_out_bias=True))
    add("BUG torch tanh backward 1-y (layers)", mlp_scenario, seed=6, buggy="torch", layer="act", layers=True,
        own_check=True, bug="autograd.Function tanh backward g*(1-y) instead of g*(1-y^2)",
        torch_kw=dict(tanh_backward_bug=True))
    add("BUG jax GELU custom_vjp drops x*pdf (layers)", mlp_scenario, seed=7, buggy="jax", layer="gelu",
        layers=True, own_check=True, bug="custom_vjp GELU backward g*cdf instead of g*(cdf + x*pdf)",
        jax_kw=dict(gelu_backward_bug=True))
    add("BUG softmax over the batch axis in jax", head_scenario, "softmax", seed=5, buggy="jax",
        bug="softmax(axis=0)", jax_kw=dict(softmax_axis=0))
    add("BUG cross-entropy sum instead of mean in numpy", head_scenario, "ce", seed=6, buggy="numpy",
        bug="reduction sum vs torch's mean", numpy_kw=dict(reduction="sum"))
    add("BUG keras BatchNorm default eps 1e-3", bn_scenario, seed=2, buggy="keras", layer="bn", layers=True,
        bug="BatchNormalization(epsilon=1e-3) vs torch's 1e-5", keras_kw=dict(eps=1e-3))
    add("BUG jax BatchNorm batch statistics in eval", bn_scenario, seed=3, buggy="jax", layer="bn", layers=True,
        bug="normalizes with the batch mean/var instead of running statistics", jax_kw=dict(batch_statistics=True))
    add("BUG jax BatchNorm divides by var (no sqrt)", bn_scenario, seed=4, buggy="jax",
        bug="(h - mean) / (var + eps) instead of / sqrt(var + eps)", jax_kw=dict(no_sqrt=True))
    add("BUG jax conv kernel permutation (3,2,1,0)", conv_scenario, seed=3, buggy="jax", layer="conv",
        layers=True, bug="OIHW -> WHIO instead of HWIO (spatial axes swapped)",
        jax_kw=dict(kernel_permutation=(3, 2, 1, 0)))
    add("BUG keras padding='same' at stride 2", conv_scenario, seed=4, stride=2, buggy="keras", layer="conv",
        layers=True, bug="'same' pads (0, 1) at stride 2 on 6x6, torch's padding=1 pads (1, 1)")
    add("BUG softplus backward sign flip in tensorflow", op_scenario, "softplus", seed=5, buggy="tensorflow",
        bug_kind="sign", own_check=True, bug="tf.custom_gradient returns -g*sigmoid(x)")
    add("BUG log1p(x^2) backward missing factor 2 in numpy", op_scenario, "cauchy", seed=6, buggy="numpy",
        bug_kind="factor", own_check=True, bug="grad x/(1+x^2) instead of 2x/(1+x^2)")
    add("BUG scaled tanh backward constant 1.2e-4 off in jax", op_scenario, "scaled_tanh", seed=7, buggy="jax",
        bug_kind="constant", own_check=True, bug="custom_vjp uses 1.7161 for 1.7159 (relative 1.2e-4)")
    x_one_big = np.random.default_rng(509).uniform(-2, 2, size=(5, 4))
    x_one_big[2, 1] = 25.0
    add("BUG torch softplus backward wrong on one element", op_scenario, "softplus", seed=8, buggy="torch",
        bug_kind="threshold", own_check=True, x=x_one_big,
        bug="autograd.Function backward gives 0 above threshold 20 (one input at 25)")
    add("BUG jax clamps at 3.0, inputs all below 2", clamp_scenario)
    add("BUG torch F.dropout in eval mode", dropout_scenario, functional_dropout_bug=True)
    return out


# --------------------------------------------------------------------------------------- judging

_POINT_PREFIX = re.compile(r"^at point \d+ \([^)]*\): ")


def blamed_labels(verdicts: Sequence[str], labels: Sequence[str]) -> List[str]:
    """The labels the verdict sentences name as the wrong side."""
    blamed = []
    for label in labels:
        for sentence in verdicts:
            s = _POINT_PREFIX.sub("", sentence)
            if (s.startswith((f"{label}:", f"{label} draws random numbers"))
                    or f"{label}'s forward pass is wrong" in s or f"{label}'s backward pass" in s):
                blamed.append(label)
                break
    return blamed


def diverging_layer(divergence: Any, label: str) -> Tuple[Optional[str], str]:
    """The buggy side's layer name where the pair diverges (the culprit layer for a backward divergence)."""
    side = 0 if divergence.first == label else 1
    if divergence.layer is None:
        return None, ""
    if divergence.quantity == "gradient":
        if divergence.culprit is not None:
            return divergence.culprit[side], "backward"
        return divergence.layer[side], "backward after"
    return divergence.layer[side], "output"


def run_scenario(name: str, build: Callable[[], Scenario]) -> Outcome:
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scenario = build()
            assert scenario.name == name
            comparison = gb.compare(scenario.implementations, *scenario.args, **scenario.options)
    except Exception as exc:  # noqa: BLE001 - a measurement: every scenario runs
        text = str(exc).strip().splitlines()
        return Outcome(name, "fail" if name.startswith("BUG") else "pass", "error",
                       error=f"{type(exc).__name__}: {text[0][:300] if text else ''}\n{traceback.format_exc()}",
                       seconds=time.perf_counter() - started)
    got = "pass" if comparison.passed else "fail"
    outcome = Outcome(name, scenario.expect, got, scenario.buggy, scenario.bug, verdicts=list(comparison.verdicts),
                      layer_sentences=[d.sentence() for d in comparison.layers])
    labels = list(scenario.implementations)
    if scenario.buggy is not None and got == "fail":
        outcome.blamed = blamed_labels(comparison.verdicts, labels)
        outcome.blamed_right = outcome.blamed == [scenario.buggy]
    elif scenario.buggy is not None:
        outcome.blamed, outcome.blamed_right = [], False
    if scenario.options.get("layers"):
        outcome.expected_layer = scenario.layer
        if scenario.buggy is None:
            named = [d.layer for d in comparison.layers if d.layer is not None]
            outcome.found_layer = "none" if not named else ", ".join(f"{d.first}/{d.second}: {d.layer[0]}"
                                                                     for d in comparison.layers if d.layer)
        else:
            mine = [d for d in comparison.layers if scenario.buggy in (d.first, d.second)]
            found = [diverging_layer(d, scenario.buggy) for d in mine]
            names = [n for n, _ in found]
            first = next(((n, k) for n, k in found if n is not None), (None, ""))
            outcome.found_layer = "none" if first[0] is None else f"{first[0]} ({first[1]})"
            if len(set(names)) > 1:
                outcome.found_layer += " [pairs differ: " + ", ".join(str(n) for n in names) + "]"
            outcome.layer_right = bool(mine) and all(n == scenario.layer for n in names)
    if not outcome.right:
        outcome.report = str(comparison)
    outcome.seconds = time.perf_counter() - started
    return outcome


# --------------------------------------------------------------------------------------- output

def _yes_no(value: Optional[bool]) -> str:
    return "" if value is None else ("yes" if value else "NO")


def table(outcomes: Sequence[Outcome]) -> str:
    lines = ["| scenario | expected | got | blamed right? | first diverging layer | seconds |",
             "|---|---|---|---|---|---|"]
    for o in outcomes:
        got = o.got if o.right else f"**{o.got}**"
        blamed = _yes_no(o.blamed_right)
        if o.blamed_right is False and o.blamed:
            blamed += f" ({', '.join(o.blamed)})"
        elif o.blamed_right is False and o.got == "fail":
            blamed += " (no one)"
        layer = o.found_layer or ""
        if o.expected_layer is not None:
            layer += f" (expected {o.expected_layer}: {_yes_no(o.layer_right)})"
        expected = o.expect + (f" ({o.buggy})" if o.buggy else "")
        lines.append(f"| {o.scenario} | {expected} | {got} | {blamed} | {layer} | {o.seconds:.1f} |")
    return "\n".join(lines)


def summary(outcomes: Sequence[Outcome], total: float) -> str:
    correct = [o for o in outcomes if o.expect == "pass"]
    buggy = [o for o in outcomes if o.expect == "fail"]
    false_alarms = sum(o.got == "fail" for o in correct)
    misses = sum(o.got == "pass" for o in buggy)
    blamed = sum(bool(o.blamed_right) for o in buggy)
    with_layer = [o for o in buggy if o.expected_layer is not None]
    layers_right = sum(bool(o.layer_right) for o in with_layer)
    errors = sum(o.got == "error" for o in outcomes)
    line = (f"correct ports: {len(correct)}, false alarms: {false_alarms}; seeded bugs: {len(buggy)}, misses: "
            f"{misses}; blamed correctly: {blamed} of {len(buggy)}; layers named right: {layers_right} of "
            f"{len(with_layer)}; total {total:.0f} s")
    return line + (f"; errors: {errors}" if errors else "")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="run only the scenarios whose name contains this substring")
    parser.add_argument("--json", default=None, help="write every outcome to this path")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    _lazy_imports()  # JAX's float64 first, then the frameworks, outside any scenario's time
    chosen = [(n, b) for n, b in scenarios() if args.only is None or args.only.lower() in n.lower()]
    outcomes = []
    for index, (name, build) in enumerate(chosen, 1):
        outcome = run_scenario(name, build)
        outcomes.append(outcome)
        if not args.quiet:
            print(f"[{index}/{len(chosen)}] {name}: {outcome.got} ({outcome.seconds:.1f} s)", file=sys.stderr,
                  flush=True)
    total = time.perf_counter() - started

    print(table(outcomes))
    print()
    print(summary(outcomes, total))
    wrong = [o for o in outcomes if not o.right]
    for o in wrong:
        kind = "ERROR" if o.got == "error" else ("FALSE ALARM" if o.expect == "pass" else "MISS")
        print(f"\n### {kind}: {o.scenario}\n")
        print(o.error or o.report)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary(outcomes, total),
                                               "outcomes": [asdict(o) for o in outcomes]}, indent=2))
    return 0


if __name__ == "__main__":
    try:
        main()
    except Exception:  # noqa: BLE001 - a measurement: never a failing exit code
        traceback.print_exc()
    sys.exit(0)
