"""Write reports to files: JSON for machines, a self-contained HTML page for people.

Both take a sequence of results (a :class:`~gradbridge._reporting.report.Report` or a comparison: anything with
``to_dict()`` and ``passed``) and optional labels (a pytest node id, a case name) shown with each.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]


def json_safe(value: Any) -> Any:
    """``value`` with NumPy scalars/arrays made plain and non-finite floats spelled ``"inf"``/``"nan"``
    (strict JSON has neither)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return json_safe(value.tolist())
    if isinstance(value, float) or type(value).__name__.startswith("float"):
        number = float(value)
        if math.isnan(number):
            return "nan"
        if math.isinf(number):
            return "inf" if number > 0 else "-inf"
        return number
    if type(value).__name__.startswith(("int", "uint")) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def _labels(results: Sequence[Any], labels: Optional[Sequence[str]]) -> list:
    if labels is None:
        return [None] * len(results)
    if len(labels) != len(results):
        raise ValueError(f"labels: expected one per result ({len(results)}), got {len(labels)}")
    return list(labels)


def to_json_document(results: Sequence[Any], labels: Optional[Sequence[str]] = None) -> dict:
    """The JSON document :func:`write_json` writes: a summary and one entry per result."""
    entries = []
    for label, result in zip(_labels(results, labels), results):
        entry = {"label": label, "kind": type(result).__name__.lower(), "passed": bool(result.passed),
                 "result": json_safe(result.to_dict())}
        entries.append(entry)
    failed = sum(1 for e in entries if not e["passed"])
    return {"gradbridge_report": 1, "checks": len(entries), "failed": failed, "entries": entries}


def write_json(path: PathLike, results: Sequence[Any], labels: Optional[Sequence[str]] = None) -> Path:
    """Write ``results`` as one JSON document to ``path`` (folders are created); returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(to_json_document(results, labels), indent=1))
    return target


def write_html(path: PathLike, results: Sequence[Any], labels: Optional[Sequence[str]] = None,
               title: str = "gradbridge report") -> Path:
    """Write ``results`` as one self-contained HTML page to ``path`` (folders are created).

    Failing inputs get a heatmap of analytic-minus-numeric over their elements and a step-size plot
    when matplotlib is installed (``pip install "gradbridge[plot]"``); without it the page has the
    tables only and says so.
    """
    from .html import render_html

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_html(results, _labels(results, labels), title=title), encoding="utf-8")
    return target
