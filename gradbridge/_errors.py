"""The exceptions gradbridge raises.

Every error a user can trigger is a :class:`GradbridgeError`; a failed gradient check raised by
:func:`gradbridge.assert_check` is a :class:`GradientCheckError`, which is also an ``AssertionError`` so
test runners treat it as a test failure and not as a crash.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ._reporting.report import Report


class GradbridgeError(Exception):
    """Base class of every exception raised by gradbridge itself."""


class InvalidArgumentError(GradbridgeError, ValueError):
    """An argument of a gradbridge call has the wrong type or value.

    The message names the argument and says what was expected.
    """


class BackendNotAvailableError(GradbridgeError, ImportError):
    """The requested framework is not installed (or not importable)."""


class FunctionEvaluationError(GradbridgeError, RuntimeError):
    """The user's function (or its gradient) raised or returned something unusable during a check.

    The original exception, if any, is chained as ``__cause__``.
    """


class ModeUnsupportedError(GradbridgeError, NotImplementedError):
    """A differentiation mode (for example forward mode) is not available for this function."""


class CostlyProbeSkipped(ModeUnsupportedError):
    """A contract the adapter could run but skipped because it costs more than the check itself (a trace or
    compile the check has not paid for); the message says what it would cost. ``contracts="all"`` runs it."""


class GradientCheckError(GradbridgeError, AssertionError):
    """Raised by :func:`gradbridge.assert_check` when a check fails; carries the report."""

    def __init__(self, report: "Report") -> None:
        self.report = report
        # the first line is what pytest's short summary shows: say what failed
        super().__init__(f"gradient check of {report.function} {report.summary()}\n" + str(report))
