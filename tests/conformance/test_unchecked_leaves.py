"""Nothing silently unchecked (issue 14, item 3).

Every floating leaf of the arguments and parameters is either checked, named by its path (``p.w`` for a
dataclass or NamedTuple field, ``batch['image']``, ``xs[1]``), or listed in ``report.notes`` as not checked,
with the reason; a check that would check nothing raises ``InvalidArgumentError`` naming what it found.

- dataclasses of arrays are walked field by field (and rebuilt with ``dataclasses.replace``) on NumPy, torch
  and TensorFlow; JAX flattens with its own registry, so a dataclass registered there
  (``jax.tree_util.register_dataclass``) is checked and an unregistered one is listed as not checked;
- torch honours nodes registered with ``torch.utils._pytree`` (``register_dataclass``, ``register_pytree_node``);
- NumPy, torch and TensorFlow honour optree's registry (namespace ``"gradbridge"`` and the global one);
- a seeded bug inside a dataclass field fails, the same code without it passes;
- frozen parameters, arrays of another framework (a NumPy array next to a Keras model) and
  leaves left out by ``wrt=`` are listed as not checked (complex arrays are checked: ``test_complex.py``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Tuple

import numpy as np
import pytest

import gradbridge as gb
from backend_matrix import require_backend
from kits import make_op

X0 = np.array([0.3, -0.7, 1.1])
W0 = np.array([0.9, 1.4, -0.5])
B0 = np.array([0.2, -0.1, 0.4])


def _forward(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.sin(w * x)


def _backward(cotangent: np.ndarray, x: np.ndarray, w: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    c = np.cos(w * x)
    return cotangent * w * c, cotangent * x * c


def _backward_bug_in_w(cotangent: np.ndarray, x: np.ndarray, w: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """A 1% error on one element of the gradient of ``w`` (the field of the container under test)."""
    gx, gw = _backward(cotangent, x, w)
    gw = np.array(gw, copy=True)
    gw[..., 1] *= 1.01
    return gx, gw


@dataclasses.dataclass
class Params:
    w: Any
    b: Any


class Pair(NamedTuple):
    w: Any
    b: Any


@functools.lru_cache(maxsize=None)
def _jax_params() -> type:
    """A dataclass registered with JAX's own pytree registry (JAX flattens its arguments with it)."""
    import jax

    @dataclasses.dataclass
    class JaxParams:
        w: Any
        b: Any

    jax.tree_util.register_dataclass(JaxParams, data_fields=["w", "b"], meta_fields=[])
    return JaxParams


def _container_problem(backend: str, container: Callable[[Any, Any], Any], bug: bool):
    """``fn(x, p) = op(x, p.w) + p.b`` with ``op`` the backend's custom-gradient op (the seeded bug lives in
    its backward for ``w``), the point ``(x, p)`` and the options for ``gb.check``."""
    backward = _backward_bug_in_w if bug else _backward
    op, to_native, options = make_op(backend, _forward, backward)
    if backend == "numpy":
        def vjp(cotangent, x, p):
            gx, gw = backward(np.asarray(cotangent), x, p.w)
            return gx, gw, cotangent  # one gradient per checked leaf: x, p.w, p.b

        options = {"grad": vjp}

    def fn(x, p):
        return op(x, p.w) + p.b

    return fn, to_native(X0), container(to_native(W0), to_native(B0)), options


def _dataclass_for(backend: str) -> type:
    return _jax_params() if backend == "jax" else Params


# --- shared: dataclasses and NamedTuples are checked field by field, and named by field ---

def test_a_dataclass_of_arrays_is_checked_field_by_field(backend: str) -> None:
    fn, x, p, options = _container_problem(backend, _dataclass_for(backend), bug=False)
    report = gb.check(fn, x, p, **options)
    assert [row.input for row in report.rows] == ["x", "p.w", "p.b"], str(report)
    assert report.passed, str(report)


def test_a_seeded_bug_inside_a_dataclass_field_fails_on_that_field(backend: str) -> None:
    fn, x, p, options = _container_problem(backend, _dataclass_for(backend), bug=True)
    report = gb.check(fn, x, p, **options)
    assert not report.passed, str(report)
    assert [row.input for row in report.failures] == ["p.w"], str(report)
    assert report.row("p.w").worst.input_index == (1,), str(report)


def test_named_tuple_leaves_are_named_by_field(backend: str) -> None:
    fn, x, p, options = _container_problem(backend, Pair, bug=False)
    report = gb.check(fn, x, p, **options)
    assert [row.input for row in report.rows] == ["x", "p.w", "p.b"], str(report)
    assert report.passed, str(report)
    fn, x, p, options = _container_problem(backend, Pair, bug=True)
    report = gb.check(fn, x, p, **options)
    assert [row.input for row in report.failures] == ["p.w"], str(report)


def test_wrt_selects_a_dataclass_field_by_name(backend: str) -> None:
    fn, x, p, options = _container_problem(backend, _dataclass_for(backend), bug=True)
    report = gb.check(fn, x, p, wrt="p.b", **({} if backend != "numpy" else {"grad": lambda ct, x, p: ct}))
    assert [row.input for row in report.rows] == ["p.b"] and report.passed, str(report)
    assert any(note.startswith("not checked:") and "x (" in note and "p.w (" in note and "wrt=" in note
               for note in report.notes), report.notes


# --- NumPy, torch, TensorFlow: unregistered dataclasses, nesting, fields that cannot be rebuilt ---

@pytest.mark.numpy
def test_dataclasses_nested_in_containers_are_named_by_path() -> None:
    batch = {"image": Params(X0.copy(), W0.copy()), "label": [Pair(B0.copy(), np.arange(3))]}

    def fn(batch):
        p, q = batch["image"], batch["label"][0]
        return np.sum(p.w * np.sin(p.b)) + np.sum(q.w ** 2)

    def grad(batch):
        p, q = batch["image"], batch["label"][0]
        return np.sin(p.b), p.w * np.cos(p.b), 2 * q.w

    report = gb.check(fn, batch, grad=grad)
    assert [row.input for row in report.rows] == ["batch['image'].w", "batch['image'].b", "batch['label'][0].w"]
    assert report.passed, str(report)


@dataclasses.dataclass
class WithDerived:
    w: Any
    scale: float = 2.0
    derived: Any = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.derived = self.scale * np.asarray(self.w)


@pytest.mark.numpy
def test_dataclass_is_rebuilt_through_its_constructor_and_init_false_fields_are_listed() -> None:
    # derived is recomputed from the perturbed w by __post_init__ (dataclasses.replace), so the check sees
    # fn as the user's own code does; it cannot be set itself, so it is listed as not checked
    p = WithDerived(W0.copy())
    report = gb.check(lambda p: np.sum(p.derived ** 2), p, grad=lambda p: 2 * p.scale * p.derived)
    assert [row.input for row in report.rows] == ["p.w"] and report.passed, str(report)
    assert any(note.startswith("not checked: p.derived (float64)") and "init=False" in note
               for note in report.notes), report.notes


@pytest.mark.numpy
def test_optree_registered_node_is_walked_and_named() -> None:
    optree = pytest.importorskip("optree")

    class Box:
        def __init__(self, w, b):
            self.w, self.b = w, b

    optree.register_pytree_node(Box, lambda box: ((box.w, box.b), None, ("w", "b")),
                                lambda _, children: Box(*children), namespace="gradbridge")
    try:
        report = gb.check(lambda box: np.sum(box.w * box.b), Box(W0.copy(), B0.copy()),
                          grad=lambda box: (box.b, box.w))
    finally:
        optree.unregister_pytree_node(Box, namespace="gradbridge")
    assert [row.input for row in report.rows] == ["box.w", "box.b"] and report.passed, str(report)


@pytest.mark.numpy
def test_numpy_check_of_a_dataclass_without_floating_fields_raises_naming_them() -> None:
    with pytest.raises(gb.InvalidArgumentError, match=r"^args: no floating-point input .*p\.w \(int64\)"):
        gb.check(lambda p: p.w, Params(np.arange(2), np.arange(2)), grad=lambda ct, p: ct)


# --- torch: its own pytree registry, frozen parameters, NumPy arrays passed along ---

@functools.lru_cache(maxsize=None)
def _torch_nodes() -> Tuple[type, type]:
    """A dataclass registered with ``torch.utils._pytree.register_dataclass`` and a plain class registered with
    ``register_pytree_node`` (keys by attribute), as torch users register their containers."""
    from torch.utils import _pytree

    @dataclasses.dataclass
    class TorchParams:
        w: Any
        b: Any

    _pytree.register_dataclass(TorchParams)

    class Box:
        def __init__(self, w, b):
            self.w, self.b = w, b

    _pytree.register_pytree_node(
        Box, lambda box: ([box.w, box.b], None), lambda children, _: Box(*children),
        flatten_with_keys_fn=lambda box: ([(_pytree.GetAttrKey("w"), box.w), (_pytree.GetAttrKey("b"), box.b)], None))
    return TorchParams, Box


@pytest.mark.torch
@pytest.mark.parametrize("kind", ["register_dataclass", "register_pytree_node"])
def test_torch_registered_pytree_nodes_are_checked_by_field(kind: str) -> None:
    require_backend("torch")
    container = _torch_nodes()[0 if kind == "register_dataclass" else 1]
    fn, x, p, options = _container_problem("torch", container, bug=False)
    report = gb.check(fn, x, p, **options)
    assert [row.input for row in report.rows] == ["x", "p.w", "p.b"] and report.passed, str(report)
    fn, x, p, options = _container_problem("torch", container, bug=True)
    report = gb.check(fn, x, p, **options)
    assert [row.input for row in report.failures] == ["p.w"], str(report)


@pytest.mark.torch
def test_torch_dataclass_alone_is_detected_as_torch_and_checked() -> None:
    require_backend("torch")
    import torch
    p = Params(torch.tensor(W0), torch.tensor(B0))
    report = gb.check(lambda p: torch.sum(torch.sin(p.w) * p.b), p)
    assert report.backend == "torch" and [row.input for row in report.rows] == ["p.w", "p.b"], str(report)
    assert report.passed, str(report)


@pytest.mark.torch
def test_torch_dataclass_after_plain_tensor_arguments_is_perturbed() -> None:
    # a dataclass last among tensor arguments: its leaves must reach fn (not the user's original tensors)
    require_backend("torch")
    import torch

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return x * w

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            return g * w, g * x * 1.01  # seeded bug in the gradient of w

    report = gb.check(lambda x, p: Scale.apply(x, p.w) + p.b, torch.tensor(X0),
                      Params(torch.tensor(W0), torch.tensor(B0)))
    assert [row.input for row in report.failures] == ["p.w"], str(report)


@pytest.mark.torch
def test_torch_frozen_parameter_and_numpy_argument_are_listed_as_not_checked() -> None:
    require_backend("torch")
    import torch
    layer = torch.nn.Linear(3, 2).double()
    layer.bias.requires_grad_(False)
    scale = np.array([1.5, 0.5])
    report = gb.check(lambda x, s: torch.sum(torch.tanh(layer(x)) * torch.as_tensor(s)), torch.tensor(X0[None]),
                      scale, params=layer)
    assert [row.input for row in report.rows] == ["x", "weight"] and report.passed, str(report)
    notes = [note for note in report.notes if note.startswith("not checked:")]
    assert any("bias (float64)" in note and "requires_grad=False" in note for note in notes), report.notes
    assert any("s (float64)" in note and "NumPy" in note and "torch" in note for note in notes), report.notes


# --- JAX: its own registry; an unregistered dataclass is listed, with how to register it ---

@pytest.mark.jax
def test_jax_unregistered_dataclass_is_listed_as_not_checked() -> None:
    require_backend("jax")
    import jax.numpy as jnp
    p = Params(jnp.asarray(W0), jnp.asarray(B0))
    report = gb.check(lambda x, p: jnp.sum(jnp.sin(p.w * x) + p.b), jnp.asarray(X0), p)
    assert [row.input for row in report.rows] == ["x"] and report.passed, str(report)
    notes = [note for note in report.notes if note.startswith("not checked:") and "p.w (float" in note]
    assert notes and "p.b (float" in notes[0] and "register_dataclass" in notes[0], report.notes


@pytest.mark.jax
def test_jax_custom_node_with_keys_is_named_by_its_keys() -> None:
    require_backend("jax")
    import jax
    import jax.numpy as jnp

    class Box:
        def __init__(self, w, b):
            self.w, self.b = w, b

    jax.tree_util.register_pytree_with_keys(
        Box, lambda box: (((jax.tree_util.GetAttrKey("w"), box.w), (jax.tree_util.GetAttrKey("b"), box.b)), None),
        lambda _, children: Box(*children))
    report = gb.check(lambda box: jnp.sum(jnp.sin(box.w) * box.b), Box(jnp.asarray(W0), jnp.asarray(B0)))
    assert [row.input for row in report.rows] == ["box.w", "box.b"] and report.passed, str(report)


# --- TensorFlow: a NumPy input next to a Keras model ---

@pytest.mark.tensorflow
def test_keras_params_with_a_numpy_input_lists_the_input_as_not_checked() -> None:
    require_backend("tensorflow")
    import keras
    import tensorflow as tf
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="tanh", name="dense")])
    x = np.array([X0, W0])

    def loss(x):
        return tf.reduce_sum(model(x) ** 2)

    report = gb.check(loss, x, params=model)
    assert sorted(row.input.rsplit("/", 1)[-1] for row in report.rows) == ["bias", "kernel"], str(report)
    assert report.passed, str(report)
    notes = [note for note in report.notes if note.startswith("not checked: x (float64)")]
    assert notes and "NumPy" in notes[0] and "tf.constant" in notes[0], report.notes
    checked = gb.check(loss, tf.constant(x), params=model)  # as a tensor it is checked
    assert "x" in [row.input for row in checked.rows] and checked.passed, str(checked)


@pytest.mark.tensorflow
def test_keras_frozen_layer_weights_are_listed_as_not_checked() -> None:
    require_backend("tensorflow")
    import keras
    import tensorflow as tf
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="tanh", name="frozen"),
                              keras.layers.Dense(1, name="head")])
    model.layers[0].trainable = False
    report = gb.check(lambda x: tf.reduce_sum(model(x) ** 2), tf.constant(np.array([X0, W0])), params=model)
    assert sorted(row.input.rsplit("/", 2)[-2] for row in report.rows if row.kind == "param") == ["head", "head"]
    assert report.passed, str(report)
    notes = [note for note in report.notes if note.startswith("not checked:") and "frozen/kernel (float32)" in note]
    assert notes and "frozen/bias (float32)" in notes[0] and "trainable=False" in notes[0], report.notes
