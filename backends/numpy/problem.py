"""The NumPy "problem": which arrays are checked, how ``fn`` is called on them, and the RNG window around it.

Invariant: ``fn`` only ever receives copies (checked leaves taken from the flat point, float64 unless
``promote=False`` keeps each leaf's own dtype; every other array copied), so nothing of the user's is modified;
every call into user code is preceded by re-seeding NumPy's and Python's global generators, and those
generators are the user's again once :attr:`NumpyProblem.window` closes. The outputs' layout is fixed by the
first evaluation and every later one is laid out the same way.

Also used by the autograd backend (autograd's arrays are NumPy arrays): :func:`build_problem` lays out the
arguments, :class:`NumpyProblem` calls ``fn`` on plain arrays. The one optional import (``ml_dtypes``'
bfloat16, which NumPy lacks) is a dtype lookup in :func:`bfloat16`; the backend needs no other compatibility
shim.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, List, Optional, Sequence, Type

import numpy as np

from gradbridge import _process
from gradbridge._adapter import CheckSpec, LeafSpec
from gradbridge._checking.evaluate import mark_failed_point
from gradbridge._errors import FunctionEvaluationError, GradbridgeError, InvalidArgumentError
from gradbridge._tree import flatten

from ..common.layout import Candidate, Unchecked, argument_candidates, layout_leaves, promotion_notes, unchecked_notes
from ..common.lowprec import low_precision_names, own_precision, promotion_hint, refresh_note
from ..common.complex import complex_from_view, real_view_array
from ..common.outputs import output_leaves, output_specs
from ..common.rng import SharedRandomState


def is_array(value: Any) -> bool:
    return isinstance(value, (np.ndarray, np.generic))


def is_output(value: Any) -> bool:
    return isinstance(value, (np.ndarray, np.generic, float, int))


def bfloat16() -> Any:
    """ml_dtypes' bfloat16 (NumPy has none), or None where ml_dtypes is not installed."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return ml_dtypes.bfloat16


def floating(value: Any) -> bool:
    dtype = np.asarray(value).dtype
    if np.issubdtype(dtype, np.floating):
        return True
    bf16 = bfloat16() if dtype.name == "bfloat16" else None  # ml_dtypes' types are no np.floating
    return bf16 is not None and dtype == np.dtype(bf16)


class NumpyProblem:
    """A NumPy function over the flat float64 vector of checked leaves: layout, calls, outputs, RNG window."""

    def __init__(self, spec: CheckSpec, candidates: List[Candidate], leaves: List[LeafSpec], chosen: List[int],
                 rebuild_args: Callable[[Sequence[Any]], tuple]) -> None:
        self.spec = spec
        self.candidates = candidates
        self.leaves = leaves
        self.chosen = chosen
        self.rebuild_args = rebuild_args
        self.x0 = np.concatenate([(real_view_array(candidates[i].value) if _is_complex(candidates[i].value)
                                   else np.asarray(candidates[i].value, dtype=np.float64)).ravel() for i in chosen])
        # checked complex leaves: fn gets the complex array whose real view the leaf is (see ..common.complex)
        self.leaf_complex = [_is_complex(candidates[i].value) for i in chosen]
        self.rng = SharedRandomState(spec.seed)
        # around every call into the user's code: NumPy's and Python's generators re-seeded inside and put
        # back on the way out, under the one lock (gradbridge._process)
        self.window = _process.Window(self.rng.preserved)
        self.outputs: Optional[List[LeafSpec]] = None
        self.output_dtypes: List[np.dtype] = []
        self.output_rebuild: Optional[Callable[[List[np.ndarray]], Any]] = None
        # promote=True: checked leaves are float64 copies; False: copies in each leaf's own dtype
        self.leaf_dtypes = [np.dtype(np.float64) if spec.promote else _real_dtype(np.asarray(candidates[i].value).dtype)
                            for i in chosen]
        self.working_eps: Optional[float]
        if spec.promote:
            self.notes = promotion_notes(leaves)
            self.working_eps = None
            self.low = low_precision_names([(leaf.name, leaf.dtype) for leaf in leaves])
        else:
            self.working_eps, note = own_precision(leaves)
            self.notes = [note] if note else []
            self.low = ""

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """The whole check: nothing process-wide changes here, only in :attr:`window`."""
        yield

    def arguments(self, x: Any, leaf_value: Optional[Callable[[Any, LeafSpec, np.dtype], Any]] = None) -> tuple:
        """The user's arguments with checked leaves taken from ``x`` (float64) and copies of the rest;
        ``leaf_value(x, leaf, dtype)`` builds a checked leaf instead where given (autograd's traced leaves)."""
        values = [np.array(c.value, copy=True) for c in self.candidates]
        for leaf, i, dtype, complex_view in zip(self.leaves, self.chosen, self.leaf_dtypes, self.leaf_complex):
            if leaf_value is not None:
                values[i] = leaf_value(x, leaf, dtype)
                continue
            value = x[leaf.slice].reshape(leaf.shape).astype(dtype)  # exact: the core rounded x to dtype
            values[i] = complex_from_view(value).astype(np.result_type(dtype, np.complex64)) if complex_view else value
        values = [v if isinstance(c.value, np.ndarray) else (v[()] if isinstance(v, np.ndarray) else v)
                  for v, c in zip(values, self.candidates)]
        return self.rebuild_args(values)

    def call(self, x: np.ndarray) -> np.ndarray:
        """``fn`` at ``x``: its floating outputs as one flat float64 vector (the first call fixes the layout)."""
        self.rng.reseed()
        try:
            result = self.spec.fn(*self.arguments(x), **self.spec.kwargs)
        except Exception as exc:
            if self.low and not isinstance(exc, GradbridgeError) and np.array_equal(x, self.x0):
                # fn fails on the float64 copies at the user's own point: it may only run in its own dtypes
                raise FunctionEvaluationError(f"fn raised {type(exc).__name__} at the unperturbed input: {exc}. "
                                              f"{promotion_hint(self.low)}") from exc
            raise
        return self.flat_outputs(result)

    def call_with(self, arguments: tuple) -> np.ndarray:
        """``fn`` on arguments built by :meth:`arguments` (laid out as the caller chose), its outputs flat."""
        self.rng.reseed()
        return self.flat_outputs(self.spec.fn(*arguments, **self.spec.kwargs))

    def flat_outputs(self, result: Any) -> np.ndarray:
        """fn's floating outputs as one flat float64 vector (the first call fixes the layout)."""
        all_leaves = output_leaves(result, is_output)
        is_float = [floating(leaf.value) or _is_complex(leaf.value) for leaf in all_leaves]
        leaves = [leaf for leaf, f in zip(all_leaves, is_float) if f]
        if not leaves:
            described = type(result).__name__
            if isinstance(result, np.ndarray):
                described = f"an array of dtype {result.dtype}"
            raise FunctionEvaluationError(f"fn: expected a float or a floating-point NumPy array (or a tuple/list/"
                                          f"dict of them) as output, got {described}")
        # complex outputs as their real views
        arrays = [real_view_array(leaf.value) if _is_complex(leaf.value) else np.asarray(leaf.value, dtype=np.float64)
                  for leaf in leaves]
        if self.outputs is None:
            self.outputs = output_specs([(l.path, a.shape, str(np.asarray(l.value).dtype))
                                         for l, a in zip(leaves, arrays)])
            self.output_dtypes = [_real_dtype(np.asarray(l.value).dtype) for l in leaves]
            output_complex = [_is_complex(l.value) for l in leaves]
            _, rebuild = flatten(result, "out", is_output)
            # non-floating outputs (indices, counts) get zero cotangents of their own shape
            constants = [None if f else np.zeros(np.shape(leaf.value)) for leaf, f in zip(all_leaves, is_float)]

            def rebuild_cotangent(blocks: List[np.ndarray]) -> Any:
                # a complex output's cotangent in gradbridge's convention: dL/dRe y + i dL/dIm y
                supply = iter([complex_from_view(b) if c else b for b, c in zip(blocks, output_complex)])
                return rebuild([next(supply) if c is None else c for c in constants])

            self.output_rebuild = rebuild_cotangent
        return np.concatenate([a.ravel() for a in arrays])

    def evaluate(self, points: np.ndarray) -> np.ndarray:
        """``fn`` at each of the (k, n) points, one call each (the caller holds :attr:`window`)."""
        first = self.outputs is None
        rows = []
        for k, x in enumerate(points):
            try:
                rows.append(self.call(x))
            except Exception as exc:
                mark_failed_point(exc, k)  # the error names this very evaluation
                raise
        result = np.stack(rows)
        if first and not self.spec.promote:  # the outputs' dtypes are known now
            refresh_note(self.notes, self.leaves, self.outputs)
        return result


def _is_complex(value: Any) -> bool:
    return np.iscomplexobj(value) and not isinstance(value, (str, bytes))


def _real_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype of a complex dtype's parts; any other dtype unchanged."""
    return np.dtype(dtype).type(0).real.dtype if np.issubdtype(dtype, np.complexfloating) else np.dtype(dtype)


def build_problem(spec: CheckSpec, who: str = "the NumPy backend", kind: Type[NumpyProblem] = NumpyProblem
                  ) -> NumpyProblem:
    """The problem of a check of NumPy code: every NumPy array in the arguments a candidate, ``wrt=`` applied,
    the unchecked ones noted. ``who`` names the backend in messages and ``kind`` is the problem's class (the
    autograd backend shares this)."""
    if spec.params is not None:
        raise InvalidArgumentError(f"params: {who} has no modules; pass parameters as arguments")
    unchecked: List[Unchecked] = []
    candidates, rebuild_args = argument_candidates(
        spec.args, spec.arg_names, is_array,
        lambda v: (np.shape(v), str(np.asarray(v).dtype), floating(v)), unchecked=unchecked,
        native=f"{who} checks NumPy arrays: pass np.asarray(...) to check it", complex_inputs=True)
    leaves, chosen = layout_leaves(candidates, spec.wrt, unchecked)
    problem = kind(spec, candidates, leaves, chosen, rebuild_args)
    problem.notes.extend(unchecked_notes(candidates, chosen, unchecked))
    return problem
