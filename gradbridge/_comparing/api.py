"""The entry point :func:`compare`: one set of inputs through several implementations of the same function.

Cross-framework comparison runs one set of inputs through several implementations of the same function
(torch, JAX, TensorFlow, NumPy, or several of one framework) at one float64 point and reports, pairwise, how far
their values and gradients are apart (within a tolerance that follows the precision each one really computes
in), plus each one's own finite-difference check, so that someone porting a model learns which side is wrong.

Invariant: everything framework-specific (array conversion, loading parameters into a module) sits behind the
adapters' compare methods (:class:`gradbridge._adapter.CompareAdapter`); this package never names a framework.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple


from .. import _hooks
from .._api import function_name
from .._errors import InvalidArgumentError
from .._defaults import CHECK_DEFAULTS, SEED
from .._options import Options, validate_kwargs, validate_options
from . import mapping
from . import points as points_module
from .differences import conversion_notes, coverage_notes, describe_tolerance, _pairs, select, tolerances
from .implementations import SharedInputs, bind, common_argument_names, params_to_numpy, resolve, validate_params
from .layer_runs import trace_layers
from .randomness import random_implementations
from .layers import LayerDivergence, divergences
from .mapping.names import layer_key
from .result import Comparison
from .runs import ImplementationRun, _cotangents, evaluate_run, gradient_run, measure_precision, _own_check, start_run
from .verdicts import _verdicts
from .._complex import view_note
from .runs import complex_leaves

#: Options of the implementations' own checks that ``compare`` passes on (see :func:`gradbridge.check`).
CHECK_OPTIONS = ("mode", "order", "eps", "probes", "analytic", "train", "chunk_size", "budget", "kinks", "progress",
                 "memory")

# --- the entry point ---

def compare(implementations: Mapping[str, Any], *args: Any, params: Optional[Mapping[str, Any]] = None,
            kwargs: Optional[Mapping[str, Any]] = None, wrt: Any = None, seed: int = SEED,
            rtol: Optional[float] = None, atol: Optional[float] = None, own_check: bool = True,
            name: Optional[str] = None, param_map: Optional[Mapping[str, Mapping[str, str]]] = None,
            param_templates: Optional[Mapping[str, Any]] = None, layouts: Optional[Mapping[str, Any]] = None,
            layers: bool = False, points: int = 3,
            **check_options: Any) -> Comparison:
    """Run the same inputs through several implementations of one function and say which side is wrong.

    ``gb.compare({"torch": model, "jax": f_jax, "tensorflow": keras_model, "numpy": (f_np, grad_np)}, x,
    params=weights)`` converts ``args`` (NumPy arrays, or the arrays of any one framework, nested in
    lists, tuples and dicts too) to float64 NumPy once and then to each implementation's own arrays,
    evaluates every implementation at that one point (in float64 unless it computes in a lower precision
    inside, which is measured and said), and compares pairwise, by name:

    * the output values (every floating output, by its name: ``out``, ``out[0]``, ``out['loss']``; a dict's
      entries by key, in whatever order each framework returns them);
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

    Tolerance of the pairwise comparison, per element, with ``m`` the larger of ``|a|``, ``|b|`` and the
    magnitude each side computes the entry from (measured: how far the entry moves when every input moves by
    one rounding of that implementation's precision, over that relative move), ``s_leaf`` the largest ``m``
    of the leaf and ``s_all`` of all leaves of the same quantity (values or gradients) of the pair::

        |a - b| <= atol + rtol * (m + 1e-2 * s_leaf + 1e-4 * s_all)

    ``rtol`` defaults to ``16 * max(eps_a, eps_b, 1.5e-8)``, with ``eps`` the machine epsilon of the
    precision each side really computes in (float64's, or float32's for an implementation that casts to
    float32 inside: its adapter, its outputs' dtypes or its measured response say so), and ``atol`` to 0:
    2.4e-7 between float64 ports (float64 library functions are not all correctly rounded: TensorFlow's
    exact GELU is ~5e-9 off), 1.9e-6 with a float32 side, whose pairs also take ``1 * s_leaf`` in place of
    ``1e-2 * s_leaf`` (float32 library functions are not all correctly rounded: XLA's float32 tanh is exactly 1
    from |x| ~ 8, so gradients through saturated units are off by a float32 rounding of the leaf's scale); porting
    bugs show at 1e-4 and more. The
    measured magnitude keeps entries that are zero up to rounding (KL(p||p), a residual) from failing.
    Given ``rtol``/``atol`` are used exactly. ``comparison.tolerance`` says which rule decided.

    Args:
        implementations: label -> implementation (at least two), as above.
        *args: the inputs, given once; floating leaves are compared as float64, integers and booleans
            pass through (converted to each framework's arrays), other values unchanged.
        params: the parameters, as above; None when the implementations hold their own.
        kwargs: keyword arguments for every implementation (arrays converted, never differentiated).
        wrt: narrow the compared gradients: argument positions (int), names or name prefixes of inputs
            and parameters (``"x"``, ``"fc1"``), or a list of these.
        seed: seeds the cotangent and every random generator the checks pin.
        rtol, atol: the pairwise tolerance above (None: derived per pair, as above).
        own_check: run each implementation's own finite-difference check (the default; it is what tells
            a wrong backward pass from a wrong forward pass).
        name: what to call the function in the report (default: the first implementation's name).
        param_map: ``{label: {its parameter name: name in params}}``: pairs the automatic weight mapping
            cannot find. Without it, ``params`` given in one framework's names and layouts (a torch
            ``state_dict``) reach every implementation in its own: ``fc1.weight`` (out, in) becomes a Keras
            ``fc1/kernel`` (in, out), conv kernels OIHW <-> HWIO, LayerNorm weight/bias <-> gamma/beta, BatchNorm
            running statistics <-> moving statistics, paired by layer name, else by layer order and shape.
        param_templates: ``{label: nested mapping}``: how a plain function (a JAX function of a flax-style
            parameter tree) takes its parameters, when its names cannot be read from ``params`` itself.
        layouts: ``{label: gb.channels_last()}``: an implementation that takes its images (and returns its
            outputs, ``gb.channels_last(outputs=("out",))``) channels-last (N, H, W, C) where the others use
            channels-first (N, C, H, W); its inputs are transposed for it, its outputs and gradients back, so
            everything is compared in one layout. :class:`gradbridge.Layout` gives any other permutation.
        layers: also compare layer by layer and say where each pair of implementations first diverges: the
            first layer whose outputs differ, or, when every layer's output agrees, the layer whose backward pass
            differs (from the gradients flowing into each layer's output, with the same cotangent). The layers
            of a torch module and of a Sequential or functional Keras model are found automatically (by forward
            hooks, by running the model's graph), paired by name (``fc1`` with ``fc1``), else by position among
            layers of the same shape; a plain function (JAX, NumPy, a subclassed model's ``call``) marks its
            layers with :func:`gradbridge.tap`. Costs about two more evaluations and precision measurements per
            implementation. ``comparison.layers`` and the report's "Layer by layer" section give the result.
        points: how many points to compare at: the given inputs, then ``points - 1`` drawn around them (every
            input element ``x`` moved to ``x * exp(s z)``, ``s`` = 0.5, 1 outward (``|z|``), 2, ...: signs, zeros
            and domains kept, magnitudes changed several-fold), so a port that differs only away from the given point (at larger
            inputs: an overflow, a clamp, an approximation) is caught. Values and gradients are compared at each;
            the own checks and the layer mode run at the given point. Each extra point costs about one
            evaluation, one VJP and one precision measurement per implementation. 1 compares the given point only.
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
    entries = resolve(implementations)
    rtol_value, atol_value = tolerances(rtol, atol)  # None: derived per pair from the measured precisions
    if not isinstance(own_check, bool):
        raise InvalidArgumentError(f"own_check: expected True or False, got {own_check!r}")
    if not isinstance(layers, bool):
        raise InvalidArgumentError(f"layers: expected True or False, got {layers!r}")
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise InvalidArgumentError(f"points: expected a whole number >= 1 (1: the given inputs only), got {points!r}")
    if name is not None and not isinstance(name, str):
        raise InvalidArgumentError(f"name: expected a string or None, got {type(name).__name__}")
    options = _own_check_options(check_options, seed)
    source: Set[str] = set()
    inputs = SharedInputs(args, validate_kwargs(kwargs), source)
    numpy_params = mapping.keep_structure(params_to_numpy(params, source), params)
    # one params= (say a torch state_dict) in each implementation's own names and layouts (mapping/)
    mapped = mapping.map_params(entries, numpy_params, overrides=param_map, templates=param_templates)
    own = {e.label: mapped[e.label].params if mapped else numpy_params for e in entries}
    at = {e.label: mapped[e.label].at_source() if mapped else numpy_params for e in entries}
    for entry in entries:
        validate_params(entry, own[entry.label])
    bindings = [bind(entry, own[entry.label]) for entry in entries]
    if mapped:
        bindings = [mapped[entry.label].rename(binding) for entry, binding in zip(entries, bindings)]
    arg_names = common_argument_names(bindings, len(args))
    arrangers = {e.label: mapping.Arranger(layout, arg_names, e.label)
                 for e, layout in zip(entries, _layouts(layouts, [e.label for e in entries]))}
    runs = [start_run(entry, binding, inputs, arg_names, options, seed, at[entry.label],
                      arrange=arrangers[entry.label].arrange)
            for entry, binding in zip(entries, bindings)]
    selected = select(wrt, runs, arg_names)

    def common_values(run: ImplementationRun) -> None:  # outputs in the common layout (NCHW where others use it)
        run.values = arrangers[run.entry.label].outputs_from(run.values)

    def finish(run: ImplementationRun) -> None:  # gradients and magnitudes in the names and layouts of params
        arranger = arrangers[run.entry.label]
        if mapped:
            run.gradients = mapped[run.entry.label].gradients_to_source(run.gradients)
            run.precision.gradients = mapped[run.entry.label].gradients_to_source(run.precision.gradients)
        run.gradients = arranger.inputs_from(run.gradients)
        run.precision.gradients = arranger.inputs_from(run.precision.gradients)
        run.precision.values = arranger.outputs_from(run.precision.values)

    for run in runs:
        evaluate_run(run, at[run.entry.label])
        arrangers[run.entry.label].check_outputs(run.output_order)
        common_values(run)
    cotangents, output_notes, mismatches = _cotangents(
        runs, seed, lambda label, name, block: arrangers[label].layout.output_to_implementation(name, block))
    for run in runs:
        gradient_run(run, cotangents[run.entry.label], at[run.entry.label])
        measure_precision(run, cotangents[run.entry.label], seed)  # in the implementation's own layouts
        finish(run)
    notes = conversion_notes(source, numpy_params, runs) + output_notes
    pairs, pair_tolerances = _pairs(runs, selected, rtol_value, atol_value)
    notes.extend(coverage_notes(runs, selected))
    notes.extend(b.note for b in bindings if b.note)
    notes.extend(m.note for m in (mapped or {}).values() if m.note)
    layer_divergences = (_layer_divergences(runs, cotangents, seed, at, rtol_value, atol_value, notes, arrangers)
                         if layers else [])
    checks = ({run.entry.label: _own_check(run, options, selected, at[run.entry.label]) for run in runs}
              if own_check else {})
    comparison = Comparison(
        function=name if name is not None else function_name(entries[0].fn),
        implementations=[e.label for e in entries], checks=checks, pairs=pairs, verdicts=[], notes=notes,
        seconds=0.0, backends={e.label: f"{e.adapter.name} {e.adapter.version()}" for e in entries},
        tolerance=describe_tolerance(pair_tolerances), mismatches=mismatches, layers=layer_divergences,
        complex_leaves=complex_leaves(runs))
    if comparison.complex_leaves:
        comparison.notes.append(view_note(comparison.complex_leaves))
    random = (random_implementations(runs, at, common_values) if any(p.quantity == "value" and not p.passed for p in pairs)
              else {})
    comparison.verdicts = _verdicts(comparison, runs, random)
    for divergence in comparison.layers:  # a random implementation's layers differ by its draws, not a bug
        divergence.random = [label for label in (divergence.first, divergence.second) if label in random]
        if divergence.layer is None and not divergence.random:
            divergence.parameters = _owning_layers(divergence, pairs, set(numpy_params or {}))
    if points > 1:
        inputs = points_module.movable_inputs(runs, arg_names, selected)
        _extra_points(comparison, runs, points, inputs, seed, cotangents, (arrangers, common_values, finish), selected,
                      rtol_value, atol_value)
    comparison.seconds = time.perf_counter() - started
    _hooks.notify(comparison)
    return comparison


def _layouts(layouts: Optional[Mapping[str, Any]], labels: Sequence[str]) -> List[Optional[mapping.Layout]]:
    """The layout given for each label (validated: labels known, values gb.channels_last()/gb.Layout), or None."""
    if layouts is None:
        return [None] * len(labels)
    if not isinstance(layouts, Mapping):
        raise InvalidArgumentError(f"layouts: expected a mapping of label -> gb.channels_last() (or gb.Layout), got "
                                   f"{type(layouts).__name__}")
    unknown = [k for k in layouts if k not in labels]
    if unknown:
        raise InvalidArgumentError(f"layouts: {unknown[0]!r} is not one of the implementations' labels "
                                   f"({', '.join(labels)})")
    for label, value in layouts.items():
        if value is not None and not isinstance(value, mapping.Layout):
            raise InvalidArgumentError(f"layouts[{label!r}]: expected gb.channels_last(...) or gb.Layout(...), got "
                                       f"{type(value).__name__}")
    return [layouts.get(label) for label in labels]


def _extra_points(comparison: Comparison, runs: Sequence[ImplementationRun], points: int, inputs: Set[str],
                  seed: int, cotangents: Mapping[str, Any], conversions: Tuple[Any, Callable, Callable],
                  selected: Optional[Set[str]], rtol: Optional[float], atol: Optional[float]) -> None:
    """The comparison repeated at ``points - 1`` points around the given one (:mod:`.points`): their pairs go to
    ``comparison.other_points`` (``point`` 1, 2, ...); where one differs, a verdict says at which point and how."""
    comparison.notes.append(points_module.describe(points, seed))
    failing_at: List[int] = []
    for point in range(1, points):
        drawn: dict = {}
        moved_runs, why = points_module.runs_at(point, runs, inputs, seed, dict(cotangents), conversions, drawn)
        comparison.point_inputs[point + 1] = drawn
        if moved_runs is None:
            comparison.notes.append(why or f"point {point + 1} skipped")
            continue
        pairs = _pairs(moved_runs, selected, rtol, atol)[0]
        for pair in pairs:
            pair.point = point
        comparison.other_points.extend(pairs)
        if any(not p.passed for p in pairs):
            if not failing_at and all(p.passed for p in comparison.pairs):
                at_point = Comparison(function=comparison.function, implementations=comparison.implementations,
                                      checks={}, pairs=pairs, verdicts=[], notes=[], seconds=0.0)
                comparison.verdicts.extend(
                    f"at point {point + 1} (inputs moved around the given ones, in comparison.point_inputs[{point + 1}]; "
                    "they agree at the given point): "
                    f"{sentence}" for sentence in _verdicts(at_point, moved_runs))
            failing_at.append(point + 1)
    if failing_at and (len(failing_at) > 1 or any(not p.passed for p in comparison.pairs)):
        comparison.notes.append(f"the implementations differ at point(s) {', '.join(map(str, failing_at))} of "
                                f"{points} too (the table lists where)")


def _layer_divergences(runs: Sequence[ImplementationRun], cotangents: Mapping[str, Any], seed: int,
                       at: Mapping[str, Any], rtol: Optional[float], atol: Optional[float],
                       notes: List[str], arrangers: Mapping[str, Any]) -> List[LayerDivergence]:
    """Each pair's first diverging layer (:mod:`.layers`); implementations without layers are named in ``notes``."""
    traces = []
    for run in runs:
        trace, note = trace_layers(run, cotangents[run.entry.label], seed, at[run.entry.label])
        if trace is not None:
            traces.append(trace)
        if note:
            notes.append(note)
    for trace in traces:
        _channels_first(trace, arrangers[trace.label], [t for t in traces if t is not trace])
    found = divergences(traces, rtol, atol)
    notes.extend(note for divergence in found for note in divergence.notes)
    return found


def _owning_layers(divergence: LayerDivergence, pairs: Sequence[Any], params: Set[str]) -> List[Tuple[str, str]]:
    """``(parameter, layer)`` for each differing parameter gradient of the divergence's pair, with the agreeing
    layer whose name prefixes it (``fc1.weight`` -> ``fc1``), named as the first implementation names it."""
    names = [a for a, _ in divergence.agreeing]
    found = []
    for pair in pairs:
        if (pair.quantity != "gradient" or pair.passed or {pair.first, pair.second} != {divergence.first,
                                                                                        divergence.second}
                or (params and pair.leaf not in params)):
            continue
        owners = [n for n in names if pair.leaf.startswith(n + ".")]
        if owners:
            found.append((pair.leaf, max(owners, key=len)))
    return found


def _channels_first(trace: Any, arranger: Any, others: Sequence[Any]) -> None:
    """A channels-last implementation's activations turned channels-first where that is what the other
    implementations' layer of the same name (else of any name) has and the activation as it is is not: image
    activations (N, H, W, C) are, token activations (N, T, C) stay as they are."""
    if not arranger.channels_last:
        return
    shapes_by_key: Dict[str, set] = {}
    for other in others:
        for name, value in zip(other.names, other.values):
            shapes_by_key.setdefault(layer_key(name), set()).add(value.shape)
    every = set().union(*shapes_by_key.values()) if shapes_by_key else set()
    for i, (name, value) in enumerate(zip(trace.names, trace.values)):
        turned = arranger.activation_from(value)
        wanted = shapes_by_key.get(layer_key(name), every)
        if turned.shape == value.shape or value.shape in wanted or turned.shape not in wanted:
            continue
        trace.values[i] = turned
        for series in (trace.gradients, trace.value_magnitudes, trace.gradient_magnitudes):
            if i < len(series) and series[i] is not None:
                series[i] = arranger.activation_from(series[i])


def _own_check_options(check_options: Mapping[str, Any], seed: Any) -> Options:
    unknown = [k for k in check_options if k not in CHECK_OPTIONS]
    if unknown:
        raise InvalidArgumentError(
            f"{unknown[0]}: not an option of gb.compare; the own checks take {', '.join(CHECK_OPTIONS)}"
            + (" (rtol/atol are the pairwise tolerance)" if unknown[0] in ("check_rtol", "check_atol") else ""))
    merged = {k: v for k, v in CHECK_DEFAULTS.items() if k in CHECK_OPTIONS}
    merged.update(check_options)
    return validate_options(atol=None, rtol=None, seed=seed, promote=True, **merged)
