"""Built-in demo cases: per backend, correct gradients that pass and a deliberately buggy one that fails.

``gradbridge demo`` runs every installed backend's cases and prints the reports; it succeeds (exit 0)
only when every correct case passes and every buggy case is caught.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

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
    module = importlib.import_module(f"gradbridge.backends.demos.{backend}_cases")
    return module.cases()


def run_demo(backends: Optional[Sequence[str]] = None) -> int:
    """Check every demo case of the chosen (default: installed) backends; print the reports."""
    from gradbridge import check

    names = list(backends) if backends else _registry.available_backends()
    surprises = []
    for name in names:
        for case in cases_for(name):
            report = check(case.fn, *case.args, backend=name, **case.options)
            expected = "should pass" if case.expect_pass else "has a seeded bug, should be caught"
            print(f"== [{name}] {case.title} ({expected})")
            print(report)
            print()
            if report.passed != case.expect_pass:
                surprises.append(f"{name}: {case.title}")
    if surprises:
        print("UNEXPECTED verdicts: " + "; ".join(surprises))
        return 1
    print(f"demo finished: every correct example passed and every seeded bug was caught ({', '.join(names)})")
    return 0
