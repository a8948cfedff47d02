"""Coloured terminal rendering of a report with rich: the same content as the plain text, with the
verdicts and grades in colour and the rows in a table. Imported only when printing to a terminal."""

from __future__ import annotations

from typing import Any, List

from rich.console import Group
from rich.table import Table
from rich.text import Text

from .render import ROW_HEADER, detail_lines, header_lines, row_cells
from .report import Report

GRADE_STYLES = {"correct": "green", "zero": "green", "acceptable": "cyan", "suspicious": "yellow", "wrong": "bold red"}
VERDICT_STYLES = {"ok": "bold green", "FAIL": "bold red", "ERROR": "bold red", "NONE": "bold red",
                  "none": "green", "n/a": "dim", "UNRESOLVED": "bold red", "NONDET": "bold red", "jump": "bold yellow"}


def _styled_line(line: str) -> Text:
    text = Text(line)
    text.highlight_words(["PASSED"], "bold green")
    text.highlight_words(["FAILED"], "bold red")
    if line.lstrip().startswith(("note:", "tolerance:", "step:")):
        text.stylize("dim")
    return text


def report_renderable(report: Report) -> Any:
    """A rich renderable of ``report``: header, coloured table, details of failing rows."""
    parts: List[Any] = [_styled_line(line) for line in header_lines(report)]
    if report.rows:
        table = Table(show_edge=False, header_style="bold", pad_edge=False, box=None, padding=(0, 1))
        for name in ROW_HEADER:
            table.add_column(name, no_wrap=name in ("input", "verdict", "grade"))
        verdict_at, grade_at = ROW_HEADER.index("verdict"), ROW_HEADER.index("grade")
        for row in report.rows:
            cells: List[Any] = list(row_cells(row))
            cells[verdict_at] = Text(cells[verdict_at], style=VERDICT_STYLES.get(cells[verdict_at], ""))
            cells[grade_at] = Text(cells[grade_at], style=GRADE_STYLES.get(cells[grade_at], ""))
            table.add_row(*cells)
        parts.append(Text(""))
        parts.append(table)
    for line in detail_lines(report):
        text = _styled_line(line)
        if "worst element" in line or "outside tolerance" in line:
            text.stylize("bold")
        parts.append(text)
    return Group(*parts)
