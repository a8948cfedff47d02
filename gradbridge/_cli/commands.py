"""The ``gradbridge`` command line (click): ``demo``, ``backends`` and ``check FILE.py[::NAME]``.

Exit codes: 0 when everything is as expected, 1 when a check failed (or a demo verdict was not the
expected one), 2 for usage errors (bad options, a missing or broken case file, an unknown case name).

``main`` is the click group: the console script calls ``main()`` (click's standalone mode, which exits
the process), tests use click's ``CliRunner`` on it, and ``main(argv, standalone_mode=False)`` returns
the exit code as an int instead of exiting (errors are printed, as on the command line).

This is the only module that imports click; ``import gradbridge`` does not import it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import click

from .. import __version__, _registry
from .cases import (Case, CaseFileError, CaseOutcome, load_cases, missing_modules, parse_target, run_case,
                     select_case)

#: Exit codes.
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

_STATUS_STYLE = {"passed": ("passed", "green"), "failed": ("FAILED", "red"), "error": ("ERROR", "red"),
                 "skipped": ("skipped", "yellow")}


class CommandError(click.ClickException):
    """A problem with what the user asked for (a missing file, an unknown case): one line, exit code 2."""

    exit_code = EXIT_USAGE


def _out(text: str = "", **style: Any) -> None:
    """One line to stdout (the stream the reports are printed to), styled only on a terminal."""
    click.secho(text, file=sys.stdout, **style)


class _Main(click.Group):
    """The ``gradbridge`` group; ``standalone_mode=False`` returns the exit code instead of raising."""

    def main(self, args: Optional[Sequence[str]] = None, prog_name: Optional[str] = None,
             complete_var: Optional[str] = None, standalone_mode: bool = True, **extra: Any) -> Any:
        if standalone_mode:
            return super().main(args, prog_name, complete_var, True, **extra)
        try:  # called from Python: name the program as the console script does
            code = super().main(args, prog_name or "gradbridge", complete_var, False, **extra)
        except click.ClickException as exc:
            exc.show()
            return exc.exit_code
        except click.Abort:
            click.echo("Aborted!", err=True)
            return EXIT_FAILED
        return EXIT_OK if code is None else int(code)


@click.group(cls=_Main, name="gradbridge", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="gradbridge", message="%(prog)s %(version)s")
def main() -> None:
    """Check gradients (autodiff, custom backward passes, hand-written gradients) against finite
    differences, in NumPy, PyTorch, JAX and TensorFlow.

    \b
    Exit codes: 0 all as expected, 1 a check failed, 2 usage error.
    """


# ----------------------------------------------------------------------------------------------- export


@dataclass
class _Entry:
    """One line of the results: a demo case or a check case, for printing and for --json/--html."""

    label: str
    expect: str  # "pass" or "fail"
    outcome: str  # "passed", "failed", "error", "skipped"
    result: Any = None
    message: str = ""


def _case_counts(entries: Sequence[_Entry]) -> Dict[str, int]:
    count = lambda outcome: sum(1 for e in entries if e.outcome == outcome)  # noqa: E731
    return {"total": len(entries), "passed": count("passed"), "failed": count("failed") + count("error"),
            "errors": count("error"), "skipped": count("skipped")}


def _write_json(path: Path, entries: Sequence[_Entry]) -> None:
    """gradbridge's JSON report document (``gradbridge._reporting.export``) with the case layer added: per entry
    ``expect`` and ``outcome`` (``passed`` there is the check's own verdict), and ``cases`` counts."""
    from .._reporting.export import json_safe, to_json_document

    reported = [e for e in entries if e.result is not None]
    document = to_json_document([e.result for e in reported], [e.label for e in reported])
    by_entry = {id(e): d for e, d in zip(reported, document["entries"])}
    rows = []
    for entry in entries:
        row = by_entry.get(id(entry)) or {"label": entry.label, "kind": entry.outcome,
                                          "passed": False if entry.outcome == "error" else None, "result": None}
        row.update(expect=entry.expect, outcome=entry.outcome, message=entry.message)
        rows.append(row)
    document["entries"] = rows
    document["cases"] = _case_counts(entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(document), indent=1))


def _write_html(path: Path, entries: Sequence[_Entry], title: str) -> None:
    """The HTML page of every entry that has a report (errors and skips have none: the title counts them)."""
    from .._reporting.export import write_html

    reported = [e for e in entries if e.result is not None]
    labels = []
    for e in reported:
        if e.expect == "fail":
            labels.append(f"{e.label} (seeded bug, {'caught' if e.outcome == 'passed' else 'NOT caught'})")
        else:
            labels.append(e.label)
    left_out = len(entries) - len(reported)
    if left_out:
        title += f" ({left_out} case(s) without a report not shown: errors or skips)"
    write_html(path, [e.result for e in reported], labels, title=title)


def _export(entries: Sequence[_Entry], json_path: Optional[Path], html_path: Optional[Path], title: str) -> None:
    if json_path is not None:
        _write_json(json_path, entries)
        click.echo(f"wrote {json_path}", err=True)
    if html_path is not None:
        _write_html(html_path, entries, title)
        click.echo(f"wrote {html_path}", err=True)


_json_option = click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True, path_type=Path),
                            metavar="PATH", help="Also write the reports as one JSON document to PATH.")
_html_option = click.option("--html", "html_path", type=click.Path(dir_okay=False, writable=True, path_type=Path),
                            metavar="PATH", help="Also write a self-contained HTML page of the reports to PATH.")


def _print_report(result: Any) -> None:
    from .._reporting.terminal import print_report

    sys.stdout.flush()
    print_report(result)


# ------------------------------------------------------------------------------------------------- demo


@main.command()
@click.option("--backend", "backends", multiple=True, type=click.Choice(_registry.builtin_names()),
              help="Only this backend (repeatable). Default: every installed one.")
@_json_option
@_html_option
@click.pass_context
def demo(ctx: click.Context, backends: Tuple[str, ...], json_path: Optional[Path], html_path: Optional[Path]) -> None:
    """Check the built-in examples: per backend, correct gradients and a seeded bug.

    Exits 0 only when every correct example passes and every seeded bug is caught.
    """
    from ..backends.demos import demo_results, describe_expectation, describe_outcome

    available = _registry.available_backends()
    chosen = list(dict.fromkeys(backends))
    for name in chosen:
        if name not in available:
            raise CommandError(_not_available(name))
    if not chosen:
        chosen = available
        for name in _registry.names():
            if name not in available:
                _out(f"(skipping {name}: {_not_available(name)})", dim=True)
    entries: List[_Entry] = []
    surprises = []
    for result in demo_results(chosen):
        _out(f"== {result.label} ({describe_expectation(result.case)})", bold=True)
        if result.report is not None:
            _print_report(result.report)
        as_expected = result.as_expected
        _out(f"=> {describe_outcome(result)}", fg="green" if as_expected else "red")
        _out()
        outcome = "error" if result.error is not None else ("passed" if as_expected else "failed")
        entries.append(_Entry(result.label, result.expected, outcome, result.report, describe_outcome(result)))
        if not as_expected:
            surprises.append(result.label)
    _export(entries, json_path, html_path, "gradbridge demo")
    if surprises:
        _out("UNEXPECTED verdicts: " + "; ".join(surprises), fg="red", bold=True)
        ctx.exit(EXIT_FAILED)
    caught = sum(1 for e in entries if e.expect == "fail")
    _out(f"demo finished: every correct example passed ({len(entries) - caught}) and every seeded bug was caught "
         f"({caught}) ({', '.join(chosen)})", fg="green", bold=True)
    ctx.exit(EXIT_OK)


def _not_available(name: str) -> str:
    if not _registry.framework_installed(name):
        return f"{_registry.entry(name).framework_module} is not installed ({_registry.install_hint(name)})"
    return "this version of gradbridge has no adapter for it"


# --------------------------------------------------------------------------------------------- backends


def backend_rows() -> List[Dict[str, Any]]:
    """One dict per known backend; installed frameworks are imported and probed for float64 now."""
    import importlib

    rows = []
    for name, module_name in ((e.name, e.framework_module) for e in _registry.entries()):
        row: Dict[str, Any] = {"backend": name, "module": module_name,
                               "installed": _registry.framework_installed(name),
                               "adapter": _registry.adapter_exists(name), "version": None, "float64": None,
                               "note": "", "install_hint": None}
        if not row["installed"]:
            row["install_hint"] = _registry.install_hint(name)
            rows.append(row)
            continue
        try:
            if row["adapter"]:
                row["version"] = _registry.get_adapter(name).version()  # the adapter quiets TF's logging first
            else:
                row["version"] = str(getattr(importlib.import_module(module_name), "__version__", "?"))
        except Exception as exc:  # installed but broken
            row["note"] = f"importing {module_name} failed: {type(exc).__name__}: {exc}"
            rows.append(row)
            continue
        if not row["adapter"]:
            row["note"] = "no adapter for it in this version of gradbridge"
            rows.append(row)
            continue
        try:
            row["float64"], row["note"] = _registry.get_adapter(name).probe_float64()
        except Exception as exc:
            row["float64"], row["note"] = False, f"float64 probe failed: {type(exc).__name__}: {exc}"
        rows.append(row)
    return rows


def _yes(value: Optional[bool]) -> str:
    return "-" if value is None else ("yes" if value else "NO")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@click.pass_context
def backends(ctx: click.Context, as_json: bool) -> None:
    """Which frameworks are installed, their versions and float64 support (probed now)."""
    rows = backend_rows()
    if as_json:
        click.echo(json.dumps({"gradbridge": __version__, "backends": rows}, indent=1), file=sys.stdout)
        ctx.exit(EXIT_OK)
    head = ("backend", "installed", "version", "adapter", "float64", "notes")
    table = [head] + [(r["backend"], _yes(r["installed"]), r["version"] or "-", _yes(r["adapter"]),
                       _yes(r["float64"]), r["install_hint"] or r["note"]) for r in rows]
    widths = [max(len(line[k]) for line in table) for k in range(len(head) - 1)]
    for k, line in enumerate(table):
        text = "  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[-1]
        _out(text.rstrip(), bold=k == 0)
    ctx.exit(EXIT_OK)


# ------------------------------------------------------------------------------------------------ check


_CHECK_HELP = """Run the check cases declared in FILE.py (only case NAME with FILE.py::NAME).

\b
A case is a zero-argument function, decorated with @gradbridge.case, that builds its inputs and
returns the result of gb.check(...) (or gb.compare(...)):
\b
    import numpy as np
    import gradbridge as gb
\b
    @gb.case
    def square():
        return gb.check(lambda x: (x ** 2).sum(), np.arange(3.0), grad=lambda x: 2 * x)
\b
    @gb.case(name="seeded sign flip", expect="fail")   # passes when the check fails
    def sign_flip(): ...
\b
    @gb.case(requires="torch")                         # reported as skipped without torch
    def torch_function():
        import torch
        ...

Cases run in definition order; NAME is a case name or a function name. The file is imported with
its folder on sys.path. Exit codes: 0 every case as expected (skips allowed), 1 a case failed or
raised, 2 usage error (missing file, import error, no cases, unknown NAME).
"""


def _load_targets(targets: Sequence[str], show_traceback: bool) -> List[Case]:
    """Every case the targets name, in order, each once; any problem is a CommandError (exit 2)."""
    cases: List[Case] = []
    seen = set()
    loaded: Dict[Path, List[Case]] = {}
    for target in targets:
        try:
            path, name = parse_target(target)
            key = path.resolve()
            if key not in loaded:
                loaded[key] = load_cases(path)
            found = loaded[key]
            if name is not None:
                found = [select_case(found, name, key)]
        except CaseFileError as exc:
            if show_traceback and exc.details:
                click.echo(exc.details.rstrip(), err=True)
            hint = "" if show_traceback or not exc.details else " (--traceback shows the traceback)"
            raise CommandError(f"{exc}{hint}") from None
        for item in found:
            if id(item.function) not in seen:
                seen.add(id(item.function))
                cases.append(item)
    return cases


def _status_line(label: str, outcome: CaseOutcome) -> None:
    word, colour = _STATUS_STYLE[outcome.status]
    click.secho(f"{word:<7}", fg=colour, bold=True, nl=False, file=sys.stdout)
    _out(f" {label}: {outcome.message}")


@main.command(help=_CHECK_HELP, short_help="Run the check cases declared in a file.")
@click.argument("targets", nargs=-1, required=True, metavar="FILE.py[::NAME]...")
@_json_option
@_html_option
@click.option("--traceback", "show_traceback", is_flag=True,
              help="Show the full traceback of a case (or file) that raised.")
@click.option("-q", "--quiet", is_flag=True, help="Print only one line per case and the summary.")
@click.pass_context
def check(ctx: click.Context, targets: Tuple[str, ...], json_path: Optional[Path], html_path: Optional[Path],
          show_traceback: bool, quiet: bool) -> None:
    cases = _load_targets(targets, show_traceback)
    several_files = len({c.path for c in cases}) > 1
    entries: List[_Entry] = []
    for item in cases:
        label = f"{item.path.name}::{item.name}" if several_files else item.name
        if not quiet and not missing_modules(item.spec.requires):  # a skip is one status line
            expectation = "should pass" if item.expect == "pass" else "seeded bug: the check must fail"
            _out(f"== {label} ({expectation})", bold=True)
        outcome = run_case(item)
        if not quiet and outcome.result is not None:
            _print_report(outcome.result)
        _status_line(label, outcome)
        if outcome.details and show_traceback:
            _out(outcome.details.rstrip())
        if not quiet:
            _out()
        entries.append(_Entry(label, item.expect, outcome.status, outcome.result, outcome.message))
    title = "gradbridge check " + " ".join(targets)
    _export(entries, json_path, html_path, title)
    counts = _case_counts(entries)
    summary = f"{counts['total']} case{'' if counts['total'] == 1 else 's'}: {counts['passed']} passed, " \
              f"{counts['failed']} failed"
    if counts["errors"]:
        summary += f" ({counts['errors']} raised{'' if show_traceback else '; --traceback shows where'})"
    if counts["skipped"]:
        summary += f", {counts['skipped']} skipped"
    _out(summary, fg="red" if counts["failed"] else "green", bold=True)
    ctx.exit(EXIT_FAILED if counts["failed"] else EXIT_OK)


if __name__ == "__main__":  # pragma: no cover
    main()
