"""The transposed VJP: ``J t`` by differentiating ``u -> J^T u`` (autograd's recorded backward pass) in ``u``.

Invariant: the products come from the very backward pass :meth:`AutogradPrepared.vjp` runs (the user's
``defvjp`` rules, never a forward-mode rule), recorded once at ``x0`` per call; where autograd cannot
differentiate that backward pass (a rule written with ``np.asarray``, in-place writes or other plain NumPy that
drops autograd's boxes) the answer is ModeUnsupportedError, never a silent zero, and the core falls back to
the VJP itself. Leaves autograd defines no VJP for have zero columns, as in :meth:`vjp`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from gradbridge import _process
from gradbridge._errors import GradbridgeError, ModeUnsupportedError

from .compat import getval, isbox, missing_vjp, vjp_of


def first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _object_dtype(value: Any) -> bool:
    if value is None:
        return False
    plain = getval(value) if isbox(value) else value
    try:
        return np.asarray(plain).dtype == object
    except Exception:  # noqa: BLE001 - not array-like at all: broken as well
        return True


def broken_boxes(end: Any, result: Optional[Any], connected: bool, user_primitives: Sequence[str]) -> str:
    """Why differentiating a backward pass went wrong without an error, or "" when it did not: an object array
    (boxes wrapped by ``np.asarray``) in the output or its derivative, or an output that does not depend on the
    input while fn runs the user's primitives (their backward dropped the boxes)."""
    if _object_dtype(end) or _object_dtype(result):
        return ("a backward rule turned autograd's boxes into an object array (np.asarray or np.array of the "
                "cotangent); write the rule with autograd.numpy to differentiate it again")
    if not connected and user_primitives:
        return (f"its result does not depend on the point although fn runs {', '.join(user_primitives)}: a backward "
                "rule written with plain NumPy drops autograd's boxes; write it with autograd.numpy to differentiate "
                "it again")
    return ""


class TransposedVJP:
    """``vjp_transposed`` for :class:`AutogradPrepared` (which provides ``record``, ``defined`` and the rest)."""

    leaves: Any
    output_specs: Any
    problem: Any

    @_process.runs_user_code
    def vjp_transposed(self, tangents: np.ndarray) -> np.ndarray:
        m = sum(spec.size for spec in self.output_specs)
        self._last_mode = "rev"
        try:
            kept = self.defined()
            backward, connected = self.record(kept) if kept else (None, False)
        except Exception as exc:
            if not missing_vjp(exc):
                raise
            self._find_undefined(exc)
            kept = self.defined()
            backward, connected = self.record(kept) if kept else (None, False)
        if backward is None or not connected:  # the output does not depend on the leaves: J = 0
            return np.zeros((len(tangents), m))
        self.problem.rng.reseed()
        try:
            transpose, end, linked = vjp_of(backward, np.zeros(m))
        except GradbridgeError:
            raise
        except Exception as exc:
            raise ModeUnsupportedError(f"transposed VJP: autograd cannot differentiate fn's backward pass "
                                       f"({type(exc).__name__}: {first_line(exc)})") from exc
        broken = broken_boxes(end, None, True, ())
        if not broken and not linked:  # J^T u is linear in u: independent of u, the backward dropped the boxes
            broken = ("J^T u does not depend on u (a backward rule written with plain NumPy drops autograd's boxes, "
                      "or one ignores its cotangent)")
        if broken:
            raise ModeUnsupportedError(f"transposed VJP: autograd cannot differentiate fn's backward pass: {broken}")
        rows = []
        for tangent in tangents:
            part = np.concatenate([np.asarray(tangent, dtype=np.float64)[self.leaves[k].slice] for k in kept])
            self.problem.rng.reseed()
            try:
                product = transpose(part)
            except GradbridgeError:
                raise
            except Exception as exc:
                raise ModeUnsupportedError(f"transposed VJP: autograd cannot differentiate fn's backward pass "
                                           f"({type(exc).__name__}: {first_line(exc)})") from exc
            if _object_dtype(product):
                raise ModeUnsupportedError("transposed VJP: autograd cannot differentiate fn's backward pass: "
                                           + broken_boxes(product, None, True, ()))
            rows.append(np.asarray(getval(product), dtype=np.float64).reshape(-1))
        return np.stack(rows) if rows else np.zeros((0, m))
