"""autograd kit: the op becomes an ``autograd.extend.primitive`` whose VJP (``defvjp_argnums``) calls the NumPy
backward once per cotangent.

The primitive's forward and backward receive plain NumPy arrays (autograd unboxes a primitive's arguments), so
the NumPy functions run as written. autograd still differentiates such a rule again for ``order=2`` (through the
forward pass), but cannot transpose its NumPy backward (``vjp_transposed``), which the adapter reports as
unsupported. Inputs stay float64 NumPy arrays.
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import numpy as np


def make(forward: Callable[..., np.ndarray], backward: Callable[..., Tuple[np.ndarray, ...]]):
    """``(fn, to_native, options)``: ``fn`` is an autograd primitive calling ``forward``, its VJP ``backward``."""
    from autograd.extend import defvjp_argnums, primitive

    @primitive
    def op(*inputs: Any) -> Any:
        return forward(*inputs)

    def vjp_maker(argnums, ans, args, kwargs):
        def vjp(g):  # autograd's complex convention is the conjugate of gradbridge's
            grads = backward(np.conj(np.asarray(g)), *args)
            return tuple(np.conj(grads[i]) for i in argnums)

        return vjp

    defvjp_argnums(op, vjp_maker)
    return op, (lambda a: np.array(a, dtype=np.float64)), {}
