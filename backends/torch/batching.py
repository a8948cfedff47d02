"""The batched paths of a torch check and their decision: evaluations under ``torch.func.vmap``, VJPs with
batched cotangents (``torch.autograd.grad(..., is_grads_batched=True)``).

Invariant: a batched path replaces the point-by-point loop only after it ran on the check's first chunk of at
least ``_FIRST_BATCH`` rows and agreed with the loop there on the chunk's first and last rows under the one
agreement rule (:mod:`gradbridge._agreement`, through :class:`~..common.batching.PathChoice`: one decision
per computation, ``evaluate``, ``vjp`` and ``transposed``, each said once in the notes). Anything vmap cannot
run (classic ``autograd.Function``s, ``.item()``, data-dependent control flow, in-place writes into unbatched
tensors, random draws, ``params=`` tensors swapped in through ``.data``), a visible side effect or a kept
batched tensor (:mod:`.side_effects`), or any disagreement sends the computation to the loop for good, with a
note saying why; a batched path never decides a number the loop would not give. Once batching has been shown
to work, an exception from a batched chunk is the user's and propagates (the core then locates the failing
point one by one). A batched evaluation an earlier check verified is kept (:mod:`.cache`); a repeat check then
runs batched at once, and anything going wrong under vmap sends it through the full decision again.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from gradbridge._precision import FLOAT64_EPS, eps_of
from ..common.batching import PathChoice, path_choices
from ..common.fingerprint import Uncacheable, holds_ints
from .cache import (_BATCHES, _Batches, _Fingerprint, _argument_token, _classic_function_refusal,
                    _remember_classic_function_refusal)
from .problem import TorchProblem, _first_line
from .side_effects import _EscapeWatch, _visible_side_effect


# words in the errors torch raises when a transform (vmap, batched gradients) cannot run some code, as
# opposed to the user's function failing on its own
_BATCHING_HINTS = ("vmap", "functorch", "batching rule", "batchedtensor", "batched tensor", "randomness",
                   "doesn't have storage", "setup_context", "is_grads_batched")


# the smallest chunk the path is decided on: the agreement guard's two extra loop evaluations and the
# first batched call's checks cost more than they can save on a smaller one (which runs point by point)
_FIRST_BATCH = 8
# about how many elements (points x the wider of inputs and outputs) one call of fn under vmap handles
_VMAP_ELEMENTS = 1 << 18


def _batching_error(exc: BaseException) -> bool:
    return any(hint in str(exc).lower() for hint in _BATCHING_HINTS)


@contextlib.contextmanager
def _quiet_batching() -> Iterator[None]:
    """Hide torch's "performance drop ... batching rule" warnings: the batched path is an optimisation."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*[Pp]erformance drop.*")
        warnings.filterwarnings("ignore", message=r".*batching rule.*")
        yield


#: The note each computation's decision says when it runs batched, given the largest batch so far.
_BATCHED_NOTES: Dict[str, Callable[[int], str]] = {
    "evaluate": lambda size: f"evaluated in batches of up to {size} under torch.func.vmap",
    "vjp": lambda size: f"VJPs computed in batches of up to {size} (torch.autograd.grad with is_grads_batched=True)",
    "transposed": lambda size: (f"transposed VJPs (J t) computed in batches of up to {size} (double backward "
                                "with is_grads_batched=True)"),
}


def _disagree(choice: PathChoice, batched: np.ndarray, looped: np.ndarray, eps: float) -> bool:
    """Whether the batched rows disagree with the looped ones under the one agreement rule
    (:meth:`PathChoice.verify`), without NumPy's warning for an ``inf - inf`` the rule computes and then
    ignores (infinities in the same places agree): a user's ``-W error`` must not turn it into a failure."""
    with np.errstate(invalid="ignore"):
        return choice.verify(batched, looped, eps) is not None


def _grad_batched(problem: TorchProblem, x, out, swapped, cotangents: torch.Tensor) -> torch.Tensor:
    """``_grad`` for a (k, m) stack of cotangents in one batched backward pass: (k, n)."""
    k = cotangents.shape[0]
    if not out.requires_grad:
        return torch.zeros(k, x.numel(), dtype=x.dtype, device=x.device)
    inputs = [x] + list(swapped)
    grads = torch.autograd.grad(out, inputs, cotangents, retain_graph=True, allow_unused=True, is_grads_batched=True)
    total = grads[0] if grads[0] is not None else torch.zeros(k, x.numel(), dtype=torch.float64, device=problem.device)
    if problem.data_swap is not None:
        total = total.clone()
        for (index, _), g in zip(problem.data_swap.tensors.items(), grads[1:]):
            if g is not None:
                leaf = problem.leaves[index]
                total[:, leaf.offset:leaf.offset + leaf.size] += g.reshape(k, -1).to(torch.float64)
    return total


class BatchedPaths:
    """The batched paths of :class:`~.prepared.TorchPrepared` and their decisions (``self.paths``)."""

    problem: TorchProblem
    forward: Callable[..., Tuple[torch.Tensor, list]]
    leaves: Any
    x0: np.ndarray
    notes: List[str]
    needs_grad: bool
    batching: bool
    working_eps: Optional[float]
    output_specs: Any

    def _init_paths(self) -> None:
        """One undecided :class:`PathChoice` per computation (decided on its first chunk of ``_FIRST_BATCH``
        rows), saying its decision in ``self.notes`` (which must exist and stay the same list)."""
        self.paths: Dict[str, PathChoice] = path_choices(self.notes, _BATCHED_NOTES)
        # this check's key in the cache of batching decisions, taken when its session starts (before fn runs)
        self._batches_start: Optional[Tuple[Any, List[Any]]] = None

    def _agreement_eps(self) -> float:
        eps = float(self.working_eps or FLOAT64_EPS)
        for spec in self.output_specs:
            eps = max(eps, eps_of(spec.dtype))
        return eps

    def _keep_batches_after_run(self) -> None:
        """Keep a decision made under the state this check started from also under the state fn left behind,
        where the two differ in ints only (a counter fn bumps): the next check starts from it."""
        start = self._batches_start
        if start is None or not self.paths["evaluate"].batched or not holds_ints(start[0][1]):
            return
        end = self._batches_key()
        if end is not None:
            _BATCHES.keep_after_run(self.problem.spec.fn, start[0][1], end[0][1])

    # --- evaluation under torch.func.vmap ---

    # (the point-by-point loop, ``_evaluate_loop``, is TorchPrepared's: it is the reference, not a batched path)

    def _evaluate_vmap(self, points: Union[np.ndarray, torch.Tensor], watch: Optional[_EscapeWatch] = None
                       ) -> np.ndarray:
        """All of ``points`` (rows; NumPy, or a float64 tensor on the device) in one call of fn under
        ``torch.func.vmap`` over the flat point vector; random draws raise (``randomness="error"``): the
        loop's per-point re-seeded draws are not reproduced."""
        forward = self.forward

        def one(x: torch.Tensor) -> torch.Tensor:
            out, _ = forward(x, False)
            return out

        # vmap runs fn on sub-batches of about _VMAP_ELEMENTS elements (2 MB per float64 temporary the size of
        # the inputs or outputs): fn's own intermediates may be far larger (a pairwise-distance energy), and
        # peak memory grows with the sub-batch (2^20 was 10-18% faster on a 4096-input scalar loss, and 4x
        # the memory)
        width = max(len(self.x0), sum(spec.size for spec in self.problem.outputs or ()), 1)
        sub = max(_FIRST_BATCH, _VMAP_ELEMENTS // width)
        with torch.no_grad(), _quiet_batching(), (watch if watch is not None else contextlib.nullcontext()):
            batch = points if isinstance(points, torch.Tensor) else self.problem.to_tensor(points)
            out = torch.func.vmap(one, randomness="error", chunk_size=sub if sub < len(points) else None)(batch)
        result = out.detach().cpu().numpy()
        # an output that is a view of the input (fn returns x or part of it) would share the points' memory
        shared = points if isinstance(points, np.ndarray) else batch.detach().cpu().numpy()
        return result.copy() if np.may_share_memory(result, shared) else result

    def _evaluate_first_batch(self, points: np.ndarray) -> np.ndarray:
        """Decide the path: batched when vmap runs fn and agrees with the loop on the chunk's first and
        last points; otherwise the loop, for good. A loop that raises leaves the decision open.

        A function whose batched evaluation an earlier check verified (same fn, leaf shapes and dtypes,
        options, and fingerprint of what it reads) runs batched at once; anything going wrong under vmap
        then sends it through the full decision here."""
        key = self._batches_start or self._batches_key()
        if key is not None and _BATCHES.get(self.problem.spec.fn, key[0], keep=_Batches.alive) is not None:
            watch = _EscapeWatch()
            try:
                batched = self._evaluate_vmap(points, watch)
            except Exception:
                batched = None
            if batched is not None and not watch.escaped():
                self.paths["evaluate"].use_batched(len(points))
                return batched
        result = self._evaluate_undecided(points)
        if key is not None and self.paths["evaluate"].batched:
            _BATCHES.put(self.problem.spec.fn, key[0], _Batches(key[1]))
        return result

    def _batches_key(self) -> Optional[Tuple[Any, List[Any]]]:
        """The key of this check in the cache of batching decisions and the weak references that must stay
        alive for an entry to hold; None when fn cannot be keyed safely, or its parameters are swapped in
        through ``.data`` (never batched)."""
        if self.problem.data_swap is not None:
            return None
        spec = self.problem.spec
        try:
            fingerprint = _Fingerprint()
            token = fingerprint.environment(spec.fn)
            arguments = _argument_token(fingerprint, (spec.args, dict(spec.kwargs)))
            structure = (tuple((leaf.name, leaf.shape, leaf.dtype) for leaf in self.leaves), arguments,
                         self.problem.promote, spec.train, str(self.problem.device))
            key = (structure, token)
            hash(key)
        except (Uncacheable, TypeError, RecursionError):
            return None
        return key, fingerprint.refs

    def _evaluate_undecided(self, points: np.ndarray) -> np.ndarray:
        """The decision of :meth:`_evaluate_first_batch`, made on this chunk."""
        choice = self.paths["evaluate"]
        if self.problem.data_swap is not None:
            looped = self._evaluate_loop(points)
            choice.use_loop("params= given as plain tensors are swapped in through .data, which "
                            "torch.func.vmap cannot batch: evaluated point by point")
            return looped
        side_effect = _visible_side_effect(self.problem.spec.fn)
        if side_effect is not None:
            looped = self._evaluate_loop(points)
            choice.use_loop(f"{side_effect}, which one batched call under torch.func.vmap "
                            "would do once for many evaluations: evaluated point by point")
            return looped
        refused = _classic_function_refusal(self.problem.spec.fn)
        if refused is not None:  # vmap refused this Function class before: it refuses it again, untried
            looped = self._evaluate_loop(points)
            choice.use_loop(f"fn could not run under torch.func.vmap ({refused}): "
                            "evaluated point by point")
            return looped
        unbatched = self.library_ops_without_batching()
        if unbatched:
            looped = self._evaluate_loop(points)
            choice.use_loop(f"fn calls {', '.join(unbatched)}, which {'has' if len(unbatched) == 1 else 'have'} no "
                            "vmap batching rule (torch.func.vmap would run it one point at a time, with a C++ warning "
                            "per call): evaluated point by point; register_vmap gives it one")
            return looped
        watch = _EscapeWatch()
        try:
            batched = self._evaluate_vmap(points, watch)
        except Exception as exc:  # vmap cannot run fn, or fn is broken: the loop tells which
            looped = self._evaluate_loop(points)
            _remember_classic_function_refusal(self.problem.spec.fn, exc)
            choice.use_loop(f"fn could not run under torch.func.vmap ({_first_line(exc)}): "
                            "evaluated point by point")
            return looped
        if watch.escaped():
            looped = self._evaluate_loop(points)
            choice.use_loop("fn keeps tensors it computes (stores them outside the call), which "
                            "under torch.func.vmap would hold one batched tensor for many "
                            "evaluations: evaluated point by point")
            return looped
        rows = sorted({0, len(points) - 1})
        looped = self._evaluate_loop(points[rows])
        if _disagree(choice, batched[rows], looped, self._agreement_eps()):
            gaps = np.abs(batched[rows] - looped) if batched[rows].shape == looped.shape else np.array([np.nan])
            difference = float(np.max(gaps[np.isfinite(gaps)])) if np.isfinite(gaps).any() else float("nan")
            looped = self._evaluate_loop(points)
            choice.use_loop(f"fn gave different outputs under torch.func.vmap than point by point "
                            f"(by up to {difference:.3g}): evaluated point by point")
            return looped
        choice.use_batched(len(points))
        return batched

    def _evaluate_batch(self, points: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
        """The decided batched path for ``points``; the loop for good when vmap stops running fn."""
        choice = self.paths["evaluate"]
        try:
            batched = self._evaluate_vmap(points)
        except Exception as exc:
            if not _batching_error(exc):
                raise  # vmap ran fn before: this is fn's own error (the core locates the failing point)
            if isinstance(points, torch.Tensor):
                points = points.cpu().numpy()
            looped = self._evaluate_loop(points)
            choice.use_loop(f"fn stopped running under torch.func.vmap ({_first_line(exc)}): "
                            "evaluated point by point from then on")
            return looped
        choice.use_batched(len(points))
        return batched

    # --- VJPs with batched cotangents ---

    def _vjp_paths(self, loop: Callable[[np.ndarray], np.ndarray], x: torch.Tensor, out: torch.Tensor,
                   swapped: List[torch.Tensor], cotangents: np.ndarray) -> np.ndarray:
        """The VJPs of ``cotangents`` through the one recorded graph from ``x`` (and the ``swapped`` ``params=``
        tensors) to ``out``: batched where that is decided (or decided here, on this chunk), else ``loop``
        (one backward pass per cotangent)."""
        choice = self.paths["vjp"]
        if not self.batching or choice.looped or len(cotangents) < (2 if choice.batched else _FIRST_BATCH):
            return loop(cotangents)
        try:
            with _quiet_batching():
                batched = _grad_batched(self.problem, x, out, swapped,
                                        self.problem.to_tensor(cotangents)).detach().cpu().numpy()
        except Exception as exc:
            if choice.batched and not _batching_error(exc):
                raise  # batched backward passes worked before: this is the backward's own error
            looped = loop(cotangents)  # raises when the backward itself is broken
            choice.use_loop(f"the backward pass could not run with batched cotangents "
                            f"({_first_line(exc)}): one backward pass per cotangent")
            return looped
        if choice.undecided:
            rows = sorted({0, len(cotangents) - 1})
            if _disagree(choice, batched[rows], loop(cotangents[rows]), self._agreement_eps()):
                looped = loop(cotangents)
                choice.use_loop("the backward pass gave different results with batched cotangents "
                                "than one by one: one backward pass per cotangent")
                return looped
        choice.use_batched(len(cotangents))
        return batched
