"""Built-in demo cases: per backend, correct gradients that pass and a deliberately buggy one that fails.

``gradbridge demo`` runs every installed backend's cases and prints the reports; it succeeds (exit 0)
only when every correct case passes and every buggy case is caught.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from gradbridge import _registry


@dataclass
class DemoCase:
    """One demo: ``check(fn, *args, **options)`` should pass when ``expect_pass`` and fail otherwise."""

    title: str
    fn: Callable[..., Any]
    args: Tuple[Any, ...]
    options: Dict[str, Any] = field(default_factory=dict)
    expect_pass: bool = True


def cases_for(backend: str) -> List[DemoCase]:
    module = importlib.import_module(f"{_registry.entry(backend).adapter_module}.demo")
    return module.cases()


@dataclass
class DemoResult:
    """One demo case checked: its report (``None`` when the check raised: ``error``) and what was expected."""

    backend: str
    case: DemoCase
    report: Any = None
    error: Optional[BaseException] = None

    @property
    def label(self) -> str:
        return f"[{self.backend}] {self.case.title}"

    @property
    def expected(self) -> str:
        """``"pass"`` for a correct case, ``"fail"`` for a seeded bug the check must catch."""
        return "pass" if self.case.expect_pass else "fail"

    @property
    def as_expected(self) -> bool:
        """The check gave the expected verdict (a correct case passed, a seeded bug was caught)."""
        return self.error is None and bool(self.report.passed) == self.case.expect_pass


def demo_results(backends: Optional[Sequence[str]] = None) -> Iterator[DemoResult]:
    """Check every demo case of the chosen (default: installed) backends, yielding each as it is done.

    A check that raises is yielded with ``error`` set (it counts as an unexpected verdict).
    """
    from gradbridge import check

    names = list(backends) if backends else _registry.available_backends()
    for name in names:
        for case in cases_for(name):
            try:
                report = check(case.fn, *case.args, backend=name, **case.options)
            except Exception as exc:  # a broken framework install must not hide the other demos
                yield DemoResult(name, case, error=exc)
                continue
            yield DemoResult(name, case, report)


def describe_expectation(case: DemoCase) -> str:
    return "correct: should pass" if case.expect_pass else "seeded bug: must be caught"


def describe_outcome(result: DemoResult) -> str:
    if result.error is not None:
        return f"UNEXPECTED: the check raised {type(result.error).__name__}: {result.error}"
    if result.case.expect_pass:
        return "as expected: passed" if result.report.passed else "UNEXPECTED: a correct gradient failed the check"
    return ("as expected: the seeded bug was caught" if not result.report.passed
            else "UNEXPECTED: the seeded bug was not caught (the check passed)")


def run_demo(backends: Optional[Sequence[str]] = None) -> int:
    """Check every demo case of the chosen (default: installed) backends; print the reports.

    Returns 0 when every correct case passed and every seeded bug was caught, else 1.
    """
    from gradbridge._reporting.terminal import print_report

    names = list(backends) if backends else _registry.available_backends()
    surprises = []
    for result in demo_results(names):
        print(f"== {result.label} ({describe_expectation(result.case)})")
        if result.report is not None:
            print_report(result.report)
        print(f"=> {describe_outcome(result)}")
        print()
        if not result.as_expected:
            surprises.append(result.label)
    if surprises:
        print("UNEXPECTED verdicts: " + "; ".join(surprises))
        return 1
    print(f"demo finished: every correct example passed and every seeded bug was caught ({', '.join(names)})")
    return 0
