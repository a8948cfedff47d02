"""What a TensorFlow value is to a check: tensors, dtypes, composite tensors, and flat float64 vectors.

Invariant: every conversion here between TensorFlow values and the check's flat float64 vectors is exact
(a widening cast or a reshape) and, where it runs on a tape, differentiable; a gradient TensorFlow gives as
None stays None (or becomes explicit zeros, recorded by the caller), never a silent number.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from gradbridge._adapter import LeafSpec
from gradbridge._precision import DTYPE_EPS

from . import compat
from .keras import is_keras_variable

#: A source of differentiation: the tensor or variable that stands for one checked leaf during a call.
Source = Any
#: Runs the user's function (or its gradient) on the sources; returns the output tensors.
Forward = Callable[[List[Source]], List[tf.Tensor]]

EPS = DTYPE_EPS  # machine epsilon by dtype name (shared with the core)
NO_GRADIENT = ("TensorFlow returned None: no differentiable path leads from this input to the outputs "
               "(tf.stop_gradient, a cast to an integer type, or an op without a gradient such as "
               "tf.numpy_function outside a tf.custom_gradient)")

#: TensorFlow's composite tensors: detected as TensorFlow's, never perturbed (see :func:`not_checkable`).
COMPOSITE = (tf.SparseTensor, tf.RaggedTensor)


def is_tensor(value: Any) -> bool:
    return isinstance(value, (tf.Tensor, tf.Variable)) or is_keras_variable(value)


def not_checkable(value: Any) -> str:
    """Why a composite tensor among the arguments is not checked ("" for anything else)."""
    if isinstance(value, tf.SparseTensor):
        return ("a tf.SparseTensor: gradbridge perturbs dense tensors element by element; pass tf.sparse.to_dense(x) "
                "(and tf.sparse.from_dense inside fn) to check its values. It is passed to fn unchanged")
    if isinstance(value, tf.RaggedTensor):
        return ("a tf.RaggedTensor: gradbridge perturbs dense tensors element by element; pass its flat_values (or "
                "x.to_tensor()) and rebuild it inside fn to check its values. It is passed to fn unchanged")
    return ""


def dtype_of(value: Any) -> tf.DType:
    return tf.as_dtype(value.dtype)


def is_floating(value: Any) -> bool:
    return dtype_of(value).is_floating


def as_float64(value: Any) -> np.ndarray:
    """A tensor's or variable's value as a float64 NumPy array."""
    return np.asarray(value.numpy()).astype(np.float64)


def eps_of(dtype: tf.DType) -> float:
    return EPS.get(dtype.name, EPS["float32"])


def is_tf_function(fn: Any) -> bool:
    return isinstance(fn, compat.POLYMORPHIC_FUNCTION)


def private_copy(fn: Any) -> Any:
    """A fresh ``tf.function`` of the same Python function and options (its own, empty, trace cache)."""
    if not is_tf_function(fn):
        return fn
    clone = compat.clone_tf_function(fn)
    if clone is not None:
        return clone
    return tf.function(fn.python_function, input_signature=fn.input_signature)


def flat(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    """One float64 vector of all outputs (differentiable: the casts are on the tape)."""
    return tf.concat([tf.reshape(tf.cast(t, tf.float64), [-1]) for t in tensors], axis=0)


def watch(tape: tf.GradientTape, sources: Sequence[Source]) -> None:
    for source in sources:
        tape.watch(source)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


def dense(gradient: Any) -> Optional[tf.Tensor]:
    if gradient is None:
        return None
    if isinstance(gradient, tf.IndexedSlices):
        gradient = tf.convert_to_tensor(gradient)
    return gradient


def joined(leaves: Sequence[LeafSpec], gradients: Sequence[Optional[tf.Tensor]]) -> tf.Tensor:
    """One flat float64 vector of per-leaf gradients, zeros where TensorFlow gave None (differentiable)."""
    return tf.concat([tf.zeros([leaf.size], tf.float64) if g is None else tf.reshape(tf.cast(g, tf.float64), [-1])
                      for leaf, g in zip(leaves, gradients)], axis=0)


def to_array(value: Any) -> np.ndarray:
    """A gradient a hand-written ``grad=`` returned (tensor, variable, array, number) as a float64 NumPy array."""
    if isinstance(value, tf.IndexedSlices):
        value = tf.convert_to_tensor(value)
    if is_tensor(value):
        value = value.numpy()
    array = np.asarray(value)
    return array.astype(np.complex128 if np.iscomplexobj(array) else np.float64)  # complex: for a complex leaf
