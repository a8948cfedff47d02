"""Every private or version-dependent TensorFlow and Keras API the TensorFlow backend uses, in one place.

Invariant: no other file of this backend names a private TensorFlow or Keras module or attribute
(``tensorflow.python...``, ``keras.src...``, a ``_``-prefixed attribute); each is reached through a name defined
here, with a one-line comment saying what it is used for. Keras is never imported here unless it already is
(``sys.modules``) or the object passed in is a Keras object (so Keras is loaded): checking a function that does
not use Keras never imports it. Where a release may lack an API, the fallback keeps the check correct (a
fresh ``tf.function`` rebuilt from its public parts, forward mode without the custom-gradient screen), never
one that changes a number the check reports.
"""

from __future__ import annotations

import contextlib
import logging
import random
import sys
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import tensorflow as tf
# the eager context: its private ``_seed`` and ``_rng`` are the global seed and the operation-seed generator
from tensorflow.python.eager import context as _tf_context
# ``_eager_mode_decorator``: spied on to find tf.custom_gradient rules run eagerly (forward mode ignores them)
from tensorflow.python.ops import custom_gradient as _tf_custom_gradient
# ``global_generator``: the global tf.random.Generator, swapped for the check's pinned one during a window
from tensorflow.python.ops import stateful_random_ops as _tf_stateful_random

# --- TensorFlow ---

#: The type of a ``tf.function`` (public, but under ``tf.types.experimental``): fn is checked through a copy.
POLYMORPHIC_FUNCTION = tf.types.experimental.PolymorphicFunction


def clone_tf_function(fn: Any) -> Optional[Any]:
    """``PolymorphicFunction._clone(None)`` (private): a fresh ``tf.function`` of the same Python function and
    options, with its own empty trace cache; None where a release changed it (the caller rebuilds one)."""
    clone = getattr(fn, "_clone", None)
    if clone is None:
        return None
    try:
        return clone(None)
    except Exception:  # a future TensorFlow changed the private signature: rebuild from the public parts
        return None


def module_variables(module: tf.Module, predicate: Callable[[Any], bool]) -> List[Tuple[Tuple[Any, ...], Any]]:
    """``tf.Module._flatten(predicate=..., with_path=True)`` (private): the (path, variable) pairs of a
    tf.Module given as ``params=``, named by attribute path."""
    return list(module._flatten(predicate=predicate, with_path=True))


def op_is_stateful(op_type: str) -> bool:
    """``tensorflow.python.framework.op_def_registry`` (private): whether an op type is marked stateful (unknown
    op types count as stateful); used to refuse vectorized graphs whose ops have side effects."""
    from tensorflow.python.framework import op_def_registry
    definition = op_def_registry.get(op_type)
    return definition is None or bool(definition.is_stateful)


class SeedState:
    """The eager context's global seed (``_seed``) and operation-seed generator (``_rng``, a ``random.Random``,
    absent until a seed is set), both private: saved before a window and put back, bit for bit, after it."""

    def __init__(self) -> None:
        ctx = _tf_context.context()
        self.seed = ctx._seed
        self.had_op_seeds = hasattr(ctx, "_rng")
        self.op_seeds = getattr(ctx, "_rng", None)
        self.op_seed_state = self.op_seeds.getstate() if self.op_seeds is not None else None

    def restore(self) -> None:
        ctx = _tf_context.context()
        ctx._seed = self.seed
        if self.had_op_seeds:
            ctx._rng = self.op_seeds
            if self.op_seeds is not None:
                self.op_seeds.setstate(self.op_seed_state)
        elif hasattr(ctx, "_rng"):
            del ctx._rng


def set_seeds_keeping_kernels(seed: int) -> None:
    """What ``tf.random.set_seed(seed)`` does to the eager context's private ``_seed`` and ``_rng``, without its
    (slow, irreversible) clearing of the kernel cache: for functions that draw from no stateful random kernel."""
    ctx = _tf_context.context()
    ctx._seed = seed
    ctx._rng = random.Random(seed)


def global_generator() -> Optional[tf.random.Generator]:
    """``stateful_random_ops.global_generator`` (private): the user's global generator, None until made."""
    return _tf_stateful_random.global_generator


def set_global_generator(generator: Optional[tf.random.Generator]) -> None:
    """Replace the global generator (``tf.random.get_global_generator()`` returns it) for the window."""
    _tf_stateful_random.global_generator = generator


@contextlib.contextmanager
def eager_custom_gradients() -> Iterator[List[str]]:
    """Names of the ``tf.custom_gradient`` functions run eagerly inside the block, seen by wrapping the private
    ``custom_gradient._eager_mode_decorator`` (put back on exit; nothing is seen where a release lacks it).

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


# --- Keras (only when it is already imported: TensorFlow 2.16+ imports it lazily; nothing here imports it) ---

def loaded_keras() -> Any:
    """The ``keras`` module if the user's process has imported it, else None (never imports it)."""
    return sys.modules.get("keras")


def keras_global_state() -> Any:
    """``keras.src.backend.common.global_state`` (private): Keras' global seed generator (saved and put back
    around a window) and its outer call context (``train=``); None without Keras or in another layout."""
    if loaded_keras() is None:
        return None
    try:
        from keras.src.backend.common import global_state
    except ImportError:  # pragma: no cover - another Keras layout
        return None
    return global_state


def stateless_values() -> Any:
    """The variable values of the Keras ``StatelessScope`` in force (its private ``state_mapping``: id of a
    variable -> the value it reads), or None outside one; ``gb.compare`` overrides entries there to load
    non-trainable variables without writing the model."""
    state = keras_global_state()
    scope = state.get_global_attribute("stateless_scope") if state is not None else None
    return getattr(scope, "state_mapping", None) if scope is not None else None


def training_call_context() -> Any:
    """``keras.src.layers.layer.CallContext`` (private) in training mode: set as Keras' outer call context so
    layers called without ``training=`` run in training mode (``train=True``)."""
    from keras.src.layers.layer import CallContext

    call_context = CallContext(entry_layer=None)
    call_context.training = True
    return call_context


def stateless_scope(mapping: Sequence[Tuple[Any, Any]]) -> Any:
    """A ``keras.src.backend.common.stateless_scope.StatelessScope`` (private) whose ``state_mapping`` reads each
    Keras variable's mapped value (set after construction, which would cast it to the variable's dtype):
    Keras variables read the check's values and updates stay in the scope."""
    from keras.src.backend.common.stateless_scope import StatelessScope

    scope = StatelessScope(collect_losses=True)
    for variable, value in mapping:
        scope.state_mapping[id(variable)] = value
    return scope


def all_layers(model: Any) -> List[Any]:
    """``Layer._flatten_layers(include_self=True, recursive=True)`` (private): every layer of a model, itself
    included; for the float64 policy swap and the frozen-weight listing."""
    return list(model._flatten_layers(include_self=True, recursive=True))


def created_trainable(layer: Any) -> Sequence[Any]:
    """``Layer._trainable_variables`` (private, Keras 3): the weights a layer created trainable, also when the
    layer is now frozen (``trainable=False``); lists frozen weights as not checked."""
    return getattr(layer, "_trainable_variables", ())


def dtype_policy_type() -> type:
    """``keras.src.dtype_policies.dtype_policy.DTypePolicy`` (private path): the plain (not mixed, not
    quantized) policy the float64 swap stands in for (raises ImportError in another layout)."""
    from keras.src.dtype_policies.dtype_policy import DTypePolicy
    return DTypePolicy


def layer_policy(layer: Any) -> Any:
    """``Layer._dtype_policy`` (private): the layer's own policy, read to be swapped and put back."""
    return layer._dtype_policy


def set_layer_policy(layer: Any, policy: Any) -> None:
    """Write ``Layer._dtype_policy`` (private): the float64 policy during a call, the user's afterwards."""
    layer._dtype_policy = policy


def float64_policy(variable_dtype: Any) -> Any:
    """A ``DTypePolicy("float64")`` with its private ``_variable_dtype`` set to ``variable_dtype``: computes in
    float64 on variables of their own dtype (the mixed-precision mechanism, float64 as the compute dtype)."""
    policy = dtype_policy_type()("float64")
    policy._variable_dtype = variable_dtype
    return policy


def input_layer_type() -> type:
    """``keras.src.layers.InputLayer`` (private path): its dtype is its own attribute, switched to float64."""
    from keras.src.layers import InputLayer
    return InputLayer


def keras_tensor_type() -> type:
    """``keras.src.backend.common.keras_tensor.KerasTensor`` (private path): the symbolic inputs of functional
    models, whose dtype Keras casts call inputs to."""
    from keras.src.backend.common.keras_tensor import KerasTensor
    return KerasTensor


def own_dtype(value: Any) -> Any:
    """The private ``_dtype`` of an InputLayer or a KerasTensor (what Keras casts inputs to)."""
    return value._dtype


def set_own_dtype(value: Any, dtype: Any) -> None:
    """Write the private ``_dtype`` of an InputLayer or a KerasTensor (float64 during a call, then put back)."""
    value._dtype = dtype


def symbolic_inputs(layer: Any) -> List[Any]:
    """The symbolic inputs (private ``_inputs``) of a functional model, found on the layer itself or on its
    private ``_functional`` (a Sequential's inner functional model); empty for other layers."""
    found: List[Any] = []
    for functional in (layer, getattr(layer, "_functional", None)):
        inputs = getattr(functional, "_inputs", None) if functional is not None else None
        found.extend(inputs if isinstance(inputs, (list, tuple)) else ())
    return found


# pfor (tf.vectorized_map's converter) logs every op it cannot vectorize through the "tensorflow" logger, with
# the op's whole NodeDef and where it was created (~180 lines per Conv2D of a Keras model) at ERROR level, although the caller gets the
# exception too and gradbridge then evaluates point by point: while a vectorized graph is traced those records
# are dropped (the user's own TensorFlow log records pass; the logger is left as it was).
class _DropPforErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # pfor's converter (tensorflow/python/ops/parallel_for/pfor.py) logs each failed op in two records
        return not (record.levelno >= logging.ERROR and record.module == "pfor")


def layer_graph(model: Any) -> Optional[Any]:
    """The functional graph a Keras model runs through: the model itself for a functional model, a Sequential's
    ``_functional`` (private: built once the Sequential knows its input); None for a subclassed model."""
    keras = loaded_keras()
    functional = getattr(getattr(getattr(keras, "src", None), "models", None), "functional", None)
    graph_type = getattr(functional, "Functional", None)
    graph = model if graph_type is not None and isinstance(model, graph_type) else getattr(model, "_functional", None)
    if graph is None or not hasattr(graph, "_run_through_graph") or not hasattr(graph, "_standardize_inputs"):
        return None
    return graph


def run_layer_graph(graph: Any, inputs: Any, operation_fn: Callable[[Any], Any]) -> Any:
    """``graph`` run on ``inputs`` as its ``call`` runs it (inputs standardised, a single output unpacked), with
    every operation replaced by ``operation_fn(operation)`` (private ``_standardize_inputs``, ``_run_through_graph``)."""
    outputs = graph._run_through_graph(graph._standardize_inputs(inputs), operation_fn=operation_fn)
    if isinstance(outputs, (list, tuple)) and len(outputs) == 1:
        return outputs[0]
    return outputs


@contextlib.contextmanager
def quiet_pfor_errors() -> Iterator[None]:
    """Drop pfor's conversion-error records from TensorFlow's logger for the duration of the block."""
    logger = logging.getLogger("tensorflow")
    dropped = _DropPforErrors()
    logger.addFilter(dropped)
    try:
        yield
    finally:
        logger.removeFilter(dropped)
