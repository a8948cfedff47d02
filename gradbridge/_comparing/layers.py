"""Layer by layer: where two ports of a model first diverge.

Each implementation that can (an adapter offering :class:`LayerOutputs`: a torch module, a Sequential or
functional Keras model) reports its layers' outputs at the compared point. Layers are paired across
implementations by name (``encoder.fc1`` and ``Encoder/FC1`` name the same layer:
:func:`.mapping.names.layer_key`), otherwise by position among the layers of the same output shape, and
compared in order with the pairwise rule; the first pair that differs is the first layer where the ports
diverge: the bug is in that layer or in its weights, not later.

Invariant: a divergence is reported only for a pair whose outputs really differ under the comparison's own
tolerance, and the layers before it are said to agree; layers that cannot be paired are listed, never guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import numpy as np

from .differences import difference
from .mapping.names import layer_key


@runtime_checkable
class LayerOutputs(Protocol):
    """An adapter that can run ``fn`` once and give its layers' outputs: ``[(layer name, array), ...]`` in the
    order they ran, or ``[]`` when ``fn`` has no layers it can see."""

    def layer_outputs(self, fn: Callable[..., Any], args: Tuple[Any, ...]) -> List[Tuple[str, np.ndarray]]: ...


@dataclass
class LayerDivergence:
    """Where two implementations' layers first differ.

    Attributes:
        first, second: the implementations' labels.
        agreeing: the paired layers (first's name, second's name) that agree, in order, before the divergence.
        layer: the first pair of layers whose outputs differ (first's name, second's name), or None.
        max_rel_diff: the largest relative difference of that layer's outputs.
        unpaired: layers of either side that could not be paired.
    """

    first: str
    second: str
    agreeing: List[Tuple[str, str]]
    layer: Optional[Tuple[str, str]]
    max_rel_diff: float
    unpaired: List[str]

    def sentence(self) -> str:
        if self.layer is None:
            return (f"{self.first} and {self.second}: all {len(self.agreeing)} paired layers agree"
                    + (f" (not paired: {', '.join(self.unpaired)})" if self.unpaired else ""))
        before = (f"after {len(self.agreeing)} agreeing layer(s) (last: {self.agreeing[-1][0]})"
                  if self.agreeing else "at the first paired layer")
        return (f"{self.first} and {self.second} first diverge at layer {self.layer[0]!r} ({self.first}) / "
                f"{self.layer[1]!r} ({self.second}), {before}: relative difference {self.max_rel_diff:.2e}; "
                "the bug is in that layer or its weights (layout, a missing term, an epsilon, an axis)")


def pair_layers(first: Sequence[Tuple[str, np.ndarray]], second: Sequence[Tuple[str, np.ndarray]]
                ) -> Tuple[List[Tuple[int, int]], List[str]]:
    """Index pairs of layers named alike (by the last path component too), then the rest by position among
    layers of the same shape; and the names left unpaired."""
    pairs: List[Tuple[int, int]] = []
    used_second: set = set()
    by_name = {layer_key(name): j for j, (name, _) in enumerate(second)}
    by_last = {layer_key(re.split(r"[./]", name)[-1]): j for j, (name, _) in enumerate(second)}
    left = []
    for i, (name, value) in enumerate(first):
        j = by_name.get(layer_key(name))
        if j is None:
            j = by_last.get(layer_key(re.split(r"[./]", name)[-1]))
        if j is not None and j not in used_second and second[j][1].shape == value.shape:
            pairs.append((i, j))
            used_second.add(j)
        else:
            left.append(i)
    unpaired = []
    remaining = [j for j in range(len(second)) if j not in used_second]
    for i in left:
        match = next((j for j in remaining if second[j][1].shape == first[i][1].shape), None)
        if match is None:
            unpaired.append(first[i][0])
            continue
        pairs.append((i, match))
        remaining.remove(match)
    unpaired.extend(second[j][0] for j in remaining)
    return sorted(pairs), unpaired


def first_divergence(first_label: str, first: Sequence[Tuple[str, np.ndarray]], second_label: str,
                     second: Sequence[Tuple[str, np.ndarray]], rtol: float, atol: float = 0.0) -> LayerDivergence:
    """The first paired layer whose outputs differ under the pairwise rule (:func:`.differences.difference`)
    at ``rtol`` and ``atol``."""
    pairs, unpaired = pair_layers(first, second)
    agreeing: List[Tuple[str, str]] = []
    for i, j in pairs:
        _, rel, _, passed = difference(first[i][1], second[j][1], rtol, atol, 0.0)[:4]
        if not passed:
            return LayerDivergence(first_label, second_label, agreeing, (first[i][0], second[j][0]), rel, unpaired)
        agreeing.append((first[i][0], second[j][0]))
    return LayerDivergence(first_label, second_label, agreeing, None, 0.0, unpaired)
