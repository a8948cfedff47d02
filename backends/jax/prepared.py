"""JAX adapter: ``jax.custom_vjp`` / ``jax.custom_jvp`` rules, ``jax.jit``-compiled functions and plain code.

What is checked, and how the user's state stays untouched:

* Arguments are pytrees (dicts, lists, tuples, NamedTuples, registered nodes). Every floating leaf
  (a JAX array, or a NumPy float array passed to a JAX function) is checked and named by its tree
  path under the argument's name, e.g. ``params['dense1']['w']``. Integer leaves, PRNG keys (typed
  ``jax.random.key`` keys and legacy ``uint32`` ``jax.random.PRNGKey`` keys) and non-array values
  (Python numbers, strings, ...) pass through untouched: the very same object at every evaluation.
* Randomness: JAX has no global generator, so a function that takes a PRNG key gets the same key at
  every evaluation (keys are not floating, so they are never perturbed) and draws the same dropout
  mask each time; the finite differences then see one fixed function. Python's and NumPy's global
  generators (used, say, inside a ``pure_callback``) are re-seeded before each batch of evaluations
  and put back when that call into fn returns (under the lock of :mod:`gradbridge._process`).
* Float64: everything runs inside JAX's thread-local 64-bit scope (``jax.enable_x64(True)``, a context
  manager), so the user's global ``jax_enable_x64`` setting is never written: no other thread sees the
  check's mode, and the flag is exactly as it was afterwards, also when ``fn`` raises. Host callbacks
  XLA runs on threads of its own are registered wrapped in the mode they were traced in. Checked leaves
  created as float32 (or bfloat16, float16) are promoted on float64 copies; unchecked floating leaves are
  promoted too, so ``fn`` computes in one precision.
* ``promote=False``: every floating leaf keeps its own dtype; the checked ones are cut from the flat
  vector and cast to it inside ``fn``'s trace (exact: the core has rounded the points to those dtypes),
  so the derivatives JAX computes run in those dtypes (cotangents reach the outputs cast to their
  dtypes) and are widened only afterwards. The 64-bit scope is entered only where some floating leaf
  is float64; otherwise ``fn`` runs under the user's own ``jax_enable_x64`` setting, as it does for the
  user (with x64 off, ``jnp.zeros(3)`` inside ``fn`` stays float32), and the flat plumbing around it is
  float32, which holds float32, float16 and bfloat16 values exactly.
* Analytic side: reverse mode is ``jax.vjp`` built once at the checked point and applied to all
  cotangents with ``jax.vmap`` under ``jax.jit``; forward mode is ``jax.linearize`` applied the same
  way. A ``custom_vjp`` function has no forward mode: ``analytic="fwd"`` rows are "unsupported".
  ``order=2`` differentiates ``x -> vjp(fn, x)(v)`` once more. ``vjp_transposed`` (``J t`` with the ``J``
  of reverse mode, custom_vjp bwd rules included) is ``jax.linear_transpose`` of that VJP, vmapped, jitted
  and cached like the other maps; a bwd JAX cannot transpose (not linear in its cotangent, a
  ``pure_callback`` applied to it) makes it ModeUnsupportedError.
* "No gradient": where JAX raises because some input has no derivative rule (a ``pure_callback``
  without custom rule, a ``while_loop`` in reverse mode), each leaf is tried on its own and those JAX
  cannot differentiate are reported as "no gradient"; so are leaves whose derivative JAX returns as a
  symbolic zero (``stop_gradient``, an input ``fn`` does not use, a ``custom_vjp`` bwd returning
  ``None``), found by tracing the derivative map to a jaxpr and following its data dependencies.
  (float0 cotangents belong to integer inputs, which are never differentiated.)
* Evaluation runs ``jax.jit(jax.vmap(fn))`` over a batch of points; a function that cannot be traced
  that way (Python control flow on values, NumPy conversions) is evaluated point by point instead.
* State fn keeps: a model holding its own PRNG key (``self.key, sub = jax.random.split(self.key)``), a
  closure rebinding a nonlocal, a global, a flax/equinox-style state object. Every traced run of fn is
  watched: where it leaves tracers in those places, they are put back at once and fn is evaluated point by
  point and differentiated eagerly from then on (a note says so). When the check ends, also by raising,
  every array, key or object fn rebound holds what it held before (int counters and logs fn keeps stay).
  A function whose output depends on a key it advances is reported as not deterministic.
* ``gradbridge.check`` called on tracers (inside ``jax.jit``/``jax.grad``/``jax.vmap``) raises
  InvalidArgumentError naming the argument; a check called by fn on values that do not depend on fn's
  input makes the outer check evaluate fn eagerly, where the inner check runs.
* ``params=`` and ``grad=`` are rejected: a pure JAX function cannot have closed-over parameters swapped
  (pass the parameter pytree as an argument), and JAX computes the gradients itself (write custom ones
  as ``custom_vjp``/``custom_jvp`` rules).
"""

from __future__ import annotations

from contextlib import contextmanager

import contextlib
import dataclasses
import functools
import threading
from dataclasses import dataclass, field
from typing import (Any, Callable, ContextManager, Dict, FrozenSet, Iterator, List, Mapping, Optional, Sequence,
                    Tuple)

import jax
import jax.numpy as jnp
import numpy as np

from gradbridge import _process
from gradbridge._adapter import CheckSpec, ExpectedParams, LeafSpec, ParamBinding, ProblemBackedFunction
from gradbridge._errors import FunctionEvaluationError, GradbridgeError, InvalidArgumentError, ModeUnsupportedError
from ..common.cache import WeakFunctionCache
from ..common.fingerprint import BASE_LIBRARIES, Fingerprinter, UNHANDLED, Uncacheable, digest, weak_callable
from ..common.state import StateSnapshot, StateWalker
from ..common.layout import (COMPLEX_REASON, Candidate, Unchecked, hidden_arrays, layout_leaves, promotion_notes,
                                unchecked_notes)
from ..common.outputs import gradient_output_specs, output_specs
from ..common.rng import SharedRandomState
from gradbridge._tree import self_reference

from ..common.lowprec import low_precision_names, own_precision, promotion_hint, refresh_note

try:  # the public home of jaxpr types since jax 0.4.3x
    from jax.extend.core import Literal
except ImportError:  # pragma: no cover - older jax
    from jax.core import Literal  # type: ignore[attr-defined,no-redef]

try:  # every trace's placeholder value (jit, vmap, grad, linearize) is a Tracer
    _Tracer: Any = jax.core.Tracer
except AttributeError:  # pragma: no cover - a jax that moved it
    from jax._src.core import Tracer as _Tracer

#: Substrings of JAX errors meaning "this input has no derivative rule" (not a bug in the user's rule).
_NO_DERIVATIVE_HINTS = ("differentiation rule for", "transpose rule", "do not support jvp", "does not support jvp",
                        "reverse-mode differentiation does not work", "does not support reverse-mode")
#: Substrings of JAX errors meaning "forward mode is not available for this function".
_FORWARD_UNSUPPORTED_HINTS = ("forward-mode autodiff (jvp) to a custom_vjp",)

_SYMBOLIC_ZERO = ("JAX's derivative for it is a symbolic zero: fn does not depend on it differentiably "
                  "(jax.lax.stop_gradient, an unused input, or a custom rule returning None/zeros)")

LinearMap = Tuple[List[int], Callable[..., Any]]  # (indices of the leaves it takes or returns, the map)


@contextmanager
def enable_float64() -> Iterator[None]:
    """JAX's 64-bit mode for the duration of the check, in this thread only: the thread-local override of
    ``jax_enable_x64`` (``jax.enable_x64.swap_local``, since jax 0.8; ``jax.experimental.enable_x64()``
    before), put back on exit, also when the check raises. The global flag is never written, so no other
    thread sees the check's mode. Host callbacks XLA runs on threads of its own get the mode they were
    traced in (see :func:`_follow_traced_x64`)."""
    state = getattr(jax, "enable_x64", None)
    if state is None or not hasattr(state, "swap_local"):  # pragma: no cover - jax < 0.8
        from jax.experimental import enable_x64

        with enable_x64(True):
            yield
        return
    previous_local = state.swap_local(True)
    try:
        yield
    finally:
        state.set_local(previous_local)


def _in_x64(callback: Callable[..., Any]) -> Callable[..., Any]:
    """``callback`` run in JAX's 64-bit mode (thread-local, put back when it returns) on whatever thread
    XLA calls it."""

    @functools.wraps(callback)
    def run(*args: Any) -> Any:
        with enable_float64():
            return callback(*args)

    return run


def _follow_traced_x64() -> bool:
    """Make the host callbacks (``pure_callback``, ``io_callback``, ``jax.debug.callback``) lowered while a
    check's 64-bit scope is open in this thread run in 64-bit mode too. XLA runs a callback on a thread of
    its own when its arrays are large, and a thread-local mode is not seen there: the callback's float64
    arguments would arrive as float32 and its float64 results be refused. Each such callback is registered
    wrapped in the mode (:func:`_in_x64`); JAX keys its compiled code on the mode, so the wrapped callbacks
    run only where the mode was on anyway. Returns False where JAX's internals differ (then a check sets the
    global flag while it runs fn, see :meth:`JaxProblem._changed`)."""
    try:
        from jax._src.interpreters import mlir
    except ImportError:  # pragma: no cover - another jax layout
        return False
    context = getattr(mlir, "ModuleContext", None)
    original = getattr(context, "add_host_callback", None)
    if original is None:  # pragma: no cover - another jax layout
        return False
    if getattr(original, "gradbridge_follows_x64", False):
        return True

    @functools.wraps(original)
    def add_host_callback(self: Any, host_callback: Any) -> None:
        if _ACTIVE.problems and callable(host_callback) and bool(jax.config.jax_enable_x64):
            host_callback = _in_x64(host_callback)
        return original(self, host_callback)

    add_host_callback.gradbridge_follows_x64 = True  # type: ignore[attr-defined]
    context.add_host_callback = add_host_callback
    return True


def plumbing_dtype() -> Any:
    """The widest float JAX gives under the current x64 setting (float64 in the 64-bit scope, else float32):
    the dtype of the flat vectors passed between the core and ``fn``."""
    return jax.dtypes.canonicalize_dtype(np.float64)


def _is_array(value: Any) -> bool:
    return isinstance(value, (jax.Array, np.ndarray, np.generic))


def _is_key(value: Any) -> bool:
    return isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jax.dtypes.prng_key)


def _floating(value: Any) -> bool:
    return _is_array(value) and not _is_key(value) and bool(jnp.issubdtype(value.dtype, jnp.floating))


def _complex(value: Any) -> bool:
    return _is_array(value) and not _is_key(value) and bool(jnp.issubdtype(value.dtype, jnp.complexfloating))


def _dtype_name(value: Any) -> str:
    return str(value.dtype)


def _hidden_reason(value: Any) -> str:
    """Why the floating arrays inside a value JAX's pytree registry treats as a leaf are not checked."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return (f"a {type(value).__module__.split('.')[0]} {type(value).__name__}, passed through unchanged; the JAX "
                "backend checks JAX and NumPy arrays: pass jnp.asarray(...) to check it")
    what = "a dataclass" if dataclasses.is_dataclass(value) else "a type"
    return (f"inside {type(value).__name__}, {what} that JAX's pytree registry does not know, so it is passed "
            "through unchanged: register it (jax.tree_util.register_dataclass, flax.struct.dataclass, "
            "jax.tree_util.register_pytree_with_keys) to check its fields")


def _registered_node(value: Any) -> Optional[Tuple[List[str], List[Any], Callable[[List[Any]], Any]]]:
    """One level of a node of JAX's pytree registry (for backend detection): path suffixes, children, rebuild;
    None for a leaf."""
    pairs, treedef = jax.tree_util.tree_flatten_with_path(value, is_leaf=lambda v: v is not value)
    if treedef.num_nodes == 1 and treedef.num_leaves == 1:
        return None
    return ([jax.tree_util.keystr(path) for path, _ in pairs], [child for _, child in pairs],
            lambda children: jax.tree_util.tree_unflatten(treedef, children))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _mentions(exc: BaseException, hints: Sequence[str]) -> bool:
    return not isinstance(exc, GradbridgeError) and any(hint in str(exc).lower() for hint in hints)


def _reraise_unless_no_derivative(exc: Exception, mode: str) -> None:
    """Called in an ``except`` block while building a derivative map: return only when ``exc`` says JAX has
    no derivative rule for some input; raise ModeUnsupportedError for forward mode on a custom_vjp
    function; re-raise anything else (the user's rule or function is broken: the core reports it)."""
    if mode == "fwd" and _mentions(exc, _FORWARD_UNSUPPORTED_HINTS):
        raise ModeUnsupportedError(f"forward mode unsupported: {_first_line(exc)} "
                                   "(a jax.custom_vjp function defines reverse mode only)") from exc
    if not _mentions(exc, _NO_DERIVATIVE_HINTS):
        raise exc


def _dependencies(jaxpr: Any) -> List[FrozenSet[int]]:
    """For each output of ``jaxpr``, the indices of the inputs it depends on.

    Conservative: an equation's outputs depend on all its inputs, except calls of jit-compiled
    sub-jaxprs, which are followed inside. An output with no input dependency is a constant of the
    map: with a linear map, a (symbolic) zero.
    """
    deps: Dict[Any, FrozenSet[int]] = {v: frozenset([i]) for i, v in enumerate(jaxpr.invars)}

    def read(v: Any) -> FrozenSet[int]:
        return frozenset() if isinstance(v, Literal) else deps.get(v, frozenset())

    for eqn in jaxpr.eqns:
        inputs = [read(v) for v in eqn.invars]
        inner = eqn.params.get("jaxpr") if eqn.primitive.name in ("jit", "pjit", "closed_call") else None
        inner = getattr(inner, "jaxpr", inner)  # ClosedJaxpr -> Jaxpr
        if inner is not None and len(inner.invars) == len(inputs) and len(inner.outvars) == len(eqn.outvars):
            outputs = [frozenset().union(*(inputs[j] for j in d)) for d in _dependencies(inner)]
        else:
            union = frozenset().union(*inputs)
            outputs = [union] * len(eqn.outvars)
        for v, d in zip(eqn.outvars, outputs):
            deps[v] = d
    return [read(v) for v in jaxpr.outvars]


def _apply_vmapped(function: Callable[..., Any], *batched: Any) -> Any:
    """``function`` applied to each row of the ``batched`` arrays (``function`` may be a pytree, e.g. a VJP)."""
    return jax.vmap(function)(*batched)


# --- Compiled code kept across checks ---------------------------------------------------------------------
#
# Tracing and compiling ``jax.jit(jax.vmap(fn))`` and the VJP/JVP maps costs far more than a small check
# itself, so what a check compiles is kept for the next check of the same function. An entry is found by
# the function object (held weakly: the cache never keeps it alive) and a key of everything that shapes
# the trace: the argument trees, each leaf's role (checked: shape and dtype; other arrays: shape and dtype
# only, as they are passed to the compiled code as arguments, never baked in; other values: by value, and
# only immutable ones), kwargs (immutable values only), promote, the leaves' dtypes inside fn and the x64
# mode. What fn reads from outside its arguments (closure cells, globals it names, defaults, the state of
# a callable object or bound method, recursively through the Python functions it reaches) is part of the
# key too, taken when the check looks its entry up, before it runs fn: Python scalars (ints included) and
# NumPy arrays by contents, JAX arrays and other objects by identity (see gradbridge._fingerprint). A global
# rebound to another value or an array changed in place makes a fresh trace; an int or a list of ints fn
# bumps while traced (a trace counter) does not, as the entries of the state a check started from are also
# kept under the state it leaves behind (WeakFunctionCache.keep_after_run). Anything that cannot be keyed or
# fingerprinted safely is simply not cached. The compiled pieces hold no user array.

_CACHE: WeakFunctionCache["_Compiled"] = WeakFunctionCache(per_function=16)
_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, type(Ellipsis), np.dtype)


def clear_cache() -> None:
    """Drop every compiled function kept across checks."""
    _CACHE.clear()


def cache_size() -> int:
    """How many compiled entries are kept (over all functions)."""
    return len(_CACHE)


def _static_token(value: Any, depth: int = 0) -> Any:
    """A hashable token for a non-array value fn receives, equal only for equal immutable values."""
    if isinstance(value, _IMMUTABLE) or isinstance(value, np.generic) and value.dtype.kind in "biufc":
        return (type(value), value)
    if isinstance(value, tuple) and depth < 4:
        return (type(value), tuple(_static_token(v, depth + 1) for v in value))
    raise Uncacheable(type(value).__name__)


def _constant_token(value: Any) -> Any:
    """A token for an integer, boolean or key array fn receives as is (it is baked into the trace): its
    type, shape, dtype and a digest of its contents."""
    data = jax.random.key_data(value) if _is_key(value) else value
    array = np.asarray(data)
    if array.dtype.hasobject or array.dtype.kind not in "biufc":
        raise Uncacheable("array of dtype " + str(array.dtype))
    return ("constant", type(value).__name__, tuple(np.shape(value)), str(value.dtype), digest(array))


class _Fingerprint(Fingerprinter):
    """What fn reads besides its arguments: ``token`` for comparison, plus weak references proving that the
    objects compared by identity are still the same ones (:meth:`alive`). Plain values by value, as every
    adapter keys them (:meth:`Fingerprinter.plain`)."""

    #: Packages whose functions and objects are fingerprinted by identity only, not followed inside.
    libraries = BASE_LIBRARIES | {"jax", "jaxlib", "flax", "optax", "equinox", "haiku", "chex"}

    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.token = self.environment(fn)

    def ndarray(self, value: np.ndarray) -> Any:
        """A NumPy array by shape, dtype and a digest of its contents, and by identity too."""
        return ("ndarray", value.shape, str(value.dtype), digest(value), self.identity(value))

    def adapter_object(self, value: Any, depth: int) -> Any:
        """JAX arrays (immutable) by identity; custom_vjp/custom_jvp functions by identity plus the user's
        function and rules inside."""
        if isinstance(value, jax.Array):
            return ("jax", self.identity(value))
        if isinstance(value, (jax.custom_vjp, jax.custom_jvp)):
            return ("custom", self.identity(value),
                    tuple(self.environment(getattr(value, name, None), depth + 1)
                          for name in ("fun", "fwd", "bwd", "jvp")))
        return UNHANDLED


# --- State fn keeps and rebinds while it runs (a model splitting its own PRNG key) ------------------------------
#
# A model that keeps its key (``self.key, sub = jax.random.split(self.key)``), a closure rebinding a nonlocal
# key, a global it advances: traced under jit or vmap, fn stores tracers into the user's objects, the next trace
# or call then reads a dead tracer (UnexpectedTracerError), and the user's model is left broken. So every run of
# fn under a trace is guarded: the places fn can rebind (found from fn and from the non-array values passed to
# it, by the fingerprint's reach, see gradbridge._fingerprint.StateWalker) are snapshotted before, and looked
# through for tracers after; where fn left some, the places are put back at once and fn is marked stateful: from
# then on it is evaluated point by point, eagerly, and differentiated with eager jax.vjp/jax.linearize at the
# checked point (what jit would bake in, one key for every evaluation, is not what fn does). A function whose
# output depends on the key it advances then differs between two evaluations at the same point, which the core
# reports as "not deterministic"; one whose output does not depend on it gets its normal verdict. At the end of
# the session every place is put back as the check found it (StateSnapshot.restore: arrays, keys, state objects;
# int counters and logs fn keeps stay as fn left them), also when the check raises.


class _State(StateWalker):
    """The places fn can rebind, and the tracers found in them."""

    libraries = _Fingerprint.libraries

    def is_array(self, value: Any) -> bool:
        return isinstance(value, (jax.Array, np.ndarray))

    def is_watched(self, value: Any) -> bool:
        return isinstance(value, _Tracer)

    def adapter_children(self, value: Any) -> Any:
        if isinstance(value, (jax.custom_vjp, jax.custom_jvp)):
            return [getattr(value, name) for name in ("fun", "fwd", "bwd", "jvp") if hasattr(value, name)]
        return UNHANDLED


def _holds_tracer(value: Any) -> bool:
    """Whether ``value`` is, or holds somewhere inside (a tuple, a new state object, a closure), a tracer."""
    if isinstance(value, _Tracer):
        return True
    if isinstance(value, (jax.Array, np.ndarray)):
        return False
    return bool(_State([("", value)], snapshot=False).watched)


class _StatefulFunction(FunctionEvaluationError):
    """Raised out of a traced run of fn that left tracers in the user's state (already put back): the prepared
    function's method that ran it starts again, eagerly (see :func:`_eager_on_leak`)."""


class _Active(threading.local):
    """The problems whose sessions are open in this thread, innermost last (a check inside fn nests one)."""

    def __init__(self) -> None:
        self.problems: List["JaxProblem"] = []


_ACTIVE = _Active()
#: Whether host callbacks lowered inside a check run in its 64-bit mode on XLA's threads (see _follow_traced_x64).
_CALLBACKS_FOLLOW_X64 = _follow_traced_x64()


def _call_fn(fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Mapping[str, Any], traced: bool) -> Any:
    """``fn(*args, **kwargs)``; a traced run is guarded by the innermost open session's problem."""
    if traced and _ACTIVE.problems:
        return _ACTIVE.problems[-1].guarded(fn, args, kwargs)
    return fn(*args, **kwargs)


def _eager_on_leak(method: Callable[..., Any]) -> Callable[..., Any]:
    """A prepared function's method that starts again once a traced run of fn left tracers in the user's state:
    the problem is stateful by then, so the second run takes the eager paths only."""

    @functools.wraps(method)
    def run(self: "JaxPrepared", *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except _StatefulFunction:
            if self.problem.eager_reason is None:  # pragma: no cover - raised only after marking
                raise
            return method(self, *args, **kwargs)
    return run


def _staging() -> bool:
    """Whether JAX is staging code now (inside jax.jit or jax.make_jaxpr): every array made is then a tracer.
    Eager autodiff and eager vmap are not staging: arrays made from constants there are concrete."""
    try:  # about 1 us; private, so checked for
        from jax._src.core import unsafe_am_i_under_a_jit

        return bool(unsafe_am_i_under_a_jit())
    except Exception:  # pragma: no cover - a jax without it: ask an array (about 0.1 ms)
        return isinstance(jnp.zeros(()), _Tracer)


def _tracer_error(where: str, what: Optional[str]) -> InvalidArgumentError:
    """gradbridge.check was given a tracer: it was called under a JAX transformation (marked, so that a check
    running fn under a trace, where fn calls gradbridge.check itself, can tell it and evaluate fn eagerly)."""
    found = f"{what} is a JAX tracer, not a concrete array" if what else "JAX is tracing code (jax.jit)"
    error = InvalidArgumentError(
        f"{where}: {found}: gradbridge.check was called inside a JAX transformation (jax.jit, jax.grad, jax.vmap, "
        "jax.lax control flow, or a function that gradbridge itself is checking, which it traces). gradbridge runs "
        "fn and JAX's derivatives itself and needs concrete values: call gb.check outside any transformed code, "
        "on concrete arrays")
    error.gradbridge_tracer_argument = True  # type: ignore[attr-defined]
    return error


def _output_sink_flatten(result: Any, sink: Any) -> jax.Array:
    """``fn``'s output as one flat vector in the plumbing dtype; records the output layout in ``sink`` once."""
    pairs, _ = jax.tree_util.tree_flatten_with_path(result)
    found = [("out" + jax.tree_util.keystr(path), value) for path, value in pairs if _floating(value)]
    if not found:
        if _is_array(result):
            got = f"an array of dtype {_dtype_name(result)}"
        else:
            got = type(result).__name__ + (" with no floating array in it" if pairs else "")
        raise FunctionEvaluationError(
            f"fn: expected a floating-point array (or a pytree of them) as output, got {got}")
    if sink.outputs is None:  # shapes seen inside jax.vmap are those of one point
        sink.outputs = output_specs([(name, tuple(value.shape), _dtype_name(value)) for name, value in found])
        sink.low_precision_outputs = [name for name, value in found if value.dtype != jnp.float64]
    return jnp.concatenate([jnp.ravel(jnp.asarray(value)).astype(plumbing_dtype()) for _, value in found])


@dataclass
class _LinearPlan:
    """The compiled VJP (``"rev"``) or JVP (``"fwd"``) maps of one entry, traced with the checked point and
    the fixed arrays as arguments, so they hold for every check with the same key."""

    maps: List[Tuple[List[int], Callable[..., Any], Callable[..., Any]]]  # (leaf indices, batched, single)
    undefined: Dict[int, str]  # leaf index -> why JAX cannot differentiate fn with respect to it
    constant: List[Tuple[int, int]]  # (map index, position): outputs/tangents on which nothing depends


class _Compiled:
    """The compiled pieces of one traced function ``function(parts, dyn) -> flat output``."""

    def __init__(self, function: Callable[..., jax.Array], layout: Sequence[Tuple[int, int, Tuple[int, ...]]],
                 fingerprint: Optional[_Fingerprint], outputs: Optional[List[LeafSpec]] = None) -> None:
        self.function = function
        self.layout = list(layout)  # (offset, size, shape) of each checked leaf in the flat vector
        self.fingerprint = fingerprint
        self.outputs = outputs
        self.low_precision_outputs: List[str] = []
        self.evaluation_fails = False
        self.eager_reason: Optional[str] = None  # why fn cannot be traced (it keeps state): checked eagerly
        self.linear: Dict[str, Any] = {}  # mode -> _LinearPlan, or False: use the per-check path
        self.gradient: Optional[_Compiled] = None
        self.gradient_error: Optional[BaseException] = None
        self.gradient_probed = False

        def flat(x: jax.Array, dyn: Any) -> jax.Array:
            return function(self.split(x), dyn)

        self.evaluate = jax.jit(jax.vmap(flat, in_axes=(0, None)))

        def edited(x0: jax.Array, positions: jax.Array, values: jax.Array, dyn: Any) -> jax.Array:
            count = positions.shape[0]
            points = jnp.broadcast_to(x0, (count, x0.shape[0])).at[jnp.arange(count), positions].set(values)
            return jax.vmap(flat, in_axes=(0, None))(points, dyn)

        # the points of an element-by-element check built next to the computation (XLA fuses the edit in)
        self.evaluate_edits = jax.jit(edited)
        bind = getattr(function, "bind", None)
        if bind is not None:  # the traced call records the output layout here
            bind(self)

    def split(self, x: Any) -> List[Any]:
        return [jnp.reshape(x[offset:offset + size], shape) for offset, size, shape in self.layout]

    def alive(self) -> bool:
        """Whether the objects its key names by identity still live (else an id may name another object)."""
        return self.fingerprint is not None and self.fingerprint.alive()

    def gradient_entry(self) -> "_Compiled":
        """The entry of ``x -> J(x)^T v`` (order 2), with ``v`` passed as an argument next to ``dyn``."""
        if self.gradient is None:
            first = self.function

            def gradient(parts: Sequence[jax.Array], dyn2: Any) -> jax.Array:
                dyn, v = dyn2
                pulled = jax.vjp(lambda *p: first(list(p), dyn), *parts)[1](v)
                return jnp.concatenate([jnp.ravel(g) for g in pulled])

            self.gradient = _Compiled(gradient, self.layout, None)
        return self.gradient


def _restricted(function: Callable[..., jax.Array], indices: List[int], parts0: Sequence[jax.Array],
                dyn: Any) -> Callable[..., jax.Array]:
    """``function`` as a function of the leaves ``indices`` only, the others fixed at ``parts0``."""

    def g(*sub: jax.Array) -> jax.Array:
        parts = list(parts0)
        for k, s in zip(indices, sub):
            parts[k] = s
        return function(parts, dyn)
    return g


def _linear_single(function: Callable[..., jax.Array], indices: List[int], mode: str) -> Callable[..., Any]:
    """``(parts0, dyn, *inputs) -> J^T v`` (rev, one cotangent, gradients of the leaves ``indices``) or
    ``J u`` (fwd, one tangent per leaf in ``indices``), the derivative taken inside the trace."""

    def restricted(parts0: Sequence[jax.Array], dyn: Any) -> Callable[..., jax.Array]:
        return _restricted(function, indices, parts0, dyn)

    if mode == "rev":
        def single(parts0: Sequence[jax.Array], dyn: Any, v: jax.Array) -> Tuple[jax.Array, ...]:
            return tuple(jax.vjp(restricted(parts0, dyn), *[parts0[k] for k in indices])[1](v))
    else:
        def single(parts0: Sequence[jax.Array], dyn: Any, *tangents: jax.Array) -> jax.Array:  # type: ignore[misc]
            return jax.jvp(restricted(parts0, dyn), [parts0[k] for k in indices], list(tangents))[1]
    return single


def _build_linear(entry: _Compiled, parts0: List[jax.Array], dyn: Any, probe: Callable[[List[int]], Sequence[Any]],
                  mode: str) -> Any:
    """The entry's linear maps for ``mode``, or False where they cannot be traced with the point as an
    argument (Python control flow on values, a broken rule, forward mode of a custom_vjp): the check then
    takes the per-check path, which reports those exactly as before."""
    everything = list(range(len(parts0)))
    traced: List[Tuple[List[int], Callable[..., Any], Any]] = []
    undefined: Dict[int, str] = {}
    try:
        single = _linear_single(entry.function, everything, mode)
        traced.append((everything, single, jax.make_jaxpr(single)(parts0, dyn, *probe(everything))))
    except GradbridgeError:
        raise
    except Exception as exc:
        if not _mentions(exc, _NO_DERIVATIVE_HINTS) or (mode == "fwd" and _mentions(exc, _FORWARD_UNSUPPORTED_HINTS)):
            return False
        for k in everything:
            try:
                single = _linear_single(entry.function, [k], mode)
                traced.append(([k], single, jax.make_jaxpr(single)(parts0, dyn, *probe([k]))))
            except GradbridgeError:
                raise
            except Exception as exc:
                if not _mentions(exc, _NO_DERIVATIVE_HINTS) or _mentions(exc, _FORWARD_UNSUPPORTED_HINTS):
                    return False
                undefined[k] = f"JAX cannot differentiate fn with respect to it: {_first_line(exc)}"
    maps = []
    constant: List[Tuple[int, int]] = []
    for m, (indices, single, closed) in enumerate(traced):
        count = 1 if mode == "rev" else len(indices)
        total = len(closed.jaxpr.invars)
        linear_inputs = frozenset(range(total - count, total))
        dependencies = [d & linear_inputs for d in _dependencies(closed.jaxpr)]
        if mode == "rev":
            constant += [(m, j) for j in range(len(indices)) if not dependencies[j]]
        else:
            used = frozenset().union(*dependencies)
            constant += [(m, j) for j in range(len(indices)) if total - count + j not in used]
        in_axes = (None, None) + (0,) * count
        maps.append((indices, jax.jit(jax.vmap(single, in_axes=in_axes)), jax.jit(single)))
    return _LinearPlan(maps, undefined, constant)


_TRANSPOSED = "the transposed VJP (J t, by transposing JAX's reverse-mode derivative) "


def _not_transposable(exc: BaseException) -> str:
    """Why ``jax.linear_transpose`` of the VJP failed, for a ModeUnsupportedError (JAX's own error is an
    AssertionError or a ValueError deep in its transpose rules)."""
    return (_TRANSPOSED + "is unavailable: JAX cannot transpose the VJP of fn, so a custom_vjp bwd (or another "
            "derivative rule) is not linear in its cotangent or applies an operation without a transpose rule "
            f"to it (jax.pure_callback, a while_loop, a comparison or product of cotangents) ({_first_line(exc)})")


def _apply_transposed(transposed: Callable[..., Any], *tangents: jax.Array) -> jax.Array:
    """``J t`` from a ``jax.linear_transpose``d VJP and one tangent per leaf of its group."""
    return transposed(tuple(tangents))[0]


def _transposed_single(function: Callable[..., jax.Array], indices: List[int]) -> Callable[..., jax.Array]:
    """``(parts0, dyn, *tangents) -> J t`` for one tangent per leaf in ``indices``: the VJP ``u -> J^T u`` of
    ``function`` at ``parts0`` transposed with ``jax.linear_transpose``, so ``J`` is the one the VJP (the
    user's custom_vjp bwd) implements, never a forward-mode rule."""

    def single(parts0: Sequence[jax.Array], dyn: Any, *tangents: jax.Array) -> jax.Array:
        out, pullback = jax.vjp(_restricted(function, indices, parts0, dyn), *[parts0[k] for k in indices])
        return jax.linear_transpose(pullback, out)(tuple(tangents))[0]
    return single


@dataclass
class _TransposedPlan:
    """The compiled transposed VJP maps of one entry, one per map of its ``"rev"`` plan (the same leaf
    groups, so leaves JAX cannot differentiate are left out as the VJP leaves them out), or why JAX cannot
    transpose the VJP (kept as text: the cache holds no traceback and no user array)."""

    maps: List[Tuple[List[int], Callable[..., Any]]]  # (leaf indices, batched map)
    error: Optional[str] = None


def _build_transposed(entry: _Compiled, plan: _LinearPlan, parts0: List[jax.Array], dyn: Any) -> _TransposedPlan:
    """Trace the transposed map of each leaf group of ``plan`` (transposition errors surface while tracing)."""
    maps: List[Tuple[List[int], Callable[..., Any]]] = []
    for indices, _, _ in plan.maps:
        single = _transposed_single(entry.function, indices)
        try:
            jax.make_jaxpr(single)(parts0, dyn, *[jnp.zeros_like(parts0[k]) for k in indices])
        except GradbridgeError:
            raise
        except Exception as exc:
            return _TransposedPlan([], _not_transposable(exc))
        maps.append((indices, jax.jit(jax.vmap(single, in_axes=(None, None) + (0,) * len(indices)))))
    return _TransposedPlan(maps)


@dataclass(frozen=True)
class _Argument:
    """Where one top-level argument's pytree leaves sit in the list of all leaves."""

    treedef: Any
    start: int
    count: int


def _passed_objects(spec: CheckSpec) -> List[Tuple[str, Any]]:
    """The non-array values fn is passed (pytree leaves of the arguments, keyword arguments), named by path:
    fn gets these very objects at every run, so it can keep state in them."""
    found: List[Tuple[str, Any]] = []
    for name, arg in zip(spec.arg_names, spec.args):
        for path, value in jax.tree_util.tree_flatten_with_path(arg)[0]:
            if not _is_array(value):
                found.append((name + jax.tree_util.keystr(path), value))
    found.extend((f"kwargs[{key!r}]", value) for key, value in spec.kwargs.items())
    return found


class JaxProblem:
    """Everything about one JAX check that is fixed: the argument trees, the leaves, the output layout."""

    def __init__(self, spec: CheckSpec, arguments: List[_Argument], values: List[Any], candidates: List[Candidate],
                 positions: List[int], leaves: List[LeafSpec], chosen: List[int]) -> None:
        self.spec = spec
        self.arguments = arguments
        self.values = values  # every pytree leaf of every argument, the user's objects
        self.candidates = candidates
        self.positions = positions  # candidate index -> position in ``values``
        self.leaves = leaves
        self.chosen = chosen
        self.rng = SharedRandomState(spec.seed)
        self.outputs: Optional[List[LeafSpec]] = None
        self.low_precision_outputs: List[str] = []
        self._fixed: Optional[List[Any]] = None
        self._compiled: Optional[Tuple[_Compiled, Tuple[Any, ...]]] = None
        self._key: Optional[Tuple[Any, Any]] = None  # the key the compiled entry is kept under, when cached
        self.promote = spec.promote
        # the dtype each checked leaf takes inside fn: None (the plumbing's float64) or, with promote=False, its own
        self.leaf_dtypes = [None if spec.promote else candidates[i].value.dtype for i in chosen]
        floating = [c for c in candidates if c.floating]
        self.needs_x64 = spec.promote or any(str(c.dtype) == "float64" for c in floating)
        # promote=True only: the leaves given below float64, named in the hint when fn fails on the copies
        self.low_precision = low_precision_names([(c.name, c.dtype) for c in floating]) if spec.promote else ""
        # where fn can keep state: fn itself and the non-array values it is passed (the same objects every run)
        self.roots: List[Tuple[str, Any]] = [("fn", spec.fn)] + _passed_objects(spec)
        self.eager_reason: Optional[str] = None  # why fn is evaluated and differentiated eagerly (see _State)
        # around every call into the user's code: Python's and NumPy's generators (host callbacks, eager
        # NumPy code may draw from them) re-seeded inside and put back, under the one lock
        self.window = _process.Window(self._changed)

    @contextlib.contextmanager
    def _changed(self) -> Iterator[None]:
        """The check's process-wide state for one window (see :mod:`gradbridge._process`)."""
        with self.rng.preserved():
            if _CALLBACKS_FOLLOW_X64 or not self.needs_x64:
                yield
                return
            state = jax.enable_x64  # pragma: no cover - a jax whose host callbacks cannot be wrapped
            previous = state.get_global()
            state.set_global(True)
            try:
                yield
            finally:
                state.set_global(previous)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """The whole check, in this thread: JAX's thread-local 64-bit scope (where needed) and fn's state put
        back at the end. Python's and NumPy's generators change only in :meth:`window`."""
        scope = enable_float64() if self.needs_x64 else contextlib.nullcontext()
        with scope:
            start = StateSnapshot(_State(self.roots))  # what fn's state holds now: put back on the way out
            _ACTIVE.problems.append(self)
            try:
                self.fixed_values()  # now: the x64 setting of the check is in force, and no JAX trace is running
                yield
            finally:
                _ACTIVE.problems.remove(self)
                start.restore(_holds_tracer)
            self._keep_after_run()

    def guarded(self, fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        """A traced run of ``fn``: where it leaves tracers in the places it can rebind, those are put back at once
        and fn is marked stateful; the first time, :class:`_StatefulFunction` stops the traced path (the
        prepared function's method starts again, eagerly). Once stateful, a run under eager autodiff
        (jax.vjp/jax.linearize at the point) is only put back: its derivative holds."""
        before = StateSnapshot(_State(self.roots))
        eager = self.eager_reason is not None
        try:
            result = fn(*args, **kwargs)
        except InvalidArgumentError as error:
            self._put_back(before)
            if eager or not getattr(error, "gradbridge_tracer_argument", False):
                raise  # under eager autodiff: fn checks values that depend on the point, which cannot be done
            self._mark_eager("fn calls gradbridge.check itself, which needs concrete values: fn is evaluated point "
                             "by point and differentiated eagerly")
            raise _StatefulFunction(self.eager_reason or "") from None
        except Exception:
            if self._put_back(before) and not eager:
                raise _StatefulFunction(self.eager_reason or "") from None
            raise
        if self._put_back(before) and not eager:
            raise _StatefulFunction(self.eager_reason or "")
        return result

    def _put_back(self, before: StateSnapshot) -> bool:
        """Whether a traced run left tracers in fn's state; if so they are put back and fn marked stateful."""
        leaked = _State(self.roots, snapshot=False).watched
        if not leaked:
            return False
        before.restore(_holds_tracer)
        paths = sorted({path for path, _ in leaked})
        shown = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
        self._mark_eager(f"fn rebinds JAX arrays in its own state while it runs ({shown}): under jax.jit/jax.vmap "
                         "that stores tracers there, so fn is evaluated point by point and differentiated eagerly, "
                         "and its state is put back as it was after the check")
        return True

    def _mark_eager(self, reason: str) -> None:
        if self.eager_reason is None:
            self.eager_reason = reason
            if self._compiled is not None:
                self._compiled[0].eager_reason = reason  # the next check of fn in this state starts eagerly

    def eager(self) -> bool:
        """Whether fn must run eagerly: it left tracers in its state in this check or in an earlier one of the
        same compiled entry."""
        if self.eager_reason is None and self._compiled is not None and self._compiled[0].eager_reason is not None:
            self.eager_reason = self._compiled[0].eager_reason
        return self.eager_reason is not None

    def _keep_after_run(self) -> None:
        """Keep the compiled entries of the state this check started from also under the state fn left
        behind, where the two differ in ints only (a trace counter): the next check starts from it."""
        if self._key is None:
            return
        try:
            environment = _Fingerprint(self.spec.fn).token
        except (Uncacheable, TypeError, RecursionError):
            return
        if _CACHE.keep_after_run(self.spec.fn, self._key[1], environment):
            self._key = (self._key[0], environment)

    def fixed_values(self) -> List[Any]:
        """All leaves as ``fn`` sees them when nothing is perturbed: unchecked floating leaves as float64
        copies, everything else (ints, keys, static values) the user's own object. Built on entering the
        session, outside any trace (an array made inside ``jax.jit`` would be a tracer that must not escape)."""
        if self._fixed is None:
            fixed = list(self.values)
            for i, c in enumerate(self.candidates):
                if c.floating and i not in self.chosen:
                    own = np.asarray(c.value)  # promote=False: a copy in its own dtype
                    fixed[self.positions[i]] = jnp.asarray(own.astype(np.float64) if self.promote else own.copy())
            self._fixed = fixed
        return self._fixed

    def call(self, parts: Sequence[Any]) -> jax.Array:
        """Run ``fn`` with the checked leaves replaced by ``parts`` (one array per leaf, in leaf order);
        returns the flat float64 output."""
        values = list(self.fixed_values())
        for leaf, i, part, dtype in zip(self.leaves, self.chosen, parts, self.leaf_dtypes):
            part = jnp.reshape(part, leaf.shape)
            values[self.positions[i]] = part if dtype is None else part.astype(dtype)  # exact: points are rounded
        args = tuple(jax.tree_util.tree_unflatten(a.treedef, values[a.start:a.start + a.count]) for a in self.arguments)
        traced = any(isinstance(part, _Tracer) for part in parts)
        return self._flatten_output(_call_fn(self.spec.fn, args, self.spec.kwargs, traced))

    def split(self, x: Any) -> List[Any]:
        """The flat vector ``x`` cut into one array per checked leaf, in the leaf's shape."""
        return [jnp.reshape(x[leaf.offset:leaf.offset + leaf.size], leaf.shape) for leaf in self.leaves]

    def _flatten_output(self, result: Any) -> jax.Array:
        return _output_sink_flatten(result, self)

    def compiled(self) -> Tuple[_Compiled, Tuple[Any, ...]]:
        """The compiled pieces for this check (from the cache when an earlier check had the same function
        and key) and the arguments passed to them besides the checked leaves: every array leaf that is
        not checked, as ``fn`` sees it. Called inside the session (the x64 mode is part of the key)."""
        if self._compiled is None:
            self._compiled = self._find_compiled()
        return self._compiled

    def _find_compiled(self) -> Tuple[_Compiled, Tuple[Any, ...]]:
        fixed = self.fixed_values()
        checked = {self.positions[i] for i in self.chosen}
        # unchecked floating leaves (float64 copies, or own-dtype copies) are arguments of the compiled code;
        # integer, boolean and key arrays stay the user's objects, closed over as before and keyed by value
        dynamic = [self.positions[i] for i, c in enumerate(self.candidates) if c.floating and i not in self.chosen]
        dyn = tuple(fixed[pos] for pos in dynamic)
        fn = self.spec.fn
        try:
            static = {pos: _constant_token(value) if _is_array(value) else _static_token(value)
                      for pos, value in enumerate(fixed) if pos not in checked and pos not in dynamic}
            structure = (tuple(a.treedef for a in self.arguments),
                         tuple(("checked",) if pos in checked else static[pos] if pos in static
                               else ("array", tuple(np.shape(fixed[pos])), str(fixed[pos].dtype))
                               for pos in range(len(fixed))),
                         tuple(self.chosen),
                         tuple((leaf.shape, str(dtype)) for leaf, dtype in zip(self.leaves, self.leaf_dtypes)),
                         tuple(sorted((str(k), _static_token(v)) for k, v in self.spec.kwargs.items())),
                         self.promote, self.needs_x64, bool(jax.config.jax_enable_x64))
            fingerprint: Optional[_Fingerprint] = _Fingerprint(fn)  # before the check first runs fn
            key: Optional[Tuple[Any, Any]] = (structure, fingerprint.token)
            hash(key)
        except (Uncacheable, TypeError, RecursionError):
            key, fingerprint = None, None
        if key is not None:
            entry = _CACHE.get(fn, key, keep=_Compiled.alive)
            if entry is not None:
                self._key = key
                return entry, dyn
        entry = _Compiled(self._traced_call(dynamic, checked, fn if key is None else None),
                          [(leaf.offset, leaf.size, leaf.shape) for leaf in self.leaves], fingerprint)
        if key is not None and _CACHE.put(fn, key, entry):
            self._key = key
        return entry, dyn

    def _traced_call(self, dynamic: List[int], checked: set, strong_fn: Any) -> Callable[..., jax.Array]:
        """``call`` as a function of the checked parts and the other array leaves (``dyn``), holding neither
        the user's arrays nor (when cached) ``fn`` itself."""
        get_fn = (lambda: strong_fn) if strong_fn is not None else weak_callable(self.spec.fn)
        template = [None if pos in checked or pos in dynamic else value for pos, value in enumerate(self.values)]
        positions = [self.positions[i] for i in self.chosen]
        leaf_dtypes = list(self.leaf_dtypes)
        shapes = [leaf.shape for leaf in self.leaves]
        arguments = list(self.arguments)
        kwargs = dict(self.spec.kwargs) if strong_fn is None else self.spec.kwargs
        holder: List[Any] = []

        def call(parts: Sequence[jax.Array], dyn: Sequence[Any]) -> jax.Array:
            values = list(template)
            for pos, value in zip(dynamic, dyn):
                values[pos] = value
            for pos, part, dtype, shape in zip(positions, parts, leaf_dtypes, shapes):
                part = jnp.reshape(part, shape)
                values[pos] = part if dtype is None else part.astype(dtype)
            args = tuple(jax.tree_util.tree_unflatten(a.treedef, values[a.start:a.start + a.count])
                         for a in arguments)
            fn = get_fn()
            if fn is None:  # pragma: no cover - the check holds fn while it runs
                raise RuntimeError("the checked function was garbage-collected")
            return _output_sink_flatten(_call_fn(fn, args, kwargs, True), holder[0])

        def bind(entry: _Compiled) -> None:
            holder.append(entry)

        call.bind = bind  # type: ignore[attr-defined]
        return call


class JaxPrepared(ProblemBackedFunction):
    """A JAX function of the checked leaves (one array per leaf, in leaf order) to a flat float64 output."""

    analytic_source = "JAX autodiff (jax.vjp / jax.linearize: your custom_vjp / custom_jvp rules and JAX's own)"

    def __init__(self, problem: JaxProblem, function: Callable[..., jax.Array], x0: np.ndarray,
                 outputs: Optional[List[LeafSpec]] = None,
                 compiled: Optional[Callable[[], Tuple[_Compiled, Any]]] = None) -> None:
        self.problem = problem
        self.function = function  # of the checked parts, for the per-check path
        self._compiled = compiled  # the compiled pieces kept across checks, and their extra arguments
        self.leaves = problem.leaves
        self.x0 = x0
        if problem.promote:
            self.notes = promotion_notes(problem.leaves)
            self.working_eps: Optional[float] = None
        else:
            self.working_eps, note = own_precision(problem.leaves)
            self.notes = [note] if note else []
        self._undefined: Dict[str, Dict[str, str]] = {"rev": {}, "fwd": {}}
        self._last_mode = "rev"
        self._outputs = outputs
        self._batched: Optional[Callable[[jax.Array], jax.Array]] = None
        self._apply = jax.jit(_apply_vmapped)
        self._pointwise_evaluation = False
        self._pointwise_linear = False
        self._pullbacks: Optional[List[LinearMap]] = None
        self._pushforwards: Optional[List[LinearMap]] = None
        self._transposes: Optional[_TransposedPlan] = None  # the per-check path's transposed VJPs

    @property
    def undefined_gradients(self) -> Dict[str, str]:
        """``{leaf name: reason}`` for the mode (reverse or forward) whose derivative was computed last.

        JAX may define one mode and not the other for the same input (``while_loop`` has forward mode but
        no reverse mode), while the core reads one dict per check; it reads it right after computing the
        rows' derivatives, so answering for the latest mode gives each row the record of its own mode.
        """
        return self._undefined[self._last_mode]

    def _flat(self, x: jax.Array) -> jax.Array:
        return self.function(*self.problem.split(x))

    def _parts0(self) -> List[jax.Array]:
        return self.problem.split(jnp.asarray(self.x0, dtype=plumbing_dtype()))

    def _note(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)

    def _eager(self) -> bool:
        """Whether fn is stateful (see :class:`_State`): evaluated point by point and differentiated eagerly."""
        if self.problem.eager_reason is None and self._compiled is not None:
            self._compiled()  # the entry kept from an earlier check may know it already
        if self.problem.eager():
            self._note(self.problem.eager_reason or "")
            return True
        return False

    @_process.runs_user_code
    @_eager_on_leak
    def evaluate(self, points: np.ndarray) -> np.ndarray:
        x = jnp.asarray(points, dtype=plumbing_dtype())
        result = None
        if self._eager():
            self._pointwise_evaluation = True
        if not self._pointwise_evaluation and self._compiled is not None:
            entry, dyn = self._compiled()
            if not entry.evaluation_fails:
                try:
                    self.problem.rng.reseed()
                    result = np.asarray(entry.evaluate(x, dyn), dtype=np.float64)
                except GradbridgeError:
                    raise
                except Exception:  # the per-check path below retries and reports it as before
                    entry.evaluation_fails = True
                if result is not None and self._outputs is None and self.problem.outputs is None:
                    self.problem.outputs = entry.outputs
                    self.problem.low_precision_outputs = entry.low_precision_outputs
        if result is None and not self._pointwise_evaluation:
            if self._batched is None:
                self._batched = jax.jit(jax.vmap(self._flat))
            try:
                self.problem.rng.reseed()
                result = np.asarray(self._batched(x), dtype=np.float64)
            except GradbridgeError:
                raise
            except Exception as exc:  # not traceable under jit/vmap: fall back to plain calls, which may work
                self._pointwise_evaluation = True
                self._note(f"fn could not run under jax.jit(jax.vmap(...)) ({_first_line(exc)}); "
                           "it is evaluated point by point")
        if result is None:
            rows = []
            for k, point in enumerate(x):
                self.problem.rng.reseed()
                try:
                    rows.append(np.asarray(self._flat(point), dtype=np.float64))
                except Exception as exc:
                    if (self.problem.low_precision and not isinstance(exc, GradbridgeError)
                            and np.array_equal(points[k], self.x0)):
                        # fn fails on the float64 copies at the user's own point: it may only run in its own dtypes
                        raise FunctionEvaluationError(
                            f"fn raised {_first_line(exc)} (at the unperturbed input). "
                            f"{promotion_hint(self.problem.low_precision)}") from exc
                    raise
            result = np.stack(rows)
        if not self.problem.promote and self._outputs is None:  # the outputs' dtypes are known now
            refresh_note(self.notes, self.leaves, self.output_specs)
        if self.problem.promote and self.problem.low_precision_outputs:
            self._note(f"fn computes {', '.join(self.problem.low_precision_outputs)} below float64: "
                       "the check's precision is limited by that")
        return result

    @_process.runs_user_code
    @_eager_on_leak
    def evaluate_edits(self, positions: np.ndarray, values: np.ndarray) -> np.ndarray:
        """``evaluate`` of the copies of ``x0`` with element ``positions[k]`` set to ``values[k]``; once the
        compiled evaluation has run, the points are built inside it (no NumPy points to write and copy)."""
        known = self._outputs is not None or self.problem.outputs is not None
        if (known and len(positions) > 1 and not self._pointwise_evaluation and self._compiled is not None
                and not self._eager()):
            entry, dyn = self._compiled()
            if not entry.evaluation_fails:
                dtype = plumbing_dtype()
                try:
                    self.problem.rng.reseed()
                    return np.asarray(entry.evaluate_edits(jnp.asarray(self.x0, dtype=dtype), jnp.asarray(positions),
                                                           jnp.asarray(values, dtype=dtype), dyn), dtype=np.float64)
                except GradbridgeError:
                    raise
                except Exception:  # evaluate below runs the same points its own way, and reports what fn raises
                    pass
        points = np.empty((len(positions), len(self.x0)))
        points[:] = self.x0
        points[np.arange(len(positions)), positions] = values
        return self.evaluate(points)

    def _apply_batched(self, function: Callable[..., Any], *batched: jax.Array) -> Any:
        """``function`` on every row of ``batched`` (jit + vmap; point by point if that cannot trace)."""
        if not self._pointwise_linear:
            try:
                return self._apply(function, *batched)
            except GradbridgeError:
                raise
            except Exception as exc:
                self._pointwise_linear = True
                self._note(f"the derivative of fn could not run under jax.jit(jax.vmap(...)) ({_first_line(exc)}); "
                           "it is applied vector by vector")
        results = [function(*(b[i] for b in batched)) for i in range(len(batched[0]))]
        return jax.tree_util.tree_map(lambda *rows: jnp.stack(rows), *results)

    def _linear_maps(self, build: Callable[[Callable[..., jax.Array], Sequence[jax.Array]], Callable[..., Any]],
                     probe_inputs: Callable[[List[int]], Sequence[jax.Array]], mode: str) -> List[LinearMap]:
        """Build the derivative map at ``x0`` over all leaves at once, or, where JAX has no derivative
        rule for some input, one map per leaf, recording the leaves JAX cannot differentiate.

        ``build(function, primals)`` returns the map; each map is called once on ``probe_inputs`` so that
        errors JAX raises only when the map is applied (transpose rules) surface here.
        """
        parts0 = self._parts0()
        everything = list(range(len(self.leaves)))
        try:
            linear = build(self.function, parts0)
            linear(*probe_inputs(everything))
            return [(everything, linear)]
        except Exception as exc:
            _reraise_unless_no_derivative(exc, mode)
        maps: List[LinearMap] = []
        for k, leaf in enumerate(self.leaves):
            def only(part: jax.Array, k: int = k) -> jax.Array:
                return self.function(*parts0[:k], part, *parts0[k + 1:])

            try:
                linear = build(only, [parts0[k]])
                linear(*probe_inputs([k]))
            except Exception as exc:
                _reraise_unless_no_derivative(exc, mode)
                self._undefined[mode][leaf.name] = f"JAX cannot differentiate fn with respect to it: {_first_line(exc)}"
                continue
            maps.append(([k], linear))
        return maps

    def _mark_symbolic_zeros(self, maps: List[LinearMap], probe_inputs: Callable[[List[int]], Sequence[jax.Array]],
                             mode: str) -> None:
        """Record leaves whose derivative JAX builds as a constant zero (it depends on no input of the map).

        For a VJP (``mode="rev"``) each output is one leaf's gradient; for a JVP each input is one leaf's
        tangent. A constant that is not zero is left alone: that is a wrong rule, not a missing one.
        """
        for indices, linear in maps:
            inputs = probe_inputs(indices)
            try:
                closed = jax.make_jaxpr(linear)(*inputs)
                values = jax.tree_util.tree_leaves(linear(*inputs))
            except Exception:  # the analysis is a refinement; without it rows are plain pass/fail
                continue
            dependencies = _dependencies(closed.jaxpr)
            if mode == "rev":
                constant = [not dependencies[j] and not np.any(np.asarray(values[j])) for j in range(len(indices))]
            else:
                used = frozenset().union(*dependencies)
                constant = [j not in used for j in range(len(indices))]
            for j, k in enumerate(indices):
                if constant[j]:
                    self._undefined[mode].setdefault(self.leaves[k].name, _SYMBOLIC_ZERO)

    def _output_size(self) -> int:
        return sum(spec.size for spec in self.output_specs)

    def _fast_linear(self, mode: str, probe: Callable[[List[int]], Sequence[jax.Array]]) -> Optional[Tuple[Any, ...]]:
        """The compiled linear maps of ``mode`` (built once per cache entry), or None: use the per-check path."""
        if self._compiled is None or (self._pullbacks if mode == "rev" else self._pushforwards) is not None:
            return None
        if self._eager():
            return None
        entry, dyn = self._compiled()
        parts0 = self._parts0()
        plan = entry.linear.get(mode)
        if plan is None:
            plan = entry.linear[mode] = _build_linear(entry, parts0, dyn, probe, mode)
        return None if plan is False else (entry, plan, dyn, parts0)

    def _apply_fast(self, mode: str, probe: Callable[[List[int]], Sequence[jax.Array]],
                    inputs: Callable[[List[int]], Sequence[jax.Array]]) -> Optional[List[Tuple[List[int], Any]]]:
        """``[(leaf indices, batched result)]`` from the compiled maps, recording the leaves without a
        derivative; None where the per-check path must run instead."""
        fast = self._fast_linear(mode, probe)
        if fast is None:
            return None
        entry, plan, dyn, parts0 = fast
        try:
            results = [(indices, batched(parts0, dyn, *inputs(indices))) for indices, batched, _ in plan.maps]
            undefined = self._plan_undefined(plan, parts0, dyn, probe, mode)
        except GradbridgeError:
            raise
        except Exception:  # the per-check path retries, falls back or reports it as before
            entry.linear[mode] = False
            return None
        for name, reason in undefined.items():
            self._undefined[mode].setdefault(name, reason)
        return results

    def _plan_undefined(self, plan: _LinearPlan, parts0: List[jax.Array], dyn: Any,
                        probe: Callable[[List[int]], Sequence[jax.Array]], mode: str) -> Dict[str, str]:
        """``{leaf name: reason}`` for the leaves a compiled plan has no derivative for: those JAX cannot
        differentiate, and those whose derivative is a symbolic zero (a nonzero constant is a wrong rule)."""
        undefined = {self.leaves[k].name: reason for k, reason in plan.undefined.items()}
        for m, j in plan.constant:
            indices, _, single = plan.maps[m]
            if mode == "rev" and np.any(np.asarray(single(parts0, dyn, *probe(indices))[j])):
                continue  # a constant that is not zero: a wrong rule, not a missing one
            undefined.setdefault(self.leaves[indices[j]].name, _SYMBOLIC_ZERO)
        return undefined

    def _zero_cotangent(self, _: List[int]) -> Sequence[jax.Array]:
        """The probe input of the VJP maps: one zero cotangent."""
        return [jnp.zeros(self._output_size(), dtype=plumbing_dtype())]

    def _per_check_pullbacks(self) -> List[LinearMap]:
        """The VJP maps of the per-check path (built once, recording the leaves without a derivative)."""
        if self._pullbacks is None:
            self._pullbacks = self._linear_maps(lambda f, primals: jax.vjp(f, *primals)[1], self._zero_cotangent,
                                                "rev")
            self._mark_symbolic_zeros(self._pullbacks, self._zero_cotangent, "rev")
        return self._pullbacks

    @_process.runs_user_code
    @_eager_on_leak
    def vjp(self, cotangents: np.ndarray) -> np.ndarray:
        self._last_mode = "rev"
        v = jnp.asarray(cotangents, dtype=plumbing_dtype())
        gradients = np.zeros((len(v), len(self.x0)))
        fast = self._apply_fast("rev", self._zero_cotangent, lambda _: [v])
        if fast is not None:
            for indices, pulled in fast:
                for k, g in zip(indices, pulled):
                    gradients[:, self.leaves[k].slice] = np.asarray(g, dtype=np.float64).reshape(len(v), -1)
            return gradients
        for indices, pullback in self._per_check_pullbacks():
            pulled = self._apply_batched(pullback, v)
            for k, g in zip(indices, pulled):
                gradients[:, self.leaves[k].slice] = np.asarray(g, dtype=np.float64).reshape(len(v), -1)
        return gradients

    # --- transposed reverse mode: J t by transposing the VJP u -> J^T u ---

    @_process.runs_user_code
    @_eager_on_leak
    def vjp_transposed(self, tangents: np.ndarray) -> np.ndarray:
        """``J t`` for each row of the (k, n) ``tangents``: (k, m), with ``J`` exactly the Jacobian :meth:`vjp`
        implements (custom_vjp bwd rules included), never forward-mode rules: the VJP ``u -> J^T u`` at
        ``x0`` transposed with ``jax.linear_transpose``, vmapped and jitted, compiled once per cache entry
        like the VJP maps. Leaves without a reverse-mode derivative get zero columns, as :meth:`vjp` gives
        them zero rows. Raises ModeUnsupportedError where JAX cannot transpose the VJP (a bwd not linear in
        its cotangent, a pure_callback applied to it)."""
        self._last_mode = "rev"
        t = jnp.asarray(np.asarray(tangents, dtype=np.float64).reshape(len(tangents), -1), dtype=plumbing_dtype())
        pushed = np.zeros((len(t), self._output_size()))

        def parts(indices: List[int]) -> List[jax.Array]:
            return [jnp.reshape(t[:, self.leaves[k].slice], (len(t),) + self.leaves[k].shape) for k in indices]

        results = self._transposed_fast(parts)
        if results is None:
            results = self._transposed_per_check(parts)
        for result in results:
            pushed += np.asarray(result, dtype=np.float64).reshape(len(t), -1)
        return pushed

    def _transposed_fast(self, parts: Callable[[List[int]], List[jax.Array]]) -> Optional[List[Any]]:
        """The transposed VJPs of each leaf group from the compiled maps kept across checks (traced once per
        entry), recording the leaves without a derivative as :meth:`vjp` does; None: use the per-check path."""
        fast = self._fast_linear("rev", self._zero_cotangent)
        if fast is None:
            return None
        entry, plan, dyn, parts0 = fast
        transposed = entry.linear.get("rev_t")
        if transposed is None:
            transposed = entry.linear["rev_t"] = _build_transposed(entry, plan, parts0, dyn)
        if transposed is False:
            return None
        if transposed.error is not None:
            raise ModeUnsupportedError(transposed.error)
        try:
            undefined = self._plan_undefined(plan, parts0, dyn, self._zero_cotangent, "rev")
            results = [batched(parts0, dyn, *parts(indices)) for indices, batched in transposed.maps]
        except GradbridgeError:
            raise
        except Exception:  # the per-check path retries, falls back or reports it
            entry.linear["rev_t"] = False
            return None
        for name, reason in undefined.items():
            self._undefined["rev"].setdefault(name, reason)
        return results

    def _transposed_per_check(self, parts: Callable[[List[int]], List[jax.Array]]) -> List[Any]:
        """The transposed VJPs of each leaf group of the per-check VJP maps, applied with jit + vmap."""
        if self._transposes is None:
            self._transposes = self._transpose_pullbacks(self._per_check_pullbacks())
        if self._transposes.error is not None:
            raise ModeUnsupportedError(self._transposes.error)
        return [self._apply_batched(jax.tree_util.Partial(_apply_transposed, transposed), *parts(indices))
                for indices, transposed in self._transposes.maps]

    def _transpose_pullbacks(self, pullbacks: List[LinearMap]) -> _TransposedPlan:
        """``jax.linear_transpose`` of each VJP map, applied once to zero tangents (JAX raises only when a
        transposed map is applied)."""
        cotangent = jax.ShapeDtypeStruct((self._output_size(),), plumbing_dtype())
        maps: List[Tuple[List[int], Callable[..., Any]]] = []
        for indices, pullback in pullbacks:
            zeros = tuple(jnp.zeros(self.leaves[k].shape, dtype=plumbing_dtype()) for k in indices)
            try:
                transposed = jax.linear_transpose(pullback, cotangent)
                transposed(zeros)
            except GradbridgeError:
                raise
            except Exception as exc:
                return _TransposedPlan([], _not_transposable(exc))
            maps.append((indices, transposed))
        return _TransposedPlan(maps)

    @_process.runs_user_code
    @_eager_on_leak
    def jvp(self, tangents: np.ndarray) -> np.ndarray:
        def zero_tangents(indices: List[int]) -> Sequence[jax.Array]:
            return [jnp.zeros(self.leaves[k].shape, dtype=plumbing_dtype()) for k in indices]

        self._last_mode = "fwd"
        u = jnp.asarray(tangents, dtype=plumbing_dtype())

        def parts(indices: List[int]) -> List[jax.Array]:
            return [jnp.reshape(u[:, self.leaves[k].slice], (len(u),) + self.leaves[k].shape) for k in indices]

        pushed = np.zeros((len(u), self._output_size()))
        fast = self._apply_fast("fwd", zero_tangents, parts)
        if fast is not None:
            for _, result in fast:
                pushed += np.asarray(result, dtype=np.float64).reshape(len(u), -1)
            return pushed
        if self._pushforwards is None:
            self._pushforwards = self._linear_maps(lambda f, primals: jax.linearize(f, *primals)[1],
                                                   zero_tangents, "fwd")
            self._mark_symbolic_zeros(self._pushforwards, zero_tangents, "fwd")
        for indices, pushforward in self._pushforwards:
            pushed += np.asarray(self._apply_batched(pushforward, *parts(indices)),
                                 dtype=np.float64).reshape(len(u), -1)
        return pushed

    @_process.runs_user_code
    @_eager_on_leak
    def gradient_function(self, cotangent: np.ndarray) -> "JaxPrepared":
        v = jnp.asarray(cotangent, dtype=plumbing_dtype())
        first = self.function

        def gradient(*parts: jax.Array) -> jax.Array:
            pulled = jax.vjp(first, *parts)[1](v)
            return jnp.concatenate([jnp.ravel(g) for g in pulled])

        parts0 = self._parts0()
        zeros = jnp.zeros(len(self.x0), dtype=plumbing_dtype())
        compiled = None
        error: Optional[BaseException] = None
        probed = False
        if self._compiled is not None and not self._eager():
            entry, dyn = self._compiled()
            child = entry.gradient_entry()
            if not child.gradient_probed:  # can JAX differentiate the gradient? (traced once per entry)
                def probe(parts: Sequence[jax.Array], dyn2: Any, z: jax.Array) -> Any:
                    return jax.vjp(lambda *p: child.function(list(p), dyn2), *parts)[1](z)

                try:
                    jax.make_jaxpr(probe)(parts0, (dyn, v), zeros)
                    child.gradient_probed = True
                except GradbridgeError:
                    raise
                except Exception as exc:
                    if _mentions(exc, _NO_DERIVATIVE_HINTS) or _mentions(exc, _FORWARD_UNSUPPORTED_HINTS):
                        child.gradient_error, child.gradient_probed = exc, True
            probed, error = child.gradient_probed, child.gradient_error
            compiled = (lambda: (child, (dyn, v)))
        if not probed:
            try:  # can JAX differentiate the gradient? (errors of other kinds surface when it is evaluated)
                jax.vjp(gradient, *parts0)[1](zeros)
            except Exception as exc:
                if _mentions(exc, _NO_DERIVATIVE_HINTS) or _mentions(exc, _FORWARD_UNSUPPORTED_HINTS):
                    error = exc
                elif isinstance(exc, GradbridgeError):
                    raise
        if error is not None:
            raise ModeUnsupportedError(
                f"order=2: JAX cannot differentiate the gradient of fn: {_first_line(error)}") from error
        outputs = gradient_output_specs(self.leaves)
        return JaxPrepared(self.problem, gradient, self.x0, outputs=outputs, compiled=compiled)


class JaxAdapter:
    """Adapter for JAX."""

    name = "jax"
    module_name = "jax"
    install_hint = 'pip install "gradbridge[jax]"'

    #: JAX's registered pytree nodes, for backend detection (arguments are flattened by JAX's own registry)
    pytree_node = staticmethod(_registered_node)

    def clear_cache(self) -> None:
        """Drop the traces, compiled functions and batching decisions kept across checks."""
        clear_cache()

    def cache_size(self) -> int:
        return cache_size()

    def owns(self, value: Any) -> bool:
        """JAX arrays (PRNG keys included), ``custom_vjp``/``custom_jvp`` functions and ``jax.jit`` functions."""
        if isinstance(value, (jax.Array, jax.custom_vjp, jax.custom_jvp)):
            return True
        return type(value).__name__ == "PjitFunction"

    def version(self) -> str:
        return jax.__version__

    def probe_float64(self) -> Tuple[bool, str]:
        """Whether ``jax.grad`` computes in float64 inside the check's 64-bit scope, and whether the
        user's ``jax_enable_x64`` setting comes back unchanged (``gradbridge backends``)."""
        before = bool(jax.config.jax_enable_x64)
        with enable_float64():
            gradient = jax.grad(lambda x: jnp.sum(x * x))(jnp.asarray([1.0, 2.0], dtype=jnp.float64))
            ok = gradient.dtype == jnp.float64 and bool(jnp.allclose(gradient, jnp.asarray([2.0, 4.0])))
        restored = bool(jax.config.jax_enable_x64) == before
        note = (f"gradbridge enables jax_enable_x64 for the duration of a check and restores it (yours is "
                f"{'on' if before else 'off'}{'' if restored else ', NOT restored by the probe'})")
        return ok and restored, note if ok else f"jax.grad in the 64-bit scope gave {gradient.dtype}; {note}"

    def prepare(self, spec: CheckSpec) -> JaxPrepared:
        if spec.grad is not None:
            raise InvalidArgumentError(
                "grad: JAX differentiates fn itself; write a custom gradient as a jax.custom_vjp or jax.custom_jvp "
                "rule and pass the function, or use backend='numpy' to check a hand-written NumPy gradient")
        if spec.params is not None:
            raise InvalidArgumentError(
                "params: JAX functions are pure, so parameters they close over cannot be swapped for perturbed "
                "copies; pass the parameter pytree as an argument instead (check(loss, params, x)): every floating "
                "leaf is checked and named by its path, e.g. params['dense1']['w']")
        arguments: List[_Argument] = []
        values: List[Any] = []
        candidates: List[Candidate] = []
        unchecked: List[Unchecked] = []
        positions: List[int] = []
        for index, (name, arg) in enumerate(zip(spec.arg_names, spec.args)):
            cycle = self_reference(arg, name)
            if cycle is not None:  # JAX's flattening would recurse without end
                raise InvalidArgumentError(
                    f"args: {cycle[0]} is {cycle[1]} itself (a structure that contains itself), which JAX's pytree "
                    "flattening cannot walk; pass the arrays in a structure without cycles")
            pairs, treedef = jax.tree_util.tree_flatten_with_path(arg)
            arguments.append(_Argument(treedef, len(values), len(pairs)))
            for path, value in pairs:
                if isinstance(value, _Tracer):
                    raise _tracer_error("args", name + jax.tree_util.keystr(path))
                if _is_array(value):
                    candidates.append(Candidate(name + jax.tree_util.keystr(path), value, tuple(np.shape(value)),
                                                _dtype_name(value), _floating(value), "input", index,
                                                unchecked_reason=COMPLEX_REASON if _complex(value) else ""))
                    positions.append(len(values))
                else:  # arrays JAX's registry does not reach are passed through: say so
                    unchecked.extend(hidden_arrays(value, name + jax.tree_util.keystr(path), _hidden_reason(value)))
                values.append(value)
        for key, value in spec.kwargs.items():
            if _holds_tracer(value):
                raise _tracer_error("kwargs", f"{key!r} (or something inside it)")
        leaked = _State([("fn", spec.fn)], snapshot=False).watched
        if leaked:
            raise _tracer_error("fn", f"a value fn reads ({leaked[0][0]})")
        if _staging():
            raise _tracer_error("fn", None)
        leaves, chosen = layout_leaves(candidates, spec.wrt, unchecked)
        problem = JaxProblem(spec, arguments, values, candidates, positions, leaves, chosen)
        x0 = np.concatenate([np.asarray(candidates[i].value, dtype=np.float64).reshape(-1) for i in chosen])
        prepared = JaxPrepared(problem, lambda *parts: problem.call(parts), x0, compiled=problem.compiled)
        prepared.notes.extend(unchecked_notes(candidates, chosen, unchecked))
        return prepared

    # --- gb.compare (see gradbridge._adapter.CompareAdapter) ---

    def to_numpy(self, value: Any) -> Optional[np.ndarray]:
        if not isinstance(value, jax.Array) or _is_key(value):
            return None
        return np.array(value, copy=True)

    def from_numpy(self, array: np.ndarray) -> jax.Array:
        """A JAX array of ``array``'s dtype: made in the 64-bit scope, so float64 stays float64 (the user's
        ``jax_enable_x64`` setting is untouched afterwards)."""
        with enable_float64():
            return jnp.asarray(np.array(array, copy=True))

    def expected_params(self, fn: Callable[..., Any]) -> Optional[ExpectedParams]:
        return None  # JAX functions are pure: parameters always come as the dict argument (the pytree)

    def bind_params(self, fn: Callable[..., Any], params: Optional[Mapping[str, np.ndarray]],
                    grad: Optional[Callable[..., Any]] = None) -> ParamBinding:
        """The flat dict ``{name: float64 array}`` (the parameter pytree) as ``fn``'s first argument."""
        if params is None:
            return ParamBinding(fn=fn)
        native = {name: self.from_numpy(array) for name, array in params.items()}
        pairs, _ = jax.tree_util.tree_flatten_with_path(native)  # dict keys come sorted
        names = {"params" + jax.tree_util.keystr(path): path[0].key for path, _ in pairs}
        return ParamBinding(fn=fn, leading_args=(native,), leading_names=("params",), names=names)


ADAPTER = JaxAdapter()
