"""JAX kit: the op becomes a ``jax.custom_vjp`` whose forward and backward call NumPy via ``jax.pure_callback``.

The callbacks use ``vmap_method="sequential"`` so the op also runs under ``jax.vmap`` (the adapter batches
evaluations that way): the NumPy functions always see one point's arrays. Inputs are converted to float32
JAX arrays, so every check also exercises the adapter's promotion to float64 copies.
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import numpy as np


def make(forward: Callable[..., np.ndarray], backward: Callable[..., Tuple[np.ndarray, ...]]):
    """``(fn, to_native, options)``: ``fn`` is a ``jax.custom_vjp`` op calling ``forward``/``backward``."""
    import jax
    import jax.numpy as jnp

    def call_forward(*inputs: Any) -> Any:
        dtype = inputs[0].dtype
        with np.errstate(all="ignore"):  # shape probe on zeros, at trace time
            probe = forward(*[np.zeros(x.shape, x.dtype) for x in inputs])
        shape = np.shape(probe)
        if np.iscomplexobj(np.zeros((), dtype)) and not np.iscomplexobj(probe):  # a real loss of complex inputs
            dtype = np.zeros((), dtype).real.dtype
        return jax.pure_callback(lambda *arrays: np.asarray(forward(*arrays), dtype=dtype),
                                 jax.ShapeDtypeStruct(shape, dtype), *inputs, vmap_method="sequential")

    @jax.custom_vjp
    def op(*inputs: Any) -> Any:
        return call_forward(*inputs)

    def op_fwd(*inputs: Any) -> Tuple[Any, Tuple[Any, ...]]:
        return call_forward(*inputs), inputs

    def op_bwd(inputs: Tuple[Any, ...], cotangent: Any) -> Tuple[Any, ...]:
        structs = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs)

        def host_backward(g: np.ndarray, *arrays: np.ndarray) -> Tuple[np.ndarray, ...]:
            # JAX's complex convention is the conjugate of gradbridge's, for the cotangent and the gradients
            grads = backward(np.conj(np.asarray(g)), *arrays)
            return tuple(np.asarray(np.conj(grad), dtype=s.dtype) for grad, s in zip(grads, structs))

        return tuple(jax.pure_callback(host_backward, structs, cotangent, *inputs, vmap_method="sequential"))

    op.defvjp(op_fwd, op_bwd)
    return op, (lambda a: jnp.asarray(np.asarray(a, dtype=np.float32))), {}
