"""``fast`` mode: random projections of each leaf's Jacobian compared both ways, with the detection power they
state, and the forward/reverse consistency rows.

Invariant: a fast row that fails is re-run in full (the report still names the element); a passing one
states the smallest relative error it would have caught with probability :data:`FAST_CONFIDENCE`.
"""

from __future__ import annotations

import dataclasses
import math
from functools import lru_cache
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .._agreement import agreement_bound
from .._adapter import (LeafSpec)
from .determinism import SPREAD_EXPLAINS, Spread
from .._errors import ModeUnsupportedError
from .evaluate import Evaluator
from .finite_diff import relative_step
from .grading import block_grade
from .._options import Options
from .._precision import PointRounder
from .._reporting.report import RowResult, WorstElement
from .tolerance import grade, relative_error
from .context import FAST_CONFIDENCE, CheckContext, undefined_gradients, working_eps
from .rows import mark_undefined

def consistency_rows(evaluator: Evaluator, options: Options, order: int,
                      spreads: Optional[Mapping[str, Spread]] = None) -> List[RowResult]:
    """<J^T v, u> from the VJP must equal <v, J u> from the JVP to round-off: no finite differences.
    A disagreement within what the modes' spreads (non-deterministic rules) explain is ``nondeterministic``."""
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
    eps = working_eps(prepared, options)
    reverse, forward = float(pulled @ u[0]), float(v[0] @ pushed)
    allowed = agreement_bound(eps, float(np.abs(pulled) @ np.abs(u[0])) + float(np.abs(v[0]) @ np.abs(pushed))) + 1e-300
    difference = abs(reverse - forward)
    rel = relative_error(np.array([reverse]), np.array([forward]))
    # a unit-norm probe's spread s shows in <J^T v, u> as about s |v| |u|
    noise = sum(spread.value for spread in (spreads or {}).values()) * float(np.linalg.norm(v) * np.linalg.norm(u))
    status = "pass" if difference <= allowed else \
        "nondeterministic" if difference <= allowed + SPREAD_EXPLAINS * noise else "fail"
    return [RowResult(input="(all checked)", output="(all)", shape=(len(prepared.x0),), order=order,
                      method="consistency <J^T v, u> = <v, J u>", analytic_mode="rev vs fwd",
                      status=status, max_abs_error=difference, rel_error=rel,
                      grade=grade(rel), mismatches=int(not difference <= allowed), compared=1,
                      worst=WorstElement((), (), reverse, forward, difference, allowed, None),
                      message="" if status == "pass" else
                      "reverse mode (value 'analytic') and forward mode (value 'numeric') disagree: one of your "
                      "VJP/JVP rules is wrong" if status == "fail" else
                      "reverse mode and forward mode disagree only within the spread of two calls of each: the "
                      "rules are not deterministic, not shown wrong")]


def unsupported_rows(evaluator, leaves, analytic_mode, order, message) -> List[RowResult]:
    return [RowResult(input=leaf.name, output=output.name, shape=leaf.shape, kind=leaf.kind, order=order,
                      method="full", analytic_mode=analytic_mode, status="unsupported", message=message)
            for leaf in leaves for output in evaluator.prepared.output_specs]


@lru_cache(maxsize=None)
def product_quantile(probability: float) -> float:
    """``t`` with ``P(|Z1 Z2| <= t) = probability`` for independent standard normals ``Z1, Z2``.

    A single wrong Jacobian entry ``e`` shows in a probe as ``v_i u_j e`` with ``v, u`` Gaussian, so it
    escapes one probe when ``|v_i u_j|`` is below ``allowed / |e|``; this quantile turns the probe count
    into the smallest error that is caught with a stated probability."""
    z = np.linspace(1e-6, 9.0, 6001)
    weights = np.exp(-z * z / 2.0) * math.sqrt(2.0 / math.pi)  # density of |Z2|
    erf = np.vectorize(math.erf)

    def cdf(t: float) -> float:
        return float(np.trapezoid(weights * erf(t / (math.sqrt(2.0) * z)), z)
                     if hasattr(np, "trapezoid") else np.trapz(weights * erf(t / (math.sqrt(2.0) * z)), z))

    low, high = 1e-12, 10.0
    for _ in range(80):
        mid = math.sqrt(low * high)
        if cdf(mid) < probability:
            low = mid
        else:
            high = mid
    return low


def _fast_rows(evaluator: Evaluator, context: CheckContext, leaves: Sequence[LeafSpec], f0: np.ndarray,
               analytic_mode: str, order: int) -> Tuple[List[RowResult], Dict[str, Tuple[np.ndarray, Optional[np.ndarray]]]]:
    """Projection check: per probe p and leaf L, compare v_p . (J u_pL) both ways.

    Returns the rows and, per leaf, the cotangent (and analytic ``J^T v``, in rev mode) of its worst
    probe, from which a failing leaf too large for a full check is bisected."""
    options = context.options
    prepared = evaluator.prepared
    x0 = prepared.x0
    rng = np.random.default_rng(options.seed)
    m = sum(spec.size for spec in prepared.output_specs)
    precision = working_eps(prepared, options)
    step = relative_step(options.eps, precision)
    scale = np.maximum(1.0, np.abs(x0))
    cotangents = rng.standard_normal((options.probes, m))
    directions = _probe_directions(context, leaves, x0, scale, rng)
    rounder = PointRounder(leaves, options.promote)
    plus_points = rounder(x0 + step * directions)
    minus_points = rounder(x0 - step * directions)
    directions = (plus_points - minus_points) / (2.0 * step)  # the directions really taken, after rounding
    pushed = None
    try:
        if analytic_mode == "rev":
            gradients = evaluator.vjp(cotangents)
            analytic = np.array([gradients[i // len(leaves)] @ directions[i] for i in range(len(directions))])
        else:
            pushed = evaluator.jvp(directions)
            analytic = np.array([cotangents[i // len(leaves)] @ pushed[i] for i in range(len(directions))])
            gradients = None
    except ModeUnsupportedError as exc:
        return unsupported_rows(evaluator, leaves, analytic_mode, order, str(exc)), {}
    labels = [f"{leaves[i % len(leaves)].name} probe {i // len(leaves) + 1}" for i in range(len(directions))]
    outputs = evaluator.evaluate(np.concatenate([plus_points, minus_points]),
                                 [f"x + h*u ({l})" for l in labels] + [f"x - h*u ({l})" for l in labels],
                                 allow_nonfinite=True)
    probed = _Probes(cotangents, analytic, outputs[: len(directions)], outputs[len(directions):], gradients, pushed,
                     scale, step, precision, m)
    undefined = undefined_gradients(prepared)
    rows = []
    probes: Dict[str, Tuple[np.ndarray, Optional[np.ndarray]]] = {}
    for k, leaf in enumerate(leaves):
        row, probes[leaf.name] = _fast_leaf_row(context, probed, k, leaf, len(leaves), analytic_mode, order)
        if leaf.name in undefined:
            mark_undefined(row, undefined[leaf.name])
        rows.append(row)
    return rows, probes


def _probe_directions(context: CheckContext, leaves: Sequence[LeafSpec], x0: np.ndarray, scale: np.ndarray,
                      rng: np.random.Generator) -> np.ndarray:
    """One random direction per (probe, leaf): Gaussian, scaled by ``max(1, |x|)``, or in a structured leaf's
    tangent space."""
    probes = context.options.probes
    directions = np.zeros((probes * len(leaves), len(x0)))
    bases: Dict[str, np.ndarray] = {}
    for leaf in leaves:
        if leaf.name in context.structures:
            basis, _ = context.structures[leaf.name].basis(leaf.name, x0[leaf.slice].reshape(leaf.shape))
            bases[leaf.name] = basis * max(1.0, float(np.max(np.abs(x0[leaf.slice]))))
    for p in range(probes):
        for k, leaf in enumerate(leaves):
            if leaf.name in bases:
                basis = bases[leaf.name]
                direction = rng.standard_normal(len(basis)) @ basis / math.sqrt(len(basis))
            else:
                direction = rng.standard_normal(leaf.size) * scale[leaf.slice]
            directions[p * len(leaves) + k, leaf.slice] = direction
    return directions


@dataclasses.dataclass
class _Probes:
    """What the probes measured: cotangents, analytic projections, outputs on both sides, and the analytic
    products (``J^T v`` in reverse mode, ``J u`` in forward mode) the magnitudes come from."""

    cotangents: np.ndarray
    analytic: np.ndarray
    f_plus: np.ndarray
    f_minus: np.ndarray
    gradients: Optional[np.ndarray]
    pushed: Optional[np.ndarray]
    scale: np.ndarray
    step: float
    precision: float
    outputs: int


def _fast_leaf_row(context: CheckContext, probed: _Probes, k: int, leaf: LeafSpec, count: int, analytic_mode: str,
                   order: int) -> Tuple[RowResult, Tuple[np.ndarray, Optional[np.ndarray]]]:
    """The row of leaf ``k`` (of ``count``) from its probes, and its worst probe's cotangent and gradient."""
    options, tolerance = context.options, context.tolerance
    step, precision, gradients = probed.step, probed.precision, probed.gradients
    quantile = product_quantile((1.0 - FAST_CONFIDENCE) ** (1.0 / options.probes))
    worst: Optional[WorstElement] = None
    worst_probe: Tuple[np.ndarray, Optional[np.ndarray]] = (probed.cotangents[0], None)
    failed = 0
    pairs = []
    largest_allowed = 0.0
    for p in range(options.probes):
        i = p * count + k
        v = probed.cotangents[p]
        with np.errstate(invalid="ignore", over="ignore"):
            numeric = float(v @ (probed.f_plus[i] - probed.f_minus[i])) / (2.0 * step)
            fd_error = precision * float(np.abs(v) @ (np.abs(probed.f_plus[i]) + np.abs(probed.f_minus[i]))) / (2.0 * step)
        if gradients is not None:
            magnitude = float(np.linalg.norm(gradients[p, leaf.slice] * probed.scale[leaf.slice]))
        else:
            magnitude = float(np.linalg.norm(v)) * float(np.linalg.norm(probed.pushed[i])) / max(1.0, np.sqrt(probed.outputs))
        allowed = tolerance.scalar_bound(numeric, magnitude, fd_error)
        largest_allowed = max(largest_allowed, allowed) if np.isfinite(allowed) else largest_allowed
        analytic = probed.analytic[i]
        difference = abs(analytic - numeric)
        is_bad = not (difference <= allowed) or not np.isfinite(allowed)
        pairs.append((analytic, numeric, allowed, is_bad))
        failed += int(is_bad)
        candidate = WorstElement((), (), float(analytic), numeric, float(difference), float(allowed), step,
                                 fd_error=fd_error, method="central difference along a random direction")
        if worst is None or candidate.ratio > worst.ratio or not np.isfinite(candidate.abs_error):
            worst = candidate
            worst_probe = (v, gradients[p] if gradients is not None else None)
    a_values, n_values, allowed_values, bad_values = (np.array(column) for column in zip(*pairs))
    rel, graded = block_grade(a_values, n_values, allowed_values, bad_values.astype(bool),
                              np.ones(len(pairs), dtype=bool))
    detectable = largest_allowed / quantile
    power = (f"{options.probes} random probes: an error confined to a single Jacobian entry d out_i / d "
             f"{leaf.name}[j] is caught with probability >= {FAST_CONFIDENCE:.1%} when it exceeds "
             f"{detectable:.2g} / max(1, |{leaf.name}[j]|)")
    row = RowResult(
        input=leaf.name, output="v.out", shape=leaf.shape, kind=leaf.kind, order=order,
        method=f"fast ({options.probes} probes)", analytic_mode=analytic_mode,
        status="fail" if failed else "pass", max_abs_error=float(np.max(np.abs(a_values - n_values))),
        rel_error=rel, grade=graded, mismatches=failed, compared=options.probes, worst=worst,
        message=(f"{failed} of {options.probes} probes outside tolerance" if failed else power))
    return row, worst_probe


