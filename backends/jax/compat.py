"""Every private or version-dependent JAX API the JAX backend uses, in one place.

Invariant: no other file of this backend imports ``jax._src``, ``jax.core`` or ``jax.experimental``, or relies on
an API whose presence depends on the JAX release (the thread-local x64 override, the jaxpr call primitives' names,
jaxlib's jitted-function type); each is reached through a name defined here, with a comment saying what it is
used for. Where a release lacks one, the fallback keeps the check correct (a slower probe, the global x64 flag
set only while fn runs, jitted functions not claimed by detection), never one that changes a number the check
reports.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp

# ``Literal``: a constant operand of a jaxpr equation (no data dependency), when following a jaxpr's dependencies
try:  # the public home of jaxpr types since jax 0.4.3x
    from jax.extend.core import Literal
except ImportError:  # pragma: no cover - older jax
    from jax.core import Literal  # type: ignore[attr-defined,no-redef]

# ``Tracer``: every trace's placeholder value (jit, vmap, grad, linearize): how a check tells that it was given
# tracers, and that fn left some in its own state
try:
    Tracer: Any = jax.core.Tracer
except AttributeError:  # pragma: no cover - a jax that moved it
    from jax._src.core import Tracer

#: The primitives of calls of jit-compiled sub-jaxprs (``pjit`` before jax 0.7, ``jit`` after; ``closed_call``),
#: whose ``params["jaxpr"]`` is followed inside when tracing a jaxpr's data dependencies (symbolic zeros).
CALL_PRIMITIVES = ("jit", "pjit", "closed_call")

__all__ = ["CALL_PRIMITIVES", "Literal", "Tracer", "global_x64", "host_callback_context", "is_jit_function",
           "staging", "thread_local_x64"]


def staging() -> bool:
    """Whether JAX is staging code now (inside jax.jit or jax.make_jaxpr): every array made is then a tracer.
    Eager autodiff and eager vmap are not staging: arrays made from constants there are concrete. Used to refuse
    a check called inside ``jax.jit``."""
    try:  # about 1 us; private (jax._src.core.unsafe_am_i_under_a_jit), so checked for
        from jax._src.core import unsafe_am_i_under_a_jit

        return bool(unsafe_am_i_under_a_jit())
    except Exception:  # pragma: no cover - a jax without it: ask an array (about 0.1 ms)
        return isinstance(jnp.zeros(()), Tracer)


@contextlib.contextmanager
def thread_local_x64() -> Iterator[None]:
    """JAX's 64-bit mode in this thread only, put back on exit: ``jax.enable_x64.swap_local`` (since jax 0.8);
    ``jax.experimental.enable_x64()`` before. Used for the check's 64-bit scope (see :mod:`.x64`)."""
    state = getattr(jax, "enable_x64", None)
    if state is None or not hasattr(state, "swap_local"):  # pragma: no cover - jax < 0.8
        from jax.experimental import enable_x64

        with enable_x64(True):
            yield
        return
    previous_local = state.swap_local(True)
    try:
        yield
    finally:
        state.set_local(previous_local)


@contextlib.contextmanager
def global_x64() -> Iterator[None]:  # pragma: no cover - only a jax whose host callbacks cannot be wrapped
    """The global ``jax_enable_x64`` flag on, put back on exit (``jax.enable_x64.get_global/set_global``): the
    fallback for host callbacks where :func:`host_callback_context` is missing, used only while fn runs."""
    state = jax.enable_x64
    previous = state.get_global()
    state.set_global(True)
    try:
        yield
    finally:
        state.set_global(previous)


def host_callback_context() -> Optional[Any]:
    """``jax._src.interpreters.mlir.ModuleContext`` (private), whose ``add_host_callback`` registers every host
    callback lowered (``pure_callback``, ``io_callback``, ``jax.debug.callback``): wrapped so that callbacks run
    in the mode they were traced in (see :func:`.x64.follow_traced_x64`). None where JAX's internals differ."""
    try:
        from jax._src.interpreters import mlir
    except ImportError:  # pragma: no cover - another jax layout
        return None
    context = getattr(mlir, "ModuleContext", None)
    if getattr(context, "add_host_callback", None) is None:  # pragma: no cover - another jax layout
        return None
    return context


def is_jit_function(value: Any) -> bool:
    """Whether ``value`` is a ``jax.jit`` function: jaxlib's ``PjitFunction`` type (not exported), by name; used
    by backend detection only."""
    return type(value).__name__ == "PjitFunction"
