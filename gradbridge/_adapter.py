"""The contract between the backend-agnostic core and one framework adapter.

The core works on one flat float64 NumPy vector ``x`` (all checked leaves, concatenated) and one flat
output vector ``y``.  An adapter turns the user's function and arguments into a :class:`PreparedFunction`
that can evaluate ``y(x)`` for a batch of points, and compute vector-Jacobian and Jacobian-vector
products at the checked point with the framework's own differentiation.  The core never imports or
names a framework: everything framework-specific sits behind these two protocols.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import (Any, Callable, ContextManager, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple,
                    runtime_checkable)

import numpy as np


@dataclass(frozen=True)
class LeafSpec:
    """Where one checked input leaf (or one output) lives inside the flat vector.

    Attributes:
        name: readable path, e.g. ``x``, ``xs[1]`` or ``fc1.weight``.
        shape: shape of the leaf as the user's function sees it.
        dtype: the user's original dtype, as a string (the check itself runs in float64).
        offset: first position of the leaf in the flat vector.
        kind: ``"input"`` for function arguments, ``"param"`` for module parameters, ``"output"``.
    """

    name: str
    shape: Tuple[int, ...]
    dtype: str
    offset: int
    kind: str = "input"

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.size)

    def unravel(self, flat_index: int) -> Tuple[int, ...]:
        """The index inside this leaf's own shape of flat position ``flat_index`` (relative to the leaf)."""
        if not self.shape:
            return ()
        return tuple(int(i) for i in np.unravel_index(flat_index, self.shape))


@dataclass
class CheckSpec:
    """Everything an adapter needs to know to prepare a check (already validated by the core).

    ``promote``: True (the default) checks float64 copies of every floating leaf. False keeps each leaf
    in its own dtype (float32, float16, bfloat16): the adapter casts the float64 points it is given to
    the leaf's dtype (the core has already rounded them to it, so the cast is exact), casts cotangents
    and tangents to the output's and leaf's dtypes, and sets ``working_eps`` to the coarsest precision
    among the checked leaves and the outputs.
    """

    fn: Callable[..., Any]
    args: Tuple[Any, ...]
    kwargs: Mapping[str, Any]
    params: Any
    wrt: Optional[Tuple[Any, ...]]
    grad: Optional[Callable[..., Any]]
    seed: int
    train: bool
    arg_names: Tuple[str, ...]
    promote: bool = True


@runtime_checkable
class PreparedFunction(Protocol):
    """A user function made ready for checking: flat float64 in, flat float64 out.

    ``leaves`` lists every checked leaf; ``x0`` is the (promoted) point at which the check runs.
    ``output_specs`` is filled by the first call of :meth:`evaluate`.

    Optional attributes the core reads when present:

    * ``working_eps``: machine epsilon of the precision ``fn`` really runs in, when the adapter could not
      promote to float64 (say why in ``notes``); steps and tolerances then follow that precision.
    * ``undefined_gradients``: ``{leaf name: reason}`` for leaves the framework defines no gradient for
      (TensorFlow's ``None``, a torch ``NotImplementedError``, ...), filled by :meth:`vjp`/:meth:`jvp`.
      Such rows are reported as "no gradient", acceptable only where the numeric derivative is zero.
    * ``vjp_transposed(tangents)``: (k, n) tangents to (k, m) products ``J t``, computed by transposing
      the reverse-mode VJP (differentiating ``u -> J^T u`` again), so ``J`` is the very Jacobian
      :meth:`vjp` implements, with the user's custom backward rules, never forward-mode rules. The core
      uses it to get the analytic side of compressed column groups without the dense Jacobian, and
      verifies it against :meth:`vjp` with a dot test. Raise ModeUnsupportedError where the backward
      pass cannot be differentiated (``once_differentiable``, NumPy inside a custom rule, ...).
    * ``evaluate_edits(positions, values)``: the outputs (k, m) at the k points that are ``x0`` with
      element ``positions[k]`` set to ``values[k]``, exactly what :meth:`evaluate` returns for those
      points, with the points built in the framework (an element-by-element check of a scalar loss makes
      2n such points; building them natively next to the computation saves writing and converting them).
    * ``forward_rule``: ``Optional[str]``, a short description of the user-written forward-mode rules
      ``fn`` runs that reverse mode never exercises (``"MyFunction.jvp"``, comma-separated when several:
      a torch ``autograd.Function`` with a ``jvp`` of its own, given as ``fn`` or found in its code), or
      None. When set, a bug only in that rule passes a reverse-mode check, so the default check also
      compares forward mode (:meth:`jvp`). Adapters whose analytic side is a hand-written ``grad=`` set None.
    """

    leaves: Sequence[LeafSpec]
    x0: np.ndarray
    notes: List[str]
    analytic_source: str

    @property
    def output_specs(self) -> Sequence[LeafSpec]: ...

    def session(self) -> ContextManager[None]:
        """Make evaluation deterministic (eval mode, pinned RNG, float64 defaults) and restore the
        user's state on exit, also when an exception leaves the block."""

    def evaluate(self, points: np.ndarray) -> np.ndarray:
        """``points`` has shape (k, n); returns the outputs, shape (k, m), one row per point."""

    def vjp(self, cotangents: np.ndarray) -> np.ndarray:
        """Vector-Jacobian products at ``x0``: (k, m) cotangents to (k, n) input gradients."""

    def jvp(self, tangents: np.ndarray) -> np.ndarray:
        """Jacobian-vector products at ``x0``: (k, n) tangents to (k, m); raises ModeUnsupportedError."""

    def gradient_function(self, cotangent: np.ndarray) -> "PreparedFunction":
        """The function ``x -> J(x)^T cotangent`` as a new prepared function (for ``order=2``);
        raises ModeUnsupportedError where the backend cannot differentiate twice."""


@runtime_checkable
class Adapter(Protocol):
    """One framework: detection without imports, preparation of checks, and its caches.

    Names, install hints and the framework module an adapter needs are the registry's
    (:class:`gradbridge._registry.BackendEntry`); ``name`` and ``module_name`` repeat them for messages.
    """

    name: str
    module_name: str

    def owns(self, value: Any) -> bool:
        """True when ``value`` is one of this framework's arrays, modules or variables."""

    def version(self) -> str: ...

    def probe_float64(self) -> Tuple[bool, str]:
        """Whether the framework really computes and differentiates in float64 here, and a note for
        ``gradbridge backends`` (imports the framework)."""

    def prepare(self, spec: CheckSpec) -> PreparedFunction: ...

    def clear_cache(self) -> None:
        """Drop everything kept across checks (traces, compiled functions, batching decisions)."""

    def cache_size(self) -> int:
        """How many functions have entries kept across checks."""


# --- optional capabilities: what a prepared function or an adapter may offer beyond the protocol above ---
#
# The core asks with ``isinstance(prepared, TransposedProducts)`` and so on; an adapter offers a capability by
# defining the member (subclassing the protocol documents it). The meaning of each member is in the docstring of
# :class:`PreparedFunction`; the conformance suite (``tests/conformance``) checks every offered one.


@runtime_checkable
class WorkingPrecision(Protocol):
    """``working_eps``: machine epsilon of the precision ``fn`` really runs in, or None for float64."""

    working_eps: Optional[float]


@runtime_checkable
class UndefinedGradients(Protocol):
    """``undefined_gradients``: ``{leaf name: reason}`` for leaves the framework defines no gradient for."""

    undefined_gradients: Dict[str, str]


@runtime_checkable
class TransposedProducts(Protocol):
    """``vjp_transposed``: (k, n) tangents to (k, m) products ``J t`` through the reverse-mode VJP."""

    def vjp_transposed(self, tangents: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class EditedEvaluation(Protocol):
    """``evaluate_edits``: outputs at copies of ``x0`` with one element each set, built in the framework."""

    def evaluate_edits(self, positions: np.ndarray, values: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class ForwardRules(Protocol):
    """``forward_rule``: the user-written forward-mode rules ``fn`` runs, or None."""

    forward_rule: Optional[str]


@runtime_checkable
class DifferentiatedPrimal(Protocol):
    """``differentiated_primal()``: the flat output at ``x0`` as the framework's differentiation computes it (the
    primal ``jax.vjp`` returns, so a ``custom_vjp``'s ``fwd`` or a ``custom_jvp`` rule's primal output; the forward
    torch records for backward; the forward TensorFlow records on a tape), for the contract check that it equals
    ``fn(x0)``. Called inside the session; raises ModeUnsupportedError where there is none."""

    def differentiated_primal(self) -> np.ndarray: ...


@runtime_checkable
class BatchedRules(Protocol):
    """``vjp_batched_and_looped(cotangents)``: the (k, n) VJPs of the (k, m) cotangents computed twice at ``x0``,
    under the framework's vmap (``torch.func.vmap`` of the pullback, ``tf.vectorized_map`` of ``tape.gradient``:
    what per-sample gradients and ``jacrev``/``tape.jacobian`` run) and one cotangent at a time, for the contract
    check that they agree. Raises ModeUnsupportedError saying why when the rule cannot run under vmap, and
    CostlyProbeSkipped when running it would cost a trace or compile the check has not paid for, unless
    ``thorough``."""

    def vjp_batched_and_looped(self, cotangents: np.ndarray,
                               thorough: bool = False) -> Tuple[np.ndarray, np.ndarray]: ...


@runtime_checkable
class BatchedForwardRules(Protocol):
    """``jvp_batched_and_looped(tangents)``: the same for the (k, m) JVPs of (k, n) tangents (forward-mode rules
    under vmap, what ``jacfwd`` runs)."""

    def jvp_batched_and_looped(self, tangents: np.ndarray,
                               thorough: bool = False) -> Tuple[np.ndarray, np.ndarray]: ...


@runtime_checkable
class StridedInputs(Protocol):
    """``strided_variants(cotangent)``: fn and its VJP at ``cotangent`` computed twice per memory layout the
    framework exposes, once with the checked inputs as contiguous arrays and once laid out that way
    (``"non-contiguous"``: transposed or strided storage; ``"expanded"``: a stride-0 dimension, at the point whose
    rows all equal the first), as ``[(layout, (outputs, vjp) contiguous, (outputs, vjp) laid out)]``, flat float64.
    A layout fn raises on gives ``(layout, error message)`` instead. For frameworks whose arrays have strides (torch,
    NumPy). Raises CostlyProbeSkipped where the layouts cost compilations the check has not paid for (a compiled
    function guards on strides), unless ``thorough``."""

    def strided_variants(self, cotangent: np.ndarray, thorough: bool = False) -> List[Tuple[str, Any]]: ...


@runtime_checkable
class CompiledFunction(Protocol):
    """``compiled_and_eager(cotangents)``: for a compiled function (``torch.compile``, ``jax.jit``, ``tf.function``),
    its outputs and VJPs at ``x0`` for the (k, m) cotangents computed by the compiled function and by the eager
    function it was made from, as ``((outputs, vjps) compiled, (outputs, vjps) eager, note)``, flat float64; the
    note says what compiling cost during the check (recompilations), or is empty; ``(None, None, why)`` where the
    two cannot be compared (random draws differ by design). Raises ModeUnsupportedError for a
    function that is not compiled, CostlyProbeSkipped where the comparison costs a compile the check has not paid
    for, unless ``thorough``."""

    def compiled_and_eager(self, cotangents: np.ndarray, thorough: bool = False
                           ) -> Tuple[Tuple[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray], str]: ...


@runtime_checkable
class FrameworkTests(Protocol):
    """``framework_tests(thorough)``: the framework's own tests of the checked function where it has them (torch's
    ``torch.library.opcheck`` of a library op), run on the check's copies at ``x0``: one ``(name, passed, sentence)``
    per test, ``passed`` None for a test not run (``thorough`` False skips those that compile), [] where none apply.
    Reported as contracts."""

    def framework_tests(self, thorough: bool = False) -> List[Tuple[str, Optional[bool], str]]: ...


@runtime_checkable
class InPlaceWrites(Protocol):
    """``in_place_writes(cotangent)``: what fn and its backward write in place or return that they must not, found
    by one forward and one backward at ``x0`` with snapshots: ``{"inputs": [names of inputs fn changed],
    "backward_inputs": [names of inputs the backward changed], "cotangent": [names of outputs whose incoming
    gradient the backward changed], "rules": [the user's custom rules the backward ran], "saved": [a phrase per
    rule that wrote its saved tensors], "gradients": [a phrase per gradient a rule returned in another dtype,
    device or shape than its input's]}``. For frameworks with mutable arrays (torch)."""

    def in_place_writes(self, cotangent: np.ndarray) -> Dict[str, List[str]]: ...


@runtime_checkable
class PytreeNodes(Protocol):
    """An adapter whose framework registers container types (pytrees): ``pytree_node(value)`` gives
    ``(keys, children, rebuild)`` for such a container, None otherwise."""

    def pytree_node(self, value: Any) -> Optional[Tuple[List[str], List[Any], Callable[[List[Any]], Any]]]: ...


@runtime_checkable
class WrappedFunctions(Protocol):
    """An adapter whose framework wraps the user's functions in objects of its own (autograd's ``primitive``):
    ``user_function(fn)`` gives the function the user wrote, so reports and argument names show it, or None."""

    def user_function(self, fn: Any) -> Optional[Callable[..., Any]]: ...


@runtime_checkable
class LayerTaps(Protocol):
    """An adapter that taps a model's layers itself, for ``gb.compare(..., layers=True)`` (torch modules by
    forward hooks, Sequential and functional Keras models by running their layers one by one).

    ``with_layer_taps(binding, layered)`` gives the function to check in place of ``binding.fn``, taking
    ``(layers, *args, **kwargs)`` and returning ``layered(call, layers, *args, **kwargs)``, where ``call(*args,
    **kwargs)`` runs the model with each layer's output passed through ``gradbridge._taps.active().take(name,
    output, fused)`` (``fused``: the layer applies its activation inside). It must be checkable as the model is (a
    torch module stays a module, so it is promoted and pinned alike); None when the model has no layers the
    adapter can see (the user's own ``gb.tap`` calls are used then).
    """

    def with_layer_taps(self, binding: "ParamBinding", layered: Callable[..., Any]) -> Optional[Callable[..., Any]]: ...


CAPABILITIES: Tuple[type, ...] = (WorkingPrecision, UndefinedGradients, TransposedProducts, EditedEvaluation,
                                  ForwardRules, DifferentiatedPrimal, BatchedRules, BatchedForwardRules, StridedInputs,
                                  InPlaceWrites, FrameworkTests, CompiledFunction)


#: (class, capability) pairs known to offer it through a class member: true for every instance of the class.
_OFFERED_BY_CLASS: Dict[Tuple[type, type], bool] = {}


def offered(prepared: Any, capability: type, member: str) -> Any:
    """``prepared``'s ``member`` when it offers ``capability``, else None.

    A protocol ``isinstance`` walks the protocol's members each time (several microseconds); where the class
    declares the capability (subclasses the protocol) or defines ``member`` itself, the answer holds for every
    instance and is remembered per class."""
    key = (type(prepared), capability)
    if key in _OFFERED_BY_CLASS:
        return getattr(prepared, member)
    if not isinstance(prepared, capability):
        return None
    if capability in type(prepared).__mro__ or hasattr(type(prepared), member):
        _OFFERED_BY_CLASS[key] = True
    return getattr(prepared, member)


def capabilities(prepared: Any) -> List[str]:
    """The names of the optional capabilities ``prepared`` offers (for reports and the conformance table)."""
    return [cap.__name__ for cap in CAPABILITIES if isinstance(prepared, cap)]


@dataclass
class ExpectedParams:
    """The parameters an implementation owns (a module's or a model's), for :func:`gradbridge.compare` to
    validate ``params=`` against before anything runs.

    Attributes:
        owner: what owns them, for messages (e.g. ``torch module MLP``, ``Keras model 'mlp'``).
        convention: how the names are formed (e.g. ``state_dict names``).
        required: name -> shape of every parameter that must be given.
        optional: name -> shape of values that may be given (e.g. a torch module's buffers).
        unsupported: name -> why a value the implementation owns cannot be loaded from ``params``.
    """

    owner: str
    convention: str
    required: Dict[str, Tuple[int, ...]]
    optional: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    unsupported: Dict[str, str] = field(default_factory=dict)


@dataclass
class ParamBinding:
    """How one implementation of :func:`gradbridge.compare` receives the compared parameters.

    The core builds the implementation's :class:`CheckSpec` from it: ``fn``/``grad``/``params`` replace the
    user's, ``leading_args`` (named ``leading_names``) go before the user's positional arguments.

    Attributes:
        fn: the function to check (the user's, or a module copy with the parameters loaded).
        grad: the NumPy gradient function to use (the user's, adapted to the parameter dict).
        params: what to pass as ``CheckSpec.params``.
        leading_args: positional arguments placed before the user's (the flat parameter dict of a plain
            function).
        leading_names: the argument names to give ``leading_args`` in ``CheckSpec.arg_names``.
        names: the adapter's leaf name -> the common (dotted) parameter name, for every parameter leaf.
        signature: the callable whose signature names the user's positional arguments (a module's forward).
        note: something the report should say about the binding (what was copied or loaded).
    """

    fn: Callable[..., Any]
    grad: Optional[Callable[..., Any]] = None
    params: Any = None
    leading_args: Tuple[Any, ...] = ()
    leading_names: Tuple[str, ...] = ()
    names: Mapping[str, str] = field(default_factory=dict)
    signature: Optional[Callable[..., Any]] = None
    note: str = ""


class CompareAdapter(Protocol):
    """What :func:`gradbridge.compare` needs from an adapter on top of :class:`Adapter`.

    The core converts every array once to NumPy and then to each implementation's own arrays, and loads
    the one flat ``{dotted name: float64 array}`` parameter mapping into each implementation, without
    knowing any framework:

    * a module or model (torch ``nn.Module``, Keras layer) owns named parameters: ``expected_params``
      lists them (the core checks names and shapes and raises a clear error), ``bind_params`` loads the
      values without touching the user's object (a float64 copy with the values loaded, or a binding
      whose parameter leaves the core points at the given values, see below);
    * a plain function receives the parameters as its first positional argument, a flat dict
      ``{name: native array}`` (``leading_args``), whose leaves ``names`` maps back to the dotted names.

    The core then prepares the check as usual and sets every parameter leaf of ``x0`` (found through
    ``names``) to the given value before the first evaluation, so each implementation runs at exactly the
    same point; an adapter must read ``x0`` only when evaluating or differentiating, never cache it earlier.
    """

    def to_numpy(self, value: Any) -> Optional[np.ndarray]:
        """``value`` (one of this framework's arrays or variables) as a NumPy array in its own dtype
        (bfloat16 may come as float32); None when ``value`` is no array (a module, a function)."""

    def from_numpy(self, array: np.ndarray) -> Any:
        """A new native array with ``array``'s values and dtype (float64 stays float64, ints stay ints)."""

    def expected_params(self, fn: Callable[..., Any]) -> Optional[ExpectedParams]:
        """The parameters ``fn`` owns when it is a module or model; None for a plain function."""

    def bind_params(self, fn: Callable[..., Any], params: Optional[Mapping[str, np.ndarray]],
                    grad: Optional[Callable[..., Any]] = None) -> ParamBinding:
        """How ``fn`` receives ``params`` (already validated against :meth:`expected_params`; float64
        arrays). With ``params=None`` nothing is loaded, but ``names`` still maps a module's parameter
        leaves to their common names."""


class ProblemBackedFunction:
    """Base for prepared functions that wrap one adapter "problem" (structure, modules, state to restore).

    The problem owns the deterministic session and discovers the outputs on the first evaluation; a
    derived function (the gradient function of ``order=2``) brings its own ``_outputs``. Subclasses set
    ``self.problem`` and ``self._outputs``.
    """

    problem: Any
    _outputs: Optional[List[LeafSpec]]

    @property
    def output_specs(self) -> List[LeafSpec]:
        specs = self._outputs if self._outputs is not None else self.problem.outputs
        if specs is None:
            raise RuntimeError("output_specs is known after the first evaluation")
        return specs

    def session(self) -> ContextManager[None]:
        return self.problem.session()
