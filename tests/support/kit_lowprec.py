"""Low-precision kernels: one NumPy-defined op that, like many custom kernels, runs in ONE dtype only.

``make_kernel(backend, forward, backward, dtype)`` returns ``(fn, to_native, options)`` like
``kits.make_op``, but the op refuses any other dtype: its forward raises ``KernelDtypeError`` when an
input is not ``dtype`` (float32, float16 or bfloat16), and its backward raises when an input or the
cotangent is not ``dtype`` (a check must hand the backward a cotangent in the output's dtype). Inside, the
kernel computes as such kernels do: inputs widened to float32, the NumPy ``forward``/``backward`` run in
float32, results rounded to ``dtype`` on the way out.

``forward(*arrays)`` and ``backward(cotangent, *arrays)`` (one gradient per input) see float32 arrays.
``to_native(numpy_array)`` gives the framework's array in ``dtype``. bfloat16 NumPy arrays use
``ml_dtypes`` (installed with JAX).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Tuple

import numpy as np

Forward = Callable[..., np.ndarray]
Backward = Callable[..., Tuple[np.ndarray, ...]]


class KernelDtypeError(TypeError):
    """The kernel was called with an array of a dtype it does not run in."""


def numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _require(arrays: Sequence[Any], dtype_name: str, what: str) -> None:
    for k, a in enumerate(arrays):
        got = str(a.dtype).replace("torch.", "").replace("<dtype: '", "").replace("'>", "")
        if got != dtype_name:
            raise KernelDtypeError(f"kernel runs in {dtype_name} only; {what} {k} has dtype {got}")


def _host_forward(forward: Forward, dtype: np.dtype) -> Callable[..., np.ndarray]:
    def run(*arrays: np.ndarray) -> np.ndarray:
        return np.asarray(forward(*[np.asarray(a).astype(np.float32) for a in arrays]),
                          dtype=np.float32).astype(dtype)
    return run


def _host_backward(backward: Backward, dtype: np.dtype) -> Callable[..., Tuple[np.ndarray, ...]]:
    def run(cotangent: np.ndarray, *arrays: np.ndarray) -> Tuple[np.ndarray, ...]:
        grads = backward(np.asarray(cotangent).astype(np.float32), *[np.asarray(a).astype(np.float32) for a in arrays])
        return tuple(np.asarray(g, dtype=np.float32).reshape(np.shape(a)).astype(dtype) for g, a in zip(grads, arrays))
    return run


def make_kernel(backend: str, forward: Forward, backward: Backward, dtype: str = "float32"):
    """``(fn, to_native, options)`` for a ``dtype``-only kernel on ``backend``."""
    return _MAKERS[backend](_host_forward(forward, numpy_dtype(dtype)), _host_backward(backward, numpy_dtype(dtype)),
                            dtype)


def _numpy(forward, backward, dtype: str):
    def kernel(*inputs):
        _require(inputs, dtype, "input")
        return forward(*inputs)

    def vjp(cotangent, *inputs):
        _require(inputs, dtype, "input")
        _require([np.asarray(cotangent)], dtype, "cotangent")
        return backward(cotangent, *inputs)

    kernel.__name__ = f"{dtype}_kernel"
    return kernel, (lambda a: np.asarray(a).astype(numpy_dtype(dtype))), {"grad": vjp}


def _torch(forward, backward, dtype: str):
    import torch

    torch_dtype = getattr(torch, dtype)

    def host(t):
        return t.detach().cpu().to(torch.float32).numpy() if t.dtype == torch.bfloat16 else t.detach().cpu().numpy()

    def native(array):
        return torch.as_tensor(np.asarray(array, dtype=np.float32)).to(torch_dtype)

    class Kernel(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            _require(inputs, dtype, "input")
            ctx.save_for_backward(*inputs)
            return native(forward(*[host(t) for t in inputs]))

        @staticmethod
        def backward(ctx, cotangent):
            inputs = ctx.saved_tensors
            _require(inputs, dtype, "input")
            _require([cotangent], dtype, "cotangent")
            return tuple(native(g) for g in backward(host(cotangent), *[host(t) for t in inputs]))

    return Kernel.apply, (lambda a: native(np.asarray(a))), {}


def _jax(forward, backward, dtype: str):
    import jax
    import jax.numpy as jnp

    jax_dtype = numpy_dtype(dtype)

    def call_forward(*inputs):
        _require(inputs, dtype, "input")  # at trace time, like a kernel's dtype dispatch
        shape = np.shape(forward(*[np.zeros(x.shape, jax_dtype) for x in inputs]))
        return jax.pure_callback(forward, jax.ShapeDtypeStruct(shape, jax_dtype), *inputs,
                                 vmap_method="sequential")

    @jax.custom_vjp
    def kernel(*inputs):
        return call_forward(*inputs)

    def kernel_fwd(*inputs):
        return call_forward(*inputs), inputs

    def kernel_bwd(inputs, cotangent):
        _require(inputs, dtype, "input")
        _require([cotangent], dtype, "cotangent")
        structs = tuple(jax.ShapeDtypeStruct(x.shape, jax_dtype) for x in inputs)
        return tuple(jax.pure_callback(backward, structs, cotangent, *inputs, vmap_method="sequential"))

    kernel.defvjp(kernel_fwd, kernel_bwd)
    return kernel, (lambda a: jnp.asarray(np.asarray(a).astype(jax_dtype))), {}


def _tensorflow(forward, backward, dtype: str):
    import tensorflow as tf

    tf_dtype = tf.as_dtype(dtype)

    @tf.custom_gradient
    def kernel(*inputs):
        _require(inputs, dtype, "input")
        output = tf.numpy_function(forward, list(inputs), tf_dtype)

        def grad(cotangent):
            _require(inputs, dtype, "input")
            _require([cotangent], dtype, "cotangent")
            grads = tf.numpy_function(backward, [cotangent, *inputs], [tf_dtype] * len(inputs))
            if not isinstance(grads, (list, tuple)):
                grads = [grads]
            return [tf.reshape(g, tf.shape(x)) for g, x in zip(grads, inputs)]

        return tf.reshape(output, tf.shape(forward(*[np.zeros(x.shape, np.float32) for x in inputs]))), grad

    return kernel, (lambda a: tf.cast(tf.constant(np.asarray(a, dtype=np.float32)), tf_dtype)), {}


def _autograd(forward, backward, dtype: str):
    from autograd.extend import defvjp_argnums, primitive

    @primitive
    def kernel(*inputs):
        _require(inputs, dtype, "input")
        return forward(*inputs)

    def kernel_vjp(argnums, ans, inputs, kwargs):
        def vjp(cotangent):
            _require(inputs, dtype, "input")
            _require([cotangent], dtype, "cotangent")
            grads = backward(cotangent, *inputs)
            return tuple(grads[k] for k in argnums)

        return vjp

    defvjp_argnums(kernel, kernel_vjp)
    return kernel, (lambda a: np.asarray(a).astype(numpy_dtype(dtype))), {}


_MAKERS = {"numpy": _numpy, "torch": _torch, "jax": _jax, "tensorflow": _tensorflow, "autograd": _autograd}
