"""Input and output layouts of one implementation (NCHW <-> NHWC), applied to NumPy arrays.

Invariant: a layout only permutes axes, and converting there and back is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import (Any, Mapping, Sequence, Tuple)

import numpy as np

from ..._errors import InvalidArgumentError
from .roles import inverse

# --- input and output layouts ---

#: Channels-first to channels-last for a batch of images (N, C, H, W) -> (N, H, W, C), any number of spatial axes.
def channels_last_axes(ndim: int) -> Tuple[int, ...]:
    """(N, C, *spatial) -> (N, *spatial, C)."""
    return (0,) + tuple(range(2, ndim)) + (1,)


@dataclass(frozen=True)
class Layout:
    """How one implementation lays out some of its inputs and outputs, relative to the others (NumPy side).

    ``inputs``/``outputs`` name argument positions (int) or names (str), and output names, each with the
    permutation from the common layout to the implementation's (or a callable ``ndim -> permutation``).
    :func:`channels_last` builds the usual one. The core permutes an input before converting it to the
    implementation's arrays, an output (and its gradient) after, and a cotangent before.
    """

    inputs: Mapping[Any, Any] = field(default_factory=dict)
    outputs: Mapping[str, Any] = field(default_factory=dict)

    @staticmethod
    def _axes(spec: Any, ndim: int) -> Tuple[int, ...]:
        axes = tuple(spec(ndim) if callable(spec) else spec)
        if sorted(axes) != list(range(ndim)):
            raise InvalidArgumentError(f"layout: {axes} is no permutation of the {ndim} axes of the array")
        return axes

    def input_to_implementation(self, key: Any, array: np.ndarray) -> np.ndarray:
        spec = self.inputs.get(key)
        return array if spec is None else np.ascontiguousarray(np.transpose(array, self._axes(spec, np.ndim(array))))

    def input_from_implementation(self, key: Any, array: np.ndarray) -> np.ndarray:
        """An input's gradient (laid out as the implementation takes it) in the common layout."""
        spec = self.inputs.get(key)
        return array if spec is None else np.ascontiguousarray(
            np.transpose(array, inverse(self._axes(spec, np.ndim(array)))))

    def output_from_implementation(self, name: str, array: np.ndarray) -> np.ndarray:
        spec = self.outputs.get(name)
        return array if spec is None else np.ascontiguousarray(
            np.transpose(array, inverse(self._axes(spec, np.ndim(array)))))

    def output_to_implementation(self, name: str, array: np.ndarray) -> np.ndarray:
        """A cotangent (in the common layout) as the implementation's output is laid out."""
        spec = self.outputs.get(name)
        return array if spec is None else np.ascontiguousarray(np.transpose(array, self._axes(spec, np.ndim(array))))


def channels_last(inputs: Sequence[Any] = (0,), outputs: Sequence[str] = ()) -> Layout:
    """The layout of an implementation that takes (and returns) channels-last arrays (N, *spatial, C) where the
    others use channels-first (N, C, *spatial): ``inputs`` are argument positions or names, ``outputs`` output
    names (``out``, ``out[0]``)."""
    return Layout({key: channels_last_axes for key in inputs}, {name: channels_last_axes for name in outputs})
