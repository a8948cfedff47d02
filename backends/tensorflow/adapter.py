"""The TensorFlow adapter: what the core calls to recognise TensorFlow values and prepare a check of them.

Invariant: preparing a check reads the user's tensors, variables and models as the user left them (under the
lock of :mod:`gradbridge._process`, never inside another check's window) and changes none of them; the precision
a check claims is the one its trial calls really ran in (float64 when ``fn`` runs that way, else the user's
dtypes, said in a note); with ``grad=`` the analytic side is the user's hand-written gradient, never the tape.
Names and install hints are the registry's (:mod:`gradbridge._registry`), not this adapter's.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import tensorflow as tf

from gradbridge import _process
from gradbridge._adapter import CheckSpec, ExpectedParams, ParamBinding
from gradbridge._errors import InvalidArgumentError
from gradbridge._tree import flatten

from ..common.handwritten import floating_candidates, hand_written_gradient
from ..common.complex import complex_from_view, real_view_array
from ..common.layout import COMPLEX_REASON, Candidate, Unchecked, argument_candidates, layout_leaves, unchecked_notes
from .cache import cache_size, clear_cache, environment_of
from . import layers
from .keras import (frozen_weights, is_keras_layer, keras_names, keras_params, keras_roles, loadable_variables,
                    relative_name, with_values)
from .prepared import TensorFlowPrepared
from .problem import TensorFlowProblem, expand_slash_prefixes, notes_for, parameters, probe
from .tensors import (COMPOSITE, as_float64, dtype_of, is_floating, is_tensor, is_tf_function, not_checkable,
                      to_array)


class TensorFlowAdapter:
    """Adapter for TensorFlow (and Keras 3 models on the TensorFlow backend)."""

    name = "tensorflow"
    module_name = "tensorflow"

    def clear_cache(self) -> None:
        """Drop the traces, compiled functions and batching decisions kept across checks."""
        clear_cache()

    def cache_size(self) -> int:
        return cache_size()

    def owns(self, value: Any) -> bool:
        return (is_tensor(value) or isinstance(value, tf.Module) or is_keras_layer(value)
                or is_tf_function(value) or isinstance(value, COMPOSITE))

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
            spec.args, spec.arg_names, is_tensor, lambda t: (tuple(t.shape), dtype_of(t).name, is_floating(t)),
            unchecked=unchecked,
            native="the TensorFlow backend checks tf.Tensor and tf.Variable values: pass tf.constant(...) to check it",
            not_checkable=not_checkable, complex_inputs=True)
        model, params = parameters(spec)
        for p in params:
            v = p.variable
            candidates.append(Candidate(p.name, v, tuple(int(d) for d in v.shape), dtype_of(v).name, is_floating(v),
                                        "param", unchecked_reason=COMPLEX_REASON if dtype_of(v).is_complex else ""))
        unchecked.extend(frozen_weights(model))
        leaves, chosen = layout_leaves(candidates, expand_slash_prefixes(spec.wrt, candidates), unchecked)
        x0 = np.concatenate([(real_view_array(candidates[i].value.numpy()) if dtype_of(candidates[i].value).is_complex
                              else as_float64(candidates[i].value)).reshape(-1) for i in chosen])

        environment = environment_of(spec.fn)  # before probe runs fn: the state the check starts from

        def problem_for(promote: bool) -> TensorFlowProblem:
            problem = TensorFlowProblem(spec, candidates, leaves, chosen, rebuild_args, model, promote)
            problem.environment = environment
            return problem

        problem = problem_for(spec.promote)
        failure = probe(problem, x0)
        notes: List[str] = []
        if spec.promote and failure is not None and problem.promotes():
            # float64 failed: the user's own dtypes (if they fail too, the core reports that error)
            problem = problem_for(False)
            if probe(problem, x0) is None:
                notes.append(f"fn cannot run in float64 ({failure}), so it runs in the dtypes it was given")
        notes.extend(notes_for(problem, model))
        notes.extend(unchecked_notes(candidates, chosen, unchecked))
        prepared = TensorFlowPrepared(problem, problem.call, x0, notes=notes)
        if spec.grad is not None:  # the analytic side is the user's hand-written gradient, never the tape
            return hand_written_gradient(prepared, "TensorFlow", hand_written_call(problem, prepared), to_array,
                                       floating_candidates(candidates), chosen)
        return prepared

    # --- gb.compare (see gradbridge._adapter.CompareAdapter) ---

    def to_numpy(self, value: Any) -> Optional[np.ndarray]:
        if not is_tensor(value):
            return None
        return np.array(value.numpy(), copy=True)

    def from_numpy(self, array: np.ndarray) -> tf.Tensor:
        return tf.constant(np.array(array, copy=True))

    def expected_params(self, fn: Callable[..., Any]) -> Optional[ExpectedParams]:
        """A Keras model's (or layer's) trainable variables (required) and floating non-trainable ones
        (optional: BatchNorm's moving statistics), by path relative to the model with "/" as "."."""
        if not is_keras_layer(fn):
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
        names = keras_names(fn)
        trainable = {id(v) for v in fn.trainable_variables}
        required = {names[p.name]: tuple(int(d) for d in p.variable.shape) for p in keras_params(fn)}
        optional = {name: tuple(int(d) for d in v.shape) for name, v in loadable_variables(fn).items()}
        unsupported = {relative_name(fn, v.path): "a non-trainable Keras variable that is not floating (gb.compare "
                       "loads trainable and floating variables only; the model's own value is used)"
                       for v in fn.variables if id(v) not in trainable and relative_name(fn, v.path) not in optional}
        return ExpectedParams(f"Keras {type(fn).__name__} {fn.name!r}", 'variable paths relative to the model, "/" '
                              'written as "."', required, optional, unsupported)

    def cast_like(self, array: Any, like: Any) -> Any:
        """``array`` in ``like``'s dtype (a layer tap's zero added to a float32 value stays float32)."""
        return tf.cast(array, like.dtype) if tf.is_tensor(like) and tf.is_tensor(array) else array

    def bind_params(self, fn: Callable[..., Any], params: Optional[Mapping[str, np.ndarray]],
                    grad: Optional[Callable[..., Any]] = None) -> ParamBinding:
        """A Keras model: checked with ``params=model``; its variables are never written (the check reads
        trainable ones through shadow variables, which the core sets to the given values; given non-trainable
        ones, such as BatchNorm's moving statistics, are read from the check's stateless scope while the model
        runs). A plain function: the flat dict of float64 tensors as first argument."""
        if is_keras_layer(fn):
            note = "" if params is None else (f"Keras {type(fn).__name__} {fn.name!r}: params loaded by variable "
                                              "path into the check's float64 shadow variables (the model is untouched)")
            given = {name: v for name, v in loadable_variables(fn).items() if params is not None and name in params}
            fixed = [(v, tf.constant(np.asarray(params[name], dtype=np.float64))) for name, v in given.items()]
            call = with_values(fn, fixed) if fixed else fn
            if fixed:
                note += f"; non-trainable {', '.join(given)} read as given"
            return ParamBinding(fn=call, params=fn, names=keras_names(fn), signature=getattr(fn, "call", fn),
                                note=note)
        if params is None:
            return ParamBinding(fn=fn)
        if isinstance(fn, tf.Module):
            self.expected_params(fn)  # raises: a tf.Module's variables cannot be loaded
        native = {name: self.from_numpy(array) for name, array in params.items()}
        leaves, _ = flatten(native, "params", is_tensor)
        return ParamBinding(fn=fn, leading_args=(native,), leading_names=("params",),
                            names={leaf.path: name for leaf, name in zip(leaves, native)})

    def with_layer_taps(self, binding: ParamBinding, layered: Callable[..., Any]) -> Optional[Callable[..., Any]]:
        """A Sequential or functional Keras model's layers tapped, for ``gb.compare(..., layers=True)`` (see
        :mod:`.layers`); None otherwise."""
        return layers.with_layer_taps(binding, layered)

    def parameter_roles(self, fn: Callable[..., Any], params: Any = None) -> Optional[Dict[str, Any]]:
        """A Keras model's (or layer's) variables by role (see :mod:`gradbridge._comparing.mapping`), from the
        type of the layer owning each: ``Dense``, ``Conv1D/2D/3D``, ``LayerNormalization``,
        ``GroupNormalization``, ``BatchNormalization`` (moving statistics optional), ``Embedding``; others'
        have no role (paired by name). None for a plain function."""
        if not is_keras_layer(fn) or (not fn.built and not fn.variables):
            return None
        return keras_roles(fn)



def hand_written_call(problem: TensorFlowProblem, prepared: TensorFlowPrepared
                       ) -> Callable[[Optional[List[np.ndarray]]], Any]:
    """The user's ``grad`` at ``x0`` (see :mod:`backends.common.handwritten`), called inside :meth:`TensorFlowProblem.applied`
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
                    leaves, rebuild = flatten(problem.fn(*args, **problem.spec.kwargs), "out", is_tensor)
                    structure.append((rebuild, [(is_floating(leaf.value) or dtype_of(leaf.value).is_complex,
                                                 tf.convert_to_tensor(leaf.value)) for leaf in leaves]))
                rebuild, outputs = structure[0]
                supply = iter(blocks)
                leading = (rebuild([_cotangent(next(supply), like) if floating else tf.zeros_like(like)
                                    for floating, like in outputs]),)
            problem.reseed()
            return problem.spec.grad(*leading, *args, **problem.spec.kwargs)

    return call



def _cotangent(block: np.ndarray, like: tf.Tensor) -> tf.Tensor:
    """One output's cotangent block as a tensor of the output's dtype; a complex output's block is its real view,
    given to ``grad`` as ``dL/dRe y + i dL/dIm y`` (gradbridge's and TensorFlow's convention)."""
    if like.dtype.is_complex:
        return tf.constant(complex_from_view(block), dtype=like.dtype)
    return tf.constant(block, dtype=like.dtype)


ADAPTER = TensorFlowAdapter()
