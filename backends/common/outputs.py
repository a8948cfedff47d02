"""Lay out a function's outputs (one array or a nested structure of arrays) as named flat blocks."""

from __future__ import annotations

from typing import Any, Callable, List, Sequence, Tuple

from gradbridge._adapter import LeafSpec
from gradbridge._tree import TreeLeaf, flatten


def output_leaves(value: Any, is_array: Callable[[Any], bool]) -> List[TreeLeaf]:
    """The array leaves of an output; a bare array is called ``out``, items ``out[0]``, ``out['loss']``."""
    leaves, _ = flatten(value, "out", is_array)
    return leaves


def output_specs(named: Sequence[Tuple[str, Tuple[int, ...], str]]) -> List[LeafSpec]:
    """Offsets for ``(name, shape, dtype)`` output blocks laid out one after the other."""
    specs: List[LeafSpec] = []
    offset = 0
    for name, shape, dtype in named:
        spec = LeafSpec(name, tuple(int(d) for d in shape), dtype, offset, "output")
        specs.append(spec)
        offset += spec.size
    return specs


def gradient_output_specs(leaves: Sequence[LeafSpec]) -> List[LeafSpec]:
    """Outputs of ``x -> J(x)^T v`` (the function ``order=2`` checks): one block ``grad[name]`` per leaf."""
    return output_specs([(f"grad[{leaf.name}]", leaf.shape, "float64") for leaf in leaves])
