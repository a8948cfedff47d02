"""The report's pictures, drawn with matplotlib (optional: ``pip install "gradbridge[plot]"``).

Each function returns a PNG as bytes. matplotlib is imported only here, only when a picture is asked
for, and always with the non-interactive Agg canvas (no window, no global backend switch).
"""

from __future__ import annotations

import io
import math
from typing import Any, Tuple

import numpy as np

from .report import RowResult, StepSweep

#: Widest grid drawn for a 1-D input before it is wrapped into rows.
STRIP_LIMIT = 64


def matplotlib_available() -> bool:
    """True when matplotlib can be imported (without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        return False


def _figure(width: float, height: float) -> Tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot(1, 1, 1)


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def grid_of(values: np.ndarray) -> Tuple[np.ndarray, str]:
    """A 2-D view of an element map and how to read its axes: matrices as they are, vectors as a strip
    (wrapped into rows above :data:`STRIP_LIMIT`), higher ranks with the leading axes merged."""
    values = np.asarray(values)
    if values.ndim == 0:
        return values.reshape(1, 1), "scalar"
    if values.ndim == 2:
        return values, "rows: axis 0, columns: axis 1"
    if values.ndim > 2:
        return values.reshape(-1, values.shape[-1]), f"rows: axes 0..{values.ndim - 2} merged, columns: last axis"
    if values.size <= STRIP_LIMIT:
        return values.reshape(1, -1), "element index"
    width = int(math.ceil(math.sqrt(values.size)))
    padded = np.full(width * int(math.ceil(values.size / width)), np.nan)
    padded[: values.size] = values
    return padded.reshape(-1, width), f"element index = row * {width} + column"


def heatmap_png(row: RowResult) -> bytes:
    """analytic - numeric over the input's elements (diverging colours, zero white); elements with an
    entry outside tolerance are outlined."""
    errors, axes = grid_of(np.asarray(row.error_map, dtype=float))
    outside, _ = grid_of(np.asarray(row.outside_map, dtype=float))
    height, width = errors.shape
    figure, ax = _figure(min(9.0, max(4.5, 2.5 + 0.35 * width)), min(7.0, max(2.4, 1.6 + 0.35 * height)))
    image = ax.imshow(errors, cmap="RdBu_r", norm=_error_norm(errors, outside > 0), interpolation="nearest",
                      aspect="auto")
    figure.colorbar(image, ax=ax, label="analytic - numeric")
    rows, cols = np.nonzero(outside > 0)
    if len(rows) <= 400:
        ax.scatter(cols, rows, marker="s", s=max(20, 3000 / max(width, height)), facecolors="none",
                   edgecolors="black", linewidths=1.2)
    ax.set_title(f"{row.input} -> {row.output}: analytic - numeric\n({axes}; outlined: outside tolerance)",
                 fontsize=9)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("column" if height > 1 else "element")
    if height > 1:
        ax.set_ylabel("row")
    else:
        ax.set_yticks([])
    return _png(figure)


def _error_norm(errors: np.ndarray, outside: np.ndarray) -> Any:
    """Colours symmetric around zero; logarithmic beyond the smallest wrong element when the wrong
    elements span more than two decades, so a 1% error stays visible beside a sign flip."""
    from matplotlib.colors import Normalize, SymLogNorm

    finite = np.abs(errors[np.isfinite(errors)])
    limit = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    wrong = np.abs(errors[outside & np.isfinite(errors)])
    wrong = wrong[wrong > 0]
    if wrong.size and limit / float(wrong.min()) > 100.0:
        return SymLogNorm(linthresh=float(wrong.min()) / 2.0, vmin=-limit, vmax=limit, base=10)
    return Normalize(vmin=-limit, vmax=limit)


def step_plot_png(sweep: StepSweep) -> bytes:
    """The classic step-size plot: |finite difference - value| against the step, on log axes."""
    steps = np.asarray(sweep.steps)
    figure, ax = _figure(6.0, 4.6)
    tiny = np.finfo(float).tiny
    against_analytic = np.maximum(np.asarray(sweep.errors_against(sweep.analytic)), tiny)
    against_reference = np.maximum(np.asarray(sweep.errors_against(sweep.reference)), tiny)
    ax.loglog(steps, against_reference, "o-", color="tab:blue",
              label="|FD(h) - best FD estimate|: truncation (right) and round-off (left)")
    ax.loglog(steps, against_analytic, "s--", color="tab:red", label="|FD(h) - analytic|")
    ax.axvline(sweep.used_step, color="gray", linestyle=":", label=f"step used, h = {sweep.used_step:.2g}")
    if sweep.allowed > 0 and np.isfinite(sweep.allowed):
        ax.axhline(sweep.allowed, color="tab:green", linestyle="-.", linewidth=1,
                   label=f"tolerance {sweep.allowed:.2g}")
    ax.set_xlabel("step h")
    ax.set_ylabel("error")
    ax.set_title(f"step-size plot of {sweep.element}", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    ax.grid(True, which="major", alpha=0.3)
    return _png(figure)
