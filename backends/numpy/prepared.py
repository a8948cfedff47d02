"""NumPy adapter: hand-written gradients (``grad=``) checked against finite differences.

NumPy has no automatic differentiation, so the analytic side is the user's own function: for a scalar
``fn``, ``grad(*args)`` returns one gradient per checked argument; for a non-scalar ``fn``,
``grad(cotangent, *args)`` is a vector-Jacobian product.

Checked arguments reach ``fn`` and ``grad`` as float64 copies; with ``promote=False`` as copies in their own
dtype (float32, float16, and bfloat16 arrays of ``ml_dtypes`` where it is installed), and a non-scalar
``fn``'s cotangents come cast to the dtype of the output they belong to.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from gradbridge import _process
from gradbridge._adapter import CheckSpec, ExpectedParams, LeafSpec, ParamBinding
from gradbridge._errors import FunctionEvaluationError, GradbridgeError, InvalidArgumentError, ModeUnsupportedError
from gradbridge._checking.evaluate import mark_failed_point
from ..common.layout import Candidate, Unchecked, argument_candidates, layout_leaves, promotion_notes, unchecked_notes
from ..common.outputs import output_leaves, output_specs
from ..common.rng import SharedRandomState
from gradbridge._tree import flatten

from ..common.handwritten import call_grad, flat_gradient, scalar_form
from ..common.lowprec import low_precision_names, own_precision, promotion_hint, refresh_note


def _is_array(value: Any) -> bool:
    return isinstance(value, (np.ndarray, np.generic))


def _is_output(value: Any) -> bool:
    return isinstance(value, (np.ndarray, np.generic, float, int))


def _bfloat16() -> Any:
    """ml_dtypes' bfloat16 (NumPy has none), or None where ml_dtypes is not installed."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return ml_dtypes.bfloat16


def _floating(value: Any) -> bool:
    dtype = np.asarray(value).dtype
    if np.issubdtype(dtype, np.floating):
        return True
    bfloat16 = _bfloat16() if dtype.name == "bfloat16" else None  # ml_dtypes' types are no np.floating
    return bfloat16 is not None and dtype == np.dtype(bfloat16)


class NumpyPrepared:
    """A NumPy function (and its ``grad``) over the flat float64 vector of checked leaves."""

    analytic_source = "the grad= function you passed (hand-written)"

    def __init__(self, spec: CheckSpec, candidates: List[Candidate], leaves: List[LeafSpec], chosen: List[int],
                 rebuild_args: Callable[[Sequence[Any]], tuple]) -> None:
        self.spec = spec
        self.candidates = candidates
        self.leaves = leaves
        self.chosen = chosen
        self.rebuild_args = rebuild_args
        self.x0 = np.concatenate([np.asarray(candidates[i].value, dtype=np.float64).ravel() for i in chosen])
        self.rng = SharedRandomState(spec.seed)
        # around every call into the user's code: NumPy's and Python's generators re-seeded inside and put
        # back on the way out, under the one lock (gradbridge._process)
        self.window = _process.Window(self.rng.preserved)
        self._outputs: Optional[List[LeafSpec]] = None
        self._output_dtypes: List[np.dtype] = []
        self._output_rebuild = None
        # promote=True: checked leaves are float64 copies; False: copies in each leaf's own dtype
        self.leaf_dtypes = [np.dtype(np.float64) if spec.promote else np.asarray(candidates[i].value).dtype
                            for i in chosen]
        if spec.promote:
            self.notes = promotion_notes(leaves)
            self.working_eps = None
            self._low = low_precision_names([(leaf.name, leaf.dtype) for leaf in leaves])
        else:
            self.working_eps, note = own_precision(leaves)
            self.notes = [note] if note else []
            self._low = ""

    @property
    def output_specs(self) -> List[LeafSpec]:
        if self._outputs is None:
            raise RuntimeError("output_specs is known after the first evaluation")
        return self._outputs

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """The whole check: nothing process-wide changes here, only in :attr:`window`."""
        yield

    def _arguments(self, x: np.ndarray) -> tuple:
        """The user's arguments with checked leaves taken from ``x`` (float64) and copies of the rest."""
        values = [np.array(c.value, copy=True) for c in self.candidates]
        for leaf, i, dtype in zip(self.leaves, self.chosen, self.leaf_dtypes):
            values[i] = x[leaf.slice].reshape(leaf.shape).astype(dtype)  # exact: the core rounded x to dtype
        values = [v if isinstance(c.value, np.ndarray) else (v[()] if isinstance(v, np.ndarray) else v)
                  for v, c in zip(values, self.candidates)]
        return self.rebuild_args(values)

    def _call(self, x: np.ndarray) -> np.ndarray:
        self.rng.reseed()
        try:
            result = self.spec.fn(*self._arguments(x), **self.spec.kwargs)
        except Exception as exc:
            if self._low and not isinstance(exc, GradbridgeError) and np.array_equal(x, self.x0):
                # fn fails on the float64 copies at the user's own point: it may only run in its own dtypes
                raise FunctionEvaluationError(f"fn raised {type(exc).__name__} at the unperturbed input: {exc}. "
                                              f"{promotion_hint(self._low)}") from exc
            raise
        all_leaves = output_leaves(result, _is_output)
        floating = [_floating(leaf.value) for leaf in all_leaves]
        leaves = [leaf for leaf, is_float in zip(all_leaves, floating) if is_float]
        if not leaves:
            described = type(result).__name__
            if isinstance(result, np.ndarray):
                described = f"an array of dtype {result.dtype}"
            raise FunctionEvaluationError(f"fn: expected a float or a floating-point NumPy array (or a tuple/list/"
                                          f"dict of them) as output, got {described}")
        arrays = [np.asarray(leaf.value, dtype=np.float64) for leaf in leaves]
        if self._outputs is None:
            self._outputs = output_specs([(l.path, np.shape(l.value), str(np.asarray(l.value).dtype))
                                          for l in leaves])
            self._output_dtypes = [np.asarray(l.value).dtype for l in leaves]
            _, rebuild = flatten(result, "out", _is_output)
            # non-floating outputs (indices, counts) get zero cotangents of their own shape
            constants = [None if is_float else np.zeros(np.shape(leaf.value))
                         for leaf, is_float in zip(all_leaves, floating)]

            def rebuild_cotangent(blocks: List[np.ndarray]) -> Any:
                supply = iter(blocks)
                return rebuild([next(supply) if c is None else c for c in constants])

            self._output_rebuild = rebuild_cotangent
        return np.concatenate([a.ravel() for a in arrays])

    @_process.runs_user_code
    def evaluate(self, points: np.ndarray) -> np.ndarray:
        first = self._outputs is None
        rows = []
        for k, x in enumerate(points):
            try:
                rows.append(self._call(x))
            except Exception as exc:
                mark_failed_point(exc, k)  # the error names this very evaluation
                raise
        result = np.stack(rows)
        if first and not self.spec.promote:  # the outputs' dtypes are known now
            refresh_note(self.notes, self.leaves, self._outputs)
        return result

    def _gradients(self, result: Any) -> np.ndarray:
        """Turn ``grad``'s return value into one flat vector over the checked leaves, checking shapes."""
        items = list(result) if isinstance(result, (list, tuple)) else [result]
        floating = [i for i, c in enumerate(self.candidates) if c.floating]
        if len(items) == len(self.chosen):
            mapping = list(self.chosen)
        elif len(items) == len(floating):
            mapping = floating
        else:
            expected = ", ".join(leaf.name for leaf in self.leaves)
            raise FunctionEvaluationError(
                f"grad: returned {len(items)} gradient(s), expected {len(self.chosen)}, one per checked "
                f"argument ({expected}), in argument order")
        by_candidate = dict(zip(mapping, items))
        flat = []
        for leaf, i in zip(self.leaves, self.chosen):
            flat.append(flat_gradient(by_candidate[i], leaf, lambda item: np.asarray(item, dtype=np.float64),
                                      "an array"))
        return np.concatenate(flat)

    @_process.runs_user_code
    def vjp(self, cotangents: np.ndarray) -> np.ndarray:
        outputs = self.output_specs
        if scalar_form(outputs, self.spec.grad, len(self.spec.args), self.spec.kwargs):
            self.rng.reseed()
            gradient = self._gradients(call_grad(lambda: self.spec.grad(*self._arguments(self.x0), **self.spec.kwargs),
                                                 "grad(*args)"))
            return cotangents[:, :1] * gradient[None, :]
        rows = []
        for cotangent in cotangents:
            blocks = [cotangent[spec.slice].reshape(spec.shape) for spec in outputs]
            if not self.spec.promote:  # the cotangent in the dtype of the output it belongs to
                blocks = [b.astype(d) if d != np.float64 else b for b, d in zip(blocks, self._output_dtypes)]
            structured = self._output_rebuild(blocks)
            self.rng.reseed()
            result = call_grad(lambda: self.spec.grad(structured, *self._arguments(self.x0), **self.spec.kwargs),
                               "grad(cotangent, *args)")
            rows.append(self._gradients(result))
        return np.stack(rows)

    def jvp(self, tangents: np.ndarray) -> np.ndarray:
        raise ModeUnsupportedError("forward mode: a NumPy grad= gives reverse-mode gradients only")

    def gradient_function(self, cotangent: np.ndarray) -> "NumpyPrepared":
        raise ModeUnsupportedError("order=2 needs second derivatives, which a NumPy grad= function does not provide")


class NumpyAdapter:
    """Adapter for plain NumPy code with a user-written gradient."""

    name = "numpy"
    module_name = "numpy"
    install_hint = "pip install numpy"

    def clear_cache(self) -> None:
        """NumPy keeps nothing across checks."""

    def cache_size(self) -> int:
        return 0

    def owns(self, value: Any) -> bool:
        return _is_array(value)

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
        if spec.params is not None:
            raise InvalidArgumentError("params: the NumPy backend has no modules; pass parameters as arguments")
        unchecked: List[Unchecked] = []
        candidates, rebuild_args = argument_candidates(
            spec.args, spec.arg_names, _is_array,
            lambda v: (np.shape(v), str(np.asarray(v).dtype), _floating(v)), unchecked=unchecked,
            native="the NumPy backend checks NumPy arrays: pass np.asarray(...) to check it")
        leaves, chosen = layout_leaves(candidates, spec.wrt, unchecked)
        prepared = NumpyPrepared(spec, candidates, leaves, chosen, rebuild_args)
        prepared.notes.extend(unchecked_notes(candidates, chosen, unchecked))
        return prepared

    # --- gb.compare (see gradbridge._adapter.CompareAdapter) ---

    def to_numpy(self, value: Any) -> Optional[np.ndarray]:
        return np.asarray(value) if _is_array(value) else None

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
        leaves, _ = flatten(native, "params", _is_array)
        names = {leaf.path: name for leaf, name in zip(leaves, native)}
        return ParamBinding(fn=fn, grad=_ParamGradient(grad, list(native)) if grad is not None else None,
                            leading_args=(native,), leading_names=("params",), names=names)


class _ParamGradient:
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
