"""JAX's 64-bit mode for a check: thread-local, put back on exit, and followed by host callbacks on XLA's threads.

Invariant: a check never writes the user's global ``jax_enable_x64`` flag where JAX offers a thread-local override
and its host callbacks can be wrapped: the mode is on in the check's thread only, for the duration of the check,
and exactly as it was afterwards, also when fn raises; a host callback lowered while a check's 64-bit scope is open
runs in that mode on whatever thread XLA calls it. The flat vectors between the core and fn are in
:func:`plumbing_dtype`, the widest float of the mode in force, which holds every checked value exactly.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, ContextManager, Iterator

import jax
import numpy as np

from .compat import global_x64, host_callback_context, thread_local_x64
from .state import ACTIVE


@contextlib.contextmanager
def enable_float64() -> Iterator[None]:
    """JAX's 64-bit mode for the duration of the check, in this thread only: the thread-local override of
    ``jax_enable_x64`` (see :func:`.compat.thread_local_x64`), put back on exit, also when the check raises. The
    global flag is never written, so no other thread sees the check's mode. Host callbacks XLA runs on threads of
    its own get the mode they were traced in (see :func:`follow_traced_x64`)."""
    with thread_local_x64():
        yield


def in_x64(callback: Callable[..., Any]) -> Callable[..., Any]:
    """``callback`` run in JAX's 64-bit mode (thread-local, put back when it returns) on whatever thread
    XLA calls it."""

    @functools.wraps(callback)
    def run(*args: Any) -> Any:
        with enable_float64():
            return callback(*args)

    return run


def follow_traced_x64() -> bool:
    """Make the host callbacks (``pure_callback``, ``io_callback``, ``jax.debug.callback``) lowered while a
    check's 64-bit scope is open in this thread run in 64-bit mode too. XLA runs a callback on a thread of
    its own when its arrays are large, and a thread-local mode is not seen there: the callback's float64
    arguments would arrive as float32 and its float64 results be refused. Each such callback is registered
    wrapped in the mode (:func:`in_x64`); JAX keys its compiled code on the mode, so the wrapped callbacks
    run only where the mode was on anyway. Returns False where JAX's internals differ (then a check sets the
    global flag while it runs fn, see :func:`process_x64`)."""
    context = host_callback_context()
    if context is None:  # pragma: no cover - another jax layout
        return False
    original = context.add_host_callback
    if getattr(original, "gradbridge_follows_x64", False):
        return True

    @functools.wraps(original)
    def add_host_callback(self: Any, host_callback: Any) -> None:
        if ACTIVE.problems and callable(host_callback) and bool(jax.config.jax_enable_x64):
            host_callback = in_x64(host_callback)
        return original(self, host_callback)

    add_host_callback.gradbridge_follows_x64 = True  # type: ignore[attr-defined]
    context.add_host_callback = add_host_callback
    return True


#: Whether host callbacks lowered inside a check run in its 64-bit mode on XLA's threads (see follow_traced_x64).
CALLBACKS_FOLLOW_X64 = follow_traced_x64()


def process_x64(needs_x64: bool) -> ContextManager[None]:
    """The process-wide x64 state of one window into the user's code: nothing, unless the check needs the 64-bit
    mode and host callbacks cannot follow the thread-local one (then the global flag, put back on exit)."""
    if CALLBACKS_FOLLOW_X64 or not needs_x64:
        return contextlib.nullcontext()
    return global_x64()  # pragma: no cover - a jax whose host callbacks cannot be wrapped


def plumbing_dtype() -> Any:
    """The widest float JAX gives under the current x64 setting (float64 in the 64-bit scope, else float32):
    the dtype of the flat vectors passed between the core and ``fn``."""
    return jax.dtypes.canonicalize_dtype(np.float64)
