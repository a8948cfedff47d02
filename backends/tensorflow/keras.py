"""Keras 3 on the TensorFlow backend: recognising Keras objects, and the scopes a check runs a model in.

Invariant: a Keras model or variable of the user's is never changed by a check. While ``fn`` runs, Keras
variables read the check's values through a stateless scope (updates such as BatchNorm statistics and
Dropout seed generators land in the scope and are dropped), a model promoted to float64 has its layers'
dtype policies swapped and put back in a ``finally``, and the training flag is Keras' outer call context,
restored on exit. Nothing here imports Keras: without it in ``sys.modules`` every helper is a no-op or False.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import tensorflow as tf

from . import compat
from ..common.layout import Unchecked
from ..common.params import distinct_names, once_each


def keras_module() -> Any:
    """The ``keras`` module when the process has imported it, else None."""
    return compat.loaded_keras()


def is_keras_variable(value: Any) -> bool:
    keras = keras_module()
    return keras is not None and isinstance(value, getattr(keras, "Variable", ()))


def is_keras_layer(value: Any) -> bool:
    keras = keras_module()
    layers = getattr(keras, "layers", None) if keras is not None else None
    return layers is not None and isinstance(value, getattr(layers, "Layer", ()))


def floatx() -> Optional[str]:
    """Keras' default float dtype (part of a traced graph's cache key), None without Keras."""
    keras = keras_module()
    return keras.config.floatx() if keras is not None and hasattr(keras, "config") else None


# --- scopes a call of fn runs in ---

@contextlib.contextmanager
def float64_policies(model: Any) -> Iterator[None]:
    """``model`` computes in float64 while the block runs; everything is put back afterwards.

    Every layer gets a policy computing in float64 with its own variable dtype (the Keras mixed-precision
    mechanism: variables are cast on read); input layers and the symbolic inputs of functional models
    (the dtypes Keras casts call inputs to) are switched to float64 too, or the inputs would be rounded to
    float32 on the way in.
    """
    KerasTensor = compat.keras_tensor_type()
    InputLayer = compat.input_layer_type()

    policies, symbols = [], []
    try:
        for layer in compat.all_layers(model):
            original = compat.layer_policy(layer)
            policy = compat.float64_policy(original.variable_dtype)
            policies.append((layer, original))
            compat.set_layer_policy(layer, policy)
            if isinstance(layer, InputLayer) and tf.as_dtype(compat.own_dtype(layer)).is_floating:
                symbols.append((layer, compat.own_dtype(layer)))  # InputLayer's dtype is its own, not the policy's
                compat.set_own_dtype(layer, "float64")
            for symbol in compat.symbolic_inputs(layer):
                if isinstance(symbol, KerasTensor) and tf.as_dtype(symbol.dtype).is_floating:
                    symbols.append((symbol, compat.own_dtype(symbol)))
                    compat.set_own_dtype(symbol, "float64")
        yield
    finally:
        for symbol, dtype in reversed(symbols):
            compat.set_own_dtype(symbol, dtype)
        for layer, original in reversed(policies):
            compat.set_layer_policy(layer, original)


def promotable(model: Any) -> bool:
    """Whether every layer has a plain float policy the float64 swap can stand in for."""
    try:
        DTypePolicy = compat.dtype_policy_type()
        layers = compat.all_layers(model)
    except (ImportError, AttributeError):
        return False
    return all(type(compat.layer_policy(l)) is DTypePolicy
               and tf.as_dtype(compat.layer_policy(l).compute_dtype).is_floating for l in layers)


@contextlib.contextmanager
def stateless(mapping: Sequence[Tuple[Any, Any]]) -> Iterator[None]:
    """A ``keras.StatelessScope`` in which each Keras variable reads its mapped value (of any dtype: the
    mapping is set after construction, which would cast it to the variable's dtype) and no Keras
    variable of the user's is written (updates stay in the scope)."""
    if keras_module() is None:
        yield
        return
    with compat.stateless_scope(mapping):
        yield


@contextlib.contextmanager
def keras_training(on: bool) -> Iterator[None]:
    """Keras layers called without ``training=`` run in training mode (Keras' outer call context)."""
    state = compat.keras_global_state()
    if not on or state is None:
        yield
        return
    previous = state.get_global_attribute("current_call_ctx")
    state.set_global_attribute("current_call_ctx", compat.training_call_context())
    try:
        yield
    finally:
        state.set_global_attribute("current_call_ctx", previous)


# --- a model's weights ---

class Param:
    """One parameter candidate: its readable name and the user's variable."""

    def __init__(self, name: str, variable: Any) -> None:
        self.name = name
        self.variable = variable


def keras_params(model: Any) -> List[Param]:
    """The check's parameters of a Keras model or layer (named by variable path, as ``params=model`` names them)."""
    return [Param(name, v) for name, v in distinct_names([(v.path, v) for v in once_each(list(model.trainable_variables))])]


def frozen_weights(model: Optional[Any]) -> List[Unchecked]:
    """The weights of a Keras model's layers set ``trainable=False`` (frozen): held fixed, so listed as not
    checked. A layer's own non-trainable state (BatchNorm statistics) is not a weight and is not listed."""
    if model is None:
        return []
    trainable = {id(v) for v in model.trainable_variables}
    found: List[Unchecked] = []
    seen = set()
    for layer in compat.all_layers(model):
        for v in compat.created_trainable(layer):  # the weights created trainable (Keras 3)
            dtype = tf.as_dtype(v.dtype)
            if id(v) in trainable or id(v) in seen or not dtype.is_floating:
                continue
            seen.add(id(v))
            found.append(Unchecked(v.path, dtype.name, f"layer {layer.name!r} has trainable=False (frozen), so "
                                                       "its weights are held fixed", kind="param"))
    return found


def relative_name(model: Any, path: str) -> str:
    """A variable path relative to ``model`` (its own name dropped, as Sequential and functional models prefix
    it) with "/" written as "." (``sequential/dense/kernel`` -> ``dense.kernel``)."""
    prefix = f"{model.name}/"
    return (path[len(prefix):] if path.startswith(prefix) else path).replace("/", ".")


def keras_names(model: Any) -> Dict[str, str]:
    """The check's leaf name of each trainable variable -> its common (dotted, relative) name."""
    return {p.name: relative_name(model, p.name) for p in keras_params(model)}


# --- gb.compare's weight mapping (see gradbridge._comparing.mapping) ---

def _role_tables(keras: Any) -> List[Tuple[tuple, Dict[str, Tuple[str, Optional[Tuple[int, ...]]]]]]:
    """(layer types, ``{variable name: (role, permutation to the canonical layout)}``). Keras already lays
    out every kernel canonically: Dense (in, out), Conv*D (*spatial, in, out) whatever the data_format."""
    from gradbridge._comparing import mapping

    layers = keras.layers
    norm = {"gamma": (mapping.NORM_SCALE, None), "beta": (mapping.NORM_OFFSET, None)}
    optional = tuple(getattr(layers, n) for n in ("RMSNormalization",) if hasattr(layers, n))
    return [
        ((layers.Dense,), {"kernel": (mapping.DENSE_KERNEL, None), "bias": (mapping.BIAS, None)}),
        ((layers.Conv1D, layers.Conv2D, layers.Conv3D), {"kernel": (mapping.CONV_KERNEL, None),
                                                         "bias": (mapping.BIAS, None)}),
        ((layers.BatchNormalization,), {**norm, "moving_mean": (mapping.NORM_MEAN, None),
                                         "moving_variance": (mapping.NORM_VARIANCE, None)}),
        ((layers.LayerNormalization, layers.GroupNormalization), norm),
        (optional, {"scale": (mapping.NORM_SCALE, None)}),
        ((layers.Embedding,), {"embeddings": (mapping.EMBEDDING, None)}),
    ]


def loadable_variables(model: Any) -> Dict[str, Any]:
    """The floating non-trainable variables of a model (BatchNorm's moving statistics, frozen layers' weights)
    by relative name: ``gb.compare`` may load them (:func:`reading_values`), they are never checked."""
    trainable = {id(v) for v in model.trainable_variables}
    return {relative_name(model, v.path): v for v in once_each(list(model.variables))
            if id(v) not in trainable and tf.as_dtype(v.dtype).is_floating}


def keras_roles(model: Any) -> Dict[str, Any]:
    """Every trainable and loadable variable of a Keras model or layer by role, named as ``gb.compare`` names
    them (:func:`keras_names`, :func:`loadable_variables`); a variable of another layer type has no role."""
    from gradbridge._comparing import mapping

    keras = keras_module()
    role_of: Dict[int, Tuple[str, Optional[Tuple[int, ...]], str]] = {}
    tables = _role_tables(keras)
    for layer in compat.all_layers(model):
        table = next((t for types, t in tables if types and isinstance(layer, types)), None)
        if table is None:
            continue
        for v in layer.weights:
            short = v.path.rsplit("/", 1)[-1]
            if short in table and id(v) not in role_of:
                role, permutation = table[short]
                role_of[id(v)] = (role, permutation, type(layer).__name__)
    named = [(relative_name(model, p.name), p.variable, True) for p in keras_params(model)]
    named += [(name, v, False) for name, v in loadable_variables(model).items()]
    roles = {}
    for name, v, required in named:
        role, permutation, kind = role_of.get(id(v), (None, None, ""))
        roles[name] = mapping.ParamRole(role, permutation, name.rpartition(".")[0],
                                        tuple(int(d) for d in v.shape), required, kind)
    return roles


@contextlib.contextmanager
def reading_values(values: Sequence[Tuple[Any, Any]]) -> Iterator[None]:
    """Keras variables read the given values while the block runs: inside a check's stateless scope (see
    :func:`stateless`) by overriding the scope's entries (cast to the dtype the check feeds, and put back
    afterwards), outside any in a scope of their own."""
    mapping = compat.stateless_values()
    if mapping is None:
        with stateless([(v, tf.cast(value, v.dtype)) for v, value in values]):
            yield
        return
    missing = object()
    saved = [(id(v), mapping.get(id(v), missing)) for v, _ in values]
    for v, value in values:
        current = mapping.get(id(v))
        mapping[id(v)] = tf.cast(value, current.dtype if current is not None else v.dtype)
    try:
        yield
    finally:
        for key, before in saved:
            if before is missing:
                mapping.pop(key, None)
            else:
                mapping[key] = before


def with_values(model: Any, values: Sequence[Tuple[Any, Any]]) -> Any:
    """``model`` called with some of its (non-trainable) variables reading the given values; the model itself is
    never written."""

    def call(*args: Any, **kwargs: Any) -> Any:
        with reading_values(values):
            return model(*args, **kwargs)

    call.__name__ = call.__qualname__ = getattr(model, "name", type(model).__name__)
    call.__doc__ = f"Keras {type(model).__name__} {getattr(model, 'name', '')!r} with loaded non-trainable variables"
    call.fixed_values = values  # type: ignore[attr-defined]  # for the layer-by-layer mode
    return call
