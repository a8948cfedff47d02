"""Reports on terminals: colours and a progress bar on an interactive terminal (a real pseudo-terminal
here), plain text and silence in pipes and CI logs."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import gradbridge as gb
from gradbridge._reporting.terminal import print_report

ANSI = "\x1b["


def _buggy():
    return gb.check(lambda x: float(np.sum(np.sin(x))), np.linspace(0, 1, 4),
                    grad=lambda x: np.cos(x) * (1 + (np.arange(4) == 2)))


def test_pipes_get_the_plain_text_report():
    buffer = io.StringIO()  # not a terminal
    report = _buggy()
    print_report(report, buffer)
    assert buffer.getvalue() == str(report) + "\n"
    assert ANSI not in buffer.getvalue()


def test_colour_shows_the_same_content_with_verdicts_in_colour():
    buffer = io.StringIO()
    report = _buggy()
    print_report(report, buffer, color=True)
    text = buffer.getvalue()
    assert ANSI in text
    assert "\x1b[1;31mFAIL" in text and "\x1b[1;31mwrong" in text  # the failing row's verdict and grade in red
    plain = __import__("re").sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    assert "worst element x[2] -> out" in plain and "analytic (autodiff/grad)" in plain


def test_no_color_environment_turns_colours_off(monkeypatch):
    from gradbridge._reporting.terminal import wants_color

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert wants_color(Terminal())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not wants_color(Terminal())


SLOW_CHECK = textwrap.dedent("""
    import time, numpy as np, gradbridge as gb
    from gradbridge._reporting.terminal import print_report
    def f(x):
        time.sleep(0.0005)  # a slow function: the check takes about two seconds
        return float(np.sum(np.tanh(x)))
    report = gb.check(f, np.linspace(-1, 1, 1500), grad=lambda x: 1 / np.cosh(x) ** 2)
    print_report(report)
    print("VERDICT", report.passed)
""")


def _run_in_pseudo_terminal(code: str, monkeypatch) -> str:
    """Run ``code`` attached to a real pseudo-terminal, as an interactive user would, and read its screen."""
    pty = pytest.importorskip("pty")
    chunks = []

    def read(fd):
        data = os.read(fd, 4096)
        chunks.append(data)
        return data

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    status = pty.spawn([sys.executable, "-c", code], read)
    assert os.waitstatus_to_exitcode(status) == 0
    return b"".join(chunks).decode("utf-8", "replace")


def test_a_long_check_shows_a_progress_bar_on_a_terminal_and_nothing_in_a_pipe(monkeypatch):
    on_terminal = _run_in_pseudo_terminal(SLOW_CHECK, monkeypatch)
    assert "VERDICT True" in on_terminal
    assert "checking f" in on_terminal and "evaluations and analytic calls" in on_terminal
    assert ANSI in on_terminal  # the report itself is coloured there too
    piped = subprocess.run([sys.executable, "-c", SLOW_CHECK], capture_output=True, text=True, check=True)
    assert "VERDICT True" in piped.stdout
    assert "checking f" not in piped.stdout + piped.stderr and ANSI not in piped.stdout + piped.stderr


def test_progress_option_is_validated():
    with pytest.raises(gb.InvalidArgumentError, match="progress"):
        gb.check(np.sin, np.ones(2), grad=lambda g, x: (g * np.cos(x),), progress="yes")
