"""Python side effects that one batched call of fn (under ``torch.func.vmap``) would change, found before and
after fn runs batched.

Invariant: a function whose own code visibly writes outside itself (a global, an enclosing variable, a
mutating method of a global or closed-over container, ``print``) is never run under vmap, and one that kept a
batched tensor it computed (stored it outside the call) is found by :class:`_EscapeWatch` once the call
returns; either runs point by point, so fn's side effects happen once per evaluation, as the user wrote them.
The screen only reads code (``dis``), it never calls fn; disassembly is kept per code object, which is
immutable.
"""

from __future__ import annotations

import gc
import types
import weakref
from typing import Any, List, Optional

import torch

from ..common.reach import instructions
from .compat import TorchFunctionMode, is_batchedtensor


_MUTATING_METHODS = frozenset({"append", "extend", "insert", "add", "update", "setdefault", "pop", "popitem",
                               "remove", "discard", "clear", "appendleft", "put", "write", "send"})


def _visible_side_effect(fn: Any) -> Optional[str]:
    """A Python side effect in ``fn``'s own code (not in what it calls) that one batched call instead of
    one call per evaluation would change: writing a global or an enclosing function's variable, calling a
    mutating method (``append``, ``update``, ...) of a global or closed-over object, ``print``. Found
    before fn runs under vmap, since a batched tensor kept by fn cannot be taken back. None when none is
    seen (the runtime checks still apply)."""
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    code = getattr(getattr(target, "__func__", target), "__code__", None)
    if code is None:
        return None
    function = getattr(target, "__func__", target)
    free = set(code.co_freevars)
    cells = dict(zip(code.co_freevars, getattr(function, "__closure__", None) or ()))
    namespace = getattr(function, "__globals__", {})
    missing = object()

    def value_of(instr) -> Any:
        if instr.opname == "LOAD_GLOBAL":
            return namespace.get(instr.argval, missing)
        try:
            return cells[instr.argval].cell_contents
        except (KeyError, ValueError):
            return missing

    previous = None
    for instr in instructions(code):
        if instr.opname == "STORE_GLOBAL":
            return f"fn assigns the global {instr.argval!r}"
        if instr.opname == "STORE_DEREF" and instr.argval in free:
            return f"fn assigns the enclosing variable {instr.argval!r}"
        if (instr.opname in ("LOAD_ATTR", "LOAD_METHOD") and instr.argval in _MUTATING_METHODS and previous is not None
                and (previous.opname == "LOAD_GLOBAL" or (previous.opname == "LOAD_DEREF" and previous.argval in free))):
            owner = value_of(previous)  # a container (list, dict, set, deque, a file), not torch.add & co.
            if owner is not missing and not isinstance(owner, (types.ModuleType, type, torch.Tensor, torch.nn.Module)):
                return f"fn calls {previous.argval}.{instr.argval}(...)"
        if instr.opname == "LOAD_GLOBAL" and instr.argval == "print" and "print" not in namespace:
            return "fn calls print(...)"
        previous = instr
    return None


class _EscapeWatch(TorchFunctionMode):
    """Weak references to the batched tensors fn computes under vmap: any still alive after the call was
    kept by fn (appended to a list, stored on an object), a side effect that sees one batched tensor
    instead of one tensor per evaluation, so such an fn runs point by point."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: List[weakref.ReferenceType] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(value, torch.Tensor) and is_batchedtensor(value):
                self.refs.append(weakref.ref(value))
        return out

    def escaped(self) -> bool:
        if not any(ref() is not None for ref in self.refs):
            return False
        # reference cycles (the output tree's own, a frame kept by a traceback) are no escape: the young
        # generations first (cheap), the whole heap only when something still looks kept
        for generation in (1, 2):
            gc.collect(generation)
            if not any(ref() is not None for ref in self.refs):
                return False
        return True
