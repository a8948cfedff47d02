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
  and restored afterwards.
* Float64: everything runs inside JAX's thread-local 64-bit scope (``jax.enable_x64(True)``, a context
  manager), so the user's global ``jax_enable_x64`` setting is exactly as it was afterwards, also
  when ``fn`` raises. Checked leaves created as float32 (or bfloat16, float16) are promoted on
  float64 copies; unchecked floating leaves are promoted too, so ``fn`` computes in one precision.
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
  ``order=2`` differentiates ``x -> vjp(fn, x)(v)`` once more.
* "No gradient": where JAX raises because some input has no derivative rule (a ``pure_callback``
  without custom rule, a ``while_loop`` in reverse mode), each leaf is tried on its own and those JAX
  cannot differentiate are reported as "no gradient"; so are leaves whose derivative JAX returns as a
  symbolic zero (``stop_gradient``, an input ``fn`` does not use, a ``custom_vjp`` bwd returning
  ``None``), found by tracing the derivative map to a jaxpr and following its data dependencies.
  (float0 cotangents belong to integer inputs, which are never differentiated.)
* Evaluation runs ``jax.jit(jax.vmap(fn))`` over a batch of points; a function that cannot be traced
  that way (Python control flow on values, NumPy conversions) is evaluated point by point instead.
* ``params=`` and ``grad=`` are rejected: a pure JAX function cannot have closed-over parameters swapped
  (pass the parameter pytree as an argument), and JAX computes the gradients itself (write custom ones
  as ``custom_vjp``/``custom_jvp`` rules).
"""

from __future__ import annotations

from contextlib import contextmanager

import contextlib
from dataclasses import dataclass
from typing import (Any, Callable, ContextManager, Dict, FrozenSet, Iterator, List, Mapping, Optional, Sequence,
                    Tuple)

import jax
import jax.numpy as jnp
import numpy as np

from gradbridge._adapter import CheckSpec, ExpectedParams, LeafSpec, ParamBinding, ProblemBackedFunction
from gradbridge._errors import FunctionEvaluationError, GradbridgeError, InvalidArgumentError, ModeUnsupportedError
from gradbridge._layout import Candidate, layout_leaves, promotion_notes
from gradbridge._outputs import gradient_output_specs, output_specs
from gradbridge._rng import SharedRandomState

from ._lowprec import low_precision_names, own_precision, promotion_hint, refresh_note

try:  # the public home of jaxpr types since jax 0.4.3x
    from jax.extend.core import Literal
except ImportError:  # pragma: no cover - older jax
    from jax.core import Literal  # type: ignore[attr-defined,no-redef]

#: Substrings of JAX errors meaning "this input has no derivative rule" (not a bug in the user's rule).
_NO_DERIVATIVE_HINTS = ("differentiation rule for", "transpose rule", "do not support jvp", "does not support jvp",
                        "reverse-mode differentiation does not work", "does not support reverse-mode")
#: Substrings of JAX errors meaning "forward mode is not available for this function".
_FORWARD_UNSUPPORTED_HINTS = ("forward-mode autodiff (jvp) to a custom_vjp",)

LinearMap = Tuple[List[int], Callable[..., Any]]  # (indices of the leaves it takes or returns, the map)


@contextmanager
def enable_float64() -> Iterator[None]:
    """JAX's 64-bit mode for the duration of the check, for this thread and for the threads XLA runs
    host callbacks on (``pure_callback``/``io_callback`` on large arrays run on another thread, where a
    thread-local override alone is not seen and a float64 result would be refused as float32).

    Since jax 0.8 ``jax.enable_x64`` is the ``jax_enable_x64`` config state: the thread-local override
    (``swap_local``) and the global value (``set_global``) are both set here and both put back on
    exit, also when the check raises, so the user's flag is exactly as it was afterwards. Older
    releases fall back to ``jax.experimental.enable_x64()`` (thread-local only).
    """
    state = getattr(jax, "enable_x64", None)
    if state is None or not hasattr(state, "swap_local"):  # pragma: no cover - jax < 0.8
        from jax.experimental import enable_x64

        with enable_x64(True):
            yield
        return
    previous_global = state.get_global()
    previous_local = state.swap_local(True)
    state.set_global(True)
    try:
        yield
    finally:
        state.set_global(previous_global)
        state.set_local(previous_local)


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


@dataclass(frozen=True)
class _Argument:
    """Where one top-level argument's pytree leaves sit in the list of all leaves."""

    treedef: Any
    start: int
    count: int


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
        self.promote = spec.promote
        # the dtype each checked leaf takes inside fn: None (the plumbing's float64) or, with promote=False, its own
        self.leaf_dtypes = [None if spec.promote else candidates[i].value.dtype for i in chosen]
        floating = [c for c in candidates if c.floating]
        self.needs_x64 = spec.promote or any(str(c.dtype) == "float64" for c in floating)
        # promote=True only: the leaves given below float64, named in the hint when fn fails on the copies
        self.low_precision = low_precision_names([(c.name, c.dtype) for c in floating]) if spec.promote else ""

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        scope = enable_float64() if self.needs_x64 else contextlib.nullcontext()
        with self.rng.preserved(), scope:
            self.fixed_values()  # now: the x64 setting of the check is in force, and no JAX trace is running
            yield

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
        return self._flatten_output(self.spec.fn(*args, **self.spec.kwargs))

    def split(self, x: Any) -> List[Any]:
        """The flat vector ``x`` cut into one array per checked leaf, in the leaf's shape."""
        return [jnp.reshape(x[leaf.offset:leaf.offset + leaf.size], leaf.shape) for leaf in self.leaves]

    def _flatten_output(self, result: Any) -> jax.Array:
        pairs, _ = jax.tree_util.tree_flatten_with_path(result)
        found = [("out" + jax.tree_util.keystr(path), value) for path, value in pairs if _floating(value)]
        if not found:
            if _is_array(result):
                got = f"an array of dtype {_dtype_name(result)}"
            else:
                got = type(result).__name__ + (" with no floating array in it" if pairs else "")
            raise FunctionEvaluationError(
                f"fn: expected a floating-point array (or a pytree of them) as output, got {got}")
        if self.outputs is None:  # shapes seen inside jax.vmap are those of one point
            self.outputs = output_specs([(name, tuple(value.shape), _dtype_name(value)) for name, value in found])
            self.low_precision_outputs = [name for name, value in found if value.dtype != jnp.float64]
        return jnp.concatenate([jnp.ravel(jnp.asarray(value)).astype(plumbing_dtype()) for _, value in found])


class JaxPrepared(ProblemBackedFunction):
    """A JAX function of the checked leaves (one array per leaf, in leaf order) to a flat float64 output."""

    analytic_source = "JAX autodiff (jax.vjp / jax.linearize: your custom_vjp / custom_jvp rules and JAX's own)"

    def __init__(self, problem: JaxProblem, function: Callable[..., jax.Array], x0: np.ndarray,
                 outputs: Optional[List[LeafSpec]] = None) -> None:
        self.problem = problem
        self.function = function
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

    def evaluate(self, points: np.ndarray) -> np.ndarray:
        x = jnp.asarray(points, dtype=plumbing_dtype())
        result = None
        if not self._pointwise_evaluation:
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
                    self._undefined[mode].setdefault(
                        self.leaves[k].name,
                        "JAX's derivative for it is a symbolic zero: fn does not depend on it differentiably "
                        "(jax.lax.stop_gradient, an unused input, or a custom rule returning None/zeros)")

    def _output_size(self) -> int:
        return sum(spec.size for spec in self.output_specs)

    def vjp(self, cotangents: np.ndarray) -> np.ndarray:
        def zero_cotangent(_: List[int]) -> Sequence[jax.Array]:
            return [jnp.zeros(self._output_size(), dtype=plumbing_dtype())]

        if self._pullbacks is None:
            self._pullbacks = self._linear_maps(lambda f, primals: jax.vjp(f, *primals)[1], zero_cotangent, "rev")
            self._mark_symbolic_zeros(self._pullbacks, zero_cotangent, "rev")
        self._last_mode = "rev"
        v = jnp.asarray(cotangents, dtype=plumbing_dtype())
        gradients = np.zeros((len(v), len(self.x0)))
        for indices, pullback in self._pullbacks:
            pulled = self._apply_batched(pullback, v)
            for k, g in zip(indices, pulled):
                gradients[:, self.leaves[k].slice] = np.asarray(g, dtype=np.float64).reshape(len(v), -1)
        return gradients

    def jvp(self, tangents: np.ndarray) -> np.ndarray:
        def zero_tangents(indices: List[int]) -> Sequence[jax.Array]:
            return [jnp.zeros(self.leaves[k].shape, dtype=plumbing_dtype()) for k in indices]

        if self._pushforwards is None:
            self._pushforwards = self._linear_maps(lambda f, primals: jax.linearize(f, *primals)[1],
                                                   zero_tangents, "fwd")
            self._mark_symbolic_zeros(self._pushforwards, zero_tangents, "fwd")
        self._last_mode = "fwd"
        u = jnp.asarray(tangents, dtype=plumbing_dtype())
        pushed = np.zeros((len(u), self._output_size()))
        for indices, pushforward in self._pushforwards:
            parts = [jnp.reshape(u[:, self.leaves[k].slice], (len(u),) + self.leaves[k].shape) for k in indices]
            pushed += np.asarray(self._apply_batched(pushforward, *parts), dtype=np.float64).reshape(len(u), -1)
        return pushed

    def gradient_function(self, cotangent: np.ndarray) -> "JaxPrepared":
        v = jnp.asarray(cotangent, dtype=plumbing_dtype())
        first = self.function

        def gradient(*parts: jax.Array) -> jax.Array:
            pulled = jax.vjp(first, *parts)[1](v)
            return jnp.concatenate([jnp.ravel(g) for g in pulled])

        parts0 = self._parts0()
        try:  # can JAX differentiate the gradient? (errors of other kinds surface when it is evaluated)
            jax.vjp(gradient, *parts0)[1](jnp.zeros(len(self.x0), dtype=plumbing_dtype()))
        except Exception as exc:
            if _mentions(exc, _NO_DERIVATIVE_HINTS) or _mentions(exc, _FORWARD_UNSUPPORTED_HINTS):
                raise ModeUnsupportedError(
                    f"order=2: JAX cannot differentiate the gradient of fn: {_first_line(exc)}") from exc
            if isinstance(exc, GradbridgeError):
                raise
        outputs = gradient_output_specs(self.leaves)
        return JaxPrepared(self.problem, gradient, self.x0, outputs=outputs)


class JaxAdapter:
    """Adapter for JAX."""

    name = "jax"
    module_name = "jax"
    install_hint = 'pip install "gradbridge[jax]"'

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
        positions: List[int] = []
        for index, (name, arg) in enumerate(zip(spec.arg_names, spec.args)):
            pairs, treedef = jax.tree_util.tree_flatten_with_path(arg)
            arguments.append(_Argument(treedef, len(values), len(pairs)))
            for path, value in pairs:
                if _is_array(value):
                    checkable = _floating(value) or _complex(value)
                    candidates.append(Candidate(name + jax.tree_util.keystr(path), value, tuple(np.shape(value)),
                                                _dtype_name(value), checkable, "input", index))
                    positions.append(len(values))
                values.append(value)
        leaves, chosen = layout_leaves(candidates, spec.wrt)
        for leaf, i in zip(leaves, chosen):
            if _complex(candidates[i].value):
                raise InvalidArgumentError(f"args: {leaf.name} is complex; gradbridge checks real arrays")
        problem = JaxProblem(spec, arguments, values, candidates, positions, leaves, chosen)
        x0 = np.concatenate([np.asarray(candidates[i].value, dtype=np.float64).reshape(-1) for i in chosen])
        return JaxPrepared(problem, lambda *parts: problem.call(parts), x0)

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
