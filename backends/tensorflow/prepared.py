"""TensorFlow adapter: ``tf.custom_gradient`` ops, plain and ``tf.function``-compiled functions, Keras models.

How a check stays off the user's objects:

* Checked inputs are fresh tensors built from the flat vector, never the user's tensors or variables.
* Keras variables (``params=model`` or a list of Keras variables) are never written: while ``fn`` runs they
  are redirected, through ``keras.StatelessScope``, to shadow tf.Variables owned by the check. Every
  evaluation runs in a fresh stateless scope, so BatchNorm statistics and Dropout seed generators updated
  by the model (``train=True``) land in the scope and are dropped.
* A Keras model in float32 (or mixed precision) is checked in float64 without being changed: its layers'
  dtype policies are swapped for the duration of each call for one computing in float64 (the Keras
  mixed-precision mechanism, with float64 as the compute dtype), and its float variables are read as
  float64 copies. The user's policies are put back in a ``finally``.
* Plain tf.Variables (``params=`` a ``tf.Module`` or a list of variables) cannot be redirected: they
  are assigned the perturbed values during a call and assigned their original value back, bit for bit,
  in a ``finally`` (also when ``fn`` raises). They keep their dtype, so a float32 variable is checked in
  float32: the report says so and steps and tolerances follow float32 (``working_eps``).
* A ``tf.function`` ``fn`` is checked through a fresh ``tf.function`` of the same Python function and
  options, so the user's trace cache never holds traces made with the check's float64 inputs or shadow
  variables.
* Each call into the user's code (an evaluation of a chunk, a VJP or JVP, ``grad=``) pins TensorFlow's
  randomness for every evaluation (global seed, operation seeds, the global ``tf.random.Generator``;
  TensorFlow's kernel cache too, only for functions that draw from stateful random ops) and Python/NumPy's,
  and restores the user's seed, operation-seed sequence and generators when it returns, under the lock of
  :mod:`gradbridge._process`: between those calls other threads see their own seeds and generators.

Precision: the check first tries float64 (inputs promoted, Keras models computing in float64). When ``fn``
cannot run that way (it mixes its inputs with float32 constants, has a float32 ``input_signature``...) or
returns below float64 anyway, it runs in the user's precision and ``prepared.working_eps`` and a note say so.
With ``promote=False`` it runs in the user's precision from the start: inputs and variables in their own
dtypes (float32, float16, bfloat16; the core has rounded the points to them, so the casts are exact),
Keras models under their own dtype policies, unchecked inputs as given; gradients come out of the tape
in those dtypes (the cotangents reach the outputs cast to the outputs' dtypes) and are widened to
float64 only for the core.

Speed: evaluations (a chunk of points), VJPs (a chunk of cotangents at ``x0``) and transposed VJPs (a chunk of
tangents) run as one ``tf.function`` through ``tf.vectorized_map`` (checked leaves are tensor slices of the flat
vector; Keras variables read them through the stateless scope; unchecked tensor arguments are graph inputs too).
A traced graph is kept across checks of the same function and key (shapes, dtypes, structure, what ``fn``
reads), held weakly by the function (``clear_cache()``, ``cache_size()``), so repeat checks do not trace again.
A small chunk of a function's first check runs the eager loop instead (tracing costs more than it saves); a
function checked again traces and keeps its graphs. The eager per-point loop runs instead, decided
on the first call and said in ``notes``, when checked plain tf.Variables must be assigned, ``fn`` draws random
numbers, calls Python (``tf.py_function``), has side effects (assertions, prints, assigns), cannot be traced
(``.numpy()``, Python branches on tensors) or vectorized without a while_loop, or when the first batched chunk
disagrees with the loop (~1e3 eps) or raises (the loop then raises with its point). Every check makes that
comparison again, also with a kept graph: it is the safety net for what the cache key cannot see. Python side effects that
do not change the outputs cannot be detected: they run once per trace instead of once per point (not at
all in a check that reuses a kept graph).

Limitations: ``training=`` passed explicitly inside ``fn`` wins over ``train=``; a ``tf.function`` called
*inside* ``fn`` (not ``fn`` itself) keeps its own trace cache; for a function drawing from stateful random
ops, eager random ops with an explicit op seed restart their sequence after the check (clearing
TensorFlow's kernel cache cannot be undone); a ``tf.random.Generator`` of the user's own other than the
global one cannot be pinned (the check then reports the function as not deterministic).
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before the first import of TensorFlow: no INFO/WARNING spam

import numpy as np
import tensorflow as tf
from tensorflow.python.eager import context as _tf_context
from tensorflow.python.ops import custom_gradient as _tf_custom_gradient
from tensorflow.python.ops import stateful_random_ops as _tf_stateful_random

from gradbridge import _process
from gradbridge._adapter import CheckSpec, ExpectedParams, LeafSpec, ParamBinding, ProblemBackedFunction
from gradbridge._errors import FunctionEvaluationError, InvalidArgumentError, ModeUnsupportedError
from ..common.cache import WeakFunctionCache
from ..common.fingerprint import BASE_LIBRARIES, Fingerprinter, UNHANDLED, Uncacheable, VALUE_TYPES, digest
from gradbridge._precision import DTYPE_EPS
from ..common.layout import Candidate, Unchecked, argument_candidates, layout_leaves, promotion_notes, unchecked_notes
from ..common.outputs import gradient_output_specs, output_leaves, output_specs
from ..common.rng import SharedRandomState
from gradbridge._tree import flatten, is_walked_node

from ..common.handwritten import HandWrittenGradient, floating_candidates
from ..common.lowprec import own_precision

#: A source of differentiation: the tensor or variable that stands for one checked leaf during a call.
Source = Any
#: Runs the user's function (or its gradient) on the sources; returns the output tensors.
Forward = Callable[[List[Source]], List[tf.Tensor]]

_EPS = DTYPE_EPS  # machine epsilon by dtype name (shared with the core)
_NO_GRADIENT = ("TensorFlow returned None: no differentiable path leads from this input to the outputs "
                "(tf.stop_gradient, a cast to an integer type, or an op without a gradient such as "
                "tf.numpy_function outside a tf.custom_gradient)")


# --- Keras, only when it is already imported (TensorFlow 2.16+ imports it; nothing here imports it) ---

def _keras() -> Any:
    return sys.modules.get("keras")


def _is_keras_variable(value: Any) -> bool:
    keras = _keras()
    return keras is not None and isinstance(value, getattr(keras, "Variable", ()))


def _is_keras_layer(value: Any) -> bool:
    keras = _keras()
    layers = getattr(keras, "layers", None) if keras is not None else None
    return layers is not None and isinstance(value, getattr(layers, "Layer", ()))


def _is_tensor(value: Any) -> bool:
    return isinstance(value, (tf.Tensor, tf.Variable)) or _is_keras_variable(value)


#: TensorFlow's composite tensors: detected as TensorFlow's, never perturbed (see :func:`_not_checkable`).
_COMPOSITE = (tf.SparseTensor, tf.RaggedTensor)


def _not_checkable(value: Any) -> str:
    """Why a composite tensor among the arguments is not checked ("" for anything else)."""
    if isinstance(value, tf.SparseTensor):
        return ("a tf.SparseTensor: gradbridge perturbs dense tensors element by element; pass tf.sparse.to_dense(x) "
                "(and tf.sparse.from_dense inside fn) to check its values. It is passed to fn unchanged")
    if isinstance(value, tf.RaggedTensor):
        return ("a tf.RaggedTensor: gradbridge perturbs dense tensors element by element; pass its flat_values (or "
                "x.to_tensor()) and rebuild it inside fn to check its values. It is passed to fn unchanged")
    return ""


def _dtype(value: Any) -> tf.DType:
    return tf.as_dtype(value.dtype)


def _floating(value: Any) -> bool:
    return _dtype(value).is_floating


def _numpy(value: Any) -> np.ndarray:
    return np.asarray(value.numpy()).astype(np.float64)


def _eps(dtype: tf.DType) -> float:
    return _EPS.get(dtype.name, _EPS["float32"])


def _is_tf_function(fn: Any) -> bool:
    return isinstance(fn, tf.types.experimental.PolymorphicFunction)


def _private_copy(fn: Any) -> Any:
    """A fresh ``tf.function`` of the same Python function and options (its own, empty, trace cache)."""
    if not _is_tf_function(fn):
        return fn
    clone = getattr(fn, "_clone", None)
    if clone is not None:
        try:
            return clone(None)
        except Exception:  # a future TensorFlow changed the private signature: rebuild from the public parts
            pass
    return tf.function(fn.python_function, input_signature=fn.input_signature)


# --- parameters ---

class _Param:
    """One parameter candidate: its readable name and the user's variable."""

    def __init__(self, name: str, variable: Any) -> None:
        self.name = name
        self.variable = variable


def _parameters(spec: CheckSpec) -> Tuple[Optional[Any], List[_Param]]:
    """The Keras model (if any) and the named variables to consider, from ``params=`` or a model ``fn``."""
    params = spec.params
    if params is None and (_is_keras_layer(spec.fn) or isinstance(spec.fn, tf.Module)):
        params = spec.fn
    if params is None:
        return None, []
    if _is_keras_layer(params):
        variables = list(params.trainable_variables)
        if not params.built and not params.variables:
            raise InvalidArgumentError(
                f"params: the Keras {type(params).__name__} {params.name!r} is not built yet, so it has no weights "
                "to check; call it once on an input (or build it) before checking")
        return params, _unique([(v.path, v) for v in _dedupe(variables)])
    if isinstance(params, tf.Module):
        found = params._flatten(predicate=lambda v: isinstance(v, tf.Variable) and v.trainable, with_path=True)
        return None, _unique([("/".join(str(p) for p in path), v) for path, v in found])
    if isinstance(params, tf.Variable) or _is_keras_variable(params):
        params = [params]
    if isinstance(params, dict):
        items = list(params.items())
    else:
        try:
            items = [(f"params[{i}]", v) for i, v in enumerate(params)]
        except TypeError:
            raise InvalidArgumentError(f"params: expected a Keras model or layer, a tf.Module, or an iterable of "
                                       f"tf.Variables, got {type(params).__name__}") from None
    for name, v in items:
        if not (isinstance(v, tf.Variable) or _is_keras_variable(v)):
            raise InvalidArgumentError(
                f"params: {name} has type {type(v).__name__}, expected a tf.Variable (or a Keras variable); "
                "constant tensors a function closes over cannot be perturbed: pass them as arguments")
    return None, [_Param(str(name), v) for name, v in items]


def _dedupe(variables: Sequence[Any]) -> List[Any]:
    seen, unique = set(), []
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            unique.append(v)
    return unique


def _frozen_weights(model: Optional[Any]) -> List[Unchecked]:
    """The weights of a Keras model's layers set ``trainable=False`` (frozen): held fixed, so listed as not
    checked. A layer's own non-trainable state (BatchNorm statistics) is not a weight and is not listed."""
    if model is None:
        return []
    trainable = {id(v) for v in model.trainable_variables}
    found: List[Unchecked] = []
    seen = set()
    for layer in model._flatten_layers(include_self=True, recursive=True):
        for v in getattr(layer, "_trainable_variables", ()):  # the weights created trainable (Keras 3)
            if id(v) in trainable or id(v) in seen or not _floating(v):
                continue
            seen.add(id(v))
            found.append(Unchecked(v.path, _dtype(v).name, f"layer {layer.name!r} has trainable=False (frozen), so "
                                                           "its weights are held fixed", kind="param"))
    return found


def _unique(named: Sequence[Tuple[str, Any]]) -> List[_Param]:
    """Parameters with distinct names (a repeated path gets ``#2``, ``#3``...)."""
    counts: Dict[str, int] = {}
    params = []
    for name, v in named:
        counts[name] = counts.get(name, 0) + 1
        params.append(_Param(name if counts[name] == 1 else f"{name}#{counts[name]}", v))
    return params


def _expand_slash_prefixes(wrt: Optional[Tuple[Any, ...]],
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


# --- random state ---

#: The seeded global generator that stands in while the user has none, and its seeded state, one per seed,
#: shared by checks (creating one makes a variable, about 1 ms). Every check starts it from the seeded state,
#: whatever drew from it in between (fn may keep it: ``tf.random.get_global_generator()``).
_STAND_IN_GENERATORS: Dict[int, Tuple[tf.random.Generator, np.ndarray]] = {}


def _stand_in_generator(seed: int) -> Tuple[tf.random.Generator, np.ndarray]:
    found = _STAND_IN_GENERATORS.get(seed)
    if found is None:
        generator = tf.random.Generator.from_seed(seed)
        found = _STAND_IN_GENERATORS.setdefault(seed, (generator, generator.state.numpy().copy()))
    return found


class _TensorFlowRandomState:
    """Pins TensorFlow's random sources before each evaluation and puts the user's back afterwards.

    Before each evaluation: the global seed and the generator of operation seeds derived from it are
    reset (what ``tf.random.set_seed`` does), the global ``tf.random.Generator`` is reset to its state at
    the start of the check (a seeded one, owned by the check, stands in when the user has none), and, only
    for functions that draw from stateful random kernels (``tf.random.normal`` and friends; the probe finds
    out), TensorFlow's kernel cache is cleared, which is what makes such kernels start over.

    Restored exactly afterwards: the global seed, the operation-seed generator and its state, the global
    generator (object and state) and Keras' global seed generator. Not restorable: a cleared kernel cache,
    so eager random ops with an explicit op seed restart their sequence after a check of such a function.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.clear_kernel_cache = True  # until the probe shows the function does not need it
        self._active: Optional[tf.random.Generator] = None
        self._active_state: Optional[np.ndarray] = None

    def reseed(self) -> None:
        if self.clear_kernel_cache:
            tf.random.set_seed(self.seed)
        else:  # the same seeds, without the (slow, irreversible) cache clearing of tf.random.set_seed
            ctx = _tf_context.context()
            ctx._seed = self.seed
            ctx._rng = random.Random(self.seed)
        if self._active is not None and self._active_state is not None:
            self._active.reset(self._active_state)

    @contextlib.contextmanager
    def preserved(self) -> Iterator[None]:
        ctx = _tf_context.context()
        seed = ctx._seed
        had_op_seeds = hasattr(ctx, "_rng")
        op_seeds = getattr(ctx, "_rng", None)
        op_seed_state = op_seeds.getstate() if op_seeds is not None else None
        user_generator = _tf_stateful_random.global_generator
        keras_state = _keras_global_state()
        keras_generator = keras_state.get_global_attribute("global_seed_generator") if keras_state else None
        try:
            if user_generator is None:
                stand_in, seeded = _stand_in_generator(self.seed)
                stand_in.reset(seeded)
                self._active, self._active_state = stand_in, seeded
            else:
                self._active = user_generator
                self._active_state = user_generator.state.numpy().copy()
            _tf_stateful_random.global_generator = self._active
            yield
        finally:
            ctx._seed = seed
            if had_op_seeds:
                ctx._rng = op_seeds
                if op_seeds is not None:
                    op_seeds.setstate(op_seed_state)
            elif hasattr(ctx, "_rng"):
                del ctx._rng
            if self._active is not None and self._active_state is not None:
                self._active.reset(self._active_state)
            _tf_stateful_random.global_generator = user_generator
            if keras_state is not None:
                keras_state.set_global_attribute("global_seed_generator", keras_generator)
            self._active = None
            self._active_state = None


def _keras_global_state() -> Any:
    if _keras() is None:
        return None
    try:
        from keras.src.backend.common import global_state
    except ImportError:  # pragma: no cover - another Keras layout
        return None
    return global_state


# --- Keras scopes ---

@contextlib.contextmanager
def _float64_policies(model: Any) -> Iterator[None]:
    """``model`` computes in float64 while the block runs; everything is put back afterwards.

    Every layer gets a policy computing in float64 with its own variable dtype (the Keras mixed-precision
    mechanism: variables are cast on read); input layers and the symbolic inputs of functional models
    (the dtypes Keras casts call inputs to) are switched to float64 too, or the inputs would be rounded to
    float32 on the way in.
    """
    from keras.src.backend.common.keras_tensor import KerasTensor
    from keras.src.dtype_policies.dtype_policy import DTypePolicy
    from keras.src.layers import InputLayer

    policies, symbols = [], []
    try:
        for layer in model._flatten_layers(include_self=True, recursive=True):
            original = layer._dtype_policy
            policy = DTypePolicy("float64")
            policy._variable_dtype = original.variable_dtype
            policies.append((layer, original))
            layer._dtype_policy = policy
            if isinstance(layer, InputLayer) and tf.as_dtype(layer._dtype).is_floating:
                symbols.append((layer, layer._dtype))  # InputLayer.dtype is its own attribute, not the policy's
                layer._dtype = "float64"
            for functional in (layer, getattr(layer, "_functional", None)):
                inputs = getattr(functional, "_inputs", None) if functional is not None else None
                for symbol in inputs if isinstance(inputs, (list, tuple)) else ():
                    if isinstance(symbol, KerasTensor) and tf.as_dtype(symbol.dtype).is_floating:
                        symbols.append((symbol, symbol._dtype))
                        symbol._dtype = "float64"
        yield
    finally:
        for symbol, dtype in reversed(symbols):
            symbol._dtype = dtype
        for layer, original in reversed(policies):
            layer._dtype_policy = original


def _promotable(model: Any) -> bool:
    """Whether every layer has a plain float policy the float64 swap can stand in for."""
    try:
        from keras.src.dtype_policies.dtype_policy import DTypePolicy
        layers = model._flatten_layers(include_self=True, recursive=True)
    except (ImportError, AttributeError):
        return False
    return all(type(l._dtype_policy) is DTypePolicy and tf.as_dtype(l._dtype_policy.compute_dtype).is_floating
               for l in layers)


@contextlib.contextmanager
def _stateless(mapping: Sequence[Tuple[Any, Any]]) -> Iterator[None]:
    """A ``keras.StatelessScope`` in which each Keras variable reads its mapped value (of any dtype: the
    mapping is set after construction, which would cast it to the variable's dtype) and no Keras
    variable of the user's is written (updates stay in the scope)."""
    if _keras() is None:
        yield
        return
    from keras.src.backend.common.stateless_scope import StatelessScope

    scope = StatelessScope(collect_losses=True)
    for variable, value in mapping:
        scope.state_mapping[id(variable)] = value
    with scope:
        yield


@contextlib.contextmanager
def _keras_training(on: bool) -> Iterator[None]:
    """Keras layers called without ``training=`` run in training mode (Keras' outer call context)."""
    state = _keras_global_state()
    if not on or state is None:
        yield
        return
    from keras.src.layers.layer import CallContext

    previous = state.get_global_attribute("current_call_ctx")
    call_context = CallContext(entry_layer=None)
    call_context.training = True
    state.set_global_attribute("current_call_ctx", call_context)
    try:
        yield
    finally:
        state.set_global_attribute("current_call_ctx", previous)


@contextlib.contextmanager
def _eager_custom_gradients() -> Iterator[List[str]]:
    """Names of the ``tf.custom_gradient`` functions run eagerly inside the block.

    ForwardAccumulator ignores such rules (it differentiates the ops inside them), so forward mode
    cannot check them; inside a ``tf.function`` it transposes the rule and can.
    """
    original = getattr(_tf_custom_gradient, "_eager_mode_decorator", None)
    seen: List[str] = []
    if original is None:  # pragma: no cover - another TensorFlow layout
        yield seen
        return

    def spy(f, args, kwargs):
        seen.append(getattr(f, "__name__", "custom_gradient"))
        return original(f, args, kwargs)

    _tf_custom_gradient._eager_mode_decorator = spy
    try:
        yield seen
    finally:
        _tf_custom_gradient._eager_mode_decorator = original


# --- the problem ---

class TensorFlowProblem:
    """Everything about one TensorFlow check that is fixed: structure, precision, substitutions, state."""

    def __init__(self, spec: CheckSpec, candidates: List[Candidate], leaves: List[LeafSpec], chosen: List[int],
                 rebuild_args: Callable[[Sequence[Any]], tuple], model: Optional[Any], promote: bool) -> None:
        self.spec = spec
        self.fn = _private_copy(spec.fn)
        self.candidates = candidates
        self.leaves = leaves
        self.chosen = chosen
        self.rebuild_args = rebuild_args
        self.model = model
        self.promote = promote
        self.promote_model = promote and model is not None and _promotable(model)
        self.rng = SharedRandomState(spec.seed)
        self.tf_rng = _TensorFlowRandomState(spec.seed)
        # around every call into the user's code: the seeds and generators pinned, under the one lock
        self.window = _process.Window(self._changed)
        self.outputs: Optional[List[LeafSpec]] = None
        self.output_dtypes: List[tf.DType] = []
        self.feed = [self._feed_dtype(candidates[i]) for i in chosen]
        # Keras variables among the checked leaves read shadow variables owned by the check
        self.shadows: Dict[int, tf.Variable] = {}
        for k, i in enumerate(chosen):
            c = candidates[i]
            if c.kind == "param" and _is_keras_variable(c.value):
                self.shadows[k] = tf.Variable(tf.cast(tf.constant(_numpy(c.value)), self.feed[k]),
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
        # what fn reads besides its arguments, as it was before the check first ran fn (see _cache_key)
        self.environment: Optional[Tuple[Any, List[Any]]] = None
        # a trial run of fn that failed once before the check (see _probe), for the report
        self.trial_fault: Optional[str] = None

    def _feed_dtype(self, candidate: Candidate) -> tf.DType:
        """The dtype a checked leaf takes while ``fn`` runs."""
        own = _dtype(candidate.value)
        if candidate.kind == "input":
            return tf.float64 if self.promote else own
        if _is_keras_variable(candidate.value) and self.promote_model:
            return tf.float64
        return own  # tf.Variables keep their dtype; Keras variables outside a model too

    def promotes(self) -> bool:
        """Whether this problem runs anything in a higher precision than the user's own dtypes."""
        own = [_dtype(self.candidates[i].value) for i in self.chosen]
        floating_inputs = any(c.kind == "input" and c.floating and _dtype(c.value) != tf.float64
                              for c in self.candidates)
        return self.feed != own or self.promote_model or (self.promote and floating_inputs)

    @property
    def working_eps(self) -> float:
        return max([_eps(d) for d in self.feed + self.output_dtypes] + [_EPS["float64"]])

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
                    stack.enter_context(_float64_policies(self.model))
                stack.enter_context(_stateless(self.constants + mapping))
                stack.enter_context(_keras_training(self.spec.train))
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
            return tf.cast(c.value, tf.float64)
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
                stack.enter_context(_float64_policies(self.model))
            stack.enter_context(_stateless(constants + mapping))
            stack.enter_context(_keras_training(self.spec.train))
            self._fed = dict(zip(self.fed_positions, fixed)) if fixed else None
            try:
                yield sources
            finally:
                self._fed = None

    def arguments(self, sources: List[Source]) -> tuple:
        """fn's positional arguments with the checked inputs taken from the sources (inside :meth:`applied`)."""
        values = [c.value for c in self.candidates]
        for source, i in zip(sources, self.chosen):
            if self.candidates[i].kind == "input":
                values[i] = source
        for i, c in enumerate(self.candidates):
            if c.kind == "input" and i not in self.chosen:
                values[i] = self._unchecked_input(i)  # in float64 like the rest; a graph input while tracing
        return self.rebuild_args(values)

    def call(self, sources: List[Source]) -> List[tf.Tensor]:
        """Run ``fn`` on the sources (inside :meth:`applied`); returns its floating output tensors."""
        args = self.arguments(sources)
        self.reseed()
        return self._outputs(self.fn(*args, **self.spec.kwargs))

    def _outputs(self, result: Any) -> List[tf.Tensor]:
        all_leaves = output_leaves(result, _is_tensor)
        leaves = [leaf for leaf in all_leaves if _floating(leaf.value)]
        complex_leaves = [leaf for leaf in all_leaves if _dtype(leaf.value).is_complex]
        if not leaves and complex_leaves:
            raise FunctionEvaluationError(
                f"fn: returned {complex_leaves[0].path} as a complex tensor ({_dtype(complex_leaves[0].value).name}); "
                "gradbridge checks real-valued outputs: return its real and imaginary parts (tf.math.real, "
                "tf.math.imag) as two real outputs, or a real function of it (tf.abs)")
        if not leaves:
            container = isinstance(result, (tuple, list, dict))
            raise FunctionEvaluationError(
                f"fn: expected a floating-point tf.Tensor (or a tuple/list/dict of them) as output, got "
                f"{type(result).__name__}{' with no floating tensor in it' if container else ''}; return tensors, "
                "not NumPy values or Python numbers, so gradients can flow")
        tensors = [tf.convert_to_tensor(leaf.value) for leaf in leaves]
        if self.outputs is None:
            self.outputs = output_specs([(l.path, tuple(t.shape), t.dtype.name) for l, t in zip(leaves, tensors)])
            self.output_dtypes = [t.dtype for t in tensors]
        return tensors


def _flat(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    """One float64 vector of all outputs (differentiable: the casts are on the tape)."""
    return tf.concat([tf.reshape(tf.cast(t, tf.float64), [-1]) for t in tensors], axis=0)


def _watch(tape: tf.GradientTape, sources: Sequence[Source]) -> None:
    for source in sources:
        tape.watch(source)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


_PYTHON_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}
#: Smallest chunk that triggers tracing the vectorized graph (smaller ones take the eager loop).
MIN_BATCH_ROWS = 64


def _unsafe_ops(graph: Any) -> Optional[str]:
    """Why a traced vectorized graph must not replace the eager loop: ops calling back into Python
    (``tf.py_function``, ``tf.numpy_function``), or random ops (reseeded before each point in the loop;
    one graph would draw differently). None when there are none."""
    definition = graph.as_graph_def()
    types = {node.op for node in definition.node}
    types.update(node.op for function in definition.library.function for node in function.node_def)
    python = sorted(types & _PYTHON_OPS)
    if python:
        return f"fn calls Python through {', '.join(python)} (tf.py_function or tf.numpy_function)"
    random_ops = sorted(t for t in types if "Random" in t or "Multinomial" in t or t.startswith("Rng")
                        or (t.startswith("Stateful") and t != "StatefulPartitionedCall"))
    if random_ops:
        return (f"fn draws random numbers ({', '.join(random_ops[:3])}; e.g. dropout in training mode), "
                "reseeded before each point")
    # any other op with an effect (an assertion, a print, a variable update) would run for one point only
    effects = sorted(t for t in types if t not in _HARMLESS_STATEFUL and _is_stateful(t))
    if effects:
        return (f"fn runs ops with side effects ({', '.join(effects[:3])}: assertions, prints, variable updates), "
                "which a vectorized graph would run for one point only")
    return None


#: Stateful op types that are safe in a vectorized graph: reads, and containers whose bodies are scanned too.
_HARMLESS_STATEFUL = {"ReadVariableOp", "VarHandleOp", "StatefulPartitionedCall", "PartitionedCall", "If",
                      "While", "Case", "NoOp", "Placeholder", "PlaceholderWithDefault"}


def _is_stateful(op_type: str) -> bool:
    from tensorflow.python.framework import op_def_registry
    definition = op_def_registry.get(op_type)
    return definition is None or bool(definition.is_stateful)


def _dense(gradient: Any) -> Optional[tf.Tensor]:
    if gradient is None:
        return None
    if isinstance(gradient, tf.IndexedSlices):
        gradient = tf.convert_to_tensor(gradient)
    return gradient


# --- traced graphs kept across checks ---
#
# Tracing a vectorized graph costs 0.05-0.1 s, far more than a small check itself, so the graphs a check traces
# are kept for the next check of the same function. An entry is found by the function object (held weakly: the
# cache never keeps it alive) and a key of everything a trace depends on: the argument structure (checked and
# other floating tensors by shape and dtype only, as they are graph inputs, never captured; integer and boolean
# tensors and other values by value; variables by identity, as a graph reads them when it runs), kwargs, the
# leaves and their dtypes inside fn, promote, train, the model and the parameter variables by identity, the
# outputs, Keras' floatx, and what fn reads from outside its arguments (closure cells, globals it names,
# defaults, recursively through the Python functions it reaches: tensors, variables, models and other objects by
# identity, NumPy arrays and Python scalars, ints included, by value), taken when the check is prepared, before
# it first runs fn. An int or a list of ints fn bumps while it runs (a trace or call counter) does not defeat the
# cache: the entries of the state a check started from are also kept under the state it leaves behind
# (WeakFunctionCache.keep_after_run, see gradbridge._fingerprint). Anything that cannot be keyed safely is not
# cached. The graphs hold no Python object of the check. Every check still compares its first batched chunk with
# the eager loop, so a graph gone stale in a way the key missed (an attribute of a Keras layer changed) is
# dropped, not trusted. Only first-order checks are cached (an order-2 function closes over its cotangent).

_CACHE: WeakFunctionCache["_Traced"] = WeakFunctionCache(per_function=16)


def clear_cache() -> None:
    """Drop every traced graph kept across checks."""
    _CACHE.clear()


def cache_size() -> int:
    """How many entries (each holding the traced graphs of one function and key) are kept; one kept under
    several keys (the values of a counter fn bumps) counts once."""
    return len(_CACHE)


class _Traced:
    """What the checks of one function and key share: the traced graphs by path, the paths that cannot be
    batched (and why, found while tracing), flags found while tracing, and weak references to the objects
    keyed by identity (an id names an object only while it lives)."""

    def __init__(self, refs: List[Any]) -> None:
        self.refs = refs
        self.graphs: Dict[str, Any] = {}
        self.refused: Dict[str, str] = {}
        self.flags: Dict[str, List[bool]] = {}

    def alive(self) -> bool:
        return all(ref() is not None for ref in self.refs)


class _Keyer(Fingerprinter):
    """Builds the hashable tokens of a cache key, collecting weak references to what it keys by identity."""

    #: Packages whose functions and objects are keyed by identity only, not followed inside.
    libraries = BASE_LIBRARIES | {"tensorflow", "keras", "tf_keras", "absl", "google"}

    def __init__(self) -> None:
        super().__init__()
        self._walking: set = set()  # ids of the argument containers on the current path of :meth:`tree`

    def constant(self, value: Any) -> Any:
        """A value a trace bakes in (an argument that is not a graph input): by value, or a variable by identity."""
        if isinstance(value, (tf.Variable,)) or _is_keras_variable(value):
            return ("variable", self.identity(value))
        if isinstance(value, tf.Tensor):
            if not hasattr(value, "numpy"):
                raise Uncacheable("symbolic tensor")
            return ("tensor", tuple(value.shape), value.dtype.name, digest(np.asarray(value.numpy())))
        if isinstance(value, VALUE_TYPES):
            return (type(value), value)
        if isinstance(value, np.generic):
            return ("scalar", value.dtype.str, value.tobytes())
        if isinstance(value, np.ndarray):
            return ("ndarray", value.shape, value.dtype.str, digest(value))
        if isinstance(value, tf.DType):
            return ("dtype", value.name)
        raise Uncacheable(type(value).__name__)

    def tree(self, node: Any, leaf: Callable[[Any], Any], depth: int = 0) -> Any:
        """The token of an argument tree, walked as :func:`gradbridge._tree.flatten` walks it (tensors and
        variables are leaves, given to ``leaf`` in the same order as the candidates)."""
        if depth > 32:
            raise Uncacheable("argument nested too deep")
        if _is_tensor(node):
            return leaf(node)
        if isinstance(node, (dict, list, tuple)):
            walking = self._walking
            if id(node) in walking:  # a structure that contains itself (the check passes the inner one through)
                raise Uncacheable("an argument that contains itself")
            walking.add(id(node))
            try:
                if isinstance(node, dict):
                    return (self.identity(type(node)), tuple((self.constant(k), self.tree(v, leaf, depth + 1))
                                                             for k, v in node.items()))
                return (self.identity(type(node)), tuple(self.tree(v, leaf, depth + 1) for v in node))
            finally:
                walking.discard(id(node))
        if is_walked_node(node):  # a dataclass or registered node: its leaves are candidates this walk skips
            raise Uncacheable(f"a {type(node).__name__} among the arguments")
        return self.constant(node)

    def adapter_object(self, value: Any, depth: int) -> Any:
        """Eager tensors (they never change) by identity; variables, Keras layers and tf.Modules by identity
        only, as a graph reads them when it runs (a layer's settings: see above)."""
        if isinstance(value, tf.Tensor):
            if not hasattr(value, "numpy"):
                raise Uncacheable("symbolic tensor")
            return ("tensor", self.identity(value))
        if isinstance(value, tf.Variable) or _is_keras_variable(value) or _is_keras_layer(value) \
                or isinstance(value, tf.Module):
            return ("object", self.identity(value))
        return UNHANDLED


def _environment(fn: Any) -> Optional[Tuple[Any, List[Any]]]:
    """The token of what ``fn`` reads besides its arguments and the weak references that must stay alive for
    it to hold; None where it cannot be keyed safely."""
    keyer = _Keyer()
    try:
        token = keyer.environment(fn)
        hash(token)
    except (Uncacheable, TypeError, RecursionError):
        return None
    return token, keyer.refs


def _cache_key(problem: "TensorFlowProblem") -> Tuple[Tuple[Any, Any], List[Any]]:
    """The key of a first-order check's traced graphs, ``(structure, environment)`` with the environment taken
    when the check was prepared, and the weak references that must stay alive for an entry to hold (raises
    Uncacheable)."""
    if problem.environment is None:
        raise Uncacheable("what fn reads")
    environment, environment_refs = problem.environment
    keyer = _Keyer()
    chosen = set(problem.chosen)
    fed = set(problem.fed_positions)
    position = iter(range(len(problem.candidates)))

    def argument(value: Any) -> Any:
        i = next(position)
        c = problem.candidates[i]
        if i in chosen:
            return ("checked", c.shape, c.dtype)
        if i in fed:
            return ("fed", c.shape, c.dtype)
        return keyer.constant(value)

    spec = problem.spec
    keras = _keras()
    structure = (tuple(keyer.tree(arg, argument) for arg in spec.args),
                 tuple(sorted((str(k), keyer.tree(v, keyer.constant)) for k, v in spec.kwargs.items())),
                 tuple(problem.chosen),
                 tuple((leaf.name, leaf.shape, leaf.dtype, leaf.offset, leaf.kind) for leaf in problem.leaves),
                 tuple(dtype.name for dtype in problem.feed),
                 tuple((c.name, keyer.identity(c.value)) for c in problem.candidates if c.kind == "param"),
                 keyer.identity(problem.model) if problem.model is not None else None,
                 problem.promote, problem.promote_model, bool(spec.train),
                 tuple((o.name, o.shape, o.dtype) for o in problem.outputs or ()),
                 keras.config.floatx() if keras is not None and hasattr(keras, "config") else None)
    key = (structure, environment)
    hash(key)
    return key, keyer.refs + environment_refs


def _entry_for(problem: "TensorFlowProblem") -> Tuple[Optional[_Traced], bool, Optional[Tuple[Any, Any]]]:
    """The cache entry of a first-order check (an empty one is made and kept when there is none yet), whether an
    earlier check had made it, and its key; (None, False, None) when the check cannot be cached."""
    try:
        key, refs = _cache_key(problem)
    except (Uncacheable, TypeError, RecursionError):
        return None, False, None
    entry = _CACHE.get(problem.spec.fn, key, keep=_Traced.alive)
    if entry is not None:
        return entry, True, key
    entry = _Traced(refs)
    return (entry, False, key) if _CACHE.put(problem.spec.fn, key, entry) else (None, False, None)


def _joined(leaves: Sequence[LeafSpec], gradients: Sequence[Optional[tf.Tensor]]) -> tf.Tensor:
    """One flat float64 vector of per-leaf gradients, zeros where TensorFlow gave None (differentiable)."""
    return tf.concat([tf.zeros([leaf.size], tf.float64) if g is None else tf.reshape(tf.cast(g, tf.float64), [-1])
                      for leaf, g in zip(leaves, gradients)], axis=0)


def _pullback(forward: Forward, sources: List[Source], leaves: Sequence[LeafSpec], u: tf.Tensor
              ) -> Tuple[tf.GradientTape, tf.Tensor, List[Optional[tf.Tensor]], List[bool]]:
    """The VJP at the sources for the cotangent ``u``, recorded by a persistent tape watching ``u``, so that
    differentiating it again with respect to ``u`` transposes it (``J t`` is the gradient of ``g = J^T u``
    along ``t``). Returns that tape, the flat ``g``, the per-leaf gradients (None where TensorFlow defines
    none) and, per leaf, whether the tape links its gradient to ``u`` (False where the backward pass cannot
    be differentiated). Raises ModeUnsupportedError where an op of the backward pass has no gradient."""
    with tf.GradientTape(watch_accessed_variables=False) as inner:
        _watch(inner, sources)
        out = _flat(forward(sources))
    with tf.GradientTape(persistent=True, watch_accessed_variables=False) as outer:
        outer.watch(u)
        gradients = [_dense(g) for g in inner.gradient(out, sources, output_gradients=u)]
        g = _joined(leaves, gradients)
    with _second_derivatives():
        links = [grad is not None and outer.gradient(grad, u) is not None for grad in gradients]
    return outer, g, gradients, links


def _transposed_row(tape: tf.GradientTape, g: tf.Tensor, u: tf.Tensor, tangent: tf.Tensor) -> tf.Tensor:
    """``J t`` for one tangent: the gradient of ``g = J^T u`` with respect to ``u`` along ``t``."""
    with _second_derivatives():
        row = tape.gradient(g, u, output_gradients=tangent)
    return tf.zeros_like(u) if row is None else tf.cast(row, tf.float64)


@contextlib.contextmanager
def _second_derivatives() -> Iterator[None]:
    """While differentiating a backward pass: TensorFlow's LookupError for an op without a registered gradient
    (``SoftsignGrad``, the gradient op of ``tf.nn.softsign``, for one) becomes ModeUnsupportedError."""
    try:
        yield
    except LookupError as exc:
        raise ModeUnsupportedError(f"cannot transpose the VJP: TensorFlow cannot differentiate the backward pass "
                                   f"({_first_line(exc)})") from exc


class TensorFlowPrepared(ProblemBackedFunction):
    """A TensorFlow function over the flat float64 vector; ``forward`` maps sources to output tensors."""

    analytic_source = "TensorFlow autodiff (GradientTape, ForwardAccumulator; your tf.custom_gradient rules)"
    #: Try one vectorized ``tf.function`` per chunk before the eager per-point loop (False: always the loop).
    batching = True

    def __init__(self, problem: TensorFlowProblem, forward: Forward, x0: np.ndarray, order: int = 1,
                 outputs: Optional[List[LeafSpec]] = None, notes: Optional[List[str]] = None) -> None:
        self.problem = problem
        self.forward = forward
        self.leaves = problem.leaves
        self.x0 = x0
        self.order = order
        self._outputs = outputs
        self.notes = list(notes or [])
        self.working_eps = problem.working_eps
        self.undefined_gradients: Dict[str, str] = {}
        self._links: Optional[np.ndarray] = None
        # batched paths: None until decided on the first call, then "batched" or "loop" for good
        self._paths: Dict[str, Optional[str]] = {"evaluate": None, "vjp": None, "transposed": None}
        self._graphs: Dict[str, Any] = {}
        # found while tracing, per path and per leaf: "none" (the gradient is None), "links" (see _pullback)
        self._flags: Dict[str, Dict[str, List[bool]]] = {}
        self._entry: Optional[_Traced] = None  # this check's entry in the cache of traced graphs
        self._entry_known = False  # whether an earlier check of the same function and key had made it
        self._key: Optional[Tuple[Any, Any]] = None  # the key the entry is kept under
        self._keyed = False
        self._cotangent: Optional[np.ndarray] = None  # the fixed cotangent the transposed VJP starts from

    def _cache_entry(self) -> Optional[_Traced]:
        """This check's entry in the cache of traced graphs (looked up, or made, on first use); None for a
        check that is not cached (order 2, or something in the key cannot be keyed safely)."""
        if not self._keyed:
            self._keyed = True
            if self.forward == self.problem.call:
                self._entry, self._entry_known, self._key = _entry_for(self.problem)
        return self._entry

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """The problem's session; on leaving it normally, the cache entries follow the counters fn bumped."""
        with self.problem.session():
            yield
            self._keep_after_run()

    def _keep_after_run(self) -> None:
        """Keep the cache entries of the state this check started from also under the state fn left behind,
        where the two differ in ints only (a counter fn bumps): the next check starts from it."""
        if self._entry is None or self._key is None:
            return
        environment = _environment(self.problem.spec.fn)
        if environment is not None and _CACHE.keep_after_run(self.problem.spec.fn, self._key[1], environment[0]):
            self._key = (self._key[0], environment[0])

    def _worth_batching(self, path: str, rows: int) -> bool:
        """Whether this chunk tries the vectorized graph. Tracing one costs about 0.05-0.1 s, about 200 eager
        calls, so a small chunk runs the loop unless its graph is kept from an earlier check, or an earlier
        check of the same function and key ran (a function checked again is worth one trace: later checks
        reuse it), or a chunk of :data:`MIN_BATCH_ROWS` rows has paid for the trace."""
        if rows <= 0 or not self.batching or self._paths[path] == "loop":
            return False
        if self._paths[path] == "batched" or rows >= MIN_BATCH_ROWS:
            return True
        if self.problem.unbatchable() is not None:
            return False
        entry = self._cache_entry()
        return entry is not None and (path in entry.graphs or self._entry_known)

    # --- evaluation: one vectorized graph per chunk, or one eager call per point ---

    @_process.runs_user_code
    def evaluate(self, points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, dtype=np.float64)
        if self._worth_batching("evaluate", len(points)):
            batched = self._evaluate_batched(points)
            if batched is not None:
                return batched
        return self._evaluate_loop(points)

    @_process.runs_user_code
    def evaluate_edits(self, positions: np.ndarray, values: np.ndarray) -> np.ndarray:
        """``evaluate`` of the copies of ``x0`` with element ``positions[k]`` set to ``values[k]``. Once the
        points run batched, the vectorized graph builds them from ``x0`` itself, next to the computation."""
        if self._paths["evaluate"] == "batched" and "evaluate" in self._graphs and len(positions) > 1:
            try:
                result = self._run("evaluate", tf.constant(self.x0[None, :], tf.float64),
                                   tf.constant(len(positions), tf.int32), tf.constant(positions, tf.int32),
                                   tf.constant(values, tf.float64)).numpy()
            except Exception:  # the points path runs the chunk again and raises, with its point, if fn does
                result = None
            if result is not None and result.shape == (len(positions), sum(s.size for s in self.output_specs)):
                return result
        points = np.empty((len(positions), len(self.x0)))
        points[:] = self.x0
        points[np.arange(len(positions)), positions] = values
        return self.evaluate(points)

    def _eager_outputs(self, points: np.ndarray) -> np.ndarray:
        """What the eager loop gives at ``points``: the probe's kept outputs where a point is the one it ran
        (the probe found fn deterministic there), the loop for the others."""
        kept = self.problem.eager_at
        if kept is None or self.forward != self.problem.call:
            return self._evaluate_loop(points)
        point, outputs = kept
        same = [np.array_equal(row, point) for row in points]
        if not any(same):
            return self._evaluate_loop(points)
        rows = np.empty((len(points), len(outputs)))
        rows[same] = outputs
        others = [k for k, hit in enumerate(same) if not hit]
        if others:
            rows[others] = self._evaluate_loop(points[others])
        return rows

    def _evaluate_loop(self, points: np.ndarray) -> np.ndarray:
        rows = []
        for point in points:
            with self.problem.applied(point) as sources:
                rows.append(_flat(self.forward(sources)).numpy())
        return np.stack(rows)

    def _evaluate_batched(self, points: np.ndarray) -> Optional[np.ndarray]:
        """All rows at once through ``tf.vectorized_map`` in one ``tf.function``; None when the loop must run."""
        first = self._paths["evaluate"] is None
        if first:
            reason = self.problem.unbatchable() or self._graph("evaluate")
            if reason is not None:
                return self._fall_back("evaluate", reason)
        try:
            no_edits = (tf.constant(1, tf.int32), tf.zeros([0], tf.int32), tf.zeros([0], tf.float64))
            result = self._run("evaluate", tf.constant(points, tf.float64), *no_edits).numpy()
        except Exception as exc:  # the loop runs the chunk again and raises, with its point, if fn does
            return self._fall_back("evaluate", f"the vectorized graph raised {type(exc).__name__}: "
                                               f"{_first_line(exc)}", decided=not first)
        expected = sum(spec.size for spec in self.output_specs)
        if result.shape != (len(points), expected):
            return self._fall_back("evaluate", f"the vectorized graph returned shape {result.shape}, expected "
                                               f"{(len(points), expected)}", decided=not first, stale=True)
        if first:
            rows = sorted({0, len(points) - 1})
            try:
                looped = self._eager_outputs(points[rows])
            except Exception:
                self._fall_back("evaluate", "the eager loop raised where the vectorized graph did not")
                raise
            mismatch = self._mismatch(result[rows], looped)
            if mismatch is not None:
                return self._fall_back("evaluate", f"its outputs differ from the eager loop's ({mismatch})",
                                       stale=True)
            self._decide("evaluate", "batched", "")
        return result

    # --- the vectorized graphs: traced once per function and key, kept across checks ---

    def _graph(self, which: str) -> Optional[str]:
        """Make the vectorized graph of ``which`` ready: kept from an earlier check of the same function and
        key, or traced now (and kept). Returns why it cannot be used (also kept), or None."""
        entry = self._cache_entry()
        if entry is not None and which in entry.graphs:
            self._graphs[which] = entry.graphs[which]
            self._flags[which] = entry.flags.get(which, {})
            return None
        if entry is not None and which in entry.refused:
            return entry.refused[which]
        reason = self._trace(which)
        if entry is not None:
            if reason is None:
                entry.graphs[which] = self._graphs[which]
                entry.flags[which] = self._flags.get(which, {})
            else:
                entry.refused[which] = reason
        return reason

    def _run(self, which: str, *inputs: tf.Tensor) -> Any:
        """Run the graph of ``which`` on ``inputs`` and this check's fixed inputs (see ``fixed_inputs``)."""
        return self._graphs[which](*inputs, *self.problem.fixed_inputs())

    def _trace(self, which: str) -> Optional[str]:
        """Build (trace) the vectorized ``tf.function`` for ``which``; returns why it cannot be used, or None.
        Everything that changes between checks is an input of the graph (the points or ``x0``, the
        cotangents or tangents, the fixed inputs), so a graph holds for every check with the same key."""
        n = len(self.x0)
        m = sum(spec.size for spec in self.output_specs)
        flags: Dict[str, List[bool]] = {}
        build = {"evaluate": self._evaluate_graph, "vjp": self._vjp_graph, "transposed": self._transposed_graph}
        graph, signature = build[which](n, m, flags)
        fixed = [tf.TensorSpec(t.shape, t.dtype) for t in self.problem.fixed_inputs()]
        try:
            concrete = tf.function(graph, input_signature=signature + fixed, autograph=False).get_concrete_function()
        except Exception as exc:  # not vectorizable (an op without a pfor rule), or graph-only trouble in fn
            return f"it could not be vectorized ({type(exc).__name__}: {_first_line(exc)})"
        unsafe = _unsafe_ops(concrete.graph)
        if unsafe is not None:
            return unsafe
        self._graphs[which] = concrete
        self._flags[which] = flags
        return None

    def _evaluate_graph(self, n: int, m: int, flags: Dict[str, List[bool]]) -> Tuple[Callable[..., Any], list]:
        """``(base, repeat, positions, values, *fixed) -> outputs``, one row per point. The points are the rows
        of ``base`` repeated ``repeat`` times with element ``positions[k]`` of row k set to ``values[k]``: given
        points (``repeat`` 1, no edits), or ``x0`` and the edits of an element-by-element check (built here,
        next to the computation, rather than written by NumPy and copied in)."""
        problem, forward = self.problem, self.forward

        def graph(base: tf.Tensor, repeat: tf.Tensor, positions: tf.Tensor, values: tf.Tensor,
                  *fixed: tf.Tensor) -> tf.Tensor:
            def one_point(x: tf.Tensor) -> tf.Tensor:
                with problem.symbolic(x, fixed) as sources:
                    return _flat(forward(sources))

            points = tf.tile(base, tf.stack([repeat, 1]))
            edits = tf.stack([tf.range(tf.shape(positions)[0]), positions], axis=1)
            points = tf.tensor_scatter_nd_update(points, edits, values)
            return tf.vectorized_map(one_point, points, fallback_to_while_loop=False)

        return graph, [tf.TensorSpec([None, n], tf.float64), tf.TensorSpec([], tf.int32),
                       tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.float64)]

    def _vjp_graph(self, n: int, m: int, flags: Dict[str, List[bool]]) -> Tuple[Callable[..., Any], list]:
        """``(x, cotangents, *fixed) -> VJPs``: one recorded forward pass at ``x``, ``tape.gradient``
        vectorized over the cotangents; ``flags["none"]``: the leaves whose gradient is None."""
        problem, forward, leaves = self.problem, self.forward, self.leaves

        def graph(x: tf.Tensor, cotangents: tf.Tensor, *fixed: tf.Tensor) -> tf.Tensor:
            with problem.symbolic(x, fixed) as sources:
                with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
                    _watch(tape, sources)
                    out = _flat(forward(sources))

                def one_cotangent(cotangent: tf.Tensor) -> tf.Tensor:
                    gradients = [_dense(g) for g in tape.gradient(out, sources, output_gradients=cotangent)]
                    flags["none"] = [g is None for g in gradients]
                    return _joined(leaves, gradients)

                return tf.vectorized_map(one_cotangent, cotangents, fallback_to_while_loop=False)

        return graph, [tf.TensorSpec([n], tf.float64), tf.TensorSpec([None, m], tf.float64)]

    def _transposed_graph(self, n: int, m: int, flags: Dict[str, List[bool]]) -> Tuple[Callable[..., Any], list]:
        """``(x, u, tangents, *fixed) -> (J t per tangent, J^T u)``: the VJP for the cotangent ``u``, recorded
        once, differentiated with respect to ``u`` vectorized over the tangents (see :func:`_pullback`)."""
        problem, forward, leaves = self.problem, self.forward, self.leaves

        def graph(x: tf.Tensor, u: tf.Tensor, tangents: tf.Tensor, *fixed: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
            with problem.symbolic(x, fixed) as sources:
                tape, g, gradients, links = _pullback(forward, sources, leaves, u)
                flags["none"] = [grad is None for grad in gradients]
                flags["links"] = links
                rows = tf.vectorized_map(lambda t: _transposed_row(tape, g, u, t), tangents,
                                         fallback_to_while_loop=False)
                return rows, g

        return graph, [tf.TensorSpec([n], tf.float64), tf.TensorSpec([m], tf.float64),
                       tf.TensorSpec([None, n], tf.float64)]

    def _mismatch(self, batched: np.ndarray, looped: np.ndarray) -> Optional[str]:
        """None when the batched rows equal the looped ones to ~1e3 eps (relative to each row's magnitude)."""
        finite = np.isfinite(batched) & np.isfinite(looped)
        if not np.array_equal(batched[~finite], looped[~finite], equal_nan=True):
            return "not finite in different places"
        tol = 1e3 * self.working_eps
        scale = np.max(np.where(finite, np.abs(looped), 0.0), axis=1, keepdims=True)
        error = np.abs(batched - looped)
        bad = finite & (error > tol * np.maximum(np.abs(looped), scale))
        if bad.any():
            return f"largest difference {float(error[bad].max()):.3g}"
        return None

    def _fall_back(self, which: str, reason: str, decided: bool = False, stale: bool = False) -> None:
        """The eager loop from now on (``decided``: after batched chunks had run); the caller runs it.
        ``stale``: the graph disagreed with the loop, so it is dropped from the cache too (the next check
        traces afresh rather than trusting it)."""
        if stale and self._entry is not None:
            self._entry.graphs.pop(which, None)
        self._decide(which, "loop", reason, later=decided)

    def _decide(self, which: str, path: str, reason: str, later: bool = False) -> None:
        """Remember the path for good and say so in the notes."""
        self._paths[which] = path
        if path == "loop":
            self._graphs.pop(which, None)
        what = {"evaluate": "evaluations", "vjp": "reverse-mode products (VJPs)",
                "transposed": "transposed reverse-mode products (J t from the VJP)"}[which]
        unit = {"evaluate": "point", "vjp": "cotangent", "transposed": "tangent"}[which]
        if path == "batched":
            note = (f"TensorFlow {what} batched: all {unit}s of a chunk in one tf.function through tf.vectorized_map "
                    "(checked against the eager loop on the first chunk)")
        else:
            when = "from then on, after vectorized chunks," if later else ""
            note = f"TensorFlow {what} {when} one {unit} at a time (eager loop): {reason}".replace("  ", " ")
        self.notes.append(note)

    def _gradient_rows(self, gradients: Sequence[Any]) -> np.ndarray:
        """One flat float64 row from per-leaf gradients; ``None`` becomes zeros and is recorded."""
        parts = []
        for leaf, gradient in zip(self.leaves, gradients):
            gradient = _dense(gradient)
            if gradient is None:
                self.undefined_gradients[leaf.name] = _NO_GRADIENT
                parts.append(np.zeros(leaf.size))
            else:
                parts.append(np.asarray(gradient.numpy(), dtype=np.float64).reshape(-1))
        return np.concatenate(parts)

    # --- reverse mode: VJPs ---

    @_process.runs_user_code
    def vjp(self, cotangents: np.ndarray) -> np.ndarray:
        cotangents = np.asarray(cotangents, dtype=np.float64)
        if self._worth_batching("vjp", len(cotangents)):
            batched = self._vjp_batched(cotangents)
            if batched is not None:
                return batched
        return self._vjp_loop(cotangents)

    def _vjp_batched(self, cotangents: np.ndarray) -> Optional[np.ndarray]:
        """All cotangents at once: one recorded forward pass at ``x0``, ``tape.gradient`` vectorized over the
        cotangents; None when the loop must run."""
        first = self._paths["vjp"] is None
        if first:
            reason = self.problem.unbatchable() or self._graph("vjp")
            if reason is not None:
                return self._fall_back("vjp", reason)
        try:
            result = self._run("vjp", tf.constant(self.x0, tf.float64), tf.constant(cotangents, tf.float64)).numpy()
        except Exception as exc:
            return self._fall_back("vjp", f"the vectorized graph raised {type(exc).__name__}: {_first_line(exc)}",
                                   decided=not first)
        if result.shape != (len(cotangents), len(self.x0)):
            return self._fall_back("vjp", f"the vectorized graph returned shape {result.shape}", decided=not first,
                                   stale=True)
        none = self._flags["vjp"].get("none", [False] * len(self.leaves))
        if first:
            looped = self._vjp_loop(cotangents[:1])  # also records the loop's None gradients
            undefined = {leaf.name for leaf, missing in zip(self.leaves, none) if missing}
            if undefined != set(self.undefined_gradients):
                return self._fall_back("vjp", "its undefined (None) gradients differ from the eager tape's", stale=True)
            mismatch = self._mismatch(result[:1], looped)
            if mismatch is not None:
                return self._fall_back("vjp", f"its gradients differ from the eager tape's ({mismatch})", stale=True)
            self._decide("vjp", "batched", "")
        for leaf, missing in zip(self.leaves, none):
            if missing:
                self.undefined_gradients[leaf.name] = _NO_GRADIENT
        return result

    def _vjp_loop(self, cotangents: np.ndarray) -> np.ndarray:
        rows = []
        with self.problem.applied(self.x0) as sources:
            with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
                _watch(tape, sources)
                out = _flat(self.forward(sources))
            for cotangent in cotangents:  # one recorded forward pass, one backward pass per cotangent
                gradients = tape.gradient(out, sources, output_gradients=tf.constant(cotangent, tf.float64))
                rows.append(self._gradient_rows(gradients))
            del tape
        return np.stack(rows)

    # --- the transposed VJP: J t from differentiating u -> J^T u ---

    @_process.runs_user_code
    def vjp_transposed(self, tangents: np.ndarray) -> np.ndarray:
        """``J t`` per row of ``tangents`` (k, n) -> (k, m), for the very ``J`` :meth:`vjp` implements (with the
        user's ``tf.custom_gradient`` rules): the VJP ``g = J^T u`` for a fixed random cotangent ``u`` is
        recorded by a tape watching ``u`` and differentiated again, ``J t = d<g, t>/du``. Raises
        ModeUnsupportedError where the backward pass cannot be differentiated."""
        tangents = np.asarray(tangents, dtype=np.float64)
        if self._worth_batching("transposed", len(tangents)):
            batched = self._transposed_batched(tangents)
            if batched is not None:
                return batched
        return self._transposed_loop(tangents)

    def _transpose_cotangent(self) -> tf.Tensor:
        """The cotangent ``u`` the transposed VJP differentiates at: random (a zero one could hide a rule
        that is not linear in its cotangent), fixed for the check."""
        if self._cotangent is None:
            m = sum(spec.size for spec in self.output_specs)
            self._cotangent = np.random.default_rng(self.problem.spec.seed).standard_normal(m)
        return tf.constant(self._cotangent, tf.float64)

    def _transposed_batched(self, tangents: np.ndarray) -> Optional[np.ndarray]:
        """All tangents at once through the graph of :meth:`_transposed_graph`; None when the loop must run."""
        first = self._paths["transposed"] is None
        if first:
            reason = self.problem.unbatchable() or self._graph("transposed")
            if reason is not None:
                return self._fall_back("transposed", reason)
        try:
            rows, g = self._run("transposed", tf.constant(self.x0, tf.float64), self._transpose_cotangent(),
                                tf.constant(tangents, tf.float64))
            rows, g = rows.numpy(), g.numpy()
        except Exception as exc:
            return self._fall_back("transposed", f"the vectorized graph raised {type(exc).__name__}: "
                                                 f"{_first_line(exc)}", decided=not first)
        m = sum(spec.size for spec in self.output_specs)
        if rows.shape != (len(tangents), m):
            return self._fall_back("transposed", f"the vectorized graph returned shape {rows.shape}",
                                   decided=not first, stale=True)
        flags = self._flags["transposed"]
        self._check_transposable(g, flags["links"], flags["none"])
        if first:
            looped = self._transposed_loop(tangents[:1])
            mismatch = self._mismatch(rows[:1], looped)
            if mismatch is not None:
                return self._fall_back("transposed", f"its products differ from the eager tapes' ({mismatch})",
                                       stale=True)
            self._decide("transposed", "batched", "")
        return rows

    def _transposed_loop(self, tangents: np.ndarray) -> np.ndarray:
        """One eager recording of the VJP at ``x0``, one backward pass through it per tangent."""
        u = self._transpose_cotangent()
        rows = []
        with self.problem.applied(self.x0) as sources:
            tape, g, gradients, links = _pullback(self.forward, sources, self.leaves, u)
            self._check_transposable(g.numpy(), links, [grad is None for grad in gradients])
            for tangent in tangents:
                rows.append(_transposed_row(tape, g, u, tf.constant(tangent, tf.float64)).numpy())
            del tape
        return np.stack(rows) if rows else np.zeros((0, len(u)))

    def _check_transposable(self, g: np.ndarray, links: Sequence[bool], none: Sequence[bool]) -> None:
        """Record the leaves without a gradient (as :meth:`vjp` does), and raise ModeUnsupportedError for a
        leaf whose VJP is not zero yet does not depend on the cotangent on the tape: its backward pass cannot
        be differentiated, and ``J t`` would silently leave it out."""
        for leaf, linked, missing in zip(self.leaves, links, none):
            if missing:
                self.undefined_gradients[leaf.name] = _NO_GRADIENT
            elif not linked and np.any(g[leaf.slice] != 0):
                raise ModeUnsupportedError(
                    f"cannot transpose the VJP: TensorFlow cannot differentiate the backward pass that gives the "
                    f"gradient of {leaf.name} with respect to its cotangent (the tape returned None: a "
                    "tf.custom_gradient rule computing through NumPy, tf.numpy_function or tf.stop_gradient on the "
                    "upstream gradient); use the dense Jacobian instead")

    def _output_links(self) -> np.ndarray:
        """``links[k, j]``: whether output block k depends differentiably on leaf j (from reverse mode)."""
        if self._links is None:
            with self.problem.applied(self.x0) as sources:
                with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
                    _watch(tape, sources)
                    outs = [tf.cast(t, tf.float64) for t in self.forward(sources)]
                self._links = np.array([[g is not None for g in tape.gradient(out, sources)] for out in outs])
                del tape
        return self._links

    @_process.runs_user_code
    def jvp(self, tangents: np.ndarray) -> np.ndarray:
        if self.order != 1:
            raise ModeUnsupportedError("forward mode is checked for first derivatives only")
        rows = []
        for tangent in tangents:
            with self.problem.applied(self.x0) as sources, _eager_custom_gradients() as custom:
                directions = [tf.cast(tf.constant(tangent[leaf.slice].reshape(leaf.shape), tf.float64), s.dtype)
                              for leaf, s in zip(self.leaves, sources)]
                try:
                    with tf.autodiff.ForwardAccumulator(sources, directions) as accumulator:
                        outs = self.forward(sources)
                except LookupError as exc:  # forward mode goes through gradient rules an op may lack
                    raise ModeUnsupportedError(f"forward mode unsupported: {str(exc).splitlines()[0]}") from exc
                pushed = [accumulator.jvp(t) for t in outs]
            if custom:
                names = ", ".join(sorted(set(custom)))
                raise ModeUnsupportedError(
                    f"forward mode cannot check tf.custom_gradient rules run eagerly ({names}): TensorFlow's "
                    "ForwardAccumulator ignores them and differentiates the ops inside instead; use analytic='rev' "
                    "(inside a tf.function, forward mode does use the rule)")
            rows.append(self._pushed_row(outs, pushed))
        return np.stack(rows)

    def _pushed_row(self, outs: Sequence[tf.Tensor], pushed: Sequence[Optional[tf.Tensor]]) -> np.ndarray:
        links = self._output_links()
        for j, leaf in enumerate(self.leaves):
            if not links[:, j].any():
                self.undefined_gradients[leaf.name] = _NO_GRADIENT
        parts = []
        for k, (out, tangent) in enumerate(zip(outs, pushed)):
            if tangent is None:
                if links[k].any():
                    raise ModeUnsupportedError(
                        f"forward mode unsupported: TensorFlow has no forward-mode rule for an op between the "
                        f"checked inputs and output {self.output_specs[k].name} (ForwardAccumulator returned None, "
                        "while reverse mode finds a gradient; e.g. tf.numpy_function)")
                parts.append(np.zeros(int(np.prod(out.shape))))
            else:
                parts.append(np.asarray(tf.cast(tangent, tf.float64).numpy()).reshape(-1))
        return np.concatenate(parts)

    def gradient_function(self, cotangent: np.ndarray) -> "TensorFlowPrepared":
        if self.order != 1:
            raise ModeUnsupportedError("gradbridge checks up to second derivatives")
        v = tf.constant(cotangent, tf.float64)
        first = self.forward
        leaves = self.leaves

        def gradient(sources: List[Source]) -> List[tf.Tensor]:
            with tf.GradientTape(watch_accessed_variables=False) as inner:
                _watch(inner, sources)
                out = _flat(first(sources))
            grads = inner.gradient(out, sources, output_gradients=v)  # recorded by an enclosing tape, if any
            return [tf.zeros(leaf.shape, tf.float64) if g is None else tf.cast(_dense(g), tf.float64)
                    for leaf, g in zip(leaves, grads)]

        return TensorFlowPrepared(self.problem, gradient, self.x0, order=2, outputs=gradient_output_specs(leaves),
                                  notes=self.notes)


class TensorFlowAdapter:
    """Adapter for TensorFlow (and Keras 3 models on the TensorFlow backend)."""

    name = "tensorflow"
    module_name = "tensorflow"
    install_hint = 'pip install "gradbridge[tensorflow]"'

    def clear_cache(self) -> None:
        """Drop the traces, compiled functions and batching decisions kept across checks."""
        clear_cache()

    def cache_size(self) -> int:
        return cache_size()

    def owns(self, value: Any) -> bool:
        return (_is_tensor(value) or isinstance(value, tf.Module) or _is_keras_layer(value)
                or _is_tf_function(value) or isinstance(value, _COMPOSITE))

    def version(self) -> str:
        return tf.__version__

    def probe_float64(self) -> Tuple[bool, str]:
        """Whether GradientTape differentiates in float64 here (``gradbridge backends``), and a note."""
        x = tf.constant([1.0, 2.0], dtype=tf.float64)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(x * x)
        gradient = tape.gradient(y, x)
        ok = gradient is not None and gradient.dtype == tf.float64
        return ok, "" if ok else f"GradientTape gave {None if gradient is None else gradient.dtype}"

    def prepare(self, spec: CheckSpec) -> Any:  # TensorFlowPrepared, or HandWrittenGradient with grad=
        with _process.LOCK:  # variables read as the user left them, never inside another check's window
            return self._prepare(spec)

    def _prepare(self, spec: CheckSpec) -> Any:
        unchecked: List[Unchecked] = []
        candidates, rebuild_args = argument_candidates(
            spec.args, spec.arg_names, _is_tensor, lambda t: (tuple(t.shape), _dtype(t).name, _floating(t)),
            unchecked=unchecked,
            native="the TensorFlow backend checks tf.Tensor and tf.Variable values: pass tf.constant(...) to check it",
            not_checkable=_not_checkable)
        model, params = _parameters(spec)
        for p in params:
            v = p.variable
            candidates.append(Candidate(p.name, v, tuple(int(d) for d in v.shape), _dtype(v).name, _floating(v),
                                        "param"))
        unchecked.extend(_frozen_weights(model))
        leaves, chosen = layout_leaves(candidates, _expand_slash_prefixes(spec.wrt, candidates), unchecked)
        x0 = np.concatenate([_numpy(candidates[i].value).reshape(-1) for i in chosen])

        environment = _environment(spec.fn)  # before _probe runs fn: the state the check starts from

        def problem_for(promote: bool) -> TensorFlowProblem:
            problem = TensorFlowProblem(spec, candidates, leaves, chosen, rebuild_args, model, promote)
            problem.environment = environment
            return problem

        problem = problem_for(spec.promote)
        failure = _probe(problem, x0)
        notes: List[str] = []
        if spec.promote and failure is not None and problem.promotes():
            # float64 failed: the user's own dtypes (if they fail too, the core reports that error)
            problem = problem_for(False)
            if _probe(problem, x0) is None:
                notes.append(f"fn cannot run in float64 ({failure}), so it runs in the dtypes it was given")
        notes.extend(_notes(problem, model))
        notes.extend(unchecked_notes(candidates, chosen, unchecked))
        prepared = TensorFlowPrepared(problem, problem.call, x0, notes=notes)
        if spec.grad is not None:  # the analytic side is the user's hand-written gradient, never the tape
            return HandWrittenGradient(prepared, "TensorFlow", _hand_written_call(problem, prepared), _to_array,
                                       floating_candidates(candidates), chosen)
        return prepared

    # --- gb.compare (see gradbridge._adapter.CompareAdapter) ---

    def to_numpy(self, value: Any) -> Optional[np.ndarray]:
        if not _is_tensor(value):
            return None
        return np.array(value.numpy(), copy=True)

    def from_numpy(self, array: np.ndarray) -> tf.Tensor:
        return tf.constant(np.array(array, copy=True))

    def expected_params(self, fn: Callable[..., Any]) -> Optional[ExpectedParams]:
        """A Keras model's (or layer's) trainable variables, by path relative to the model with "/" as "."."""
        if not _is_keras_layer(fn):
            if isinstance(fn, tf.Module):
                raise InvalidArgumentError(
                    f"params: the tf.Variables of a {type(fn).__name__} (a tf.Module) cannot be loaded without "
                    "writing to them in their own dtype; pass a function fn(params, *args) reading the parameter "
                    "dict, or a Keras model")
            return None
        if not fn.built and not fn.variables:
            raise InvalidArgumentError(
                f"params: the Keras {type(fn).__name__} {fn.name!r} is not built yet, so it has no weights to load; "
                "call it once on an input (or build it) first")
        names = _keras_names(fn)
        trainable = {id(v) for v in fn.trainable_variables}
        required = {names[p.name]: tuple(int(d) for d in p.variable.shape) for p in _keras_params(fn)}
        unsupported = {_relative_name(fn, v.path): "a non-trainable Keras variable: gb.compare loads trainable "
                       "variables only (the model's own value is used)" for v in fn.variables if id(v) not in trainable}
        return ExpectedParams(f"Keras {type(fn).__name__} {fn.name!r}", 'variable paths relative to the model, "/" '
                              'written as "."', required, {}, unsupported)

    def bind_params(self, fn: Callable[..., Any], params: Optional[Mapping[str, np.ndarray]],
                    grad: Optional[Callable[..., Any]] = None) -> ParamBinding:
        """A Keras model: checked with ``params=model``; its variables are never written (the check reads
        them through shadow variables, which the core sets to the given values). A plain function: the flat
        dict of float64 tensors as first argument."""
        if _is_keras_layer(fn):
            note = "" if params is None else (f"Keras {type(fn).__name__} {fn.name!r}: params loaded by variable "
                                              "path into the check's float64 shadow variables (the model is untouched)")
            return ParamBinding(fn=fn, params=fn, names=_keras_names(fn), signature=getattr(fn, "call", fn), note=note)
        if params is None:
            return ParamBinding(fn=fn)
        if isinstance(fn, tf.Module):
            self.expected_params(fn)  # raises: a tf.Module's variables cannot be loaded
        native = {name: self.from_numpy(array) for name, array in params.items()}
        leaves, _ = flatten(native, "params", _is_tensor)
        return ParamBinding(fn=fn, leading_args=(native,), leading_names=("params",),
                            names={leaf.path: name for leaf, name in zip(leaves, native)})


def _to_array(value: Any) -> np.ndarray:
    """A gradient a hand-written ``grad=`` returned (tensor, variable, array, number) as a float64 NumPy array."""
    if isinstance(value, tf.IndexedSlices):
        value = tf.convert_to_tensor(value)
    if _is_tensor(value):
        value = value.numpy()
    return np.asarray(value, dtype=np.float64)


def _hand_written_call(problem: TensorFlowProblem, prepared: TensorFlowPrepared
                       ) -> Callable[[Optional[List[np.ndarray]]], Any]:
    """The user's ``grad`` at ``x0`` (see :mod:`backends._handwritten`), called inside :meth:`TensorFlowProblem.applied`
    as ``fn`` is: ``grad(*args)`` for ``None``, else ``grad(cotangent, *args)`` with the cotangent blocks put in
    fn's output structure as tensors in the outputs' dtypes (zeros for non-floating outputs). The structure
    comes from one run of fn at ``x0``."""
    structure: List[Any] = []

    def call(blocks: Optional[List[np.ndarray]]) -> Any:
        with problem.window(), problem.applied(prepared.x0) as sources:
            args = problem.arguments(sources)
            leading: tuple = ()
            if blocks is not None:
                if not structure:
                    problem.reseed()
                    leaves, rebuild = flatten(problem.fn(*args, **problem.spec.kwargs), "out", _is_tensor)
                    structure.append((rebuild, [(_floating(leaf.value), tf.convert_to_tensor(leaf.value))
                                                for leaf in leaves]))
                rebuild, outputs = structure[0]
                supply = iter(blocks)
                leading = (rebuild([tf.constant(next(supply), dtype=like.dtype) if floating else tf.zeros_like(like)
                                    for floating, like in outputs]),)
            problem.reseed()
            return problem.spec.grad(*leading, *args, **problem.spec.kwargs)

    return call


def _keras_params(model: Any) -> List[_Param]:
    """The check's parameters of a Keras model or layer (named by variable path, as ``params=model`` names them)."""
    return _unique([(v.path, v) for v in _dedupe(list(model.trainable_variables))])


def _relative_name(model: Any, path: str) -> str:
    """A variable path relative to ``model`` (its own name dropped, as Sequential and functional models prefix
    it) with "/" written as "." (``sequential/dense/kernel`` -> ``dense.kernel``)."""
    prefix = f"{model.name}/"
    return (path[len(prefix):] if path.startswith(prefix) else path).replace("/", ".")


def _keras_names(model: Any) -> Dict[str, str]:
    """The check's leaf name of each trainable variable -> its common (dotted, relative) name."""
    return {p.name: _relative_name(model, p.name) for p in _keras_params(model)}


def _probe(problem: TensorFlowProblem, x0: np.ndarray) -> Optional[str]:
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
                first = _flat(problem.call(sources)).numpy()
                second = _flat(problem.call(sources)).numpy()
                if np.isfinite(first).all() != np.isfinite(second).all():  # one run's NaN: a fault, not randomness
                    fault = first if not np.isfinite(first).all() else second
                    problem.trial_fault = (f"a trial call of fn at the checked point, before the check, returned "
                                           f"{fault[~np.isfinite(fault)][0]}; called again it returned finite values")
                    first, second = second, _flat(problem.call(sources)).numpy()
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


def _notes(problem: TensorFlowProblem, model: Optional[Any]) -> List[str]:
    """What the user should know: promoted leaves, the precision in force and why, the model's mode."""
    notes = promotion_notes([leaf for leaf, feed in zip(problem.leaves, problem.feed) if feed == tf.float64])
    if not problem.spec.promote:  # the user asked for their own dtypes: no reasons to give
        notes = [note for note in [own_precision(problem.leaves, problem.outputs or [])[1]] if note]
    elif problem.working_eps > _EPS["float64"]:
        precision = next(name for name, eps in _EPS.items() if eps == problem.working_eps)
        reasons = []
        low = [(leaf.name, problem.candidates[i].value) for leaf, i, feed in
               zip(problem.leaves, problem.chosen, problem.feed) if feed != tf.float64]
        if low:
            reasons.append(f"not promoted: {', '.join(name for name, _ in low)}")
        if any(problem.candidates[i].kind == "param" and not _is_keras_variable(problem.candidates[i].value)
               and feed != tf.float64 for i, feed in zip(problem.chosen, problem.feed)):
            reasons.append("tf.Variables are perturbed in place and cannot change dtype (create them in float64 "
                           "to check in float64)")
        if model is None and any(_is_keras_variable(value) for _, value in low):
            reasons.append("Keras variables given in a list are read in their own dtype (pass the model as params= "
                           "to check it in float64)")
        low_outputs = [spec.name for spec, dtype in zip(problem.outputs or [], problem.output_dtypes)
                       if dtype != tf.float64]
        if low_outputs:
            reasons.append(f"fn returns {', '.join(low_outputs)} below float64"
                           + (" (a Keras Loss object computes in its own dtype, float32 unless created with "
                              "dtype='float64'; loss functions such as keras.losses.mean_squared_error keep "
                              "the input dtype)" if _keras() is not None else ""))
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


ADAPTER = TensorFlowAdapter()
