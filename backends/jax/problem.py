"""The problem of one JAX check: the argument trees, the checked leaves, calling fn, the session, the compiled key.

Invariant: fn always receives the user's own objects for everything that is not checked (ints, keys, static
values: the very same object at every evaluation; unchecked floating leaves: one float64 copy, or a copy in their
own dtype with ``promote=False``), and each checked leaf cut from the flat vector in its own shape (cast to its own
dtype with ``promote=False``: exact, as the core has rounded the points); inside a session the x64 mode, Python's
and NumPy's generators and fn's state are the check's, and on leaving it, also by raising, all are as the session
found them. A compiled entry is looked up under a key of everything that shapes the trace, or not cached at all.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from gradbridge import _process
from gradbridge._adapter import CheckSpec, LeafSpec
from gradbridge._errors import FunctionEvaluationError

from ..common.fingerprint import Uncacheable, digest, weak_callable
from ..common.layout import Candidate
from ..common.lowprec import low_precision_names
from ..common.outputs import output_specs
from ..common.rng import SharedRandomState
from .cache import CACHE, JaxFingerprint
from .compat import Tracer
from .compiled import Compiled
from .state import ACTIVE, StateGuard, call_fn, holds_tracer, snapshot
from .x64 import enable_float64, plumbing_dtype, process_x64


def is_array(value: Any) -> bool:
    return isinstance(value, (jax.Array, np.ndarray, np.generic))


def is_key(value: Any) -> bool:
    return isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jax.dtypes.prng_key)


def is_floating(value: Any) -> bool:
    return is_array(value) and not is_key(value) and bool(jnp.issubdtype(value.dtype, jnp.floating))


def is_complex(value: Any) -> bool:
    return is_array(value) and not is_key(value) and bool(jnp.issubdtype(value.dtype, jnp.complexfloating))


def dtype_name(value: Any) -> str:
    return str(value.dtype)


_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, type(Ellipsis), np.dtype)


def static_token(value: Any, depth: int = 0) -> Any:
    """A hashable token for a non-array value fn receives, equal only for equal immutable values."""
    if isinstance(value, _IMMUTABLE) or isinstance(value, np.generic) and value.dtype.kind in "biufc":
        return (type(value), value)
    if isinstance(value, tuple) and depth < 4:
        return (type(value), tuple(static_token(v, depth + 1) for v in value))
    raise Uncacheable(type(value).__name__)


def constant_token(value: Any) -> Any:
    """A token for an integer, boolean or key array fn receives as is (it is baked into the trace): its
    type, shape, dtype and a digest of its contents."""
    data = jax.random.key_data(value) if is_key(value) else value
    array = np.asarray(data)
    if array.dtype.hasobject or array.dtype.kind not in "biufc":
        raise Uncacheable("array of dtype " + str(array.dtype))
    return ("constant", type(value).__name__, tuple(np.shape(value)), str(value.dtype), digest(array))


def output_sink_flatten(result: Any, sink: Any) -> jax.Array:
    """``fn``'s output as one flat vector in the plumbing dtype; records the output layout in ``sink`` once."""
    pairs, _ = jax.tree_util.tree_flatten_with_path(result)
    found = [("out" + jax.tree_util.keystr(path), real_view(value) if is_complex(value) else value,
              dtype_name(value)) for path, value in pairs if is_floating(value) or is_complex(value)]
    if not found:
        if is_array(result):
            got = f"an array of dtype {dtype_name(result)}"
        else:
            got = type(result).__name__ + (" with no floating array in it" if pairs else "")
        raise FunctionEvaluationError(
            f"fn: expected a floating-point array (or a pytree of them) as output, got {got}")
    if sink.outputs is None:  # shapes seen inside jax.vmap are those of one point
        sink.outputs = output_specs([(name, tuple(value.shape), dtype) for name, value, dtype in found])
        sink.low_precision_outputs = [name for name, value, _ in found if value.dtype != jnp.float64]
    return jnp.concatenate([jnp.ravel(jnp.asarray(value)).astype(plumbing_dtype()) for _, value, _ in found])


def real_view(value: Any) -> jax.Array:
    """A complex array as its real view, shape ``S + (2,)`` (see ``..common.complex``): differentiable, so JAX's
    own complex convention is applied by JAX."""
    return jnp.stack([jnp.real(value), jnp.imag(value)], axis=-1)


def leaf_value(part: Any, shape: Tuple[int, ...], dtype: Any, complex_view: bool) -> Any:
    """A checked leaf as ``fn`` sees it: ``part`` (cut from the flat vector) in the leaf's shape, cast to its own
    dtype with ``promote=False`` (exact: points are rounded), and made complex again for a complex leaf."""
    part = jnp.reshape(part, shape)
    if dtype is not None:
        part = part.astype(dtype)
    return lax.complex(part[..., 0], part[..., 1]) if complex_view else part


@dataclass(frozen=True)
class Argument:
    """Where one top-level argument's pytree leaves sit in the list of all leaves."""

    treedef: Any
    start: int
    count: int


def passed_objects(spec: CheckSpec) -> List[Tuple[str, Any]]:
    """The non-array values fn is passed (pytree leaves of the arguments, keyword arguments), named by path:
    fn gets these very objects at every run, so it can keep state in them."""
    found: List[Tuple[str, Any]] = []
    for name, arg in zip(spec.arg_names, spec.args):
        for path, value in jax.tree_util.tree_flatten_with_path(arg)[0]:
            if not is_array(value):
                found.append((name + jax.tree_util.keystr(path), value))
    found.extend((f"kwargs[{key!r}]", value) for key, value in spec.kwargs.items())
    return found


class JaxProblem(StateGuard):
    """Everything about one JAX check that is fixed: the argument trees, the leaves, the output layout."""

    def __init__(self, spec: CheckSpec, arguments: List[Argument], values: List[Any], candidates: List[Candidate],
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
        self._compiled: Optional[Tuple[Compiled, Tuple[Any, ...]]] = None
        self._key: Optional[Tuple[Any, Any]] = None  # the key the compiled entry is kept under, when cached
        self.promote = spec.promote
        # the dtype each checked leaf takes inside fn: None (the plumbing's float64) or, with promote=False, its own
        self.leaf_dtypes = [None if spec.promote else real_dtype(candidates[i].value.dtype) for i in chosen]
        # checked complex leaves: fn gets the complex array whose real view the leaf is (see ..common.complex)
        self.leaf_complex = [is_complex(candidates[i].value) for i in chosen]
        floating = [c for c in candidates if c.floating]
        self.needs_x64 = spec.promote or any(str(c.dtype) == "float64" for c in floating)
        # promote=True only: the leaves given below float64, named in the hint when fn fails on the copies
        self.low_precision = low_precision_names([(c.name, c.dtype) for c in floating]) if spec.promote else ""
        # where fn can keep state: fn itself and the non-array values it is passed (the same objects every run)
        self.roots: List[Tuple[str, Any]] = [("fn", spec.fn)] + passed_objects(spec)
        self.eager_reason: Optional[str] = None  # why fn is evaluated and differentiated eagerly (see .state)
        # around every call into the user's code: Python's and NumPy's generators (host callbacks, eager
        # NumPy code may draw from them) re-seeded inside and put back, under the one lock
        self.window = _process.Window(self._changed)

    @contextlib.contextmanager
    def _changed(self) -> Iterator[None]:
        """The check's process-wide state for one window (see :mod:`gradbridge._process`)."""
        with self.rng.preserved(), process_x64(self.needs_x64):
            yield

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """The whole check, in this thread: JAX's thread-local 64-bit scope (where needed) and fn's state put
        back at the end. Python's and NumPy's generators change only in :meth:`window`."""
        scope = enable_float64() if self.needs_x64 else contextlib.nullcontext()
        with scope:
            start = snapshot(self.roots)  # what fn's state holds now: put back on the way out
            ACTIVE.problems.append(self)
            try:
                self.fixed_values()  # now: the x64 setting of the check is in force, and no JAX trace is running
                yield
            finally:
                ACTIVE.problems.remove(self)
                start.restore(holds_tracer)
            self._keep_after_run()

    def _keep_after_run(self) -> None:
        """Keep the compiled entries of the state this check started from also under the state fn left
        behind, where the two differ in ints only (a trace counter): the next check starts from it."""
        if self._key is None:
            return
        try:
            environment = JaxFingerprint(self.spec.fn).token
        except (Uncacheable, TypeError, RecursionError):
            return
        if CACHE.keep_after_run(self.spec.fn, self._key[1], environment):
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
                    wide = np.complex128 if np.iscomplexobj(own) else np.float64
                    fixed[self.positions[i]] = jnp.asarray(own.astype(wide) if self.promote else own.copy())
            self._fixed = fixed
        return self._fixed

    def call(self, parts: Sequence[Any]) -> jax.Array:
        """Run ``fn`` with the checked leaves replaced by ``parts`` (one array per leaf, in leaf order);
        returns the flat float64 output."""
        values = list(self.fixed_values())
        for leaf, i, part, dtype, complex_view in zip(self.leaves, self.chosen, parts, self.leaf_dtypes,
                                                      self.leaf_complex):
            values[self.positions[i]] = leaf_value(part, leaf.shape, dtype, complex_view)
        args = tuple(jax.tree_util.tree_unflatten(a.treedef, values[a.start:a.start + a.count]) for a in self.arguments)
        traced = any(isinstance(part, Tracer) for part in parts)
        return output_sink_flatten(call_fn(self.spec.fn, args, self.spec.kwargs, traced), self)

    def split(self, x: Any) -> List[Any]:
        """The flat vector ``x`` cut into one array per checked leaf, in the leaf's shape."""
        return [jnp.reshape(x[leaf.offset:leaf.offset + leaf.size], leaf.shape) for leaf in self.leaves]

    def compiled(self) -> Tuple[Compiled, Tuple[Any, ...]]:
        """The compiled pieces for this check (from the cache when an earlier check had the same function
        and key) and the arguments passed to them besides the checked leaves: every array leaf that is
        not checked, as ``fn`` sees it. Called inside the session (the x64 mode is part of the key)."""
        if self._compiled is None:
            self._compiled = self._find_compiled()
        return self._compiled

    def _find_compiled(self) -> Tuple[Compiled, Tuple[Any, ...]]:
        fixed = self.fixed_values()
        checked = {self.positions[i] for i in self.chosen}
        # unchecked floating leaves (float64 copies, or own-dtype copies) are arguments of the compiled code;
        # integer, boolean and key arrays stay the user's objects, closed over as before and keyed by value
        dynamic = [self.positions[i] for i, c in enumerate(self.candidates) if c.floating and i not in self.chosen]
        dyn = tuple(fixed[pos] for pos in dynamic)
        fn = self.spec.fn
        try:
            static = {pos: constant_token(value) if is_array(value) else static_token(value)
                      for pos, value in enumerate(fixed) if pos not in checked and pos not in dynamic}
            structure = (tuple(a.treedef for a in self.arguments),
                         tuple(("checked",) if pos in checked else static[pos] if pos in static
                               else ("array", tuple(np.shape(fixed[pos])), str(fixed[pos].dtype))
                               for pos in range(len(fixed))),
                         tuple(self.chosen),
                         tuple((leaf.shape, str(dtype), complex_view) for leaf, dtype, complex_view
                               in zip(self.leaves, self.leaf_dtypes, self.leaf_complex)),
                         tuple(sorted((str(k), static_token(v)) for k, v in self.spec.kwargs.items())),
                         self.promote, self.needs_x64, bool(jax.config.jax_enable_x64))
            fingerprint: Optional[JaxFingerprint] = JaxFingerprint(fn)  # before the check first runs fn
            key: Optional[Tuple[Any, Any]] = (structure, fingerprint.token)
            hash(key)
        except (Uncacheable, TypeError, RecursionError):
            key, fingerprint = None, None
        if key is not None:
            entry = CACHE.get(fn, key, keep=Compiled.alive)
            if entry is not None:
                self._key = key
                return entry, dyn
        entry = Compiled(self._traced_call(dynamic, checked, fn if key is None else None),
                         [(leaf.offset, leaf.size, leaf.shape) for leaf in self.leaves], fingerprint)
        if key is not None and CACHE.put(fn, key, entry):
            self._key = key
        return entry, dyn

    def _traced_call(self, dynamic: List[int], checked: set, strong_fn: Any) -> Callable[..., jax.Array]:
        """``call`` as a function of the checked parts and the other array leaves (``dyn``), holding neither
        the user's arrays nor (when cached) ``fn`` itself."""
        get_fn = (lambda: strong_fn) if strong_fn is not None else weak_callable(self.spec.fn)
        template = [None if pos in checked or pos in dynamic else value for pos, value in enumerate(self.values)]
        positions = [self.positions[i] for i in self.chosen]
        leaf_dtypes = list(self.leaf_dtypes)
        leaf_complex = list(self.leaf_complex)
        shapes = [leaf.shape for leaf in self.leaves]
        arguments = list(self.arguments)
        kwargs = dict(self.spec.kwargs) if strong_fn is None else self.spec.kwargs
        holder: List[Any] = []

        def call(parts: Sequence[jax.Array], dyn: Sequence[Any]) -> jax.Array:
            values = list(template)
            for pos, value in zip(dynamic, dyn):
                values[pos] = value
            for pos, part, dtype, shape, complex_view in zip(positions, parts, leaf_dtypes, shapes, leaf_complex):
                values[pos] = leaf_value(part, shape, dtype, complex_view)
            args = tuple(jax.tree_util.tree_unflatten(a.treedef, values[a.start:a.start + a.count])
                         for a in arguments)
            fn = get_fn()
            if fn is None:  # pragma: no cover - the check holds fn while it runs
                raise RuntimeError("the checked function was garbage-collected")
            return output_sink_flatten(call_fn(fn, args, kwargs, True), holder[0])

        def bind(entry: Compiled) -> None:
            holder.append(entry)

        call.bind = bind  # type: ignore[attr-defined]
        return call


def real_dtype(dtype: Any) -> Any:
    """The dtype of a checked leaf's values in the flat vector: a complex dtype's parts."""
    return jnp.finfo(dtype).dtype if jnp.issubdtype(dtype, jnp.complexfloating) else dtype
