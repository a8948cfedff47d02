"""The contract checks' side of a prepared torch function (see :mod:`gradbridge._checking.contracts`): the primal
under differentiation, memory layouts, in-place writes and the custom-rule audit, batched rules under
``torch.func.vmap``, ``torch.library`` ops (opcheck, batching rules) and ``torch.compile`` results against their eager
originals.

Invariant: every probe runs the user's code on the check's own float64 copies at ``x0``, inside the problem's
windows like any evaluation; a probe the function cannot take (vmap refused, a compiled function that vmap would
make torch.compile skip) raises ModeUnsupportedError saying why, and one that would cost compilations the check has
not paid for raises CostlyProbeSkipped unless ``thorough``.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from gradbridge import _process
from gradbridge._errors import CostlyProbeSkipped, GradbridgeError, ModeUnsupportedError
from . import compiled, library_ops
from .problem import _first_line, _grad, _vjp_graph
from .rule_audit import RuleAudit, leaf_namer


class RuleContracts:
    """The contract capabilities of :class:`.prepared.TorchPrepared` (``DifferentiatedPrimal``, ``StridedInputs``,
    ``InPlaceWrites``, ``BatchedRules``, ``BatchedForwardRules``, ``FrameworkTests``, ``CompiledFunction``)."""

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
