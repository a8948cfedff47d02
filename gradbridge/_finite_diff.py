"""Finite differences on the flat float64 vector: step sizes, perturbed points, and their error.

Central differences ``(f(x + h e_j) - f(x - h e_j)) / (x_j+h - (x_j-h))`` have truncation error
O(h^2) and round-off error about ``eps * |f| / h``; the step that balances both is
``h = cbrt(eps) * max(1, |x_j|)``, which scales with the magnitude of each element (a fixed 1e-6 is
too small for large inputs and too large for small dtypes).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

FLOAT64_EPS = float(np.finfo(np.float64).eps)
DEFAULT_RELATIVE_STEP = FLOAT64_EPS ** (1.0 / 3.0)  # about 6.06e-6


def relative_step(eps: Optional[float], working_eps: float = FLOAT64_EPS) -> float:
    """The relative step: ``eps`` if given, else the cube root of the working precision's machine eps."""
    return working_eps ** (1.0 / 3.0) if eps is None else float(eps)


def element_steps(x: np.ndarray, eps: Optional[float], working_eps: float = FLOAT64_EPS) -> np.ndarray:
    """Per-element step sizes: the relative step times ``max(1, |x_j|)``."""
    return relative_step(eps, working_eps) * np.maximum(1.0, np.abs(x))


def precision_name(working_eps: float) -> str:
    names = {float(np.finfo(t).eps): str(np.dtype(t)) for t in (np.float64, np.float32, np.float16)}
    names[2.0 ** -7] = "bfloat16"
    return names.get(float(working_eps), f"eps {working_eps:.3g}")


def step_description(eps: Optional[float], working_eps: float = FLOAT64_EPS) -> str:
    """The step rule in force, as a short formula for reports."""
    source = f"cbrt({precision_name(working_eps)} eps)" if eps is None else "eps"
    return f"h_j = {relative_step(eps, working_eps):.3g}*max(1, |x_j|)  ({source}, central differences)"


def central_points(x0: np.ndarray, columns: np.ndarray, steps: np.ndarray,
                   rounder=None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points ``x0 ± h_j e_j`` for each column j, and the exact distance between each pair.

    Returns (plus_points, minus_points, spans) with ``spans[k] = (x+h) - (x-h)`` computed in floating
    point, so the division uses the step that was really taken.
    """
    count = len(columns)
    rows = np.arange(count)
    plus = np.repeat(x0[None, :], count, axis=0)
    minus = plus.copy()
    plus[rows, columns] = x0[columns] + steps[columns]
    minus[rows, columns] = x0[columns] - steps[columns]
    if rounder is not None:
        plus, minus = rounder(plus), rounder(minus)
    spans = plus[rows, columns] - minus[rows, columns]
    return plus, minus, spans


def roundoff_error(f_plus: np.ndarray, f_minus: np.ndarray, spans: np.ndarray,
                   working_eps: float = FLOAT64_EPS) -> np.ndarray:
    """Estimated round-off error of central differences: ``eps * (|f+| + |f-|) / span``.

    Shapes: f_plus, f_minus (k, m); spans (k,) — returns (k, m).
    """
    return working_eps * (np.abs(f_plus) + np.abs(f_minus)) / spans[:, None]
