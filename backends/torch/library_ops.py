"""Operators registered through ``torch.library``: their names, their batching rules, and torch's own tests of them.

Invariant: a ``torch.library.custom_op`` (a ``CustomOpDef``) or an operator overload (``torch.ops.ns.op.default``)
is named in reports by its qualified name and its inputs by its schema's parameter names, as its author wrote them;
an op checked directly that has no vmap batching rule is never run under ``torch.func.vmap`` by a check (torch would loop it anyway,
and print a C++ warning per check that no Python filter can catch); torch's ``torch.library.opcheck`` runs on the
check's own float64 copies, never on the user's tensors.
"""

from __future__ import annotations

import inspect
import types
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch._library.custom_ops import CustomOpDef

from ..common.reach import MISSING, code_loads

#: torch.library.opcheck's tests, cheapest first; the last one compiles (AOTAutograd) and runs only when thorough.
OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor")
OPCHECK_COMPILED = "test_aot_dispatch_dynamic"
#: Namespaces whose operators torch itself batches (its own kernels and decompositions).
_TORCH_NAMESPACES = frozenset({"aten", "prims", "prim", "quantized", "_quantized", "torchvision"})


def library_op(fn: Any) -> Optional[Any]:
    """The operator ``fn`` is: a ``CustomOpDef``'s default overload, an ``OpOverload``, an ``OpOverloadPacket``'s
    default; None for anything else."""
    overload = getattr(fn, "_opoverload", None)  # torch.library.custom_op
    if isinstance(overload, torch._ops.OpOverload):
        return overload
    if isinstance(fn, torch._ops.OpOverload):
        return fn
    if isinstance(fn, torch._ops.OpOverloadPacket):
        return getattr(fn, "default", None)
    return None


def named_function(fn: Any) -> Optional[Callable[..., Any]]:
    """A stand-in for a library op that carries its qualified name and its schema's positional parameters, so
    reports say ``mylib::scaled_mul`` and ``x``, ``weight`` instead of ``CustomOpDef`` and ``arg0``; None when
    ``fn`` is not one."""
    op = library_op(fn)
    if op is None:
        return None
    schema = op._schema
    parameters = [inspect.Parameter(argument.name, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                  for argument in schema.arguments if not argument.kwarg_only]

    def stand_in(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    stand_in.__name__ = stand_in.__qualname__ = schema.name
    stand_in.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    return stand_in


def _lacks_batching_rule(op: Any) -> bool:
    namespace = getattr(op, "namespace", "aten")
    if namespace in _TORCH_NAMESPACES:
        return False
    name = op.name()
    return not any(torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
                   for key in ("FuncTorchBatched", "CompositeImplicitAutograd"))


def _is_library_op(value: Any) -> bool:
    return isinstance(value, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, CustomOpDef))


def without_batching_rule(fn: Any) -> List[str]:
    """The qualified names of the library ops with no vmap batching rule (no ``register_vmap``, no batched kernel,
    no decomposition) that ``fn`` is or that its own code loads (a global or closed-over op, ``torch.ops.ns.op``,
    ``self.op`` in a module's forward; read from the code, never run): torch.func.vmap would run such an op one
    sample at a time through its fallback, which prints a C++ warning per call site. Ops reached only through
    functions fn calls are not seen: finding every op a call dispatches would take a dispatch mode around fn, which
    makes torch.compile skip a compiled fn for good."""
    candidates = [fn]
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    function = getattr(target, "__func__", target)
    if isinstance(function, types.FunctionType) and not _is_library_op(fn):
        self_value = fn if isinstance(fn, torch.nn.Module) else MISSING
        candidates.extend(value for value in code_loads(function, self_value) if _is_library_op(value))
    names = set()
    for candidate in candidates:
        op = library_op(candidate) if _is_library_op(candidate) else None
        if op is not None and _lacks_batching_rule(op):
            names.add(op._schema.name)
    return sorted(names)


def opcheck(fn: Any, call: Callable[[Callable[..., Any]], Any], thorough: bool) -> List[Tuple[str, Optional[bool], str]]:
    """torch's own tests of a library op (``torch.library.opcheck``: its schema against what it does, its autograd
    registration, its fake-tensor kernel, and with ``thorough`` its compiled AOTAutograd path), run through
    ``call(runner)``, which calls ``runner(*args, **kwargs)`` with the check's arguments at the point. One
    ``(test, passed or None when not run, sentence)`` per test; [] for a function that is not a library op."""
    if library_op(fn) is None:
        return []
    tests = OPCHECK_TESTS + ((OPCHECK_COMPILED,) if thorough else ())

    def runner(*args: Any, **kwargs: Any) -> Dict[str, Any]:
        return torch.library.opcheck(fn, args, kwargs, test_utils=tests, raise_exception=False)

    results = call(runner)
    found: List[Tuple[str, Optional[bool], str]] = []
    for test in tests:
        outcome = results.get(test, "not run")
        if outcome == "SUCCESS":
            found.append((f"opcheck {test}", True, "torch.library.opcheck passes"))
        elif isinstance(outcome, BaseException):
            first = str(outcome).strip().splitlines()[0] if str(outcome).strip() else type(outcome).__name__
            found.append((f"opcheck {test}", False, f"torch.library.opcheck fails: {first[:400]}"))
        else:
            found.append((f"opcheck {test}", None, f"torch.library.opcheck says {outcome!r}"))
    if not thorough:
        found.append((f"opcheck {OPCHECK_COMPILED}", None, "not run: it compiles the op with AOTAutograd (50 ms per op, 2 s on first "
                                              "use in a process)"))
    return found
