"""What a user's function reads besides its arguments, as one hashable token (the key of a trace kept across checks).

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

"""

from __future__ import annotations

import functools
import hashlib
import sys
import types
import weakref
from typing import Any, Callable, Dict, FrozenSet, Hashable, List, Tuple

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
                return self._namespace(value, self._names | CONSTRUCTED, depth)
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
                self._namespace(cls, self._names | CALLED, depth + 1) if self._user_class(cls)
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
                            new = code_names(function.__code__) - grown
                            grown |= new
                            pending.extend(new)
                    break
        return found, frozenset(grown)

    def _function(self, fn: types.FunctionType, depth: int) -> Any:
        """A Python function's code, the globals its code (nested code included) names, its closure cells and
        its defaults; the user's modules and classes among them by the attributes its code names."""
        names = code_names(fn.__code__)
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
CONSTRUCTED: FrozenSet[str] = frozenset({"__init__", "__call__"})
#: Names the class of an object is followed by besides those its reader names: calling the object runs it.
CALLED: FrozenSet[str] = frozenset({"__call__"})


def code_names(code: types.CodeType) -> FrozenSet[str]:
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
