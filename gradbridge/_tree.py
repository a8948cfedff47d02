"""Flatten nested Python containers (tuples, lists, dicts) into named leaves and rebuild them.

Adapters for frameworks without a pytree library of their own use this to find the arrays inside
``args``: every leaf gets a readable path name such as ``x``, ``xs[1]`` or ``batch['image']``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Sequence, Tuple


@dataclass(frozen=True)
class TreeLeaf:
    """One leaf of a nested structure: its path name and its value."""

    path: str
    value: Any


def flatten(tree: Any, root: str, is_leaf: Callable[[Any], bool]) -> Tuple[List[TreeLeaf], Callable[[Sequence[Any]], Any]]:
    """Return the leaves of ``tree`` (in a fixed order) and a function that rebuilds it from new leaves.

    ``is_leaf(value)`` decides which values are leaves; tuples (also named tuples), lists and dicts are
    walked into; everything else is kept as a constant of the structure.
    """
    leaves: List[TreeLeaf] = []

    def walk(node: Any, path: str) -> Callable[[Sequence[Any]], Any]:
        if is_leaf(node):
            index = len(leaves)
            leaves.append(TreeLeaf(path, node))
            return lambda new: new[index]
        if isinstance(node, dict):
            builders = {key: walk(value, f"{path}[{key!r}]") for key, value in node.items()}
            kind = type(node)
            return lambda new: _rebuild_dict(kind, {key: build(new) for key, build in builders.items()})
        if isinstance(node, (list, tuple)):
            items = [walk(value, f"{path}[{i}]") for i, value in enumerate(node)]
            if isinstance(node, tuple) and hasattr(node, "_fields"):
                kind = type(node)
                return lambda new: kind(*(build(new) for build in items))
            kind = type(node)
            return lambda new: kind(build(new) for build in items)
        return lambda new: node

    rebuild = walk(tree, root)
    return leaves, rebuild


def _rebuild_dict(kind: type, values: dict) -> dict:
    try:
        return kind(values)
    except TypeError:  # dict subclasses with other constructors (e.g. defaultdict)
        return dict(values)
