"""Finite-difference steps: the relative step and how reports describe it.

Central differences ``(f(x + h e_j) - f(x - h e_j)) / (x_j+h - (x_j-h))`` have truncation error
O(h^2) and round-off error about ``eps * |f| / h``; the step that balances both is
``h = cbrt(eps) * max(1, |x_j|)``, which scales with the magnitude of each element (a fixed 1e-6 is
too small for large inputs and too large for small dtypes).
"""

from __future__ import annotations

from typing import Optional

from .._precision import DTYPE_EPS, FLOAT64_EPS



def relative_step(eps: Optional[float], working_eps: float = FLOAT64_EPS) -> float:
    """The relative step: ``eps`` if given, else the cube root of the working precision's machine eps."""
    return working_eps ** (1.0 / 3.0) if eps is None else float(eps)


def precision_name(working_eps: float) -> str:
    names = {eps: name for name, eps in reversed(DTYPE_EPS.items())}  # the real dtype where a complex one shares it
    return names.get(float(working_eps), f"eps {working_eps:.3g}")


def step_description(eps: Optional[float], working_eps: float = FLOAT64_EPS) -> str:
    """The step rule in force, as a short formula for reports."""
    source = f"cbrt({precision_name(working_eps)} eps)" if eps is None else "eps"
    return f"h_j = {relative_step(eps, working_eps):.3g}*max(1, |x_j|)  ({source}, central differences)"
