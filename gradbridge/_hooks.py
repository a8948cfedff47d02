"""Listeners told about every finished check, e.g. the pytest plugin collecting a session's reports.

A listener is a callable taking the finished :class:`~gradbridge._reporting.report.Report` (or a comparison).
Listeners must not raise; one that does is dropped from the call, never from the user's check.
"""

from __future__ import annotations

from typing import Any, Callable, List

Listener = Callable[[Any], None]
_listeners: List[Listener] = []


def add_listener(listener: Listener) -> None:
    """Call ``listener(report)`` after every check (and comparison) from now on."""
    if listener not in _listeners:
        _listeners.append(listener)


def remove_listener(listener: Listener) -> None:
    """Stop calling ``listener``; a listener that was never added is ignored."""
    if listener in _listeners:
        _listeners.remove(listener)


def notify(result: Any) -> None:
    """Tell every listener about a finished check; a listener's own error never reaches the caller."""
    for listener in list(_listeners):
        try:
            listener(result)
        except Exception:  # noqa: BLE001 - a broken listener must not break the user's check
            pass
