"""The state a function rebinds while it runs, snapshotted and put back.

A framework that traces ``fn`` (compiles or vectorizes it) runs it with placeholder values; a function that
keeps state (a model holding its own PRNG key, ``self.key, sub = split(self.key)``, a closure rebinding a
nonlocal, a global) stores those placeholders into the user's objects. :class:`StateWalker` finds, from the
same roots and by the same reach as :class:`Fingerprinter` (closure cells, the globals the code names, the
user's objects' ``__dict__`` and slots, the user's classes' and modules' attributes the code names, lists and
dicts), every place such a run can rebind, and :class:`StateSnapshot` keeps what each held so it can be put
back. Best effort and never raising: the walk stops (keeping what it found) after :attr:`StateWalker.limit`
objects and items, and an object whose walking raises is left out. Library objects are not walked into, as
for the fingerprint; nothing here imports a framework (an adapter says which values are its arrays and which
are placeholders).
"""

from __future__ import annotations

import collections
import functools
import types
from typing import Any, Callable, Dict, FrozenSet, List, Sequence, Tuple

import numpy as np


from .fingerprint import CALLED, CONSTRUCTED, UNHANDLED, VALUE_TYPES, Fingerprinter, code_names


#: "Not bound" in a snapshot: a global, attribute, slot or closure cell without a value.
ABSENT: Any = object()


def _plain(value: Any) -> bool:
    """A plain Python or NumPy scalar value (or nothing at all)."""
    return value is ABSENT or isinstance(value, VALUE_TYPES) or isinstance(value, np.generic)


def _bookkeeping(value: Any) -> bool:
    """What a run may rebind as its own bookkeeping (a counter, a float it records, a list of counts): a plain
    value, or a tuple, list, set or dict holding nothing but plain values (looked at one level deep)."""
    if _plain(value):
        return True
    if type(value) in (tuple, list, set, frozenset) and len(value) <= 4096:
        return all(_plain(item) for item in value)
    if type(value) is dict and len(value) <= 4096:
        return all(_plain(k) and _plain(v) for k, v in value.items())
    return False


class _Place:
    """One place holding values: a closure cell, an object's ``__dict__`` or slots, some names of a namespace
    (module, function globals) or class, a list, or a dict. ``saved`` is what it held when walked."""

    __slots__ = ("kind", "target", "path", "saved", "keys")

    def __init__(self, kind: str, target: Any, path: str, keys: Any = None) -> None:
        self.kind = kind  # "cell", "attrs", "names", "class", "slots", "list", "dict"
        self.target = target
        self.path = path
        self.keys = keys  # "names", "class": the names; "slots": slot name -> its member descriptor
        self.saved = self.read()

    def read(self) -> Any:
        """What the place holds now: a dict ``key -> value or ABSENT`` (a list for a list)."""
        kind, target = self.kind, self.target
        if kind == "cell":
            try:
                return {None: target.cell_contents}
            except ValueError:
                return {None: ABSENT}
        if kind in ("attrs", "dict"):
            return dict(target)
        if kind == "names":
            return {name: target.get(name, ABSENT) for name in self.keys}
        if kind == "class":
            return {name: target.__dict__.get(name, ABSENT) for name in self.keys}
        if kind == "slots":
            found = {}
            for name, descriptor in self.keys.items():
                try:
                    found[name] = descriptor.__get__(target, type(target))
                except AttributeError:
                    found[name] = ABSENT
            return found
        return list(target)

    def put(self, key: Any, value: Any) -> None:
        """Bind ``key`` of the place to ``value`` (unbind it for ABSENT), bypassing the objects' own
        ``__setattr__`` (a frozen dataclass, a module that forbids writes)."""
        kind, target = self.kind, self.target
        if kind == "cell":
            if value is ABSENT:
                try:
                    del target.cell_contents
                except ValueError:
                    pass
            else:
                target.cell_contents = value
        elif kind in ("attrs", "dict", "names"):
            if value is ABSENT:
                target.pop(key, None)
            else:
                target[key] = value
        elif kind == "class":
            if value is ABSENT:
                if key in target.__dict__:
                    type.__delattr__(target, key)
            else:
                type.__setattr__(target, key, value)
        elif kind == "slots":
            descriptor = self.keys[key]
            if value is ABSENT:
                try:
                    descriptor.__delete__(target)
                except AttributeError:
                    pass
            else:
                descriptor.__set__(target, value)

    def describe(self, key: Any) -> str:
        if self.kind == "cell":
            return self.path
        if self.kind in ("list", "dict"):
            return f"{self.path}[{key!r}]"
        return f"{self.path}.{key}" if self.path else str(key)


class StateWalker(Fingerprinter):
    """Every place reachable from some roots (``fn``, the non-array values passed to it) that a run of ``fn`` can
    rebind (:attr:`places`), and the values the adapter watches for found in them (:attr:`watched`: a trace's placeholders),
    with readable paths.

    Subclasses supply :meth:`is_array` (the framework's arrays: values, never walked into), :meth:`is_watched`
    and :meth:`adapter_children` (the functions inside a custom-derivative wrapper), and :attr:`libraries`.
    """

    #: Objects and container items walked at most: beyond that the walk keeps what it found.
    limit = 2048

    def __init__(self, roots: Sequence[Tuple[str, Any]], snapshot: bool = True) -> None:
        super().__init__()
        self.snapshot = snapshot  # False: only look for watched values, keep no places
        self.places: List[_Place] = []
        self.watched: List[Tuple[str, Any]] = []
        self._count = 0
        self._queue: "collections.deque[Tuple[Any, str, FrozenSet[str]]]" = collections.deque()
        for path, value in roots:
            self._push(value, path, frozenset())
        while self._queue:
            value, path, names = self._queue.popleft()
            try:
                self._visit(value, path, names)
            except Exception:  # a __getattr__ or descriptor of the user's raising: leave that object out
                continue

    # hooks

    def is_array(self, value: Any) -> bool:
        """The framework's arrays (and NumPy's): values held in places, never walked into."""
        return isinstance(value, np.ndarray)

    def is_watched(self, value: Any) -> bool:
        """Values the adapter looks for in the places (placeholders of a trace)."""
        return False

    def adapter_children(self, value: Any) -> Any:
        """The values inside one of the framework's objects to walk (a custom-derivative wrapper's functions),
        or :data:`UNHANDLED`."""
        return UNHANDLED

    # the walk

    def _push(self, value: Any, path: str, names: FrozenSet[str]) -> None:
        if self.is_watched(value):
            self.watched.append((path, value))
            return
        if _plain(value) or self.is_array(value) or self._count > self.limit:
            return
        self._count += 1
        self._queue.append((value, path, names))

    def _place(self, kind: str, target: Any, path: str, keys: Any = None) -> None:
        if self.snapshot:
            self.places.append(_Place(kind, target, path, keys))

    def _visit(self, value: Any, path: str, names: FrozenSet[str]) -> None:
        if isinstance(value, types.ModuleType):
            name = value.__name__ if isinstance(value.__name__, str) else ""
            if self._users(name) and ("module", id(value), names) not in self._seen:
                self._seen[("module", id(value), names)] = 0
                namespace = vars(value)
                self._place("names", namespace, name, tuple(sorted(names)))
                for attribute in sorted(names):
                    if attribute in namespace:
                        self._push(namespace[attribute], f"{name}.{attribute}", names)
            return
        if isinstance(value, (types.BuiltinFunctionType, np.ufunc)):
            return
        if isinstance(value, type):
            if self._user_class(value) and ("class", id(value), names) not in self._seen:
                self._seen[("class", id(value), names)] = 0
                attributes, grown = self._class_attributes(value, names | CONSTRUCTED)
                self._place("class", value, value.__qualname__, tuple(sorted(attributes)))
                for attribute in sorted(attributes):
                    self._push(attributes[attribute], f"{value.__qualname__}.{attribute}", grown)
            return
        if id(value) in self._seen:
            return
        self._seen[id(value)] = len(self._seen)
        if isinstance(value, (tuple, set, frozenset)):
            for i, item in enumerate(list(value)):
                self._push(item, f"{path}[{i}]", names)
            return
        if isinstance(value, list):
            self._place("list", value, path)
            for i, item in enumerate(list(value)):
                self._push(item, f"{path}[{i}]", names)
            return
        if isinstance(value, dict):
            self._place("dict", value, path)
            for key, item in list(value.items()):
                self._push(item, f"{path}[{key!r}]", names)
            return
        children = self.adapter_children(value)
        if children is not UNHANDLED:
            for child in children:
                self._push(child, path, names)
            return
        if isinstance(value, functools.partial):
            self._push(value.func, path, names)
            self._push(value.args, f"{path}.args", names)
            self._push(value.keywords, f"{path}.keywords", names)
            return
        if isinstance(value, (staticmethod, classmethod)):
            self._push(value.__func__, path, names)
            return
        if isinstance(value, property):
            for accessor in (value.fget, value.fset, value.fdel):
                self._push(accessor, path, names)
            return
        if isinstance(value, functools.cached_property):
            self._push(value.func, path, names)
            return
        if isinstance(value, types.FunctionType):
            if not self.is_library(value):
                self._function(value, path)
            return
        if isinstance(value, types.MethodType):
            function = value.__func__
            name = getattr(function, "__name__", None)
            self._push(function, path, names)
            self._push(value.__self__, f"{path}.__self__", names | {name} if isinstance(name, str) else names)
            return
        wrapped = getattr(value, "__wrapped__", None)
        if wrapped is not None:
            self._push(wrapped, path, names)
            if self.is_library(value) or not self._user_class(type(value)):
                return
        if self.is_library(value):
            return
        self._instance(value, path, names)

    def _function(self, fn: types.FunctionType, path: str) -> None:
        code = fn.__code__
        names = code_names(code)
        globals_ = fn.__globals__
        self._place("names", globals_, "", tuple(sorted(names)))
        for name in sorted(names):
            if name in globals_:
                self._push(globals_[name], name, names)
        for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
            where = f"{path}.<closure {name}>" if path else name
            self._place("cell", cell, where)
            try:
                self._push(cell.cell_contents, where, names)
            except ValueError:  # an empty cell
                pass
        self._push(fn.__defaults__, f"{path}.__defaults__", names)
        self._push(fn.__kwdefaults__, f"{path}.__kwdefaults__", names)

    def _instance(self, value: Any, path: str, names: FrozenSet[str]) -> None:
        """An object's ``__dict__`` (every attribute, added ones too), its slots, and its class by the names the
        code reading it names (``__call__`` included)."""
        cls = type(value)
        state = getattr(value, "__dict__", None)
        if isinstance(state, dict):
            self._place("attrs", state, path)
            for key, item in list(state.items()):
                self._push(item, f"{path}.{key}", names)
        descriptors: Dict[str, Any] = {}
        for klass in cls.__mro__:
            if not self._user_class(klass):
                continue
            slots = klass.__dict__.get("__slots__", ())
            for slot in (slots,) if isinstance(slots, str) else slots:
                descriptor = klass.__dict__.get(slot) if isinstance(slot, str) else None
                if isinstance(descriptor, types.MemberDescriptorType):
                    descriptors.setdefault(slot, descriptor)
        if descriptors:
            self._place("slots", value, path, descriptors)
            for slot, descriptor in descriptors.items():
                try:
                    self._push(descriptor.__get__(value, cls), f"{path}.{slot}", names)
                except AttributeError:
                    pass
        self._push(cls, path, names | CALLED)


class StateSnapshot:
    """What the places a :class:`StateWalker` found held, and :meth:`restore` to put it back.

    What is put back (``holds(value)`` says whether a value holds a watched one, e.g. a trace's placeholder):

    * a binding (closure cell, attribute, slot, global, class attribute, a list item or dict entry that existed)
      whose value changed, unless both its old and its new value are bookkeeping (Python and NumPy scalars,
      None, unbound, and tuples, lists, sets and dicts of those): an array, a key, a state object the run
      rebound gets its old value back; an int counter, a float or a list of counts the run updates stays as the
      run left it (as :func:`same_but_ints` takes a counter);
    * any binding whose new value holds a watched value;
    * an attribute, global or slot the run added: removed unless bookkeeping; items a run appended to a list or
      added to a dict stay (a log), unless they hold a watched value.
    """

    def __init__(self, walker: StateWalker) -> None:
        self.places = walker.places

    def restore(self, holds: Callable[[Any], bool]) -> List[str]:
        """Put back what :class:`StateSnapshot` describes; returns the paths put back."""
        restored: List[str] = []
        for place in self.places:
            try:
                restored.extend(self._restore(place, holds))
            except Exception:  # pragma: no cover - a place that cannot be written any more
                continue
        return restored

    @staticmethod
    def _changed(before: Any, after: Any, holds: Callable[[Any], bool]) -> bool:
        if after is before:
            return False
        return holds(after) or not (_bookkeeping(before) and _bookkeeping(after))

    def _restore(self, place: _Place, holds: Callable[[Any], bool]) -> List[str]:
        saved, now = place.saved, place.read()
        restored = []
        if place.kind == "list":
            keep = len(now) >= len(saved) or all(_bookkeeping(v) for v in saved[len(now):])
            changed = {i for i in range(min(len(saved), len(now))) if self._changed(saved[i], now[i], holds)}
            appended = [v for v in now[len(saved):] if not holds(v)]
            if changed or not keep or len(appended) != len(now) - min(len(now), len(saved)):
                head = [saved[i] if i in changed else now[i] for i in range(min(len(saved), len(now)))]
                tail = saved[len(now):] if not keep else []
                place.target[:] = head + tail + appended
                restored.append(place.path)
            return restored
        for key in saved.keys() | now.keys():
            before, after = saved.get(key, ABSENT), now.get(key, ABSENT)
            if key not in saved and place.kind == "dict":
                change = holds(after)  # an entry the run added to a dict: kept unless it holds a watched value
            else:
                change = self._changed(before, after, holds)
            if change:
                place.put(key, before)
                restored.append(place.describe(key))
        return restored
