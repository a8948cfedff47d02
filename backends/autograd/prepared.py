"""The autograd prepared function: NumPy evaluation, autograd's reverse and forward mode, its own derivatives.

Invariant: every derivative comes from autograd tracing the very function the evaluation computes
(:meth:`AutogradProblem.traced`), with the user's ``defvjp``/``defjvp`` rules, at ``x0`` as it is when the
derivative is asked for; each trace and each backward call runs inside the RNG window after re-seeding, like an
evaluation. A leaf autograd defines no VJP for is named in ``undefined_gradients`` (its column zero), never an
error; a missing forward-mode rule, or a backward autograd cannot differentiate again (``order=2``), raises
ModeUnsupportedError, never a silent zero; nothing is kept across checks.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from gradbridge import _process
from gradbridge._adapter import ForwardRules, LeafSpec, TransposedProducts, UndefinedGradients
from gradbridge._checking.evaluate import mark_failed_point
from gradbridge._errors import GradbridgeError, ModeUnsupportedError

from ..common.outputs import gradient_output_specs
from ..numpy.prepared import ArrayPrepared
from .compat import getval, jvp_of, missing_jvp, missing_vjp, vjp_of
from .problem import AutogradProblem
from .transposed import TransposedVJP, broken_boxes, first_line

Flat = Callable[[Any], Any]


class AutogradPrepared(ArrayPrepared, TransposedVJP, UndefinedGradients, TransposedProducts, ForwardRules):
    """A function of NumPy arrays differentiated by autograd, over the flat float64 vector of checked leaves.

    ``function`` maps the flat point to the flat output (plain arrays or autograd's boxes): the problem's
    :meth:`~AutogradProblem.traced` for the check itself, ``x -> J(x)^T v`` for ``order=2``.
    ``user_primitives`` names the primitives of the user's fn reaches (where a backward written in plain NumPy,
    which autograd cannot differentiate again, may be).
    """

    analytic_source = "autograd (reverse mode with make_vjp, forward mode with make_jvp), with your defvjp/defjvp rules"

    def __init__(self, problem: AutogradProblem, forward_rule: Optional[str] = None,
                 user_primitives: Sequence[str] = (), function: Optional[Flat] = None,
                 outputs: Optional[List[LeafSpec]] = None) -> None:
        super().__init__(problem)
        self.forward_rule = forward_rule
        self.user_primitives = tuple(user_primitives)
        self.function: Flat = function if function is not None else problem.traced
        self.derived = function is not None  # the gradient function of order=2 (evaluated through autograd)
        self._outputs = outputs
        self._undefined: Dict[str, Dict[str, str]] = {"rev": {}, "fwd": {}}
        self._last_mode = "rev"

    @property
    def undefined_gradients(self) -> Dict[str, str]:
        """``{leaf name: reason}`` for the mode whose derivatives were computed last (forward mode raises
        instead, so its record stays empty)."""
        return self._undefined[self._last_mode]

    # --- evaluation ---

    @_process.runs_user_code
    def evaluate(self, points: np.ndarray) -> np.ndarray:
        if not self.derived:
            return self.problem.evaluate(points)
        rows = []
        for k, x in enumerate(points):
            try:
                self.problem.rng.reseed()
                rows.append(np.asarray(getval(self.function(np.array(x, dtype=np.float64))),
                                       dtype=np.float64).reshape(-1))
            except Exception as exc:
                mark_failed_point(exc, k)  # the error names this very evaluation
                raise
        return np.stack(rows)

    # --- reverse mode ---

    def restricted(self, kept: Sequence[int]) -> Tuple[Flat, np.ndarray]:
        """``function`` as a function of the leaves ``kept`` (indices into :attr:`leaves`) only, the others
        held at ``x0`` as plain arrays (autograd does not trace them); and the starting point (those leaves'
        part of ``x0``). The gradient function of ``order=2`` is only ever differentiated in every leaf."""
        x0 = np.array(self.x0, dtype=np.float64)
        if list(kept) == list(range(len(self.leaves))):
            return self.function, x0
        assert not self.derived
        traced = self.problem.traced
        kept = list(kept)
        return (lambda part: traced(part, kept, x0)), np.concatenate([x0[self.leaves[k].slice] for k in kept])

    def scatter(self, kept: Sequence[int], part: Any) -> np.ndarray:
        """A gradient over the leaves ``kept`` as a flat vector over every leaf (zeros for the others)."""
        flat = np.zeros(len(self.x0))
        values = np.asarray(getval(part), dtype=np.float64).reshape(-1)
        start = 0
        for k in kept:
            leaf = self.leaves[k]
            flat[leaf.slice] = values[start:start + leaf.size]
            start += leaf.size
        return flat

    def record(self, kept: Sequence[int]) -> Tuple[Callable[[Any], Any], bool]:
        """One forward pass recorded by autograd at ``x0`` for the leaves ``kept``: the backward function, and
        whether the output depends on those leaves at all."""
        function, start = self.restricted(kept)
        self.problem.rng.reseed()
        backward, _, connected = vjp_of(function, start)
        return backward, connected

    def _vjps(self, cotangents: np.ndarray, kept: Sequence[int]) -> np.ndarray:
        if not kept:
            return np.zeros((len(cotangents), len(self.x0)))
        backward, _ = self.record(kept)
        rows = []
        for cotangent in cotangents:
            self.problem.rng.reseed()
            rows.append(self.scatter(kept, backward(np.array(cotangent, dtype=np.float64))))
        return np.stack(rows)

    def defined(self) -> List[int]:
        """The leaves autograd defines a VJP for (all, unless the first VJP found some without)."""
        return [k for k, leaf in enumerate(self.leaves) if leaf.name not in self._undefined["rev"]]

    @_process.runs_user_code
    def vjp(self, cotangents: np.ndarray) -> np.ndarray:
        self._last_mode = "rev"
        if not self._undefined["rev"]:
            try:
                return self._vjps(cotangents, range(len(self.leaves)))
            except Exception as exc:
                if not missing_vjp(exc):
                    raise
                if self.derived:
                    raise ModeUnsupportedError(f"order=2: autograd has no VJP for an operation the backward pass runs "
                                               f"({first_line(exc)})") from exc
                self._find_undefined(exc)
        return self._vjps(cotangents, self.defined())

    def _find_undefined(self, error: BaseException) -> None:
        """Which leaves autograd defines no VJP for: each leaf differentiated alone (once, on the first VJP)."""
        m = sum(spec.size for spec in self.output_specs)
        for k, leaf in enumerate(self.leaves):
            try:
                self._vjps(np.ones((1, m)), [k])
            except Exception as exc:
                if not missing_vjp(exc):
                    raise
                self._undefined["rev"][leaf.name] = f"autograd: {first_line(exc)}"
        if not self._undefined["rev"]:
            raise error  # no single leaf lacks its VJP (only leaves together do): autograd's error as it is

    # --- forward mode ---

    @_process.runs_user_code
    def jvp(self, tangents: np.ndarray) -> np.ndarray:
        self._last_mode = "fwd"
        rows = []
        for tangent in tangents:
            self.problem.rng.reseed()
            try:
                _, derivative = jvp_of(self.function, np.array(self.x0, dtype=np.float64),
                                       np.array(tangent, dtype=np.float64))
            except Exception as exc:
                if isinstance(exc, GradbridgeError) or not missing_jvp(exc):
                    raise
                raise ModeUnsupportedError(
                    f"forward mode: autograd has no forward-mode (JVP) rule for an operation fn runs "
                    f"({first_line(exc)}); define one with autograd.extend.defjvp, or check reverse mode only "
                    "(analytic='rev')") from exc
            rows.append(np.asarray(getval(derivative), dtype=np.float64).reshape(-1))
        return np.stack(rows)

    # --- order=2 ---

    @_process.runs_user_code
    def gradient_function(self, cotangent: np.ndarray) -> "AutogradPrepared":
        if self._undefined["rev"]:
            raise ModeUnsupportedError(f"order=2: autograd defines no gradient for "
                                       f"{', '.join(self._undefined['rev'])}, so it has no second derivative")
        v = np.array(cotangent, dtype=np.float64)
        first = self.function

        def gradient(x: Any) -> Any:
            backward, _, _ = vjp_of(first, x)
            return backward(v)

        x0 = np.array(self.x0, dtype=np.float64)
        self.problem.rng.reseed()
        try:  # can autograd differentiate the backward pass? (traced once here, at x0)
            second, end, connected = vjp_of(gradient, x0)
            result = second(np.zeros(len(x0)))
        except GradbridgeError:
            raise
        except Exception as exc:
            raise ModeUnsupportedError(
                f"order=2: autograd cannot differentiate the gradient of fn ({type(exc).__name__}: {first_line(exc)}); "
                "a defvjp rule written with plain NumPy calls, in-place writes or np.asarray cannot be differentiated "
                "again: write it with autograd.numpy") from exc
        broken = broken_boxes(end, result, connected, self.user_primitives)
        if broken:
            raise ModeUnsupportedError(f"order=2: autograd cannot differentiate the gradient of fn: {broken}")
        return AutogradPrepared(self.problem, None, self.user_primitives, gradient, gradient_output_specs(self.leaves))
