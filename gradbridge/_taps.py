"""``gb.tap``: name an intermediate value of an implementation, for ``gb.compare(..., layers=True)``.

Outside a layer-by-layer comparison ``tap(name, value)`` returns ``value`` and does nothing else, so taps can stay
in production code. Inside one, the comparison runs each implementation under :func:`tapping`: every tapped
value is recorded as the output of the layer ``name`` (in the order the taps ran), and, to measure the gradient
flowing into it, a zero of the same shape (one differentiated input per tap) is added to it.

Invariant: nothing is recorded or changed unless a comparison is tapping in this thread or context; a tap never
changes a value (it adds an exact zero).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, TypeVar

from ._errors import InvalidArgumentError

T = TypeVar("T")


class Taps:
    """The taps of one call: names (a name tapped again gets ``#2``, ``#3``), values, whether each is an
    adapter's layer whose activation is applied inside it (a Keras ``Dense(activation=...)``), and the layer's
    settings an adapter reads (``{"eps": 1e-5}``, ``{"approximate": "tanh"}``), in common names."""

    def __init__(self, deltas: Sequence[Any], cast: Optional[Callable[[Any, Any], Any]] = None) -> None:
        self.deltas = deltas
        self.cast = cast
        self.names: List[str] = []
        self.values: List[Any] = []
        self.fused: List[bool] = []
        self.settings: List[Dict[str, Any]] = []
        self._seen: Dict[str, int] = {}

    def take(self, name: str, value: Any, fused: bool = False, settings: Optional[Dict[str, Any]] = None) -> Any:
        count = self._seen[name] = self._seen.get(name, 0) + 1
        index = len(self.values)
        self.names.append(name if count == 1 else f"{name}#{count}")
        self.values.append(value)
        self.fused.append(fused)
        self.settings.append(dict(settings or {}))
        if not self.deltas:
            return value
        if index >= len(self.deltas):
            raise InvalidArgumentError(
                f"gb.tap: the function tapped more values ({index + 1}) than on its first call "
                f"({len(self.deltas)}); layers=True needs the same taps on every call")
        delta = self.deltas[index]
        return value + (self.cast(delta, value) if self.cast is not None else delta)


_ACTIVE: contextvars.ContextVar[Optional[Taps]] = contextvars.ContextVar("gradbridge_taps", default=None)


def tap(name: str, value: T) -> T:
    """Name ``value`` (one array) as the output of layer ``name``, for ``gb.compare(..., layers=True)``.

    Returns ``value``. In a layer-by-layer comparison the tapped values of two implementations are paired by name
    (then by position among values of the same shape) and compared in order, with the gradients flowing into
    them, to find the first layer where the implementations diverge. torch modules and Sequential or functional
    Keras models are tapped at every layer automatically; use ``tap`` in plain functions (JAX, NumPy, a
    subclassed Keras model's ``call``)::

        def mlp(params, x):
            h = gb.tap("fc1", x @ params["fc1.kernel"] + params["fc1.bias"])
            return jnp.tanh(h) @ params["fc2.kernel"]
    """
    taps = _ACTIVE.get()
    if taps is None:
        return value
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"gb.tap: name must be a non-empty string, got {name!r}")
    return taps.take(name, value)


def active() -> Optional[Taps]:
    """The taps being recorded in this context (for adapters that tap layers themselves), or None."""
    return _ACTIVE.get()


@contextlib.contextmanager
def tapping(deltas: Sequence[Any] = (), cast: Optional[Callable[[Any, Any], Any]] = None) -> Iterator[Taps]:
    """Record the taps of the calls in the block; with ``deltas`` (one per tap, in order) add them to the values,
    each first given the value's dtype by ``cast(delta, value)`` (the adapter's ``cast_like``) so a float32
    computation stays float32."""
    taps = Taps(deltas, cast)
    token = _ACTIVE.set(taps)
    try:
        yield taps
    finally:
        _ACTIVE.reset(token)
