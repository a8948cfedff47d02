"""The command line: ``gradbridge demo``, ``gradbridge backends``, ``gradbridge check FILE.py`` (click, in
:mod:`.commands`), and the check cases files declare with ``@gradbridge.case`` (:mod:`.cases`).

Nothing here is imported by ``import gradbridge`` except :mod:`.cases`; click is imported only when the
command line runs.
"""

from typing import Any


def main(*args: Any, **kwargs: Any) -> Any:
    """The ``gradbridge`` console script (imports click and the commands on first use)."""
    from .commands import main as command

    return command(*args, **kwargs)
