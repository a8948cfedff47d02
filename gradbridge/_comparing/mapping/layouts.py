"""Input and output layouts of one implementation (NCHW <-> NHWC), applied to NumPy arrays.

Invariant: a layout only permutes axes, and converting there and back is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

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


class Arranger:
    """One implementation's :class:`Layout` applied to a comparison's runs, by the common argument names.

    ``arg_names`` are the user's positional arguments' common names; a layout key may be a position or a name.
    Values, gradients and measured magnitudes are turned to the common layout once computed (outputs after
    evaluation; input gradients and magnitudes after the precision measurement), cotangents to the
    implementation's before its VJP, inputs before conversion to its arrays."""

    def __init__(self, layout: Optional[Layout], arg_names: Sequence[str], label: str = "") -> None:
        self.layout = layout if layout is not None else Layout()
        self.label = label
        self.arg_names = tuple(arg_names)
        self.keys: Dict[str, Any] = {}
        for position, name in enumerate(arg_names):
            for key in (position, name):
                if key in self.layout.inputs:
                    self.keys[name] = key
        unknown = [key for key in self.layout.inputs if key not in self.keys.values()]
        if unknown:
            raise InvalidArgumentError(
                f"layouts[{label!r}]: input {unknown[0]!r} is not one of the positional arguments: give a position "
                f"(0 to {len(arg_names) - 1}) or a name ({', '.join(arg_names)})")

    def check_outputs(self, names: Sequence[str]) -> None:
        """Raise when the layout names an output the implementation does not return."""
        unknown = [name for name in self.layout.outputs if name not in names]
        if unknown:
            raise InvalidArgumentError(f"layouts[{self.label!r}]: output {unknown[0]!r} is not one of the outputs "
                                       f"({', '.join(names)}); name them as the report does: out, out[0], out['loss']")

    @property
    def channels_last(self) -> bool:
        """Whether it takes some input channels-last (its images, and its layers' activations, are (N, ..., C))."""
        return any(spec is channels_last_axes for spec in self.layout.inputs.values())

    def arrange(self, position: int, array: np.ndarray) -> np.ndarray:
        """The positional argument ``position`` laid out as the implementation takes it."""
        return self.input_to(self.arg_names[position], array) if position < len(self.arg_names) else array

    def input_to(self, name: str, array: np.ndarray) -> np.ndarray:
        key = self.keys.get(name)
        return array if key is None else self.layout.input_to_implementation(key, array)

    def input_from(self, name: str, array: np.ndarray) -> np.ndarray:
        key = self.keys.get(name)
        return array if key is None else self.layout.input_from_implementation(key, array)

    def outputs_from(self, values: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        return {name: self.layout.output_from_implementation(name, v) for name, v in values.items()}

    def inputs_from(self, gradients: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        return {name: self.input_from(name, g) for name, g in gradients.items()}

    def activation_from(self, array: np.ndarray) -> np.ndarray:
        """A layer's activation in the common layout: channels-first for a channels-last implementation's images."""
        if not self.channels_last or np.ndim(array) < 3:
            return array
        return np.ascontiguousarray(np.transpose(array, inverse(channels_last_axes(np.ndim(array)))))
