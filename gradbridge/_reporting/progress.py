"""A progress bar for long checks: shown on an interactive terminal once a check has run for a second.

Checks of small functions finish in milliseconds and print nothing; a full check of a large input can
take minutes, and then a bar (evaluations done of the estimated total) says it is alive. Nothing is
printed to pipes or CI logs unless asked for (``progress=True``), and rich is imported only when the
bar really appears.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional

#: Seconds a check runs before its bar appears.
SHOW_AFTER_SECONDS = 1.0


class CheckProgress:
    """Counts the work of one check and draws a bar for it when that is wanted.

    ``enabled=None`` shows the bar only when stderr is an interactive terminal; True always (after
    :data:`SHOW_AFTER_SECONDS`), False never. The total is an estimate and grows when the step ladder
    needs more evaluations than planned.
    """

    def __init__(self, description: str, enabled: Optional[bool] = None) -> None:
        self.description = description
        self.enabled = _stderr_is_terminal() if enabled is None else enabled
        self.started = time.perf_counter()
        self.done = 0
        self.total = 0
        self._bar: Any = None
        self._task: Any = None

    def expect(self, total: int) -> None:
        """The estimated number of evaluations plus analytic calls of the whole check."""
        self.total = max(self.total, int(total))

    def advance(self, count: int) -> None:
        self.done += int(count)
        if not self.enabled:
            return
        if self._bar is None:
            if time.perf_counter() - self.started < SHOW_AFTER_SECONDS:
                return
            self._start()
        self._bar.update(self._task, completed=self.done, total=max(self.total, self.done))

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("evaluations and analytic calls"), TimeElapsedColumn(),
                             console=Console(file=sys.stderr), transient=True)
        self._bar.start()
        self._task = self._bar.add_task(self.description, total=max(self.total, self.done))

    def close(self) -> None:
        """Remove the bar (it is transient: the report takes its place)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _stderr_is_terminal() -> bool:
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False
