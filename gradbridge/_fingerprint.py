"""What a user's function reads besides its arguments, as one hashable token, and a cache held weakly per function.

Adapters that trace or compile ``fn`` keep the result for the next check of the same function. Such an entry
holds only while ``fn`` reads the same things: the globals it names, its closure cells, its defaults, the state
of a callable object or bound method, recursively through the Python functions it reaches.
:class:`Fingerprinter` walks all that and builds a token to compare:

* plain values (Python ints, floats, bools, complex numbers, strings, bytes, NumPy scalars) by value
  (:meth:`Fingerprinter.plain`): a trace bakes them in, so a rebound global ``SCALE`` must not find the old
  trace;
* NumPy arrays by shape, dtype and a digest of their contents (they can change in place);
* builtins and ufuncs, and the modules of :attr:`Fingerprinter.libraries` and of Python's standard library, by
  name and id (they live as long as the process); the classes of those by identity;
* the user's own modules and classes by identity plus the attributes the code that reads them names (the
  ``co_names`` of its code objects, attribute names included): ``settings.SCALE = 1.0`` in the user's config
  module, or ``Config.scale = 1.0`` on a class, must not find the old trace. A class is followed into the
  methods those names reach (``__call__``, ``__init__``, and the ``self.helper`` they call, through
  staticmethods, classmethods and properties too), only in the user's classes of its MRO;
* tuples, lists, sets by what they hold, dicts by their (key, value) items; every item keeps its position,
  and each item counts against :attr:`Fingerprinter.limit` (a table of a million floats is not walked);
* ``functools.partial`` objects (any module's) by identity plus their function, arguments and keywords;
* objects wrapping a function (``__wrapped__``) by identity plus the wrapped function (plus their state and
  class when they are the user's);
* functions and objects of the packages in :attr:`Fingerprinter.libraries` by identity only: library state is
  not the user's to change;
* Python functions by identity plus what they read; bound methods by their function and object; other
  objects by identity plus their ``__dict__`` and their class (what a callable object's ``__call__`` reads,
  the class attributes read through the object).

Whatever goes wrong while walking the user's objects (a ``__getattr__`` raising KeyError, a property raising,
a hook failing) raises :class:`Uncacheable` from :meth:`Fingerprinter.environment`: such a check is simply
not cached.

An id names an object only while it lives, so every object keyed by identity is also held by a weak
reference; :meth:`Fingerprinter.alive` says whether all of them still are. Each adapter subclasses
:class:`Fingerprinter` for its own types (:meth:`~Fingerprinter.adapter_object`) and adds its own packages to
:attr:`~Fingerprinter.libraries`; nothing here imports a framework.

:class:`WeakFunctionCache` keeps entries per function and key without keeping the function alive; the
callback that drops a collected function's entries never waits for the cache's lock (a collection can start
inside it, in the same thread).

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

import collections
import functools
import hashlib
import sys
import threading
import types
import weakref
from typing import Any, Callable, Dict, FrozenSet, Generic, Hashable, List, Optional, Sequence, Tuple, TypeVar

import numpy as np

#: Top-level packages whose functions and objects every adapter keys by identity only, never followed inside.
BASE_LIBRARIES: FrozenSet[str] = frozenset({"numpy", "scipy", "gradbridge", "backends", "functools", "builtins",
                                            "typing", "abc", "math", "operator"})

#: Top-level modules of Python's standard library: their modules and classes are keyed by identity only, as
#: those of :attr:`Fingerprinter.libraries` (``math.pi`` is not the user's state).
STDLIB: FrozenSet[str] = frozenset(sys.stdlib_module_names)

#: Python values :meth:`Fingerprinter.plain` keys by value, as ``(type, value)`` (a trace bakes them in).
VALUE_TYPES: Tuple[type, ...] = (type(None), bool, int, float, complex, str, bytes, type(Ellipsis))

#: The value of an instance of a subclass of a :data:`VALUE_TYPES` type as the base type itself: a token holds
#: no object whose own ``__eq__`` or ``__hash__`` would run when a cache compares keys.
_EXACT: Tuple[Tuple[type, Callable[[Any], Any]], ...] = (
    (int, int.__int__), (float, float.__float__), (str, str.__str__),
    (complex, lambda v: complex(complex.real.__get__(v), complex.imag.__get__(v))),
    (bytes, lambda v: bytes.__getitem__(v, slice(None))))

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
        # objects walked (by id) and user modules and classes walked (by id and the names read), in order
        self._seen: Dict[Hashable, int] = {}
        self._items = 0  # container items walked: they count against the limit as the objects do
        self._names: FrozenSet[str] = frozenset()  # what the code being walked names (see _namespace)

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
        where nothing of it is keyed.

        Called with ``depth`` 0 (by an adapter, on ``fn``), any error of the walk becomes :class:`Uncacheable`:
        walking runs the user's code (``__getattr__``, properties, ``__len__``) and the adapters' hooks, and
        whatever fails there must only make the check uncached, never fail it. Hooks walk deeper values with
        ``depth + 1``."""
        if depth:
            return self._walk(value, depth)
        try:
            return self._walk(value, 0)
        except Uncacheable:
            raise
        except Exception as error:
            raise Uncacheable(f"{type(error).__name__} while walking what fn reads") from error

    def _check(self, depth: int) -> None:
        if len(self._seen) + self._items > self.limit or depth > self.max_depth:
            raise Uncacheable("too much state")

    def _walk(self, value: Any, depth: int) -> Any:
        self._check(depth)
        token = self.plain(value)
        if token is not UNHANDLED:
            return token
        if isinstance(value, types.ModuleType):
            name = value.__name__ if isinstance(value.__name__, str) else ""
            if self._users(name):
                return self._namespace(value, self._names, depth)
            return ("builtin", name, id(value))
        if isinstance(value, (types.BuiltinFunctionType, np.ufunc)):
            return ("builtin", getattr(value, "__name__", ""), id(value))
        if isinstance(value, type):
            if self._user_class(value):  # calling it runs __init__ (and __call__ on what it makes)
                return self._namespace(value, self._names | _CONSTRUCTED, depth)
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
        NumPy scalars by value. :data:`UNHANDLED` for anything else. An instance of a subclass (an IntEnum
        member) is keyed by its type and its value as the base type."""
        if isinstance(value, VALUE_TYPES):
            kind = type(value)
            if kind not in VALUE_TYPES:
                value = next(exact(value) for base, exact in _EXACT if isinstance(value, base))
            return (kind, value)
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

    def _users(self, module: str) -> bool:
        """Whether the module named ``module`` is the user's: neither in :attr:`libraries` nor in :data:`STDLIB`."""
        top = module.split(".")[0]
        return top not in self.libraries and top not in STDLIB

    def _user_class(self, cls: type) -> bool:
        """Whether ``cls`` is defined in a module of the user's (see :meth:`_users`)."""
        module = cls.__dict__.get("__module__")
        return isinstance(module, str) and self._users(module)

    def _python_object(self, value: Any, depth: int) -> Any:
        if isinstance(value, (tuple, list, set, frozenset, dict)):  # followed for the arrays and functions in them
            return self._container(value, depth)
        if isinstance(value, functools.partial):  # before the library rule: functools.partial is of functools
            return ("partial", self.identity(value), self._walk(value.func, depth + 1),
                    self._walk(value.args, depth + 1), self._walk(value.keywords, depth + 1))
        if isinstance(value, (staticmethod, classmethod)):  # found in a class; no weak reference to them
            return (type(value).__name__, self._walk(value.__func__, depth + 1))
        if isinstance(value, property):
            return ("property",) + tuple(self._walk(f, depth + 1) for f in (value.fget, value.fset, value.fdel))
        if isinstance(value, functools.cached_property):
            return ("cached_property", self._walk(value.func, depth + 1))
        wrapped = getattr(value, "__wrapped__", None)
        if wrapped is not None and not isinstance(value, types.FunctionType):  # jit-like wrappers, decorators
            # a library's decorator object copies the wrapped function's __module__: told apart by its class
            if self.is_library(value) or not self._user_class(type(value)):
                return ("wrapped", self.identity(value), self._walk(wrapped, depth + 1))
            return ("wrapped", self._object(value, depth), self._walk(wrapped, depth + 1))
        if self.is_library(value):
            return self.identity(value)
        if isinstance(value, types.FunctionType):
            return ("function", self.identity(value), self._function(value, depth))
        if isinstance(value, types.MethodType):
            function = value.__func__
            name = getattr(function, "__name__", None)
            token = self._walk(function, depth + 1)
            outer = self._names
            self._names = outer | {name} if isinstance(name, str) else outer  # the object's class: from this method
            try:
                return ("method", token, self._walk(value.__self__, depth + 1))
            finally:
                self._names = outer
        return self._object(value, depth)

    def _object(self, value: Any, depth: int) -> Any:
        """An object by identity plus its ``__dict__`` and its class: what its ``__call__`` and the methods
        the code reading it names read, and the class attributes read through it."""
        state = getattr(value, "__dict__", None)
        cls = type(value)
        return ("object", self.identity(value),
                self._container(state, depth + 1) if isinstance(state, dict) else None,
                self._namespace(cls, self._names | _CALLED, depth + 1) if self._user_class(cls)
                else self.identity(cls))

    def _container(self, value: Any, depth: int) -> Any:
        """A tuple, list, set or dict (or an object's ``__dict__``) by what it holds, each item at its position,
        dicts by (key, value) items; None where empty. Every item counts against :attr:`limit`, checked before
        any is walked."""
        self._items += len(value)
        self._check(depth)
        if isinstance(value, dict):
            tokens: Tuple[Any, ...] = tuple((self._walk(k, depth + 1), self._walk(v, depth + 1))
                                            for k, v in list(value.items()))
        else:
            tokens = tuple(self._walk(v, depth + 1) for v in list(value))
        return tokens or None

    def _namespace(self, value: Any, names: FrozenSet[str], depth: int) -> Any:
        """A user's module or class by identity plus the attributes ``names`` names that it holds (a class: in
        the user's classes of its MRO, ``names`` grown by what the methods found name). Walked once per
        module or class and names."""
        self._check(depth)
        key = (id(value), names)
        if key in self._seen:
            return ("seen", self._seen[key])
        self._seen[key] = len(self._seen)
        if isinstance(value, type):
            attributes, names = self._class_attributes(value, names)
            head: Tuple[Any, ...] = ("class", self.identity(value))
        else:
            namespace = vars(value)
            attributes = {name: namespace[name] for name in names if name in namespace}
            head = ("module", value.__name__, self.identity(value))
        outer = self._names
        self._names = names  # a module or class reached through these attributes: by the same names
        try:
            return head + (tuple((name, self._walk(attributes[name], depth + 1)) for name in sorted(attributes)),)
        finally:
            self._names = outer

    def _class_attributes(self, cls: type, names: FrozenSet[str]) -> Tuple[Dict[str, Any], FrozenSet[str]]:
        """The attributes of ``cls`` that ``names`` names, looked up in the ``__dict__`` of the user's classes
        of its MRO (library bases are not the user's state; nothing is run), and ``names`` grown by what the
        user's methods found name (``self.helper`` in ``__call__``), until nothing more is found."""
        classes = [c for c in cls.__mro__ if self._user_class(c)]
        grown = set(names)
        pending = list(names)
        found: Dict[str, Any] = {}
        while pending:
            name = pending.pop()
            for c in classes:
                namespace = c.__dict__
                if name in namespace:
                    attribute = namespace[name]
                    if isinstance(attribute, (types.MemberDescriptorType, types.GetSetDescriptorType)):
                        break  # a slot or __dict__ itself: the instance's state, not the class's
                    found[name] = attribute
                    for function in _functions_in(attribute):
                        if not self.is_library(function):
                            new = _code_names(function.__code__) - grown
                            grown |= new
                            pending.extend(new)
                    break
        return found, frozenset(grown)

    def _function(self, fn: types.FunctionType, depth: int) -> Any:
        """A Python function's code, the globals its code (nested code included) names, its closure cells and
        its defaults; the user's modules and classes among them by the attributes its code names."""
        names = _code_names(fn.__code__)
        outer = self._names
        self._names = names
        try:
            globals_ = fn.__globals__
            referenced = tuple((name, self._walk(globals_[name], depth + 1)) for name in sorted(names)
                               if name in globals_)
            cells = []
            for cell in fn.__closure__ or ():
                try:
                    cells.append(self._walk(cell.cell_contents, depth + 1))
                except ValueError:  # an empty cell (a name assigned later)
                    cells.append(("empty",))
            return (id(fn.__code__), referenced, tuple(cells), self._walk(fn.__defaults__, depth + 1),
                    self._walk(fn.__kwdefaults__, depth + 1))
        finally:
            self._names = outer


#: Names a class reached directly is followed by besides those its reader names: calling it runs these.
_CONSTRUCTED: FrozenSet[str] = frozenset({"__init__", "__call__"})
#: Names the class of an object is followed by besides those its reader names: calling the object runs it.
_CALLED: FrozenSet[str] = frozenset({"__call__"})


def _code_names(code: types.CodeType) -> FrozenSet[str]:
    """The names (globals and attributes) ``code`` and the code objects nested in it use."""
    names: List[str] = []
    codes = [code]
    while codes:
        code = codes.pop()
        names.extend(code.co_names)
        codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return frozenset(names)


def _functions_in(attribute: Any) -> List[types.FunctionType]:
    """The Python functions a class attribute runs: a function, a staticmethod's or classmethod's function,
    a property's accessors, a cached_property's function."""
    if isinstance(attribute, (staticmethod, classmethod)):
        attribute = attribute.__func__
    if isinstance(attribute, property):
        candidates: List[Any] = [attribute.fget, attribute.fset, attribute.fdel]
    elif isinstance(attribute, functools.cached_property):
        candidates = [attribute.func]
    else:
        candidates = [attribute]
    return [f for f in candidates if isinstance(f, types.FunctionType)]


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

    The callback of those references (:meth:`_forget`) never waits for the lock: the cyclic garbage collector
    can run it in the thread that holds the lock (any allocation inside a locked region may start a
    collection), where waiting would hang that thread for good. It queues the slot, drops it at once where the
    lock is free, and otherwise leaves it to the next call, which drops the queued slots first.
    """

    def __init__(self, per_function: int = 16) -> None:
        self.per_function = per_function
        self._slots: Dict[Tuple[int, ...], _Slot[E]] = {}
        self._lock = threading.Lock()
        # (slot key, dead weak reference) queued by _forget; deque.append and popleft are atomic
        self._pending: "collections.deque[Tuple[Tuple[int, ...], weakref.ref[Any]]]" = collections.deque()

    def _forget(self, slot_key: Tuple[int, ...], ref: "weakref.ref[Any]") -> None:
        """The callback of an owner's weak reference: queue its slot, and drop it now only if the lock is free."""
        self._pending.append((slot_key, ref))
        if self._lock.acquire(blocking=False):
            try:
                self._purge()
            finally:
                self._lock.release()

    def _purge(self) -> None:
        """Drop the queued slots of collected owners (under the lock; before any use of the slots)."""
        while True:
            try:
                slot_key, ref = self._pending.popleft()
            except IndexError:
                return
            slot = self._slots.get(slot_key)
            if slot is not None and any(r is ref for r in slot[0]):  # not a new slot of an object with that id
                del self._slots[slot_key]

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._purge()
            self._slots.clear()

    def __len__(self) -> int:
        """How many entries are kept, over all functions (one kept under several keys counts once)."""
        with self._lock:
            self._purge()
            return sum(len({id(entry) for entry in entries.values()}) for _, entries in self._slots.values())

    def get(self, fn: Any, key: Hashable, keep: Optional[Callable[[E], bool]] = None) -> Optional[E]:
        """``fn``'s entry for ``key``, or None; an entry ``keep`` rejects is dropped and None returned."""
        fn_owners = owners(fn)
        with self._lock:
            self._purge()
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
            self._forget(slot_key, ref)

        with self._lock:
            self._purge()
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
            self._purge()
            slot = self._slots.get(tuple(id(o) for o in fn_owners))
            if slot is None or any(ref() is not o for ref, o in zip(slot[0], fn_owners)):
                return False
            entries = slot[1]
            found = [(key[0], entry) for key, entry in entries.items()
                     if type(key) is tuple and len(key) == 2 and key[1] == before]
            for structure, entry in found:
                self._store(entries, (structure, after), entry)
        return bool(found)


# --- The state a function rebinds while it runs, snapshotted and put back ---------------------------------------
#
# A framework that traces ``fn`` (compiles or vectorizes it) runs it with placeholder values; a function that
# keeps state (a model holding its own PRNG key, ``self.key, sub = split(self.key)``, a closure rebinding a
# nonlocal, a global) stores those placeholders into the user's objects. :class:`StateWalker` finds, from the
# same roots and by the same reach as :class:`Fingerprinter` (closure cells, the globals the code names, the
# user's objects' ``__dict__`` and slots, the user's classes' and modules' attributes the code names, lists and
# dicts), every place such a run can rebind, and :class:`StateSnapshot` keeps what each held so it can be put
# back. Best effort and never raising: the walk stops (keeping what it found) after :attr:`StateWalker.limit`
# objects and items, and an object whose walking raises is left out. Library objects are not walked into, as
# for the fingerprint; nothing here imports a framework (an adapter says which values are its arrays and which
# are placeholders).

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
                attributes, grown = self._class_attributes(value, names | _CONSTRUCTED)
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
        names = _code_names(code)
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
        self._push(cls, path, names | _CALLED)


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
