"""PyTorch adapter: custom ``autograd.Function``s, plain functions and ``nn.Module``s.

How a check stays off the user's objects:

* Checked inputs are views into one float64 tensor built from the flat vector, never the user's tensors.
* Module parameters and buffers are swapped for float64 copies only while the function runs
  (``torch.nn.utils.stateless._reparametrize_module``, the mechanism behind ``torch.func.functional_call``),
  so a ``fn`` that closes over the module sees the copies; the module itself is never written to.
* Plain tensors passed as ``params=`` have their ``.data`` swapped for a float64 view during each call
  and restored afterwards (their storage is never written to).
* Process-wide state changes only around each call into the user's code (an evaluation of a chunk, a
  VJP or JVP, ``grad=``), under the lock of :mod:`gradbridge._process`: the default dtype is float64, the
  module is in eval mode (unless ``train=True``), the CPU (and, if initialised, CUDA) generators are
  re-seeded before each evaluation, and all of it is put back when the call returns or raises. Between
  those calls, and to other threads then, everything is as the user left it. The session itself only
  leaves the caller's inference mode and restores the grad mode, both per thread.

With ``promote=False`` nothing is promoted: checked leaves are cut from the flat vector and cast to their
own dtype (float32, float16, bfloat16; exact, the core has rounded the points), unchecked tensors,
module parameters and buffers are same-dtype copies, and the default dtype stays the user's. Gradients
are computed in those dtypes (the cotangents reach the outputs cast to the outputs' dtypes) and only
then widened to float64 for the core.

Batching: ``evaluate`` runs a chunk of points through ``torch.func.vmap`` over the flat point vector (the
same ``forward`` plumbing: leaves are views of the batched vector, module parameters are swapped in by
``_reparametrize_module`` exactly as ``functional_call`` does), and ``vjp`` pushes a chunk of cotangents
through the recorded graph at once (``torch.autograd.grad(..., is_grads_batched=True)``). Each is decided
once per prepared function, on its first chunk of at least ``_FIRST_BATCH`` rows (smaller chunks before it
run point by point): the batched result is compared with
the point-by-point loop on the chunk's first and last rows, and anything vmap cannot run (classic
``autograd.Function``s, ``.item()``, data-dependent control flow, in-place writes into unbatched tensors,
random draws, ``params=`` tensors swapped in through ``.data``) or any disagreement sends the function to
the loop for good, with a note saying why. Once batching has been shown to work, an exception from a
batched chunk is the user's and propagates (the core then locates the failing point one by one). A batched
evaluation an earlier check verified is kept (``clear_cache()``, ``cache_size()``), weakly held by the
function and keyed on its leaves' shapes and dtypes, the options and a fingerprint of what it reads; a
repeat check then runs batched at once, and anything going wrong under vmap sends it through the full
decision again.

Transposed VJPs (``vjp_transposed``, ``J t`` without forward mode): ``J^T u`` is built at a seeded random
cotangent ``u`` with ``create_graph=True`` and differentiated with respect to ``u`` (double backward), so
``J`` is the one the user's backward passes implement. The tangents are batched with ``is_grads_batched``
under the same once-decided, guarded scheme as ``vjp``. Backward passes that cannot be differentiated again
raise ModeUnsupportedError: ``@once_differentiable``, an op without a double backward, and a custom backward
computing (part of) its result off the graph (NumPy, ``.detach()``), found because such a part is in
``J^T u`` but not in ``J t``: ``u . (J t) = t . (J^T u)`` must hold for every tangent.

Fixed costs: a small check is a few microseconds of fn wrapped in the adapter's own work per evaluation,
per VJP and per session, so that work is kept down without changing what fn sees: what does not change
between calls is worked out once (leaf cuts, argument templates, which tensors are copied), a forward
with nothing to swap in enters no context managers, the default generator's seeded state is put back with
``set_state`` (the state ``manual_seed`` leaves, normal-sample caches included), a single-tensor output
is flattened without a tree walk or a concatenation (rows are copied out, since fn may keep and rewrite
that tensor), the point-by-point loops convert a chunk once and fill a preallocated result, and the VJP
loops call autograd's engine the way ``torch.autograd.grad`` does, skipping its Python-side argument
checks, wherever no override or torch function mode could see the difference.
"""

from __future__ import annotations

import contextlib
import copy
import dis
import functools
import gc
import types
import warnings
import weakref
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
try:  # private; without it batched tensors fn keeps go unnoticed at run time (the bytecode screen remains)
    from torch._C._functorch import is_batchedtensor
except ImportError:  # pragma: no cover - older or newer torch
    def is_batchedtensor(tensor: torch.Tensor) -> bool:
        return False
from torch.nn.utils.stateless import _reparametrize_module
from torch.overrides import TorchFunctionMode, has_torch_function

from gradbridge import _process
from gradbridge._adapter import CheckSpec, ExpectedParams, LeafSpec, ParamBinding, ProblemBackedFunction
from gradbridge._errors import FunctionEvaluationError, GradbridgeError, InvalidArgumentError, ModeUnsupportedError
from ..common.cache import WeakFunctionCache
from ..common.fingerprint import BASE_LIBRARIES, Fingerprinter, UNHANDLED, Uncacheable, holds_ints
from ..common.layout import (COMPLEX_REASON, Candidate, Unchecked, argument_candidates, layout_leaves,
                                promotion_notes, unchecked_notes)
from ..common.outputs import gradient_output_specs, output_leaves, output_specs
from gradbridge._precision import FLOAT64_EPS, eps_of
from ..common.rng import SharedRandomState
from gradbridge._tree import flatten

from ..common.handwritten import HandWrittenGradient, floating_candidates
from ..common.lowprec import low_precision_names, own_precision, promotion_hint, refresh_note

_FORWARD_AD_HINTS = ("jvp", "forward ad", "forward-mode", "forward mode", "forward grad", "fwad", "dual")
# words in the errors torch raises when a transform (vmap, batched gradients) cannot run some code, as
# opposed to the user's function failing on its own
_BATCHING_HINTS = ("vmap", "functorch", "batching rule", "batchedtensor", "batched tensor", "randomness",
                   "doesn't have storage", "setup_context", "is_grads_batched")


# the smallest chunk the path is decided on: the agreement guard's two extra loop evaluations and the
# first batched call's checks cost more than they can save on a smaller one (which runs point by point)
_FIRST_BATCH = 8
# about how many elements (points x the wider of inputs and outputs) one call of fn under vmap handles
_VMAP_ELEMENTS = 1 << 18


# params_held when there is nothing to hold (nullcontext is reusable and reentrant)
_NOTHING_HELD = contextlib.nullcontext()


def _outside_inference_mode() -> ContextManager[Any]:
    """Leave ``torch.inference_mode`` for the block when the caller is in it (restored on exit, also on an
    exception); nothing otherwise. Inside inference mode autograd records nothing and every tensor made
    is an inference tensor, so a check run there would see an analytic derivative of zero. Grad mode is
    set explicitly around every forward pass of the check (``no_grad`` to evaluate, ``enable_grad`` to
    record a graph), so the caller's ``no_grad`` / ``set_grad_enabled(False)`` needs nothing here."""
    return torch.inference_mode(False) if torch.is_inference_mode_enabled() else _NOTHING_HELD


def _batching_error(exc: BaseException) -> bool:
    return any(hint in str(exc).lower() for hint in _BATCHING_HINTS)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


@contextlib.contextmanager
def _quiet_batching() -> Iterator[None]:
    """Hide torch's "performance drop ... batching rule" warnings: the batched path is an optimisation."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*[Pp]erformance drop.*")
        warnings.filterwarnings("ignore", message=r".*batching rule.*")
        yield


_MUTATING_METHODS = frozenset({"append", "extend", "insert", "add", "update", "setdefault", "pop", "popitem",
                               "remove", "discard", "clear", "appendleft", "put", "write", "send"})


_INSTRUCTIONS: "weakref.WeakKeyDictionary[types.CodeType, tuple]" = weakref.WeakKeyDictionary()


def _instructions(code: types.CodeType) -> tuple:
    """``dis.get_instructions(code)``, kept per code object (immutable; a lambda written in a test or a loop
    has one code object however often it is created), since disassembling costs tens of microseconds."""
    found = _INSTRUCTIONS.get(code)
    if found is None:
        found = _INSTRUCTIONS[code] = tuple(dis.get_instructions(code))
    return found


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
    for instr in _instructions(code):
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


class _Fingerprint(Fingerprinter):
    """What fn reads besides its arguments, as far as it decides whether fn runs under ``torch.func.vmap``
    as it runs point by point: Python values by value, functions by their code and what they read, tensors,
    arrays and modules by identity (their values do not change how fn batches)."""

    libraries = BASE_LIBRARIES | {"torch", "functorch"}

    def ndarray(self, value: np.ndarray) -> Any:
        return ("ndarray", self.identity(value))

    def adapter_object(self, value: Any, depth: int) -> Any:
        if isinstance(value, (torch.Tensor, torch.nn.Module)):
            return (type(value).__name__, self.identity(value))
        return UNHANDLED


def _argument_token(fingerprint: Fingerprinter, value: Any, depth: int = 0) -> Any:
    """What fn receives as arguments, for the key of a batching decision: tensors by shape, dtype and
    ``requires_grad`` (their values do not change how fn batches), containers item by item, anything else
    (a flag, a config object) as the fingerprint keys what fn reads."""
    if depth > 32:
        raise Uncacheable("arguments nested too deep")
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype), value.requires_grad)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_argument_token(fingerprint, v, depth + 1) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((fingerprint.environment(k), _argument_token(fingerprint, v, depth + 1))
                              for k, v in value.items()))
    return fingerprint.environment(value)


class _Batches:
    """A cached decision: fn (for this key) ran under vmap and agreed with the loop in an earlier check."""

    def __init__(self, refs: List[Any]) -> None:
        self.refs = refs

    def alive(self) -> bool:
        return all(ref() is not None for ref in self.refs)


#: Functions whose batched evaluation an earlier check verified, per structure and fingerprint (see
#: ``_evaluate_first_batch``); weakly held by the function, like the JAX and TensorFlow compiled code.
_BATCHES: WeakFunctionCache[_Batches] = WeakFunctionCache(per_function=16)


def clear_cache() -> None:
    """Forget every batching decision kept across checks."""
    _BATCHES.clear()


def cache_size() -> int:
    """How many batching decisions are kept across checks."""
    return len(_BATCHES)


# A classic autograd.Function (forward(ctx, ...), no setup_context) given as fn itself (``MyFunction.apply``)
# is refused by every torch.func transform before its forward runs, whatever the inputs: the refusal's
# first line is kept per class (with the setup_context it was refused with) so that later checks of the
# same Function skip the failing vmap attempt and note the same reason.
_CLASSIC_REFUSALS: "weakref.WeakKeyDictionary[type, Tuple[Any, str]]" = weakref.WeakKeyDictionary()


def _function_class(fn: Any) -> Optional[type]:
    """The autograd.Function subclass when ``fn`` is its ``apply``, else None."""
    owner = getattr(fn, "__self__", None)
    if (isinstance(fn, types.MethodType) and isinstance(owner, type) and issubclass(owner, torch.autograd.Function)
            and getattr(fn.__func__, "__name__", "") == "apply"):
        return owner
    return None


def _classic_function_refusal(fn: Any) -> Optional[str]:
    """The first line of the error vmap refused ``fn``'s Function class with before, if it did."""
    owner = _function_class(fn)
    known = _CLASSIC_REFUSALS.get(owner) if owner is not None else None
    if known is None or known[0] is not getattr(owner, "setup_context", None):
        return None
    return known[1]


def _remember_classic_function_refusal(fn: Any, exc: BaseException) -> None:
    owner = _function_class(fn)
    if owner is not None and isinstance(exc, RuntimeError) and "setup_context" in str(exc):
        _CLASSIC_REFUSALS[owner] = (getattr(owner, "setup_context", None), _first_line(exc))


# --- user-written forward-mode rules (a Function's jvp), which reverse mode never runs ---

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
    """``value.name`` where that runs no user code (a module's, a class's or an instance's own dict, a
    module's submodules): the search below reads code, it never calls properties or ``__getattr__``."""
    missing = _MISSING
    if isinstance(value, types.ModuleType):
        return value.__dict__.get(name, missing)
    if isinstance(value, type):
        for klass in value.__mro__:
            if name in klass.__dict__:
                found = klass.__dict__[name]
                if isinstance(found, staticmethod):
                    return found.__func__
                if isinstance(found, classmethod):
                    return types.MethodType(found.__func__, value)
                return found
        return missing
    own = getattr(value, "__dict__", None)
    if isinstance(own, dict) and name in own:
        return own[name]
    if isinstance(value, torch.nn.Module):
        return value._modules.get(name, missing)
    return missing


_MISSING = object()


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

    def visit(value: Any, depth: int, self_value: Any = _MISSING) -> None:
        if value is _MISSING or id(value) in seen or len(seen) > _RULE_LIMIT:
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
        code = function.__code__
        namespace = getattr(function, "__globals__", {})
        cells = dict(zip(code.co_freevars, function.__closure__ or ()))
        first = code.co_varnames[0] if code.co_argcount and self_value is not _MISSING else None
        codes = [code]
        while codes:
            current_code = codes.pop()
            current: Any = _MISSING
            for instr in _instructions(current_code):
                name = instr.opname
                if name in ("LOAD_GLOBAL", "LOAD_NAME"):
                    current = namespace.get(instr.argval, _MISSING)
                elif name in ("LOAD_DEREF", "LOAD_CLOSURE") and instr.argval in cells:
                    try:
                        current = cells[instr.argval].cell_contents
                    except ValueError:
                        current = _MISSING
                elif name == "LOAD_FAST" and first is not None and instr.argval == first:
                    current = self_value
                elif name in ("LOAD_ATTR", "LOAD_METHOD") and current is not _MISSING:
                    current = _static_attribute(current, instr.argval)
                else:
                    current = _MISSING
                    if name == "LOAD_CONST" and isinstance(instr.argval, types.CodeType):
                        codes.append(instr.argval)  # a nested function or lambda: same globals
                    continue
                if current is _MISSING:
                    continue
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


def _agree(batched: np.ndarray, looped: np.ndarray, eps: float) -> bool:
    """Batched and looped rows agree to about 1e3 machine epsilons, relative (one epsilon of the row's
    largest magnitude absolute, for entries near zero); NaNs must sit in the same places."""
    if batched.shape != looped.shape:
        return False
    if np.array_equal(batched, looped):  # the usual case, bit for bit (False wherever a NaN is: see below)
        return True
    if not np.array_equal(np.isnan(batched), np.isnan(looped)):
        return False
    finite = np.isfinite(looped) & np.isfinite(batched)
    if not np.array_equal(batched[~finite & ~np.isnan(looped)], looped[~finite & ~np.isnan(looped)]):
        return False  # infinities with the same sign
    a, b = batched[finite], looped[finite]
    if a.size == 0:
        return True
    scale = float(np.max(np.abs(b)))
    return bool(np.all(np.abs(a - b) <= 1e3 * eps * np.maximum(np.abs(a), np.abs(b)) + eps * scale))


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _floating(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point()


def _not_checkable(tensor: Any) -> str:
    """Why a floating tensor among the arguments cannot be perturbed ("" when it can): a sparse layout."""
    if isinstance(tensor, torch.Tensor) and tensor.layout != torch.strided and _floating(tensor):
        layout = str(tensor.layout).replace("torch.", "")
        return (f"a sparse tensor ({layout}): gradbridge perturbs dense tensors element by element; pass x.to_dense() "
                "(and make it sparse inside fn) to check its values. It is passed to fn unchanged")
    return ""


def _refuse_meta(candidates: Sequence[Candidate], param_tensors: Sequence[Tuple[str, torch.Tensor]]) -> None:
    """A tensor on the meta device has a shape and no values: fn cannot be evaluated on it."""
    named = [("args", c.name, c.value) for c in candidates] + [("params", name, t) for name, t in param_tensors]
    for argument, name, tensor in named:
        if isinstance(tensor, torch.Tensor) and tensor.is_meta:
            raise InvalidArgumentError(
                f"{argument}: {name} is a tensor on the meta device (a shape without values), so fn cannot be "
                "evaluated on it; create it on a real device (device='cpu'), or materialize the module "
                "(module.to_empty(device='cpu'), then initialize its parameters)")


def _registered_node(value: Any) -> Optional[Tuple[List[str], List[Any], Callable[[List[Any]], Any]]]:
    """One level of a node of torch's pytree registry (``torch.utils._pytree.register_dataclass``,
    ``register_pytree_node``): the children's path suffixes (from its keys, else ``[i]``), the children, and
    how to rebuild it; None for other values (dicts, lists, tuples and named tuples are walked by the core)."""
    from torch.utils import _pytree

    node = _pytree.SUPPORTED_NODES.get(type(value))
    if node is None or isinstance(value, (dict, list, tuple)):
        return None
    children, context = node.flatten_fn(value)
    children = list(children)
    suffixes = [f"[{i}]" for i in range(len(children))]
    if node.flatten_with_keys_fn is not None:
        keyed, _ = node.flatten_with_keys_fn(value)
        if len(keyed) == len(children):
            suffixes = [_pytree.keystr((key,)) for key, _ in keyed]
    return suffixes, children, lambda new: node.unflatten_fn(new, context)


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).replace("torch.", "")


class _ModuleState:
    """Swaps a module's parameters and buffers for float64 copies (same-dtype copies with ``promote=False``)
    while the user's function runs."""

    def __init__(self, module: torch.nn.Module, checked: Dict[str, int], promote: bool = True) -> None:
        self.module = module
        self.checked = checked  # parameter name -> index of its leaf
        self.promote = promote
        self.constants: Dict[str, torch.Tensor] = {}
        for name, param in module.named_parameters(remove_duplicate=True):
            if name not in checked:
                dtype = torch.float64 if param.is_floating_point() and promote else param.dtype
                self.constants[name] = param.detach().to(dtype).clone()  # a copy: fn may write into it
        self.buffers = {name: buf for name, buf in module.named_buffers(remove_duplicate=True) if buf is not None}

    def replacement(self, leaf_values: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
        values = dict(self.constants)
        for name, index in self.checked.items():
            values[name] = leaf_values[index]
        for name, buf in self.buffers.items():  # fresh copies: train-mode BatchNorm writes into them
            dtype = torch.float64 if buf.is_floating_point() and self.promote else buf.dtype
            values[name] = buf.detach().to(dtype).clone()
        return values

    @contextlib.contextmanager
    def applied(self, leaf_values: Sequence[torch.Tensor]) -> Iterator[None]:
        with _reparametrize_module(self.module, self.replacement(leaf_values), tie_weights=True):
            yield


class _DataSwap:
    """For plain tensors given as ``params=``: point ``.data`` at float64 views, put the original back after."""

    def __init__(self, tensors: Dict[int, torch.Tensor]) -> None:
        self.tensors = tensors  # leaf index -> user's tensor
        self.originals = {index: tensor.data for index, tensor in tensors.items()}
        self.requires_grad = {index: tensor.requires_grad for index, tensor in tensors.items()}

    @contextlib.contextmanager
    def applied(self, leaf_values: Sequence[torch.Tensor], needs_grad: bool) -> Iterator[List[torch.Tensor]]:
        # Re-entrant: on exit put back what was there on entry, so a swap held around a whole backward pass
        # (see TorchProblem.params_held) survives the forward pass nested in it.
        entered = {index: (tensor.data, tensor.requires_grad) for index, tensor in self.tensors.items()}
        try:
            for index, tensor in self.tensors.items():
                tensor.data = leaf_values[index].detach()
                if needs_grad and not tensor.requires_grad:
                    tensor.requires_grad_(True)
            yield list(self.tensors.values())
        finally:
            for index, tensor in self.tensors.items():
                data, requires_grad = entered[index]
                tensor.data = data
                if tensor.requires_grad != requires_grad:
                    tensor.requires_grad_(requires_grad)

    def restore(self) -> None:
        for index, tensor in self.tensors.items():
            tensor.data = self.originals[index]
            if tensor.requires_grad != self.requires_grad[index]:
                tensor.requires_grad_(self.requires_grad[index])


class TorchProblem:
    """Everything about one torch check that is fixed: structure, modules, state to restore."""

    def __init__(self, spec: CheckSpec, candidates: List[Candidate], leaves: List[LeafSpec], chosen: List[int],
                 rebuild_args: Callable[[Sequence[Any]], tuple], module: Optional[torch.nn.Module],
                 module_state: Optional[_ModuleState], data_swap: Optional[_DataSwap], device: torch.device) -> None:
        self.spec = spec
        self.candidates = candidates
        self.leaves = leaves
        self.chosen = chosen
        self.rebuild_args = rebuild_args
        self.module = module
        self.module_state = module_state
        self.data_swap = data_swap
        self.device = device
        self.rng = SharedRandomState(spec.seed)
        self.outputs: Optional[List[LeafSpec]] = None
        self.low_precision_outputs: List[str] = []
        self.promote = spec.promote
        # the dtype each checked leaf takes while fn runs: float64, or its own with promote=False
        self.leaf_dtypes = [torch.float64 if spec.promote else candidates[i].value.dtype for i in chosen]
        # promote=True only: the tensors given below float64, named in the hint when fn fails on the copies
        self.low_precision = low_precision_names(
            [(c.name, _dtype_name(c.value)) for c in candidates if c.floating]) if spec.promote else ""
        # what forward needs on every call, worked out once (none of it changes between calls): where each
        # leaf is cut from the flat vector (a single leaf is x itself, seen through a view), whether the leaves
        # need a cast, which candidates take a leaf's value and which a fresh copy (unchecked input tensors,
        # with the dtype of the copy), and how the positional arguments are filled in
        self._cuts = [(leaf.offset, leaf.offset + leaf.size, leaf.shape) for leaf in leaves]
        self._whole = len(leaves) == 1 and leaves[0].offset == 0
        self._whole_shape = -1 if self._whole and len(leaves[0].shape) == 1 else self._cuts[0][2]  # view(-1): quicker
        self._cast = any(dtype != torch.float64 for dtype in self.leaf_dtypes)
        chosen_set = set(chosen)
        self._inputs = [(k, i) for k, i in enumerate(chosen) if candidates[i].kind == "input"]
        self._copies = [(i, c.value, torch.float64 if _floating(c.value) and spec.promote else c.value.dtype)
                        for i, c in enumerate(candidates)
                        if c.kind == "input" and i not in chosen_set and _is_tensor(c.value)]
        self._values = [c.value for c in candidates]
        self._slots = _argument_slots(spec, candidates, chosen, self._copies)
        # the generator state torch.default_generator.manual_seed(seed) leaves, put back by set_state
        # (the same state, normal-sample caches included, about 7 times cheaper than re-seeding)
        self._seeded_cpu_state: Optional[Tuple[int, torch.Tensor]] = None
        # around every call into the user's code: the check's process-wide state, under the one lock
        self.window = _process.Window(self._changed)

    def reseed(self) -> None:
        self.rng.reseed()
        generator, seed = torch.default_generator, self.spec.seed
        seeded = self._seeded_cpu_state
        if seeded is not None and seeded[0] == seed:
            generator.set_state(seeded[1])
        else:
            generator.manual_seed(seed)
            self._seeded_cpu_state = (seed, generator.get_state())
        if torch.cuda.is_initialized():  # False where CUDA is unavailable
            torch.cuda.manual_seed_all(seed)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """The whole check: only this thread's modes (grad, inference) change here. Process-wide state (the
        default dtype, the generators, the module's modes) changes in :meth:`window` only."""
        grad_enabled = torch.is_grad_enabled()
        try:
            # out of the caller's inference mode for the whole check (see _outside_inference_mode)
            with _outside_inference_mode():
                yield
        finally:
            if self.data_swap is not None:
                with _process.LOCK:
                    self.data_swap.restore()
            if torch.is_grad_enabled() != grad_enabled:  # fn called torch.set_grad_enabled(...) and left it
                torch.set_grad_enabled(grad_enabled)

    @contextlib.contextmanager
    def _changed(self) -> Iterator[None]:
        """The check's process-wide state for one window (see :mod:`gradbridge._process`): float64 as the
        default dtype (unless ``promote=False``: fn then runs as it would for the user), the module in eval
        mode (unless ``train=True``), generators re-seeded by :meth:`reseed`; what was there before is put
        back on exit, also when fn raises (and modes fn switched itself)."""
        cpu_state = torch.default_generator.get_state()  # what torch.get_rng_state returns
        cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        default_dtype = torch.get_default_dtype()
        modes = [(m, m.training) for m in self.module.modules()] if self.module is not None else []
        try:
            with self.rng.preserved():
                if self.promote and default_dtype != torch.float64:
                    torch.set_default_dtype(torch.float64)
                if self.module is not None and not self.spec.train:
                    self.module.eval()
                yield
        finally:
            for submodule, training in modes:
                submodule.training = training
            if torch.get_default_dtype() != default_dtype:
                torch.set_default_dtype(default_dtype)
            torch.default_generator.set_state(cpu_state)
            if cuda_states is not None:
                torch.cuda.set_rng_state_all(cuda_states)

    def leaf_values(self, x: torch.Tensor) -> List[torch.Tensor]:
        """One tensor per checked leaf, cut from the flat float64 ``x`` (views) and, with ``promote=False``,
        cast to the leaf's own dtype (exact: the core rounded ``x``; differentiable, so gradients flow
        back to ``x`` and tangents forward to the leaves)."""
        if self._whole:
            values = [x.view(self._whole_shape)]
        else:
            values = [x[start:stop].view(shape) for start, stop, shape in self._cuts]
        return self.own_dtypes(values) if self._cast else values

    def own_dtypes(self, values: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """``values`` in the dtypes the leaves take while fn runs (unchanged with promotion)."""
        return [v.to(dtype) for v, dtype in zip(values, self.leaf_dtypes)]

    def params_held(self, x: Optional[torch.Tensor],
                    leaf_values: Optional[List[torch.Tensor]] = None) -> ContextManager[Any]:
        """Keep ``params=`` tensors pointing at their float64 views of ``x`` (and requiring grad) for a
        forward *and* the backward through its graph: autograd saves such leaf tensors by reference, so
        a backward run after their ``.data`` went back would read the user's original values and dtype."""
        if self.data_swap is None:
            return _NOTHING_HELD
        return self.data_swap.applied(self.own_dtypes(leaf_values) if leaf_values is not None
                                      else self.leaf_values(x), True)

    def arguments(self, leaf_values: Sequence[torch.Tensor]) -> tuple:
        """fn's positional arguments with the checked leaves' values in place and fresh copies of the
        unchecked input tensors (the user's stay untouched), floating ones in float64 like the rest."""
        slots = self._slots
        if slots is not None:  # every argument a tensor or a constant (no containers): filled in directly
            template, fill = slots
            args = list(template)
            for position, leaf, tensor, dtype in fill:
                args[position] = leaf_values[leaf] if tensor is None else tensor.detach().to(dtype).clone()
            return tuple(args)
        values = list(self._values)
        for k, i in self._inputs:
            values[i] = leaf_values[k]
        for i, tensor, dtype in self._copies:
            values[i] = tensor.detach().to(dtype).clone()
        return self.rebuild_args(values)

    def forward(self, x: torch.Tensor, needs_grad: bool = False,
                leaf_values: Optional[List[torch.Tensor]] = None) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Run ``fn`` with checked leaves taken from the flat tensor ``x`` (or given one tensor per leaf).

        Returns the flat float64 output and the user tensors (``params=`` tensors) that stand in for
        some leaves, whose gradients must be added to those of ``x``.
        """
        leaf_values = self.leaf_values(x) if leaf_values is None else self.own_dtypes(leaf_values)
        args = self.arguments(leaf_values)
        if self.module_state is None and self.data_swap is None:  # nothing to swap in around the call
            self.reseed()
            return self._flatten_output(self._call(args)), []
        with contextlib.ExitStack() as stack:
            if self.module_state is not None:
                stack.enter_context(self.module_state.applied(leaf_values))
            swapped: List[torch.Tensor] = []
            if self.data_swap is not None:
                swapped = stack.enter_context(self.data_swap.applied(leaf_values, needs_grad))
            self.reseed()
            result = self._call(args)
        return self._flatten_output(result), swapped

    def call_with_arguments(self, function: Callable[..., Any], leading: tuple, x: torch.Tensor) -> Any:
        """``function(*leading, *args, **kwargs)`` with fn's arguments at the flat point ``x`` and the module's
        parameters (or ``params=`` tensors) swapped in, exactly as ``fn`` runs in :meth:`forward` (a hand-written
        ``grad=`` sees what ``fn`` sees)."""
        leaf_values = self.leaf_values(x)
        args = self.arguments(leaf_values)
        with contextlib.ExitStack() as stack:
            if self.module_state is not None:
                stack.enter_context(self.module_state.applied(leaf_values))
            if self.data_swap is not None:
                stack.enter_context(self.data_swap.applied(leaf_values, False))
            self.reseed()
            return function(*leading, *args, **self.spec.kwargs)

    def _call(self, args: tuple) -> Any:
        try:
            return self.spec.fn(*args, **self.spec.kwargs)
        except RuntimeError as exc:
            if "Inference tensors" in str(exc):
                raise FunctionEvaluationError(
                    f"fn raised RuntimeError: {str(exc).splitlines()[0]} fn uses a tensor created under "
                    "torch.inference_mode (an inference tensor) in a computation autograd must record, which torch "
                    "refuses. Pass that tensor to the check as an argument (arguments are copied), or create it "
                    "outside inference mode (or .clone() it there)") from exc
            if (self.promote and self.module is None and "dtype" in str(exc)
                    and ("Float" in str(exc) or "float" in str(exc))):
                also = f" {promotion_hint(self.low_precision)}" if self.low_precision else ""
                raise FunctionEvaluationError(
                    f"fn raised RuntimeError: {str(exc).splitlines()[0]}. The check runs in float64; if fn "
                    "closes over an nn.Module (or float32 tensors), pass it as params=model (or params=[...]) "
                    f"so it is promoted too.{also}") from exc
            raise

    def _flatten_output(self, result: Any) -> torch.Tensor:
        """fn's output as one flat float64 tensor (its floating leaves, one after the other). It may be a
        view of fn's own output (a single tensor): callers copy what they keep."""
        if self.outputs is not None:
            if isinstance(result, torch.Tensor):  # the common case: no tree to walk, nothing to concatenate
                if result.is_floating_point():
                    flat = result.reshape(-1)
                    return flat if flat.dtype == torch.float64 else flat.to(torch.float64)
            else:
                tensors = [t for t in _output_tensors(result, []) if t.is_floating_point()]
                if tensors:
                    return torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
        leaves = [leaf for leaf in output_leaves(result, _is_tensor) if leaf.value.is_floating_point()]
        if not leaves:
            got = type(result).__name__
            if isinstance(result, torch.Tensor):
                got = f"a tensor of dtype {_dtype_name(result)}"
            elif isinstance(result, (tuple, list, dict)):
                got += " with no floating tensor in it"
            raise FunctionEvaluationError(
                f"fn: expected a floating-point tensor (or a tuple/list/dict of them) as output, got {got}")
        if self.outputs is None:
            self.outputs = output_specs([(l.path, tuple(l.value.shape), _dtype_name(l.value)) for l in leaves])
            self.low_precision_outputs = [l.path for l in leaves if l.value.dtype != torch.float64]
        return torch.cat([l.value.reshape(-1).to(torch.float64) for l in leaves])

    def to_tensor(self, vector: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(vector), dtype=torch.float64, device=self.device)


def _argument_slots(spec: CheckSpec, candidates: List[Candidate], chosen: List[int],
                    copies: List[Tuple[int, torch.Tensor, torch.dtype]]) -> Optional[Tuple[list, list]]:
    """When every positional argument is a tensor or a constant (no tuple, list or dict to rebuild): the
    arguments as a list to fill in, and for each tensor argument (position, index of its leaf or None,
    the tensor to copy, its dtype). None otherwise (the arguments are rebuilt through ``rebuild_args``)."""
    count = min(len(spec.args), len(spec.arg_names))  # the arguments argument_candidates walked
    leaf_of = {i: k for k, i in enumerate(chosen)}
    copy_of = {i: (tensor, dtype) for i, tensor, dtype in copies}
    fill = []
    walked = {c.arg_index for c in candidates if c.kind == "input"}  # arguments holding tensors (dataclasses too)
    index = 0  # candidates are listed argument by argument, one per tensor argument
    for position, arg in enumerate(spec.args[:count]):
        if _is_tensor(arg):
            if candidates[index].value is not arg or candidates[index].arg_index != position:
                return None
            if index in leaf_of:
                fill.append((position, leaf_of[index], None, None))
            elif index in copy_of:
                fill.append((position, None) + copy_of[index])
            else:
                return None
            index += 1
        elif isinstance(arg, (dict, list, tuple)) or position in walked:
            return None
    return list(spec.args[:count]), fill


def _output_tensors(value: Any, found: List[torch.Tensor]) -> List[torch.Tensor]:
    """The tensors in fn's output, in the order of :func:`gradbridge._outputs.output_leaves` (dicts by
    their items, tuples and lists by position, anything else a constant), without building names (and
    without the closures whose reference cycle keeps the tensors alive until a garbage collection)."""
    if isinstance(value, torch.Tensor):
        found.append(value)
    elif isinstance(value, dict):
        for item in value.values():
            _output_tensors(item, found)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _output_tensors(item, found)
    return found


def _combine(problem: TorchProblem, grad_x: Optional[torch.Tensor], grads_swapped: Sequence[Optional[torch.Tensor]],
             size: int) -> torch.Tensor:
    total = grad_x if grad_x is not None else torch.zeros(size, dtype=torch.float64, device=problem.device)
    if problem.data_swap is not None:
        total = total.clone()
        for (index, _), g in zip(problem.data_swap.tensors.items(), grads_swapped):
            if g is not None:
                leaf = problem.leaves[index]
                total[leaf.offset:leaf.offset + leaf.size] += g.reshape(-1).to(torch.float64)
    return total


def _vjp_graph(problem: TorchProblem, forward, x: torch.Tensor):
    with torch.enable_grad():
        out, swapped = forward(x, True)
    return x, out, swapped


# torch.autograd.grad validates its arguments in Python (shapes through torch.fx's symbolic-shape helpers,
# overrides, dtypes) before it calls the engine through this function: a third of a small VJP's time, and
# more when the caches are cold between the core's steps. Our own cotangents are built to the output's
# shape and dtype, so where nothing can override the call (plain tensors, no torch function mode) the VJP
# loops call the engine the way torch.autograd.grad does; anything else goes through torch.autograd.grad.
_UNPROBED = object()
_run_backward: Any = _UNPROBED


def _engine() -> Optional[Callable[..., tuple]]:
    """``torch.autograd.graph._engine_run_backward`` (private) once it has given torch.autograd.grad's
    result on a tiny graph in this process, else None."""
    global _run_backward
    if _run_backward is _UNPROBED:
        _run_backward = None
        engine = getattr(getattr(torch.autograd, "graph", None), "_engine_run_backward", None)
        if engine is not None:
            try:
                with torch.inference_mode(False):  # a first VJP under the caller's inference mode
                    with torch.enable_grad():
                        probe = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
                        square = probe * probe
                    got = engine((square,), (torch.ones(2, dtype=torch.float64),), False, False, (probe,), True,
                                 accumulate_grad=False)
                if (isinstance(got, tuple) and len(got) == 1 and isinstance(got[0], torch.Tensor)
                        and got[0].tolist() == [2.0, 4.0] and probe.grad is None):
                    _run_backward = engine
            except Exception:  # noqa: BLE001 - another torch: torch.autograd.grad it is
                pass
    return _run_backward


def _pull(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor],
          create_graph: bool = False) -> tuple:
    """``torch.autograd.grad(outputs, inputs, cotangents, retain_graph=True, create_graph=create_graph,
    allow_unused=True)``, calling the engine directly where that is the same (see :func:`_engine`)."""
    if (len(outputs) == len(cotangents)
            and all(type(o) is torch.Tensor and type(c) is torch.Tensor and o.shape == c.shape and o.dtype == c.dtype
                    for o, c in zip(outputs, cotangents))
            and not has_torch_function(tuple(outputs) + tuple(inputs))):  # also True under a torch function mode
        engine = _engine()
        if engine is not None:
            return engine(tuple(outputs), tuple(cotangents), True, create_graph, tuple(inputs), True,
                          accumulate_grad=False)
    return torch.autograd.grad(list(outputs), list(inputs), list(cotangents), retain_graph=True,
                               create_graph=create_graph, allow_unused=True)


def _grad(problem: TorchProblem, x, out, swapped, cotangent: torch.Tensor, create_graph: bool) -> torch.Tensor:
    if not out.requires_grad:
        return torch.zeros_like(x)
    inputs = [x] + list(swapped)
    grads = _pull((out,), inputs, (cotangent,), create_graph)
    return _combine(problem, grads[0], grads[1:], x.numel())


def _grad_batched(problem: TorchProblem, x, out, swapped, cotangents: torch.Tensor) -> torch.Tensor:
    """``_grad`` for a (k, m) stack of cotangents in one batched backward pass: (k, n)."""
    k = cotangents.shape[0]
    if not out.requires_grad:
        return torch.zeros(k, x.numel(), dtype=x.dtype, device=x.device)
    inputs = [x] + list(swapped)
    grads = torch.autograd.grad(out, inputs, cotangents, retain_graph=True, allow_unused=True, is_grads_batched=True)
    total = grads[0] if grads[0] is not None else torch.zeros(k, x.numel(), dtype=torch.float64, device=problem.device)
    if problem.data_swap is not None:
        total = total.clone()
        for (index, _), g in zip(problem.data_swap.tensors.items(), grads[1:]):
            if g is not None:
                leaf = problem.leaves[index]
                total[:, leaf.offset:leaf.offset + leaf.size] += g.reshape(k, -1).to(torch.float64)
    return total


# --- transposed reverse mode (J t from the VJP): helpers ---

# where one gradient piece sits in the flat vector, and its shape
_Span = Tuple[slice, Tuple[int, ...]]

_TRANSPOSED = "the transposed VJP (J t, by differentiating the backward pass with respect to its cotangent) "


def _probe_cotangent(seed: int, size: int, device: torch.device) -> torch.Tensor:
    """The cotangent ``u`` the VJP is built at before it is differentiated with respect to ``u``: seeded,
    random (nonzero almost surely), a leaf that requires grad. ``J^T u`` is linear in ``u``, so ``J t`` does
    not depend on which ``u``; a random one makes a part of ``J^T u`` that is off the graph show up."""
    rng = np.random.default_rng([seed, 0x7A7])
    return torch.as_tensor(rng.standard_normal(size), dtype=torch.float64, device=device).requires_grad_(True)


def _tangent_piece(tangents: torch.Tensor, span: _Span, like: torch.Tensor) -> torch.Tensor:
    """The part of the (k, n) ``tangents`` that pairs with the gradient piece ``like``: shape (k,) + its
    shape, in its dtype (a low-precision leaf's with ``promote=False``)."""
    where, shape = span
    return tangents[:, where].reshape((tangents.shape[0],) + tuple(shape)).to(like.dtype)


def _differentiate_cotangent(u: torch.Tensor, pieces: Sequence[torch.Tensor], spans: Sequence[_Span],
                             tangents: torch.Tensor, batched: bool) -> np.ndarray:
    """``J t`` for the (k, n) ``tangents``: the pieces of ``J^T u`` differentiated with respect to ``u``,
    for all rows at once (``is_grads_batched``) or for a single row (k = 1). Raises torch's errors."""
    outputs = [_tangent_piece(tangents, span, g) for g, span in zip(pieces, spans)]
    if batched:
        (pulled,) = torch.autograd.grad(list(pieces), [u], outputs, retain_graph=True, allow_unused=True,
                                        is_grads_batched=True)
    else:
        (pulled,) = _pull(pieces, (u,), [o[0] for o in outputs])
    if pulled is None:  # no piece depends on u: J t is zero (the consistency check tells whether it should be)
        return np.zeros((tangents.shape[0], u.numel()))
    return pulled.detach().to(torch.float64).reshape(tangents.shape[0], -1).cpu().numpy()


def _once_differentiable_in(tensors: Sequence[torch.Tensor], limit: int = 20000) -> bool:
    """Whether the autograd graph behind ``tensors`` holds the error node torch puts after a custom
    backward marked ``@once_differentiable`` (looked at only to word the error; at most ``limit`` nodes)."""
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
    visited = 0
    while stack and visited < limit:
        node = stack.pop()
        visited += 1
        if type(node).__name__ in ("Error", "DelayedError") or node.name() == "torch::autograd::Error":
            return True
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return False


def _not_differentiable(pieces: Sequence[torch.Tensor], exc: Optional[BaseException] = None) -> ModeUnsupportedError:
    """The error saying why the backward pass cannot be differentiated with respect to its cotangent."""
    if _once_differentiable_in(pieces):
        why = ("a custom backward is marked @once_differentiable, so torch cannot differentiate it again; "
               "drop the decorator (keeping the backward in differentiable torch operations) to use it")
    elif exc is not None:
        why = f"torch could not differentiate the backward pass again ({_first_line(exc)})"
    else:
        why = ("part of J^T u is not on the autograd graph of the cotangent u: a custom backward computes it "
               "outside autograd (NumPy, .detach(), .item(), .data) or adds something not linear in the "
               "cotangent, and differentiating it would miss that part")
    return ModeUnsupportedError(_TRANSPOSED + "is unavailable: " + why)


def _consistent(u: torch.Tensor, gradient: np.ndarray, tangents: np.ndarray, rows: np.ndarray,
                tolerance: float) -> bool:
    """Whether ``u . (J t) == t . (J^T u)`` for every row (to ``tolerance`` relative to the norms), as it must
    be when ``J^T u`` is linear in ``u`` and all of it is on the graph of ``u`` (a linear map equals its
    derivative applied to its argument). A part computed off the graph (NumPy, ``.detach()``) is in
    ``J^T u`` but missing from ``J t``, so this catches what the graph alone cannot show: a leaf's gradient
    that is partly on the graph. Rows with non-finite values are skipped."""
    probe = u.detach().cpu().numpy()
    lhs = rows @ probe
    rhs = tangents @ gradient
    scale = (np.linalg.norm(probe) * np.linalg.norm(rows, axis=1)
             + np.linalg.norm(tangents, axis=1) * np.linalg.norm(gradient))
    finite = np.isfinite(lhs) & np.isfinite(rhs) & np.isfinite(scale)
    return bool(np.all(np.abs(lhs - rhs)[finite] <= tolerance * scale[finite]))


class TorchPrepared(ProblemBackedFunction):
    """A torch function over the flat float64 vector; ``forward`` maps a flat tensor to a flat output."""

    analytic_source = "PyTorch autograd (your backward passes and autograd formulas)"
    # False forces the point-by-point loop for evaluate and vjp (on an instance, or on the class for
    # every check: comparisons of the two paths, debugging)
    batching = True

    def __init__(self, problem: TorchProblem, forward: Callable[[torch.Tensor, bool], Tuple[torch.Tensor, list]],
                 x0: np.ndarray, needs_grad_to_evaluate: bool = False, outputs: Optional[List[LeafSpec]] = None) -> None:
        self.problem = problem
        self.forward = forward
        self.leaves = problem.leaves
        self.x0 = x0
        self.needs_grad = needs_grad_to_evaluate
        self._outputs = outputs
        self.undefined_gradients: Dict[str, str] = {}
        # batching (see the module docstring): None until decided on the first chunk of _FIRST_BATCH rows
        self._batched_evaluate: Optional[bool] = None
        self._batched_vjp: Optional[bool] = None
        self._batched_transposed: Optional[bool] = None
        self._batch_sizes: Dict[str, int] = {}
        self._path_notes: Dict[str, str] = {}
        # this check's key in the cache of batching decisions, taken when its session starts (before fn runs)
        self._batches_start: Optional[Tuple[Any, List[Any]]] = None
        self._forward_rule: Any = _MISSING  # found on first use (see forward_rule)
        if problem.promote:
            self.notes = promotion_notes(problem.leaves)
            self.working_eps: Optional[float] = None
        else:
            self.working_eps, note = own_precision(problem.leaves)
            self.notes = [note] if note else []
        if problem.module is not None:
            copies = "float64 copies" if problem.promote else "copies in their own dtypes"
            self.notes.append(f"module {type(problem.module).__name__} in "
                              f"{'training' if problem.spec.train else 'eval'} mode during the check; its "
                              f"parameters and buffers replaced by {copies} while fn runs")

    @property
    def forward_rule(self) -> Optional[str]:
        """The user-written forward-mode rules fn runs that reverse mode does not exercise, e.g.
        ``"MyFunction.jvp"`` (comma-separated when several), or None: a ``torch.autograd.Function`` whose
        ``jvp`` is its own, given as fn (``MyFunction.apply``) or found in fn's code (see
        :func:`_forward_rules`). The core then checks forward mode too by default. None for the gradient
        function of ``order=2`` (forward mode is checked for first derivatives only)."""
        if self._forward_rule is _MISSING:
            rules = [] if self.needs_grad else _forward_rules(self.problem.spec.fn)
            self._forward_rule = ", ".join(rules) if rules else None
        return self._forward_rule

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """The problem's session; the key of the batching decision is taken on entering it, and on leaving it
        normally the decision follows the counters fn bumped (as the JAX and TensorFlow caches do)."""
        with self.problem.session():
            with _process.LOCK:  # fn's state as the user left it, not inside another check's window
                self._batches_start = self._batches_key() if self.batching and not self.needs_grad else None
            yield
            with _process.LOCK:
                self._keep_batches_after_run()

    def _keep_batches_after_run(self) -> None:
        """Keep a decision made under the state this check started from also under the state fn left behind,
        where the two differ in ints only (a counter fn bumps): the next check starts from it."""
        start = self._batches_start
        if start is None or self._batched_evaluate is not True or not holds_ints(start[0][1]):
            return
        end = self._batches_key()
        if end is not None:
            _BATCHES.keep_after_run(self.problem.spec.fn, start[0][1], end[0][1])

    # --- evaluation: batched under torch.func.vmap, or point by point ---

    @_process.runs_user_code
    def evaluate(self, points: np.ndarray) -> np.ndarray:
        if (self.needs_grad or not self.batching or self._batched_evaluate is False
                or len(points) < (2 if self._batched_evaluate else _FIRST_BATCH)):
            result = self._evaluate_loop(points)
        elif self._batched_evaluate is None:
            result = self._evaluate_first_batch(points)
        else:
            result = self._evaluate_batch(points)
        if not self.problem.promote and self._outputs is None:  # the outputs' dtypes are known now
            refresh_note(self.notes, self.leaves, self.output_specs)
        if self.problem.promote and self.problem.low_precision_outputs and not any("computes" in n for n in self.notes):
            self.notes.append(f"fn computes {', '.join(self.problem.low_precision_outputs)} below float64: "
                              "the check's precision is limited by that")
        return result

    @_process.runs_user_code
    def evaluate_edits(self, positions: np.ndarray, values: np.ndarray) -> np.ndarray:
        """``evaluate`` of the copies of ``x0`` with element ``positions[k]`` set to ``values[k]``; once fn
        runs batched, the batch is built as a tensor (no NumPy points to write and convert)."""
        if self.needs_grad or not self.batching or self._batched_evaluate is not True or len(positions) < 2:
            points = np.empty((len(positions), len(self.x0)))
            points[:] = self.x0
            points[np.arange(len(positions)), positions] = values
            return self.evaluate(points)
        batch = self.problem.to_tensor(self.x0).expand(len(positions), -1).clone()
        batch[torch.arange(len(positions), device=batch.device), torch.as_tensor(positions, device=batch.device)] = \
            self.problem.to_tensor(values)
        return self._evaluate_batch(batch)

    def _evaluate_loop(self, points: np.ndarray) -> np.ndarray:
        """One forward pass per point (the reference path, and the fallback)."""
        problem, forward, needs_grad = self.problem, self.forward, self.needs_grad
        batch = problem.to_tensor(points)  # one conversion for the chunk; each point a view of its row
        rows: Optional[np.ndarray] = None
        with (torch.enable_grad() if needs_grad else torch.no_grad()):
            for k in range(len(points)):
                x = batch[k]
                try:
                    if needs_grad:
                        out, _ = forward(x.requires_grad_(True), True)
                    else:
                        out, _ = forward(x, False)
                except Exception as exc:
                    if (problem.low_precision and not isinstance(exc, GradbridgeError)
                            and np.array_equal(points[k], self.x0)):
                        # fn fails on the float64 copies at the user's own point: it may only run in its own dtypes
                        raise FunctionEvaluationError(f"fn raised {type(exc).__name__} at the unperturbed input: "
                                                      f"{str(exc).strip()}. {promotion_hint(problem.low_precision)}"
                                                      ) from exc
                    raise
                row = out.detach().cpu().numpy()
                if rows is None:
                    rows = np.empty((len(points),) + row.shape)
                elif row.shape != rows.shape[1:]:  # fn's output changed size (np.stack's error, as before)
                    raise ValueError("all input arrays must have the same shape")
                rows[k] = row  # a copy: out may be a view of a tensor fn keeps and writes again
        if rows is None:  # no points
            return np.zeros((0, sum(spec.size for spec in problem.outputs or ())))
        return rows

    def _evaluate_vmap(self, points: Union[np.ndarray, torch.Tensor], watch: Optional[_EscapeWatch] = None
                       ) -> np.ndarray:
        """All of ``points`` (rows; NumPy, or a float64 tensor on the device) in one call of fn under
        ``torch.func.vmap`` over the flat point vector; random draws raise (``randomness="error"``): the
        loop's per-point re-seeded draws are not reproduced."""
        forward = self.forward

        def one(x: torch.Tensor) -> torch.Tensor:
            out, _ = forward(x, False)
            return out

        # vmap runs fn on sub-batches of about _VMAP_ELEMENTS elements (2 MB per float64 temporary the size of
        # the inputs or outputs): fn's own intermediates may be far larger (a pairwise-distance energy), and
        # peak memory grows with the sub-batch (2^20 was 10-18% faster on a 4096-input scalar loss, and 4x
        # the memory)
        width = max(len(self.x0), sum(spec.size for spec in self.problem.outputs or ()), 1)
        sub = max(_FIRST_BATCH, _VMAP_ELEMENTS // width)
        with torch.no_grad(), _quiet_batching(), (watch if watch is not None else contextlib.nullcontext()):
            batch = points if isinstance(points, torch.Tensor) else self.problem.to_tensor(points)
            out = torch.func.vmap(one, randomness="error", chunk_size=sub if sub < len(points) else None)(batch)
        result = out.detach().cpu().numpy()
        # an output that is a view of the input (fn returns x or part of it) would share the points' memory
        shared = points if isinstance(points, np.ndarray) else batch.detach().cpu().numpy()
        return result.copy() if np.may_share_memory(result, shared) else result

    def _evaluate_first_batch(self, points: np.ndarray) -> np.ndarray:
        """Decide the path: batched when vmap runs fn and agrees with the loop on the chunk's first and
        last points; otherwise the loop, for good. A loop that raises leaves the decision open.

        A function whose batched evaluation an earlier check verified (same fn, leaf shapes and dtypes,
        options, and fingerprint of what it reads) runs batched at once; anything going wrong under vmap
        then sends it through the full decision here."""
        key = self._batches_start or self._batches_key()
        if key is not None and _BATCHES.get(self.problem.spec.fn, key[0], keep=_Batches.alive) is not None:
            watch = _EscapeWatch()
            try:
                batched = self._evaluate_vmap(points, watch)
            except Exception:
                batched = None
            if batched is not None and not watch.escaped():
                self._decide("evaluate", True, "", len(points))
                return batched
        result = self._evaluate_undecided(points)
        if key is not None and self._batched_evaluate is True:
            _BATCHES.put(self.problem.spec.fn, key[0], _Batches(key[1]))
        return result

    def _batches_key(self) -> Optional[Tuple[Any, List[Any]]]:
        """The key of this check in the cache of batching decisions and the weak references that must stay
        alive for an entry to hold; None when fn cannot be keyed safely, or its parameters are swapped in
        through ``.data`` (never batched)."""
        if self.problem.data_swap is not None:
            return None
        spec = self.problem.spec
        try:
            fingerprint = _Fingerprint()
            token = fingerprint.environment(spec.fn)
            arguments = _argument_token(fingerprint, (spec.args, dict(spec.kwargs)))
            structure = (tuple((leaf.name, leaf.shape, leaf.dtype) for leaf in self.leaves), arguments,
                         self.problem.promote, spec.train, str(self.problem.device))
            key = (structure, token)
            hash(key)
        except (Uncacheable, TypeError, RecursionError):
            return None
        return key, fingerprint.refs

    def _evaluate_undecided(self, points: np.ndarray) -> np.ndarray:
        """The decision of :meth:`_evaluate_first_batch`, made on this chunk."""
        if self.problem.data_swap is not None:
            looped = self._evaluate_loop(points)
            self._decide("evaluate", False, "params= given as plain tensors are swapped in through .data, which "
                                            "torch.func.vmap cannot batch: evaluated point by point")
            return looped
        side_effect = _visible_side_effect(self.problem.spec.fn)
        if side_effect is not None:
            looped = self._evaluate_loop(points)
            self._decide("evaluate", False, f"{side_effect}, which one batched call under torch.func.vmap "
                                            "would do once for many evaluations: evaluated point by point")
            return looped
        refused = _classic_function_refusal(self.problem.spec.fn)
        if refused is not None:  # vmap refused this Function class before: it refuses it again, untried
            looped = self._evaluate_loop(points)
            self._decide("evaluate", False, f"fn could not run under torch.func.vmap ({refused}): "
                                            "evaluated point by point")
            return looped
        watch = _EscapeWatch()
        try:
            batched = self._evaluate_vmap(points, watch)
        except Exception as exc:  # vmap cannot run fn, or fn is broken: the loop tells which
            looped = self._evaluate_loop(points)
            _remember_classic_function_refusal(self.problem.spec.fn, exc)
            self._decide("evaluate", False, f"fn could not run under torch.func.vmap ({_first_line(exc)}): "
                                            "evaluated point by point")
            return looped
        if watch.escaped():
            looped = self._evaluate_loop(points)
            self._decide("evaluate", False, "fn keeps tensors it computes (stores them outside the call), which "
                                            "under torch.func.vmap would hold one batched tensor for many "
                                            "evaluations: evaluated point by point")
            return looped
        rows = sorted({0, len(points) - 1})
        looped = self._evaluate_loop(points[rows])
        if not _agree(batched[rows], looped, self._agreement_eps()):
            gaps = np.abs(batched[rows] - looped) if batched[rows].shape == looped.shape else np.array([np.nan])
            difference = float(np.max(gaps[np.isfinite(gaps)])) if np.isfinite(gaps).any() else float("nan")
            looped = self._evaluate_loop(points)
            self._decide("evaluate", False, f"fn gave different outputs under torch.func.vmap than point by point "
                                            f"(by up to {difference:.3g}): evaluated point by point")
            return looped
        self._decide("evaluate", True, "", len(points))
        return batched

    def _evaluate_batch(self, points: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
        try:
            batched = self._evaluate_vmap(points)
        except Exception as exc:
            if not _batching_error(exc):
                raise  # vmap ran fn before: this is fn's own error (the core locates the failing point)
            if isinstance(points, torch.Tensor):
                points = points.cpu().numpy()
            looped = self._evaluate_loop(points)
            self._decide("evaluate", False, f"fn stopped running under torch.func.vmap ({_first_line(exc)}): "
                                            "evaluated point by point from then on")
            return looped
        self._decide("evaluate", True, "", len(points))
        return batched

    def _decide(self, what: str, batched: bool, why: str, size: int = 0) -> None:
        """Remember the path of ``evaluate``, ``vjp`` or ``vjp_transposed`` and say it in ``notes`` (one note
        each, updated)."""
        if what == "evaluate":
            self._batched_evaluate = batched
        elif what == "vjp":
            self._batched_vjp = batched
        else:
            self._batched_transposed = batched
        if batched:
            self._batch_sizes[what] = max(self._batch_sizes.get(what, 0), size)
            size = self._batch_sizes[what]
            note = {"evaluate": f"evaluated in batches of up to {size} under torch.func.vmap",
                    "vjp": f"VJPs computed in batches of up to {size} (torch.autograd.grad with is_grads_batched=True)",
                    }.get(what, f"transposed VJPs (J t) computed in batches of up to {size} (double backward "
                                "with is_grads_batched=True)")
        else:
            note = why
        previous = self._path_notes.get(what)
        if previous is not None and previous in self.notes:
            self.notes[self.notes.index(previous)] = note
        else:
            self.notes.append(note)
        self._path_notes[what] = note

    def _agreement_eps(self) -> float:
        eps = float(self.working_eps or FLOAT64_EPS)
        for spec in self.output_specs:
            eps = max(eps, eps_of(spec.dtype))
        return eps

    # --- reverse mode ---

    @_process.runs_user_code
    def vjp(self, cotangents: np.ndarray) -> np.ndarray:
        try:
            return self._vjp(cotangents)
        except NotImplementedError as exc:  # some input has no derivative formula ("... is not implemented")
            if self.needs_grad or not self._find_undefined(str(exc).splitlines()[0]):
                raise
            return self._vjp_without(cotangents, set(self.undefined_gradients))

    def _vjp(self, cotangents: np.ndarray) -> np.ndarray:
        problem = self.problem
        x = problem.to_tensor(self.x0).requires_grad_(True)
        with problem.params_held(x):  # the graph is built and walked while params= point into x
            _, out, swapped = _vjp_graph(problem, self.forward, x)
            inputs = [x] + list(swapped)

            def loop(rows: np.ndarray) -> np.ndarray:
                """One backward pass per cotangent through the one recorded graph."""
                size = x.numel()
                pulled = np.zeros((len(rows), size))
                if not out.requires_grad:  # nothing depends on the checked leaves
                    return pulled
                batch = problem.to_tensor(rows)
                for k in range(len(rows)):
                    grads = _pull((out,), inputs, (batch[k],))
                    if problem.data_swap is not None:
                        pulled[k] = _combine(problem, grads[0], grads[1:], size).detach().cpu().numpy()
                    elif grads[0] is not None:  # None: x unused (zeros)
                        pulled[k] = grads[0].detach().cpu().numpy()
                return pulled

            if (not self.batching or self._batched_vjp is False
                    or len(cotangents) < (2 if self._batched_vjp else _FIRST_BATCH)):
                return loop(cotangents)
            try:
                with _quiet_batching():
                    batched = _grad_batched(self.problem, x, out, swapped,
                                            self.problem.to_tensor(cotangents)).detach().cpu().numpy()
            except Exception as exc:
                if self._batched_vjp is True and not _batching_error(exc):
                    raise  # batched backward passes worked before: this is the backward's own error
                looped = loop(cotangents)  # raises when the backward itself is broken
                self._decide("vjp", False, f"the backward pass could not run with batched cotangents "
                                           f"({_first_line(exc)}): one backward pass per cotangent")
                return looped
            if self._batched_vjp is None:
                rows = sorted({0, len(cotangents) - 1})
                if not _agree(batched[rows], loop(cotangents[rows]), self._agreement_eps()):
                    looped = loop(cotangents)
                    self._decide("vjp", False, "the backward pass gave different results with batched cotangents "
                                               "than one by one: one backward pass per cotangent")
                    return looped
            self._decide("vjp", True, "", len(cotangents))
            return batched

    def _leaf_graph(self):
        """The forward graph built from one independent tensor per leaf, so that asking for one leaf's
        gradient does not make autograd compute the others (views of one flat tensor would)."""
        parts = [self.problem.to_tensor(self.x0[leaf.slice]).reshape(leaf.shape).to(dtype).requires_grad_(True)
                 for leaf, dtype in zip(self.leaves, self.problem.leaf_dtypes)]
        with self.problem.params_held(None, parts), torch.enable_grad():
            out, swapped = self.problem.forward(None, True, leaf_values=parts)
        return parts, out, swapped

    def _find_undefined(self, reason: str) -> bool:
        """Ask for each leaf's gradient alone; record those PyTorch has no derivative formula for."""
        parts, out, _ = self._leaf_graph()
        cotangent = torch.ones_like(out)
        with self.problem.params_held(None, parts):
            for leaf, part in zip(self.leaves, parts):
                try:
                    torch.autograd.grad(out, [part], cotangent, retain_graph=True, allow_unused=True)
                except NotImplementedError as exc:
                    self.undefined_gradients[leaf.name] = f"PyTorch: {str(exc).splitlines()[0]}"
        return bool(self.undefined_gradients)

    def _vjp_without(self, cotangents: np.ndarray, undefined: set) -> np.ndarray:
        """VJPs for the leaves that have a gradient; zeros (reported as "no gradient") for the others."""
        parts, out, swapped = self._leaf_graph()
        defined = [k for k, leaf in enumerate(self.leaves) if leaf.name not in undefined]
        inputs = [parts[k] for k in defined] + list(swapped)
        size = len(self.x0)
        rows = []
        with self.problem.params_held(None, parts):
            for cotangent in cotangents:
                grads = (torch.autograd.grad(out, inputs, self.problem.to_tensor(cotangent), retain_graph=True,
                                             allow_unused=True) if inputs and out.requires_grad else [None] * len(inputs))
                flat = torch.zeros(size, dtype=torch.float64, device=self.problem.device)
                for k, g in zip(defined, grads):
                    if g is not None:
                        flat[self.leaves[k].slice] = g.reshape(-1)
                rows.append(_combine(self.problem, flat, grads[len(defined):], size).detach().cpu().numpy())
        return np.stack(rows)

    # --- transposed reverse mode: J t by differentiating u -> J^T u with respect to u ---

    @_process.runs_user_code
    def vjp_transposed(self, tangents: np.ndarray) -> np.ndarray:
        """``J t`` for each row of the (k, n) ``tangents``: (k, m), with ``J`` exactly the Jacobian :meth:`vjp`
        implements (the user's backward passes included), never forward-mode rules: ``J^T u`` is built at a
        random cotangent ``u`` with ``create_graph=True`` and differentiated with respect to ``u`` ("double
        backward"). Leaves torch has no derivative formula for get zero columns, as :meth:`vjp` gives them
        zero rows. Raises ModeUnsupportedError where the backward pass cannot be differentiated again
        (``@once_differentiable``, NumPy or ``.detach()`` inside a custom backward, an op without a double
        backward)."""
        tangents = np.asarray(tangents, dtype=np.float64).reshape(len(tangents), -1)
        try:
            return self._transposed(tangents)
        except GradbridgeError:
            raise
        except NotImplementedError as exc:  # some input has no derivative formula (first backward pass)
            if self.needs_grad or not self._find_undefined(str(exc).splitlines()[0]):
                raise
            return self._transposed_without(tangents, set(self.undefined_gradients))

    def _swapped_spans(self) -> List[_Span]:
        """Where the gradients of the ``params=`` tensors swapped in through ``.data`` go in the flat vector."""
        swap = self.problem.data_swap
        return [] if swap is None else [(self.leaves[k].slice, self.leaves[k].shape) for k in swap.tensors]

    def _transposed(self, tangents: np.ndarray) -> np.ndarray:
        """``vjp_transposed`` through the graph of the flat input (the path of :meth:`_vjp`)."""
        x = self.problem.to_tensor(self.x0).requires_grad_(True)
        with self.problem.params_held(x):  # the graphs are built and walked while params= point into x
            _, out, swapped = _vjp_graph(self.problem, self.forward, x)
            spans = [(slice(0, len(self.x0)), (len(self.x0),))] + self._swapped_spans()
            return self._transpose_through(out, [x] + list(swapped), spans, tangents)

    def _transposed_without(self, tangents: np.ndarray, undefined: set) -> np.ndarray:
        """``vjp_transposed`` over the leaves that have a gradient (the path of :meth:`_vjp_without`): the
        others' columns of ``J`` are zero."""
        parts, out, swapped = self._leaf_graph()
        defined = [k for k, leaf in enumerate(self.leaves) if leaf.name not in undefined]
        spans = [(self.leaves[k].slice, self.leaves[k].shape) for k in defined] + self._swapped_spans()
        with self.problem.params_held(None, parts):
            return self._transpose_through(out, [parts[k] for k in defined] + list(swapped), spans, tangents)

    def _transpose_through(self, out: torch.Tensor, inputs: List[torch.Tensor], spans: List[_Span],
                           tangents: np.ndarray) -> np.ndarray:
        """``J t`` for the graph from ``inputs`` (whose gradients go to ``spans`` of the flat vector) to ``out``,
        checked for consistency with ``J^T u`` (see :func:`_consistent`)."""
        if not out.requires_grad or len(tangents) == 0:  # nothing depends on the checked leaves: J = 0
            return np.zeros((len(tangents), out.numel()))
        u = _probe_cotangent(self.problem.spec.seed, out.numel(), self.problem.device)
        pieces, kept, gradient = self._cotangent_pieces(out, inputs, spans, u)
        rows = self._second_backward(u, pieces, kept, tangents) if pieces else np.zeros((len(tangents), out.numel()))
        if not _consistent(u, gradient, tangents, rows, float(np.sqrt(self._agreement_eps()))):
            raise _not_differentiable(pieces)
        return rows

    def _cotangent_pieces(self, out: torch.Tensor, inputs: List[torch.Tensor], spans: List[_Span],
                          u: torch.Tensor) -> Tuple[List[torch.Tensor], List[_Span], np.ndarray]:
        """``J^T u`` with its graph (``create_graph=True``): the gradient pieces that are on a graph, their
        spans, and the whole of it as a flat float64 vector. A nonzero piece off any graph (a custom backward
        computed in NumPy) raises ModeUnsupportedError; one that is zero is a zero block of ``J``."""
        try:
            with torch.enable_grad():  # the cotangent a clone, so a backward writing into its input never hits u
                grads = torch.autograd.grad(out, inputs, u.clone(), retain_graph=True, create_graph=True,
                                            allow_unused=True)
        except (GradbridgeError, NotImplementedError):
            raise
        except Exception as exc:
            self._raise_unless_plain_backward_fails(out, inputs, u, exc)
        gradient = np.zeros(len(self.x0))
        pieces: List[torch.Tensor] = []
        kept: List[_Span] = []
        for g, span in zip(grads, spans):
            if g is None:
                continue
            gradient[span[0]] += g.detach().to(torch.float64).reshape(-1).cpu().numpy()
            if g.requires_grad:
                pieces.append(g)
                kept.append(span)
            elif bool(torch.any(g != 0)):
                raise _not_differentiable([])
        return pieces, kept, gradient

    def _raise_unless_plain_backward_fails(self, out: torch.Tensor, inputs: List[torch.Tensor], u: torch.Tensor,
                                           exc: Exception) -> None:
        """The backward pass raised ``exc`` while its graph was recorded: when it runs without recording
        (as in :meth:`vjp`), it cannot be differentiated (ModeUnsupportedError); otherwise ``exc`` is the
        backward's own error and is raised as it is."""
        try:
            torch.autograd.grad(out, inputs, u.detach(), retain_graph=True, allow_unused=True)
            plain_fails = False
        except Exception:
            plain_fails = True
        if plain_fails:
            raise exc
        raise ModeUnsupportedError(_TRANSPOSED + "is unavailable: the backward pass fails when its graph is "
                                   f"recorded (create_graph=True): {_first_line(exc)}") from exc

    def _second_backward(self, u: torch.Tensor, pieces: List[torch.Tensor], spans: List[_Span],
                         tangents: np.ndarray) -> np.ndarray:
        """``J t`` for every row of ``tangents``: batched (``is_grads_batched``) where that works and agrees
        with one pass per tangent on the first chunk, decided and noted as for :meth:`vjp`."""
        t = self.problem.to_tensor(tangents)

        def loop(rows: Sequence[int]) -> np.ndarray:
            try:
                return np.concatenate([_differentiate_cotangent(u, pieces, spans, t[i:i + 1], False) for i in rows])
            except (RuntimeError, NotImplementedError) as exc:  # an op or rule without a double backward
                if isinstance(exc, GradbridgeError):
                    raise
                raise _not_differentiable(pieces, exc) from exc

        decided = self._batched_transposed
        if not self.batching or decided is False or len(t) < (2 if decided else _FIRST_BATCH):
            return loop(range(len(t)))
        try:
            with _quiet_batching():
                batched = _differentiate_cotangent(u, pieces, spans, t, True)
        except GradbridgeError:
            raise
        except Exception as exc:
            if decided is True and not _batching_error(exc):
                if isinstance(exc, (RuntimeError, NotImplementedError)):
                    raise _not_differentiable(pieces, exc) from exc
                raise
            looped = loop(range(len(t)))  # raises when the double backward itself cannot run
            self._decide("vjp_transposed", False, f"the double backward pass could not run with batched tangents "
                                                  f"({_first_line(exc)}): one pass per tangent")
            return looped
        if decided is None:
            rows = sorted({0, len(t) - 1})
            if not _agree(batched[rows], loop(rows), self._agreement_eps()):
                looped = loop(range(len(t)))
                self._decide("vjp_transposed", False, "the double backward pass gave different results with batched "
                                                      "tangents than one by one: one pass per tangent")
                return looped
        self._decide("vjp_transposed", True, "", len(t))
        return batched

    @_process.runs_user_code
    def jvp(self, tangents: np.ndarray) -> np.ndarray:
        if self.problem.data_swap is not None:
            raise ModeUnsupportedError("forward mode is not available for params given as plain tensors; "
                                       "pass the nn.Module as params= instead")
        if self.needs_grad:
            raise ModeUnsupportedError("forward mode is checked for first derivatives only")
        import torch.autograd.forward_ad as fwAD

        rows = []
        for tangent in tangents:
            try:
                with fwAD.dual_level(), torch.no_grad():
                    x = fwAD.make_dual(self.problem.to_tensor(self.x0), self.problem.to_tensor(tangent))
                    out, _ = self.forward(x, False)
                    pushed = fwAD.unpack_dual(out).tangent
            except GradbridgeError:
                raise
            except Exception as exc:
                rule = _raised_in_user_jvp(exc)
                if rule is not None:  # the user's jvp cannot run as torch runs it in forward mode
                    raise ModeUnsupportedError(f"forward mode unsupported: {rule} raised {_first_line(exc)}"
                                               f"{_jvp_hint(exc)}") from exc
                if (isinstance(exc, (RuntimeError, NotImplementedError))
                        and any(hint in str(exc).lower() for hint in _FORWARD_AD_HINTS)):
                    rules = f" ({self.forward_rule})" if self.forward_rule else ""
                    raise ModeUnsupportedError(f"forward mode unsupported{rules}: {str(exc).splitlines()[0]}") from exc
                raise
            # a copy: the tangent of a view of fn's output, which fn may write again on the next call
            rows.append(np.zeros(out.numel()) if pushed is None else np.array(pushed.detach().cpu().numpy()))
        return np.stack(rows)

    def gradient_function(self, cotangent: np.ndarray) -> "TorchPrepared":
        problem = self.problem
        v = problem.to_tensor(cotangent)
        first = self.forward

        def gradient(x: torch.Tensor, needs_grad: bool) -> Tuple[torch.Tensor, list]:
            with torch.enable_grad():
                if not x.requires_grad:
                    x = x.detach().requires_grad_(True)
                with problem.params_held(x):
                    out, swapped = first(x, True)
                    g = _grad(problem, x, out, swapped, v, create_graph=True)
            return g, swapped

        outputs = gradient_output_specs(problem.leaves)
        return TorchPrepared(problem, gradient, self.x0, needs_grad_to_evaluate=True, outputs=outputs)


class TorchAdapter:
    """Adapter for PyTorch."""

    name = "torch"
    module_name = "torch"
    install_hint = 'pip install "gradbridge[torch]"'

    #: torch's registered pytree nodes, for backend detection (arguments are walked with it too)
    pytree_node = staticmethod(_registered_node)

    def clear_cache(self) -> None:
        """Drop the traces, compiled functions and batching decisions kept across checks."""
        clear_cache()

    def cache_size(self) -> int:
        return cache_size()

    def owns(self, value: Any) -> bool:
        return isinstance(value, (torch.Tensor, torch.nn.Module))

    def version(self) -> str:
        return torch.__version__

    def probe_float64(self) -> Tuple[bool, str]:
        """Whether autograd differentiates in float64 here (``gradbridge backends``), and a note."""
        x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        (x * x).sum().backward()
        ok = x.grad is not None and x.grad.dtype == torch.float64 and bool(torch.allclose(x.grad, 2 * x.detach()))
        return ok, "" if ok else f"autograd gave {None if x.grad is None else x.grad.dtype}"

    def prepare(self, spec: CheckSpec) -> Union[TorchPrepared, HandWrittenGradient]:
        # the copies made here (module constants) must not be inference tensors; and the user's tensors and
        # modules are read as the user left them, never inside another check's window (swapped parameters)
        with _outside_inference_mode(), _process.LOCK:
            return self._prepare(spec)

    def _prepare(self, spec: CheckSpec) -> Union[TorchPrepared, HandWrittenGradient]:
        unchecked: List[Unchecked] = []
        candidates, rebuild_args = argument_candidates(
            spec.args, spec.arg_names, _is_tensor, lambda t: (tuple(t.shape), _dtype_name(t), _floating(t)),
            node_of=_registered_node, unchecked=unchecked,
            native="the torch backend checks torch tensors: pass torch.as_tensor(...) to check it",
            not_checkable=_not_checkable)
        module, param_tensors = _parameters(spec)
        _refuse_meta(candidates, param_tensors)
        for name, tensor in param_tensors:
            frozen = _checkable(tensor) and not tensor.requires_grad and module is not None
            candidates.append(Candidate(name, tensor, tuple(tensor.shape), _dtype_name(tensor),
                                        _floating(tensor) and not frozen, "param",
                                        unchecked_reason="requires_grad=False" if frozen else
                                        COMPLEX_REASON if tensor.is_complex() else ""))
        leaves, chosen = layout_leaves(candidates, spec.wrt, unchecked)
        module_state = None
        data_swap = None
        if module is not None:
            checked = {candidates[i].name: k for k, i in enumerate(chosen) if candidates[i].kind == "param"}
            module_state = _ModuleState(module, checked, spec.promote)
        else:
            swapped = {k: candidates[i].value for k, i in enumerate(chosen) if candidates[i].kind == "param"}
            for k, tensor in swapped.items():
                if tensor.is_inference():
                    raise InvalidArgumentError(
                        f"params: {leaves[k].name} is an inference tensor (created under torch.inference_mode); the "
                        "check points a params= tensor at perturbed copies that autograd records, which torch does "
                        "not allow for inference tensors. Create it outside inference mode (or .clone() it there), "
                        "or pass it to fn as an argument, which the check copies")
                if not tensor.is_leaf:
                    raise InvalidArgumentError(f"params: {leaves[k].name} is not a leaf tensor (it was computed from "
                                               "others); pass leaf tensors or the nn.Module that owns them")
            data_swap = _DataSwap(swapped) if swapped else None
        devices = {c.value.device for c in candidates}
        device = next(iter(devices)) if len(devices) == 1 else torch.device("cpu")
        problem = TorchProblem(spec, candidates, leaves, chosen,
                               rebuild_args,
                               module, module_state, data_swap, device)
        x0 = np.concatenate([candidates[i].value.detach().to(torch.float64).reshape(-1).cpu().numpy() for i in chosen])
        prepared = TorchPrepared(problem, problem.forward, x0)
        prepared.notes.extend(unchecked_notes(candidates, chosen, unchecked))
        if spec.grad is not None:  # the analytic side is the user's hand-written gradient, never autograd
            return HandWrittenGradient(prepared, "PyTorch", _hand_written_call(problem, prepared), _to_array,
                                       floating_candidates(candidates), chosen)
        return prepared

    # --- gb.compare (see gradbridge._adapter.CompareAdapter) ---

    def to_numpy(self, value: Any) -> Optional[np.ndarray]:
        if not isinstance(value, torch.Tensor):
            return None
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # NumPy has no bfloat16; float32 holds it exactly
            value = value.float()
        return value.resolve_conj().resolve_neg().numpy().copy()

    def from_numpy(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(array, copy=True))

    def expected_params(self, fn: Callable[..., Any]) -> Optional[ExpectedParams]:
        """An ``nn.Module``'s parameters by ``state_dict`` name (required) and its buffers (optional)."""
        if not isinstance(fn, torch.nn.Module):
            return None
        required = {name: tuple(p.shape) for name, p in fn.named_parameters(remove_duplicate=True)}
        optional = {name: tuple(t.shape) for name, t in fn.state_dict(keep_vars=True).items() if name not in required}
        return ExpectedParams(f"torch module {type(fn).__name__}", "state_dict names", required, optional)

    def bind_params(self, fn: Callable[..., Any], params: Optional[Mapping[str, np.ndarray]],
                    grad: Optional[Callable[..., Any]] = None) -> ParamBinding:
        """A module: a float64 deep copy with ``params`` loaded through ``load_state_dict`` (the user's
        module is never touched). A plain function: the flat dict of float64 tensors as first argument."""
        if isinstance(fn, torch.nn.Module):
            if params is None:
                return ParamBinding(fn=fn, signature=fn.forward)
            with _process.LOCK:  # the module as the user left it, not inside another check's window
                loaded = _float64_copy_with(fn, params)
            return ParamBinding(fn=loaded, signature=loaded.forward,
                                note=f"torch module {type(fn).__name__}: params loaded by state_dict name into a "
                                     "float64 copy (the module itself is untouched)")
        if params is None:
            return ParamBinding(fn=fn)
        native = {name: self.from_numpy(array) for name, array in params.items()}
        leaves, _ = flatten(native, "params", _is_tensor)
        return ParamBinding(fn=fn, leading_args=(native,), leading_names=("params",),
                            names={leaf.path: name for leaf, name in zip(leaves, native)})


def _to_array(value: Any) -> np.ndarray:
    """A gradient a hand-written ``grad=`` returned (tensor, array, number) as a float64 NumPy array."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float64).cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def _hand_written_call(problem: TorchProblem, prepared: TorchPrepared) -> Callable[[Optional[List[np.ndarray]]], Any]:
    """The user's ``grad`` at ``x0`` (see :mod:`backends._handwritten`): ``grad(*args)`` for ``None``, else
    ``grad(cotangent, *args)`` with the cotangent blocks put in fn's output structure as tensors in the
    outputs' dtypes (zeros for non-floating outputs). The structure comes from one run of fn at ``x0``."""
    structure: List[Any] = []

    def output_structure() -> Tuple[Callable[[Sequence[Any]], Any], List[Tuple[bool, torch.Tensor]]]:
        if not structure:
            with torch.no_grad(), problem.window():
                result = problem.call_with_arguments(problem.spec.fn, (), problem.to_tensor(prepared.x0))
            leaves, rebuild = flatten(result, "out", _is_tensor)
            structure.append((rebuild, [(leaf.value.is_floating_point(), leaf.value.detach()) for leaf in leaves]))
        return structure[0]

    def call(blocks: Optional[List[np.ndarray]]) -> Any:
        leading: tuple = ()
        if blocks is not None:
            rebuild, outputs = output_structure()
            supply = iter(blocks)
            leading = (rebuild([torch.as_tensor(np.ascontiguousarray(next(supply)), dtype=like.dtype,
                                                device=like.device) if floating else torch.zeros_like(like)
                                for floating, like in outputs]),)
        # the grad mode user code is written for (its inputs do not require grad), in the check's window as fn
        with torch.enable_grad(), problem.window():
            return problem.call_with_arguments(problem.spec.grad, leading, problem.to_tensor(prepared.x0))

    return call


def _float64_copy_with(module: torch.nn.Module, params: Mapping[str, np.ndarray]) -> torch.nn.Module:
    """A deep copy of ``module`` in float64 with the given state_dict entries loaded (exactly: float64 into
    float64; integer buffers keep their dtype)."""
    try:
        loaded = copy.deepcopy(module)
    except Exception as exc:
        raise InvalidArgumentError(
            f"params: the torch module {type(module).__name__} cannot be deep-copied ({type(exc).__name__}: {exc}); "
            "gb.compare loads params into a copy so that your module stays untouched. Pass a function "
            "fn(params, *args) instead (e.g. with torch.func.functional_call)") from exc
    loaded = loaded.to(torch.float64)
    state = loaded.state_dict()
    for name, array in params.items():
        target = state[name]
        state[name] = torch.as_tensor(np.asarray(array)).to(dtype=target.dtype, device=target.device)
    loaded.load_state_dict(state, strict=True)
    return loaded


def _checkable(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex()


def _parameters(spec: CheckSpec) -> Tuple[Optional[torch.nn.Module], List[Tuple[str, torch.Tensor]]]:
    """The module (if any) and the named parameter tensors to consider, from ``params=`` or a module ``fn``."""
    params = spec.params
    if params is None and isinstance(spec.fn, torch.nn.Module):
        params = spec.fn
    if params is None:
        return None, []
    if isinstance(params, torch.nn.Module):
        return params, list(params.named_parameters(remove_duplicate=True))
    if isinstance(params, torch.Tensor):
        params = [params]
    if isinstance(params, dict):
        items = list(params.items())
    else:
        try:
            items = [(f"params[{i}]", t) for i, t in enumerate(params)]
        except TypeError:
            raise InvalidArgumentError(f"params: expected an nn.Module or an iterable of tensors, got "
                                       f"{type(params).__name__}") from None
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            raise InvalidArgumentError(f"params: {name} is a {type(t).__name__}, expected a torch.Tensor")
    return None, items


ADAPTER = TorchAdapter()
