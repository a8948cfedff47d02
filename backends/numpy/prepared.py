"""The NumPy prepared function: ``fn`` evaluated point by point, its VJPs from the user's hand-written ``grad``.

Invariant: the analytic side is only ever the user's ``grad=`` called at the checked point (``grad(*args)`` for
a scalar ``fn``, ``grad(cotangent, *args)`` otherwise), on copies, after the generators were re-seeded as for
``fn``; what ``grad`` returns is accepted only as one finite gradient per checked leaf of that leaf's shape.
Forward mode and second derivatives do not exist here and say so (ModeUnsupportedError).
"""

from __future__ import annotations

from typing import Any, List, Optional

import numpy as np

from gradbridge import _process
from gradbridge._adapter import LeafSpec, ProblemBackedFunction
from gradbridge._errors import FunctionEvaluationError, ModeUnsupportedError

from ..common.handwritten import call_grad, flat_gradient, scalar_form
from .problem import NumpyProblem


class ArrayPrepared(ProblemBackedFunction):
    """What every prepared function over a :class:`NumpyProblem` shares (NumPy's, autograd's): the problem's
    leaves, point, notes and precision, and evaluation point by point."""

    def __init__(self, problem: NumpyProblem) -> None:
        self.problem = problem
        self._outputs: Optional[List[LeafSpec]] = None  # the problem's outputs (ProblemBackedFunction)

    @property
    def spec(self) -> Any:
        return self.problem.spec

    @property
    def leaves(self) -> List[LeafSpec]:
        return self.problem.leaves

    @property
    def x0(self) -> np.ndarray:
        return self.problem.x0

    @x0.setter
    def x0(self, value: np.ndarray) -> None:  # gb.compare sets the parameters' values before evaluating
        self.problem.x0 = value

    @property
    def notes(self) -> List[str]:
        return self.problem.notes

    @property
    def working_eps(self) -> Optional[float]:
        return self.problem.working_eps

    @_process.runs_user_code
    def evaluate(self, points: np.ndarray) -> np.ndarray:
        return self.problem.evaluate(points)


class NumpyPrepared(ArrayPrepared):
    """A NumPy function (and its ``grad``) over the flat float64 vector of checked leaves."""

    analytic_source = "the grad= function you passed (hand-written)"

    def _gradients(self, result: Any) -> np.ndarray:
        """Turn ``grad``'s return value into one flat vector over the checked leaves, checking shapes."""
        problem = self.problem
        items = list(result) if isinstance(result, (list, tuple)) else [result]
        floating = [i for i, c in enumerate(problem.candidates) if c.floating]
        if len(items) == len(problem.chosen):
            mapping = list(problem.chosen)
        elif len(items) == len(floating):
            mapping = floating
        else:
            expected = ", ".join(leaf.name for leaf in problem.leaves)
            raise FunctionEvaluationError(
                f"grad: returned {len(items)} gradient(s), expected {len(problem.chosen)}, one per checked "
                f"argument ({expected}), in argument order")
        by_candidate = dict(zip(mapping, items))
        flat = []
        for leaf, i in zip(problem.leaves, problem.chosen):
            flat.append(flat_gradient(by_candidate[i], leaf, _as_array, "an array"))
        return np.concatenate(flat)

    @_process.runs_user_code
    def vjp(self, cotangents: np.ndarray) -> np.ndarray:
        problem, spec = self.problem, self.problem.spec
        outputs = self.output_specs
        if scalar_form(outputs, spec.grad, len(spec.args), spec.kwargs):
            problem.rng.reseed()
            gradient = self._gradients(call_grad(lambda: spec.grad(*problem.arguments(self.x0), **spec.kwargs),
                                                 "grad(*args)"))
            return cotangents[:, :1] * gradient[None, :]
        rows = []
        for cotangent in cotangents:
            blocks = [cotangent[out.slice].reshape(out.shape) for out in outputs]
            if not spec.promote:  # the cotangent in the dtype of the output it belongs to
                blocks = [b.astype(d) if d != np.float64 else b for b, d in zip(blocks, problem.output_dtypes)]
            structured = problem.output_rebuild(blocks)
            problem.rng.reseed()
            result = call_grad(lambda: spec.grad(structured, *problem.arguments(self.x0), **spec.kwargs),
                               "grad(cotangent, *args)")
            rows.append(self._gradients(result))
        return np.stack(rows)

    def jvp(self, tangents: np.ndarray) -> np.ndarray:
        raise ModeUnsupportedError("forward mode: a NumPy grad= gives reverse-mode gradients only")

    def gradient_function(self, cotangent: np.ndarray) -> "NumpyPrepared":
        raise ModeUnsupportedError("order=2 needs second derivatives, which a NumPy grad= function does not provide")


def _as_array(item: Any) -> np.ndarray:
    """A gradient ``grad`` returned, as a float64 (or, for a complex leaf, complex128) array."""
    array = np.asarray(item)
    return array.astype(np.complex128 if np.iscomplexobj(array) else np.float64)
