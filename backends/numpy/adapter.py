"""The NumPy adapter: hand-written gradients (``grad=``) checked against finite differences.

NumPy has no automatic differentiation, so the analytic side is the user's own function: for a scalar
``fn``, ``grad(*args)`` returns one gradient per checked argument; for a non-scalar ``fn``,
``grad(cotangent, *args)`` is a vector-Jacobian product.

Checked arguments reach ``fn`` and ``grad`` as float64 copies; with ``promote=False`` as copies in their own
dtype (float32, float16, and bfloat16 arrays of ``ml_dtypes`` where it is installed), and a non-scalar
``fn``'s cotangents come cast to the dtype of the output they belong to.

Invariant: a check is only prepared with a ``grad=`` (NumPy has nothing else to check) and without
``params=`` (parameters are arguments); the adapter keeps nothing across checks, so its cache is always empty.
"""

from __future__ import annotations

from typing import Any, Callable, List, Mapping, Optional, Tuple

import numpy as np

from gradbridge._adapter import CheckSpec, ExpectedParams, ParamBinding
from gradbridge._errors import FunctionEvaluationError, InvalidArgumentError
from gradbridge._tree import flatten

from .prepared import NumpyPrepared
from .problem import build_problem, is_array


class NumpyAdapter:
    """Adapter for plain NumPy code with a user-written gradient."""

    name = "numpy"
    module_name = "numpy"

    def clear_cache(self) -> None:
        """NumPy keeps nothing across checks."""

    def cache_size(self) -> int:
        return 0

    def owns(self, value: Any) -> bool:
        return is_array(value)

    def version(self) -> str:
        return np.__version__

    def probe_float64(self) -> Tuple[bool, str]:
        """Whether float64 arithmetic really happens here (``gradbridge backends``), and a note."""
        x = np.array([1.0, 2.0], dtype=np.float64)
        h = 1e-7  # a central difference this fine is only accurate in float64
        derivative = ((x + h) ** 2 - (x - h) ** 2) / (2 * h)
        ok = derivative.dtype == np.float64 and bool(np.allclose(derivative, 2 * x, rtol=1e-7))
        return ok, "" if ok else f"a float64 central difference came out {derivative.dtype} {derivative}"

    def prepare(self, spec: CheckSpec) -> NumpyPrepared:
        if spec.grad is None:
            raise InvalidArgumentError(
                "grad: NumPy code has no automatic differentiation, so pass grad=your_gradient_function: "
                "grad(*args) returning one gradient per checked argument for a scalar fn, or "
                "grad(cotangent, *args) (a vector-Jacobian product) for a non-scalar fn. If fn is written for "
                "torch, JAX or TensorFlow, pass that framework's arrays (or backend='...')")
        return NumpyPrepared(build_problem(spec))

    # --- gb.compare (see gradbridge._adapter.CompareAdapter) ---

    def to_numpy(self, value: Any) -> Optional[np.ndarray]:
        return np.asarray(value) if is_array(value) else None

    def from_numpy(self, array: np.ndarray) -> np.ndarray:
        return np.array(array, copy=True)

    def expected_params(self, fn: Callable[..., Any]) -> Optional[ExpectedParams]:
        return None  # NumPy has no modules: parameters always come as the dict argument

    def bind_params(self, fn: Callable[..., Any], params: Optional[Mapping[str, np.ndarray]],
                    grad: Optional[Callable[..., Any]] = None) -> ParamBinding:
        """``fn(params, *args)`` and ``grad(params, *args)`` (or ``grad(cotangent, params, *args)``) get the
        flat parameter dict first; ``grad`` returns ``(dict of parameter gradients, gradient of each
        floating argument...)``, flattened here into the one-per-leaf order the check expects."""
        if params is None:
            return ParamBinding(fn=fn, grad=grad)
        native = {name: self.from_numpy(array) for name, array in params.items()}
        leaves, _ = flatten(native, "params", is_array)
        names = {leaf.path: name for leaf, name in zip(leaves, native)}
        return ParamBinding(fn=fn, grad=ParamGradient(grad, list(native)) if grad is not None else None,
                            leading_args=(native,), leading_names=("params",), names=names)


class ParamGradient:
    """The user's ``grad`` for a function taking a parameter dict first: its ``(dict, *rest)`` result as
    one flat tuple, parameters in the dict's order (the order of the check's leaves)."""

    def __init__(self, grad: Callable[..., Any], order: List[str]) -> None:
        self.grad = grad
        self.order = order

    def __call__(self, *args: Any, **kwargs: Any) -> tuple:
        result = self.grad(*args, **kwargs)
        if isinstance(result, Mapping):
            head, rest = result, []
        elif isinstance(result, (tuple, list)) and result and isinstance(result[0], Mapping):
            head, rest = result[0], list(result[1:])
        else:
            raise FunctionEvaluationError(
                "grad: with params=, grad must return (dict of gradients by parameter name, gradient of each "
                f"floating argument...), got {type(result).__name__}")
        missing = [name for name in self.order if name not in head]
        if missing:
            raise FunctionEvaluationError(f"grad: the returned dict has no gradient for parameter(s) "
                                          f"{', '.join(repr(n) for n in missing)}")
        return tuple([head[name] for name in self.order] + rest)


ADAPTER = NumpyAdapter()
