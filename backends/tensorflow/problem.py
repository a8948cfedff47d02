"""One TensorFlow check's problem: what is checked, how ``fn`` is called, and what it may touch.

Invariant: the user's objects are as they were after every call into ``fn``. Checked inputs are fresh tensors
built from the flat vector; Keras variables are never written (they read shadow variables owned by the check
through a stateless scope); plain tf.Variables are assigned a point's values and given their own values back,
bit for bit, in a ``finally``; a ``tf.function`` fn runs as a fresh copy with its own trace cache; TensorFlow's
and Python's randomness is pinned only inside a window (see :mod:`.random`, :mod:`gradbridge._process`) and put
back when it closes. Every checked leaf is fed in the dtype fixed when the problem is made (float64 when
promoting; the user's own otherwise), and the outputs found on the first call fix the output layout.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from gradbridge import _process
from gradbridge._adapter import CheckSpec, LeafSpec
from gradbridge._errors import FunctionEvaluationError, InvalidArgumentError

from . import compat
from ..common.layout import Candidate, promotion_notes
from ..common.lowprec import own_precision
from ..common.outputs import output_leaves, output_specs
from ..common.params import distinct_names, named_params, once_each
from ..common.rng import SharedRandomState
from .keras import (Param, float64_policies, is_keras_layer, is_keras_variable, keras_module, keras_training,
                    promotable, stateless)
from .random import TensorFlowRandomState
from .tensors import EPS, Source, as_float64, dtype_of, eps_of, flat, is_floating, is_tensor, private_copy



def parameters(spec: CheckSpec) -> Tuple[Optional[Any], List[Param]]:
    """The Keras model (if any) and the named variables to consider, from ``params=`` or a model ``fn``."""
    params = spec.params
    if params is None and (is_keras_layer(spec.fn) or isinstance(spec.fn, tf.Module)):
        params = spec.fn
    if params is None:
        return None, []
    if is_keras_layer(params):
        variables = list(params.trainable_variables)
        if not params.built and not params.variables:
            raise InvalidArgumentError(
                f"params: the Keras {type(params).__name__} {params.name!r} is not built yet, so it has no weights "
                "to check; call it once on an input (or build it) before checking")
        return params, [Param(n, v) for n, v in distinct_names([(v.path, v) for v in once_each(variables)])]
    if isinstance(params, tf.Module):
        found = compat.module_variables(params, lambda v: isinstance(v, tf.Variable) and v.trainable)
        return None, [Param(n, v) for n, v in distinct_names([("/".join(str(p) for p in path), v) for path, v in found])]
    items = named_params(
        params, lambda v: isinstance(v, tf.Variable) or is_keras_variable(v),
        "a Keras model or layer, a tf.Module, or an iterable of tf.Variables",
        lambda name, v: (f"params: {name} has type {type(v).__name__}, expected a tf.Variable (or a Keras variable); "
                         "constant tensors a function closes over cannot be perturbed: pass them as arguments"))
    return None, [Param(name, v) for name, v in items]




def expand_slash_prefixes(wrt: Optional[Tuple[Any, ...]],
                           candidates: Sequence[Candidate]) -> Optional[Tuple[Any, ...]]:
    """Let ``wrt="hidden"`` (or ``"model/hidden"``, ``"hidden/kernel"``) select ``model/hidden/kernel``.

    The core matches name prefixes only; Keras paths start with the model's name (``sequential/...``),
    so a layer's name is a run of whole components in the middle of the path. A string that matches
    nothing the core's way but is such a run is replaced by those parameters' objects (which the core
    matches by identity).
    """
    if wrt is None:
        return None
    expanded: List[Any] = []
    for entry in wrt:
        if isinstance(entry, str) and not any(c.name == entry or c.name.startswith((entry + "[", entry + "."))
                                              for c in candidates):
            hits = [c.value for c in candidates
                    if c.kind == "param" and c.floating and f"/{entry.strip('/')}/" in f"/{c.name}/"]
            if hits:
                expanded.extend(hits)
                continue
        expanded.append(entry)
    return tuple(expanded)



class TensorFlowProblem:
    """Everything about one TensorFlow check that is fixed: structure, precision, substitutions, state."""

    def __init__(self, spec: CheckSpec, candidates: List[Candidate], leaves: List[LeafSpec], chosen: List[int],
                 rebuild_args: Callable[[Sequence[Any]], tuple], model: Optional[Any], promote: bool) -> None:
        self.spec = spec
        self.fn = private_copy(spec.fn)
        self.candidates = candidates
        self.leaves = leaves
        self.chosen = chosen
        self.rebuild_args = rebuild_args
        self.model = model
        self.promote = promote
        self.promote_model = promote and model is not None and promotable(model)
        self.rng = SharedRandomState(spec.seed)
        self.tf_rng = TensorFlowRandomState(spec.seed)
        # around every call into the user's code: the seeds and generators pinned, under the one lock
        self.window = _process.Window(self._changed)
        self.outputs: Optional[List[LeafSpec]] = None
        self.output_dtypes: List[tf.DType] = []
        self.feed = [self._feed_dtype(candidates[i]) for i in chosen]
        # Keras variables among the checked leaves read shadow variables owned by the check
        self.shadows: Dict[int, tf.Variable] = {}
        for k, i in enumerate(chosen):
            c = candidates[i]
            if c.kind == "param" and is_keras_variable(c.value):
                self.shadows[k] = tf.Variable(tf.cast(tf.constant(as_float64(c.value)), self.feed[k]),
                                              trainable=True, name="gradbridge_shadow")
        checked = {id(candidates[i].value) for i in chosen}
        self.constants: List[Tuple[Any, tf.Tensor]] = []
        if self.promote_model:  # unchecked float variables of the model read as float64 copies
            for v in model.variables:
                if id(v) not in checked and tf.as_dtype(v.dtype).is_floating:
                    self.constants.append((v, tf.cast(v.value, tf.float64)))
        chosen_set = set(chosen)
        # unchecked floating tensor arguments: inputs of a traced graph, never captured in it (see fixed_inputs)
        self.fed_positions = [i for i, c in enumerate(candidates) if c.kind == "input" and i not in chosen_set
                              and c.floating and isinstance(c.value, tf.Tensor)]
        self._fed: Optional[Dict[int, tf.Tensor]] = None  # candidate index -> graph input, while tracing
        self._fixed: Optional[List[tf.Tensor]] = None
        # (point, outputs) of an eager run the probe made: the eager loop's answer there, without running it
        self.eager_at: Optional[Tuple[np.ndarray, np.ndarray]] = None
        # what fn reads besides its arguments, as it was before the check first ran fn (see cache_key)
        self.environment: Optional[Tuple[Any, List[Any]]] = None
        # a trial run of fn that failed once before the check (see probe), for the report
        self.trial_fault: Optional[str] = None

    def _feed_dtype(self, candidate: Candidate) -> tf.DType:
        """The dtype a checked leaf takes while ``fn`` runs."""
        own = dtype_of(candidate.value)
        if candidate.kind == "input":  # a complex input's real view: the dtype of its parts
            return tf.float64 if self.promote else own.real_dtype
        if is_keras_variable(candidate.value) and self.promote_model:
            return tf.float64
        return own  # tf.Variables keep their dtype; Keras variables outside a model too

    def promotes(self) -> bool:
        """Whether this problem runs anything in a higher precision than the user's own dtypes."""
        own = [dtype_of(self.candidates[i].value) for i in self.chosen]
        floating_inputs = any(c.kind == "input" and c.floating and dtype_of(c.value) not in (tf.float64, tf.complex128)
                              for c in self.candidates)
        return self.feed != own or self.promote_model or (self.promote and floating_inputs)

    @property
    def working_eps(self) -> float:
        return max([eps_of(d) for d in self.feed + self.output_dtypes] + [EPS["float64"]])

    def reseed(self) -> None:
        self.rng.reseed()
        if tf.executing_eagerly():  # not while a vectorized graph is traced: it has no random ops, or is not used
            self.tf_rng.reseed()

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """The whole check: nothing process-wide changes here, only in :meth:`window`."""
        yield

    @contextlib.contextmanager
    def _changed(self) -> Iterator[None]:
        """The check's process-wide state for one window (see :mod:`gradbridge._process`): TensorFlow's global
        seed and generator, Python's and NumPy's generators, all re-seeded by :meth:`reseed` and put back."""
        with self.rng.preserved(), self.tf_rng.preserved():
            yield

    @contextlib.contextmanager
    def applied(self, x: np.ndarray) -> Iterator[List[Source]]:
        """The checked leaves take the values of the flat vector ``x`` inside the block; yields one source
        (tensor or variable) per leaf. The user's variables are back to their values on exit."""
        sources: List[Source] = []
        restore: List[Tuple[tf.Variable, tf.Tensor]] = []
        try:
            for k, (leaf, i) in enumerate(zip(self.leaves, self.chosen)):
                value = tf.cast(tf.constant(x[leaf.slice].reshape(leaf.shape), dtype=tf.float64), self.feed[k])
                candidate = self.candidates[i]
                if candidate.kind == "input":
                    sources.append(value)
                elif k in self.shadows:
                    self.shadows[k].assign(value)
                    sources.append(self.shadows[k])
                else:  # a plain tf.Variable: assigned now, its own value put back in the finally
                    restore.append((candidate.value, tf.identity(candidate.value)))
                    candidate.value.assign(value)
                    sources.append(candidate.value)
            mapping = [(self.candidates[self.chosen[k]].value, shadow) for k, shadow in self.shadows.items()]
            with contextlib.ExitStack() as stack:
                if self.promote_model:
                    stack.enter_context(float64_policies(self.model))
                stack.enter_context(stateless(self.constants + mapping))
                stack.enter_context(keras_training(self.spec.train))
                yield sources
        finally:
            for variable, original in reversed(restore):
                variable.assign(original)

    def unbatchable(self) -> Optional[str]:
        """Why this problem's evaluations cannot run as one vectorized graph (None when they can, a priori)."""
        plain = [leaf.name for k, (leaf, i) in enumerate(zip(self.leaves, self.chosen))
                 if self.candidates[i].kind == "param" and k not in self.shadows]
        if plain:
            return (f"checked tf.Variables ({', '.join(plain[:3])}{'...' if len(plain) > 3 else ''}) must be "
                    "assigned for each point")
        if self.tf_rng.clear_kernel_cache:
            return "fn draws from stateful random ops, which are reseeded before each point"
        return None

    def fixed_inputs(self) -> List[tf.Tensor]:
        """The values besides the checked leaves that a traced graph takes as inputs rather than capturing
        them, so a graph kept across checks never computes with another check's values: the unchecked
        floating tensor arguments (as :meth:`call` passes them: float64 copies when promoting), then the
        float64 copies of the model's unchecked variables."""
        if self._fixed is None:
            self._fixed = [self._unchecked_input(i) for i in self.fed_positions] + [t for _, t in self.constants]
        return self._fixed

    def _unchecked_input(self, i: int) -> Any:
        """Unchecked argument ``i`` as ``fn`` receives it (floating ones in float64 when promoting)."""
        c = self.candidates[i]
        if self._fed is not None and i in self._fed:
            return self._fed[i]
        if c.kind == "input" and self.promote and c.floating:
            return tf.cast(c.value, tf.complex128 if dtype_of(c.value).is_complex else tf.float64)
        return c.value

    @contextlib.contextmanager
    def symbolic(self, x: tf.Tensor, fixed: Sequence[tf.Tensor] = ()) -> Iterator[List[Source]]:
        """Like :meth:`applied`, for a symbolic float64 vector ``x`` inside a ``tf.function``: every checked
        leaf is a tensor slice of ``x`` (Keras variables read it through the stateless scope), so no
        variable is assigned. ``fixed`` (symbolic, in the order of :meth:`fixed_inputs`) stand in for the
        unchecked tensor arguments and the model's float64 constants. Only for problems whose
        :meth:`unbatchable` is None."""
        sources: List[Source] = []
        mapping: List[Tuple[Any, Any]] = []
        for k, (leaf, i) in enumerate(zip(self.leaves, self.chosen)):
            value = tf.cast(tf.reshape(x[leaf.offset:leaf.offset + leaf.size], leaf.shape), self.feed[k])
            if self.candidates[i].kind != "input":
                mapping.append((self.candidates[i].value, value))
            sources.append(value)
        fixed = list(fixed)
        constants = self.constants
        if fixed:
            count = len(self.fed_positions)
            constants = [(v, t) for (v, _), t in zip(self.constants, fixed[count:])]
        with contextlib.ExitStack() as stack:
            if self.promote_model:
                stack.enter_context(float64_policies(self.model))
            stack.enter_context(stateless(constants + mapping))
            stack.enter_context(keras_training(self.spec.train))
            self._fed = dict(zip(self.fed_positions, fixed)) if fixed else None
            try:
                yield sources
            finally:
                self._fed = None

    def arguments(self, sources: List[Source]) -> tuple:
        """fn's positional arguments with the checked inputs taken from the sources (inside :meth:`applied`)."""
        values = [c.value for c in self.candidates]
        for source, i in zip(sources, self.chosen):
            if self.candidates[i].kind == "input":  # a complex leaf: the complex tensor of its real view
                values[i] = tf.complex(source[..., 0], source[..., 1]) if self._complex(i) else source
        for i, c in enumerate(self.candidates):
            if c.kind == "input" and i not in self.chosen:
                values[i] = self._unchecked_input(i)  # in float64 like the rest; a graph input while tracing
        return self.rebuild_args(values)

    def _complex(self, i: int) -> bool:
        return dtype_of(self.candidates[i].value).is_complex

    def call(self, sources: List[Source]) -> List[tf.Tensor]:
        """Run ``fn`` on the sources (inside :meth:`applied`); returns its floating output tensors."""
        args = self.arguments(sources)
        self.reseed()
        return self._outputs(self.fn(*args, **self.spec.kwargs))

    def _outputs(self, result: Any) -> List[tf.Tensor]:
        all_leaves = output_leaves(result, is_tensor)
        leaves = [leaf for leaf in all_leaves if is_floating(leaf.value) or dtype_of(leaf.value).is_complex]
        if not leaves:
            container = isinstance(result, (tuple, list, dict))
            raise FunctionEvaluationError(
                f"fn: expected a floating-point tf.Tensor (or a tuple/list/dict of them) as output, got "
                f"{type(result).__name__}{' with no floating tensor in it' if container else ''}; return tensors, "
                "not NumPy values or Python numbers, so gradients can flow")
        values = [tf.convert_to_tensor(leaf.value) for leaf in leaves]
        # a complex output as its real view (differentiable: TensorFlow applies its own complex convention)
        tensors = [tf.stack([tf.math.real(t), tf.math.imag(t)], axis=-1) if t.dtype.is_complex else t for t in values]
        if self.outputs is None:
            self.outputs = output_specs([(l.path, tuple(t.shape), v.dtype.name)
                                         for l, t, v in zip(leaves, tensors, values)])
            self.output_dtypes = [t.dtype for t in tensors]
        return tensors



def probe(problem: TensorFlowProblem, x0: np.ndarray) -> Optional[str]:
    """Run ``fn`` at ``x0`` (in a session of its own) before the check; returns why it failed, or None.

    This fixes the output dtypes, hence the precision the check can claim, before the core picks steps and
    tolerances; and it finds out whether ``fn`` draws from stateful random kernels: if two runs with the
    seeds reset but TensorFlow's kernel cache kept differ, every evaluation has to clear the cache.

    A run that fails once is not taken for fn's nature: when the first try raises, fn is tried once more (a
    fn that raised only once still runs in float64); when one of two runs is not finite and the other is, a
    third run decides (a transient NaN is no randomness). Either is recorded in ``problem.trial_fault`` for
    the report.
    """
    problem.tf_rng.clear_kernel_cache = False
    failure: Optional[str] = None
    for attempt in range(2):
        try:
            with problem.session(), problem.window(), problem.applied(x0) as sources:
                first = flat(problem.call(sources)).numpy()
                second = flat(problem.call(sources)).numpy()
                if np.isfinite(first).all() != np.isfinite(second).all():  # one run's NaN: a fault, not randomness
                    fault = first if not np.isfinite(first).all() else second
                    problem.trial_fault = (f"a trial call of fn at the checked point, before the check, returned "
                                           f"{fault[~np.isfinite(fault)][0]}; called again it returned finite values")
                    first, second = second, flat(problem.call(sources)).numpy()
        except Exception as exc:  # the user's code: the core reports it properly when it runs fn again
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            failure = f"{type(exc).__name__}: {message}"[:300]
            continue
        if failure is not None:
            problem.trial_fault = (f"a trial call of fn at the checked point, before the check, raised {failure}; "
                                   "called again it did not")
        problem.tf_rng.clear_kernel_cache = not np.array_equal(first, second, equal_nan=True)
        if not problem.tf_rng.clear_kernel_cache:  # deterministic: what the eager loop gives at x0, kept
            problem.eager_at = (x0.copy(), first)
        return None
    problem.tf_rng.clear_kernel_cache = True
    return failure


def notes_for(problem: TensorFlowProblem, model: Optional[Any]) -> List[str]:
    """What the user should know: promoted leaves, the precision in force and why, the model's mode."""
    notes = promotion_notes([leaf for leaf, feed in zip(problem.leaves, problem.feed) if feed == tf.float64])
    if not problem.spec.promote:  # the user asked for their own dtypes: no reasons to give
        notes = [note for note in [own_precision(problem.leaves, problem.outputs or [])[1]] if note]
    elif problem.working_eps > EPS["float64"]:
        precision = next(name for name, eps in EPS.items() if eps == problem.working_eps)
        reasons = []
        low = [(leaf.name, problem.candidates[i].value) for leaf, i, feed in
               zip(problem.leaves, problem.chosen, problem.feed) if feed != tf.float64]
        if low:
            reasons.append(f"not promoted: {', '.join(name for name, _ in low)}")
        if any(problem.candidates[i].kind == "param" and not is_keras_variable(problem.candidates[i].value)
               and feed != tf.float64 for i, feed in zip(problem.chosen, problem.feed)):
            reasons.append("tf.Variables are perturbed in place and cannot change dtype (create them in float64 "
                           "to check in float64)")
        if model is None and any(is_keras_variable(value) for _, value in low):
            reasons.append("Keras variables given in a list are read in their own dtype (pass the model as params= "
                           "to check it in float64)")
        low_outputs = [spec.name for spec, dtype in zip(problem.outputs or [], problem.output_dtypes)
                       if dtype != tf.float64]
        if low_outputs:
            reasons.append(f"fn returns {', '.join(low_outputs)} below float64"
                           + (" (a Keras Loss object computes in its own dtype, float32 unless created with "
                              "dtype='float64'; loss functions such as keras.losses.mean_squared_error keep "
                              "the input dtype)" if keras_module() is not None else ""))
        notes.append(f"the check ran in {precision}, not float64: {'; '.join(reasons)}; steps and tolerances "
                     f"follow {precision} precision")
    if model is not None:
        how = ("with its layers computing in float64 on float64 copies of its variables" if problem.promote_model
               else "under its own dtype policies on copies of its variables" if not problem.spec.promote
               else "on copies of its variables")
        notes.append(f"Keras model {model.name!r} called in {'training' if problem.spec.train else 'inference'} mode "
                     f"(unless fn passes training=) {how}; the model itself is not modified")
    if problem.fn is not problem.spec.fn:
        notes.append("fn is a tf.function: checked through a fresh tf.function of the same Python function, so "
                     "its own trace cache is untouched")
    if problem.trial_fault is not None:
        notes.append(f"{problem.trial_fault}: fn is not deterministic (the check itself saw no such failure)")
    if problem.tf_rng.clear_kernel_cache:
        notes.append("fn draws from stateful random ops: tf.random.set_seed before each evaluation pins them (it "
                     "also clears TensorFlow's kernel cache, so ops with an explicit op seed restart their sequence)")
    return notes

