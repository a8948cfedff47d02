"""The gradbridge pytest plugin, loaded automatically (``pytest11`` entry point) wherever gradbridge is
installed. Disable it with ``-p no:gradbridge``.

Provides:

* ``gradcheck``: a fixture; ``gradcheck(fn, *args, **options)`` runs :func:`gradbridge.check` and fails
  the test with the report as the message (the verdict, the failing blocks and their worst elements)
  when the gradients are wrong; returns the report when they are right.
* ``gb_backend``: a fixture parametrized over every backend (missing frameworks are visible skips);
  see also :mod:`gradbridge.testing` for ``parametrize_backends``.
* ``--gradbridge-report=PATH``: every check (and comparison) finished during the session, labelled with
  the test's node id, written as JSON to PATH and as HTML next to it.
* ``--gradbridge-mode`` / ini ``gradbridge_mode``: the default ``mode=`` of ``gradcheck``.
* ``--gradbridge-require-backends`` / ini ``gradbridge_require_backends``: a missing backend fails
  instead of skipping.

Loading it is cheap: it imports no framework and nothing of gradbridge beyond what ``import
gradbridge`` already loads; the fixtures import the rest when used.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

MODES = ("auto", "full", "fast")
_REPORT_PLUGIN_NAME = "gradbridge-report"
_WORKER_KEY = "gradbridge_results"
MARKER_NAME = "gradbridge_backend"  # the marker gradbridge.testing puts on every backend parameter


# --------------------------------------------------------------------------------------------- options

def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradbridge", "gradbridge gradient checks")
    group.addoption("--gradbridge-report", dest="gradbridge_report", metavar="PATH", default=None,
                    help="write every gradient check of the session to PATH as JSON and next to it as HTML "
                         "(PATH with suffix .html); a PATH ending in .html gets the HTML, the JSON goes to "
                         "PATH with suffix .json")
    group.addoption("--gradbridge-mode", dest="gradbridge_mode", choices=MODES, default=None,
                    help="default mode= of the gradcheck fixture (overrides the ini option gradbridge_mode)")
    group.addoption("--gradbridge-require-backends", dest="gradbridge_require_backends", action="store_true",
                    default=False,
                    help="a backend whose framework is not installed fails instead of skipping "
                         "(the ini option gradbridge_require_backends does the same)")
    parser.addini("gradbridge_mode", default="",
                  help="default mode= of the gradcheck fixture: auto, full or fast (default: gradbridge's own)")
    parser.addini("gradbridge_require_backends", type="bool", default=False,
                  help="true: a backend whose framework is not installed fails instead of skipping")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "gradbridge_backend(name): the test runs on this gradbridge backend (set by "
                   "gradbridge.testing.parametrize_backends / backends_params and the gb_backend fixture)")
    _default_mode(config)  # a bad ini value is a usage error now, not a failure in every test
    path = config.getoption("gradbridge_report", None)
    if path:
        collector = _ReportCollector(config, Path(config.invocation_params.dir, path).expanduser())
        config.pluginmanager.register(collector, _REPORT_PLUGIN_NAME)


def _default_mode(config: pytest.Config) -> Optional[str]:
    mode = config.getoption("gradbridge_mode", None) or str(config.getini("gradbridge_mode") or "").strip()
    if not mode:
        return None
    if mode not in MODES:
        raise pytest.UsageError(f"gradbridge_mode: expected one of {', '.join(MODES)}, got {mode!r}")
    return mode


def _require_all(config: pytest.Config) -> bool:
    return bool(config.getoption("gradbridge_require_backends", False) or config.getini("gradbridge_require_backends"))


# ------------------------------------------------------------------------------------------- gradcheck

class GradCheck:
    """The ``gradcheck`` fixture's value: call it like :func:`gradbridge.check`.

    ``gradcheck(fn, *args, **options)`` returns the :class:`~gradbridge.Report` when the check passes and
    fails the test with the report as the message when it does not. ``defaults`` (from
    ``--gradbridge-mode`` / ``gradbridge_mode``) apply where the call does not say otherwise.
    """

    def __init__(self, defaults: Optional[Dict[str, Any]] = None) -> None:
        self.defaults: Dict[str, Any] = dict(defaults or {})

    def __call__(self, fn: Any, *args: Any, **options: Any) -> Any:
        __tracebackhide__ = True
        import gradbridge

        report = gradbridge.check(fn, *args, **{**self.defaults, **options})
        if not report.passed:
            raise gradbridge.GradientCheckError(report)
        return report

    def compare(self, *args: Any, **options: Any) -> Any:
        """Run ``gradbridge.compare(*args, **options)``; fail the test with the comparison as the
        message when it does not pass, return it when it does."""
        __tracebackhide__ = True
        import gradbridge

        if not hasattr(gradbridge, "compare"):
            raise NotImplementedError(f"this gradbridge ({gradbridge.__version__}) has no compare()")
        comparison = gradbridge.compare(*args, **options)
        if not comparison.passed:
            raise AssertionError(f"gradbridge comparison failed\n{comparison}")
        return comparison

    def __repr__(self) -> str:
        return f"<gradcheck defaults={self.defaults!r}>"


@pytest.fixture
def gradcheck(request: pytest.FixtureRequest) -> GradCheck:
    """Check gradients, failing the test with gradbridge's report when they are wrong.

    ``report = gradcheck(fn, *args, **options)`` takes :func:`gradbridge.check`'s arguments (``mode=``,
    ``kinks=``, ``wrt=``, ``grad=``, ...). ``gradcheck.compare(...)`` does the same for
    ``gradbridge.compare`` where this gradbridge has it.
    """
    mode = _default_mode(request.config)
    return GradCheck({"mode": mode} if mode else {})


# ---------------------------------------------------------------------------------------------- backends

@pytest.fixture
def gb_backend(request: pytest.FixtureRequest) -> str:
    """The name of a gradbridge backend: the test runs once per backend (numpy, torch, jax, tensorflow).

    A backend whose framework is not installed is a visible skip with the install hint (an error with
    ``gradbridge_require_backends = true``).
    """
    return request.param


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Parametrized here rather than with fixture params so that installed-or-not is decided at collection
    # (not when this plugin is imported) and the skips carry the test's own location.
    if "gb_backend" not in metafunc.fixturenames or _parametrized_directly(metafunc, "gb_backend"):
        return
    from .testing import backends_params

    metafunc.parametrize("gb_backend", backends_params(), indirect=True)


def _parametrized_directly(metafunc: pytest.Metafunc, argname: str) -> bool:
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        if argname in names:
            return True
    return False


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Runs before pytest's own skip marks are evaluated (tryfirst; plugins registered after the builtin
    # ones are called first), so a required backend fails instead of being skipped.
    if not _require_all(item.config):
        return
    for mark in item.iter_markers(MARKER_NAME):
        name = mark.kwargs.get("name", mark.args[0] if mark.args else None)
        if name is None:
            continue
        from .testing import missing_reason, requirable

        reason = missing_reason(name)
        if reason is not None and requirable(name):
            pytest.fail(f"every backend is required (gradbridge_require_backends): {reason}", pytrace=False)



# ------------------------------------------------------------------------------------ session report

class _ReportCollector:
    """Collects every finished check/comparison of the session (a gradbridge listener), labelled with the
    running test's node id, and writes them at the end of the session.

    Under pytest-xdist each worker collects its own and sends them (pickled) to the controller, which
    writes the one report.
    """

    def __init__(self, config: pytest.Config, path: Path) -> None:
        self.config = config
        self.json_path, self.html_path = report_paths(path)
        self.results: List[Any] = []
        self.labels: List[Optional[str]] = []
        self.current: Optional[str] = None
        self.written: List[Path] = []
        self.problems: List[str] = []
        self.worker = hasattr(config, "workerinput")
        from . import _hooks

        _hooks.add_listener(self._listen)

    def _listen(self, result: Any) -> None:
        self.results.append(result)
        self.labels.append(self.current)

    @pytest.hookimpl
    def pytest_runtest_logstart(self, nodeid: str, location: Tuple[str, Optional[int], str]) -> None:
        self.current = nodeid

    @pytest.hookimpl
    def pytest_runtest_logfinish(self, nodeid: str, location: Tuple[str, Optional[int], str]) -> None:
        self.current = None

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:  # xdist controller: a worker finished
        payload = getattr(node, "workeroutput", {}).get(_WORKER_KEY)
        if payload is None:
            return
        try:
            labels, results = pickle.loads(payload)
        except Exception as exc:  # noqa: BLE001 - a worker's report must not crash the session
            self.problems.append(f"the checks of worker {getattr(node, 'gateway', node)} were lost: {exc}")
            return
        self.labels.extend(labels)
        self.results.extend(results)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.worker:
            try:
                payload = pickle.dumps((self.labels, self.results))
            except Exception as exc:  # noqa: BLE001
                payload = pickle.dumps(([], []))
                self.problems.append(f"could not send this worker's checks to the controller: {exc}")
            self.config.workeroutput[_WORKER_KEY] = payload
            return
        from ._reporting import export as _export

        try:
            self.written.append(_export.write_json(self.json_path, self.results, self.labels))
        except Exception as exc:  # noqa: BLE001 - say so in the summary; the test outcomes stand
            self.problems.append(f"could not write {self.json_path}: {type(exc).__name__}: {exc}")
        try:
            self.written.append(_export.write_html(self.html_path, self.results, self.labels,
                                                   title=f"gradbridge report: {session.name}"))
        except Exception as exc:  # noqa: BLE001
            self.problems.append(f"could not write {self.html_path}: {type(exc).__name__}: {exc}")

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.worker:
            return
        failed = sum(1 for r in self.results if not r.passed)
        line = f"gradbridge: {_plural(len(self.results), 'check')}, {failed} failed"
        if self.written:
            line += "; report written to " + " and ".join(str(p) for p in self.written)
        terminalreporter.write_sep("-", line)
        for problem in self.problems:
            terminalreporter.write_line(f"gradbridge: {problem}", red=True)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        from . import _hooks

        _hooks.remove_listener(self._listen)
        config.pluginmanager.unregister(self)


def report_paths(path: Path) -> Tuple[Path, Path]:
    """(JSON path, HTML path) for ``--gradbridge-report=path``: the HTML goes next to the JSON with suffix
    ``.html``; a path ending in ``.html`` gets the HTML and the JSON goes next to it with suffix ``.json``."""
    if path.suffix.lower() in (".html", ".htm"):
        return path.with_suffix(".json"), path
    return path, path.with_suffix(".html")


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")
