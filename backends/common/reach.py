"""Reading a user's function without running it: the objects its code loads.

Adapters look into ``fn`` before running it: the torch backend for ``autograd.Function`` classes with forward
rules and for side effects vmap would change, the autograd backend for autograd itself and user primitives.

Invariant: nothing here runs the user's code or imports anything: code is disassembled (cached per code object),
attributes are read from modules', classes' and objects' own dictionaries only (no property, no
``__getattr__``), and closure cells and globals are looked up, never called.
"""

from __future__ import annotations

import dis
import types
import weakref
from typing import Any, Callable, Iterator, Optional

#: "Not found" for the readers below (None is a value code can load).
MISSING: Any = object()

_INSTRUCTIONS: "weakref.WeakKeyDictionary[types.CodeType, tuple]" = weakref.WeakKeyDictionary()


def instructions(code: types.CodeType) -> tuple:
    """``dis.get_instructions(code)``, kept per code object (immutable; a lambda written in a test or a loop
    has one code object however often it is created), since disassembling costs tens of microseconds."""
    found = _INSTRUCTIONS.get(code)
    if found is None:
        found = _INSTRUCTIONS[code] = tuple(dis.get_instructions(code))
    return found


def static_attribute(value: Any, name: str, fallback: Optional[Callable[[Any, str], Any]] = None) -> Any:
    """``value.name`` where reading it runs no user code: a module's, a class's (through its MRO; a staticmethod
    as its function, a classmethod bound to the class) or an instance's own dictionary; ``fallback(value, name)``
    (say, a framework's registry of submodules) or :data:`MISSING` otherwise."""
    if isinstance(value, types.ModuleType):
        return value.__dict__.get(name, MISSING)
    if isinstance(value, type):
        for klass in value.__mro__:
            if name in klass.__dict__:
                found = klass.__dict__[name]
                if isinstance(found, staticmethod):
                    return found.__func__
                if isinstance(found, classmethod):
                    return types.MethodType(found.__func__, value)
                return found
        return MISSING
    try:
        own = object.__getattribute__(value, "__dict__")  # never the object's own __getattr__/__getattribute__
    except (AttributeError, TypeError):
        own = None
    if isinstance(own, dict) and name in own:
        return own[name]
    return fallback(value, name) if fallback is not None else MISSING


def code_loads(function: types.FunctionType, self_value: Any = MISSING,
               attribute: Callable[[Any, str], Any] = static_attribute) -> Iterator[Any]:
    """The objects ``function``'s code (and the code of the functions and lambdas nested in it) loads: globals,
    closure cells, and attribute chains of those (``ops.my_op``, ``np.linalg.norm``); ``self.<name>`` too when
    ``self_value`` is the object bound to the first argument. Attributes are read with ``attribute``."""
    code = function.__code__
    namespace = getattr(function, "__globals__", {})
    cells = dict(zip(code.co_freevars, function.__closure__ or ()))
    first = code.co_varnames[0] if code.co_argcount and self_value is not MISSING else None
    codes = [code]
    while codes:
        current: Any = MISSING
        for instr in instructions(codes.pop()):
            name = instr.opname
            if name in ("LOAD_GLOBAL", "LOAD_NAME"):
                current = namespace.get(instr.argval, MISSING)
            elif name in ("LOAD_DEREF", "LOAD_CLOSURE") and instr.argval in cells:
                try:
                    current = cells[instr.argval].cell_contents
                except ValueError:  # an empty cell
                    current = MISSING
            elif name == "LOAD_FAST" and first is not None and instr.argval == first:
                current = self_value
            elif name in ("LOAD_ATTR", "LOAD_METHOD") and current is not MISSING:
                current = attribute(current, instr.argval)
            else:
                current = MISSING
                if name == "LOAD_CONST" and isinstance(instr.argval, types.CodeType):
                    codes.append(instr.argval)  # a nested function or lambda: same globals
                continue
            if current is not MISSING:
                yield current
