"""The outputs of a Keras model's layers at one input, for ``gb.compare``'s layer-by-layer mode.

Invariant: the user's model is not changed: a second functional model over the same layers (sharing their
weights, adding none) computes every layer's output in one call, and is dropped afterwards.
"""

from __future__ import annotations

from typing import Any, Callable, List, Tuple

import numpy as np

from .keras import is_keras_layer


def layer_outputs(fn: Callable[..., Any], args: Tuple[Any, ...]) -> List[Tuple[str, np.ndarray]]:
    """``[(layer name, output as float64 NumPy), ...]`` in the model's layer order, for a Sequential or
    functional Keras model given as ``fn``; empty for anything else (a subclassed model has no symbolic outputs
    to read)."""
    if not is_keras_layer(fn) or not getattr(fn, "layers", None):
        return []
    import keras

    try:
        inputs = fn.inputs[0] if len(fn.inputs) == 1 else fn.inputs
        layers = [layer for layer in fn.layers if not isinstance(layer, keras.layers.InputLayer)]
        outputs = [layer.output for layer in layers]
    except (AttributeError, ValueError):  # a subclassed model, or one never called
        return []
    probe = keras.Model(inputs, outputs)
    values = probe(args[0] if len(args) == 1 else list(args))
    if not isinstance(values, (list, tuple)):
        values = [values]
    return [(layer.name, np.asarray(value, dtype=np.float64)) for layer, value in zip(layers, values)]
