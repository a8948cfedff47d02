"""The check algorithm: compare analytic derivatives with central finite differences.

``full`` mode builds the whole Jacobian both ways (2 evaluations per input element for the numeric
side; one VJP per output element, or one JVP per input element, for the analytic side) and compares
it block by block: one block per (checked leaf, output). ``fast`` mode compares random projections
``v . (J u)`` (numeric) with ``(J^T v) . u`` (analytic) for several Gaussian probes per leaf, and re-runs
the full check on any leaf that fails so the report still names the element. ``order=2`` then checks
``x -> J(x)^T v`` for a random ``v`` the same way (the gradient of the gradient).
"""

from __future__ import annotations

import time
from typing import List, Optional, Sequence

import numpy as np

from ._adapter import LeafSpec, PreparedFunction
from ._errors import FunctionEvaluationError, GradbridgeError, ModeUnsupportedError
from ._evaluate import Evaluator, describe_perturbation
from ._finite_diff import (FLOAT64_EPS, central_points, element_steps, relative_step, roundoff_error,
                           step_description)
from ._options import Options
from ._precision import PointRounder
from ._report import Report, RowResult, WorstElement
from ._tolerance import Tolerance, grade, relative_error


class _Counts:
    """Evaluation counts summed over the first- and second-order evaluators."""

    def __init__(self) -> None:
        self.evaluators: List[Evaluator] = []

    def add(self, evaluator: Evaluator) -> Evaluator:
        self.evaluators.append(evaluator)
        return evaluator

    def fill(self, report: Report) -> None:
        report.evaluations = sum(e.evaluations for e in self.evaluators)
        report.vjps = sum(e.vjps for e in self.evaluators)
        report.jvps = sum(e.jvps for e in self.evaluators)


def run_check(prepared: PreparedFunction, options: Options, report: Report, structures=None) -> Report:
    """Run the whole check inside the adapter's deterministic session and fill ``report``."""
    started = time.perf_counter()
    counts = _Counts()
    evaluator = counts.add(Evaluator(prepared, options.chunk_size))
    try:
        with prepared.session():
            problem = _nondeterminism(evaluator, prepared.x0)
            # the adapter knows the precision fn really computes in only after the first evaluation
            precision = working_eps(prepared)
            tolerance = Tolerance(options.atol, options.rtol, precision)
            report.tolerance = tolerance.describe()
            report.step = step_description(options.eps, precision)
            if problem:
                report.problem = problem
                return report
            report.rows.extend(_check_order(evaluator, options, tolerance, order=1))
            if options.order == 2:
                report.rows.extend(_second_order(evaluator, options, tolerance, counts))
    finally:
        counts.fill(report)
        report.notes.extend(n for n in prepared.notes if n not in report.notes)
        report.seconds = time.perf_counter() - started
    return report


#: Machine epsilon by dtype name, for outputs a function returns below float64.
DTYPE_EPS = {"float64": FLOAT64_EPS, "float32": float(np.finfo(np.float32).eps),
             "float16": float(np.finfo(np.float16).eps), "bfloat16": 2.0 ** -7}


def working_eps(prepared: PreparedFunction) -> float:
    """Machine epsilon of the precision ``fn`` really computes in: the coarsest of what the adapter says
    (``working_eps``) and the dtypes of the outputs (a function that casts to float32 inside is only as
    accurate as float32, whatever its inputs were). Known after the first evaluation."""
    coarsest = float(getattr(prepared, "working_eps", None) or FLOAT64_EPS)
    try:
        outputs = prepared.output_specs
    except RuntimeError:  # not evaluated yet
        outputs = []
    for spec in outputs:
        coarsest = max(coarsest, DTYPE_EPS.get(spec.dtype, FLOAT64_EPS))
    return coarsest


def _nondeterminism(evaluator: Evaluator, x0: np.ndarray) -> Optional[str]:
    """Evaluate twice at ``x0``; a difference means finite differences would measure noise."""
    outputs = evaluator.evaluate(np.stack([x0, x0]), ["the unperturbed input", "the unperturbed input"])
    if outputs.shape[1] == 0:
        raise FunctionEvaluationError("fn: returned no floating-point output to differentiate")
    difference = float(np.max(np.abs(outputs[0] - outputs[1])))
    scale = max(1.0, float(np.max(np.abs(outputs[0]))))
    if difference > 1e3 * working_eps(evaluator.prepared) * scale:
        return (f"fn is not deterministic: two evaluations at the same input differ by {difference:.3g} even with "
                "every random generator re-seeded before each evaluation, so finite differences would measure "
                "noise, not gradients. Make the randomness depend on a seed or key the check controls "
                "(the framework's global seed or generator, NumPy's and Python's global RNGs, a JAX key argument; "
                "private generator objects cannot be pinned), or remove it.")
    return None


def _second_order(first: Evaluator, options: Options, tolerance: Tolerance, counts: _Counts) -> List[RowResult]:
    output_size = sum(spec.size for spec in first.prepared.output_specs)
    cotangent = np.random.default_rng(options.seed + 1).standard_normal(output_size)
    try:
        derived = first.prepared.gradient_function(cotangent)
    except GradbridgeError as exc:
        if not isinstance(exc, ModeUnsupportedError):
            raise
        return [RowResult(input=leaf.name, output="gradient", shape=leaf.shape, kind=leaf.kind, order=2,
                          status="unsupported", message=str(exc)) for leaf in first.prepared.leaves]
    except Exception as exc:  # the framework refused to build the gradient function: the user's code is at fault
        raise FunctionEvaluationError(f"building the gradient of fn for order=2 raised {type(exc).__name__}: {exc}") from exc
    evaluator = counts.add(Evaluator(derived, options.chunk_size, what="the gradient of fn"))
    evaluator.evaluate(derived.x0[None, :], ["the unperturbed input"])
    return _check_order(evaluator, options, tolerance, order=2)


def _check_order(evaluator: Evaluator, options: Options, tolerance: Tolerance, order: int) -> List[RowResult]:
    leaves = list(evaluator.prepared.leaves)
    modes = ("rev", "fwd") if options.analytic == "both" else (options.analytic,)
    rows: List[RowResult] = []
    if options.analytic == "both":
        rows.extend(_consistency_rows(evaluator, options, order))
    if options.mode in ("full", "auto"):
        numeric = NumericJacobian(evaluator, options, leaves)
        for analytic_mode in modes:
            rows.extend(_full_rows(evaluator, tolerance, leaves, numeric, analytic_mode, order))
        return rows
    for analytic_mode in modes:
        for row in _fast_rows(evaluator, options, tolerance, leaves, analytic_mode, order):
            if row.passed:
                rows.append(row)
                continue
            leaf = next(l for l in leaves if l.name == row.input)
            numeric = NumericJacobian(evaluator, options, [leaf])
            for localized in _full_rows(evaluator, tolerance, [leaf], numeric, analytic_mode, order):
                localized.method = f"fast ({options.probes} probes) then {localized.method} on this leaf"
                if localized.status == "pass":
                    localized.message = ("the projection check failed but every element agrees: "
                                         f"projection detail: {row.message}")
                rows.append(localized)
    return rows


class NumericJacobian:
    """Central-difference Jacobian columns of the checked leaves, refinable where they disagree.

    First pass: one step ``h_j`` per column (2 evaluations per element). Columns where the analytic side
    disagrees are re-evaluated at ``h_j / 2`` and replaced by the Richardson extrapolation
    ``(4 D(h/2) - D(h)) / 3`` (error O(h^4)), whose error estimate adds ``|D(h) - D(h/2)| / 3`` (the
    truncation error of ``D(h/2)``, a generous bound) to the round-off. A correct gradient then passes
    where the function's curvature is large for the step (``sin`` at 1e3, ``1/x`` at 1e-3), while every
    bug larger than the estimated numerical error still fails; correct checks pay nothing extra.
    """

    def __init__(self, evaluator: Evaluator, options: Options, leaves: Sequence[LeafSpec]) -> None:
        self.evaluator = evaluator
        x0 = evaluator.prepared.x0
        self.precision = working_eps(evaluator.prepared)
        self.rounder = PointRounder(evaluator.prepared.leaves, options.promote)
        self.steps = element_steps(x0, options.eps, self.precision)
        self.columns = np.concatenate([np.arange(leaf.offset, leaf.offset + leaf.size) for leaf in leaves])
        m = sum(spec.size for spec in evaluator.prepared.output_specs)
        self.values = np.zeros((m, len(x0)))
        self.error = np.zeros_like(self.values)
        self.refined: set = set()
        values, error, spans = self._differences(self.columns, self.steps)
        self.values[:, self.columns], self.error[:, self.columns] = values, error
        self.steps = np.full(len(x0), np.nan)
        self.steps[self.columns] = spans / 2.0

    def _differences(self, columns: np.ndarray, steps: np.ndarray):
        x0 = self.evaluator.prepared.x0
        plus, minus, spans = central_points(x0, columns, steps, self.rounder)
        leaves = self.evaluator.prepared.leaves
        described = ([describe_perturbation(leaves, c, "+") for c in columns]
                     + [describe_perturbation(leaves, c, "-") for c in columns])
        outputs = self.evaluator.evaluate(np.concatenate([plus, minus]), described)
        f_plus, f_minus = outputs[: len(columns)], outputs[len(columns):]
        values = ((f_plus - f_minus) / spans[:, None]).T
        return values, roundoff_error(f_plus, f_minus, spans, self.precision).T, spans

    def refine(self, columns: Sequence[int]) -> int:
        """Richardson-refine the given columns (once each); returns how many were refined now."""
        todo = np.array(sorted(set(int(c) for c in columns) - self.refined), dtype=int)
        if len(todo) == 0:
            return 0
        half = np.zeros_like(self.steps)
        half[todo] = self.steps[todo] / 2.0
        coarse, coarse_error = self.values[:, todo], self.error[:, todo]
        fine, fine_error, _ = self._differences(todo, half)
        self.values[:, todo] = (4.0 * fine - coarse) / 3.0
        self.error[:, todo] = (4.0 * fine_error + coarse_error) / 3.0 + np.abs(coarse - fine) / 3.0
        self.refined.update(int(c) for c in todo)
        return len(todo)


def _analytic_jacobian(evaluator: Evaluator, analytic_mode: str) -> np.ndarray:
    """The whole Jacobian (m, n) from unit cotangents (rev) or unit tangents (fwd)."""
    m = sum(spec.size for spec in evaluator.prepared.output_specs)
    n = len(evaluator.prepared.x0)
    if analytic_mode == "rev":
        return evaluator.vjp(np.eye(m))
    return evaluator.jvp(np.eye(n)).T


def _full_rows(evaluator, tolerance, leaves, numeric: NumericJacobian, analytic_mode, order) -> List[RowResult]:
    try:
        analytic = _analytic_jacobian(evaluator, analytic_mode)
    except ModeUnsupportedError as exc:
        return _unsupported_rows(evaluator, leaves, analytic_mode, order, str(exc))
    undefined = undefined_gradients(evaluator.prepared)
    for _ in range(2):  # judge, refine the columns that disagree, judge again
        rows, failing_columns = [], []
        for leaf in leaves:
            for output in evaluator.prepared.output_specs:
                a = analytic[output.slice, leaf.slice]
                n = numeric.values[output.slice, leaf.slice]
                allowed = tolerance.bounds(n, numeric.error[output.slice, leaf.slice])
                row = _block_row(leaf, output, a, n, allowed, numeric.steps[leaf.slice], analytic_mode, order)
                bad_columns = np.nonzero(~(np.abs(a - n) <= allowed).all(axis=0))[0]
                failing_columns.extend(leaf.offset + bad_columns)
                refined = sum(1 for c in range(leaf.offset, leaf.offset + leaf.size) if c in numeric.refined)
                if refined:
                    row.method = f"full, {refined} column(s) refined by Richardson extrapolation (h, h/2)"
                if leaf.name in undefined:
                    _mark_undefined(row, undefined[leaf.name])
                rows.append(row)
        if not failing_columns or numeric.refine(failing_columns) == 0:
            return rows
    return rows


def undefined_gradients(prepared: PreparedFunction) -> dict:
    """Leaf name -> reason, for leaves whose framework defines no gradient (filled by the adapter)."""
    return dict(getattr(prepared, "undefined_gradients", None) or {})


def _mark_undefined(row: RowResult, reason: str) -> None:
    """A leaf without a defined gradient: neither a pass nor a silent zero. It is acceptable only where
    the numeric derivative is zero too."""
    row.status = "no-gradient"
    verdict = ("the numeric derivative is zero too" if row.mismatches == 0 else
               "but the numeric derivative is not zero: the gradient is missing")
    row.message = f"no gradient defined ({reason}); {verdict}"


def _consistency_rows(evaluator: Evaluator, options: Options, order: int) -> List[RowResult]:
    """<J^T v, u> from the VJP must equal <v, J u> from the JVP to round-off: no finite differences."""
    prepared = evaluator.prepared
    rng = np.random.default_rng(options.seed + 2)
    m = sum(spec.size for spec in prepared.output_specs)
    v = rng.standard_normal((1, m))
    u = rng.standard_normal((1, len(prepared.x0)))
    try:
        pulled = evaluator.vjp(v)[0]
        pushed = evaluator.jvp(u)[0]
    except ModeUnsupportedError:
        return []
    reverse, forward = float(pulled @ u[0]), float(v[0] @ pushed)
    allowed = 1e3 * FLOAT64_EPS * (float(np.abs(pulled) @ np.abs(u[0])) + float(np.abs(v[0]) @ np.abs(pushed))) + 1e-300
    difference = abs(reverse - forward)
    rel = relative_error(np.array([reverse]), np.array([forward]))
    return [RowResult(input="(all checked)", output="(all)", shape=(len(prepared.x0),), order=order,
                      method="consistency <J^T v, u> = <v, J u>", analytic_mode="rev vs fwd",
                      status="pass" if difference <= allowed else "fail", max_abs_error=difference, rel_error=rel,
                      grade=grade(rel), mismatches=int(not difference <= allowed), compared=1,
                      worst=WorstElement((), (), reverse, forward, difference, allowed, None),
                      message="reverse mode (value 'analytic') and forward mode (value 'numeric') disagree: "
                              "one of your VJP/JVP rules is wrong" if not difference <= allowed else "")]


def _block_row(leaf: LeafSpec, output: LeafSpec, a: np.ndarray, n: np.ndarray, allowed: np.ndarray,
               steps: np.ndarray, analytic_mode: str, order: int) -> RowResult:
    difference = np.abs(a - n)
    bad = ~(difference <= allowed)  # NaN counts as bad
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(bad & ~np.isfinite(difference), np.inf, difference / np.where(allowed > 0, allowed, np.inf))
    ratio = np.nan_to_num(ratio, nan=np.inf)
    out_i, in_j = np.unravel_index(int(np.argmax(ratio)), ratio.shape) if ratio.size else (0, 0)
    rel = relative_error(a, n)
    row = RowResult(input=leaf.name, output=output.name, shape=leaf.shape, kind=leaf.kind, order=order,
                    method="full", analytic_mode=analytic_mode,
                    status="fail" if bad.any() else "pass",
                    max_abs_error=float(np.max(difference)) if difference.size else 0.0,
                    rel_error=rel, grade=grade(rel) if np.isfinite(rel) else "wrong",
                    mismatches=int(bad.sum()), compared=int(a.size))
    if ratio.size:
        row.worst = WorstElement(input_index=leaf.unravel(int(in_j)), output_index=output.unravel(int(out_i)),
                                 analytic=float(a[out_i, in_j]), numeric=float(n[out_i, in_j]),
                                 abs_error=float(difference[out_i, in_j]), allowed=float(allowed[out_i, in_j]),
                                 step=float(steps[in_j]))
    return row


def _unsupported_rows(evaluator, leaves, analytic_mode, order, message) -> List[RowResult]:
    return [RowResult(input=leaf.name, output=output.name, shape=leaf.shape, kind=leaf.kind, order=order,
                      method="full", analytic_mode=analytic_mode, status="unsupported", message=message)
            for leaf in leaves for output in evaluator.prepared.output_specs]


def _fast_rows(evaluator, options, tolerance, leaves, analytic_mode, order) -> List[RowResult]:
    """Projection check: per probe p and leaf L, compare v_p . (J u_pL) both ways."""
    prepared = evaluator.prepared
    x0 = prepared.x0
    rng = np.random.default_rng(options.seed)
    m = sum(spec.size for spec in prepared.output_specs)
    precision = working_eps(prepared)
    step = relative_step(options.eps, precision)
    scale = np.maximum(1.0, np.abs(x0))
    cotangents = rng.standard_normal((options.probes, m))
    directions = np.zeros((options.probes * len(leaves), len(x0)))
    for p in range(options.probes):
        for k, leaf in enumerate(leaves):
            directions[p * len(leaves) + k, leaf.slice] = rng.standard_normal(leaf.size) * scale[leaf.slice]
    rounder = PointRounder(leaves, options.promote)
    plus_points = rounder(x0 + step * directions)
    minus_points = rounder(x0 - step * directions)
    directions = (plus_points - minus_points) / (2.0 * step)  # the directions really taken, after rounding
    try:
        if analytic_mode == "rev":
            gradients = evaluator.vjp(cotangents)
            analytic = np.array([gradients[i // len(leaves)] @ directions[i] for i in range(len(directions))])
        else:
            pushed = evaluator.jvp(directions)
            analytic = np.array([cotangents[i // len(leaves)] @ pushed[i] for i in range(len(directions))])
            gradients = None
    except ModeUnsupportedError as exc:
        return _unsupported_rows(evaluator, leaves, analytic_mode, order, str(exc))
    labels = [f"{leaves[i % len(leaves)].name} probe {i // len(leaves) + 1}" for i in range(len(directions))]
    outputs = evaluator.evaluate(np.concatenate([plus_points, minus_points]), [f"x + h*u ({l})" for l in labels]
                                 + [f"x - h*u ({l})" for l in labels])
    f_plus, f_minus = outputs[: len(directions)], outputs[len(directions):]
    undefined = undefined_gradients(prepared)
    rows = []
    for k, leaf in enumerate(leaves):
        worst: Optional[WorstElement] = None
        failed = 0
        differences = []
        for p in range(options.probes):
            i = p * len(leaves) + k
            v = cotangents[p]
            numeric = float(v @ (f_plus[i] - f_minus[i])) / (2.0 * step)
            fd_error = precision * float(np.abs(v) @ (np.abs(f_plus[i]) + np.abs(f_minus[i]))) / (2.0 * step)
            if gradients is not None:
                magnitude = float(np.linalg.norm(gradients[p, leaf.slice] * scale[leaf.slice]))
            else:
                magnitude = float(np.linalg.norm(v)) * float(np.linalg.norm(pushed[i])) / max(1.0, np.sqrt(m))
            allowed = tolerance.scalar_bound(numeric, magnitude, fd_error)
            difference = abs(analytic[i] - numeric)
            differences.append((analytic[i], numeric))
            is_bad = not (difference <= allowed)
            failed += int(is_bad)
            candidate = WorstElement((), (), float(analytic[i]), numeric, float(difference), float(allowed), step)
            if worst is None or candidate.ratio > worst.ratio or not np.isfinite(candidate.abs_error):
                worst = candidate
        a_values = np.array([d[0] for d in differences])
        n_values = np.array([d[1] for d in differences])
        rel = relative_error(a_values, n_values)
        row = RowResult(
            input=leaf.name, output="v.out", shape=leaf.shape, kind=leaf.kind, order=order,
            method=f"fast ({options.probes} probes)", analytic_mode=analytic_mode,
            status="fail" if failed else "pass", max_abs_error=float(np.max(np.abs(a_values - n_values))),
            rel_error=rel, grade=grade(rel) if np.isfinite(rel) else "wrong", mismatches=failed,
            compared=options.probes, worst=worst,
            message=f"{failed} of {options.probes} probes outside tolerance" if failed else "")
        if leaf.name in undefined:
            _mark_undefined(row, undefined[leaf.name])
        rows.append(row)
    return rows
