"""The autograd "problem": the NumPy backend's problem, plus ``fn`` as one traceable function of the flat point.

Invariant: autograd arrays are NumPy arrays, so evaluation is exactly the NumPy backend's (copies in, the RNG
window around every call, the output layout fixed by the first evaluation); :meth:`AutogradProblem.traced` is
the same computation written so autograd can trace it: checked leaves cut from the flat vector (a box while
autograd traces), cast to each leaf's dtype and the floating outputs cast back to float64 by a primitive with
both a VJP and a JVP, laid out exactly as the evaluation lays them out (anything else raises).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import autograd.numpy as anp
from autograd.extend import defjvp, defvjp, primitive

from gradbridge._adapter import CheckSpec, LeafSpec
from gradbridge._errors import FunctionEvaluationError

from gradbridge._complex import is_complex_dtype

from ..common.outputs import output_leaves
from ..numpy.problem import NumpyProblem, build_problem, floating, is_output
from .compat import getval, isbox


@primitive
def cast(value: Any, dtype: Any) -> Any:
    """``value.astype(dtype)`` with reverse- and forward-mode rules (autograd's own ``astype`` has no JVP)."""
    return np.asarray(value).astype(dtype)


defvjp(cast, lambda ans, value, dtype: lambda g: cast(g, np.asarray(value).dtype))
defjvp(cast, lambda g, ans, value, dtype: cast(g, dtype))


def _traced_output(value: Any) -> bool:
    return isbox(value) or is_output(value)


class AutogradProblem(NumpyProblem):
    """:class:`NumpyProblem` whose ``fn`` autograd can also trace through :meth:`traced`."""

    def traced(self, x: Any, kept: Optional[Sequence[int]] = None, base: Optional[np.ndarray] = None) -> Any:
        """``fn`` at ``x`` (a float64 vector, or autograd's box of one) as the flat float64 vector of its
        floating outputs, in the layout of :attr:`outputs` (known from the first evaluation).

        With ``kept`` (indices into :attr:`leaves`), ``x`` holds only those leaves, one after the other, and
        the others are plain copies of their part of ``base``: autograd then traces those leaves alone."""
        expected = self.outputs
        if expected is None:
            raise RuntimeError("the outputs' layout is known after the first evaluation")
        where: Dict[int, int] = {}  # leaf offset in the full vector -> its offset in x
        start = 0
        for k in (range(len(self.leaves)) if kept is None else kept):
            where[self.leaves[k].offset] = start
            start += self.leaves[k].size

        def leaf_value(x: Any, leaf: LeafSpec, dtype: np.dtype) -> Any:
            if leaf.offset in where:
                at = where[leaf.offset]
                part = anp.reshape(x[at:at + leaf.size], leaf.shape)
            else:
                assert base is not None
                part = np.array(base[leaf.slice], dtype=np.float64).reshape(leaf.shape)
            part = part if dtype == np.float64 else cast(part, dtype)
            if is_complex_dtype(leaf.dtype):  # the complex value of a complex leaf's real view
                part = part[..., 0] + 1j * part[..., 1]
            return part

        result = self.spec.fn(*self.arguments(x, leaf_value), **self.spec.kwargs)
        leaves = [leaf for leaf in output_leaves(result, _traced_output)
                  if floating(getval(leaf.value)) or np.iscomplexobj(getval(leaf.value))]
        found = [(leaf.path, tuple(np.shape(getval(leaf.value))) + ((2,) if np.iscomplexobj(getval(leaf.value)) else ()))
                 for leaf in leaves]
        if found != [(spec.name, spec.shape) for spec in expected]:
            raise FunctionEvaluationError(
                "fn: returned outputs of other names or shapes while autograd traced it "
                f"({', '.join(f'{n} {s}' for n, s in found) or 'no floating output'}) than when it was evaluated "
                f"({', '.join(f'{s.name} {s.shape}' for s in expected)}); fn must return the same structure "
                "whether or not it is differentiated")
        parts: List[Any] = []
        for leaf in leaves:
            value = leaf.value
            if np.iscomplexobj(getval(value)):  # its real view (autograd applies its own convention)
                value = anp.stack([anp.real(value), anp.imag(value)], axis=-1)
            if np.asarray(getval(value)).dtype != np.float64:
                value = cast(value, np.float64)
            parts.append(anp.ravel(value))
        return anp.concatenate(parts)


def build_autograd_problem(spec: CheckSpec) -> AutogradProblem:
    """The NumPy backend's layout of the arguments (:func:`build_problem`), as an :class:`AutogradProblem`."""
    problem = build_problem(spec, who="the autograd backend", kind=AutogradProblem)
    assert isinstance(problem, AutogradProblem)
    return problem
