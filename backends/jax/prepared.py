"""The prepared JAX function: evaluations, VJPs, JVPs, transposed VJPs and the gradient function of one check.

Invariant: every operation takes the compiled path (:mod:`.compiled`) where it may run and gives a result, and
otherwise the eager path (:mod:`.eager`), chosen in one place (:meth:`JaxPrepared._compiled_may_run`,
:meth:`JaxPrepared._run`); both paths compute the same numbers from the same derivative of fn, so which one ran
never changes a verdict. Every call into the user's code runs inside the problem's window, and one that leaves
tracers in fn's state starts again on the eager path; a leaf without a derivative is recorded in
``undefined_gradients`` for the mode whose derivative was computed last, never reported as a silent zero.
"""

from __future__ import annotations

import dataclasses

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from gradbridge import _process
from gradbridge._adapter import (EditedEvaluation, ForwardRules, LeafSpec, ProblemBackedFunction, TransposedProducts,
                                 UndefinedGradients, WorkingPrecision)
from gradbridge._errors import CostlyProbeSkipped, ModeUnsupportedError

from ..common.layout import promotion_notes
from ..common.lowprec import own_precision, refresh_note
from ..common.outputs import gradient_output_specs, output_specs
from .batching import COMPILED, choices
from .compiled import Compiled, CompiledPath, Results
from .derivatives import FORWARD_UNSUPPORTED_HINTS, NO_DERIVATIVE_HINTS, first_line, mentions
from .eager import EagerPath, eager_on_leak
from .problem import JaxProblem
from .x64 import plumbing_dtype


class JaxPrepared(ProblemBackedFunction, WorkingPrecision, UndefinedGradients, TransposedProducts, EditedEvaluation,
                  ForwardRules):
    """A JAX function of the checked leaves (one array per leaf, in leaf order) to a flat float64 output."""

    analytic_source = "JAX autodiff (jax.vjp / jax.linearize: your custom_vjp / custom_jvp rules and JAX's own)"
    #: No forward-mode rule that reverse mode never runs: JAX's reverse mode of a custom_jvp function transposes
    #: the user's jvp rule, and a custom_vjp function has no forward mode at all: None.
    forward_rule: Optional[str] = None

    def __init__(self, problem: JaxProblem, function: Callable[..., jax.Array], x0: np.ndarray,
                 outputs: Optional[List[LeafSpec]] = None,
                 compiled: Optional[Callable[[], Tuple[Compiled, Any]]] = None) -> None:
        self.problem = problem
        self.function = function  # of the checked parts, for the eager path
        self._compiled = compiled  # the compiled pieces kept across checks, and their extra arguments
        self.leaves = problem.leaves
        self.x0 = x0
        if problem.promote:
            self.notes = promotion_notes(problem.leaves)
            self.working_eps: Optional[float] = None
        else:
            self.working_eps, note = own_precision(problem.leaves)
            self.notes = [note] if note else []
        self._undefined: Dict[str, Dict[str, str]] = {"rev": {}, "fwd": {}}
        self._last_mode = "rev"
        self._outputs = outputs
        self._paths = choices(self.notes)  # compiled or eager; batched or the loop (see .batching)
        self.compiled_path = CompiledPath(self, compiled) if compiled is not None else None
        self.eager_path = EagerPath(self, self._paths)

    @property
    def undefined_gradients(self) -> Dict[str, str]:
        """``{leaf name: reason}`` for the mode (reverse or forward) whose derivative was computed last.

        JAX may define one mode and not the other for the same input (``while_loop`` has forward mode but
        no reverse mode), while the core reads one dict per check; it reads it right after computing the
        rows' derivatives, so answering for the latest mode gives each row the record of its own mode.
        """
        return self._undefined[self._last_mode]

    def record_undefined(self, mode: str, undefined: Dict[str, str], replace: bool = False) -> None:
        """Record leaves without a derivative in ``mode`` (a reason already recorded stays, unless ``replace``)."""
        for name, reason in undefined.items():
            if replace:
                self._undefined[mode][name] = reason
            else:
                self._undefined[mode].setdefault(name, reason)

    # --- what both paths use ---

    def flat(self, x: jax.Array) -> jax.Array:
        return self.function(*self.problem.split(x))

    def parts0(self) -> List[jax.Array]:
        return self.problem.split(jnp.asarray(self.x0, dtype=plumbing_dtype()))

    def output_size(self) -> int:
        return sum(spec.size for spec in self.output_specs)

    def zero_cotangent(self, _: List[int]) -> Sequence[jax.Array]:
        """The probe input of the VJP maps: one zero cotangent."""
        return [jnp.zeros(self.output_size(), dtype=plumbing_dtype())]

    def zero_tangents(self, indices: List[int]) -> Sequence[jax.Array]:
        """The probe inputs of the JVP maps: one zero tangent per leaf."""
        return [jnp.zeros(self.leaves[k].shape, dtype=plumbing_dtype()) for k in indices]

    def _note(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)

    # --- the one place a path is chosen ---

    def _eager(self) -> bool:
        """Whether fn is stateful (see :mod:`.state`): evaluated point by point and differentiated eagerly (the
        ``compiled`` decision, said once with the reason)."""
        if self.problem.eager_reason is None and self._compiled is not None:
            self._compiled()  # the entry kept from an earlier check may know it already
        if self.problem.eager():
            choice = self._paths[COMPILED]
            if not choice.looped:
                choice.use_loop(self.problem.eager_reason or "")
            return True
        return False

    def _compiled_may_run(self, operation: str) -> bool:
        """Whether the compiled path may run ``operation``: there is a compiled entry, fn keeps no state, and the
        eager path has not taken over the computation in this check (its evaluations are point by point, or its
        derivative maps of that mode are built)."""
        if self.compiled_path is None:
            return False
        if operation in ("evaluate", "evaluate_edits"):
            return not self.eager_path.looped and not self._eager()
        built = self.eager_path.pushforwards if operation == "jvp" else self.eager_path.pullbacks
        if operation != "gradient" and built is not None:
            return False
        return not self._eager()

    def _run(self, operation: str, *args: Any) -> Any:
        """``operation`` on the compiled path where it may run and gives a result, else on the eager path."""
        if self._compiled_may_run(operation):
            result = getattr(self.compiled_path, operation)(*args)
            if result is not None:
                return result
        return getattr(self.eager_path, operation)(*args)

    # --- the prepared function's operations ---

    @_process.runs_user_code
    @eager_on_leak
    def differentiated_primal(self) -> np.ndarray:
        """The primal output ``jax.vjp`` returns at ``x0``: what a ``custom_vjp``'s ``fwd`` (or a ``custom_jvp``
        rule's primal output) computes, for the contract check that it equals ``fn(x0)``."""
        if self.compiled_path is not None and not self._paths[COMPILED].looped:
            primal = self.compiled_path.differentiated_primal(jnp.asarray(self.x0, dtype=plumbing_dtype()))
            if primal is not None:
                return primal
        self.problem.rng.reseed()
        try:
            primal, _ = jax.vjp(self.function, *self.parts0())
        except Exception as exc:  # an input JAX cannot differentiate: its rows say so ("no gradient")
            if mentions(exc, NO_DERIVATIVE_HINTS) or mentions(exc, FORWARD_UNSUPPORTED_HINTS):
                raise ModeUnsupportedError(f"jax.vjp cannot differentiate fn ({first_line(exc)})") from exc
            raise
        return np.asarray(primal, dtype=np.float64)

    @_process.runs_user_code
    def compiled_and_eager(self, cotangents: np.ndarray, thorough: bool = False
                           ) -> Tuple[Tuple[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray], str]:
        """For a ``jax.jit`` fn: its outputs and VJPs at ``x0`` through the jitted function (one XLA computation,
        fused) and through the Python function it wraps, traced op by op (see
        :class:`gradbridge._adapter.CompiledFunction`). Only when ``thorough``: ``jax.vjp`` of the jitted function
        compiles anew for each new function (about 100 ms, a third of a cold check)."""
        problem = self.problem
        fn = problem.spec.fn
        original = getattr(fn, "__wrapped__", None)
        if not callable(getattr(fn, "lower", None)) or not callable(original):
            raise ModeUnsupportedError("fn is not a jax.jit function")
        if not thorough:
            raise CostlyProbeSkipped("comparing the jitted function with its Python function compiles jax.vjp of it "
                                     "anew (about 100 ms, a third of a cold check)")
        results = []
        try:
            for variant in (fn, original):
                problem.spec = dataclasses.replace(problem.spec, fn=variant)
                problem.rng.reseed()
                out, pullback = jax.vjp(self.function, *self.parts0())
                rows = [np.concatenate([np.asarray(g, dtype=np.float64).reshape(-1)
                                        for g in pullback(jnp.asarray(v, dtype=out.dtype))]) for v in cotangents]
                results.append((np.asarray(out, dtype=np.float64), np.stack(rows)))
        finally:
            problem.spec = dataclasses.replace(problem.spec, fn=fn)
        return results[0], results[1], ""

    @_process.runs_user_code
    @eager_on_leak
    def evaluate(self, points: np.ndarray) -> np.ndarray:
        x = jnp.asarray(points, dtype=plumbing_dtype())
        self._eager()  # a stateful fn is said in the notes before anything runs
        result = self._run("evaluate", points, x)
        if not self.problem.promote and self._outputs is None:  # the outputs' dtypes are known now
            refresh_note(self.notes, self.leaves, self.output_specs)
        if self.problem.promote and self.problem.low_precision_outputs:
            self._note(f"fn computes {', '.join(self.problem.low_precision_outputs)} below float64: "
                       "the check's precision is limited by that")
        return result

    @_process.runs_user_code
    @eager_on_leak
    def evaluate_edits(self, positions: np.ndarray, values: np.ndarray) -> np.ndarray:
        """``evaluate`` of the copies of ``x0`` with element ``positions[k]`` set to ``values[k]``; once the
        compiled evaluation has run, the points are built inside it (no NumPy points to write and copy)."""
        return self._run("evaluate_edits", positions, values)

    @_process.runs_user_code
    @eager_on_leak
    def vjp(self, cotangents: np.ndarray) -> np.ndarray:
        self._last_mode = "rev"
        v = jnp.asarray(cotangents, dtype=plumbing_dtype())
        gradients = np.zeros((len(v), len(self.x0)))
        for indices, pulled in self._run("vjp", v):
            for k, g in zip(indices, pulled):
                gradients[:, self.leaves[k].slice] = np.asarray(g, dtype=np.float64).reshape(len(v), -1)
        return gradients

    @_process.runs_user_code
    @eager_on_leak
    def vjp_transposed(self, tangents: np.ndarray) -> np.ndarray:
        """``J t`` for each row of the (k, n) ``tangents``: (k, m), with ``J`` exactly the Jacobian :meth:`vjp`
        implements (custom_vjp bwd rules included), never forward-mode rules: the VJP ``u -> J^T u`` at
        ``x0`` transposed with ``jax.linear_transpose``, vmapped and jitted, compiled once per cache entry
        like the VJP maps. Leaves without a reverse-mode derivative get zero columns, as :meth:`vjp` gives
        them zero rows. Raises ModeUnsupportedError where JAX cannot transpose the VJP (a bwd not linear in
        its cotangent, a pure_callback applied to it)."""
        self._last_mode = "rev"
        t = jnp.asarray(np.asarray(tangents, dtype=np.float64).reshape(len(tangents), -1), dtype=plumbing_dtype())
        pushed = np.zeros((len(t), self.output_size()))
        return self._sum(pushed, self._run("vjp_transposed", self._leaf_rows(t)))

    @_process.runs_user_code
    @eager_on_leak
    def jvp(self, tangents: np.ndarray) -> np.ndarray:
        self._last_mode = "fwd"
        u = jnp.asarray(tangents, dtype=plumbing_dtype())
        pushed = np.zeros((len(u), self.output_size()))
        return self._sum(pushed, self._run("jvp", self._leaf_rows(u)))

    def _leaf_rows(self, rows: jax.Array) -> Callable[[List[int]], List[jax.Array]]:
        """The (k, n) ``rows`` cut into one (k, *shape) array per leaf of a group."""

        def parts(indices: List[int]) -> List[jax.Array]:
            return [jnp.reshape(rows[:, self.leaves[k].slice], (len(rows),) + self.leaves[k].shape) for k in indices]
        return parts

    @staticmethod
    def _sum(pushed: np.ndarray, results: Results) -> np.ndarray:
        """``pushed`` (k, m zeros) plus the leaf groups' products."""
        for _, result in results:
            pushed += np.asarray(result, dtype=np.float64).reshape(len(pushed), -1)
        return pushed

    @_process.runs_user_code
    @eager_on_leak
    def tangent_function(self, tangent: np.ndarray) -> "JaxPrepared":
        """The function ``x -> J(x) t`` (forward mode, ``jax.jvp``: a ``custom_jvp`` rule runs, a ``custom_vjp``
        cannot) as a new prepared function, for a derivative level built in forward mode (``analytic="fwd"`` at
        order 2 is forward-over-forward). Evaluated and differentiated eagerly."""
        t = jnp.asarray(tangent, dtype=plumbing_dtype())
        tangents = tuple(self.problem.split(t))
        first = self.function

        def pushed(*parts: jax.Array) -> jax.Array:
            return jax.jvp(first, tuple(parts), tangents)[1]

        try:
            jax.eval_shape(pushed, *self.parts0())
        except Exception as exc:
            if mentions(exc, NO_DERIVATIVE_HINTS) or mentions(exc, FORWARD_UNSUPPORTED_HINTS):
                raise ModeUnsupportedError(f"JAX cannot run fn in forward mode: {first_line(exc)}") from exc
            raise
        outputs = output_specs([(f"jvp[{spec.name}]", spec.shape, "float64") for spec in self.output_specs])
        return JaxPrepared(self.problem, pushed, self.x0, outputs=outputs)

    def gradient_function(self, cotangent: np.ndarray) -> "JaxPrepared":
        v = jnp.asarray(cotangent, dtype=plumbing_dtype())
        first = self.function

        def gradient(*parts: jax.Array) -> jax.Array:
            pulled = jax.vjp(first, *parts)[1](v)
            return jnp.concatenate([jnp.ravel(g) for g in pulled])

        parts0 = self.parts0()
        zeros = jnp.zeros(len(self.x0), dtype=plumbing_dtype())
        compiled = None
        error: Optional[BaseException] = None
        probed = False
        if self._compiled_may_run("gradient"):
            compiled, probed, error = self.compiled_path.gradient(v, parts0, zeros)  # type: ignore[union-attr]
        if not probed:
            error = self.eager_path.gradient_error(gradient, parts0, zeros)
        if error is not None:
            raise ModeUnsupportedError(
                f"order=2: JAX cannot differentiate the gradient of fn: {first_line(error)}") from error
        outputs = gradient_output_specs(self.leaves)
        return JaxPrepared(self.problem, gradient, self.x0, outputs=outputs, compiled=compiled)
