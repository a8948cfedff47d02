"""Backends outside gradbridge: registered through the ``gradbridge.backends`` entry-point group.

A real distribution's metadata (a ``.dist-info`` folder on ``sys.path`` with ``entry_points.txt``) registers
a backend whose adapter reuses the NumPy adapter's preparation under its own name. Run in a fresh interpreter,
so the registry reads the entry points as it would in a user's process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PLUGIN = '''
from gradbridge._registry import BackendEntry

BACKEND = BackendEntry("toy", "toy_backend_adapter", "toy_framework", None, "Toy", aliases=("toys",))
'''

ADAPTER = '''
from gradbridge._registry import get_adapter


class ToyAdapter:
    name = "toy"
    module_name = "toy_framework"

    def __init__(self):
        self._numpy = get_adapter("numpy")

    def owns(self, value):
        return False

    def version(self):
        return "0.1"

    def probe_float64(self):
        return True, ""

    def prepare(self, spec):
        return self._numpy.prepare(spec)

    def clear_cache(self):
        pass

    def cache_size(self):
        return 0


ADAPTER = ToyAdapter()
'''

SCRIPT = '''
import json, numpy as np
import gradbridge as gb
from gradbridge import _registry
names = _registry.names()
report = gb.check(lambda x: float(np.sum(x ** 3)), np.arange(1.0, 4.0), grad=lambda x: 3 * x ** 2, backend="toys")
bad = gb.check(lambda x: float(np.sum(x ** 3)), np.arange(1.0, 4.0), grad=lambda x: 2 * x ** 2, backend="toy")
print(json.dumps({"names": names, "backend": report.backend, "passed": report.passed, "bad": bad.passed,
                  "hint": _registry.install_hint("toy")}))
'''


def _install_plugin(root: Path) -> None:
    (root / "toy_backend_entry.py").write_text(PLUGIN)
    (root / "toy_backend_adapter.py").write_text(ADAPTER)
    (root / "toy_framework.py").write_text("")
    info = root / "toy_backend-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-backend\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[gradbridge.backends]\ntoy = toy_backend_entry:BACKEND\n")


def test_a_backend_registered_by_another_package_is_listed_and_checks(tmp_path: Path) -> None:
    _install_plugin(tmp_path)
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=str(tmp_path),
                            env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)}, timeout=120)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert "toy" in found["names"] and found["names"][0] == "numpy"
    assert found["backend"] == "toy" and found["passed"] is True and found["bad"] is False
    assert found["hint"] == "pip install toy_framework"


def test_import_gradbridge_does_not_read_entry_points(tmp_path: Path) -> None:
    code = ("import sys, json, gradbridge; gradbridge.check; "
            "print(json.dumps('importlib.metadata' in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path),
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) is False
