"""``import gradbridge`` imports no framework, and the adapters live under ``gradbridge.backends`` only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FRAMEWORKS = ("torch", "jax", "tensorflow", "keras", "jaxlib", "autograd")


def _run(code: str, cwd: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, check=True)
    return result.stdout.strip()


def test_import_gradbridge_imports_no_framework(tmp_path):
    loaded = json.loads(_run(
        "import sys, json, gradbridge, gradbridge.backends; "
        f"print(json.dumps([m for m in {FRAMEWORKS!r} if m in sys.modules]))", str(tmp_path)))
    assert loaded == []


def test_a_numpy_check_imports_no_framework_even_when_installed(tmp_path):
    loaded = json.loads(_run(
        "import sys, json, numpy as np, gradbridge as gb; "
        "r = gb.check(lambda x: float((x**2).sum()), np.ones(3), grad=lambda x: 2*x); assert r.passed; "
        f"print(json.dumps([m for m in {FRAMEWORKS!r} if m in sys.modules]))", str(tmp_path)))
    assert loaded == []


def test_backends_are_installed_under_gradbridge_not_top_level(tmp_path):
    location = _run("import gradbridge.backends as b; print(b.__file__)", str(tmp_path))
    assert Path(location).parent.name == "backends"
    missing = subprocess.run([sys.executable, "-c", "import backends"], capture_output=True, text=True,
                             cwd=str(tmp_path))
    assert missing.returncode != 0 and "No module named 'backends'" in missing.stderr


def test_pyproject_maps_the_backends_folder():
    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"gradbridge.backends" = "backends"' in text


def test_import_gradbridge_leaves_the_cli_and_plotting_libraries_unimported(tmp_path):
    loaded = json.loads(_run(
        "import sys, json, gradbridge; "
        "print(json.dumps([m for m in ('click', 'rich', 'matplotlib', 'pytest', 'playwright') if m in sys.modules]))",
        str(tmp_path)))
    assert loaded == []


def test_ci_runs_exactly_the_readme_test_command():
    root = Path(__file__).resolve().parents[2]
    readme = root.joinpath("README.md").read_text().splitlines()
    command = readme[readme.index("# the tests") + 1].strip()
    ci_lines = [line.strip() for line in root.joinpath(".ci", "run").read_text().splitlines()]
    assert command in ci_lines and "pytest" in command
