"""Running each implementation: evaluation, gradients at shared cotangents, the precision its numbers really have,
and its own finite-difference check.

Invariant: every implementation runs at exactly the same point and is differentiated with the same
cotangents; an implementation's failure is reported as that implementation's, never as a disagreement.
Measuring its precision evaluates it at a few nearby points and always puts its point back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from .._adapter import CheckSpec, LeafSpec, ParamBinding, PreparedFunction
from .._agreement import disagreement
from .._api import function_name
from .._checking.check import run_check
from .._checking.context import working_eps
from .._checking.finite_diff import precision_name
from .._precision import DTYPE_EPS, FLOAT64_EPS
from .._errors import FunctionEvaluationError, GradbridgeError, InvalidArgumentError
from .._options import Options
from .._reporting.report import Report
from .implementations import ImplementationEntry, SharedInputs
from .._complex import is_complex_dtype

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
    precision: Optional["Precision"] = None

    def common(self, leaf: LeafSpec) -> str:
        return self.binding.names.get(leaf.name, leaf.name)


def start_run(entry: ImplementationEntry, binding: ParamBinding, inputs: SharedInputs, arg_names: Tuple[str, ...],
              options: Options, seed: int, params: Optional[Dict[str, np.ndarray]],
              arrange: Optional[Callable[[int, np.ndarray], np.ndarray]] = None) -> ImplementationRun:
    """The implementation's check spec (its own arrays, laid out by ``arrange``; the parameters as it takes
    them) and prepared function."""
    args, kwargs = inputs.native(entry, arrange)
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


# --- the precision each implementation really computes in ---

#: Size of the relative moves of every input that measure an implementation's magnitudes, in its own roundings
#: (eps): one rounding, so an entry's move over the step is its linear response ``|sum_j df_i/dx_j x_j s_j|``
#: plus its round-off noise over eps, which is the size of the numbers it was computed from.
PERTURBATION_ULPS = 1
#: Random sign patterns of those moves for the outputs (one batched evaluation) and for the gradients (one VJP
#: each); an entry's response is its largest over them.
PATTERNS = 4
GRADIENT_PATTERNS = 2
#: The moves that tell a float64 computation from one that rounds to float32 inside. At ``MID_MOVE`` (2**16
#: float64 roundings, 1/8192 of a float32 rounding) a float64 computation's outputs move as their moves at
#: ``HIGH_MOVE`` (256 float32 roundings) and ``HIGH_MOVE / 4`` predict (in proportion, or with the square of the
#: move at a stationary point), even where they cancel against numbers 1e4 times larger; a rounding to float32
#: inside either swallows so small a move or jumps by a float32 rounding.
MID_MOVE = 2.0 ** 16 * FLOAT64_EPS
HIGH_MOVE = 256 * DTYPE_EPS["float32"]
#: An entry whose move at ``MID_MOVE`` would be at least this many of its own float64 roundings in float64 is
#: sure to show whether it moves as predicted.
SURE_ULPS = 8
#: Below this share of those entries moving as predicted (within a factor 2), the computation is not float64.
PROPORTIONAL_SHARE = 0.5


@dataclass
class Precision:
    """What one implementation's numbers are worth, measured at the compared point.

    ``eps``: machine epsilon of the precision it really computes in: float64's, or coarser where its adapter says
    so, its outputs are of a lower precision, or its outputs do not move as a float64 computation's would when
    every input moves by a small fraction of a float32 rounding (:data:`MID_MOVE`: it rounds to float32 somewhere
    inside). ``reason`` says which, in words (None for float64).

    ``values`` (by output name) and ``gradients`` (by common leaf name): the magnitude each entry is computed from,
    measured as how far it moves when every input moves by the relative ``step`` (``PERTURBATION_ULPS * eps``,
    random signs), divided by ``step``: about ``|sum_j df_i/dx_j x_j s_j|`` plus the entry's round-off noise
    over eps. It is about ``|f_i|`` for a well-conditioned entry, larger for an ill-conditioned one, and far
    larger for an entry that is zero only by cancellation (its noise over eps is the size of what cancelled).
    Empty where the measurement could not run (``problem`` says why). Where float32 was measured, the larger of
    the measurements at both steps (a float64 entry's noise shows at the first).
    """

    eps: float = FLOAT64_EPS
    reason: Optional[str] = None
    values: Dict[str, np.ndarray] = field(default_factory=dict)
    gradients: Dict[str, np.ndarray] = field(default_factory=dict)
    step: float = 0.0
    problem: Optional[str] = None

    @property
    def name(self) -> str:
        return precision_name(self.eps)


def declared_precision(prepared: PreparedFunction) -> Tuple[float, Optional[str]]:
    """The precision the adapter and the outputs' dtypes say ``prepared`` computes in, and why (None: float64)."""
    eps = working_eps(prepared)
    if eps <= FLOAT64_EPS:
        return FLOAT64_EPS, None
    name = precision_name(eps)
    outputs = [spec.name for spec in prepared.output_specs if DTYPE_EPS.get(spec.dtype) == eps]
    if not outputs:
        return eps, f"its framework runs it in {name}"
    listed = ", ".join(outputs[:3]) + (", ..." if len(outputs) > 3 else "")
    return eps, f"output{'s' if len(outputs) > 1 else ''} {listed} {'are' if len(outputs) > 1 else 'is'} {name}"


class _NotRepeatable(Exception):
    """Two evaluations at the same point differ by far more than round-off (randomness that is not pinned)."""


def measure_precision(run: ImplementationRun, cotangent: np.ndarray, seed: int) -> None:
    """``run.precision``: the precision the implementation computes in and each entry's measured magnitude.

    Evaluates twice at ``x0`` and at ``x0 * (1 + step * s)`` for :data:`PATTERNS` random sign vectors ``s`` (one
    batch), plus the three moves of :data:`MID_MOVE` when nothing says it runs below float64, and takes the VJP
    with the shared cotangent at ``x0`` and at :data:`GRADIENT_PATTERNS` moved points. ``x0`` is put back
    whatever happens. Where two evaluations at ``x0`` differ by more than round-off, or anything fails, the
    declared precision stays and no magnitudes are kept (the pairwise rule then uses the entries' own sizes);
    ``problem`` says why.
    """
    prepared = run.prepared
    eps, reason = declared_precision(prepared)
    run.precision = precision = Precision(eps, reason)
    x0 = np.array(prepared.x0, dtype=np.float64, copy=True)
    if x0.size == 0:
        return
    signs = np.random.default_rng([seed, 16]).choice((-1.0, 1.0), size=(PATTERNS, x0.size))
    steps = [PERTURBATION_ULPS * eps]
    try:
        with prepared.session():
            values, proportional = _moved_values(run, x0, signs, eps)
            if not proportional:  # it rounds to float32 inside: measure again with float32-sized moves
                precision.eps = DTYPE_EPS["float32"]
                precision.reason = ("measured: when every input moves by a small fraction of a float32 rounding, "
                                    "its outputs do not move as a float64 computation's would, they stay put or "
                                    "jump: a cast to float32 inside, or cancellation against numbers over 1e4 "
                                    "times larger")
                steps.append(PERTURBATION_ULPS * precision.eps)
                values = _larger(values, _moved_values(run, x0, signs, precision.eps)[0])
            precision.step = steps[-1]
            precision.values = values
            for step in steps:  # both steps where float32 was measured: a float64 entry's noise shows at the first
                precision.gradients = _larger(precision.gradients, _moved_gradients(
                    run, x0, signs[:GRADIENT_PATTERNS], step, cotangent))
    except _NotRepeatable as exc:
        precision.values, precision.gradients = {}, {}
        precision.problem = f"its round-off was not measured: {exc}"
    except Exception as exc:  # the measurement is an aid: the comparison runs on without it
        precision.values, precision.gradients = {}, {}
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        precision.problem = f"its round-off could not be measured ({type(exc).__name__}: {text})"
    finally:
        prepared.x0 = x0


def _larger(first: Dict[str, np.ndarray], second: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Entry by entry the larger of two measurements (by name)."""
    return {name: np.maximum(first[name], array) if name in first else array for name, array in second.items()}


def _repeatable(first: np.ndarray, second: np.ndarray, eps: float, what: str) -> None:
    """Raise :class:`_NotRepeatable` unless two results at the same point agree under the internal agreement rule
    (bit for bit, or up to reordering round-off): other noise would be taken for round-off of a huge magnitude."""
    why = disagreement(first, second, eps, rows=False)
    if why is not None:
        raise _NotRepeatable(f"two calls at the same point give different {what} ({why}: randomness that is not "
                             "pinned, or state that changes between calls?)")


def _moved_values(run: ImplementationRun, x0: np.ndarray, signs: np.ndarray, eps: float
                  ) -> Tuple[Dict[str, np.ndarray], bool]:
    """Each output's response to the moves of relative size ``PERTURBATION_ULPS * eps``, divided by that size; and
    whether, at float64, the outputs move as a float64 computation's do (see :data:`MID_MOVE`)."""
    prepared = run.prepared
    step = PERTURBATION_ULPS * eps
    rows = [x0, x0] + [x0 * (1 + step * s) for s in signs]
    probe = eps <= FLOAT64_EPS
    if probe:
        rows += [x0 * (1 + move * signs[0]) for move in (MID_MOVE, HIGH_MOVE / 4, HIGH_MOVE)]
    out = np.asarray(prepared.evaluate(np.stack(rows)), dtype=np.float64)
    base = out[0]
    _repeatable(base, out[1], eps, "outputs")
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        moved = np.abs(out[1:2 + len(signs)] - base)
        moved = np.where(np.isfinite(moved), moved, 0.0)
        proportional = not probe or _moves_as_predicted(base, moved, *(out[-3:] - base))
    response = moved.max(axis=0) / step
    return {spec.name: response[spec.slice].reshape(spec.shape) for spec in prepared.output_specs}, proportional


def _moves_as_predicted(base: np.ndarray, small: np.ndarray, mid: np.ndarray, quarter: np.ndarray,
                        high: np.ndarray) -> bool:
    """Whether the outputs' moves at :data:`MID_MOVE` are what their moves at :data:`HIGH_MOVE` and a quarter of it
    predict, as in float64: ``high * (MID_MOVE / HIGH_MOVE) ** p`` with ``p`` the power the two large moves show
    (1 in proportion, 2 at a stationary point such as the minimum of KL(p||q) at q = p).

    Only entries sure to show it count: their predicted move would be :data:`SURE_ULPS` of their own roundings
    and :data:`SURE_ULPS` times the largest move of any output at the smallest steps (``small``): round-off noise,
    which is all an output that is zero up to round-off shows. True where no entry is sure: nothing is claimed
    without evidence.
    """
    power = np.clip(np.log(np.abs(high) / np.abs(quarter)) / np.log(4.0), 1.0, 2.0)
    predicted = high * (MID_MOVE / HIGH_MOVE) ** power
    noise = float(small.max()) if small.size else 0.0
    sure = (np.isfinite(predicted) & np.isfinite(base) & (np.abs(predicted) > SURE_ULPS * np.spacing(np.abs(base)))
            & (np.abs(predicted) > SURE_ULPS * noise))
    if not sure.any():
        return True
    ratio = mid[sure] / predicted[sure]
    proportional = np.isfinite(ratio) & (ratio >= 0.5) & (ratio <= 2.0)
    return int(proportional.sum()) >= PROPORTIONAL_SHARE * int(sure.sum())


def _moved_gradients(run: ImplementationRun, x0: np.ndarray, signs: np.ndarray, step: float,
                     cotangent: np.ndarray) -> Dict[str, np.ndarray]:
    """Each gradient leaf's response (the VJP with the shared cotangent) to the moves, divided by ``step``."""
    prepared = run.prepared
    base = np.asarray(prepared.vjp(cotangent[None, :])[0], dtype=np.float64)
    before = np.concatenate([run.gradients[run.common(leaf)].reshape(-1) for leaf in prepared.leaves])
    _repeatable(base, before, run.precision.eps, "gradients")
    response = np.where(np.isfinite(base - before), np.abs(base - before), 0.0)
    for s in signs:
        prepared.x0 = x0 * (1 + step * s)
        try:
            with np.errstate(invalid="ignore", over="ignore"):
                moved = np.abs(np.asarray(prepared.vjp(cotangent[None, :])[0], dtype=np.float64) - base)
        finally:
            prepared.x0 = x0
        response = np.maximum(response, np.where(np.isfinite(moved), moved, 0.0))
    response /= step
    return {run.common(leaf): response[leaf.slice].reshape(leaf.shape) for leaf in prepared.leaves}


def _cotangents(runs: Sequence[ImplementationRun], seed: int,
                to_implementation: Optional[Callable[[str, str, np.ndarray], np.ndarray]] = None
                ) -> Tuple[Dict[str, np.ndarray], List[str], List[str]]:
    """One cotangent per implementation (laid out as its outputs), shared by output name; notes; mismatches.

    Outputs are matched by name, whatever order each implementation returns them in. Only outputs every
    implementation returns with the same shape get a non-zero cotangent, so the VJPs stay comparable when the
    structures differ (which is reported as a mismatch).
    """
    first = runs[0]
    common = [n for n in first.output_order
              if all(n in r.values and r.values[n].shape == first.values[n].shape for r in runs)]
    mismatches = []
    for run in runs[1:]:  # by name: JAX sorts a dict's keys, torch and TensorFlow keep their insertion order
        if set(run.output_order) != set(first.output_order) or any(run.values[n].shape != first.values[n].shape
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
        arranged = {n: to_implementation(run.entry.label, n, block) if to_implementation else block
                    for n, block in blocks.items()}  # laid out as the implementation returns the output
        parts = [arranged[n].reshape(-1) if n in blocks else np.zeros(run.values[n].size) for n in run.output_order]
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


def complex_leaves(runs: Sequence[ImplementationRun]) -> List[str]:
    """The common names of the complex inputs and outputs of any implementation (compared through real views)."""
    found: List[str] = []
    for run in runs:
        prepared = run.prepared
        if prepared is None:
            continue
        named = [run.common(leaf) for leaf in prepared.leaves if is_complex_dtype(leaf.dtype)]
        named += [spec.name for spec in prepared.output_specs if is_complex_dtype(spec.dtype)]
        found.extend(name for name in named if name not in found)
    return found
