"""Process-wide state: the one lock under which a check changes it, and only while it runs the user's code.

Some state the frameworks keep is per process, not per thread: torch's default dtype, the global random
generators of torch, NumPy, Python and TensorFlow, a module's ``training`` flags (an object every thread
shares). A check needs its own values there only while the user's code runs, so an adapter changes them in
a *window* around each call into that code (an evaluation of a chunk of points, a VJP or JVP, a hand-written
``grad=``), never for the whole check:

* every window holds :data:`LOCK` (re-entrant) from before it saves the state until after it put it back,
  so windows of checks in different threads never interleave, and windows of nested checks (``fn`` calling
  ``gradbridge.check``) nest: each puts back exactly what it found, and the outermost what the process had;
* between windows, and after the check, every thread sees exactly the state it would see without the check.

Thread-local state (torch's grad and inference modes, JAX's 64-bit scope) is set for the whole check in the
check's own thread and is never seen by another thread. Nothing here imports a framework.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, ContextManager, Iterator, TypeVar

#: Held by every window in which a check has changed process-wide state (see the module docstring); also
#: held by in-process executor workers around their evaluations (``gradbridge._checking.executor``).
LOCK = threading.RLock()

Method = TypeVar("Method", bound=Callable[..., Any])


class Window:
    """One check's window: ``with window():`` takes :data:`LOCK` and enters ``change()`` (which saves the
    process-wide state, sets the check's, and restores on exit) unless a window of this object is already
    open in this thread (a method running user code that calls another one): that one's state is in force."""

    def __init__(self, change: Callable[[], ContextManager[Any]]) -> None:
        self._change = change
        self._depth = 0  # read and written only under LOCK, by the thread holding it

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with LOCK:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self._depth = 1
            try:
                with self._change():
                    yield
            finally:
                self._depth = 0


def runs_user_code(method: Method) -> Method:
    """A prepared function's method that runs the user's code: it runs inside ``self.problem.window()`` (or
    ``self.window()`` for a prepared function that is its own problem)."""

    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        with getattr(self, "problem", self).window():
            return method(self, *args, **kwargs)

    return run  # type: ignore[return-value]


__all__ = ["LOCK", "Window", "runs_user_code"]
