"""Parameter names across frameworks: separators normalised, and the flat ``{dotted name: array}`` mapping that
remembers the user's nesting (:class:`FlatParams`), so a parameter tree reaches a JAX function as a tree.

Invariant: flattening and nesting again gives back the user's structure and values unchanged.
"""

from __future__ import annotations

import re
from typing import (Any, Callable, Dict, Iterable, Mapping, Optional, Tuple)

import numpy as np

from ..._errors import InvalidArgumentError

# --- names ---

def normalized(name: str) -> str:
    """``name`` with ``/`` and ``.`` separators alike (``params/fc1/kernel`` -> ``params.fc1.kernel``)."""
    return ".".join(part for part in re.split(r"[./]+", name) if part)


def layer_key(layer: str) -> str:
    """A layer path compared across frameworks: separators alike, case ignored (``Encoder/FC1`` ~ ``encoder.fc1``)."""
    return normalized(layer).lower()


class FlatParams(dict):
    """``{dotted name: value}`` that remembers the nesting the user gave: ``paths[name]`` is the tuple of keys
    from the root (``params.fc1.kernel`` -> ``("params", "fc1", "kernel")``), for adapters whose functions
    take the parameters as a tree. Names missing from ``paths`` are one key each."""

    def __init__(self, values: Any = (), paths: Optional[Mapping[str, Tuple[str, ...]]] = None) -> None:
        super().__init__(values)
        self.paths: Dict[str, Tuple[str, ...]] = dict(paths or {})

    def path(self, name: str) -> Tuple[str, ...]:
        return self.paths.get(name, (name,))

    @property
    def nested(self) -> bool:
        return any(len(self.path(name)) > 1 for name in self)

    def tree(self, leaf: Callable[[Any], Any] = lambda v: v) -> Dict[str, Any]:
        """The values as nested dicts along :attr:`paths`, each value passed through ``leaf``."""
        return nest(((self.path(name), leaf(value)) for name, value in self.items()))


def nest(items: Iterable[Tuple[Tuple[str, ...], Any]]) -> Dict[str, Any]:
    """Nested dicts from ``(path, value)`` pairs (in order)."""
    root: Dict[str, Any] = {}
    for path, value in items:
        node = root
        for key in path[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise InvalidArgumentError(f"params: {'.'.join(path)!r} nests under {key!r}, which is a value")
            node = child
        if path[-1] in node:
            raise InvalidArgumentError(f"params: {'.'.join(path)!r} is given twice")
        node[path[-1]] = value
    return root


def tree_paths(tree: Any) -> Dict[str, Tuple[str, ...]]:
    """``{dotted name: keys}`` of the leaves of nested mappings (what ``gb.compare`` flattens ``params`` to)."""
    paths: Dict[str, Tuple[str, ...]] = {}

    def walk(node: Mapping, keys: Tuple[str, ...]) -> None:
        for key, value in node.items():
            path = keys + (str(key),)
            if isinstance(value, Mapping):
                walk(value, path)
            else:
                paths[".".join(path)] = path

    if isinstance(tree, Mapping):
        walk(tree, ())
    return paths


def keep_structure(flat: Optional[Mapping[str, np.ndarray]], tree: Any) -> Optional[FlatParams]:
    """``flat`` (``params`` flattened with dots) as :class:`FlatParams` with the nesting of ``tree`` (the
    ``params`` the user gave)."""
    if flat is None:
        return None
    paths = tree_paths(tree)
    return FlatParams(flat, {name: paths[name] for name in flat if name in paths})


def flat_params(tree: Mapping[str, Any]) -> FlatParams:
    """Nested mappings as :class:`FlatParams` (leaves unchanged)."""
    paths = tree_paths(tree)
    values = {}
    for name, path in paths.items():
        node: Any = tree
        for key in path:
            node = node[key]
        values[name] = node
    return FlatParams(values, paths)


def shape_of(value: Any) -> Tuple[int, ...]:
    shape = getattr(value, "shape", None)
    if shape is None:
        shape = np.shape(value)
    return tuple(int(d) for d in shape)
