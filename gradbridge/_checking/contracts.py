"""Contract checks on the analytic side: what every differentiation rule must satisfy, checked without finite
differences (a few extra analytic calls), each reported as a named line and failing the check when violated.

* ``linear in the cotangent`` (reverse mode): ``VJP(v1 + v2) = VJP(v1) + VJP(v2)`` and ``VJP(0) = 0`` for random
  cotangents ``v1``, ``v2`` with entries of a few units. A rule that clips, squares or thresholds its incoming
  gradient, or adds a term that does not depend on it, is right for the unit cotangents of a Jacobian and wrong
  under sums of losses, gradient accumulation, or a second consumer of the output.
* ``linear in the tangent`` (forward mode, where the check uses it): the same for ``JVP``.
* ``primal under differentiation``: the output the framework's differentiation computes at the point (a JAX
  ``custom_vjp``'s ``fwd``, a ``custom_jvp`` rule's primal output, a forward recorded for backward) equals
  ``fn(x)``. A ``fwd`` returning a slightly different primal is a bug no gradient comparison can see. Asked from
  the adapter through its ``differentiated_primal()`` (:class:`gradbridge._adapter.DifferentiatedPrimal`).

Tolerances: a violation of linearity must exceed ``sqrt(eps)`` of the working precision relative to the largest
entry (the resolution of the comparison with finite differences itself: an adaptive solver's adjoint is linear
only to its tolerance), the resolution a non-smooth function was measured to, and the analytic side's own measured
spread (a non-deterministic backward); the primal must agree to ``sqrt(eps)`` of the largest output entry (two paths
to one output, a compiled batch and an eager forward, differ by round-off of the terms they sum). A correct rule
never fails these checks; a clipped, squared or offset cotangent is off by order one.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import numpy as np

from .._adapter import (BatchedForwardRules, BatchedRules, CompiledFunction, DifferentiatedPrimal, FrameworkTests,
                        InPlaceWrites, StridedInputs, offered)
from .._errors import CostlyProbeSkipped, ModeUnsupportedError
from .._precision import FLOAT64_EPS
from .._reporting.report import Contract, RowResult
from .context import CheckContext
from .determinism import SPREAD_EXPLAINS
from .evaluate import Evaluator

#: Entries of the random cotangents and tangents: a few units, so a rule clipping its incoming gradient at 1 shows.
PROBE_SCALE = 3.0
#: Cotangents of the batched-backward contract.
BATCH = 3
#: Round-off allowed in a contract, in units of the working precision's eps, relative to the entries' magnitudes.
ROUNDOFF = 64.0


def run_contracts(evaluator: Evaluator, context: CheckContext, f0: np.ndarray, precision: float,
                  rows: Sequence[RowResult]) -> List[Contract]:
    """The contract checks that apply to this check's analytic modes (see the module doc). ``rows`` (the first
    order's) give the resolution the derivatives were measured to: a function that is not smooth below the step
    (an adaptive solver, whose adjoint is linear only to its tolerance) loosens the contracts to it."""
    found: List[Contract] = []
    modes = context.options.analytic
    resolution = _resolution(rows)
    if modes in ("rev", "both"):
        contract = _linearity(evaluator, context, "rev", precision, resolution)
        if contract is not None:
            found.append(contract)
    if modes in ("fwd", "both"):
        contract = _linearity(evaluator, context, "fwd", precision, resolution)
        if contract is not None:
            found.append(contract)
    for mode in ("rev", "fwd"):
        if modes in (mode, "both"):
            batched = _batched(evaluator, context, precision, resolution, mode)
            if batched is not None:
                found.append(batched)
    if modes in ("rev", "both"):
        found.extend(_strided(evaluator, context, precision, resolution))
        found.extend(_in_place(evaluator, context))
    primal = _primal(evaluator, f0, precision, resolution)
    if primal is not None:
        found.append(primal)
    found.extend(_framework_tests(evaluator, context))
    compiled = _compiled_vs_eager(evaluator, context, precision, resolution)
    if compiled is not None:
        found.append(compiled)
    return found


def _compiled_vs_eager(evaluator: Evaluator, context: CheckContext, precision: float,
                       resolution: float) -> Optional[Contract]:
    """A compiled function (torch.compile, jax.jit, tf.function) gives the outputs and gradients of the eager
    function it was made from, to round-off of the terms it sums (a compiler reorders sums and fuses ops): "my
    compiled model's gradients differ" in one line. The rows check the compiled function against finite
    differences; this names a divergence from eager even where both are within the rows' tolerance of each other."""
    method = offered(evaluator.prepared, CompiledFunction, "compiled_and_eager")
    if method is None:
        return None
    size = sum(spec.size for spec in evaluator.prepared.output_specs)
    rng = np.random.default_rng(context.options.seed + 53)
    cotangents = PROBE_SCALE * rng.standard_normal((2, size))
    name = "compiled = eager"
    try:
        compiled_side, eager_side, note = method(cotangents, thorough=context.options.contracts == "all")
    except CostlyProbeSkipped as exc:
        return Contract(name, True, "rev", f"not run: {exc}; contracts='all' runs it", checked=False)
    except ModeUnsupportedError:
        return None
    if compiled_side is None or eager_side is None:
        return Contract(name, True, "rev", f"not comparable: {note}", checked=False)
    (out_c, vjp_c), (out_e, vjp_e) = compiled_side, eager_side
    evaluator.vjps += 2 * len(cotangents)
    suffix = f" ({note})" if note else ""
    for what, compiled, eager, name_of in (("outputs", out_c, out_e, evaluator.output_name),
                                           ("gradients", vjp_c, vjp_e, evaluator.input_name)):
        compiled = np.asarray(compiled, dtype=np.float64).reshape(len(cotangents) if what == "gradients" else 1, -1)
        eager = np.asarray(eager, dtype=np.float64).reshape(compiled.shape)
        excess = np.abs(compiled - eager) - _two_paths_allowance(eager, precision, resolution)
        if (excess > 0).any():
            row, k = np.unravel_index(int(np.argmax(excess)), excess.shape)
            return Contract(name, False, "rev", calls=2 * len(cotangents), message=
                            f"the compiled function's {what} differ from the eager function's: "
                            f"{compiled[row, k]:.10g} vs {eager[row, k]:.10g} at {name_of(int(k))}. The compiler "
                            f"changed what fn computes beyond round-off{suffix}")
    return Contract(name, True, "rev", f"the compiled function's outputs and gradients equal the eager function's"
                                       f"{suffix}", calls=2 * len(cotangents))


def _framework_tests(evaluator: Evaluator, context: CheckContext) -> List[Contract]:
    """The framework's own tests of the function (torch.library.opcheck of a library op), each a contract line;
    those not run are listed as not checked, with what running them costs."""
    method = offered(evaluator.prepared, FrameworkTests, "framework_tests")
    if method is None:
        return []
    try:
        results = method(thorough=context.options.contracts == "all")
    except ModeUnsupportedError:
        return []
    found = []
    for name, passed, sentence in results:
        if passed is None and sentence.startswith("not run"):
            sentence = f"{sentence}; contracts='all' runs it"
        found.append(Contract(name, passed is not False, "rev", sentence, checked=passed is not None))
    return found


def _two_paths_allowance(reference: np.ndarray, precision: float, resolution: float) -> np.ndarray:
    """What two paths to the same values (a compiled batch and an eager forward, compiled and eager code: sums in
    another order) may differ by: round-off relative to each entry, plus sqrt(eps) and the measured resolution of
    the largest entry (the terms they sum, which the values alone do not show)."""
    scale = np.abs(reference)
    largest = float(np.max(scale, initial=0.0))
    return ROUNDOFF * precision * scale + (float(np.sqrt(precision)) + resolution) * largest


def _relative(precision: float, resolution: float = 0.0) -> float:
    """The relative tolerance of a linearity-like contract: at least sqrt(eps) (the resolution of the comparison
    with finite differences itself) and 64 eps, plus what a non-smooth function's measured resolution allows."""
    return max(ROUNDOFF * precision, float(np.sqrt(precision))) + 4 * resolution


def _noise(context: CheckContext, mode: str) -> float:
    """How far apart two analytic calls of ``mode`` at probes of :data:`PROBE_SCALE` may be from noise alone (a
    non-deterministic backward's measured spread, scaled), 0 where the analytic side is deterministic."""
    spread = context.spreads.get(mode)
    return SPREAD_EXPLAINS * PROBE_SCALE * spread.value if spread is not None else 0.0


def _resolution(rows: Sequence[RowResult]) -> float:
    """The relative resolution below which the check could not see errors: the largest measured ``resolution``
    of a row (fn not smooth below the step), else 0 (smooth: round-off decides)."""
    found = [row.resolution for row in rows if row.resolution is not None and np.isfinite(row.resolution)]
    return float(max(found)) if found else 0.0


def _linearity(evaluator: Evaluator, context: CheckContext, mode: str, precision: float,
               resolution: float) -> Optional[Contract]:
    prepared = evaluator.prepared
    size = len(prepared.x0) if mode == "fwd" else sum(spec.size for spec in prepared.output_specs)
    rng = np.random.default_rng(context.options.seed + (17 if mode == "fwd" else 11))
    v1 = PROBE_SCALE * rng.standard_normal(size)
    v2 = PROBE_SCALE * rng.standard_normal(size)
    call = evaluator.vjp if mode == "rev" else evaluator.jvp
    try:  # one call per probe, as a user calls the rule (and the batch size a compiled map already has)
        g1, g2, g12, g0 = (call(probe[None, :])[0] for probe in (v1, v2, v1 + v2, np.zeros(size)))
    except ModeUnsupportedError:
        return None
    noise = _noise(context, mode)
    scale = np.abs(g1) + np.abs(g2) + np.abs(g12)
    largest = float(np.max(scale)) if scale.size else 0.0
    # relative to the largest entry (an entry that is zero by cancellation carries its terms' round-off), at least
    # sqrt(eps): the resolution of the comparison with finite differences itself (an adaptive solver's adjoint is
    # linear only to its tolerance), and what the function's non-smoothness allows
    relative = _relative(precision, resolution)
    allowed = relative * (scale + largest) + 2 * noise
    what, incoming, side = (("cotangent", "incoming gradient", "backward") if mode == "rev"
                            else ("tangent", "tangent", "forward-mode (JVP) rule"))
    name = f"linear in the {what}"
    name_of = evaluator.input_name if mode == "rev" else evaluator.output_name
    zero_allowed = relative * largest + noise
    nonzero = np.abs(g0) > zero_allowed
    if nonzero.any():
        k = int(np.argmax(np.abs(g0)))
        return Contract(name, False, mode, calls=4, message=
                        f"the {side} of a zero {what} is not zero ({g0[k]:.6g} at {name_of(k)}): it adds a term that "
                        f"does not depend on the {incoming} (a rule must multiply by it: zero in, zero out)")
    excess = np.abs(g12 - g1 - g2) - allowed
    if (excess > 0).any():
        k = int(np.argmax(excess))
        difference = float(abs(g12[k] - g1[k] - g2[k]))
        return Contract(name, False, mode, calls=4, message=
                        f"the {side} is not linear in its {incoming}: for random {what}s v1, v2 (entries of about "
                        f"{PROBE_SCALE:g}), {'VJP' if mode == 'rev' else 'JVP'}(v1 + v2) differs from the sum of "
                        f"{'VJP' if mode == 'rev' else 'JVP'}(v1) and {'VJP' if mode == 'rev' else 'JVP'}(v2) by "
                        f"{difference:.3g} at {name_of(k)} ({g12[k]:.6g} vs {g1[k] + g2[k]:.6g}): it clips, squares "
                        f"or thresholds the {incoming}, or adds a term that does not depend on it. Such a rule can "
                        f"pass for one {what} and be wrong for another (sums of losses, accumulated gradients, an "
                        "output used twice)")
    return Contract(name, True, mode, calls=4, message=f"{'VJP' if mode == 'rev' else 'JVP'}(v1 + v2) = "
                                      f"{'VJP' if mode == 'rev' else 'JVP'}(v1) + {'VJP' if mode == 'rev' else 'JVP'}"
                                      f"(v2) and a zero {what} gives zero")


def _batched(evaluator: Evaluator, context: CheckContext, precision: float, resolution: float,
             mode: str = "rev") -> Optional[Contract]:
    """The backward (``mode="rev"``; torch's ``check_batched_grad``) or the forward-mode rule (``"fwd"``; torch's
    ``check_batched_forward_grad``) under the framework's vmap equals the rule one vector at a time, for random dense
    cotangents or tangents."""
    member = "vjp_batched_and_looped" if mode == "rev" else "jvp_batched_and_looped"
    method = offered(evaluator.prepared, BatchedRules if mode == "rev" else BatchedForwardRules, member)
    if method is None:
        return None
    size = (sum(spec.size for spec in evaluator.prepared.output_specs) if mode == "rev"
            else len(evaluator.prepared.x0))
    rng = np.random.default_rng(context.options.seed + (29 if mode == "rev" else 41))
    vectors = PROBE_SCALE * rng.standard_normal((BATCH, size))
    side, what, product = (("backward", "cotangent", "VJP") if mode == "rev"
                           else ("forward-mode rule", "tangent", "JVP"))
    name = "batched (vmap)" if mode == "rev" else "batched forward (vmap)"
    try:
        batched, looped = method(vectors, thorough=context.options.contracts == "all")
    except CostlyProbeSkipped as exc:
        return Contract(name, True, mode, f"not run: {exc}; contracts='all' runs it", checked=False)
    except ModeUnsupportedError as exc:
        return Contract(name, True, mode, f"the {side} cannot run under vmap: {exc}", checked=False)
    if mode == "rev":
        evaluator.vjps += 2 * len(vectors)
    else:
        evaluator.jvps += 2 * len(vectors)
    batched, looped = np.asarray(batched, dtype=np.float64), np.asarray(looped, dtype=np.float64)
    noise = _noise(context, mode)
    scale = np.abs(looped)
    largest = float(np.max(scale, initial=0.0))
    allowed = _relative(precision, resolution) * (scale + largest) + 2 * noise
    excess = np.abs(batched - looped) - allowed
    name_of = evaluator.input_name if mode == "rev" else evaluator.output_name
    if (excess > 0).any():
        row, k = np.unravel_index(int(np.argmax(excess)), excess.shape)
        return Contract(name, False, mode, calls=2 * len(vectors), message=
                        f"the {side} gives other values under vmap than one {what} at a time: "
                        f"{batched[row, k]:.10g} vs {looped[row, k]:.10g} at {name_of(int(k))} for "
                        f"{what} {int(row) + 1} of {len(vectors)}. Per-sample gradients, jacrev and jacfwd run the "
                        "batched path: the rule's batching (a vmap rule, a callback that claims to vectorise, state "
                        "shared across the batch) is wrong")
    return Contract(name, True, mode, f"{len(vectors)} {what}s: vmap of the {product} equals the loop",
                    calls=2 * len(vectors))


def _asked(evaluator: Evaluator, context: CheckContext, capability: type, member: str, seed: int,
           **options: Any) -> Any:
    """What the adapter's ``member`` (of ``capability``) answers for a random cotangent with entries of about
    :data:`PROBE_SCALE`, or None where the adapter does not offer it or it does not apply (ModeUnsupportedError);
    CostlyProbeSkipped propagates, for the caller to list the contract as not run."""
    method = offered(evaluator.prepared, capability, member)
    if method is None:
        return None
    size = sum(spec.size for spec in evaluator.prepared.output_specs)
    cotangent = PROBE_SCALE * np.random.default_rng(context.options.seed + seed).standard_normal(size)
    try:
        return method(cotangent, **options)
    except CostlyProbeSkipped:
        raise
    except ModeUnsupportedError:
        return None


def _strided(evaluator: Evaluator, context: CheckContext, precision: float, resolution: float) -> List[Contract]:
    """fn and its backward give the same values for inputs laid out non-contiguously or expanded (stride 0) as
    for contiguous ones (Chainer checks non-contiguous inputs by default): a kernel that indexes memory by shape,
    not stride, is wrong only on such inputs, which users pass (a transposed weight, a broadcast bias)."""
    try:
        variants = _asked(evaluator, context, StridedInputs, "strided_variants", 31,
                          thorough=context.options.contracts == "all")
    except CostlyProbeSkipped as exc:
        return [Contract(f"{layout} inputs", True, "rev", f"not run: {exc}; contracts='all' runs it", checked=False)
                for layout in ("non-contiguous", "expanded")]
    if variants is None:
        return []
    found = []
    relative = _relative(precision, resolution)
    for layout, result in variants:
        name = f"{layout} inputs"
        if isinstance(result, str):
            found.append(Contract(name, True, "rev", f"fn raises on {layout} inputs ({result}): users who pass such "
                                                     "tensors (a transposed weight, a broadcast bias) get this error; "
                                                     "call .contiguous() inside fn or make the kernel stride-aware",
                                  checked=False))
            continue
        evaluator.vjps += 2
        noise = _noise(context, "rev")
        (out_c, grad_c), (out_s, grad_s) = result
        for what, first, second, name_of in (("output", out_c, out_s, evaluator.output_name),
                                             ("gradient", grad_c, grad_s, evaluator.input_name)):
            scale = np.abs(first)
            excess = (np.abs(second - first) - relative * (scale + float(np.max(scale, initial=0.0)))
                      - (2 * noise if what == "gradient" else 0.0))
            if (excess > 0).any():
                k = int(np.argmax(excess))
                side = "fn" if what == "output" else "the backward"
                found.append(Contract(name, False, "rev", calls=2, message=
                                      f"{side} gives other values for {layout} inputs than for contiguous ones with "
                                      f"the same values: {second[k]:.10g} vs {first[k]:.10g} at {name_of(k)}. A "
                                      "kernel that indexes memory by shape instead of stride (as_strided, data_ptr "
                                      "arithmetic, a C++/CUDA kernel assuming contiguous input) is wrong on such "
                                      "inputs"))
                break
        else:
            found.append(Contract(name, True, "rev", f"fn and its backward agree on {layout} and contiguous inputs",
                                  calls=2))
    return found


def _in_place(evaluator: Evaluator, context: CheckContext) -> List[Contract]:
    """fn leaves its inputs as they were, and the backward leaves its incoming gradient as it was: a backward that
    scales ``grad_output`` in place gives right values in a test and silently changes the caller's gradient tensor
    (a cotangent passed to ``torch.autograd.grad`` and reused, which the result may even alias; PyTorch's own request
    for this check has been open since 2022); a forward writing its input changes the caller's data."""
    writes = _asked(evaluator, context, InPlaceWrites, "in_place_writes", 37)
    if writes is None:
        return []
    evaluator.vjps += 1
    found = []
    inputs, cotangents = writes.get("inputs", []), writes.get("cotangent", [])
    in_backward = writes.get("backward_inputs", [])
    if inputs:
        message = (f"fn writes its input(s) {', '.join(inputs)} in place: the caller's tensors change, and autograd "
                   "may differentiate the modified values; compute into a new tensor")
    elif in_backward:
        message = (f"the backward writes the input(s) {', '.join(in_backward)} in place (a tensor it saved or kept "
                   "on ctx): the caller's tensors change after every backward; compute into a new tensor")
    else:
        message = "fn and its backward leave their inputs as they were"
    found.append(Contract("inputs untouched", not (inputs or in_backward), "rev", message))
    found.append(Contract("incoming gradient untouched", not cotangents, "rev", calls=1, message=
                          f"the backward writes the incoming gradient of {', '.join(cotangents)} in place (grad_output "
                          "*= ..., add_, copy_): the values are right, but the caller's gradient tensor changes (a "
                          "cotangent reused after torch.autograd.grad, which the result may alias); compute into a "
                          "new tensor" if cotangents
                          else "the backward leaves its incoming gradient as it was"))
    rules = writes.get("rules", [])
    if not rules:  # autodiff through the framework's own formulas only: nothing of the user's to audit
        return found
    saved, mismatched = writes.get("saved", []), writes.get("gradients", [])
    found.append(Contract("saved tensors untouched", not saved, "rev",
                          f"the backward of {'; '.join(saved)} writes what it saved for backward in place: this "
                          "backward's values are right, every later one through the same graph (a second consumer "
                          "of the output, retain_graph, a double backward) reads corrupted tensors; compute into a "
                          "new tensor" if saved
                          else f"the backward of {', '.join(rules)} leaves its saved tensors as they were"))
    found.append(Contract("gradients match their inputs", not mismatched, "rev",
                          "; ".join(mismatched) + ". torch casts or sums such a gradient to its input silently: "
                          "precision lost to a narrower dtype, a device copy per step, or a reduction the rule "
                          "should do itself; return each gradient in its input's dtype, device and shape"
                          if mismatched
                          else f"{', '.join(rules)} return{'s' if len(rules) == 1 else ''} each gradient in its "
                               "input's dtype, device and shape"))
    return found


def _primal(evaluator: Evaluator, f0: np.ndarray, precision: float, resolution: float) -> Optional[Contract]:
    method = offered(evaluator.prepared, DifferentiatedPrimal, "differentiated_primal")
    if method is None:
        return None
    try:
        primal = np.asarray(method(), dtype=np.float64).reshape(-1)
    except ModeUnsupportedError:
        return None
    name = "primal under differentiation"
    reference = np.asarray(f0, dtype=np.float64).reshape(-1)
    if primal.shape != reference.shape:
        return Contract(name, False, "rev", f"under differentiation fn returns {primal.size} output entries, "
                                            f"{reference.size} when evaluated")
    allowed = _two_paths_allowance(reference, precision, resolution)
    excess = np.abs(primal - reference) - allowed
    if (excess > 0).any():
        k = int(np.argmax(excess))
        return Contract(name, False, "rev",
                        f"the output computed under differentiation differs from fn(x): {primal[k]:.10g} vs "
                        f"{reference[k]:.10g} at {evaluator.output_name(k)}. The rule's forward part (a custom_vjp's "
                        "fwd, a custom_jvp rule's primal output) computes another function than fn itself; the "
                        "gradients are then checked against the wrong function")
    return Contract(name, True, "rev", "the output computed under differentiation equals fn(x)")


def hessian_symmetry(gradient: Evaluator, seed: int, precision: float = FLOAT64_EPS) -> Optional[Contract]:
    """For a scalar fn at order 2: the Hessian the double backward implements is symmetric, ``u^T H w = w^T H u``
    for random ``u``, ``w`` (two VJPs of the gradient function ``x -> v grad f(x)``, whose Jacobian is ``v H``).
    A second derivative assembled wrongly (a term added to one side only, a transposed cross term) breaks it."""
    n = len(gradient.prepared.x0)
    rng = np.random.default_rng(seed + 23)
    u, w = rng.standard_normal(n), rng.standard_normal(n)
    try:
        pulled = gradient.vjp(np.stack([u, w]))
    except ModeUnsupportedError:
        return None
    first, second = float(pulled[0] @ w), float(pulled[1] @ u)
    scale = float(np.abs(pulled[0]) @ np.abs(w) + np.abs(pulled[1]) @ np.abs(u))
    name = "Hessian symmetric"
    if abs(first - second) > _relative(precision) * scale:
        return Contract(name, False, "rev", calls=2, message=
                        f"the second derivative the double backward implements is not symmetric: u^T H w = "
                        f"{first:.10g} but w^T H u = {second:.10g} for random u, w. A Hessian of a scalar function is "
                        "symmetric: the backward of the backward adds a term on one side only, or transposes one")
    return Contract(name, True, "rev", "u^T H w = w^T H u for random u, w", calls=2)
