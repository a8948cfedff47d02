"""The prepared torch function (:class:`TorchPrepared`): the flat float64 vector in, the flat float64 outputs
out, and autograd's products at ``x0``.

Invariant: every number it returns is computed by the user's own code at points the core chose, the way the
user's code runs for the user: evaluations by the point-by-point loop or by a batched path that agreed with it
(:mod:`.batching`), VJPs through the recorded graph with the user's backward passes (one pass per cotangent, or
batched cotangents that agreed), ``J t`` through the VJP (:mod:`.transposed`), JVPs through forward mode
(``torch.autograd.forward_ad``, the user's ``jvp`` rules included, :mod:`.forward_rules`). Everything runs
inside the problem's session and windows (:mod:`.problem`), and gradients are computed in the dtypes fn runs
in and only then widened to float64 for the core. Leaves torch defines no derivative for get zero rows and
are named in ``undefined_gradients``.

Fixed costs: the point-by-point loops convert a chunk once and fill a preallocated result, and the VJP loops
call autograd's engine the way ``torch.autograd.grad`` does, skipping its Python-side argument checks,
wherever no override or torch function mode could see the difference (:func:`.compat._pull`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from gradbridge import _process
from gradbridge._adapter import (EditedEvaluation, ForwardRules, LeafSpec, ProblemBackedFunction, TransposedProducts,
                                 UndefinedGradients, WorkingPrecision)
from gradbridge._errors import FunctionEvaluationError, GradbridgeError, ModeUnsupportedError
from ..common.layout import promotion_notes
from ..common.lowprec import own_precision, promotion_hint, refresh_note
from ..common.outputs import gradient_output_specs, output_specs
from .batching import _FIRST_BATCH, BatchedPaths
from .compat import _pull
from ..common.reach import MISSING as _MISSING
from .forward_rules import _FORWARD_AD_HINTS, _forward_rules, _jvp_hint, _raised_in_user_jvp
from .problem import TorchProblem, _combine, _first_line, _grad, _vjp_graph
from .rule_contracts import RuleContracts
from .transposed import TransposedVJP


#: torch's words when a backward reads a saved tensor that was written in place after it was saved
_SAVED_WRITTEN = "modified by an inplace operation"


class TorchPrepared(ProblemBackedFunction, BatchedPaths, TransposedVJP, RuleContracts, WorkingPrecision,
                    UndefinedGradients, TransposedProducts, EditedEvaluation, ForwardRules):
    """A torch function over the flat float64 vector; ``forward`` maps a flat tensor to a flat output."""

    analytic_source = "PyTorch autograd (your backward passes and autograd formulas)"
    # False forces the point-by-point loop for evaluate and vjp (on an instance, or on the class for
    # every check: comparisons of the two paths, debugging)
    batching = True
    # True once a backward was seen writing its saved tensors: each VJP then records a graph of its own
    graph_per_vjp = False
    # a torch.compile result: the eager function or module it was made from, and dynamo's compilation count
    # when the check began (see .compiled)
    compiled_from: Any = None
    compilations_before = 0

    def __init__(self, problem: TorchProblem, forward: Callable[[torch.Tensor, bool], Tuple[torch.Tensor, list]],
                 x0: np.ndarray, needs_grad_to_evaluate: bool = False, outputs: Optional[List[LeafSpec]] = None) -> None:
        self.problem = problem
        self.forward = forward
        self.leaves = problem.leaves
        self.x0 = x0
        self.needs_grad = needs_grad_to_evaluate
        self._outputs = outputs
        self.undefined_gradients: Dict[str, str] = {}
        self._forward_rule: Any = _MISSING  # found on first use (see forward_rule)
        if problem.promote:
            self.notes = promotion_notes(problem.leaves)
            self.working_eps: Optional[float] = None
        else:
            self.working_eps, note = own_precision(problem.leaves)
            self.notes = [note] if note else []
        if problem.module is not None:
            copies = "float64 copies" if problem.promote else "copies in their own dtypes"
            self.notes.append(f"module {type(problem.module).__name__} in "
                              f"{'training' if problem.spec.train else 'eval'} mode during the check; its "
                              f"parameters and buffers replaced by {copies} while fn runs")
        # batching (see batching.py): one PathChoice per computation, undecided until its first chunk of
        # _FIRST_BATCH rows, each saying its path in self.notes
        self._init_paths()

    @property
    def forward_rule(self) -> Optional[str]:
        """The user-written forward-mode rules fn runs that reverse mode does not exercise, e.g.
        ``"MyFunction.jvp"`` (comma-separated when several), or None: a ``torch.autograd.Function`` whose
        ``jvp`` is its own, given as fn (``MyFunction.apply``) or found in fn's code (see
        :func:`_forward_rules`). The core then checks forward mode too by default. None for the gradient
        function of ``order=2`` (forward mode is checked for first derivatives only)."""
        if self._forward_rule is _MISSING:
            rules = [] if self.needs_grad else _forward_rules(self.problem.spec.fn)
            self._forward_rule = ", ".join(rules) if rules else None
        return self._forward_rule

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """The problem's session; the key of the batching decision is taken on entering it, and on leaving it
        normally the decision follows the counters fn bumped (as the JAX and TensorFlow caches do)."""
        with self.problem.session():
            with _process.LOCK:  # fn's state as the user left it, not inside another check's window
                self._batches_start = self._batches_key() if self.batching and not self.needs_grad else None
            yield
            with _process.LOCK:
                self._keep_batches_after_run()

    # --- evaluation: batched under torch.func.vmap (see batching.py), or point by point ---

    @_process.runs_user_code
    def evaluate(self, points: np.ndarray) -> np.ndarray:
        choice = self.paths["evaluate"]
        if (self.needs_grad or not self.batching or choice.looped
                or len(points) < (2 if choice.batched else _FIRST_BATCH)):
            result = self._evaluate_loop(points)
        elif choice.undecided:
            result = self._evaluate_first_batch(points)
        else:
            result = self._evaluate_batch(points)
        if not self.problem.promote and self._outputs is None:  # the outputs' dtypes are known now
            refresh_note(self.notes, self.leaves, self.output_specs)
        if self.problem.promote and self.problem.low_precision_outputs and not any("computes" in n for n in self.notes):
            self.notes.append(f"fn computes {', '.join(self.problem.low_precision_outputs)} below float64: "
                              "the check's precision is limited by that")
        return result

    @_process.runs_user_code
    def evaluate_edits(self, positions: np.ndarray, values: np.ndarray) -> np.ndarray:
        """``evaluate`` of the copies of ``x0`` with element ``positions[k]`` set to ``values[k]``; once fn
        runs batched, the batch is built as a tensor (no NumPy points to write and convert)."""
        if self.needs_grad or not self.batching or not self.paths["evaluate"].batched or len(positions) < 2:
            points = np.empty((len(positions), len(self.x0)))
            points[:] = self.x0
            points[np.arange(len(positions)), positions] = values
            return self.evaluate(points)
        batch = self.problem.to_tensor(self.x0).expand(len(positions), -1).clone()
        batch[torch.arange(len(positions), device=batch.device), torch.as_tensor(positions, device=batch.device)] = \
            self.problem.to_tensor(values)
        return self._evaluate_batch(batch)

    def _evaluate_loop(self, points: np.ndarray) -> np.ndarray:
        """One forward pass per point (the reference path, and the fallback)."""
        problem, forward, needs_grad = self.problem, self.forward, self.needs_grad
        batch = problem.to_tensor(points)  # one conversion for the chunk; each point a view of its row
        rows: Optional[np.ndarray] = None
        with (torch.enable_grad() if needs_grad else torch.no_grad()):
            for k in range(len(points)):
                x = batch[k]
                try:
                    if needs_grad:
                        out, _ = forward(x.requires_grad_(True), True)
                    else:
                        out, _ = forward(x, False)
                except Exception as exc:
                    if (problem.low_precision and not isinstance(exc, GradbridgeError)
                            and np.array_equal(points[k], self.x0)):
                        # fn fails on the float64 copies at the user's own point: it may only run in its own dtypes
                        raise FunctionEvaluationError(f"fn raised {type(exc).__name__} at the unperturbed input: "
                                                      f"{str(exc).strip()}. {promotion_hint(problem.low_precision)}"
                                                      ) from exc
                    raise
                row = out.detach().cpu().numpy()
                if rows is None:
                    rows = np.empty((len(points),) + row.shape)
                elif row.shape != rows.shape[1:]:  # fn's output changed size (np.stack's error, as before)
                    raise ValueError("all input arrays must have the same shape")
                rows[k] = row  # a copy: out may be a view of a tensor fn keeps and writes again
        if rows is None:  # no points
            return np.zeros((0, sum(spec.size for spec in problem.outputs or ())))
        return rows

    # --- reverse mode ---

    @_process.runs_user_code
    def vjp(self, cotangents: np.ndarray) -> np.ndarray:
        try:
            return self._vjp(cotangents)
        except NotImplementedError as exc:  # some input has no derivative formula ("... is not implemented")
            if self.needs_grad or not self._find_undefined(str(exc).splitlines()[0]):
                raise
            return self._vjp_without(cotangents, set(self.undefined_gradients))

    def _vjp(self, cotangents: np.ndarray) -> np.ndarray:
        if not self.graph_per_vjp:
            try:
                return self._vjp_shared_graph(cotangents)
            except RuntimeError as exc:
                if self.needs_grad or _SAVED_WRITTEN not in str(exc):
                    raise
                # a backward that writes its saved tensors breaks every later pass through its graph; its own values
                # are what the check is about (the "saved tensors untouched" contract fails the check)
                self.graph_per_vjp = True
        return self._vjp_own_graphs(cotangents)

    def _vjp_shared_graph(self, cotangents: np.ndarray) -> np.ndarray:
        problem = self.problem
        x = problem.to_tensor(self.x0).requires_grad_(True)
        with problem.params_held(x):  # the graph is built and walked while params= point into x
            _, out, swapped = _vjp_graph(problem, self.forward, x)
            inputs = [x] + list(swapped)

            def loop(rows: np.ndarray) -> np.ndarray:
                """One backward pass per cotangent through the one recorded graph."""
                pulled = np.zeros((len(rows), x.numel()))
                if not out.requires_grad:  # nothing depends on the checked leaves
                    return pulled
                batch = problem.to_tensor(rows)
                for k in range(len(rows)):
                    self._store_pulled(pulled, k, _pull((out,), inputs, (batch[k],)), x.numel())
                return pulled

            return self._vjp_paths(loop, x, out, swapped, cotangents)

    def _vjp_own_graphs(self, cotangents: np.ndarray) -> np.ndarray:
        """One forward and one backward per cotangent, for a backward that writes its saved tensors."""
        problem = self.problem
        pulled = np.zeros((len(cotangents), self.x0.size))
        batch = problem.to_tensor(cotangents)
        for k in range(len(cotangents)):
            x = problem.to_tensor(self.x0).requires_grad_(True)
            with problem.params_held(x):
                _, out, swapped = _vjp_graph(problem, self.forward, x)
                if out.requires_grad:
                    self._store_pulled(pulled, k, _pull((out,), [x] + list(swapped), (batch[k],), retain_graph=False),
                                       x.numel())
        return pulled

    def _store_pulled(self, pulled: np.ndarray, k: int, grads, size: int) -> None:
        if self.problem.data_swap is not None:
            pulled[k] = _combine(self.problem, grads[0], grads[1:], size).detach().cpu().numpy()
        elif grads[0] is not None:  # None: x unused (zeros)
            pulled[k] = grads[0].detach().cpu().numpy()

    def _leaf_graph(self):
        """The forward graph built from one independent tensor per leaf, so that asking for one leaf's
        gradient does not make autograd compute the others (views of one flat tensor would)."""
        parts = [self.problem.to_tensor(self.x0[leaf.slice]).reshape(leaf.shape).to(dtype).requires_grad_(True)
                 for leaf, dtype in zip(self.leaves, self.problem.leaf_dtypes)]
        with self.problem.params_held(None, parts), torch.enable_grad():
            out, swapped = self.problem.forward(None, True, leaf_values=parts)
        return parts, out, swapped

    def _find_undefined(self, reason: str) -> bool:
        """Ask for each leaf's gradient alone; record those PyTorch has no derivative formula for."""
        parts, out, _ = self._leaf_graph()
        cotangent = torch.ones_like(out)
        with self.problem.params_held(None, parts):
            for leaf, part in zip(self.leaves, parts):
                try:
                    torch.autograd.grad(out, [part], cotangent, retain_graph=True, allow_unused=True)
                except NotImplementedError as exc:
                    self.undefined_gradients[leaf.name] = f"PyTorch: {str(exc).splitlines()[0]}"
        return bool(self.undefined_gradients)

    def _vjp_without(self, cotangents: np.ndarray, undefined: set) -> np.ndarray:
        """VJPs for the leaves that have a gradient; zeros (reported as "no gradient") for the others."""
        parts, out, swapped = self._leaf_graph()
        defined = [k for k, leaf in enumerate(self.leaves) if leaf.name not in undefined]
        inputs = [parts[k] for k in defined] + list(swapped)
        size = len(self.x0)
        rows = []
        with self.problem.params_held(None, parts):
            for cotangent in cotangents:
                grads = (torch.autograd.grad(out, inputs, self.problem.to_tensor(cotangent), retain_graph=True,
                                             allow_unused=True) if inputs and out.requires_grad else [None] * len(inputs))
                flat = torch.zeros(size, dtype=torch.float64, device=self.problem.device)
                for k, g in zip(defined, grads):
                    if g is not None:
                        flat[self.leaves[k].slice] = g.reshape(-1)
                rows.append(_combine(self.problem, flat, grads[len(defined):], size).detach().cpu().numpy())
        return np.stack(rows)

    @_process.runs_user_code
    def jvp(self, tangents: np.ndarray) -> np.ndarray:
        if self.problem.data_swap is not None:
            raise ModeUnsupportedError("forward mode is not available for params given as plain tensors; "
                                       "pass the nn.Module as params= instead")
        if self.needs_grad:
            raise ModeUnsupportedError("forward mode is checked for first derivatives only")
        import torch.autograd.forward_ad as fwAD

        rows = []
        for tangent in tangents:
            try:
                with fwAD.dual_level(), torch.no_grad():
                    x = fwAD.make_dual(self.problem.to_tensor(self.x0), self.problem.to_tensor(tangent))
                    out, _ = self.forward(x, False)
                    pushed = fwAD.unpack_dual(out).tangent
            except GradbridgeError:
                raise
            except Exception as exc:
                rule = _raised_in_user_jvp(exc)
                if rule is not None:  # the user's jvp cannot run as torch runs it in forward mode
                    raise ModeUnsupportedError(f"forward mode unsupported: {rule} raised {_first_line(exc)}"
                                               f"{_jvp_hint(exc)}") from exc
                if (isinstance(exc, (RuntimeError, NotImplementedError))
                        and any(hint in str(exc).lower() for hint in _FORWARD_AD_HINTS)):
                    rules = f" ({self.forward_rule})" if self.forward_rule else ""
                    raise ModeUnsupportedError(f"forward mode unsupported{rules}: {str(exc).splitlines()[0]}") from exc
                raise
            # a copy: the tangent of a view of fn's output, which fn may write again on the next call
            rows.append(np.zeros(out.numel()) if pushed is None else np.array(pushed.detach().cpu().numpy()))
        return np.stack(rows)

    def tangent_function(self, tangent: np.ndarray) -> "TangentFunction":
        """The function ``x -> J(x) t`` (forward mode through ``torch.func.jvp``, so a ``Function.jvp`` runs as
        ``torch.func.jacfwd`` runs it) as a new prepared function, for a level built in forward mode
        (``analytic="fwd"`` at order 2 is forward-over-forward, ``("fwd", "rev")`` reverse-over-forward)."""
        problem = self.problem
        if problem.data_swap is not None:
            raise ModeUnsupportedError("forward mode is not available for params given as plain tensors; pass the "
                                       "nn.Module as params= instead")
        t = problem.to_tensor(tangent)
        first = self.forward

        def pushed(x: torch.Tensor, needs_grad: bool) -> Tuple[torch.Tensor, list]:
            with torch.enable_grad():
                _, out = torch.func.jvp(lambda point: first(point, needs_grad)[0], (x,), (t,))
            return out, []

        outputs = output_specs([(f"jvp[{spec.name}]", spec.shape, "float64") for spec in self.output_specs])
        return TangentFunction(problem, pushed, self.x0, needs_grad_to_evaluate=True, outputs=outputs)

    def gradient_function(self, cotangent: np.ndarray) -> "TorchPrepared":
        problem = self.problem
        v = problem.to_tensor(cotangent)
        first = self.forward

        def gradient(x: torch.Tensor, needs_grad: bool) -> Tuple[torch.Tensor, list]:
            with torch.enable_grad():
                if not x.requires_grad:
                    x = x.detach().requires_grad_(True)
                with problem.params_held(x):
                    out, swapped = first(x, True)
                    g = _grad(problem, x, out, swapped, v, create_graph=True)
            return g, swapped

        outputs = gradient_output_specs(problem.leaves)
        built = GradientFunction(problem, gradient, self.x0, needs_grad_to_evaluate=True, outputs=outputs)
        built.pulled = (first, v)
        return built


class GradientFunction(TorchPrepared):
    """``x -> J(x)^T v`` of a torch function (see :meth:`TorchPrepared.gradient_function`): evaluated and
    differentiated in reverse mode through the double backward (``gradgradcheck``), and in forward mode as
    ``torch.func.jvp`` of the ``torch.func.vjp`` pullback: forward-over-reverse, what ``torch.func.hessian``
    (``jacfwd(jacrev(f))``) runs, a backward's own ``Function.jvp`` rules included."""

    #: (the function below, the cotangent v) this gradient function pulls back
    pulled: Tuple[Callable[[torch.Tensor, bool], Tuple[torch.Tensor, list]], torch.Tensor]

    @_process.runs_user_code
    def jvp(self, tangents: np.ndarray) -> np.ndarray:
        problem = self.problem
        if problem.data_swap is not None:
            raise ModeUnsupportedError("forward mode is not available for params given as plain tensors; pass the "
                                       "nn.Module as params= instead")
        first, v = self.pulled
        x0 = problem.to_tensor(self.x0)

        def gradient(point: torch.Tensor) -> torch.Tensor:
            _, pullback = torch.func.vjp(lambda p: first(p, False)[0], point)
            return pullback(v)[0]

        rows = []
        for tangent in tangents:
            try:
                _, pushed = torch.func.jvp(gradient, (x0,), (problem.to_tensor(tangent),))
            except GradbridgeError:
                raise
            except Exception as exc:
                raise ModeUnsupportedError(f"forward-over-reverse unsupported (torch.func.jvp of the torch.func.vjp "
                                           f"pullback raised {_first_line(exc)})") from exc
            rows.append(np.array(pushed.detach().reshape(-1).cpu().numpy()))
        return np.stack(rows)


class TangentFunction(TorchPrepared):
    """``x -> J(x) t`` of a torch function (see :meth:`TorchPrepared.tangent_function`): evaluated point by point,
    differentiated in reverse mode by autograd (reverse-over-forward) and in forward mode by ``torch.func.jvp``
    again (forward-over-forward: what ``torch.func.jacfwd(torch.func.jacfwd(f))`` runs)."""

    @_process.runs_user_code
    def jvp(self, tangents: np.ndarray) -> np.ndarray:
        problem = self.problem
        x0 = problem.to_tensor(self.x0)
        rows = []
        for tangent in tangents:
            try:
                _, pushed = torch.func.jvp(lambda point: self.forward(point, False)[0], (x0,),
                                           (problem.to_tensor(tangent),))
            except GradbridgeError:
                raise
            except Exception as exc:
                if (isinstance(exc, (RuntimeError, NotImplementedError))
                        and any(hint in str(exc).lower() for hint in _FORWARD_AD_HINTS)):
                    raise ModeUnsupportedError(f"forward-over-forward unsupported: {str(exc).splitlines()[0]}") from exc
                raise
            rows.append(np.array(pushed.detach().cpu().numpy()))
        return np.stack(rows)
