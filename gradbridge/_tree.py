"""Flatten nested structures into named leaves and rebuild them.

Two walks:

- :func:`flatten` walks tuples (also named tuples), lists and dicts only; everything else is a constant.
  Outputs and ``gb.compare``'s flat parameter dicts use it.
- :func:`flatten_pytree` is how the arguments of a check are searched for the arrays to check. Besides
  dicts (``batch['image']``), named tuples (``p.w``), lists and tuples (``xs[1]``) it walks

  * nodes of a framework's own pytree registry, through an adapter's ``node_of`` hook (torch's
    ``torch.utils._pytree``: ``register_dataclass``, ``register_pytree_node``);
  * nodes registered with `optree <https://github.com/metaopt/optree>`_ in the ``"gradbridge"`` namespace
    (or optree's global one: ``collections.deque``, ...);
  * any other dataclass instance, field by field (``p.w``), rebuilt with ``dataclasses.replace`` so that
    ``__post_init__`` sees the checked values as the user's own code would. A field with ``init=False``, or
    a dataclass ``replace`` cannot rebuild, is not walked: the floating arrays in it are reported in
    :attr:`Flat.unwalked`, with the reason, instead of being passed over in silence.

  Array-likes that are not leaves (a NumPy array in a TensorFlow check) are reported in
  :attr:`Flat.others`, so an adapter can say they are not checked.

optree is imported on first use (never by ``import gradbridge``). A structure that contains itself is
walked once: the inner reference is kept as it is.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, List, Optional, Sequence, Set, Tuple

from ._registry import library_display_name

#: The optree namespace searched for registered node types (optree's global one is always searched).
OPTREE_NAMESPACE = "gradbridge"

#: One level of a registered node: (path suffix of each child, the children, rebuild from new children).
Node = Tuple[List[str], List[Any], Callable[[List[Any]], Any]]
NodeOf = Callable[[Any], Optional[Node]]

#: How to get a dataclass the walk cannot rebuild checked.
_REGISTER = (f"register the class as a pytree node to check it (optree.register_pytree_node(..., "
             f"namespace={OPTREE_NAMESPACE!r}), or torch.utils._pytree for torch)")

_SCALARS = (bool, int, float, complex, str, bytes, type(None), type(Ellipsis), slice, range)


@dataclasses.dataclass(frozen=True)
class TreeLeaf:
    """One leaf of a nested structure: its path name and its value."""

    path: str
    value: Any


@dataclasses.dataclass(frozen=True)
class Unwalked:
    """A floating (or complex) array inside the structure that cannot be handed over to a check, and why."""

    path: str
    value: Any
    dtype: str
    reason: str


@dataclasses.dataclass
class Flat:
    """The result of :func:`flatten_pytree`.

    Attributes:
        leaves: the leaves, in a fixed order, named by path.
        rebuild: ``rebuild(values)`` is the structure with ``values`` (one per leaf, in order) in place of
            the leaves; further values are ignored.
        others: array-likes with a floating or complex dtype that are not leaves (another framework's
            arrays): passed through unchanged.
        unwalked: floating arrays in parts of the structure that cannot be rebuilt (see the module doc).
    """

    leaves: List[TreeLeaf]
    rebuild: Callable[[Sequence[Any]], Any]
    others: List[TreeLeaf]
    unwalked: List[Unwalked]


def flatten(tree: Any, root: str, is_leaf: Callable[[Any], bool]) -> Tuple[List[TreeLeaf], Callable[[Sequence[Any]], Any]]:
    """Return the leaves of ``tree`` (in a fixed order) and a function that rebuilds it from new leaves.

    ``is_leaf(value)`` decides which values are leaves; tuples (also named tuples), lists and dicts are
    walked into; everything else is kept as a constant of the structure.
    """
    leaves: List[TreeLeaf] = []
    walking: Set[int] = set()  # the containers on the current path: one that contains itself is walked once

    def walk(node: Any, path: str) -> Callable[[Sequence[Any]], Any]:
        if is_leaf(node):
            index = len(leaves)
            leaves.append(TreeLeaf(path, node))
            return lambda new: new[index]
        if isinstance(node, (dict, list, tuple)):
            if id(node) in walking:
                return lambda new: node
            walking.add(id(node))
            try:
                return container(node, path)
            finally:
                walking.discard(id(node))
        return lambda new: node

    def container(node: Any, path: str) -> Callable[[Sequence[Any]], Any]:
        if isinstance(node, dict):
            builders = {key: walk(value, f"{path}[{key!r}]") for key, value in node.items()}
            kind = type(node)
            return lambda new: _rebuild_dict(kind, {key: build(new) for key, build in builders.items()})
        items = [walk(value, f"{path}[{i}]") for i, value in enumerate(node)]
        kind = type(node)
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return lambda new: kind(*(build(new) for build in items))
        return lambda new: kind(build(new) for build in items)

    rebuild = walk(tree, root)
    return leaves, rebuild


# --- the pytree walk of a check's arguments ---

Build = Callable[[Iterator[Any]], Any]  # rebuilds a subtree, taking its leaves' new values from the iterator


class _Walk:
    def __init__(self, is_leaf: Callable[[Any], bool], node_of: Optional[NodeOf]) -> None:
        self.is_leaf = is_leaf
        self.node_of = node_of
        self.others: List[TreeLeaf] = []
        self.unwalked: List[Unwalked] = []
        self.open: Set[int] = set()  # ids of the nodes on the current path (a structure containing itself)

    def walk(self, node: Any, path: str) -> Tuple[List[TreeLeaf], Build]:
        """The leaves under ``node`` and how to rebuild it from their new values."""
        if self.is_leaf(node):
            return [TreeLeaf(path, node)], next
        if isinstance(node, _SCALARS):
            return [], _constant(node)
        if id(node) in self.open:
            return [], _constant(node)
        self.open.add(id(node))
        try:
            return self._node(node, path)
        finally:
            self.open.discard(id(node))

    def _children(self, pairs: Sequence[Tuple[str, Any]], path: str) -> Tuple[List[TreeLeaf], List[Build]]:
        leaves: List[TreeLeaf] = []
        builds: List[Build] = []
        for suffix, child in pairs:
            found, build = self.walk(child, path + suffix)
            leaves.extend(found)
            builds.append(build)
        return leaves, builds

    def _node(self, node: Any, path: str) -> Tuple[List[TreeLeaf], Build]:
        # built-in containers: always rebuilt (fn gets fresh containers, as before), dicts in insertion order
        if isinstance(node, dict):
            keys = list(node)
            leaves, builds = self._children([(f"[{key!r}]", node[key]) for key in keys], path)
            kind = type(node)
            return leaves, lambda new: _rebuild_dict(kind, {key: build(new) for key, build in zip(keys, builds)})
        if isinstance(node, tuple) and hasattr(node, "_fields"):  # a NamedTuple: by field
            leaves, builds = self._children([(_attribute(name), value) for name, value in zip(node._fields, node)],
                                            path)
            kind = type(node)
            return leaves, lambda new: kind(*(build(new) for build in builds))
        if isinstance(node, (list, tuple)):
            leaves, builds = self._children([(f"[{i}]", value) for i, value in enumerate(node)], path)
            kind = type(node)
            return leaves, lambda new: kind([build(new) for build in builds])
        registered = (self.node_of(node) if self.node_of is not None else None) or _optree_node(node)
        if registered is not None:
            suffixes, children, unflatten = registered
            leaves, builds = self._children(list(zip(suffixes, children)), path)
            if not leaves:
                return [], _constant(node)
            return leaves, lambda new: unflatten([build(new) for build in builds])
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            return self._dataclass(node, path)
        array = array_kind(node)
        if array is not None:
            self.others.append(TreeLeaf(path, node))
        return [], _constant(node)

    def _dataclass(self, node: Any, path: str) -> Tuple[List[TreeLeaf], Build]:
        leaves: List[TreeLeaf] = []
        fields: List[Tuple[str, Build]] = []
        held: List[Tuple[str, List[TreeLeaf]]] = []  # init=False fields holding leaves: cannot be set
        for field in dataclasses.fields(node):
            if not hasattr(node, field.name):
                continue
            found, build = self.walk(getattr(node, field.name), path + _attribute(field.name))
            if not found:
                continue
            if field.init:
                leaves.extend(found)
                fields.append((field.name, build))
            else:
                held.append((field.name, found))
        kind = type(node).__name__
        for name, found in held:
            self._give_up(found, f"field {name!r} of dataclass {kind} has init=False, so dataclasses.replace "
                                 f"cannot set it; {_REGISTER}")
        if not leaves:
            return [], _constant(node)
        try:  # rebuilt as the user's code would build it: through __init__ and __post_init__
            same = dataclasses.replace(node, **{name: getattr(node, name) for name, _ in fields})
            if type(same) is not type(node):
                raise TypeError(f"it returned a {type(same).__name__}")
        except Exception as exc:  # noqa: BLE001 - any failure means it cannot be rebuilt
            self._give_up(leaves, f"dataclasses.replace cannot rebuild dataclass {kind} "
                                  f"({type(exc).__name__}: {_first_line(exc)}); {_REGISTER}")
            return [], _constant(node)
        return leaves, lambda new: dataclasses.replace(node, **{name: build(new) for name, build in fields})

    def _give_up(self, leaves: Sequence[TreeLeaf], reason: str) -> None:
        for leaf in leaves:
            kind = array_kind(leaf.value)
            if kind is not None:
                self.unwalked.append(Unwalked(leaf.path, leaf.value, kind[0], reason))


def flatten_pytree(tree: Any, root: str, is_leaf: Callable[[Any], bool], node_of: Optional[NodeOf] = None) -> Flat:
    """The leaves of ``tree`` named by path, how to rebuild it, and the floating arrays it passes over.

    ``is_leaf(value)`` decides which values are leaves. ``node_of(value)`` (optional) gives one level of a
    node of a framework's own registry, or None; it is asked before optree's registry and before a
    dataclass's fields, so a framework's registration (a field declared static) wins.
    """
    walk = _Walk(is_leaf, node_of)
    leaves, build = walk.walk(tree, root)
    return Flat(leaves, lambda values: build(iter(values)), walk.others, walk.unwalked)


def self_reference(tree: Any, root: str) -> Optional[Tuple[str, str]]:
    """``(path, outer path)`` of the first dict, list or tuple inside ``tree`` that is one of its own enclosing
    containers (``xs[1]`` is ``xs``), or None. For frameworks whose own flattening cannot walk such a structure."""
    open_paths: dict = {}

    def walk(node: Any, path: str) -> Optional[Tuple[str, str]]:
        if not isinstance(node, (dict, list, tuple)):
            return None
        if id(node) in open_paths:
            return path, open_paths[id(node)]
        open_paths[id(node)] = path
        try:
            pairs = ([(f"{path}[{key!r}]", value) for key, value in node.items()] if isinstance(node, dict)
                     else [(f"{path}[{i}]", value) for i, value in enumerate(node)])
            for child_path, child in pairs:
                found = walk(child, child_path)
                if found is not None:
                    return found
            return None
        finally:
            del open_paths[id(node)]

    return walk(tree, root)


def is_walked_node(node: Any) -> bool:
    """Whether :func:`flatten_pytree` (without a framework hook) walks into ``node`` though it is no dict, list
    or tuple: a dataclass instance or an optree-registered node. Caches keyed on the argument structure that
    do not walk such nodes must not cache such arguments."""
    if isinstance(node, (dict, list, tuple) + _SCALARS):
        return False
    return (dataclasses.is_dataclass(node) and not isinstance(node, type)) or _optree_node(node) is not None


def terminal_values(tree: Any, node_of: Optional[NodeOf] = None) -> List[Any]:
    """Every value :func:`flatten_pytree` would not walk into (array, module, number, object), in order:
    what decides which framework a check belongs to."""
    values: List[Any] = []

    def keep(value: Any) -> bool:
        if isinstance(value, (dict, list, tuple) + _SCALARS):
            return False
        if (node_of is not None and node_of(value) is not None) or _optree_node(value) is not None:
            return False
        return not (dataclasses.is_dataclass(value) and not isinstance(value, type))

    for leaf in flatten_pytree(tree, "", keep, node_of).leaves:
        values.append(leaf.value)
    return values


def array_kind(value: Any) -> Optional[Tuple[str, str]]:
    """``(dtype name, "floating" or "complex")`` for an array-like of any framework with such a dtype (read
    from its ``dtype`` attribute, no framework imported), else None."""
    if isinstance(value, (type,) + _SCALARS) or not hasattr(value, "shape"):
        return None
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return None
    name = getattr(dtype, "name", None)
    name = name if isinstance(name, str) else str(dtype)
    name = name.rsplit(".", 1)[-1]  # a qualified dtype name ("<library>.float32")
    if name.startswith("complex") or name in ("cfloat", "cdouble", "chalf"):
        return name, "complex"
    if name.startswith(("float", "bfloat")) or name in ("half", "double"):
        return name, "floating"
    return None


def library_of(value: Any) -> str:
    """The library an array comes from, for messages: ``NumPy ndarray``, ``torch Tensor``."""
    module = type(value).__module__.split(".")[0]
    return f"{library_display_name(module)} {type(value).__name__}"


def _optree_node(node: Any) -> Optional[Node]:
    """One level of ``node`` where optree's registry (the ``"gradbridge"`` namespace or the global one) knows
    its type, else None. None, dicts, lists and tuples are handled before this is asked."""
    if isinstance(node, _SCALARS):
        return None
    try:
        import optree
    except ImportError:  # a dependency; without it only the built-in walk and dataclasses remain
        return None
    if optree.tree_is_leaf(node, namespace=OPTREE_NAMESPACE):
        return None
    try:
        level = optree.tree_flatten_one_level(node, namespace=OPTREE_NAMESPACE)
    except ValueError:
        return None
    metadata, unflatten = level.metadata, level.unflatten_func
    suffixes = [_entry(node, entry) for entry in level.entries]
    return suffixes, list(level.children), lambda children: unflatten(metadata, children)


def _entry(node: Any, entry: Any) -> str:
    """The path suffix of a child: ``.name`` for an attribute, ``['key']`` for a key, ``[i]`` for an index."""
    if isinstance(entry, str):
        return _attribute(entry) if entry.isidentifier() and hasattr(node, entry) else f"[{entry!r}]"
    return f"[{entry!r}]"


def _attribute(name: str) -> str:
    return f".{name}" if name.isidentifier() else f"[{name!r}]"


def _constant(node: Any) -> Build:
    return lambda new: node


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


def _rebuild_dict(kind: type, values: dict) -> dict:
    try:
        return kind(values)
    except TypeError:  # dict subclasses with other constructors (e.g. defaultdict)
        return dict(values)
