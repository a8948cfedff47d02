"""User-written forward-mode rules (a ``torch.autograd.Function``'s own ``jvp``), which reverse mode never runs.

Invariant: finding the rules fn runs only reads code and objects' own dictionaries (no property, no
``__getattr__``, nothing of the user's is called), so it cannot change what the check sees; a rule named here
is one of the user's (a subclass's ``jvp`` that is neither torch's default nor one of torch's own Functions),
and an error raised inside such a rule while forward mode runs is told apart from fn's own errors by its
traceback alone.
"""

from __future__ import annotations

import functools
import types
from typing import Any, List, Optional

import torch

from ..common.fingerprint import BASE_LIBRARIES
from ..common.reach import MISSING, code_loads, static_attribute
from .compat import submodules

# words in the errors torch raises when fn (or a rule it runs) has no forward-mode support

_FORWARD_AD_HINTS = ("jvp", "forward ad", "forward-mode", "forward mode", "forward grad", "fwad", "dual")


def _function_class(fn: Any) -> Optional[type]:
    """The autograd.Function subclass when ``fn`` is its ``apply``, else None."""
    owner = getattr(fn, "__self__", None)
    if (isinstance(fn, types.MethodType) and isinstance(owner, type) and issubclass(owner, torch.autograd.Function)
            and getattr(fn.__func__, "__name__", "") == "apply"):
        return owner
    return None


_DEFAULT_JVP = torch.autograd.Function.jvp
_TORCH_PACKAGES = ("torch", "functorch")
# how far the search for Functions used inside fn goes: functions called by name, nesting depth, objects seen
_RULE_DEPTH = 3
_RULE_LIMIT = 256


def _user_jvp(cls: Any) -> bool:
    """Whether ``cls`` is a torch.autograd.Function subclass with a jvp of its own (or inherited from a user
    class), not torch's default (which raises) nor one of torch's own Functions."""
    if not (isinstance(cls, type) and issubclass(cls, torch.autograd.Function)):
        return False
    jvp = getattr(cls, "jvp", None)
    if jvp is None or jvp is _DEFAULT_JVP:
        return False
    module = getattr(jvp, "__module__", None) or getattr(cls, "__module__", "") or ""
    return module.split(".")[0] not in _TORCH_PACKAGES


def _rule_name(cls: type) -> str:
    return f"{getattr(cls, '__qualname__', cls.__name__)}.jvp"


def _static_attribute(value: Any, name: str) -> Any:
    """``value.name`` where that runs no user code (:func:`..common.reach.static_attribute`), plus a module's
    submodules: the search below reads code, it never calls properties or ``__getattr__``."""
    return static_attribute(value, name, _submodule)


def _submodule(value: Any, name: str) -> Any:
    if isinstance(value, torch.nn.Module):
        return submodules(value).get(name, MISSING)
    return MISSING


def _forward_rules(fn: Any) -> List[str]:
    """The user-written forward-mode rules (``MyFunction.jvp``) ``fn`` runs, as far as a cheap look finds
    them: ``fn`` is ``MyFunction.apply``; or fn's code (a function, a lambda, a partial, a callable object's
    ``__call__``, each submodule's ``forward`` of a module) names a Function class or its ``apply``,
    directly, through a module attribute (``ops.MyFunction.apply``) or ``self.<attribute>``; or calls a user
    function by name that does, up to :data:`_RULE_DEPTH` calls deep. Only code is read, nothing is called."""
    found: List[str] = []
    seen: set = set()

    def add(cls: Any) -> None:
        if _user_jvp(cls) and _rule_name(cls) not in found:
            found.append(_rule_name(cls))

    def visit(value: Any, depth: int, self_value: Any = MISSING) -> None:
        if value is MISSING or id(value) in seen or len(seen) > _RULE_LIMIT:
            return
        seen.add(id(value))
        if isinstance(value, type):
            add(value)
            return
        owner = _function_class(value)
        if owner is not None:
            add(owner)
            return
        if isinstance(value, torch.nn.Module):
            for module in value.modules():
                if (id(module) in seen and module is not value) or len(seen) > _RULE_LIMIT:
                    continue
                seen.add(id(module))
                for attribute in vars(module).values():  # a Function class kept on the module (self.function)
                    if isinstance(attribute, type):
                        add(attribute)
                forward = getattr(type(module), "forward", None)
                if (isinstance(forward, types.FunctionType)  # torch's own layers (nn.Linear, ...) are not read
                        and (getattr(forward, "__module__", None) or "").split(".")[0] not in _TORCH_PACKAGES):
                    scan(forward, depth, module)
            return
        if isinstance(value, functools.partial):
            visit(value.func, depth)
            return
        if isinstance(value, types.MethodType):
            visit(value.__func__, depth, value.__self__)
            return
        if isinstance(value, types.FunctionType):
            module = getattr(value, "__module__", None) or ""
            if module.split(".")[0] in _TORCH_PACKAGES or module.split(".")[0] in BASE_LIBRARIES:
                return
            scan(value, depth, self_value)
            return
        call = getattr(type(value), "__call__", None)  # a callable object of a user class: its __call__
        if isinstance(call, types.FunctionType) and (getattr(call, "__module__", None) or "").split(".")[0] \
                not in _TORCH_PACKAGES + tuple(BASE_LIBRARIES):
            scan(call, depth, value)

    def scan(function: types.FunctionType, depth: int, self_value: Any) -> None:
        for current in code_loads(function, self_value, _static_attribute):
            if isinstance(current, (type, types.MethodType)) or _function_class(current) is not None:
                visit(current, depth)
            elif isinstance(current, (types.FunctionType, functools.partial, torch.nn.Module)) and depth > 0:
                visit(current, depth - 1)

    visit(fn, _RULE_DEPTH)
    return found


def _raised_in_user_jvp(exc: BaseException) -> Optional[str]:
    """The qualified name of the user-written ``jvp`` the traceback of ``exc`` passes through, if any."""
    tb = exc.__traceback__
    name = None
    while tb is not None:
        code = tb.tb_frame.f_code
        module = tb.tb_frame.f_globals.get("__name__", "") or ""
        if code.co_name == "jvp" and module.split(".")[0] not in _TORCH_PACKAGES + ("gradbridge",):
            name = getattr(code, "co_qualname", code.co_name)
        tb = tb.tb_next
    return name


def _jvp_hint(exc: BaseException) -> str:
    """What a user jvp that raised most likely got wrong."""
    if isinstance(exc, (ValueError, IndexError)) and ("unpack" in str(exc) or "out of range" in str(exc)):
        return (" (in forward mode ctx.saved_tensors holds only what forward saved with ctx.save_for_forward; "
                "save the tensors jvp reads with ctx.save_for_forward too)")
    return ""
