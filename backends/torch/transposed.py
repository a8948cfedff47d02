"""The transposed VJP (``vjp_transposed``): ``J t`` through the reverse-mode VJP, never through forward mode.

Invariant: the ``J`` of ``J t`` is the very Jacobian :meth:`~.prepared.TorchPrepared.vjp` implements, the
user's backward passes included: ``J^T u`` is built at a seeded random cotangent ``u`` with
``create_graph=True`` and differentiated with respect to ``u`` (double backward). A result is returned only
when ``u . (J t) = t . (J^T u)`` holds for every tangent (:func:`_consistent`); backward passes that cannot be
differentiated again raise ModeUnsupportedError instead: ``@once_differentiable``, an op without a double
backward, and a custom backward computing (part of) its result off the graph (NumPy, ``.detach()``). The
tangents are batched with ``is_grads_batched`` under the same once-decided, guarded scheme as ``vjp``
(:mod:`.batching`, the ``transposed`` path).
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch

from gradbridge import _process
from gradbridge._errors import GradbridgeError, ModeUnsupportedError
from .batching import _FIRST_BATCH, _batching_error, _disagree, _quiet_batching
from .compat import _pull, is_error_node
from .problem import _first_line, _vjp_graph


# where one gradient piece sits in the flat vector, and its shape
_Span = Tuple[slice, Tuple[int, ...]]

_TRANSPOSED = "the transposed VJP (J t, by differentiating the backward pass with respect to its cotangent) "


def _probe_cotangent(seed: int, size: int, device: torch.device) -> torch.Tensor:
    """The cotangent ``u`` the VJP is built at before it is differentiated with respect to ``u``: seeded,
    random (nonzero almost surely), a leaf that requires grad. ``J^T u`` is linear in ``u``, so ``J t`` does
    not depend on which ``u``; a random one makes a part of ``J^T u`` that is off the graph show up."""
    rng = np.random.default_rng([seed, 0x7A7])
    return torch.as_tensor(rng.standard_normal(size), dtype=torch.float64, device=device).requires_grad_(True)


def _tangent_piece(tangents: torch.Tensor, span: _Span, like: torch.Tensor) -> torch.Tensor:
    """The part of the (k, n) ``tangents`` that pairs with the gradient piece ``like``: shape (k,) + its
    shape, in its dtype (a low-precision leaf's with ``promote=False``)."""
    where, shape = span
    return tangents[:, where].reshape((tangents.shape[0],) + tuple(shape)).to(like.dtype)


def _differentiate_cotangent(u: torch.Tensor, pieces: Sequence[torch.Tensor], spans: Sequence[_Span],
                             tangents: torch.Tensor, batched: bool) -> np.ndarray:
    """``J t`` for the (k, n) ``tangents``: the pieces of ``J^T u`` differentiated with respect to ``u``,
    for all rows at once (``is_grads_batched``) or for a single row (k = 1). Raises torch's errors."""
    outputs = [_tangent_piece(tangents, span, g) for g, span in zip(pieces, spans)]
    if batched:
        (pulled,) = torch.autograd.grad(list(pieces), [u], outputs, retain_graph=True, allow_unused=True,
                                        is_grads_batched=True)
    else:
        (pulled,) = _pull(pieces, (u,), [o[0] for o in outputs])
    if pulled is None:  # no piece depends on u: J t is zero (the consistency check tells whether it should be)
        return np.zeros((tangents.shape[0], u.numel()))
    return pulled.detach().to(torch.float64).reshape(tangents.shape[0], -1).cpu().numpy()


def _once_differentiable_in(tensors: Sequence[torch.Tensor], limit: int = 20000) -> bool:
    """Whether the autograd graph behind ``tensors`` holds the error node torch puts after a custom
    backward marked ``@once_differentiable`` (looked at only to word the error; at most ``limit`` nodes)."""
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
    visited = 0
    while stack and visited < limit:
        node = stack.pop()
        visited += 1
        if is_error_node(node):
            return True
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return False


def _not_differentiable(pieces: Sequence[torch.Tensor], exc: Optional[BaseException] = None) -> ModeUnsupportedError:
    """The error saying why the backward pass cannot be differentiated with respect to its cotangent."""
    if _once_differentiable_in(pieces):
        why = ("a custom backward is marked @once_differentiable, so torch cannot differentiate it again; "
               "drop the decorator (keeping the backward in differentiable torch operations) to use it")
    elif exc is not None:
        why = f"torch could not differentiate the backward pass again ({_first_line(exc)})"
    else:
        why = ("part of J^T u is not on the autograd graph of the cotangent u: a custom backward computes it "
               "outside autograd (NumPy, .detach(), .item(), .data) or adds something not linear in the "
               "cotangent, and differentiating it would miss that part")
    return ModeUnsupportedError(_TRANSPOSED + "is unavailable: " + why)


def _consistent(u: torch.Tensor, gradient: np.ndarray, tangents: np.ndarray, rows: np.ndarray,
                tolerance: float) -> bool:
    """Whether ``u . (J t) == t . (J^T u)`` for every row (to ``tolerance`` relative to the norms), as it must
    be when ``J^T u`` is linear in ``u`` and all of it is on the graph of ``u`` (a linear map equals its
    derivative applied to its argument). A part computed off the graph (NumPy, ``.detach()``) is in
    ``J^T u`` but missing from ``J t``, so this catches what the graph alone cannot show: a leaf's gradient
    that is partly on the graph. Rows with non-finite values are skipped."""
    probe = u.detach().cpu().numpy()
    lhs = rows @ probe
    rhs = tangents @ gradient
    scale = (np.linalg.norm(probe) * np.linalg.norm(rows, axis=1)
             + np.linalg.norm(tangents, axis=1) * np.linalg.norm(gradient))
    finite = np.isfinite(lhs) & np.isfinite(rhs) & np.isfinite(scale)
    return bool(np.all(np.abs(lhs - rhs)[finite] <= tolerance * scale[finite]))


class TransposedVJP:
    """``vjp_transposed`` for :class:`~.prepared.TorchPrepared` (which offers the graphs and the path choices)."""

    problem: Any
    forward: Any
    leaves: Any
    x0: np.ndarray
    needs_grad: bool
    batching: bool
    undefined_gradients: Any
    paths: Any

    @_process.runs_user_code
    def vjp_transposed(self, tangents: np.ndarray) -> np.ndarray:
        """``J t`` for each row of the (k, n) ``tangents``: (k, m), with ``J`` exactly the Jacobian :meth:`vjp`
        implements (the user's backward passes included), never forward-mode rules: ``J^T u`` is built at a
        random cotangent ``u`` with ``create_graph=True`` and differentiated with respect to ``u`` ("double
        backward"). Leaves torch has no derivative formula for get zero columns, as :meth:`vjp` gives them
        zero rows. Raises ModeUnsupportedError where the backward pass cannot be differentiated again
        (``@once_differentiable``, NumPy or ``.detach()`` inside a custom backward, an op without a double
        backward)."""
        tangents = np.asarray(tangents, dtype=np.float64).reshape(len(tangents), -1)
        try:
            return self._transposed(tangents)
        except GradbridgeError:
            raise
        except NotImplementedError as exc:  # some input has no derivative formula (first backward pass)
            if self.needs_grad or not self._find_undefined(str(exc).splitlines()[0]):
                raise
            return self._transposed_without(tangents, set(self.undefined_gradients))

    def _swapped_spans(self) -> List[_Span]:
        """Where the gradients of the ``params=`` tensors swapped in through ``.data`` go in the flat vector."""
        swap = self.problem.data_swap
        return [] if swap is None else [(self.leaves[k].slice, self.leaves[k].shape) for k in swap.tensors]

    def _transposed(self, tangents: np.ndarray) -> np.ndarray:
        """``vjp_transposed`` through the graph of the flat input (the path of :meth:`_vjp`)."""
        x = self.problem.to_tensor(self.x0).requires_grad_(True)
        with self.problem.params_held(x):  # the graphs are built and walked while params= point into x
            _, out, swapped = _vjp_graph(self.problem, self.forward, x)
            spans = [(slice(0, len(self.x0)), (len(self.x0),))] + self._swapped_spans()
            return self._transpose_through(out, [x] + list(swapped), spans, tangents)

    def _transposed_without(self, tangents: np.ndarray, undefined: set) -> np.ndarray:
        """``vjp_transposed`` over the leaves that have a gradient (the path of :meth:`_vjp_without`): the
        others' columns of ``J`` are zero."""
        parts, out, swapped = self._leaf_graph()
        defined = [k for k, leaf in enumerate(self.leaves) if leaf.name not in undefined]
        spans = [(self.leaves[k].slice, self.leaves[k].shape) for k in defined] + self._swapped_spans()
        with self.problem.params_held(None, parts):
            return self._transpose_through(out, [parts[k] for k in defined] + list(swapped), spans, tangents)

    def _transpose_through(self, out: torch.Tensor, inputs: List[torch.Tensor], spans: List[_Span],
                           tangents: np.ndarray) -> np.ndarray:
        """``J t`` for the graph from ``inputs`` (whose gradients go to ``spans`` of the flat vector) to ``out``,
        checked for consistency with ``J^T u`` (see :func:`_consistent`)."""
        if not out.requires_grad or len(tangents) == 0:  # nothing depends on the checked leaves: J = 0
            return np.zeros((len(tangents), out.numel()))
        u = _probe_cotangent(self.problem.spec.seed, out.numel(), self.problem.device)
        pieces, kept, gradient = self._cotangent_pieces(out, inputs, spans, u)
        rows = self._second_backward(u, pieces, kept, tangents) if pieces else np.zeros((len(tangents), out.numel()))
        if not _consistent(u, gradient, tangents, rows, float(np.sqrt(self._agreement_eps()))):
            raise _not_differentiable(pieces)
        return rows

    def _cotangent_pieces(self, out: torch.Tensor, inputs: List[torch.Tensor], spans: List[_Span],
                          u: torch.Tensor) -> Tuple[List[torch.Tensor], List[_Span], np.ndarray]:
        """``J^T u`` with its graph (``create_graph=True``): the gradient pieces that are on a graph, their
        spans, and the whole of it as a flat float64 vector. A nonzero piece off any graph (a custom backward
        computed in NumPy) raises ModeUnsupportedError; one that is zero is a zero block of ``J``."""
        try:
            with torch.enable_grad():  # the cotangent a clone, so a backward writing into its input never hits u
                grads = torch.autograd.grad(out, inputs, u.clone(), retain_graph=True, create_graph=True,
                                            allow_unused=True)
        except (GradbridgeError, NotImplementedError):
            raise
        except Exception as exc:
            self._raise_unless_plain_backward_fails(out, inputs, u, exc)
        gradient = np.zeros(len(self.x0))
        pieces: List[torch.Tensor] = []
        kept: List[_Span] = []
        for g, span in zip(grads, spans):
            if g is None:
                continue
            gradient[span[0]] += g.detach().to(torch.float64).reshape(-1).cpu().numpy()
            if g.requires_grad:
                pieces.append(g)
                kept.append(span)
            elif bool(torch.any(g != 0)):
                raise _not_differentiable([])
        return pieces, kept, gradient

    def _raise_unless_plain_backward_fails(self, out: torch.Tensor, inputs: List[torch.Tensor], u: torch.Tensor,
                                           exc: Exception) -> None:
        """The backward pass raised ``exc`` while its graph was recorded: when it runs without recording
        (as in :meth:`vjp`), it cannot be differentiated (ModeUnsupportedError); otherwise ``exc`` is the
        backward's own error and is raised as it is."""
        try:
            torch.autograd.grad(out, inputs, u.detach(), retain_graph=True, allow_unused=True)
            plain_fails = False
        except Exception:
            plain_fails = True
        if plain_fails:
            raise exc
        raise ModeUnsupportedError(_TRANSPOSED + "is unavailable: the backward pass fails when its graph is "
                                   f"recorded (create_graph=True): {_first_line(exc)}") from exc

    def _second_backward(self, u: torch.Tensor, pieces: List[torch.Tensor], spans: List[_Span],
                         tangents: np.ndarray) -> np.ndarray:
        """``J t`` for every row of ``tangents``: batched (``is_grads_batched``) where that works and agrees
        with one pass per tangent on the first chunk, decided and noted as for :meth:`vjp`."""
        t = self.problem.to_tensor(tangents)

        def loop(rows: Sequence[int]) -> np.ndarray:
            try:
                return np.concatenate([_differentiate_cotangent(u, pieces, spans, t[i:i + 1], False) for i in rows])
            except (RuntimeError, NotImplementedError) as exc:  # an op or rule without a double backward
                if isinstance(exc, GradbridgeError):
                    raise
                raise _not_differentiable(pieces, exc) from exc

        choice = self.paths["transposed"]
        if not self.batching or choice.looped or len(t) < (2 if choice.batched else _FIRST_BATCH):
            return loop(range(len(t)))
        try:
            with _quiet_batching():
                batched = _differentiate_cotangent(u, pieces, spans, t, True)
        except GradbridgeError:
            raise
        except Exception as exc:
            if choice.batched and not _batching_error(exc):
                if isinstance(exc, (RuntimeError, NotImplementedError)):
                    raise _not_differentiable(pieces, exc) from exc
                raise
            looped = loop(range(len(t)))  # raises when the double backward itself cannot run
            choice.use_loop(f"the double backward pass could not run with batched tangents "
                            f"({_first_line(exc)}): one pass per tangent")
            return looped
        if choice.undecided:
            rows = sorted({0, len(t) - 1})
            if _disagree(choice, batched[rows], loop(rows), self._agreement_eps()):
                looped = loop(range(len(t)))
                choice.use_loop("the double backward pass gave different results with batched "
                                "tangents than one by one: one pass per tangent")
                return looped
        choice.use_batched(len(t))
        return batched
