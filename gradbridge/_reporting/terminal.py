"""Print reports to a terminal: a coloured rich table when attached to one, plain text otherwise.

Plain text is what CI logs and pipes get (``str(report)``); colours honour ``NO_COLOR`` and
``TERM=dumb`` through rich's own terminal detection.
"""

from __future__ import annotations

import sys
from typing import Any, Optional, TextIO

from .report import Report


def wants_color(stream: TextIO) -> bool:
    """True when ``stream`` is an interactive terminal that takes colours."""
    import os

    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def print_report(result: Any, file: Optional[TextIO] = None, color: Optional[bool] = None) -> None:
    """Print a report (or comparison) to ``file`` (default stdout).

    ``color=None`` decides by the stream: a coloured rich table on an interactive terminal, plain text
    in pipes and CI logs. True/False force it. Comparisons and other results print as their text.
    """
    stream = file if file is not None else sys.stdout
    use_color = wants_color(stream) if color is None else color
    if not use_color or not isinstance(result, Report):
        stream.write(str(result) + "\n")
        return
    from rich.console import Console

    from .render_rich import report_renderable

    Console(file=stream, force_terminal=True, no_color=False, color_system="standard", highlight=False,
            soft_wrap=False).print(report_renderable(result))
