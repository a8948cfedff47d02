"""Running each implementation: evaluation, gradients at shared cotangents, and its own finite-difference check.

Invariant: every implementation runs at exactly the same point and is differentiated with the same
cotangents; an implementation's failure is reported as that implementation's, never as a disagreement.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from .._adapter import CheckSpec, LeafSpec, ParamBinding, PreparedFunction
from .._api import function_name
from .._checking.check import run_check
from .._errors import FunctionEvaluationError, GradbridgeError, InvalidArgumentError
from .._options import Options
from .._reporting.report import Report
from .implementations import ImplementationEntry, SharedInputs

# --- running each implementation ---

@dataclass
class ImplementationRun:
    """One implementation's prepared check, its leaves' common names, values and gradients."""

    entry: ImplementationEntry
    binding: ParamBinding
    spec: Optional[CheckSpec] = None
    prepared: Any = None
    values: Dict[str, np.ndarray] = field(default_factory=dict)
    output_order: List[str] = field(default_factory=list)
    gradients: Dict[str, np.ndarray] = field(default_factory=dict)
    leaf_names: Dict[str, str] = field(default_factory=dict)  # common name -> adapter leaf name

    def common(self, leaf: LeafSpec) -> str:
        return self.binding.names.get(leaf.name, leaf.name)


def start_run(entry: ImplementationEntry, binding: ParamBinding, inputs: SharedInputs, arg_names: Tuple[str, ...], options: Options,
           seed: int, params: Optional[Dict[str, np.ndarray]]) -> ImplementationRun:
    """The implementation's check spec (its own arrays, the parameters as it takes them) and prepared function."""
    args, kwargs = inputs.native(entry)
    run = ImplementationRun(entry, binding)
    run.spec = CheckSpec(fn=binding.fn, args=tuple(binding.leading_args) + tuple(args), kwargs=kwargs,
                         params=binding.params, wrt=None, grad=binding.grad, seed=seed, train=options.train,
                         arg_names=tuple(binding.leading_names) + arg_names, promote=True)
    run.prepared = _prepare(run, None, params)
    return run


def _prepare(run: ImplementationRun, wrt: Optional[Tuple[str, ...]], params: Optional[Dict[str, np.ndarray]]) -> PreparedFunction:
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


def _guarded(run: ImplementationRun, action: Callable[[], Any], params: Optional[Dict[str, np.ndarray]]) -> Any:
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


def evaluate_run(run: ImplementationRun, params: Optional[Dict[str, np.ndarray]]) -> None:
    """The outputs at the common point, by output name."""
    prepared = run.prepared

    def evaluate() -> np.ndarray:
        with prepared.session():
            return prepared.evaluate(prepared.x0[None, :])[0]

    flat = _guarded(run, evaluate, params)
    for spec in prepared.output_specs:
        run.values[spec.name] = np.asarray(flat[spec.slice], dtype=np.float64).reshape(spec.shape)
        run.output_order.append(spec.name)


def gradient_run(run: ImplementationRun, cotangent: np.ndarray, params: Optional[Dict[str, np.ndarray]]) -> None:
    """The VJP with the shared cotangent, by common leaf name."""
    prepared = run.prepared

    def vjp() -> np.ndarray:
        with prepared.session():
            return prepared.vjp(cotangent[None, :])[0]

    flat = _guarded(run, vjp, params)
    for leaf in prepared.leaves:
        run.gradients[run.common(leaf)] = np.asarray(flat[leaf.slice], dtype=np.float64).reshape(leaf.shape)


def _cotangents(runs: Sequence[ImplementationRun], seed: int) -> Tuple[Dict[str, np.ndarray], List[str], List[str]]:
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


def _describe_outputs(run: ImplementationRun) -> str:
    return ", ".join(f"{n} {tuple(run.values[n].shape)}" for n in run.output_order)


def _own_check(run: ImplementationRun, options: Options, selected: Optional[Set[str]],
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
