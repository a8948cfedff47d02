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
import copy
import dataclasses
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from gradbridge import _process
from gradbridge._adapter import (EditedEvaluation, ForwardRules, LeafSpec, ProblemBackedFunction, TransposedProducts,
                                 UndefinedGradients, WorkingPrecision)
from gradbridge._errors import CostlyProbeSkipped, FunctionEvaluationError, GradbridgeError, ModeUnsupportedError
from ..common.layout import promotion_notes
from ..common.lowprec import own_precision, promotion_hint, refresh_note
from ..common.outputs import gradient_output_specs, output_specs
from .batching import _FIRST_BATCH, BatchedPaths
from .compat import _pull
from ..common.reach import MISSING as _MISSING
from .forward_rules import _FORWARD_AD_HINTS, _forward_rules, _jvp_hint, _raised_in_user_jvp
from .problem import TorchProblem, _combine, _first_line, _vjp_graph
from . import compiled, library_ops
from .rule_audit import RuleAudit, leaf_namer
from .transposed import TransposedVJP


#: torch's words when a backward reads a saved tensor that was written in place after it was saved
_SAVED_WRITTEN = "modified by an inplace operation"


def _grad(problem: TorchProblem, x, out, swapped, cotangent: torch.Tensor, create_graph: bool,
          retain_graph: bool = True) -> torch.Tensor:
    if not out.requires_grad:
        return torch.zeros_like(x)
    inputs = [x] + list(swapped)
    grads = _pull((out,), inputs, (cotangent,), create_graph, retain_graph)
    return _combine(problem, grads[0], grads[1:], x.numel())


class TorchPrepared(ProblemBackedFunction, BatchedPaths, TransposedVJP, WorkingPrecision, UndefinedGradients,
                    TransposedProducts, EditedEvaluation, ForwardRules):
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
    def differentiated_primal(self) -> np.ndarray:
        """fn's output at ``x0`` from the forward autograd records for backward (grad enabled, the checked leaves
        requiring grad), for the contract check that it equals ``fn(x0)`` evaluated without recording."""
        problem = self.problem
        x = problem.to_tensor(self.x0).requires_grad_(True)
        with problem.params_held(x):
            _, out, _ = _vjp_graph(problem, self.forward, x)
        return out.detach().cpu().numpy().copy()

    @_process.runs_user_code
    def strided_variants(self, cotangent: np.ndarray, thorough: bool = False) -> List[Tuple[str, Any]]:
        """fn and its VJP with the checked inputs contiguous and laid out non-contiguously (every input of two or
        more axes transposed in memory, vectors every other element of a buffer) or expanded (a stride-0 first axis,
        at the point whose rows equal the first), for the memory-layout contract (see
        :class:`gradbridge._adapter.StridedInputs`). Parameters stay as the module holds them."""
        problem = self.problem
        if self.needs_grad or problem.data_swap is not None:
            raise ModeUnsupportedError("memory layouts are checked for first derivatives of functions and modules")
        if self.compiled_from is not None and not thorough:
            raise CostlyProbeSkipped("fn is compiled, and torch.compile guards on strides: each memory layout would "
                                     "compile it again (2 of a small check's 5 compilations, measured)")
        v = problem.to_tensor(cotangent)
        values = [problem.to_tensor(self.x0[leaf.slice]).reshape(leaf.shape) for leaf in self.leaves]
        found: List[Tuple[str, Any]] = []
        for layout, make in (("non-contiguous", _non_contiguous), ("expanded", _expanded)):
            # the inputs fn is given (a module's parameters are its own: swapped in as the module holds them)
            laid_out = [make(value) if leaf.kind == "input" else None for leaf, value in zip(self.leaves, values)]
            if all(tensor is None for tensor in laid_out):
                continue
            contiguous = [value if tensor is None else tensor.detach().contiguous()
                          for value, tensor in zip(values, laid_out)]
            strided = [value if tensor is None else tensor for value, tensor in zip(values, laid_out)]
            try:
                reference = self._run_on(contiguous, v)
            except GradbridgeError:
                raise
            except Exception as exc:  # no backward for some input (its rows say so): nothing to compare layouts on
                raise ModeUnsupportedError(f"the backward of the contiguous inputs raised {_first_line(exc)}") from exc
            try:
                found.append((layout, (reference, self._run_on(strided, v))))
            except GradbridgeError:
                raise
            except Exception as exc:
                found.append((layout, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"))
        return found

    def _run_on(self, parts: List[torch.Tensor], cotangent: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
        """fn's flat output and its VJP at ``cotangent``, with the leaves given as these very tensors (their
        layouts kept: each is a fresh leaf requiring grad, or a stride-0 view of one)."""
        with torch.enable_grad():  # the caller may be in no_grad: the expanded views must record their base
            return self._run_recorded(parts, cotangent)

    def _run_recorded(self, parts: List[torch.Tensor], cotangent: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
        problem = self.problem
        leaves = []
        for part in parts:
            if part.stride() and 0 in part.stride():  # an expanded view: its base is the leaf, the view is fed
                base = part[tuple(slice(0, 1) if st == 0 else slice(None) for st in part.stride())].detach()
                leaves.append(base.clone().requires_grad_(True).expand(part.shape))
            else:
                leaf = part.detach()
                leaf = torch.empty_strided(leaf.shape, leaf.stride(), dtype=leaf.dtype, device=leaf.device).copy_(leaf)
                leaves.append(leaf.requires_grad_(True))
        with problem.params_held(None, leaves), torch.enable_grad():
            out, _ = problem.forward(None, True, leaf_values=leaves)
            # read before the backward, which may write a saved output (the contract on saved tensors says so)
            values = out.detach().cpu().numpy().copy()
            # a cotangent of its own: a backward writing it in place must not change the other layout's run
            grads = torch.autograd.grad(out, leaves, cotangent.clone(), allow_unused=True)
        flat = np.concatenate([np.zeros(p.numel()) if g is None else g.detach().reshape(-1).cpu().numpy()
                               for p, g in zip(leaves, grads)])
        return values, flat

    @_process.runs_user_code
    def in_place_writes(self, cotangent: np.ndarray) -> Dict[str, List[str]]:
        """What fn and its custom rules write in place or return that they must not (see
        :class:`gradbridge._adapter.InPlaceWrites`): one forward on recorded copies of the inputs, one backward with
        the cotangent as a tensor of its own and the custom-rule nodes audited (:class:`.rule_audit.RuleAudit`),
        each compared with its snapshot afterwards."""
        problem = self.problem
        if self.needs_grad or problem.data_swap is not None:
            raise ModeUnsupportedError("in-place writes are checked for first derivatives of functions and modules")
        names = [leaf.name for leaf in self.leaves]
        with torch.enable_grad():
            bases = [problem.to_tensor(self.x0[leaf.slice]).reshape(leaf.shape).requires_grad_(True)
                     for leaf in self.leaves]
            given = [base.clone() if leaf.kind == "input" else base for leaf, base in zip(self.leaves, bases)]
            snapshots = [g.detach().clone() for g in given]
            with problem.params_held(None, given):
                out, _ = problem.forward(None, True, leaf_values=given)
                changed = [leaf.name for leaf, g, snap in zip(self.leaves, given, snapshots)
                           if leaf.kind == "input" and not torch.equal(g.detach(), snap)]
                v = problem.to_tensor(cotangent).clone()
                before = v.clone()
                # a compiled function's graph is one compiled node whose backward may run once only (donated
                # buffers): its rules are compiled code, not audited
                audit = RuleAudit(out if self.compiled_from is None else out.detach(), leaf_namer(bases, names),
                                  list(zip(names, given)))
                if out.requires_grad:
                    try:
                        with audit:
                            torch.autograd.grad(out, bases, v, allow_unused=True,
                                                retain_graph=self.compiled_from is None)
                    except GradbridgeError:
                        raise
                    except Exception as exc:  # no backward for some input (its rows say so)
                        raise ModeUnsupportedError(f"the backward raised {_first_line(exc)}") from exc
                in_backward = [name for name, g, snap in zip(names, given, snapshots)
                               if name not in changed and not torch.equal(g.detach(), snap)]
                found = audit.findings()
        written = [] if torch.equal(v, before) else [spec.name for spec in self.output_specs
                                                      if not torch.equal(v[spec.slice], before[spec.slice])]
        return {"inputs": changed, "cotangent": written, "backward_inputs": in_backward, "rules": audit.rules,
                **found}

    def library_ops_without_batching(self) -> List[str]:
        """The ``torch.library`` ops without a vmap batching rule that fn is or its code loads: such an fn never
        runs under vmap here (see :mod:`.library_ops`)."""
        return library_ops.without_batching_rule(self.problem.spec.fn)

    @_process.runs_user_code
    def compiled_and_eager(self, cotangents: np.ndarray, thorough: bool = False
                           ) -> Tuple[Tuple[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray], str]:
        """fn's outputs and VJPs at ``x0`` computed by the compiled function and by the eager one it was made from
        (see :class:`gradbridge._adapter.CompiledFunction`), and how many compilations the check caused."""
        if self.compiled_from is None or self.needs_grad:
            raise ModeUnsupportedError("fn is not a torch.compile result")
        eager = copy.copy(self.problem)
        eager.spec = dataclasses.replace(self.problem.spec, fn=self.compiled_from)
        results = []
        for problem in (eager, self.problem):
            values, rows = None, []
            for v in cotangents:  # a forward per cotangent: a compiled backward may run once per graph
                x = problem.to_tensor(self.x0).requires_grad_(True)
                with problem.params_held(x), torch.enable_grad():
                    problem.reseed()
                    seeded = torch.random.get_rng_state()
                    out, swapped = problem.forward(x, True)
                    if problem is eager and not torch.equal(torch.random.get_rng_state(), seeded):
                        return None, None, ("fn draws random numbers, which torch.compile's generated code draws its "
                                            "own way (not eager's stream)")
                    values = out.detach().cpu().numpy().copy()
                    rows.append(_grad(problem, x, out, swapped, problem.to_tensor(v), False, retain_graph=False)
                                .detach().cpu().numpy())
            results.append((values, np.stack(rows)))
        count = compiled.compilations() - self.compilations_before
        return results[1], results[0], (f"torch.compile compiled {count} graph(s) during the check (guards on grad "
                                        "mode, dtypes and strides)" if count else "")

    def _refuse_unbatched_ops(self) -> None:
        if self.compiled_from is not None:
            raise ModeUnsupportedError("fn is compiled (torch.compile): torch.func.vmap around it would make "
                                       "torch.compile skip it for good; check the eager function for its batching")
        unbatched = self.library_ops_without_batching()
        if unbatched:
            raise ModeUnsupportedError(
                f"fn calls {', '.join(unbatched)}, which {'has' if len(unbatched) == 1 else 'have'} no vmap batching "
                "rule: torch.func.vmap runs such an op one sample at a time through its fallback (with a C++ warning "
                "per call), so there is no rule of yours to check; register_vmap gives it one")

    @_process.runs_user_code
    def framework_tests(self, thorough: bool = False) -> List[Tuple[str, Optional[bool], str]]:
        """torch.library.opcheck of a library op (see :class:`gradbridge._adapter.FrameworkTests`), on the check's
        float64 copies at ``x0`` with the checked inputs requiring grad."""
        problem = self.problem
        if self.needs_grad or library_ops.library_op(problem.spec.fn) is None:
            return []
        with torch.enable_grad():
            x = problem.to_tensor(self.x0).requires_grad_(True)
            return library_ops.opcheck(problem.spec.fn, lambda runner: problem.call_with_arguments(runner, (), x),
                                       thorough)

    @_process.runs_user_code
    def vjp_batched_and_looped(self, cotangents: np.ndarray, thorough: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """The VJPs of ``cotangents`` from one ``torch.func.vjp`` pullback, under ``torch.func.vmap`` (what
        per-sample gradients and ``torch.func.jacrev`` run, custom ``vmap`` rules included) and one cotangent at a
        time, for the batched-backward contract (torch's ``check_batched_grad``)."""
        problem = self.problem
        if self.needs_grad or problem.data_swap is not None:
            raise ModeUnsupportedError("batched VJPs are checked for first derivatives of functions and modules")
        self._refuse_unbatched_ops()
        x0 = problem.to_tensor(self.x0)
        batch = problem.to_tensor(cotangents)
        try:
            with torch.enable_grad():
                _, pullback = torch.func.vjp(lambda point: self.forward(point, False)[0], x0)
                # each call gets a cotangent of its own: a backward writing it in place must not change the next
                looped = np.stack([pullback(v.clone())[0].detach().reshape(-1).cpu().numpy() for v in batch])
                batched = torch.func.vmap(pullback)(batch.clone())[0].detach().reshape(len(batch), -1).cpu().numpy()
        except GradbridgeError:
            raise
        except Exception as exc:
            raise ModeUnsupportedError(f"torch.func.vmap of its torch.func.vjp raised {_first_line(exc)}; per-sample "
                                       "gradients (vmap of the VJP, jacrev) of this rule fail the same way") from exc
        return batched, looped

    @_process.runs_user_code
    def jvp_batched_and_looped(self, tangents: np.ndarray, thorough: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """The JVPs of ``tangents`` through ``torch.func.jvp``, under ``torch.func.vmap`` (what ``torch.func.jacfwd``
        runs, a ``Function.jvp`` included) and one tangent at a time (torch's ``check_batched_forward_grad``)."""
        problem = self.problem
        if self.needs_grad or problem.data_swap is not None:
            raise ModeUnsupportedError("batched JVPs are checked for first derivatives of functions and modules")
        self._refuse_unbatched_ops()
        x0 = problem.to_tensor(self.x0)
        batch = problem.to_tensor(tangents)

        def pushed(tangent: torch.Tensor) -> torch.Tensor:
            return torch.func.jvp(lambda point: self.forward(point, False)[0], (x0,), (tangent,))[1]

        try:
            looped = np.stack([pushed(t.clone()).detach().reshape(-1).cpu().numpy() for t in batch])
            batched = torch.func.vmap(pushed)(batch.clone()).detach().reshape(len(batch), -1).cpu().numpy()
        except GradbridgeError:
            raise
        except Exception as exc:
            raise ModeUnsupportedError(f"torch.func.vmap of its torch.func.jvp raised {_first_line(exc)}; jacfwd of "
                                       "this rule fails the same way") from exc
        return batched, looped

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


def _non_contiguous(value: torch.Tensor) -> Optional[torch.Tensor]:
    """``value`` stored non-contiguously: transposed in memory (two or more axes), or every other element of a
    buffer (one axis); None for a scalar or a single element."""
    if value.numel() < 2:
        return None
    if value.dim() >= 2:
        return value.detach().transpose(-1, -2).contiguous().transpose(-1, -2)
    buffer = torch.zeros(value.numel() * 2, dtype=value.dtype, device=value.device)
    strided = buffer[::2]
    strided.copy_(value.detach().reshape(-1))
    return strided.reshape(value.shape)


def _expanded(value: torch.Tensor) -> Optional[torch.Tensor]:
    """``value``'s first row expanded along its first axis (stride 0); None where that axis has one element."""
    if value.dim() == 0 or value.shape[0] < 2:
        return None
    return value.detach()[:1].expand(value.shape)
