"""A Keras model's layers tapped, for ``gb.compare``'s layer-by-layer mode (:class:`gradbridge._adapter.LayerTaps`).

Invariant: the user's model is not changed: its functional graph is run as its own ``call`` runs it, with each
layer's output passed through the comparison's taps on the way (nothing is registered on the model or its layers).
A Dense or Conv layer with a non-linear ``activation`` is tapped after it and marked as fused, so the comparison
may match it with another framework's separate activation layer.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import tensorflow as tf

from gradbridge._adapter import ParamBinding
from gradbridge._taps import active

from . import compat
from .keras import is_keras_layer, reading_values


def _fused(layer: Any) -> bool:
    """A layer with weights that applies a non-linear activation to its result (``Dense(activation="tanh")``);
    an ``Activation`` layer is the activation itself."""
    activation = getattr(layer, "activation", None)
    return (activation is not None and getattr(activation, "__name__", "") != "linear"
            and type(layer).__name__ != "Activation" and bool(getattr(layer, "weights", ())))


def settings(layer: Any) -> Dict[str, Any]:
    """A layer's settings that ports get wrong, in the torch adapter's common names: ``eps`` of a normalisation
    (Keras' ``epsilon``), ``activation`` (``gelu`` is Keras' exact GELU, ``gelu_tanh`` its approximation),
    ``negative_slope``."""
    found: Dict[str, Any] = {}
    epsilon = getattr(layer, "epsilon", None)
    if isinstance(epsilon, float) and "Normalization" in type(layer).__name__:
        found["eps"] = epsilon
    activation = getattr(layer, "activation", None)
    name = getattr(activation, "__name__", None)
    if name and name != "linear":
        found["activation"] = _ACTIVATION_NAMES.get(name, name)
    if type(layer).__name__ in _ACTIVATION_LAYERS:
        found["activation"] = _ACTIVATION_LAYERS[type(layer).__name__]
    slope = getattr(layer, "negative_slope", None)
    if isinstance(slope, float):
        found["negative_slope"] = slope
    return found


#: Keras activation functions and layers by the torch adapter's common names.
_ACTIVATION_NAMES = {"swish": "silu"}
_ACTIVATION_LAYERS = {"ReLU": "relu", "LeakyReLU": "leaky_relu", "ELU": "elu", "Softmax": "softmax"}


def _tapped(operation: Any) -> Any:
    keras = compat.loaded_keras()
    if not isinstance(operation, keras.layers.Layer) or isinstance(operation, compat.input_layer_type()):
        return operation

    def call(*args: Any, **kwargs: Any) -> Any:
        output = operation(*args, **kwargs)
        taps = active()
        if taps is None or not tf.is_tensor(output) or not output.dtype.is_floating:
            return output
        return taps.take(operation.name, output, _fused(operation), settings(operation))

    return call


def with_layer_taps(binding: ParamBinding, layered: Callable[..., Any]) -> Optional[Callable[..., Any]]:
    """The tapped form of a Sequential or functional Keras model (``binding.params``), else None."""
    model = binding.params
    if not is_keras_layer(model):
        return None
    graph = compat.layer_graph(model)
    if graph is None:
        return None
    fixed = getattr(binding.fn, "fixed_values", ())

    def call(*args: Any, **kwargs: Any) -> Any:
        inputs = args[0] if len(args) == 1 else list(args)
        with reading_values(fixed):
            return compat.run_layer_graph(graph, inputs, _tapped)

    def tapped(layers: Any, *args: Any, **kwargs: Any) -> Any:
        return layered(call, layers, *args, **kwargs)

    tapped.__name__ = tapped.__qualname__ = getattr(model, "name", type(model).__name__)
    return tapped
