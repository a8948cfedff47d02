"""Layer by layer: where two ports of a model first diverge, in their outputs or in their gradients.

Each implementation's layers (:mod:`.layer_runs`: a torch module's or Keras model's layers, or the values a plain
function passes through ``gb.tap``) are paired across implementations by name (``encoder.fc1`` and
``Encoder/FC1`` name the same layer: :func:`.mapping.names.layer_key`, the last path component too), otherwise
by position among the layers of the same output shape, and compared with the pairwise rule (the pair's
tolerance from the precision each computes in, each entry's measured magnitude):

* outputs, forward: the first pair whose outputs differ is where the ports diverge; the bug is in that layer or
  its weights. A layer that applies its activation inside (Keras ``Dense(activation=...)``) may match the other
  side's separate activation layer that follows; that pairing is tried before a divergence is claimed.
* gradients, when every paired output agrees: the gradient flowing into each layer's output, from the last layer
  back; the first that differs (going backward) sits just before the layer whose backward pass differs.

Invariant: a divergence is claimed only for a pair whose numbers differ under the comparison's own rule, and the
layers before it (after it, for gradients) are said to agree; layers that cannot be paired are listed.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .differences import difference, pair_tolerance
from .layer_runs import LayerTrace
from .mapping.names import layer_key


@dataclass
class LayerDivergence:
    """Where two implementations' layers first differ.

    Attributes:
        first, second: the implementations' labels.
        quantity: ``"value"`` (the layers' outputs, forward) or ``"gradient"`` (the gradients flowing into their
            outputs, backward); ``""`` when everything paired agrees.
        agreeing: the paired layers (first's name, second's name) that agree: before the divergence for values,
            after it for gradients.
        layer: the pair of layers where they diverge (first's name, second's name), or None.
        culprit: for gradients, the layer whose backward pass differs (the paired layer after ``layer``), or None
            when the divergence is already at the last layer (the code after it).
        max_rel_diff: the largest relative difference there.
        unpaired: layers of either side that could not be paired.
        notes: pairings worth saying (a fused activation matched to a separate layer).
        settings: the diverging layers' settings that differ, in words (``eps 1e-05 (torch) vs 0.001 (keras)``).
        random: the implementations of the pair whose outputs change with the seed (then no bug is claimed).
        parameters: ``(parameter, layer)`` for parameter gradients of the pair that differ while every layer's
            output and incoming gradient agree: that layer's backward computes its parameters' gradient wrong.
    """

    first: str
    second: str
    quantity: str
    agreeing: List[Tuple[str, str]]
    layer: Optional[Tuple[str, str]]
    max_rel_diff: float = 0.0
    culprit: Optional[Tuple[str, str]] = None
    unpaired: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    settings: List[str] = field(default_factory=list)
    random: List[str] = field(default_factory=list)
    parameters: List[Tuple[str, str]] = field(default_factory=list)

    def sentence(self) -> str:
        names = f"{self.first} and {self.second}"
        left = f" (not paired: {', '.join(self.unpaired)})" if self.unpaired else ""
        if self.layer is None and self.parameters:
            listed = ", ".join(f"{p!r} (layer {layer!r})" for p, layer in self.parameters)
            return (f"layer by layer, {names}: all {len(self.agreeing)} paired layers agree, outputs and the gradients "
                    f"flowing into them, but the parameter gradients {listed} differ: the backward pass of that layer "
                    f"computes its parameters' gradient differently{left}")
        if self.layer is None:
            return f"layer by layer, {names}: all {len(self.agreeing)} paired layers agree, outputs and gradients{left}"
        where = _both(self.layer, self.first, self.second)
        if self.random:
            return (f"layer by layer, {names} first differ at layer {where}, but {' and '.join(self.random)} "
                    f"{'draws' if len(self.random) == 1 else 'draw'} random numbers (see the verdicts): the layers "
                    f"cannot be compared from there on{left}")
        if self.quantity == "value":
            before = (f"after {len(self.agreeing)} agreeing layer(s) (last: {self.agreeing[-1][0]!r})"
                      if self.agreeing else "at the first paired layer")
            cause = (f"their settings differ: {', '.join(self.settings)}" if self.settings else
                     "the bug is in that layer or its weights (layout, a missing term, an epsilon, an axis)")
            return (f"layer by layer, {names} first diverge at the output of layer {where}, {before}: relative "
                    f"difference {self.max_rel_diff:.2e}; {cause}{left}")
        culprit = (f"the backward pass of layer {_both(self.culprit, self.first, self.second)} differs (the gradients "
                   "flowing into its output agree, those flowing out of it do not)" if self.culprit is not None else
                   "the backward pass of what follows it differs")
        return (f"layer by layer, {names}: every paired output agrees, but the gradients flowing into layer {where}'s "
                f"output differ (relative difference {self.max_rel_diff:.2e}): {culprit}{left}")


def _both(pair: Tuple[str, str], first: str, second: str) -> str:
    return repr(pair[0]) if pair[0] == pair[1] else f"{pair[0]!r} ({first}) / {pair[1]!r} ({second})"


def pair_layers(first: Sequence[Tuple[str, np.ndarray]], second: Sequence[Tuple[str, np.ndarray]],
                first_fused: Optional[Sequence[bool]] = None) -> Tuple[List[Tuple[int, int]], List[str]]:
    """Index pairs of layers named alike (by the last path component too), then the rest by position among
    layers of the same shape (a layer of ``first`` that applies its activation inside, ``first_fused``, takes
    the place of the other side's activation: the layer after its positional match); and the names left
    unpaired."""
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
        after = remaining[remaining.index(match) + 1:]
        if first_fused and first_fused[i] and after and second[after[0]][1].shape == first[i][1].shape:
            remaining.remove(match)  # the other side's layer before its activation: the fused one is after it
            unpaired.append(second[match][0])
            match = after[0]
        pairs.append((i, match))
        remaining.remove(match)
    unpaired.extend(second[j][0] for j in remaining)
    return sorted(pairs), unpaired


class _Judge:
    """The pairwise rule on two traces' layers, with the pair's tolerance and one scale per quantity."""

    def __init__(self, one: LayerTrace, other: LayerTrace, rtol: Optional[float], atol: Optional[float]) -> None:
        self.one, self.other = one, other
        tolerance = pair_tolerance(one.run, other.run, rtol, atol)
        self.rtol, self.atol, self.leaf_scale = tolerance.rtol, tolerance.atol, tolerance.leaf_scale
        self.scale = {q: max((float(np.max(m)) for trace in (one, other) for m in self._sizes(trace, q)
                              if m is not None and m.size), default=0.0) for q in ("value", "gradient")}

    @staticmethod
    def _sizes(trace: LayerTrace, quantity: str) -> List[Optional[np.ndarray]]:
        arrays = trace.values if quantity == "value" else trace.gradients
        measured = trace.value_magnitudes if quantity == "value" else trace.gradient_magnitudes
        return [None if a is None else (np.abs(a) if m is None else np.maximum(np.abs(a), m))
                for a, m in itertools.zip_longest(arrays, measured)]

    def differ(self, quantity: str, i: int, j: int) -> Tuple[bool, float]:
        """Whether layer i of one and layer j of other differ in ``quantity``, and their relative difference."""
        a = (self.one.values if quantity == "value" else self.one.gradients)[i]
        b = (self.other.values if quantity == "value" else self.other.gradients)[j]
        magnitude = np.maximum(self._sizes(self.one, quantity)[i], self._sizes(self.other, quantity)[j])
        _, rel, _, passed = difference(a, b, self.rtol, self.atol, self.scale[quantity], magnitude,
                                       self.leaf_scale)[:4]
        return not passed, rel


def first_divergence(one: LayerTrace, other: LayerTrace, rtol: Optional[float] = None,
                     atol: Optional[float] = None) -> LayerDivergence:
    """Where ``one`` and ``other`` first diverge: their outputs forward, else the gradients into them backward.
    ``rtol``/``atol``: the user's pairwise tolerance (None: the pair's, from the precisions measured)."""
    a, b = list(zip(one.names, one.values)), list(zip(other.names, other.values))
    if any(other.fused) and not any(one.fused):
        swapped, unpaired = pair_layers(b, a, other.fused)
        pairs = sorted((i, j) for j, i in swapped)
    else:
        pairs, unpaired = pair_layers(a, b, one.fused)
    notes: List[str] = []
    pairs, unpaired = _fused_pairs(one, other, pairs, unpaired, notes)
    judge = _Judge(one, other, rtol, atol)
    agreeing: List[Tuple[str, str]] = []
    for i, j in pairs:
        differs, rel = judge.differ("value", i, j)
        if differs:
            return LayerDivergence(one.label, other.label, "value", agreeing, (one.names[i], other.names[j]),
                                   rel, unpaired=unpaired, notes=notes,
                                   settings=_differing_settings(one, other, i, j))
        agreeing.append((one.names[i], other.names[j]))
    with_gradients = [(i, j) for i, j in pairs if one.gradients[i] is not None and other.gradients[j] is not None]
    after: List[Tuple[str, str]] = []
    for position in range(len(with_gradients) - 1, -1, -1):
        i, j = with_gradients[position]
        differs, rel = judge.differ("gradient", i, j)
        if differs:
            culprit = None
            if position + 1 < len(with_gradients):
                k, m = with_gradients[position + 1]
                culprit = (one.names[k], other.names[m])
            return LayerDivergence(one.label, other.label, "gradient", after[::-1], (one.names[i], other.names[j]),
                                   rel, culprit, unpaired, notes)
        after.append((one.names[i], other.names[j]))
    return LayerDivergence(one.label, other.label, "", agreeing, None, unpaired=unpaired, notes=notes)


def _fused_pairs(one: LayerTrace, other: LayerTrace, pairs: List[Tuple[int, int]], unpaired: List[str],
                 notes: List[str]) -> Tuple[List[Tuple[int, int]], List[str]]:
    """Pairs where a layer that applies its activation inside (a Keras ``Dense(activation=...)``) is paired with
    the other side's layer before its activation: re-paired with the activation that follows (an unpaired layer of
    the same shape before the other side's next paired layer, one reporting an ``activation`` setting first), or
    left out when there is none (the activation is inside the other side's code): never compared across it."""
    result: List[Tuple[int, int]] = []
    taken_first, taken_second = {i for i, _ in pairs}, {j for _, j in pairs}
    for i, j in pairs:
        for fused_side, partner, a, b in ((one, other, i, j), (other, one, j, i)):
            if not fused_side.fused[a] or "activation" in partner.settings_of(b):
                continue  # not fused, or already paired with the other side's activation
            taken = taken_second if fused_side is one else taken_first
            following = []
            for k in range(b + 1, len(partner.names)):
                if k in taken:
                    break
                if partner.values[k].shape == fused_side.values[a].shape:
                    following.append(k)
            if not following:
                notes.append(f"{fused_side.label}'s layer {fused_side.names[a]!r} applies its activation inside and "
                             f"{partner.label} has no separate activation layer after {partner.names[b]!r}: not "
                             "compared layer by layer")
                break
            k = next((k for k in following if "activation" in partner.settings_of(k)), following[0])
            notes.append(f"{fused_side.label}'s layer {fused_side.names[a]!r} applies its activation inside; compared "
                         f"with {partner.label}'s {partner.names[k]!r}, the activation that follows "
                         f"{partner.names[b]!r}")
            taken.add(k)
            unpaired = [n for n in unpaired if n != partner.names[k]]  # b, before the activation: in the note
            result.append((a, k) if fused_side is one else (k, a))
            break
        else:
            result.append((i, j))
    return sorted(result), unpaired


def _differing_settings(one: LayerTrace, other: LayerTrace, i: int, j: int) -> List[str]:
    """The settings both layers report (in common names) whose values differ, in words."""
    first = one.settings[i] if i < len(one.settings) else {}
    second = other.settings[j] if j < len(other.settings) else {}
    found = []
    for key in first:
        if key not in second:
            continue
        a, b = first[key], second[key]
        same = (np.isclose(a, b, rtol=1e-9, atol=0) if isinstance(a, (int, float)) and isinstance(b, (int, float))
                and not isinstance(a, bool) and not isinstance(b, bool) else a == b)
        if not same:
            found.append(f"{key} {a!r} ({one.label}) vs {b!r} ({other.label})")
    return found


def divergences(traces: Sequence[LayerTrace], rtol: Optional[float], atol: Optional[float]) -> List[LayerDivergence]:
    """Every pair of traced implementations, in the comparison's order."""
    return [first_divergence(one, other, rtol, atol) for one, other in itertools.combinations(traces, 2)]
