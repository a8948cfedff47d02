"""What a user's function reads besides its arguments, as one hashable token, and a cache held weakly per function.

Adapters that trace or compile ``fn`` keep the result for the next check of the same function. Such an entry
holds only while ``fn`` reads the same things: the globals it names, its closure cells, its defaults, the state
of a callable object or bound method, recursively through the Python functions it reaches.
:class:`Fingerprinter` walks all that and builds a token to compare:

* plain values (Python ints, floats, bools, complex numbers, strings, bytes, NumPy scalars) by value
  (:meth:`Fingerprinter.plain`): a trace bakes them in, so a rebound global ``SCALE`` must not find the old
  trace;
* NumPy arrays by shape, dtype and a digest of their contents (they can change in place);
* modules, builtins and ufuncs by name and id (they live as long as the process); classes by identity;
* tuples, lists, sets and dicts by what they hold; objects wrapping a function (``__wrapped__``) by identity
  plus the wrapped function;
* functions and objects of the packages in :attr:`Fingerprinter.libraries` by identity only: library state is
  not the user's to change (``functools.partial`` objects are such objects: their ``__module__`` is
  ``functools``);
* Python functions by identity plus what they read; bound methods by their function and object; partial
  objects of other modules by identity plus their function and arguments; other objects by identity plus
  their ``__dict__``.

An id names an object only while it lives, so every object keyed by identity is also held by a weak
reference; :meth:`Fingerprinter.alive` says whether all of them still are. Each adapter subclasses
:class:`Fingerprinter` for its own types (:meth:`~Fingerprinter.adapter_object`) and adds its own packages to
:attr:`~Fingerprinter.libraries`; nothing here imports a framework.

:class:`WeakFunctionCache` keeps entries per function and key without keeping the function alive.

Which state a key describes. An adapter keys an entry by ``(structure, environment)``: what its traces
depend on besides ``fn``'s environment (shapes, dtypes, options), and the token of that environment taken
before the check first runs ``fn``. A deterministic check that starts from that state traces the same
graphs, whatever ``fn`` changes while it runs, so the entry holds for every later check starting from it.

``fn`` may change what it reads while it runs: a trace counter (``global TRACES; TRACES += 1``), a log of
ints it appends to. Keyed by value, such a counter would differ at the start of every check and the cache
would never be hit. So after a check, :meth:`WeakFunctionCache.keep_after_run` keeps the entries of the
state the check started from also under the state ``fn`` left behind, which the next check starts from, but
only where the two differ in Python ints and in containers holding nothing but ints (:func:`same_but_ints`).
Such ints are taken to be ``fn``'s bookkeeping, which its traces do not depend on: a function whose result
depends on how often it ran has no single derivative to check (within one check its traces would already
disagree). Any other change (a float, a string, an array, an object that ``fn`` rebinds while it runs)
leaves the entries under the start state only: a trace may have read the value from before the change, so
the next check, starting from the changed state, traces afresh. An int the user rebinds between checks (a
factor ``SCALE = 3``) is not bookkeeping: it changes the start state, so the check traces afresh.
"""

from __future__ import annotations

import functools
import hashlib
import threading
import types
import weakref
from typing import Any, Callable, Dict, FrozenSet, Generic, Hashable, List, Optional, Tuple, TypeVar

import numpy as np

#: Top-level packages whose functions and objects every adapter keys by identity only, never followed inside.
BASE_LIBRARIES: FrozenSet[str] = frozenset({"numpy", "scipy", "gradbridge", "backends", "functools", "builtins",
                                            "typing", "abc", "math", "operator"})

#: Python values :meth:`Fingerprinter.plain` keys by value, as ``(type, value)`` (a trace bakes them in).
VALUE_TYPES: Tuple[type, ...] = (type(None), bool, int, float, complex, str, bytes, type(Ellipsis))

#: Returned by a hook for a value it leaves to the rest of the walk.
UNHANDLED: Any = object()


class Uncacheable(Exception):
    """Raised while keying a check that cannot be cached safely."""


def digest(array: np.ndarray) -> bytes:
    """A 16-byte digest of an array's contents; Uncacheable for an object array (its bytes are pointers)."""
    if array.dtype.hasobject:
        raise Uncacheable("object array")
    return hashlib.blake2b(np.ascontiguousarray(array).view(np.uint8).data, digest_size=16).digest()


class Fingerprinter:
    """Builds hashable tokens of what a function reads, collecting weak references to what it keys by identity.

    Subclasses supply their framework's types through :meth:`adapter_object` and their packages through
    :attr:`libraries`, and may replace the policy for plain values (:meth:`plain`) and NumPy arrays
    (:meth:`ndarray`). Anything that cannot be keyed safely raises :class:`Uncacheable`.
    """

    #: Top-level packages whose functions and objects are keyed by identity only, never followed inside.
    libraries: FrozenSet[str] = BASE_LIBRARIES
    #: More objects reached than this: not cached (a walk through a large object graph costs more than a trace).
    limit = 512
    #: Nested deeper than this: not cached.
    max_depth = 12

    def __init__(self) -> None:
        self.refs: List[weakref.ref] = []
        self._seen: Dict[int, int] = {}

    def alive(self) -> bool:
        """Whether every object keyed by identity still lives (else its id may name another object now)."""
        return all(ref() is not None for ref in self.refs)

    def identity(self, value: Any) -> Tuple[str, int]:
        """A token equal only for this very object, valid while :meth:`alive`; Uncacheable where it has no weak
        reference."""
        try:
            self.refs.append(weakref.ref(value))
        except TypeError:
            raise Uncacheable(type(value).__name__) from None
        return ("id", id(value))

    def environment(self, value: Any, depth: int = 0) -> Any:
        """The token of ``value`` (``fn``, and what it reaches) as read by a trace besides the arguments; None
        where nothing of it is keyed."""
        if len(self._seen) > self.limit or depth > self.max_depth:
            raise Uncacheable("too much state")
        token = self.plain(value)
        if token is not UNHANDLED:
            return token
        if isinstance(value, (types.ModuleType, types.BuiltinFunctionType, np.ufunc)):
            return ("builtin", getattr(value, "__name__", ""), id(value))
        if isinstance(value, type):
            return self.identity(value)
        key = id(value)
        if key in self._seen:
            return ("seen", self._seen[key])
        self._seen[key] = len(self._seen)
        if isinstance(value, np.ndarray):
            return self.ndarray(value)
        token = self.adapter_object(value, depth)
        if token is not UNHANDLED:
            return token
        return self._python_object(value, depth)

    def plain(self, value: Any) -> Any:
        """The token of a plain value, which needs no entry in the table of objects seen: :data:`VALUE_TYPES`
        (ints included: a counter ``fn`` bumps is dealt with by :meth:`WeakFunctionCache.keep_after_run`) and
        NumPy scalars by value. :data:`UNHANDLED` for anything else."""
        if isinstance(value, VALUE_TYPES):
            return (type(value), value)
        if isinstance(value, np.generic):
            return ("scalar", value.dtype.str, value.tobytes())
        return UNHANDLED

    def ndarray(self, value: np.ndarray) -> Any:
        """The token of a NumPy array: shape, dtype and a digest of its contents."""
        return ("ndarray", value.shape, value.dtype.str, digest(value))

    def adapter_object(self, value: Any, depth: int) -> Any:
        """The token of an object of the adapter's framework (a tensor, a variable, a custom-derivative
        wrapper), walked before the generic rules; :data:`UNHANDLED` for others. None here."""
        return UNHANDLED

    def is_library(self, value: Any) -> bool:
        """Whether ``value`` (or, for an instance, its class) is defined in one of :attr:`libraries`."""
        module = getattr(value, "__module__", None)
        if not isinstance(module, str) and not isinstance(value, (types.FunctionType, type)):
            module = getattr(type(value), "__module__", None)
        return isinstance(module, str) and module.split(".")[0] in self.libraries

    def _python_object(self, value: Any, depth: int) -> Any:
        if isinstance(value, (tuple, list, set, frozenset, dict)):  # followed for the arrays and functions in them
            items = value.values() if isinstance(value, dict) else value
            tokens = tuple(t for t in (self.environment(v, depth + 1) for v in items) if t is not None)
            return tokens or None
        wrapped = getattr(value, "__wrapped__", None)
        if wrapped is not None and not isinstance(value, types.FunctionType):  # jit-like wrappers, decorators
            return ("wrapped", self.identity(value), self.environment(wrapped, depth + 1))
        if self.is_library(value):
            return self.identity(value)
        if isinstance(value, types.FunctionType):
            return ("function", self.identity(value), self._function(value, depth))
        if isinstance(value, types.MethodType):
            return ("method", self.environment(value.__func__, depth + 1), self.environment(value.__self__, depth + 1))
        if isinstance(value, functools.partial):
            return ("partial", self.identity(value), self.environment(value.func, depth + 1),
                    self.environment(value.args, depth + 1), self.environment(value.keywords, depth + 1))
        state = getattr(value, "__dict__", None)
        return ("object", self.identity(value),
                self.environment(dict(state), depth + 1) if isinstance(state, dict) else None)

    def _function(self, fn: types.FunctionType, depth: int) -> Any:
        """A Python function's code, the globals its code (nested code included) names, its closure cells and
        its defaults."""
        names: List[str] = []
        codes = [fn.__code__]
        while codes:
            code = codes.pop()
            names.extend(code.co_names)
            codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
        globals_ = fn.__globals__
        referenced = tuple((name, self.environment(globals_[name], depth + 1)) for name in sorted(set(names))
                           if name in globals_)
        cells = []
        for cell in fn.__closure__ or ():
            try:
                cells.append(self.environment(cell.cell_contents, depth + 1))
            except ValueError:  # an empty cell (a name assigned later)
                cells.append(("empty",))
        return (id(fn.__code__), referenced, tuple(cells), self.environment(fn.__defaults__, depth + 1),
                self.environment(fn.__kwdefaults__, depth + 1))


_INTS: Any = object()


def _without_ints(token: Any) -> Any:
    """``token`` with each Python int (``(int, value)``) and each part holding nothing but ints (an empty
    container's None included) replaced by one marker, in place: the other parts keep their positions."""
    if token is None or type(token) is tuple and len(token) == 2 and token[0] is int:
        return _INTS
    if type(token) is not tuple:
        return token
    parts = tuple(_without_ints(part) for part in token)
    return _INTS if parts and all(part is _INTS for part in parts) else parts


def same_but_ints(before: Any, after: Any) -> bool:
    """Whether two environment tokens are equal but for Python ints and containers holding nothing but ints
    (a counter, a log of counts, an int attribute). A bool, an int subclass, an int that became a float, a
    container that got a float are changes."""
    return before == after or _without_ints(before) == _without_ints(after)


def holds_ints(token: Any) -> bool:
    """Whether an environment token holds a Python int (``(int, value)``) anywhere. Where it holds none, no
    counter was read, so a cache can skip the second fingerprint after a run (a container that was empty and
    fills up with ints then costs one cache miss, never a wrong hit)."""
    if type(token) is not tuple:
        return False
    if len(token) == 2 and token[0] is int:
        return True
    return any(holds_ints(part) for part in token)


def owners(fn: Any) -> Tuple[Any, ...]:
    """The objects a cache slot is tied to: a bound method's function and object (each attribute access makes
    a new method object), else ``fn`` itself."""
    if isinstance(fn, types.MethodType):
        return (fn.__func__, fn.__self__)
    return (fn,)


def weak_callable(fn: Any) -> Callable[[], Any]:
    """A way back to ``fn`` that does not keep it alive (what a cache keeps must not); ``fn`` itself where it
    cannot be referenced weakly."""
    try:
        return weakref.WeakMethod(fn) if isinstance(fn, types.MethodType) else weakref.ref(fn)
    except TypeError:
        return lambda: fn


E = TypeVar("E")
_Slot = Tuple[Tuple["weakref.ref[Any]", ...], Dict[Hashable, E]]


class WeakFunctionCache(Generic[E]):
    """Entries per function and key, kept only while the function lives.

    A function's slot is found by the ids of its :func:`owners` and checked against weak references to them
    (an id is reused once its object is gone); those references drop the slot when an owner is collected. A
    slot keeps the :attr:`per_function` latest stored keys (older keys of a counter's values drop out first);
    one entry may be kept under several keys (:meth:`keep_after_run`). Thread-safe.
    """

    def __init__(self, per_function: int = 16) -> None:
        self.per_function = per_function
        self._slots: Dict[Tuple[int, ...], _Slot[E]] = {}
        self._lock = threading.Lock()

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._slots.clear()

    def __len__(self) -> int:
        """How many entries are kept, over all functions (one kept under several keys counts once)."""
        with self._lock:
            return sum(len({id(entry) for entry in entries.values()}) for _, entries in self._slots.values())

    def get(self, fn: Any, key: Hashable, keep: Optional[Callable[[E], bool]] = None) -> Optional[E]:
        """``fn``'s entry for ``key``, or None; an entry ``keep`` rejects is dropped and None returned."""
        fn_owners = owners(fn)
        with self._lock:
            slot = self._slots.get(tuple(id(o) for o in fn_owners))
            if slot is None or any(ref() is not o for ref, o in zip(slot[0], fn_owners)):
                return None
            entry = slot[1].get(key)
            if entry is not None and keep is not None and not keep(entry):
                del slot[1][key]
                return None
            return entry

    def put(self, fn: Any, key: Hashable, entry: E) -> bool:
        """Keep ``entry`` for ``fn`` and ``key`` (the newest of its slot); False when ``fn`` cannot be
        referenced weakly (nothing is kept)."""
        fn_owners = owners(fn)
        slot_key = tuple(id(o) for o in fn_owners)

        def forget(ref: "weakref.ref[Any]", slot_key: Tuple[int, ...] = slot_key) -> None:
            with self._lock:
                slot = self._slots.get(slot_key)
                if slot is not None and any(r is ref for r in slot[0]):
                    del self._slots[slot_key]

        with self._lock:
            slot = self._slots.get(slot_key)
            if slot is None or any(ref() is not o for ref, o in zip(slot[0], fn_owners)):
                try:
                    slot = (tuple(weakref.ref(o, forget) for o in fn_owners), {})
                except TypeError:
                    return False
                self._slots[slot_key] = slot
            self._store(slot[1], key, entry)
        return True

    def _store(self, entries: Dict[Hashable, E], key: Hashable, entry: E) -> None:
        entries.pop(key, None)
        entries[key] = entry
        while len(entries) > self.per_function:
            del entries[next(iter(entries))]

    def keep_after_run(self, fn: Any, before: Any, after: Any) -> bool:
        """After a check of ``fn`` that started from the environment token ``before`` and left ``after`` behind,
        keep every entry of ``fn`` kept under ``(structure, before)`` also under ``(structure, after)``, where
        the two differ in ints only (:func:`same_but_ints`; see the module's docstring). The entries of other
        structures (shapes, options) are moved along too: the counter is the same for all of them. Returns
        whether any entry is kept so."""
        if after == before or not same_but_ints(before, after):
            return False
        try:
            hash(after)
        except TypeError:
            return False
        fn_owners = owners(fn)
        with self._lock:
            slot = self._slots.get(tuple(id(o) for o in fn_owners))
            if slot is None or any(ref() is not o for ref, o in zip(slot[0], fn_owners)):
                return False
            entries = slot[1]
            found = [(key[0], entry) for key, entry in entries.items()
                     if type(key) is tuple and len(key) == 2 and key[1] == before]
            for structure, entry in found:
                self._store(entries, (structure, after), entry)
        return bool(found)
