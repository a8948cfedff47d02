"""Plain-text rendering of a :class:`~gradbridge._reporting.report.Report` (terminal and CI logs)."""

from __future__ import annotations

from typing import List, Sequence

from .report import Report, RowResult
from .._complex import index_text


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    return f"{value:.4g}" if 1e-3 <= abs(value) < 1e5 else f"{value:.3e}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def row_cells(row: RowResult) -> List[str]:
    """The cells of one row of the table, in :data:`ROW_HEADER` order."""
    name = row.input if row.order == 1 else f"{row.input} (order {row.order})"
    verdict = {"pass": "jump" if row.jumps else "ok", "fail": "FAIL", "unsupported": "n/a", "error": "ERROR",
               "unresolved": "UNRESOLVED", "nondeterministic": "NONDET", "no-gradient": "none" if row.passed else "NONE"}[row.status]
    if row.status in ("unsupported", "error"):
        return [name, row.output, str(tuple(row.shape)), row.analytic_mode, verdict, "-", "-", "-", "-"]
    worst = "-"
    if row.method.startswith("consistency"):
        worst = "<J^T v, u> vs <v, J u>"
    elif row.worst is not None and row.output == "v.out":
        worst = "(random projections)"
    elif row.worst is not None:
        where = row.worst.direction or f"{row.input}{index_text(row.worst.input_index, row.input_complex)}"
        worst = f"{where} -> {row.output}{index_text(row.worst.output_index, row.output_complex)}"
    return [name, row.output, str(tuple(row.shape)), row.analytic_mode, verdict, row.grade, _fmt(row.rel_error),
            _fmt(row.max_abs_error), worst]


ROW_HEADER = ("input", "output", "shape", "ad", "verdict", "grade", "rel err", "max |a-n|", "worst element")


def header_lines(report: Report) -> List[str]:
    """The verdict line, then backend/mode/cost, tolerance, step and notes."""
    verdict = "PASSED" if report.passed else "FAILED"
    lines = [f"gradbridge check of {report.function}: {verdict}  ({report.summary()})",
             f"  backend {report.backend} {report.backend_version} | mode {report.mode} | order {report.order} | "
             f"{report.evaluations} evaluations, {report.vjps} VJPs, {report.jvps} JVPs | {report.seconds:.3f} s",
             f"  tolerance: {report.tolerance}",
             f"  step:      {report.step}"]
    if report.strategy:
        lines.append(f"  strategy:  {'; '.join(report.strategy)}")
    held = [c.name for c in report.contracts if c.passed and c.checked]
    if held:
        lines.append(f"  contracts: held: {', '.join(held)}")
    lines.extend(f"  contract not checked: {c.name}: {c.message}" for c in report.contracts if not c.checked)
    lines.extend(f"  contract VIOLATED: {c.name}: {c.message}" for c in report.contracts if not c.passed)
    lines.extend(f"  note: {note}" for note in report.notes)
    return lines


def detail_lines(report: Report) -> List[str]:
    """Below the table: the worst element of each failing row, messages, non-differentiable points."""
    lines: List[str] = []
    detailed = [r for r in report.rows if r.worst is not None and not r.passed]
    for row in detailed:
        w = row.worst
        lines.append("")
        lines.append(f"  {row.input} -> {row.output}: {row.mismatches} of {row.compared} compared entries outside "
                     f"tolerance ({row.method}, {row.analytic_mode}-mode analytic)")
        if row.method.startswith("consistency"):
            lines.append("    the two AD modes, no finite differences:")
            lines.append(f"      reverse mode <J^T v, u>: {w.analytic!r}")
            lines.append(f"      forward mode <v, J u>:   {w.numeric!r}")
        else:
            where = w.direction or f"{row.input}{index_text(w.input_index, row.input_complex)}"
            lines.append(f"    worst element {where} -> {row.output}{index_text(w.output_index, row.output_complex)}:")
            lines.append(f"      analytic (autodiff/grad): {w.analytic!r}")
            lines.append(f"      numeric (finite diff.):   {w.numeric!r}" + (f"  ({w.method})" if w.method else ""))
        step = "" if w.step is None else f", step {w.step:.3g}"
        lines.append(f"      |difference| {_fmt(w.abs_error)} vs allowed {_fmt(w.allowed)} "
                     f"({_fmt(w.ratio)}x over{step})")
        if w.fd_error is not None:
            times = w.times_error
            lines.append(f"      estimated numerical error of the finite difference: {_fmt(w.fd_error)}"
                         + (f"; the difference is {_fmt(times)}x that" if times is not None and times != float("inf")
                            else ""))
        if row.message:
            lines.append(f"    {row.message}")
    for row in report.rows:  # rows with something to say and no worst element (unsupported, errors, refined)
        if row.message and (row.passed or row.worst is None):
            lines.append(f"  {row.input} -> {row.output}: {row.message}")
    lines.extend(_kink_lines(report))
    return lines


def render_text(report: Report) -> str:
    """The report as a plain-text block: a header, a table, and the worst elements of failing rows."""
    lines = header_lines(report)
    if report.rows:
        lines.append("")
        lines.extend("  " + l for l in _table(ROW_HEADER, [row_cells(r) for r in report.rows]))
    lines.extend(detail_lines(report))
    return "\n".join(lines)


def _kink_lines(report: Report) -> List[str]:
    """The non-differentiable points, with both one-sided values and whether the analytic one is between."""
    lines: List[str] = []
    for row in report.rows:
        for k in row.nondifferentiable:
            where = k.direction or f"{row.input}{index_text(k.input_index, row.input_complex)}"
            if k.discontinuous:
                verdict = ("one of them: the derivative of the branch fn takes" if k.subgradient
                           else "NEITHER of them: wrong on both sides")
                lines.append(f"    discontinuity {where} -> {row.output}{index_text(k.output_index, row.output_complex)}: fn jumps by "
                             f"{_fmt(k.jump)}; derivative on the left {_fmt(k.left)}, on the right {_fmt(k.right)}; "
                             f"analytic {_fmt(k.analytic)} ({verdict})")
                continue
            verdict = "a valid subgradient" if k.subgradient else "NOT between them: not a subgradient"
            lines.append(f"    non-differentiable point {where} -> {row.output}{index_text(k.output_index, row.output_complex)}: one-sided "
                         f"left {_fmt(k.left)}, right {_fmt(k.right)}; analytic {_fmt(k.analytic)} ({verdict})")
        if row.kinks + row.jumps > len(row.nondifferentiable):
            lines.append(f"    ... and {row.kinks + row.jumps - len(row.nondifferentiable)} more in "
                         f"{row.input} -> {row.output}")
    if lines:
        lines.insert(0, "")
        lines.insert(1, "  non-differentiable points (the one-sided differences disagree beyond their error and do "
                        "not converge as the step shrinks; at a discontinuity fn itself jumps):")
    return lines
