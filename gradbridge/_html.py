"""Self-contained HTML rendering of reports (placeholder until the heatmap/plot version lands)."""

from __future__ import annotations

import html
from typing import Any, Optional, Sequence


def render_html(results: Sequence[Any], labels: Sequence[Optional[str]], title: str = "gradbridge report") -> str:
    body = []
    for label, result in zip(labels, results):
        body.append(f"<h2>{html.escape(label or '')}</h2><pre>{html.escape(str(result))}</pre>")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>" \
           + "".join(body) + "</body></html>"
