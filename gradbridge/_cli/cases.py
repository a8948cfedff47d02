"""Check cases: ``@gradbridge.case`` declares them in a file, ``gradbridge check FILE.py`` runs them.

A case is a zero-argument function that builds its inputs and returns the result of ``gb.check(...)``
(or of ``gb.compare(...)``: anything with ``passed``, ``to_dict()`` and a readable ``str()``)::

    import numpy as np
    import gradbridge as gb

    @gb.case
    def softmax_grad():
        x = np.random.default_rng(0).normal(size=5)
        return gb.check(softmax_loss, x, grad=softmax_loss_grad)

    @gb.case(name="dropped batch sum", expect="fail")     # a seeded bug: the case passes when the check fails
    def dropped_sum():
        ...

    @gb.case(requires="torch")                             # skipped, and said so, where torch is not installed
    def torch_custom_function():
        import torch
        ...

The decorator only marks the function (attribute ``__gradbridge_case__``) and returns it unchanged,
so it can still be called directly (from a pytest test, say). Everything here is independent of the
command line (no click): :func:`load_cases` imports a file and collects its cases in definition order,
:func:`run_case` runs one and says whether it met its expectation.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import inspect
import re
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

from .._errors import GradbridgeError, InvalidArgumentError

#: The attribute ``@case`` sets on a function (a :class:`CaseSpec`).
CASE_ATTRIBUTE = "__gradbridge_case__"
EXPECTATIONS = ("pass", "fail")
#: How a target names one case of a file: ``FILE.py::NAME``.
SEPARATOR = "::"

HOW_TO_DECLARE = ("decorate a zero-argument function that returns gb.check(...) with @gradbridge.case "
                  "(see `gradbridge check --help`)")


@dataclass(frozen=True)
class CaseSpec:
    """What ``@case`` records: the case's name, whether the check should pass or fail, what it needs."""

    name: str
    expect: str = "pass"
    requires: Tuple[str, ...] = ()


def case(fn: Optional[Callable[[], Any]] = None, *, name: Optional[str] = None, expect: str = "pass",
         requires: Union[str, Sequence[str]] = ()) -> Any:
    """Declare a check case: ``@gb.case`` or ``@gb.case(name=..., expect=..., requires=...)``.

    The function takes no arguments, builds its inputs and returns the result of ``gb.check(...)``
    (or ``gb.compare(...)``). ``gradbridge check FILE.py`` runs every case of the file.

    Args:
        name: the case's name in reports and in ``FILE.py::NAME`` (default: the function's name).
        expect: ``"pass"`` (default) or ``"fail"``: a seeded-bug case, which passes when the check fails
            (the check caught the bug) and fails when the check passes.
        requires: module name(s) the case needs (``"torch"``, ``("jax", "flax")``). When one is not
            installed the case is reported as skipped, naming the module, instead of failing. Import
            them inside the function, so the file itself imports without them.

    Returns:
        the function itself, marked (it stays callable).
    """
    if expect not in EXPECTATIONS:
        raise InvalidArgumentError(f"case: expect must be 'pass' or 'fail', got {expect!r}")
    if name is not None and (not isinstance(name, str) or not name.strip() or SEPARATOR in name):
        raise InvalidArgumentError(f"case: name must be a non-empty string without '{SEPARATOR}', got {name!r}")
    needs = (requires,) if isinstance(requires, str) else tuple(requires)
    if not all(isinstance(m, str) and m for m in needs):
        raise InvalidArgumentError(f"case: requires must be module names, got {requires!r}")

    def mark(function: Callable[[], Any]) -> Callable[[], Any]:
        if not callable(function):
            raise InvalidArgumentError(f"case: expected a function, got {type(function).__name__}")
        label = getattr(function, "__name__", None)
        _check_no_required_arguments(function, name or label)
        setattr(function, CASE_ATTRIBUTE, CaseSpec(name=name or str(label), expect=expect, requires=needs))
        return function

    if fn is not None:
        if name is None and expect == "pass" and not needs:
            return mark(fn)  # plain @gb.case
        raise InvalidArgumentError("case: use @gb.case or @gb.case(name=..., expect=..., requires=...)")
    return mark


def _check_no_required_arguments(function: Callable[..., Any], label: Optional[str]) -> None:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    required = [p.name for p in signature.parameters.values()
                if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if required:
        raise InvalidArgumentError(
            f"case {label!r}: a case takes no arguments (it builds its own inputs); it requires "
            + ", ".join(required))


class CaseFileError(GradbridgeError):
    """A case file or case name that cannot be used: missing file, import error, unknown name, no cases.

    ``details`` holds the full traceback of an import error (shown by ``--traceback``).
    """

    def __init__(self, message: str, details: Optional[str] = None):
        super().__init__(message)
        self.details = details


@dataclass
class Case:
    """A declared case found in a file."""

    function: Callable[[], Any]
    spec: CaseSpec
    path: Path

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def expect(self) -> str:
        return self.spec.expect

    @property
    def function_name(self) -> str:
        return str(getattr(self.function, "__name__", self.spec.name))


@dataclass
class CaseOutcome:
    """What running a case gave.

    ``status``: ``"passed"`` (the check's verdict is the expected one), ``"failed"`` (it is not),
    ``"error"`` (the case raised or returned no report; counts as failed) or ``"skipped"`` (a module in
    ``requires`` is missing). ``result`` is the report when there is one; ``message`` one line saying
    why; ``details`` the full traceback of an error.
    """

    case: Case
    status: str
    result: Any = None
    message: str = ""
    details: Optional[str] = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """False for a failed or errored case (what makes ``gradbridge check`` exit 1)."""
        return self.status in ("passed", "skipped")


def parse_target(text: str) -> Tuple[Path, Optional[str]]:
    """``"path/cases.py::name"`` -> (path, "name"); ``"path/cases.py"`` -> (path, None)."""
    path, sep, name = str(text).rpartition(SEPARATOR)
    if not sep:
        return Path(text), None
    if not name:
        raise CaseFileError(f"{text}: nothing after '{SEPARATOR}'; give a case name or leave '{SEPARATOR}' off")
    return Path(path), name


@contextmanager
def _folder_on_path(folder: Path) -> Iterator[None]:
    """The case file's folder first on ``sys.path``, so it can import its neighbours (as pytest does)."""
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        try:
            sys.path.remove(entry)
        except ValueError:  # the case removed it itself
            pass


def _module_name(path: Path) -> str:
    stem = re.sub(r"\W", "_", path.stem)
    return f"_gradbridge_cases_{stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"


def _user_traceback(exc: BaseException, path: Path, skip_to_file: bool) -> Optional[TracebackType]:
    """The traceback from the first frame in the user's file (dropping gradbridge's and importlib's)."""
    tb = exc.__traceback__
    if not skip_to_file:
        return tb.tb_next if tb is not None else None  # drop run_case's own frame
    while tb is not None and Path(tb.tb_frame.f_code.co_filename) != path:
        tb = tb.tb_next
    return tb


def _describe(exc: BaseException, path: Path) -> str:
    """``ZeroDivisionError: division by zero (cases.py, line 12)`` on one line."""
    lines = str(exc).strip().splitlines()
    text = type(exc).__name__ + (f": {lines[0]}" if lines else "") + (" ..." if len(lines) > 1 else "")
    if isinstance(exc, SyntaxError):
        return text  # its message already names the file and line
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename) == path:
            line = tb.tb_lineno
        tb = tb.tb_next
    return text + (f" ({path.name}, line {line})" if line is not None else "")


def _format_traceback(exc: BaseException, tb: Optional[TracebackType]) -> str:
    return "".join(traceback.format_exception(type(exc), exc, tb))


def import_case_file(path: Path) -> ModuleType:
    """Import the file at ``path`` under a module name of its own (its folder on ``sys.path`` meanwhile).

    Raises:
        CaseFileError: the file is missing, not a file, or raised while being imported.
    """
    if not path.exists():
        raise CaseFileError(f"{path}: no such file")
    if not path.is_file():
        raise CaseFileError(f"{path}: not a file (give a .py file of check cases)")
    path = path.resolve()
    name = _module_name(path)
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses, pickling and typing look the module up by name
    try:
        with _folder_on_path(path.parent):
            loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        sys.modules.pop(name, None)
        details = _format_traceback(exc, _user_traceback(exc, path, skip_to_file=True))
        raise CaseFileError(f"{path.name}: importing the file raised {_describe(exc, path)}", details) from None
    return module


def collect_cases(module: ModuleType, path: Path) -> List[Case]:
    """The module's ``@case`` functions, in definition order (each function once)."""
    found: List[Case] = []
    seen = set()
    for value in list(vars(module).values()):
        try:
            spec = getattr(value, CASE_ATTRIBUTE, None)
        except Exception:  # objects with odd __getattr__
            continue
        if isinstance(spec, CaseSpec) and id(value) not in seen:
            seen.add(id(value))
            found.append(Case(function=value, spec=spec, path=path))
    names = {}
    for item in found:
        if item.name in names:
            raise CaseFileError(f"{path.name}: two cases are named {item.name!r} (functions "
                                f"{names[item.name].function_name} and {item.function_name}); give one of them "
                                "another name=")
        names[item.name] = item
    return found


def _case_list(cases: Sequence[Case]) -> str:
    return ", ".join(c.name if c.name == c.function_name else f"{c.name} (function {c.function_name})"
                     for c in cases)


def select_case(cases: Sequence[Case], name: str, path: Path) -> Case:
    """The case called ``name`` (its case name first, else its function name)."""
    for attribute in ("name", "function_name"):
        for item in cases:
            if getattr(item, attribute) == name:
                return item
    raise CaseFileError(f"{path.name}: no case named {name!r}; its cases: {_case_list(cases)}")


def load_cases(path: Union[str, Path], name: Optional[str] = None) -> List[Case]:
    """Import ``path`` and return its cases (only the one called ``name`` when given).

    Raises:
        CaseFileError: the file cannot be imported, declares no case, or has no case called ``name``.
    """
    path = Path(path)
    module = import_case_file(path)
    resolved = path.resolve()
    cases = collect_cases(module, resolved)
    if not cases:
        raise CaseFileError(f"{path.name}: no check cases found; {HOW_TO_DECLARE}")
    if name is not None:
        return [select_case(cases, name, resolved)]
    return cases


def is_result(value: Any) -> bool:
    """A report or comparison: has ``passed`` and ``to_dict()``."""
    return hasattr(value, "passed") and callable(getattr(value, "to_dict", None))


def missing_modules(modules: Sequence[str]) -> List[str]:
    """The modules of ``modules`` that cannot be imported here (found without importing them)."""
    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a dotted name whose parent is missing
            found = False
        if not found:
            missing.append(module)
    return missing


def _summary(result: Any) -> str:
    """The result's one-line summary without its leading verdict word (the outcome line says it)."""
    summary = getattr(result, "summary", None)
    if callable(summary):
        try:
            text = str(summary())
        except Exception:  # a summary must not turn a verdict into an error
            return ""
        for verdict in ("FAILED: ", "passed: ", "PASSED: "):
            if text.startswith(verdict):
                return text[len(verdict):]
        return text
    return ""


def run_case(item: Case) -> CaseOutcome:
    """Run one case and judge it against its ``expect``; never raises (errors are outcomes)."""
    missing = missing_modules(item.spec.requires)
    if missing:
        return CaseOutcome(item, "skipped", message=f"needs {', '.join(missing)}, which is not installed")
    start = time.perf_counter()
    try:
        with _folder_on_path(item.path.parent):
            result = item.function()
    except (Exception, SystemExit) as exc:
        return CaseOutcome(item, "error", message=f"the case raised {_describe(exc, item.path)}",
                           details=_format_traceback(exc, _user_traceback(exc, item.path, skip_to_file=False)),
                           seconds=time.perf_counter() - start)
    seconds = time.perf_counter() - start
    if not is_result(result):
        what = "None (is a `return` missing?)" if result is None else f"a {type(result).__name__}"
        return CaseOutcome(item, "error", message=f"the case returned {what}; a case must return the result of "
                           "gb.check(...) or gb.compare(...)", seconds=seconds)
    summary = _summary(result)
    summary = f": {summary}" if summary else ""
    if item.expect == "pass":
        if result.passed:
            return CaseOutcome(item, "passed", result, f"the check passed{summary}", seconds=seconds)
        return CaseOutcome(item, "failed", result, f"the check failed{summary}", seconds=seconds)
    if result.passed:
        return CaseOutcome(item, "failed", result, "the check passed, but this case declares a seeded bug "
                           "(expect='fail') that it must catch", seconds=seconds)
    return CaseOutcome(item, "passed", result, f"seeded bug caught, the check failed{summary}", seconds=seconds)


__all__ = ["case", "CaseSpec", "Case", "CaseOutcome", "CaseFileError", "load_cases", "run_case", "parse_target",
           "CASE_ATTRIBUTE"]
