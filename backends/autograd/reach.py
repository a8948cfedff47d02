"""What a user's function reaches in its code: autograd itself (detection) and user primitives with rules.

Invariant: finding what ``fn`` reaches only reads code and objects' own dictionaries (no property, no
``__getattr__``, nothing of the user's is called), so it cannot change what the check sees, and it never
imports anything. The walk starts at ``fn`` (a function, a lambda, a ``functools.partial``, a bound method, a
callable object's ``__call__``), reads the globals, closure cells and attribute chains its code loads
(``anp.tanh``, ``ops.my_op``, ``self.op``), and follows the user functions it names up to :data:`DEPTH` calls
deep; library code (NumPy, SciPy, autograd, every registered framework, gradbridge, the standard library) is never
entered.
"""

from __future__ import annotations

import collections
import functools
import types
from typing import Any, Callable, Iterator, List

from ..common.fingerprint import BASE_LIBRARIES, STDLIB
from ..common.reach import MISSING, code_loads, static_attribute
from .compat import is_primitive, primitive_jvps, raw_function

#: How many levels of code the walk reads: fn's own, the functions it names, and the functions those name.
DEPTH = 3
#: The most objects one walk looks at (a large object graph is not searched exhaustively).
LIMIT = 256

@functools.lru_cache(maxsize=1)
def _libraries() -> frozenset:
    """Top-level packages never entered: the kit's base libraries, autograd, and every registered framework
    (a torch module's ``__call__`` is torch's code, not the user's)."""
    from gradbridge import _registry

    names = set(BASE_LIBRARIES) | {"autograd"}
    for entry in _registry.entries():
        names.add(entry.framework_module)
        names.update(entry.library_modules)
    return frozenset(names)


def _top(module: Any) -> str:
    return module.split(".")[0] if isinstance(module, str) else ""


def _library(value: Any) -> bool:
    """Whether ``value`` (a function or a class) belongs to a library or the standard library, not the user."""
    top = _top(getattr(value, "__module__", None))
    return top in _libraries() or top in STDLIB


def reached(fn: Any, depth: int = DEPTH) -> Iterator[Any]:
    """Every object ``fn``'s code loads (globals, closure cells, attributes of those), ``fn`` itself first,
    following the user's functions and methods it names up to ``depth`` calls deep. Each object once."""
    seen: set = set()
    pending = collections.deque([(fn, depth, MISSING)])
    while pending and len(seen) < LIMIT:
        value, left, self_value = pending.popleft()
        if id(value) in seen:
            continue
        seen.add(id(value))
        yield value
        if is_primitive(value):
            continue  # a primitive runs its function on plain arrays: nothing inside it is traced
        if isinstance(value, functools.partial):
            pending.append((value.func, left, MISSING))
        elif isinstance(value, types.MethodType):
            pending.append((value.__func__, left, value.__self__))
        elif isinstance(value, types.FunctionType):
            if not _library(value) and left > 0:
                pending.extend((found, left - 1, MISSING) for found in code_loads(value, self_value))
        elif not isinstance(value, (type, types.ModuleType, types.BuiltinFunctionType)) and callable(value):
            call = static_attribute(type(value), "__call__")  # a callable object of a user class
            if isinstance(call, types.FunctionType) and not _library(call):
                pending.append((types.MethodType(call, value), left, MISSING))


def is_autograd(value: Any) -> bool:
    """Whether ``value`` is autograd's: one of its modules (``autograd.numpy``, ``autograd.scipy``), a
    primitive (autograd's wrapped NumPy functions, and the user's own), or a function of autograd's."""
    if isinstance(value, types.ModuleType):
        return _top(value.__name__) == "autograd"
    if is_primitive(value):
        return True
    return isinstance(value, (types.FunctionType, type)) and _top(getattr(value, "__module__", None)) == "autograd"


def uses_autograd(fn: Any) -> bool:
    """Whether ``fn`` is an autograd primitive or its code reaches autograd (see :func:`reached`)."""
    return any(is_autograd(value) for value in reached(fn))


def user_primitive(value: Any) -> bool:
    """Whether ``value`` is a primitive the user made (``autograd.extend.primitive`` on their own function),
    not one of autograd's wrapped NumPy or SciPy functions nor one of gradbridge's."""
    if not is_primitive(value):
        return False
    top = _top(getattr(raw_function(value), "__module__", None))
    return bool(top) and top not in _libraries()


def rule_name(primitive: Callable[..., Any]) -> str:
    raw = raw_function(primitive)
    return getattr(raw, "__qualname__", None) or getattr(primitive, "__name__", "primitive")


def forward_rules(fn: Any) -> List[str]:
    """The user-written forward-mode rules ``fn`` reaches: ``"my_op (defjvp)"`` for each user primitive with a
    JVP rule of its own (``defjvp``, ``defjvp_argnum``, ``def_linear``), in the order found."""
    return [f"{rule_name(value)} (defjvp)" for value in reached(fn)
            if user_primitive(value) and value in primitive_jvps]
