"""Per-backend kits that turn one NumPy-defined custom op into that framework's custom-gradient mechanism.

A shared test describes an op by a NumPy forward and a NumPy VJP (``backward(cotangent, *inputs)``
returning one gradient per input). ``make_op(backend, forward, backward)`` returns
``(fn, to_native, options)``: ``fn`` is the op as that framework's users write it (NumPy ``fn`` with
``grad=``, a ``torch.autograd.Function``, a ``jax.custom_vjp``, a ``tf.custom_gradient``), ``to_native``
converts a NumPy input to the framework's array, and ``options`` go to ``gb.check``. The seeded bug
lives in the backward, so the same bug is checked the same way on every backend. Each backend's kit is
the ``make`` function of ``tests/support/kit_<backend>.py``.
"""

from __future__ import annotations

import importlib
from typing import Callable, Tuple

import numpy as np

Op = Callable[..., np.ndarray]
Backward = Callable[..., Tuple[np.ndarray, ...]]


def make_op(backend: str, forward: Op, backward: Backward):
    """``(fn, to_native, options)`` for ``backend``; options go to ``gb.check`` (e.g. ``grad=``)."""
    return importlib.import_module(f"kit_{backend}").make(forward, backward)
