"""The NumPy prepared function: ``fn`` evaluated point by point, its VJPs from the user's hand-written ``grad``.

Invariant: the analytic side is only ever the user's ``grad=`` called at the checked point (``grad(*args)`` for
a scalar ``fn``, ``grad(cotangent, *args)`` otherwise), on copies, after the generators were re-seeded as for
``fn``; what ``grad`` returns is accepted only as one finite gradient per checked leaf of that leaf's shape.
Forward mode and second derivatives do not exist here and say so (ModeUnsupportedError).
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import numpy as np

from gradbridge import _process
from gradbridge._adapter import LeafSpec, ProblemBackedFunction
from gradbridge._errors import FunctionEvaluationError, GradbridgeError, ModeUnsupportedError

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
        return self._vjp_with(cotangents, lambda: self.problem.arguments(self.x0))

    def _vjp_with(self, cotangents: np.ndarray, arguments: Callable[[], tuple]) -> np.ndarray:
        """``grad`` at the arguments ``arguments()`` builds (fresh for each call), one row per cotangent."""
        problem, spec = self.problem, self.problem.spec
        outputs = self.output_specs
        if scalar_form(outputs, spec.grad, len(spec.args), spec.kwargs):
            problem.rng.reseed()
            gradient = self._gradients(call_grad(lambda: spec.grad(*arguments(), **spec.kwargs), "grad(*args)"))
            return cotangents[:, :1] * gradient[None, :]
        rows = []
        for cotangent in cotangents:
            blocks = [cotangent[out.slice].reshape(out.shape) for out in outputs]
            if not spec.promote:  # the cotangent in the dtype of the output it belongs to
                blocks = [b.astype(d) if d != np.float64 else b for b, d in zip(blocks, problem.output_dtypes)]
            structured = problem.output_rebuild(blocks)
            problem.rng.reseed()
            result = call_grad(lambda: spec.grad(structured, *arguments(), **spec.kwargs), "grad(cotangent, *args)")
            rows.append(self._gradients(result))
        return np.stack(rows)

    @_process.runs_user_code
    def strided_variants(self, cotangent: np.ndarray, thorough: bool = False) -> List[Tuple[str, Any]]:
        """fn and ``grad`` with the checked arrays contiguous and laid out non-contiguously (Fortran order for two
        or more axes, every other element of a buffer for vectors) or expanded (a read-only stride-0 first axis, at
        the point whose rows equal the first), for the memory-layout contract (see
        :class:`gradbridge._adapter.StridedInputs`): a compiled kernel behind fn or grad (C, Cython, numba,
        ctypes) that assumes C order is wrong only on such arrays, which NumPy code passes all the time."""
        problem = self.problem
        if any(problem.leaf_complex):
            raise ModeUnsupportedError("memory layouts are checked for real arrays")
        found: List[Tuple[str, Any]] = []
        for layout, make in (("non-contiguous", _non_contiguous), ("expanded", _expanded)):
            values = [make(self.x0[leaf.slice].reshape(leaf.shape)) for leaf in problem.leaves]
            if all(value is None for value in values):
                continue
            point = self.x0.copy()
            for leaf, value in zip(problem.leaves, values):
                if value is not None:  # expanded: the point whose rows all equal the first
                    point[leaf.slice] = np.ascontiguousarray(value).reshape(-1)

            def laid_out(x: Any, leaf: LeafSpec, dtype: np.dtype, _values=values) -> np.ndarray:
                value = _values[problem.leaves.index(leaf)]
                return (x[leaf.slice].reshape(leaf.shape) if value is None else value).astype(dtype, copy=False)

            reference = (problem.call(point), self._vjp_with(cotangent[None, :], lambda: problem.arguments(point))[0])
            try:
                problem.rng.reseed()
                outputs = problem.call_with(problem.arguments(point, laid_out))
                found.append((layout, (reference, (outputs, self._vjp_with(
                    cotangent[None, :], lambda: problem.arguments(point, laid_out))[0]))))
            except GradbridgeError:
                raise
            except Exception as exc:  # fn or grad refuses such arrays (writes a read-only view, needs C order)
                found.append((layout, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"))
        return found

    def jvp(self, tangents: np.ndarray) -> np.ndarray:
        raise ModeUnsupportedError("forward mode: a NumPy grad= gives reverse-mode gradients only")

    def gradient_function(self, cotangent: np.ndarray) -> "NumpyPrepared":
        raise ModeUnsupportedError("order=2 needs second derivatives, which a NumPy grad= function does not provide")


def _as_array(item: Any) -> np.ndarray:
    """A gradient ``grad`` returned, as a float64 (or, for a complex leaf, complex128) array."""
    array = np.asarray(item)
    return array.astype(np.complex128 if np.iscomplexobj(array) else np.float64)


def _non_contiguous(value: np.ndarray) -> Optional[np.ndarray]:
    """``value`` stored non-contiguously: Fortran order (two or more axes), or every other element of a buffer
    (one axis); None for a scalar or a single element."""
    if value.size < 2:
        return None
    if value.ndim >= 2:
        return np.asfortranarray(value)
    buffer = np.zeros(value.size * 2, dtype=value.dtype)
    buffer[::2] = value.reshape(-1)
    return buffer[::2].reshape(value.shape)


def _expanded(value: np.ndarray) -> Optional[np.ndarray]:
    """``value``'s first row broadcast along its first axis (stride 0, read-only); None where that axis has one
    element."""
    if value.ndim == 0 or value.shape[0] < 2:
        return None
    return np.broadcast_to(value[:1], value.shape)
