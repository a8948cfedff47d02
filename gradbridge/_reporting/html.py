"""A self-contained HTML page of reports: tables for every check, pictures for every failing input.

The page has no external resources (styles inline, pictures as base64 PNGs), so it can be attached
to a CI run or mailed as one file. Per failing input it shows a heatmap of analytic - numeric over the
input's elements and the step-size plot of its worst element; those need matplotlib
(``pip install "gradbridge[plot]"``), and without it the page says so and keeps the tables.
"""

from __future__ import annotations

import base64
import html
from typing import Any, List, Optional, Sequence

from .report import Report, RowResult
from .._complex import index_text

_STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1em; margin-top: 1.5em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
th { background: #f3f3f3; }
.pass { color: #1a7f37; font-weight: 600; } .fail { color: #cf222e; font-weight: 600; }
.na { color: #777; } .grade-correct { color: #1a7f37; } .grade-acceptable { color: #0969da; }
.grade-zero { color: #1a7f37; } .grade-suspicious { color: #9a6700; } .grade-wrong { color: #cf222e; font-weight: 600; }
.meta { color: #555; font-size: 0.9em; } .note { color: #555; font-size: 0.85em; margin: 0.1em 0; }
.pictures { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.pictures figure { margin: 0; } figcaption { font-size: 0.8em; color: #555; max-width: 560px; }
code, pre { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.9em; }
"""

_VERDICT = {"pass": ("ok", "pass"), "fail": ("FAIL", "fail"), "unsupported": ("n/a", "na"),
            "error": ("ERROR", "fail"), "unresolved": ("UNRESOLVED", "fail"),
            "nondeterministic": ("NONDET", "fail")}


def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    return f"{value:.4g}" if 1e-3 <= abs(value) < 1e5 else f"{value:.3e}"


def _image(png: bytes, css_class: str, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img class="{css_class}" alt="{_e(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _verdict(passed: bool) -> str:
    return '<span class="pass">PASSED</span>' if passed else '<span class="fail">FAILED</span>'


def _row_verdict(row: RowResult) -> str:
    if row.status == "no-gradient":
        text, css = ("none", "pass") if row.passed else ("NONE", "fail")
    else:
        text, css = _VERDICT.get(row.status, (row.status, "na"))
    return f'<span class="{css}">{_e(text)}</span>'


def _rows_table(report: Report) -> str:
    head = ("input", "output", "shape", "ad", "verdict", "grade", "rel err", "max |a-n|", "compared",
            "outside", "method")
    lines = ["<table class='rows'><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for row in report.rows:
        name = row.input if row.order == 1 else f"{row.input} (order {row.order})"
        cells = [_e(name), _e(row.output), _e(tuple(row.shape)), _e(row.analytic_mode), _row_verdict(row),
                 f'<span class="grade-{_e(row.grade)}">{_e(row.grade)}</span>', _num(row.rel_error),
                 _num(row.max_abs_error), str(row.compared), str(row.mismatches), _e(row.method)]
        lines.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _worst_table(row: RowResult) -> str:
    w = row.worst
    where = w.direction or f"{row.input}{index_text(w.input_index, row.input_complex)}"
    cells = [("element", f"{where} -> {row.output}{index_text(w.output_index, row.output_complex)}"),
             ("analytic (autodiff/grad)", repr(w.analytic)),
             ("numeric (finite differences)", repr(w.numeric) + (f" ({w.method})" if w.method else "")),
             ("|difference|", f"{_num(w.abs_error)} ({_num(w.ratio)}x the allowed {_num(w.allowed)})")]
    if w.fd_error is not None:
        cells.append(("estimated error of the finite difference", _num(w.fd_error)))
    if w.step is not None:
        cells.append(("step", _num(w.step)))
    return "<table class='worst'>" + "".join(f"<tr><th>{_e(k)}</th><td><code>{_e(v)}</code></td></tr>"
                                             for k, v in cells) + "</table>"


def _pictures(row: RowResult, plots: bool) -> str:
    if not plots:
        return ""
    from .plots import heatmap_png, step_plot_png

    figures = []
    if row.error_map is not None:
        figures.append(_image(heatmap_png(row), "heatmap", f"heatmap of analytic - numeric for {row.input}",
                              f"analytic - numeric for every element of {row.input} (its worst output entry); "
                              "outlined elements are outside tolerance"))
    if row.step_sweep is not None:
        figures.append(_image(step_plot_png(row.step_sweep), "step-plot",
                              f"step-size plot of {row.step_sweep.element}",
                              "finite-difference error against step size: a V of truncation and round-off "
                              "error around the best estimate; a level red line far above the V's bottom is a "
                              "wrong analytic value"))
    return f"<div class='pictures'>{''.join(figures)}</div>" if figures else ""


def _failing_details(report: Report, plots: bool) -> str:
    parts = []
    for row in report.rows:
        if row.passed or row.worst is None:
            continue
        parts.append(f"<h3>{_e(row.input)} -> {_e(row.output)}: {row.mismatches} of {row.compared} compared "
                     f"entries outside tolerance</h3>")
        if row.method.startswith("consistency"):
            parts.append(f"<p>reverse mode &lt;J^T v, u&gt; = <code>{row.worst.analytic!r}</code>, forward mode "
                         f"&lt;v, J u&gt; = <code>{row.worst.numeric!r}</code></p>")
        else:
            parts.append(_worst_table(row))
        if row.message:
            parts.append(f"<p class='note'>{_e(row.message)}</p>")
        parts.append(_pictures(row, plots))
    return "\n".join(parts)


def _kinks(report: Report) -> str:
    items = []
    for row in report.rows:
        for k in row.nondifferentiable:
            where = k.direction or f"{row.input}{index_text(k.input_index, row.input_complex)}"
            items.append(f"<li><code>{_e(where)} -> {_e(row.output)}{index_text(k.output_index, row.output_complex)}</code>: left "
                         f"{_num(k.left)}, right {_num(k.right)}, analytic {_num(k.analytic)} "
                         f"({'a valid subgradient' if k.subgradient else 'not a subgradient'})</li>")
    return f"<p>Non-differentiable points:</p><ul>{''.join(items)}</ul>" if items else ""


def render_report(report: Report, label: Optional[str], plots: bool, anchor: str) -> str:
    """One check: header, rows table, failing rows with their worst element and pictures."""
    title = f"{label} — " if label else ""
    parts = [f"<h2 id='{anchor}'>{_e(title)}check of <code>{_e(report.function)}</code>: "
             f"{_verdict(report.passed)}</h2>",
             f"<p class='meta'>{_e(report.summary())}<br>backend {_e(report.backend)} {_e(report.backend_version)}"
             f" | mode {_e(report.mode)} | order {report.order} | {report.evaluations} evaluations, "
             f"{report.vjps} VJPs, {report.jvps} JVPs | {report.seconds:.3f} s<br>tolerance: "
             f"{_e(report.tolerance)}<br>step: {_e(report.step)}</p>"]
    held = [c.name for c in report.contracts if c.passed and c.checked]
    if held:
        parts.append(f"<p class='note'>contracts held: {_e(', '.join(held))}</p>")
    parts.extend(f"<p class='note'>contract not checked: {_e(c.name)}: {_e(c.message)}</p>"
                 for c in report.contracts if not c.checked)
    parts.extend(f"<p class='fail'>contract VIOLATED: {_e(c.name)}: {_e(c.message)}</p>"
                 for c in report.contracts if not c.passed)
    parts.extend(f"<p class='note'>note: {_e(n)}</p>" for n in report.notes)
    if report.rows:
        parts.append(_rows_table(report))
    parts.append(_failing_details(report, plots))
    parts.append(_kinks(report))
    return "\n".join(parts)


def render_comparison(comparison: Any, label: Optional[str], plots: bool, anchor: str) -> str:
    """A cross-framework comparison: the pairwise table, the verdicts, then each implementation's check."""
    title = f"{label} — " if label else ""
    parts = [f"<h2 id='{anchor}'>{_e(title)}comparison of <code>{_e(comparison.function)}</code>: "
             f"{_verdict(comparison.passed)}</h2>",
             f"<p class='meta'>implementations: {_e(', '.join(comparison.implementations))} | "
             f"{comparison.seconds:.3f} s</p>"]
    parts.extend(f"<p class='note'>note: {_e(n)}</p>" for n in comparison.notes)
    head = ("pair", "quantity", "leaf", "verdict", "max |diff|", "max rel diff", "allowed", "worst index",
            "first", "second")
    lines = ["<table class='pairs'><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for p in comparison.pairs:
        verdict = '<span class="pass">agree</span>' if p.passed else '<span class="fail">DIFFER</span>'
        cells = [_e(f"{p.first} vs {p.second}"), _e(p.quantity), _e(p.leaf), verdict, _num(p.max_abs_diff),
                 _num(p.max_rel_diff), _num(p.allowed), _e(index_text(p.worst_index)), _num(p.first_value),
                 _num(p.second_value)]
        lines.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    lines.append("</table>")
    parts.append("\n".join(lines))
    if comparison.verdicts:
        parts.append("<ul>" + "".join(f"<li>{_e(v)}</li>" for v in comparison.verdicts) + "</ul>")
    for k, (name, report) in enumerate(comparison.checks.items()):
        parts.append(render_report(report, f"{label + ': ' if label else ''}{name}'s own check", plots,
                                   f"{anchor}-{k}"))
    return "\n".join(parts)


def render_html(results: Sequence[Any], labels: Sequence[Optional[str]], title: str = "gradbridge report") -> str:
    """The whole page: a summary table linking to one section per result."""
    from .plots import matplotlib_available

    plots = matplotlib_available()
    failed = sum(1 for r in results if not r.passed)
    summary = ["<table class='summary'><tr><th>#</th><th>label</th><th>what</th><th>verdict</th></tr>"]
    sections: List[str] = []
    for k, (label, result) in enumerate(zip(labels, results)):
        anchor = f"result-{k}"
        is_comparison = hasattr(result, "pairs")
        what = (f"compare {result.function}" if is_comparison
                else f"check {result.function} ({result.backend}, {result.mode})")
        summary.append(f"<tr><td>{k + 1}</td><td><a href='#{anchor}'>{_e(label or '-')}</a></td><td>{_e(what)}"
                       f"</td><td>{_verdict(result.passed)}</td></tr>")
        render = render_comparison if is_comparison else render_report
        sections.append(render(result, label, plots, anchor))
    summary.append("</table>")
    missing = "" if plots else ("<p class='note'>matplotlib is not installed, so this page has no heatmaps or "
                                "step-size plots: pip install \"gradbridge[plot]\"</p>")
    return ("<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>{_e(title)}</h1><p>{len(results)} result(s), {failed} failed.</p>{missing}"
            + "\n".join(summary) + "\n" + "\n".join(sections) + "</body></html>")
