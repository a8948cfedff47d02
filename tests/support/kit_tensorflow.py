"""TensorFlow kit: the op becomes a ``tf.custom_gradient`` whose forward and backward call NumPy.

Both sides go through ``tf.numpy_function``, so the gradient TensorFlow reports is exactly the NumPy
backward under test (TensorFlow cannot differentiate the NumPy forward on its own).
"""

from __future__ import annotations

import numpy as np


def make(forward, backward):
    import tensorflow as tf

    @tf.custom_gradient
    def numpy_op(*inputs):
        dtype = inputs[0].dtype
        with np.errstate(all="ignore"):  # a real result of complex inputs (a loss) stays real
            probe = np.asarray(forward(*[np.zeros(x.shape, x.dtype.as_numpy_dtype) for x in inputs]))
        if dtype.is_complex and not np.iscomplexobj(probe):
            dtype = dtype.real_dtype
        numpy_dtype = dtype.as_numpy_dtype

        def run_forward(*arrays):
            return np.asarray(forward(*arrays), dtype=numpy_dtype)

        def run_backward(cotangent, *arrays):  # TensorFlow's complex convention is gradbridge's
            return tuple(np.asarray(g, dtype=x.dtype) for g, x in zip(backward(cotangent, *arrays), arrays))

        output = tf.numpy_function(run_forward, list(inputs), dtype)

        def grad(cotangent):
            grads = tf.numpy_function(run_backward, [cotangent, *inputs], [x.dtype for x in inputs])
            if not isinstance(grads, (list, tuple)):  # numpy_function unwraps a one-element Tout
                grads = [grads]
            return [tf.reshape(g, tf.shape(x)) for g, x in zip(grads, inputs)]

        return output, grad

    return numpy_op, (lambda a: tf.constant(np.asarray(a), dtype=tf.float64)), {}
