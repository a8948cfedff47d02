"""The README's porting example runs as written and prints what the README says it prints."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from backend_matrix import require_backend

README = Path(__file__).resolve().parents[2] / "README.md"
START = "from collections import OrderedDict\nimport numpy as np, torch, keras\n"


def test_the_porting_example_prints_the_sentence_the_readme_shows() -> None:
    require_backend("torch")
    require_backend("tensorflow")
    text = README.read_text()
    block = text[text.index(START):]
    block = block[:block.index("```")]
    expected = " ".join(line[2:] for line in block.splitlines() if line.startswith("# "))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block, "README.md", "exec"), {})
    assert re.sub(r"\s+", " ", printed.getvalue()).strip() == re.sub(r"\s+", " ", expected).strip()
