"""Cross-framework comparison: :func:`compare` runs one set of inputs through several implementations of
the same function (torch, JAX, TensorFlow, NumPy, or several of one framework) in float64 and reports,
pairwise, how far their values and gradients are apart, plus each one's own finite-difference check,
so that someone porting a model learns which side is wrong.

Everything framework-specific (array conversion, loading parameters into a module) sits behind the
adapters' compare methods (:class:`gradbridge._adapter.CompareAdapter`); this module never names a
framework.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np

from .. import _hooks, _registry
from .._adapter import CheckSpec, ExpectedParams, LeafSpec, ParamBinding, PreparedFunction
from .._api import argument_names, function_name
from .._checking.check import run_check
from .._errors import FunctionEvaluationError, GradbridgeError, InvalidArgumentError
from .._options import DEFAULT_BUDGET, Options, validate_kwargs, validate_options
from .._reporting.report import Report
from .._tree import flatten

#: Default relative tolerance of the pairwise comparison (float64 ports of the same math agree to ~1e-13).
DEFAULT_RTOL = 1e-7
#: Share of the largest entry of the same leaf added to each entry's scale (entries near zero by cancellation).
LEAF_SCALE = 1e-2
#: Share of the largest entry of all leaves of the same quantity (a leaf that is zero up to round-off).
GLOBAL_SCALE = 1e-4
#: Most elements outside the tolerance listed per pair (the count is always complete).
OUTSIDE_LISTED = 20
#: Options of the implementations' own checks that ``compare`` passes on (see :func:`gradbridge.check`).
CHECK_OPTIONS = ("mode", "order", "eps", "probes", "analytic", "train", "chunk_size", "budget", "kinks", "progress",
                 "memory")


@dataclass(frozen=True)
class Implementation:
    """One implementation for :func:`compare` under a label that is not a backend name.

    ``{"torch-fused": gb.Implementation(fused_fn, backend="torch")}``; ``grad`` is the NumPy gradient
    (``backend="numpy"``); ``backend=None`` detects a module, model or compiled function's framework.
    """

    fn: Callable[..., Any]
    grad: Optional[Callable[..., Any]] = None
    backend: Optional[str] = None


@dataclass
class PairDifference:
    """How far two implementations are apart on one output value or one leaf's gradient.

    ``max_rel_diff`` is the largest ``|a - b|`` relative to the scale the tolerance uses (so, with
    ``atol=0``, the pair passes when it is at most ``rtol``); ``worst_index`` is the element furthest outside
    its tolerance (or closest to it), where ``first_value``/``second_value`` are read; ``allowed`` is the
    tolerance there. ``mismatches`` counts the elements outside the tolerance, ``outside`` lists the first
    :data:`OUTSIDE_LISTED` of them.
    """

    first: str
    second: str
    quantity: str
    leaf: str
    max_abs_diff: float
    max_rel_diff: float
    allowed: float
    passed: bool
    worst_index: Tuple[int, ...]
    first_value: float
    second_value: float
    shape: Tuple[int, ...] = ()
    mismatches: int = 0
    outside: List[Tuple[int, ...]] = field(default_factory=list)


@dataclass
class Comparison:
    """Outcome of :func:`gradbridge.compare`. ``passed`` is the verdict; ``verdicts`` say who is wrong.

    Attributes:
        function: a readable name of what was compared.
        implementations: the labels, in the order given.
        checks: each implementation's own finite-difference check (empty with ``own_check=False``).
        pairs: one entry per pair of implementations and output value or gradient leaf.
        verdicts: plain sentences naming the side that is wrong and what to look at (empty on a pass).
        notes: how the comparison was made (cotangent, conversions, leaves not common to all).
        seconds: wall time.
        backends: label -> backend and its version.
        tolerance: the pairwise rule in force.
        mismatches: structural differences (outputs missing or shaped differently); each fails.
    """

    function: str
    implementations: List[str]
    checks: Dict[str, Report]
    pairs: List[PairDifference]
    verdicts: List[str]
    notes: List[str]
    seconds: float
    backends: Dict[str, str] = field(default_factory=dict)
    tolerance: str = ""
    mismatches: List[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when every pair agrees, every own check passes and the outputs have the same structure."""
        return (not self.mismatches and all(p.passed for p in self.pairs)
                and all(r.passed for r in self.checks.values()))

    @property
    def failures(self) -> List[PairDifference]:
        return [p for p in self.pairs if not p.passed]

    def summary(self) -> str:
        """One line: the verdict and what disagrees."""
        values = {p.leaf for p in self.pairs if p.quantity == "value"}
        grads = {p.leaf for p in self.pairs if p.quantity == "gradient"}
        if self.passed:
            own = "; own checks pass" if self.checks else ""
            return (f"passed: {len(self.implementations)} implementations agree on {len(values)} output(s) and the "
                    f"gradients of {len(grads)} leaf/leaves{own}")
        parts = []
        if self.mismatches:
            parts.append(f"{len(self.mismatches)} structural mismatch(es)")
        failed = self.failures
        if failed:
            parts.append(f"{len(failed)} of {len(self.pairs)} pairwise comparisons differ")
        own = [f"{label} ({', '.join(_failed_rows(report)) or 'no verdict'})"
               for label, report in self.checks.items() if not report.passed]
        if own:
            parts.append("own check fails: " + "; ".join(own))
        return "FAILED: " + ", ".join(parts)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serialisable dict of the whole comparison (own checks through :meth:`Report.to_dict`)."""
        data: Dict[str, Any] = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)
                                if f.name not in ("checks", "pairs")}
        data["checks"] = {label: report.to_dict() for label, report in self.checks.items()}
        data["pairs"] = [asdict(p) for p in self.pairs]
        data["passed"] = self.passed
        return data

    def __str__(self) -> str:
        return render_comparison(self)


# --- the entry point ---

def compare(implementations: Mapping[str, Any], *args: Any, params: Optional[Mapping[str, Any]] = None,
            kwargs: Optional[Mapping[str, Any]] = None, wrt: Any = None, seed: int = 0,
            rtol: Optional[float] = None, atol: Optional[float] = None, own_check: bool = True,
            name: Optional[str] = None, **check_options: Any) -> Comparison:
    """Run the same inputs through several implementations of one function and say which side is wrong.

    ``gb.compare({"torch": model, "jax": f_jax, "tensorflow": keras_model, "numpy": (f_np, grad_np)}, x,
    params=weights)`` converts ``args`` (NumPy arrays, or the arrays of any one framework, nested in
    lists, tuples and dicts too) to float64 NumPy once and then to each implementation's own arrays,
    evaluates every implementation in float64 at that one point, and compares pairwise, by name:

    * the output values (every floating output, by its name: ``out``, ``out[0]``, ``out['loss']``);
    * the gradients of every input and parameter leaf: the gradient itself for a scalar output, else one
      vector-Jacobian product with a random cotangent (seeded by ``seed``) shared by all implementations;
    * and, unless ``own_check=False``, runs each implementation's own :func:`gradbridge.check` at the
      same point, which tells a wrong backward pass (its own finite differences disagree) from a wrong
      forward pass (its values disagree with the others, its gradient matches its own forward).

    Implementations: keys are labels. A key that is a backend name (``"numpy"``, ``"torch"``, ``"jax"``,
    ``"tensorflow"`` or an alias: ``"np"``, ``"pytorch"``, ``"tf"``) says the framework; other labels
    take a :class:`Implementation` (``gb.Implementation(fn, backend="torch")``) or a module/model whose
    framework is evident. A ``(fn, grad)`` tuple is the NumPy form (``grad`` as in :func:`check`).

    Parameters (``params``): one flat mapping ``{dotted name: array}``, the same names and shapes for
    every implementation (arrays of any framework, or NumPy; nested dicts are flattened with dots). Each
    implementation gets them in its own way, always as float64 and never by writing to your objects:

    * a torch ``nn.Module`` by ``state_dict`` name (``fc1.weight``, ``fc1.bias``; buffers such as
      ``bn.running_mean`` may be given too), loaded into a float64 deep copy;
    * a Keras model or layer by variable path relative to the model with "/" written as "." (a
      Sequential's ``sequential/dense/kernel`` is ``dense.kernel``; a subclassed model's ``fc1/weight`` is
      ``fc1.weight``), read through the check's float64 shadow variables; trainable variables only;
    * a plain function of any framework receives them as its FIRST positional argument, a flat dict
      ``{name: native float64 array}`` (for JAX that dict is the parameter pytree): ``f(params, *args)``.
      A NumPy ``grad(params, *args)`` (or ``grad(cotangent, params, *args)``) returns
      ``(dict of parameter gradients, gradient of each floating argument...)``.

    A module or model must receive exactly its parameters: missing names, unexpected names and shape
    mismatches raise :class:`InvalidArgumentError` naming the implementation and the parameter. A plain
    function that looks up a name not in ``params`` raises one too.

    Tolerance of the pairwise comparison, per element, with ``s_leaf`` the largest ``|a|, |b|`` of the
    leaf and ``s_all`` of all leaves of the same quantity (values or gradients) of the pair::

        |a - b| <= atol + rtol * (max(|a|, |b|) + 1e-2 * s_leaf + 1e-4 * s_all)

    ``rtol`` defaults to 1e-7 and ``atol`` to 0: float64 implementations of the same math differ by
    rounding (around 1e-13 relative), a porting bug by far more; the block terms keep entries that are
    zero up to rounding from failing.

    Args:
        implementations: label -> implementation (at least two), as above.
        *args: the inputs, given once; floating leaves are compared as float64, integers and booleans
            pass through (converted to each framework's arrays), other values unchanged.
        params: the parameters, as above; None when the implementations hold their own.
        kwargs: keyword arguments for every implementation (arrays converted, never differentiated).
        wrt: narrow the compared gradients: argument positions (int), names or name prefixes of inputs
            and parameters (``"x"``, ``"fc1"``), or a list of these.
        seed: seeds the cotangent and every random generator the checks pin.
        rtol, atol: the pairwise tolerance above.
        own_check: run each implementation's own finite-difference check (the default; it is what tells
            a wrong backward pass from a wrong forward pass).
        name: what to call the function in the report (default: the first implementation's name).
        **check_options: options of the own checks: ``mode``, ``order``, ``eps``, ``probes``,
            ``analytic``, ``train``, ``chunk_size``, ``budget``, ``kinks``, ``progress``, ``memory`` (see
            :func:`check`).

    Returns:
        A :class:`Comparison`; ``comparison.passed`` is the verdict, ``print(comparison)`` explains it.

    Raises:
        InvalidArgumentError: a bad implementation, parameter mapping or option (the message names it).
        BackendNotAvailableError: the framework of an implementation is not installed.
        FunctionEvaluationError: an implementation raised or returned no floating output.
    """
    started = time.perf_counter()
    entries = _resolve(implementations)
    rtol_value, atol_value = _tolerances(rtol, atol)
    if not isinstance(own_check, bool):
        raise InvalidArgumentError(f"own_check: expected True or False, got {own_check!r}")
    if name is not None and not isinstance(name, str):
        raise InvalidArgumentError(f"name: expected a string or None, got {type(name).__name__}")
    options = _own_check_options(check_options, seed)
    source: Set[str] = set()
    inputs = _Inputs(args, validate_kwargs(kwargs), source)
    numpy_params = _params_to_numpy(params, source)
    for entry in entries:
        _validate_params(entry, numpy_params)
    bindings = [_bind(entry, numpy_params) for entry in entries]
    arg_names = _common_argument_names(bindings, len(args))
    runs = [_start(entry, binding, inputs, arg_names, options, seed, numpy_params)
            for entry, binding in zip(entries, bindings)]
    selected = _select(wrt, runs, arg_names)
    notes = _conversion_notes(source, numpy_params)
    for run in runs:
        _evaluate(run, numpy_params)
    cotangents, output_notes, mismatches = _cotangents(runs, seed)
    notes.extend(output_notes)
    for run in runs:
        _gradient(run, cotangents[run.entry.label], numpy_params)
    pairs = _pairs(runs, selected, rtol_value, atol_value)
    notes.extend(_coverage_notes(runs, selected))
    notes.extend(b.note for b in bindings if b.note)
    checks = {run.entry.label: _own_check(run, options, selected, numpy_params) for run in runs} if own_check else {}
    comparison = Comparison(
        function=name if name is not None else function_name(entries[0].fn),
        implementations=[e.label for e in entries], checks=checks, pairs=pairs, verdicts=[], notes=notes,
        seconds=0.0, backends={e.label: f"{e.adapter.name} {e.adapter.version()}" for e in entries},
        tolerance=_describe_tolerance(rtol_value, atol_value), mismatches=mismatches)
    comparison.verdicts = _verdicts(comparison, runs)
    comparison.seconds = time.perf_counter() - started
    _hooks.notify(comparison)
    return comparison


# --- implementations ---

@dataclass
class _Entry:
    """One validated implementation: its label, function, NumPy gradient and adapter."""

    label: str
    fn: Callable[..., Any]
    grad: Optional[Callable[..., Any]]
    adapter: Any

    @property
    def where(self) -> str:
        return f"implementations[{self.label!r}]"


def _backend_key(label: str) -> Optional[str]:
    """The backend a label names (``"torch"``, ``"tf"``...), or None."""
    key = label.lower()
    return _registry.resolve_name(key)


def _resolve(implementations: Any) -> List[_Entry]:
    """Validate the mapping and find each implementation's adapter."""
    if not isinstance(implementations, Mapping):
        raise InvalidArgumentError(f"implementations: expected a mapping of label -> implementation, e.g. "
                                   f"{{'torch': f_torch, 'jax': f_jax}}, got {type(implementations).__name__}")
    if len(implementations) < 2:
        raise InvalidArgumentError(f"implementations: expected at least two implementations to compare, got "
                                   f"{len(implementations)}; to check one alone use gb.check")
    return [_entry(label, value) for label, value in implementations.items()]


def _entry(label: Any, value: Any) -> _Entry:
    if not isinstance(label, str) or not label:
        raise InvalidArgumentError(f"implementations: labels must be non-empty strings, got {label!r}")
    where = f"implementations[{label!r}]"
    named = _backend_key(label)
    if isinstance(value, Implementation):
        fn, grad, backend = value.fn, value.grad, value.backend
        if backend is not None and named is not None and _backend_key(str(backend)) != named:
            raise InvalidArgumentError(f"{where}: the label names backend {named!r} but the Implementation says "
                                       f"backend={backend!r}; use another label or drop one of them")
        backend = backend if backend is not None else named
    elif isinstance(value, tuple):
        if len(value) != 2:
            raise InvalidArgumentError(f"{where}: a tuple must be (fn, grad), the NumPy form; got a tuple of "
                                       f"{len(value)} items")
        fn, grad = value
        if named is not None and named != "numpy":
            raise InvalidArgumentError(f"{where}: a (fn, grad) pair is the NumPy form, but {named} computes gradients "
                                       "itself; pass the function alone (write custom gradients as the framework's "
                                       "custom-gradient rules)")
        backend = "numpy"
    else:
        fn, grad, backend = value, None, named
    if not callable(fn):
        raise InvalidArgumentError(f"{where}: expected a callable (function, module, model), a (fn, grad) tuple for "
                                   f"NumPy, or gb.Implementation(fn, backend=...), got {type(fn).__name__}")
    if grad is not None and not callable(grad):
        raise InvalidArgumentError(f"{where}: grad must be a callable returning gradients, got {type(grad).__name__}")
    adapter = _adapter_for(where, fn, backend, label)
    if adapter.name == "numpy" and grad is None:
        raise InvalidArgumentError(f"{where}: NumPy has no automatic differentiation; pass (fn, grad) with grad as "
                                   "in gb.check, or gb.Implementation(fn, grad=..., backend='numpy')")
    if adapter.name != "numpy" and grad is not None:
        raise InvalidArgumentError(f"{where}: grad= is for NumPy implementations only; {adapter.name} computes "
                                   "gradients itself")
    return _Entry(label, fn, grad, adapter)


def _adapter_for(where: str, fn: Any, backend: Optional[str], label: str) -> Any:
    """The adapter for ``backend``, or the one owning ``fn`` (a module, a model, a compiled function)."""
    if backend is not None:
        try:
            return _registry.get_adapter(backend)
        except GradbridgeError as exc:
            raise type(exc)(f"{where}: {exc}") from None
    owners = [a for a in _registry.loaded_adapters() if a.name != "numpy" and a.owns(fn)]
    if len(owners) == 1:
        return owners[0]
    raise InvalidArgumentError(
        f"{where}: {label!r} is not a backend name ({', '.join(sorted(_registry.names()))}), and which "
        f"framework runs this {type(fn).__name__} cannot be told from it; use gb.Implementation(fn, backend='...')")


# --- conversion to NumPy and back ---

def _floating(array: np.ndarray) -> bool:
    return array.dtype.kind == "f" or array.dtype.name.startswith(("bfloat", "float"))


def _array_of(value: Any, source: Set[str]) -> Optional[np.ndarray]:
    """``value`` as NumPy (floating ones as float64 copies) when it is an array of some framework."""
    for adapter in _registry.loaded_adapters():
        if adapter.owns(value):
            array = adapter.to_numpy(value)
            if array is None:
                return None
            source.add(adapter.name)
            return np.array(array, dtype=np.float64) if _floating(array) else np.array(array, copy=True)
    return None


def _is_array_leaf(value: Any) -> bool:
    return isinstance(value, (np.ndarray, np.generic)) or any(
        a.owns(value) for a in _registry.loaded_adapters() if a.name != "numpy")


def _to_numpy_tree(tree: Any, root: str, source: Set[str]) -> Tuple[List[Any], Callable[[Sequence[Any]], Any]]:
    """The leaves of ``tree`` as NumPy arrays (non-arrays kept as they are) and the function rebuilding it."""
    leaves, rebuild = flatten(tree, root, _is_array_leaf)
    values = []
    for leaf in leaves:
        array = _array_of(leaf.value, source)
        values.append(leaf.value if array is None else array)
    return values, rebuild


def _native(entry: _Entry, values: Sequence[Any], rebuild: Callable[[Sequence[Any]], Any]) -> Any:
    """The tree rebuilt with each NumPy leaf as a new array of ``entry``'s framework."""
    return rebuild([entry.adapter.from_numpy(v) if isinstance(v, np.ndarray) else v for v in values])


class _Inputs:
    """The positional and keyword arguments, converted to NumPy once, rebuilt per framework on demand."""

    def __init__(self, args: Sequence[Any], kwargs: Mapping[str, Any], source: Set[str]) -> None:
        self.args, self._rebuild_args = _to_numpy_tree(tuple(args), "args", source)
        self.kwargs, self._rebuild_kwargs = _to_numpy_tree(dict(kwargs), "kwargs", source)

    def native(self, entry: "_Entry") -> Tuple[tuple, Dict[str, Any]]:
        return _native(entry, self.args, self._rebuild_args), _native(entry, self.kwargs, self._rebuild_kwargs)


def _params_to_numpy(params: Any, source: Set[str]) -> Optional[Dict[str, np.ndarray]]:
    """``params`` as one flat ``{dotted name: float64 array}`` (nested mappings joined with dots)."""
    if params is None:
        return None
    if not isinstance(params, Mapping):
        raise InvalidArgumentError(f"params: expected a mapping of parameter name -> array (e.g. a torch state_dict "
                                   f"or {{'fc1.weight': w1, ...}}), got {type(params).__name__}")
    flat: Dict[str, np.ndarray] = {}

    def walk(mapping: Mapping, prefix: str) -> None:
        for key, value in mapping.items():
            if not isinstance(key, str) or not key:
                raise InvalidArgumentError(f"params: names must be non-empty strings, got {key!r}")
            name = prefix + key
            if isinstance(value, Mapping):
                walk(value, name + ".")
                continue
            array = _array_of(value, source)
            if array is None:
                raise InvalidArgumentError(f"params[{name!r}]: expected an array (NumPy or any framework's), got "
                                           f"{type(value).__name__}")
            if name in flat:
                raise InvalidArgumentError(f"params: {name!r} is given twice")
            flat[name] = array

    walk(params, "")
    return flat


# --- parameters ---

def _validate_params(entry: _Entry, params: Optional[Dict[str, np.ndarray]]) -> None:
    """Names and shapes of ``params`` against what a module or model owns; one error listing every problem."""
    if params is None:
        return
    try:
        expected = entry.adapter.expected_params(entry.fn)
    except GradbridgeError as exc:
        raise type(exc)(f"{entry.where}: {exc}") from None
    if expected is None:
        return
    problems = _param_problems(expected, params)
    if problems:
        listing = ", ".join(f"{n} {tuple(s)}" for n, s in expected.required.items())
        optional = ", ".join(f"{n} {tuple(s)}" for n, s in expected.optional.items())
        raise InvalidArgumentError(
            f"{entry.where}: params do not match the parameters of the {expected.owner} ({expected.convention}): "
            + "; ".join(problems) + f". Expected: {listing or '(none)'}"
            + (f"; may also be given: {optional}" if optional else "")
            + f". Given: {', '.join(f'{n} {a.shape}' for n, a in params.items()) or '(none)'}")


def _param_problems(expected: ExpectedParams, params: Dict[str, np.ndarray]) -> List[str]:
    problems = []
    missing = [n for n in expected.required if n not in params]
    if missing:
        problems.append("missing " + ", ".join(f"{n!r} (shape {tuple(expected.required[n])})" for n in missing))
    known = {**expected.optional, **expected.required}
    for name, array in params.items():
        if name in expected.unsupported:
            problems.append(f"{name!r} cannot be loaded: {expected.unsupported[name]}")
        elif name not in known:
            close = [n for n in known if n.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]]
            hint = f" (did you mean {', '.join(repr(n) for n in close[:3])}?)" if close else ""
            problems.append(f"unexpected {name!r}{hint}")
        elif tuple(array.shape) != tuple(known[name]):
            problems.append(f"{name!r} has shape {tuple(array.shape)} in params but {tuple(known[name])} in the model")
    return problems


def _bind(entry: _Entry, params: Optional[Dict[str, np.ndarray]]) -> ParamBinding:
    try:
        return entry.adapter.bind_params(entry.fn, params, entry.grad)
    except GradbridgeError as exc:
        raise type(exc)(f"{entry.where}: {exc}") from None


def _common_argument_names(bindings: Sequence[ParamBinding], count: int) -> Tuple[str, ...]:
    """Names of the user's positional arguments: from the signatures where all that name them agree
    (a module's ``forward``, a function's parameters after the parameter dict), else ``arg0``, ``arg1``..."""
    defaults = tuple(f"arg{i}" for i in range(count))
    votes = set()
    for binding in bindings:
        lead = len(binding.leading_args)
        names = argument_names(binding.signature or binding.fn, lead + count)[lead:]
        if names != defaults and not any(n == d for n, d in zip(names, defaults)):
            votes.add(names)
    return votes.pop() if len(votes) == 1 else defaults


# --- running each implementation ---

@dataclass
class _Run:
    """One implementation's prepared check, its leaves' common names, values and gradients."""

    entry: _Entry
    binding: ParamBinding
    spec: Optional[CheckSpec] = None
    prepared: Any = None
    values: Dict[str, np.ndarray] = field(default_factory=dict)
    output_order: List[str] = field(default_factory=list)
    gradients: Dict[str, np.ndarray] = field(default_factory=dict)
    leaf_names: Dict[str, str] = field(default_factory=dict)  # common name -> adapter leaf name

    def common(self, leaf: LeafSpec) -> str:
        return self.binding.names.get(leaf.name, leaf.name)


def _start(entry: _Entry, binding: ParamBinding, inputs: _Inputs, arg_names: Tuple[str, ...], options: Options,
           seed: int, params: Optional[Dict[str, np.ndarray]]) -> _Run:
    """The implementation's check spec (its own arrays, the parameters as it takes them) and prepared function."""
    args, kwargs = inputs.native(entry)
    run = _Run(entry, binding)
    run.spec = CheckSpec(fn=binding.fn, args=tuple(binding.leading_args) + tuple(args), kwargs=kwargs,
                         params=binding.params, wrt=None, grad=binding.grad, seed=seed, train=options.train,
                         arg_names=tuple(binding.leading_names) + arg_names, promote=True)
    run.prepared = _prepare(run, None, params)
    return run


def _prepare(run: _Run, wrt: Optional[Tuple[str, ...]], params: Optional[Dict[str, np.ndarray]]) -> PreparedFunction:
    """The adapter's prepared function, with every parameter leaf of ``x0`` set to its given value."""
    spec = run.spec if wrt is None else dataclasses.replace(run.spec, wrt=wrt)
    prepared = _guarded(run, lambda: run.entry.adapter.prepare(spec), params)
    x0 = np.array(prepared.x0, dtype=np.float64, copy=True)
    for leaf in prepared.leaves:
        name = run.common(leaf)
        run.leaf_names[name] = leaf.name
        if params is not None and name in params:
            x0[leaf.slice] = params[name].reshape(-1)
    prepared.x0 = x0
    return prepared


def _guarded(run: _Run, action: Callable[[], Any], params: Optional[Dict[str, np.ndarray]]) -> Any:
    """Run ``action``; errors name the implementation (and a parameter a plain function looked up in vain)."""
    try:
        return action()
    except GradbridgeError as exc:
        missing = _missing_param(exc, params)
        if missing is not None:
            raise missing from exc
        try:
            wrapped = type(exc)(f"{run.entry.where}: {exc}")
        except TypeError:
            raise exc from None
        raise wrapped from exc
    except Exception as exc:
        missing = _missing_param(exc, params)
        if missing is not None:
            raise missing from exc
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise FunctionEvaluationError(f"{run.entry.where}: fn raised {type(exc).__name__}: {text}") from exc


def _missing_param(exc: BaseException, params: Optional[Dict[str, np.ndarray]]) -> Optional[InvalidArgumentError]:
    """An error naming the parameter when ``exc`` (or its cause) is a lookup of a name ``params`` lacks."""
    if params is None:
        return None
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str) and exc.args[0] not in params:
            return InvalidArgumentError(
                f"params: an implementation looked up parameter {exc.args[0]!r}, which params does not contain; "
                f"given: {', '.join(repr(n) for n in params) or '(none)'}")
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _evaluate(run: _Run, params: Optional[Dict[str, np.ndarray]]) -> None:
    """The outputs at the common point, by output name."""
    prepared = run.prepared

    def evaluate() -> np.ndarray:
        with prepared.session():
            return prepared.evaluate(prepared.x0[None, :])[0]

    flat = _guarded(run, evaluate, params)
    for spec in prepared.output_specs:
        run.values[spec.name] = np.asarray(flat[spec.slice], dtype=np.float64).reshape(spec.shape)
        run.output_order.append(spec.name)


def _gradient(run: _Run, cotangent: np.ndarray, params: Optional[Dict[str, np.ndarray]]) -> None:
    """The VJP with the shared cotangent, by common leaf name."""
    prepared = run.prepared

    def vjp() -> np.ndarray:
        with prepared.session():
            return prepared.vjp(cotangent[None, :])[0]

    flat = _guarded(run, vjp, params)
    for leaf in prepared.leaves:
        run.gradients[run.common(leaf)] = np.asarray(flat[leaf.slice], dtype=np.float64).reshape(leaf.shape)


def _cotangents(runs: Sequence[_Run], seed: int) -> Tuple[Dict[str, np.ndarray], List[str], List[str]]:
    """One cotangent per implementation (laid out as its outputs), shared by output name; notes; mismatches.

    Only outputs every implementation returns with the same shape get a non-zero cotangent, so the VJPs
    stay comparable when the structures differ (which is reported as a mismatch).
    """
    first = runs[0]
    common = [n for n in first.output_order
              if all(n in r.values and r.values[n].shape == first.values[n].shape for r in runs)]
    mismatches = []
    for run in runs[1:]:
        if run.output_order != first.output_order or any(run.values[n].shape != first.values[n].shape
                                                         for n in run.output_order if n in first.values):
            mismatches.append(
                f"{first.entry.label} returns {_describe_outputs(first)} but {run.entry.label} returns "
                f"{_describe_outputs(run)}: every implementation must return the same outputs (names and shapes); "
                "look at what each returns")
    notes = []
    if not common:
        raise InvalidArgumentError("implementations: no output is common to all implementations (same name and "
                                   f"shape), so nothing can be compared: {'; '.join(mismatches)}")
    blocks: Dict[str, np.ndarray] = {}
    if sum(first.values[n].size for n in common) == 1:
        blocks = {n: np.ones(first.values[n].shape) for n in common}
        notes.append("scalar output: the gradients themselves are compared")
    else:
        rng = np.random.default_rng(seed)
        for n in sorted(common):
            blocks[n] = rng.standard_normal(first.values[n].shape)
        notes.append(f"non-scalar output: gradients are compared as vector-Jacobian products with one random "
                     f"cotangent (standard normal, seed {seed}) shared by all implementations")
    result = {}
    for run in runs:
        parts = [blocks[n].reshape(-1) if n in blocks else np.zeros(run.values[n].size) for n in run.output_order]
        result[run.entry.label] = np.concatenate(parts)
    return result, notes, mismatches


def _describe_outputs(run: _Run) -> str:
    return ", ".join(f"{n} {tuple(run.values[n].shape)}" for n in run.output_order)


def _own_check(run: _Run, options: Options, selected: Optional[Set[str]],
               params: Optional[Dict[str, np.ndarray]]) -> Report:
    """The implementation's own finite-difference check at the common point (as :func:`gradbridge.check`)."""
    prepared = run.prepared
    if selected is not None:
        names = tuple(run.leaf_names[n] for n in run.leaf_names if n in selected)
        prepared = _prepare(run, names, params)
    adapter = run.entry.adapter
    report = Report(function=function_name(run.entry.fn), backend=adapter.name, backend_version=adapter.version(),
                    mode=options.mode, order=options.order)
    report.notes.append(f"analytic side: {prepared.analytic_source}")
    try:
        run_check(prepared, options, report)
    except GradbridgeError as exc:
        report.problem = f"the check could not run: {exc}"
    for row in report.rows:  # the leaves by their common names, as everywhere in the comparison
        common = run.binding.names.get(row.input, row.input)
        if row.step_sweep is not None and row.step_sweep.element.startswith(row.input):
            row.step_sweep.element = common + row.step_sweep.element[len(row.input):]
        row.input = common
    return report


# --- selection and pairwise differences ---

def _select(wrt: Any, runs: Sequence[_Run], arg_names: Tuple[str, ...]) -> Optional[Set[str]]:
    """The common leaf names ``wrt`` selects (None: all)."""
    if wrt is None:
        return None
    entries = list(wrt) if isinstance(wrt, (list, tuple)) else [wrt]
    names = list(dict.fromkeys(n for r in runs for n in r.leaf_names))
    chosen: Set[str] = set()
    for entry in entries:
        if isinstance(entry, bool) or not isinstance(entry, (int, str)):
            raise InvalidArgumentError(f"wrt: expected argument positions (int) or leaf names (str), got {entry!r}")
        if isinstance(entry, int):
            if not 0 <= entry < len(arg_names):
                raise InvalidArgumentError(f"wrt: argument position {entry} is out of range ({len(arg_names)} "
                                           "positional argument(s))")
            entry = arg_names[entry]
        hits = [n for n in names if n == entry or n.startswith((entry + ".", entry + "["))]
        if not hits:
            raise InvalidArgumentError(f"wrt: {entry!r} selects nothing; the compared leaves are "
                                       f"{', '.join(names)}")
        chosen.update(hits)
    return chosen


def _tolerances(rtol: Any, atol: Any) -> Tuple[float, float]:
    values = []
    for name, value, default in (("rtol", rtol, DEFAULT_RTOL), ("atol", atol, 0.0)):
        if value is None:
            values.append(default)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
            raise InvalidArgumentError(f"{name}: expected a non-negative finite number or None, got {value!r}")
        values.append(float(value))
    return values[0], values[1]


def _describe_tolerance(rtol: float, atol: float) -> str:
    return (f"|a - b| <= atol + rtol * (max(|a|, |b|) + {LEAF_SCALE:g} * max|leaf| + {GLOBAL_SCALE:g} * max|all "
            f"leaves|), rtol = {rtol:g}, atol = {atol:g}")


def _own_check_options(check_options: Mapping[str, Any], seed: Any) -> Options:
    unknown = [k for k in check_options if k not in CHECK_OPTIONS]
    if unknown:
        raise InvalidArgumentError(
            f"{unknown[0]}: not an option of gb.compare; the own checks take {', '.join(CHECK_OPTIONS)}"
            + (" (rtol/atol are the pairwise tolerance)" if unknown[0] in ("check_rtol", "check_atol") else ""))
    merged = dict(mode="auto", order=1, eps=None, probes=3, analytic="auto", train=False, chunk_size=256,
                  budget=DEFAULT_BUDGET, kinks="allow", progress=None, memory=None)
    merged.update(check_options)
    return validate_options(atol=None, rtol=None, seed=seed, promote=True, **merged)


def difference(first: np.ndarray, second: np.ndarray, rtol: float, atol: float, scale_all: float
               ) -> Tuple[float, float, float, bool, Tuple[int, ...], float, float, int, List[Tuple[int, ...]]]:
    """Compare two arrays under the pairwise rule.

    Returns (max |a-b|, max relative difference, allowed at the worst element, passed, worst index,
    a and b there, number of elements outside, the first of them). Non-finite entries agree only when equal.
    """
    a = np.asarray(first, dtype=np.float64)
    b = np.asarray(second, dtype=np.float64)
    if a.size == 0:
        return 0.0, 0.0, atol, True, (), 0.0, 0.0, 0, []
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(invalid="ignore"):
        diff = np.where(same, 0.0, np.abs(a - b))
    diff = np.where(np.isnan(diff), np.inf, diff)
    magnitude = np.maximum(np.abs(np.where(np.isfinite(a), a, 0.0)), np.abs(np.where(np.isfinite(b), b, 0.0)))
    scale = magnitude + LEAF_SCALE * float(magnitude.max()) + GLOBAL_SCALE * scale_all
    allowed = atol + rtol * scale
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(diff == 0, 0.0, diff / allowed)
        relative = np.where(diff == 0, 0.0, diff / scale)
    ratio = np.where(np.isnan(ratio), np.inf, ratio)
    flat = int(np.argmax(ratio))
    index = tuple(int(i) for i in np.unravel_index(flat, a.shape)) if a.shape else ()
    bad = np.argwhere(diff > allowed)
    listed = [tuple(int(i) for i in row) for row in bad[:OUTSIDE_LISTED]]
    return (float(diff.max()), float(np.nan_to_num(relative, nan=np.inf).max()), float(allowed.reshape(-1)[flat]),
            len(bad) == 0, index, float(a.reshape(-1)[flat]), float(b.reshape(-1)[flat]), len(bad), listed)


def _finite_max(arrays: Sequence[np.ndarray]) -> float:
    best = 0.0
    for array in arrays:
        finite = np.abs(array[np.isfinite(array)])
        if finite.size:
            best = max(best, float(finite.max()))
    return best


def leaf_order(runs: Sequence[_Run]) -> List[str]:
    """Every gradient leaf's common name, inputs first (in argument order), then parameters in the order the
    first implementation lists them."""
    names = list(dict.fromkeys(n for r in runs for n in r.gradients))
    params = {n for r in runs for n in r.binding.names.values()}
    return [n for n in names if n not in params] + [n for n in names if n in params]


def _pairs(runs: Sequence[_Run], selected: Optional[Set[str]], rtol: float, atol: float) -> List[PairDifference]:
    """Every pair of implementations: their common output values, then their common gradient leaves."""
    pairs = []
    order = leaf_order(runs)
    for one, other in itertools.combinations(runs, 2):
        for quantity, a_side, b_side, names in (
                ("value", one.values, other.values, one.output_order),
                ("gradient", one.gradients, other.gradients, order)):
            leaves = [n for n in names if n in a_side and n in b_side and a_side[n].shape == b_side[n].shape
                      and (quantity == "value" or selected is None or n in selected)]
            scale_all = _finite_max([a_side[n] for n in leaves] + [b_side[n] for n in leaves])
            for leaf in leaves:
                abs_diff, rel, allowed, ok, index, a, b, count, listed = difference(a_side[leaf], b_side[leaf], rtol,
                                                                                   atol, scale_all)
                pairs.append(PairDifference(one.entry.label, other.entry.label, quantity, leaf, abs_diff, rel,
                                            allowed, ok, index, a, b, tuple(a_side[leaf].shape), count, listed))
    return pairs


def _conversion_notes(source: Set[str], params: Optional[Dict[str, np.ndarray]]) -> List[str]:
    given = f"{' and '.join(sorted(source))} arrays" if source else "Python values"
    return [f"every implementation ran in float64 at the same point: inputs{' and params' if params else ''} "
            f"given as {given}, converted to float64 NumPy once, then to each framework's arrays"]


def _coverage_notes(runs: Sequence[_Run], selected: Optional[Set[str]]) -> List[str]:
    """Leaves that only some implementations differentiate (compared among those only)."""
    notes = []
    for name in leaf_order(runs):
        if selected is not None and name not in selected:
            continue
        having = [r.entry.label for r in runs if name in r.gradients]
        if len(having) < len(runs):
            lacking = [r.entry.label for r in runs if name not in r.gradients]
            why = (f"{_and(lacking)} {'holds' if len(lacking) == 1 else 'hold'} it fixed (a buffer, a frozen "
                   f"parameter, a non-floating value) or {'does' if len(lacking) == 1 else 'do'} not take it")
            if len(having) == 1:
                notes.append(f"the gradient of {name!r} is not compared: only {having[0]} differentiates it; {why}")
            else:
                notes.append(f"the gradient of {name!r} is compared among {_and(having)} only: {why}")
    return notes


# --- verdicts ---

def _agreeing_groups(labels: Sequence[str], disagree: Set[frozenset]) -> List[Tuple[str, ...]]:
    """The largest sets of implementations that all agree with each other, largest first."""
    best: List[Tuple[str, ...]] = []
    for size in range(len(labels), 0, -1):
        for group in itertools.combinations(labels, size):
            if all(frozenset(p) not in disagree for p in itertools.combinations(group, 2)):
                best.append(group)
        if best:
            return best
    return best


def _majority(labels: Sequence[str], disagree: Set[frozenset]) -> Optional[Tuple[str, ...]]:
    """The one largest group of at least two agreeing implementations, when it is unique and not everyone."""
    groups = _agreeing_groups(labels, disagree)
    if len(groups) == 1 and 2 <= len(groups[0]) < len(labels):
        return groups[0]
    return None


def _at(leaf: str, index: Sequence[int]) -> str:
    """``leaf[i, j]`` (just ``leaf`` for a scalar)."""
    return f"{leaf}[{', '.join(str(i) for i in index)}]" if index else leaf


def _and(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _quoted(names: Sequence[str]) -> str:
    return _and([f"'{n}'" for n in names])


def _failed_rows(report: Report) -> List[str]:
    return list(dict.fromkeys(row.input for row in report.rows if not row.passed))


class _Facts:
    """What the verdicts are drawn from: disagreements per (quantity, leaf), own-check failures per leaf."""

    def __init__(self, comparison: Comparison, runs: Sequence[_Run]) -> None:
        self.labels = comparison.implementations
        self.runs = {r.entry.label: r for r in runs}
        self.disagree: Dict[Tuple[str, str], Set[frozenset]] = {}
        self.worst: Dict[Tuple[str, str], PairDifference] = {}
        for p in comparison.pairs:
            key = (p.quantity, p.leaf)
            self.disagree.setdefault(key, set())
            if not p.passed:
                self.disagree[key].add(frozenset((p.first, p.second)))
                if key not in self.worst or p.max_rel_diff > self.worst[key].max_rel_diff:
                    self.worst[key] = p
        self.own_failed: Dict[str, Set[str]] = {}
        self.checked = bool(comparison.checks)
        self.kinks = _kink_indices(comparison.checks)
        self.kink_pairs: Dict[str, List[PairDifference]] = {}  # leaf -> pairs differing at kinks only
        self.kink_own: Dict[str, List[str]] = {}  # leaf -> labels whose own check fails at kinks only
        for p in comparison.pairs:
            if not p.passed and p.quantity == "gradient" and self._at_kinks_only(p):
                self.kink_pairs.setdefault(p.leaf, []).append(p)
                self.disagree[(p.quantity, p.leaf)].discard(frozenset((p.first, p.second)))
        for label, report in comparison.checks.items():
            failed: Dict[str, List[Any]] = {}
            for row in report.failures:
                failed.setdefault(row.input, []).append(row)
            self.own_failed[label] = set()
            for leaf, rows in failed.items():
                if all(self._kink_row(row) for row in rows):
                    self.kink_own.setdefault(leaf, []).append(label)
                else:
                    self.own_failed[label].add(leaf)

    def _at_kinks_only(self, pair: PairDifference) -> bool:
        """Whether every element of the pair outside the tolerance is a non-differentiable point."""
        kinks = self.kinks.get(pair.leaf, set())
        return bool(pair.outside) and pair.mismatches == len(pair.outside) and set(pair.outside) <= kinks

    def _kink_row(self, row: Any) -> bool:
        """Whether an own-check row fails only at non-differentiable points (``kinks='fail'``/``'subgradient'``)."""
        kinks = self.kinks.get(row.input, set())
        return (row.status == "fail" and 0 < row.mismatches <= row.kinks
                and (row.worst is None or tuple(row.worst.input_index) in kinks))

    def having(self, quantity: str, leaf: str) -> List[str]:
        side = "values" if quantity == "value" else "gradients"
        return [label for label in self.labels if leaf in getattr(self.runs[label], side)]

    def partners(self, label: str, quantity: str, leaf: str) -> List[str]:
        """The implementations ``label`` disagrees with on this quantity."""
        found = []
        for pair in self.disagree.get((quantity, leaf), set()):
            if label in pair:
                found.extend(x for x in pair if x != label)
        return [x for x in self.labels if x in found]


def _kink_indices(checks: Mapping[str, Report]) -> Dict[str, Set[Tuple[int, ...]]]:
    """Leaf -> the elements any own check found at a non-differentiable point (the same point for all)."""
    kinks: Dict[str, Set[Tuple[int, ...]]] = {}
    for report in checks.values():
        for row in report.rows:
            if row.order == 1:
                kinks.setdefault(row.input, set()).update(tuple(k.input_index) for k in row.nondifferentiable)
    return kinks


def _kink_sentence(facts: "_Facts", leaf: str) -> str:
    """Differences at non-differentiable points: subgradient conventions, not wrong gradients."""
    points = sorted(facts.kinks.get(leaf, set()))
    shown = ", ".join(_at(leaf, index) for index in points[:3]) + (", ..." if len(points) > 3 else "")
    parts = [f"'{leaf}' sits at a non-differentiable point here ({shown}: the one-sided derivatives differ)"]
    for p in facts.kink_pairs.get(leaf, []):
        parts.append(f"{p.first} and {p.second} return different subgradients there ({_at(leaf, p.worst_index)}: "
                     f"{p.first_value!r} vs {p.second_value!r})")
    own = facts.kink_own.get(leaf, [])
    if own:
        parts.append(f"the own check of {_and(own)} fails only there (kinks= asks for it)")
    return ("; ".join(parts) + ": a convention at a kink, not a wrong gradient; compare at a point away from it, or "
            "align the conventions if they matter to you")


def _verdicts(comparison: Comparison, runs: Sequence[_Run]) -> List[str]:
    """Plain sentences: which side is wrong, on what, and where to look."""
    facts = _Facts(comparison, runs)
    sentences = list(comparison.mismatches)
    forward_suspects, value_sentences = _value_verdicts(facts)
    sentences.extend(value_sentences)
    sentences.extend(_gradient_verdicts(facts, forward_suspects))
    for label, report in comparison.checks.items():
        if report.problem:
            sentences.append(f"{label}: its own finite-difference check could not judge the gradients: "
                             f"{report.problem}; see its report")
    return sentences


def _value_verdicts(facts: _Facts) -> Tuple[Set[str], List[str]]:
    """Who computes different values: the odd ones out by majority, or an honest 'cannot tell'."""
    suspects: Set[str] = set()
    odd: Dict[Tuple[str, Tuple[str, ...]], List[str]] = {}
    sentences = []
    for (quantity, leaf), disagree in facts.disagree.items():
        if quantity != "value" or not disagree:
            continue
        having = facts.having("value", leaf)
        majority = _majority(having, disagree)
        worst = facts.worst[(quantity, leaf)]
        if majority is not None:
            for label in having:
                if label not in majority:
                    odd.setdefault((label, majority), []).append(leaf)
                    suspects.add(label)
            continue
        involved = [x for x in having if any(x in p for p in disagree)]
        suspects.update(involved)
        where = (f"largest relative difference {worst.max_rel_diff:.2e} at {_at(leaf, worst.worst_index)}: "
                 f"{worst.first_value!r} ({worst.first}) vs {worst.second_value!r} ({worst.second})")
        if len(having) == 2:
            sentences.append(
                f"{_and(involved)} compute different values of '{leaf}' ({where}): at least one forward pass is "
                "wrong, and with only two implementations gradbridge cannot tell which; compare both forwards line "
                "by line (weight layouts and transposes, biases, axes, epsilons) or add a third implementation, "
                "e.g. a NumPy reference, to get a majority. Finite-difference checks cannot find a wrong forward pass")
        else:
            groups = _agreeing_groups(having, disagree)
            split = " / ".join("{" + ", ".join(g) + "}" for g in groups)
            sentences.append(
                f"the implementations disagree on the value of '{leaf}' with no single majority (agreeing groups: "
                f"{split}; {where}): look at the forward passes of {_and(involved)}; finite-difference checks cannot "
                "find a wrong forward pass")
    for (label, majority), leaves in odd.items():
        worst = max((facts.worst[("value", leaf)] for leaf in leaves), key=lambda p: p.max_rel_diff)
        grads = [leaf for (q, leaf), d in facts.disagree.items()
                 if q == "gradient" and any(label in p for p in d) and leaf not in facts.own_failed.get(label, set())]
        consequence = (f" Its gradients of {_quoted(grads)} differ too, consistently with its own forward"
                       + (" (its own finite-difference check passes on them)" if facts.checked else "")
                       + ": fix the forward first." if grads else "")
        sentences.append(
            f"{label}: value of {_quoted(leaves)} disagrees with {_and(majority)}, which agree with each other "
            f"(largest relative difference {worst.max_rel_diff:.2e} at {_at(worst.leaf, worst.worst_index)}): "
            f"{label}'s forward pass is wrong; look at how it computes {_quoted(leaves)} (weight layout or transpose, "
            f"a missing bias or term, an axis, an epsilon, a different convention).{consequence}")
    return suspects, sentences


def _gradient_verdicts(facts: _Facts, forward_suspects: Set[str]) -> List[str]:
    """Wrong backward passes (own finite differences disagree), unreliable checks, unexplained differences."""
    backward: Dict[str, Dict[str, List[str]]] = {}  # label -> leaf -> implementations it disagrees with
    grouped: Dict[Tuple[str, Tuple[str, ...], Tuple[str, ...]], List[str]] = {}
    sentences = []
    for leaf in leaf_order(list(facts.runs.values())):
        key = ("gradient", leaf)
        if key not in facts.disagree:
            continue  # not compared (wrt)
        if leaf in facts.kink_pairs or leaf in facts.kink_own:
            sentences.append(_kink_sentence(facts, leaf))
        having = facts.having("gradient", leaf)
        disagree = facts.disagree[key]
        failing = [x for x in having if leaf in facts.own_failed.get(x, set())]
        if failing and not disagree and len(failing) == len(having) and len(having) > 1:
            sentences.append(
                f"every implementation's own finite-difference check fails on '{leaf}' while their gradients agree "
                "with each other: the finite differences are what is unreliable there (a non-differentiable point, "
                "noise in the function, a step too large); see the reports' details before suspecting the gradients")
            continue
        for label in failing:
            partners = facts.partners(label, "gradient", leaf)
            if partners:
                backward.setdefault(label, {})[leaf] = partners
            else:
                sentences.append(
                    f"{label}: its own finite-difference check fails on '{leaf}', although its gradient agrees with "
                    f"{_and([x for x in having if x != label])}: the finite differences, not the gradient, look "
                    f"unreliable there (a non-differentiable point or noise); see {label}'s report")
        unexplained = {p for p in disagree if not (p & set(failing)) and not (p & forward_suspects)}
        if unexplained:
            key, name = _unexplained(facts, leaf, having, failing, unexplained)
            grouped.setdefault(key, []).append(name)
    for label, by_leaf in backward.items():
        names = list(by_leaf)
        partners = list(dict.fromkeys(x for leaf in names for x in by_leaf[leaf]))
        analytic = getattr(facts.runs[label].prepared, "analytic_source", "its gradient code")
        sentences.append(
            f"{label}: gradient of {_quoted(names)} disagrees with {_and(partners)}, and {label}'s own "
            f"finite-difference check fails on {_quoted(names)}: {label}'s backward pass is wrong; look at the "
            f"gradient code behind {_quoted(names)} ({analytic})")
    for (kind, who, majority), names in grouped.items():
        sentences.append(_unexplained_sentence(facts, kind, who, majority, names))
    return sentences


def _unexplained(facts: _Facts, leaf: str, having: Sequence[str], failing: Sequence[str],
                 disagree: Set[frozenset]) -> Tuple[Tuple[str, Tuple[str, ...], Tuple[str, ...]], str]:
    """Gradients differ where no own check fails and the values agree: (kind, who, majority), the leaf."""
    candidates = [x for x in having if x not in failing]
    majority = _majority(candidates, disagree)
    if majority is not None:
        return ("odd", tuple(x for x in candidates if x not in majority), majority), leaf
    involved = tuple(sorted({x for p in disagree for x in p}, key=list(facts.labels).index))
    return ("split", involved, ()), leaf


def _unexplained_sentence(facts: _Facts, kind: str, who: Tuple[str, ...], majority: Tuple[str, ...],
                          leaves: Sequence[str]) -> str:
    worst = max((facts.worst[("gradient", leaf)] for leaf in leaves), key=lambda p: p.max_rel_diff)
    where = (f"largest relative difference {worst.max_rel_diff:.2e} at {_at(worst.leaf, worst.worst_index)}: "
             f"{worst.first_value!r} ({worst.first}) vs {worst.second_value!r} ({worst.second})")
    names = _quoted(leaves)
    if not facts.checked:
        if kind == "odd":
            return (f"{_and(who)}: gradient of {names} disagrees with {_and(majority)}, which agree with each other "
                    f"({where}): {_and(who)}'s backward pass is likely wrong; run with own_check=True to confirm it "
                    "with its own finite differences")
        return (f"{_and(who)} compute different gradients of {names} ({where}) and there is no majority to tell "
                "which is wrong; run with own_check=True: each implementation's own finite-difference check tells "
                "which backward pass is wrong")
    if kind == "odd":
        return (f"{_and(who)}: gradient of {names} disagrees with {_and(majority)} ({where}), although the values "
                "agree and every own finite-difference check passes on it: the implementations compute different "
                f"functions near this point (a term that vanishes here, another branch); look at {_and(who)}'s "
                "forward pass, or rerun with mode='full' if the own checks ran in fast mode")
    return (f"{_and(who)} compute different gradients of {names} ({where}), although the values agree and "
            "their own finite-difference checks pass: their functions differ near this point (a term that vanishes "
            "here, another branch), and gradbridge cannot tell which is meant; look at both forward passes")


# --- text ---

def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if not np.isfinite(value):
        return str(value)
    return f"{value:.4g}" if 1e-3 <= abs(value) < 1e5 else f"{value:.3e}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    widths = [max([len(header[i])] + [len(r[i]) for r in rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def render_comparison(comparison: Comparison) -> str:
    """Plain text: header, pairwise table, verdicts, each own check's summary and failing details, notes."""
    verdict = "PASSED" if comparison.passed else "FAILED"
    lines = [f"gradbridge compare of {comparison.function}: {verdict}  ({comparison.summary().split(': ', 1)[-1]})",
             "  implementations: " + ", ".join(f"{label} ({comparison.backends.get(label, '?')})"
                                               for label in comparison.implementations)
             + f" | {comparison.seconds:.3f} s",
             f"  tolerance: {comparison.tolerance}", ""]
    rows = [[f"{p.first} vs {p.second}", p.quantity, p.leaf, _fmt(p.max_abs_diff), _fmt(p.max_rel_diff),
             "ok" if p.passed else "DIFFER",
             "" if p.passed else f"{_at(p.leaf, p.worst_index)}: {p.first_value:.10g} vs {p.second_value:.10g}"
             + (f" ({p.mismatches} of {int(np.prod(p.shape, dtype=np.int64))} outside)" if p.shape else "")]
            for p in comparison.pairs]
    lines.extend(_table(("pair", "quantity", "leaf", "max |a-b|", "rel diff", "verdict", "worst element"), rows))
    if comparison.verdicts:
        lines.append("")
        lines.append("Verdicts:")
        lines.extend(f"  - {sentence}" for sentence in comparison.verdicts)
    if comparison.checks:
        lines.append("")
        lines.append("Own finite-difference checks:")
        width = max(len(label) for label in comparison.checks)
        for label, report in comparison.checks.items():
            lines.append(f"  {label.ljust(width)}  {report.summary()}")
            lines.extend(_failure_lines(report))
    lines.append("")
    lines.extend(f"  note: {note}" for note in comparison.notes)
    return "\n".join(lines).rstrip() + "\n"


def _failure_lines(report: Report) -> List[str]:
    lines = []
    for row in report.failures:
        text = f"      {row.input} -> {row.output}: {row.status}"
        if row.worst is not None:
            w = row.worst
            index = list(w.input_index) if w.input_index else ""
            text += (f", {row.mismatches} of {row.compared} entries outside tolerance; worst {row.input}{index}: "
                     f"analytic {w.analytic:.10g} vs numeric {w.numeric:.10g}")
        elif row.message:
            text += f": {row.message}"
        lines.append(text)
    return lines
