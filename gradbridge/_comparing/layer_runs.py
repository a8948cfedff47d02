"""Running each implementation with its layers tapped, for ``gb.compare(..., layers=True)``.

An implementation's layers are the values passed through :func:`gradbridge.tap` while it runs: every layer of a
torch module or a Sequential/functional Keras model (its adapter taps them, :class:`gradbridge._adapter.LayerTaps`),
and the user's own taps in a plain function. The implementation is checked as a function of one more argument,
``layers`` (a zero per tap, added to the tapped value), returning its outputs and its tapped values; prepared by
its adapter as the comparison's own run (the same parameters, float64, modes and RNG pinning), so one evaluation
gives every layer's output and one VJP with the comparison's cotangent gives the gradient flowing into every layer.
Each layer's magnitudes are measured as the outputs' are (:func:`.runs.measure_precision`).

Invariant: tapping changes no value (the added zeros are exact); an implementation that cannot be tapped is
named in a note, never compared on guesses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .._adapter import LayerTaps, offered
from .._taps import tapping
from .runs import ImplementationRun, evaluate_run, gradient_run, measure_precision, _prepare

#: The name the layered function gives the zeros added to the tapped values.
LAYERS_ARGUMENT = "layers"


class Layered:
    """``layered(call, deltas, *args, **kwargs)``: ``(call's outputs, tuple of tapped values)``, with
    ``deltas[i]`` added to the i-th tapped value; remembers the taps' names of the last call."""

    def __init__(self, cast: Optional[Callable[[Any, Any], Any]] = None) -> None:
        self.cast = cast
        self.names: List[str] = []
        self.fused: List[bool] = []
        self.settings: List[Dict[str, Any]] = []

    def __call__(self, call: Callable[..., Any], deltas: Tuple[Any, ...], *args: Any, **kwargs: Any) -> Any:
        with tapping(tuple(deltas), self.cast) as taps:
            out = call(*args, **kwargs)
        self.names, self.fused, self.settings = list(taps.names), list(taps.fused), list(taps.settings)
        return out, tuple(taps.values)


@dataclass
class LayerTrace:
    """One implementation's layers at the compared point: names in the order they ran, outputs, the gradients
    flowing into them (None where not measured), the magnitudes each was computed from, and the run."""

    label: str
    names: List[str]
    fused: List[bool]
    values: List[np.ndarray]
    gradients: List[Optional[np.ndarray]]
    value_magnitudes: List[Optional[np.ndarray]] = field(default_factory=list)
    gradient_magnitudes: List[Optional[np.ndarray]] = field(default_factory=list)
    run: Optional[ImplementationRun] = None
    settings: List[Dict[str, Any]] = field(default_factory=list)

    def settings_of(self, index: int) -> Dict[str, Any]:
        return self.settings[index] if index < len(self.settings) else {}


def _layered_function(run: ImplementationRun, layered: Layered) -> Callable[..., Any]:
    """The implementation as a function of ``(layers, *args)``: its adapter's tapped form, or ``fn`` itself
    (its own ``gb.tap`` calls are the layers)."""
    adapter = run.entry.adapter
    with_taps = offered(adapter, LayerTaps, "with_layer_taps")
    if with_taps is not None:
        tapped = with_taps(run.binding, layered)
        if tapped is not None:
            return tapped
    fn = run.binding.fn
    return lambda deltas, *args, **kwargs: layered(fn, deltas, *args, **kwargs)


def _output_name(main_name: str) -> str:
    """The name of one of fn's outputs inside the layered function's ``(outputs, layers)``."""
    return "out[0]" + main_name[len("out"):]


def _layer_outputs(prepared: Any) -> Dict[int, str]:
    """Tap index -> output name (``out[1][i]``) among the layered function's floating outputs."""
    prefix = "out[1]["
    return {int(spec.name[len(prefix):-1]): spec.name for spec in prepared.output_specs
            if spec.name.startswith(prefix) and spec.name.endswith("]") and spec.name[len(prefix):-1].isdigit()}


def trace_layers(run: ImplementationRun, cotangent: np.ndarray, seed: int,
                 params: Optional[Dict[str, np.ndarray]]) -> Tuple[Optional[LayerTrace], Optional[str]]:
    """The layers of one implementation, or None and a note saying why it has none to compare."""
    label = run.entry.label
    if run.binding.grad is not None:
        return None, (f"layers: {label} has a hand-written gradient, which cannot give the gradients flowing into "
                      "its layers; it is not compared layer by layer")
    layered = Layered(getattr(run.entry.adapter, "cast_like", None))
    fn = _layered_function(run, layered)
    try:
        discovery = _layered_run(run, fn, (), params)
        evaluate_run(discovery, params)
        names, fused = list(layered.names), list(layered.fused)
        found = _layer_outputs(discovery.prepared)
        if not names:
            return None, (f"layers: {label} has no layers to compare: neither a torch module nor a Sequential or "
                          "functional Keras model, and no gb.tap ran in its function (a compiled function, "
                          "jax.jit or tf.function, runs its Python body once: taps inside it are not seen again; "
                          "pass the function uncompiled for layers=True)")
        if len(found) != len(names):
            skipped = [n for i, n in enumerate(names) if i not in found]
            return None, f"layers: {label}: tapped values {', '.join(skipped)} are not floating arrays"
        adapter = run.entry.adapter
        zeros = tuple(adapter.from_numpy(np.zeros(discovery.values[found[i]].shape)) for i in range(len(names)))
        full = _layered_run(run, fn, zeros, params)
        evaluate_run(full, params)
        layer_cotangent = _layered_cotangent(run, full, cotangent)
        gradient_run(full, layer_cotangent, params)
        measure_precision(full, layer_cotangent, seed)
    except Exception as exc:  # layer mode is an aid: the comparison itself stands
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"layers: {label} could not be run layer by layer ({text})"
    found = _layer_outputs(full.prepared)
    precision = full.precision
    gradient = [full.gradients.get(f"{LAYERS_ARGUMENT}[{i}]") for i in range(len(names))]
    return LayerTrace(
        label, names, fused, [full.values[found[i]] for i in range(len(names))], gradient,
        [precision.values.get(found[i]) for i in range(len(names))],
        [precision.gradients.get(f"{LAYERS_ARGUMENT}[{i}]") for i in range(len(names))], full,
        list(layered.settings)), None


def _layered_run(run: ImplementationRun, fn: Callable[..., Any], deltas: Tuple[Any, ...],
                 params: Optional[Dict[str, np.ndarray]]) -> ImplementationRun:
    """The implementation's run with ``fn`` (of ``(layers, *args)``) in place of its function."""
    layered = ImplementationRun(run.entry, run.binding)
    layered.spec = dataclasses.replace(run.spec, fn=fn, args=(deltas,) + tuple(run.spec.args),
                                       arg_names=(LAYERS_ARGUMENT,) + tuple(run.spec.arg_names or ()))
    layered.prepared = _prepare(layered, None, params)
    return layered


def _layered_cotangent(run: ImplementationRun, layered: ImplementationRun, cotangent: np.ndarray) -> np.ndarray:
    """The comparison's cotangent on fn's outputs, zero on the tapped values."""
    blocks: Dict[str, np.ndarray] = {}
    offset = 0
    for name in run.output_order:
        size = run.values[name].size
        blocks[_output_name(name)] = cotangent[offset:offset + size]
        offset += size
    return np.concatenate([blocks.get(spec.name, np.zeros(spec.size)).reshape(-1)
                           for spec in layered.prepared.output_specs])
