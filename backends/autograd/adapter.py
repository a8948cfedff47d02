"""The autograd adapter: HIPS autograd's own derivatives and the user's ``defvjp``/``defjvp`` rules, checked.

autograd differentiates NumPy code written with ``autograd.numpy`` (its arrays are NumPy arrays), and users
add operations with ``autograd.extend.primitive`` plus ``defvjp`` (reverse mode) and ``defjvp`` (forward mode).
``gb.check(fn, x, backend="autograd")`` evaluates ``fn`` point by point on NumPy copies (autograd has no
batching), takes VJPs from one forward pass recorded at the checked point, JVPs from autograd's forward mode,
second derivatives (``order=2``) by autograd differentiating its own backward pass, and names the user's
``defjvp`` rules (``forward_rule``) so the default ``analytic='auto'`` checks forward mode too. With ``grad=``
the user's hand-written gradient is checked instead (:mod:`..common.handwritten`), as on every backend.
Arguments, ``wrt=``, ``promote=False``, ``seed=`` and parameters (a dict argument; no ``params=``: there are no
modules) work exactly as on the NumPy backend, whose problem this backend shares.

Detection (the registry picks this backend without ``backend=`` only when it is unambiguous): autograd's arrays
are plain NumPy arrays, so no argument can tell; :meth:`AutogradAdapter.owns` says yes for ``fn`` itself when it
is an autograd primitive, or when its code (its globals, closure cells and attribute chains, following the
functions it names two calls deep: :mod:`.reach`) uses ``autograd.numpy``, ``autograd.scipy``, another autograd
module or an autograd primitive; never for an array. The registry asks only when ``autograd`` is already in
``sys.modules`` (detection never imports a framework). Plain NumPy code stays on the NumPy backend, and so does
autograd code given with ``grad=`` (the registry entry is ``by_code``: autograd would not differentiate anything
there); ``backend="autograd"`` with ``grad=`` checks the hand-written gradient here.

Invariant: the adapter keeps nothing across checks (its cache is always empty) and deciding ownership only reads
code (nothing of the user's is called).
"""

from __future__ import annotations

import importlib.metadata
from typing import Any, Callable, List, Optional, Tuple, Union

import numpy as np

from gradbridge._adapter import CheckSpec

from ..common.handwritten import GradCall, HandWrittenGradient, floating_candidates, hand_written_gradient
from ..numpy.adapter import NumpyAdapter
from .compat import getval
from .prepared import AutogradPrepared
from .problem import AutogradProblem, build_autograd_problem
from .reach import forward_rules, reached, rule_name, uses_autograd, user_primitive


class AutogradAdapter(NumpyAdapter):
    """Adapter for NumPy code differentiated by HIPS autograd (arrays, comparisons and parameters as NumPy's)."""

    name = "autograd"
    module_name = "autograd"

    def owns(self, value: Any) -> bool:
        """True for a function that is, or whose code uses, autograd (see the module docstring); never for an
        array (autograd's arrays are NumPy's)."""
        if isinstance(value, (np.ndarray, np.generic, type)) or not callable(value):
            return False
        try:
            return uses_autograd(value)
        except Exception:  # noqa: BLE001 - an object whose code cannot be read is simply not autograd's
            return False

    def version(self) -> str:
        return importlib.metadata.version("autograd")

    def user_function(self, fn: Any) -> Optional[Callable[..., Any]]:
        """The function inside an autograd primitive (``@primitive def my_op(x)`` names ``my_op``'s
        arguments, not ``f_wrapped(*args)``); None for anything else."""
        inner = getattr(fn, "fun", None) if getattr(fn, "_is_autograd_primitive", False) else None
        return inner if callable(inner) else None

    def probe_float64(self) -> Tuple[bool, str]:
        """Whether autograd differentiates in float64 here (``gradbridge backends``), and a note."""
        import autograd
        import autograd.numpy as anp

        x = np.array([0.3, 1.7], dtype=np.float64)
        gradient = autograd.grad(lambda v: anp.sum(anp.sin(v) * v))(x)
        expected = np.sin(x) + x * np.cos(x)
        ok = np.asarray(gradient).dtype == np.float64 and bool(np.allclose(gradient, expected, rtol=1e-14))
        return ok, "" if ok else f"autograd's float64 gradient came out {np.asarray(gradient).dtype} {gradient}"

    def prepare(self, spec: CheckSpec) -> Union[AutogradPrepared, HandWrittenGradient]:
        problem = build_autograd_problem(spec)
        if spec.grad is not None:  # the analytic side is the user's hand-written gradient, never autograd
            hand_written = hand_written_gradient(AutogradPrepared(problem), "autograd", _hand_written_call(problem),
                                                 _to_array, floating_candidates(problem.candidates), problem.chosen)
            hand_written.analytic_source = "the grad= function you passed (hand-written); autograd is not used"
            return hand_written
        found = list(reached(spec.fn))
        primitives: List[str] = []
        for value in found:
            if user_primitive(value) and rule_name(value) not in primitives:
                primitives.append(rule_name(value))
        rules = forward_rules(spec.fn)
        return AutogradPrepared(problem, ", ".join(rules) or None, primitives)


def _to_array(item: Any) -> np.ndarray:
    return np.asarray(getval(item), dtype=np.float64)


def _hand_written_call(problem: AutogradProblem) -> GradCall:
    """The user's ``grad`` at ``x0`` (see :mod:`..common.handwritten`), called as the NumPy backend calls it:
    ``grad(*args)`` for ``None``, else ``grad(cotangent, *args)`` with the cotangent blocks in fn's output
    structure (in the outputs' dtypes with ``promote=False``), after re-seeding, inside the check's window."""
    spec = problem.spec

    def call(blocks: Optional[List[np.ndarray]]) -> Any:
        with problem.window():
            leading: tuple = ()
            if blocks is not None:
                if not spec.promote:
                    blocks = [b.astype(d) if d != np.float64 else b for b, d in zip(blocks, problem.output_dtypes)]
                assert problem.output_rebuild is not None  # known after the first evaluation
                leading = (problem.output_rebuild(blocks),)
            problem.rng.reseed()
            return spec.grad(*leading, *problem.arguments(problem.x0), **spec.kwargs)

    return call


ADAPTER = AutogradAdapter()
