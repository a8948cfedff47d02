"""A hand-written ``grad=`` as the analytic side of a check on a framework with its own autodiff.

``gb.check(fn, x_torch, grad=my_grad)`` (or TensorFlow tensors) checks ``my_grad`` the way the NumPy backend
does: for a scalar ``fn``, ``grad(*args)`` returns one gradient per checked argument; for a non-scalar
``fn``, ``grad(cotangent, *args)`` is a vector-Jacobian product, the cotangent shaped like fn's output (a
tuple, list or dict of tensors for such an output, zeros for its non-floating parts). ``args`` are the
framework tensors ``fn`` receives at the checked point (float64 copies unless ``promote=False``), ``kwargs``
follow; gradients may come back as framework tensors, NumPy arrays or Python numbers. Evaluations stay the
framework adapter's own; only the VJPs come from ``grad``, so nothing of the framework's autodiff is in the
analytic side: forward mode, ``order=2`` and the transposed VJP are unavailable (no ``vjp_transposed``).

The gradients come one per checked leaf in the check's order (arguments, then parameters), or one per
floating candidate (checked or not, as NumPy's ``grad`` returns one per floating argument whatever
``wrt=`` narrows), or as a dict by leaf name; a single checked leaf may get a bare gradient. ``None`` is a
zero gradient (the ``autograd.Function.backward`` convention).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, List, Mapping, Optional, Sequence

import numpy as np

from gradbridge._adapter import EditedEvaluation, LeafSpec, WorkingPrecision, offered
from gradbridge._errors import FunctionEvaluationError, GradbridgeError, ModeUnsupportedError
from gradbridge._tree import array_kind

from .complex import is_complex_dtype, real_view_array

#: ``call(cotangent_blocks)``: the user's grad at x0; ``None`` for a scalar fn (``grad(*args)``), else the
#: flat cotangent cut per floating output (``grad(cotangent, *args)``). Returns what grad returned.
GradCall = Callable[[Optional[List[np.ndarray]]], Any]


class HandWrittenGradient:
    """A framework's prepared function whose VJPs come from the user's ``grad``; everything else delegates."""

    #: never the framework's forward-mode rules: grad= is checked in reverse mode only
    forward_rule: Optional[str] = None

    def __init__(self, inner: Any, framework: str, call: GradCall, to_array: Callable[[Any], np.ndarray],
                 floating_candidates: Sequence[int], chosen: Sequence[int]) -> None:
        self.inner = inner
        self.analytic_source = (f"the grad= function you passed (hand-written), called with {framework} tensors; "
                                f"{framework} autodiff is not used")
        self._call = call
        self._to_array = to_array
        self._floating = list(floating_candidates)
        self._chosen = list(chosen)
        self.undefined_gradients: dict = {}

    # --- delegated: the framework evaluates fn ---

    @property
    def leaves(self) -> Sequence[LeafSpec]:
        return self.inner.leaves

    @property
    def x0(self) -> np.ndarray:
        return self.inner.x0

    @x0.setter
    def x0(self, value: np.ndarray) -> None:
        self.inner.x0 = value

    @property
    def notes(self) -> List[str]:
        return self.inner.notes

    @property
    def working_eps(self) -> Optional[float]:
        return offered(self.inner, WorkingPrecision, "working_eps")

    @property
    def output_specs(self) -> Sequence[LeafSpec]:
        return self.inner.output_specs

    def session(self):
        return self.inner.session()

    def evaluate(self, points: np.ndarray) -> np.ndarray:
        return self.inner.evaluate(points)

    # --- the analytic side: the user's grad ---

    def vjp(self, cotangents: np.ndarray) -> np.ndarray:
        outputs = self.output_specs
        spec = getattr(getattr(self.inner, "problem", None), "spec", None)
        if scalar_form(outputs, getattr(spec, "grad", None), len(getattr(spec, "args", ())),
                       getattr(spec, "kwargs", {})):  # grad(*args), scaled by the cotangent
            gradient = self._gradients(call_grad(lambda: self._call(None), "grad(*args)"))
            return cotangents[:, :1] * gradient[None, :]
        rows = []
        for cotangent in cotangents:
            blocks = [cotangent[spec.slice].reshape(spec.shape) for spec in outputs]
            rows.append(self._gradients(call_grad(lambda: self._call(blocks), "grad(cotangent, *args)")))
        return np.stack(rows) if rows else np.zeros((0, len(self.x0)))

    def jvp(self, tangents: np.ndarray) -> np.ndarray:
        raise ModeUnsupportedError("forward mode: a grad= function gives reverse-mode gradients only; check it with "
                                   "analytic='rev' (or drop grad= to check the framework's own forward mode)")

    def gradient_function(self, cotangent: np.ndarray) -> "HandWrittenGradient":
        raise ModeUnsupportedError("order=2 needs second derivatives, which a grad= function does not provide")

    def _gradients(self, result: Any) -> np.ndarray:
        """``grad``'s return value as one flat float64 vector over the checked leaves, shapes checked."""
        leaves = self.leaves
        if isinstance(result, Mapping):
            missing = [leaf.name for leaf in leaves if leaf.name not in result]
            if missing:
                raise FunctionEvaluationError(
                    f"grad: the returned dict has no gradient for {', '.join(repr(n) for n in missing)} (keys are "
                    f"the checked leaves' names: {', '.join(repr(leaf.name) for leaf in leaves)})")
            items = [result[leaf.name] for leaf in leaves]
        else:
            given = list(result) if isinstance(result, (list, tuple)) else [result]
            if len(given) == len(self._chosen):
                items = given
            elif len(given) == len(self._floating):
                by_candidate = dict(zip(self._floating, given))
                items = [by_candidate[i] for i in self._chosen]
            else:
                expected = ", ".join(leaf.name for leaf in leaves)
                raise FunctionEvaluationError(
                    f"grad: returned {len(given)} gradient(s), expected {len(self._chosen)}, one per checked "
                    f"argument or parameter ({expected}), in that order (or a dict by those names)")
        flat = []
        for leaf, item in zip(leaves, items):
            if item is None:
                flat.append(np.zeros(leaf.size))
                continue
            flat.append(flat_gradient(item, leaf, self._to_array, "a tensor or array"))
        return np.concatenate(flat) if flat else np.zeros(0)


class _HandWrittenGradientWithEdits(HandWrittenGradient):
    """A :class:`HandWrittenGradient` whose framework builds edited points itself (``evaluate_edits``)."""

    def evaluate_edits(self, positions: np.ndarray, values: np.ndarray) -> np.ndarray:
        return self.inner.evaluate_edits(positions, values)


def hand_written_gradient(inner: Any, framework: str, call: GradCall, to_array: Callable[[Any], np.ndarray],
                          floating_candidates: Sequence[int], chosen: Sequence[int]) -> HandWrittenGradient:
    """The prepared function of a ``grad=`` check around the framework's ``inner`` one: it offers
    ``evaluate_edits`` exactly when ``inner`` does (the capability protocols must not promise what is absent)."""
    cls = _HandWrittenGradientWithEdits if isinstance(inner, EditedEvaluation) else HandWrittenGradient
    return cls(inner, framework, call, to_array, floating_candidates, chosen)


def flat_gradient(item: Any, leaf: LeafSpec, to_array: Callable[[Any], np.ndarray], kind: str) -> np.ndarray:
    """One leaf's gradient returned by ``grad=``, as a flat float64 vector: refused (naming ``grad``) when
    it is complex, not convertible (``kind`` says what was expected), of the wrong shape or not finite.

    A complex leaf (checked through its real view, see :mod:`.complex`) takes a gradient of the complex value's
    shape in gradbridge's convention, ``dL/dRe z + i dL/dIm z``, laid out as its real view."""
    complex_leaf = is_complex_dtype(leaf.dtype)
    if not complex_leaf:
        refuse_complex(item, leaf)
    try:
        gradient = to_array(item)
    except Exception as exc:
        raise FunctionEvaluationError(f"grad: the gradient for {leaf.name} is a {type(item).__name__}, not "
                                      f"{kind} ({type(exc).__name__}: {exc})") from exc
    if complex_leaf:
        if gradient.shape != leaf.shape[:-1] and not (gradient.size == 1 == leaf.size // 2):
            raise FunctionEvaluationError(
                f"grad: the gradient for {leaf.name} has shape {gradient.shape}, expected {leaf.shape[:-1]} (the "
                f"shape of the complex argument, in gradbridge's convention dL/dRe + i dL/dIm)")
        gradient = real_view_array(gradient.reshape(leaf.shape[:-1]))
    if gradient.shape != leaf.shape and not (gradient.size == 1 == leaf.size):
        raise FunctionEvaluationError(
            f"grad: the gradient for {leaf.name} has shape {gradient.shape}, expected {leaf.shape} "
            "(the shape of the argument)")
    refuse_nonfinite(gradient, leaf)
    return gradient.reshape(-1)


def scalar_form(outputs: Sequence[LeafSpec], grad: Any, nargs: int, kwargs: Mapping[str, Any]) -> bool:
    """Whether ``grad`` is called as ``grad(*args)`` (a scalar fn) rather than ``grad(cotangent, *args)``.

    Outputs of more than one element take the VJP form. One element takes the scalar form, unless ``grad``'s
    signature rejects ``nargs`` positional arguments and accepts one more (``grad(cotangent, x)`` for a fn of
    ``x`` returning an array of shape (1,)): an output of one element is a scalar and a 1-vector at once."""
    if not (len(outputs) == 1 and outputs[0].size == 1):
        return False
    try:
        signature = inspect.signature(grad)
    except (TypeError, ValueError):
        return True
    placeholders = [None] * (nargs + 1)
    try:
        signature.bind(*placeholders[:nargs], **kwargs)
        return True
    except TypeError:
        pass
    try:
        signature.bind(*placeholders, **kwargs)
        return False
    except TypeError:
        return True  # neither fits: the call raises, reported as grad's error


def call_grad(call: Callable[[], Any], form: str) -> Any:
    """Run the user's ``grad`` (through ``call``); what it raises is reported as grad's, not fn's."""
    try:
        return call()
    except GradbridgeError:
        raise
    except Exception as exc:
        raise FunctionEvaluationError(f"grad raised {type(exc).__name__} (called as {form} at the checked point): "
                                      f"{exc}") from exc


def refuse_complex(item: Any, leaf: LeafSpec) -> None:
    """A complex gradient would lose its imaginary part in the float64 comparison: refuse it."""
    kind = array_kind(item)
    if isinstance(item, complex) or (kind is not None and kind[1] == "complex"):
        dtype = kind[0] if kind is not None else "complex"
        raise FunctionEvaluationError(
            f"grad: the gradient for {leaf.name} is complex ({dtype}); gradbridge checks the real gradients of real "
            "inputs and would drop the imaginary part: return a real array (for a real function of real inputs "
            "the imaginary part is zero)")
    if isinstance(item, (list, tuple)):
        try:
            is_complex = np.iscomplexobj(np.asarray(item))
        except Exception:  # noqa: BLE001 - not array-like: the conversion below reports it
            return
        if is_complex:
            refuse_complex(np.asarray(item), leaf)


def refuse_nonfinite(gradient: np.ndarray, leaf: LeafSpec) -> None:
    """A NaN or Inf from ``grad`` at the checked point (where fn is finite) is grad's fault: say which element."""
    bad = ~np.isfinite(gradient)
    if bad.any():
        k = int(np.flatnonzero(bad.reshape(-1))[0])
        element = f"{leaf.name}{list(leaf.unravel(k))}" if gradient.size == leaf.size else leaf.name
        raise FunctionEvaluationError(
            f"grad: returned {gradient.reshape(-1)[k]} for {element} at the checked point, where fn is finite; the "
            "hand-written gradient must be finite to be checked (a nan is often 0*inf or 0/0: a sqrt, log or "
            "division at 0)")


def floating_candidates(candidates: Sequence[Any]) -> List[int]:
    """Indices of the floating candidates (what a grad returning one gradient per floating value counts)."""
    return [i for i, c in enumerate(candidates) if c.floating]
