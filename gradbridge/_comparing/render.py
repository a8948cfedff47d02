"""The plain-text rendering of a :class:`~gradbridge._comparing.result.Comparison`.
"""

from __future__ import annotations

from typing import List, Sequence

import numpy as np

from typing import TYPE_CHECKING

from .._reporting.report import Report
from .._complex import index_text

if TYPE_CHECKING:
    from .result import Comparison

# --- text ---

def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if not np.isfinite(value):
        return str(value)
    return f"{value:.4g}" if 1e-3 <= abs(value) < 1e5 else f"{value:.3e}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    widths = [max([len(header[i])] + [len(r[i]) for r in rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def render_comparison(comparison: Comparison) -> str:
    """Plain text: header, pairwise table, verdicts, each own check's summary and failing details, notes."""
    verdict = "PASSED" if comparison.passed else "FAILED"
    lines = [f"gradbridge compare of {comparison.function}: {verdict}  ({comparison.summary().split(': ', 1)[-1]})",
             "  implementations: " + ", ".join(f"{label} ({comparison.backends.get(label, '?')})"
                                               for label in comparison.implementations)
             + f" | {comparison.seconds:.3f} s",
             f"  tolerance: {comparison.tolerance}", ""]
    shown = list(comparison.pairs) + [p for p in comparison.other_points if not p.passed]  # elsewhere: differences
    rows = [[f"{p.first} vs {p.second}", p.quantity, p.leaf + (f" @ point {p.point + 1}" if p.point else ""), _fmt(p.max_abs_diff), _fmt(p.max_rel_diff),
             "ok" if p.passed else "DIFFER",
             "" if p.passed else f"{element_at(p.leaf, p.worst_index, p.leaf in comparison.complex_leaves)}: {p.first_value:.10g} vs {p.second_value:.10g}"
             + (f" ({p.mismatches} of {int(np.prod(p.shape, dtype=np.int64))} outside)" if p.shape else "")]
            for p in shown]
    lines.extend(_table(("pair", "quantity", "leaf", "max |a-b|", "rel diff", "verdict", "worst element"), rows))
    if comparison.verdicts:
        lines.append("")
        lines.append("Verdicts:")
        lines.extend(f"  - {sentence}" for sentence in comparison.verdicts)
    if comparison.patterns:
        lines.append("")
        lines.append("Patterns of the differences:")
        lines.extend(f"  - {sentence}" for sentence in comparison.patterns)
    if comparison.layers:
        lines.append("")
        lines.append("Layer by layer:")
        lines.extend(f"  - {divergence.sentence()}" for divergence in comparison.layers)
    if comparison.checks:
        lines.append("")
        lines.append("Own finite-difference checks:")
        width = max(len(label) for label in comparison.checks)
        for label, report in comparison.checks.items():
            lines.append(f"  {label.ljust(width)}  {report.summary()}")
            lines.extend(_failure_lines(report))
    lines.append("")
    lines.extend(f"  note: {note}" for note in comparison.notes)
    return "\n".join(lines).rstrip() + "\n"


def _failure_lines(report: Report) -> List[str]:
    lines = []
    for row in report.failures:
        text = f"      {row.input} -> {row.output}: {row.status}"
        if row.worst is not None:
            w = row.worst
            index = index_text(w.input_index, row.input_complex)
            text += (f", {row.mismatches} of {row.compared} entries outside tolerance; worst {row.input}{index}: "
                     f"analytic {w.analytic:.10g} vs numeric {w.numeric:.10g}")
        elif row.message:
            text += f": {row.message}"
        lines.append(text)
    return lines


def element_at(leaf: str, index: Sequence[int], complex_view: bool = False) -> str:
    """``leaf[i, j]`` (just ``leaf`` for a scalar; ``leaf[i].imag`` for an element of a complex value's real view)."""
    return f"{leaf}{index_text(index, complex_view)}" if index else leaf


def joined(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def quoted(names: Sequence[str]) -> str:
    return joined([f"'{n}'" for n in names])


def failed_rows(report: Report) -> List[str]:
    return list(dict.fromkeys(row.input for row in report.rows if not row.passed))
