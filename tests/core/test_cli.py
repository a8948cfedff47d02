"""The ``gradbridge`` command line: ``backends``, ``demo`` and ``check FILE.py[::NAME]``.

In process through click's CliRunner, on real frameworks; one run of the installed console script.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

import gradbridge as gb
from gradbridge import _registry
from gradbridge._cli.commands import main

ROOT = Path(__file__).resolve().parents[2]

# A file of real cases: a hand-written NumPy gradient and a custom torch autograd.Function, both right.
GOOD = '''
import numpy as np
import torch
import gradbridge as gb


def loss(x):
    return float(np.sum(np.sin(x) * x))


def loss_grad(x):
    return np.cos(x) * x + np.sin(x)


@gb.case
def numpy_sin():
    return gb.check(loss, np.linspace(-1.0, 2.0, 5), grad=loss_grad)


class Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, g.t() @ x


@gb.case(name="torch linear")
def torch_linear():
    gen = torch.Generator().manual_seed(0)
    return gb.check(Linear.apply, torch.randn(4, 3, generator=gen), torch.randn(2, 3, generator=gen))
'''

# Seeded bugs: the sign of one element of a NumPy gradient flipped; a torch backward that returns the
# weight gradient transposed (right values, wrong layout: w is square so autograd accepts the shape).
BUGGY = '''
import numpy as np
import torch
import gradbridge as gb


def loss(x):
    return float(np.sum(x ** 3))


def loss_grad_flipped(x):
    g = 3 * x ** 2
    g[2] = -g[2]
    return g


@gb.case
def numpy_cube_ok():
    return gb.check(loss, np.arange(1.0, 6.0), grad=lambda x: 3 * x ** 2)


@gb.case
def numpy_sign_flip():
    return gb.check(loss, np.arange(1.0, 6.0), grad=loss_grad_flipped)


class LinearTransposed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, (g.t() @ x).t()


@gb.case(name="torch transposed", expect="fail")
def torch_transposed_caught():
    gen = torch.Generator().manual_seed(0)
    return gb.check(LinearTransposed.apply, torch.randn(4, 3, generator=gen), torch.randn(3, 3, generator=gen))


@gb.case(name="torch transposed, expected to pass")
def torch_transposed_missed():
    return torch_transposed_caught()
'''


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


def write(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def invoke(runner, *args):
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


# ---------------------------------------------------------------------------------------------- backends

def _framework_version(module) -> str:
    """The framework's own version: its ``__version__``, else its distribution's (autograd has no ``__version__``)."""
    return getattr(module, "__version__", None) or importlib.metadata.version(module.__name__)


def test_backends_json_matches_the_imported_frameworks(runner):
    import jax

    modules = {name: importlib.import_module(_registry.entry(name).framework_module) for name in _registry.names()}
    x64_before = bool(jax.config.jax_enable_x64)
    result = invoke(runner, "backends", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["backend"]: row for row in json.loads(result.stdout)["backends"]}
    assert list(rows) == _registry.names()
    assert set(_registry.builtin_names()) <= set(rows)
    for name, module in modules.items():
        assert rows[name]["installed"] and rows[name]["adapter"], rows[name]
        assert rows[name]["version"] == _framework_version(module)
        assert rows[name]["float64"] is True, rows[name]
    assert "jax_enable_x64" in rows["jax"]["note"] and "restores" in rows["jax"]["note"]
    assert bool(jax.config.jax_enable_x64) == x64_before  # the probe put the user's flag back


def test_backends_table(runner):
    import torch

    result = invoke(runner, "backends")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["backend", "installed", "version", "adapter", "float64"]
    torch_line = next(line for line in lines if line.startswith("torch "))
    assert torch_line.split()[:5] == ["torch", "yes", torch.__version__, "yes", "yes"]
    assert any(line.startswith("jax ") and "jax_enable_x64" in line for line in lines)


# -------------------------------------------------------------------------------------------------- demo

@pytest.mark.parametrize("backend, caught", [("numpy", 1), ("torch", 1)])
def test_demo_one_backend_catches_its_seeded_bug(runner, backend, caught):
    result = invoke(runner, "demo", "--backend", backend)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"== [{backend}] " in out and "gradbridge check of" in out and "worst element" in out
    assert out.count("seeded bug: must be caught") == caught
    assert out.count("as expected: the seeded bug was caught") == caught
    assert "UNEXPECTED" not in out
    assert f"every seeded bug was caught ({caught}) ({backend})" in out
    other = {"numpy": "[torch]", "torch": "[numpy]"}[backend]
    assert other not in out


def test_demo_exports_json_and_html(runner, tmp_path):
    result = invoke(runner, "demo", "--backend", "numpy", "--json", tmp_path / "demo.json",
                    "--html", tmp_path / "out" / "demo.html")
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "demo.json").read_text())
    entries = document["entries"]
    assert [e["expect"] for e in entries] == ["pass", "fail"]
    assert [e["passed"] for e in entries] == [True, False]  # the check's own verdicts
    assert [e["outcome"] for e in entries] == ["passed", "passed"]  # both as expected
    assert all(e["label"].startswith("[numpy] ") for e in entries)
    page = (tmp_path / "out" / "demo.html").read_text()
    assert page.startswith("<!doctype html>") and "seeded bug, caught" in page


def test_demo_unknown_backend_is_a_usage_error(runner):
    result = invoke(runner, "demo", "--backend", "theano")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "'theano' is not one of" in result.output


# ------------------------------------------------------------------------------------------------- check

def test_check_all_passing_file_exits_0(runner, tmp_path):
    path = write(tmp_path, "good_cases.py", GOOD)
    result = invoke(runner, "check", path)
    assert result.exit_code == 0, result.output
    assert "== numpy_sin (should pass)" in result.stdout and "== torch linear (should pass)" in result.stdout
    assert "gradbridge check of loss" in result.stdout and "gradbridge check of Linear.apply" in result.stdout
    assert result.stdout.rstrip().endswith("2 cases: 2 passed, 0 failed")


def test_check_failing_case_exits_1_and_shows_the_worst_element(runner, tmp_path):
    path = write(tmp_path, "buggy_cases.py", BUGGY)
    result = invoke(runner, "check", path)
    assert result.exit_code == 1, result.output
    out = result.stdout
    assert "passed  numpy_cube_ok: the check passed" in out
    assert "FAILED  numpy_sign_flip: the check failed" in out
    assert "worst element x[2] -> out" in out  # the flipped element, found
    assert "passed  torch transposed: seeded bug caught" in out  # expect="fail" and the check failed
    assert "FAILED  torch transposed, expected to pass: the check failed" in out
    assert "worst element w[" in out
    assert out.rstrip().endswith("4 cases: 2 passed, 2 failed")


def test_expect_fail_case_fails_when_the_check_passes(runner, tmp_path):
    path = write(tmp_path, "expect_fail.py", '''
        import numpy as np
        import gradbridge as gb

        @gb.case(expect="fail")
        def not_a_bug():
            return gb.check(lambda x: float((x ** 2).sum()), np.arange(3.0), grad=lambda x: 2 * x)
    ''')
    result = invoke(runner, "check", path)
    assert result.exit_code == 1
    assert "== not_a_bug (seeded bug: the check must fail)" in result.stdout
    assert "FAILED  not_a_bug: the check passed, but this case declares a seeded bug" in result.stdout


def test_name_selects_one_case_by_function_or_case_name(runner, tmp_path):
    path = write(tmp_path, "buggy_cases.py", BUGGY)
    by_function = invoke(runner, "check", f"{path}::numpy_cube_ok")
    assert by_function.exit_code == 0, by_function.output
    assert by_function.stdout.rstrip().endswith("1 case: 1 passed, 0 failed")
    assert "numpy_sign_flip" not in by_function.stdout
    by_case_name = invoke(runner, "check", f"{path}::torch transposed")
    assert by_case_name.exit_code == 0 and "seeded bug caught" in by_case_name.stdout
    by_function_of_named_case = invoke(runner, "check", f"{path}::torch_transposed_missed", "-q")
    assert by_function_of_named_case.exit_code == 1
    assert "FAILED  torch transposed, expected to pass" in by_function_of_named_case.stdout


@pytest.mark.parametrize("kind", ["unknown name", "missing file", "no cases", "import error", "empty name"])
def test_bad_file_or_name_is_one_line_exit_2(runner, tmp_path, kind):
    good = write(tmp_path, "good_cases.py", GOOD)
    target, expected = {
        "unknown name": (f"{good}::nope", "good_cases.py: no case named 'nope'; its cases: numpy_sin, "
                                          "torch linear (function torch_linear)"),
        "missing file": (tmp_path / "absent.py", "absent.py: no such file"),
        "no cases": (write(tmp_path, "plain.py", "def f():\n    return 1\n"),
                     "plain.py: no check cases found; decorate a zero-argument function"),
        "import error": (write(tmp_path, "broken.py", "import gradbridge as gb\nx = 1 / 0\n"),
                         "broken.py: importing the file raised ZeroDivisionError: division by zero "
                         "(broken.py, line 2)"),
        "empty name": (f"{good}::", "nothing after '::'"),
    }[kind]
    result = invoke(runner, "check", target)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    error_lines = result.stderr.strip().splitlines()
    assert len(error_lines) == 1 and error_lines[0].startswith("Error: ") and expected in error_lines[0]


def test_import_error_traceback_on_request(runner, tmp_path):
    path = write(tmp_path, "broken.py", "import gradbridge as gb\n\n\ndef helper():\n    raise KeyError('k')\n\n\nhelper()\n")
    result = invoke(runner, "check", path, "--traceback")
    assert result.exit_code == 2
    assert "Traceback (most recent call last)" in result.stderr and 'broken.py", line 5, in helper' in result.stderr
    assert "importlib" not in result.stderr  # starts at the user's file
    assert result.stderr.strip().splitlines()[-1].startswith("Error: broken.py: importing the file raised KeyError")


ERRORS = '''
import numpy as np
import gradbridge as gb


@gb.case
def raises():
    return helper()


def helper():
    raise RuntimeError("kaput")


@gb.case
def forgets_return():
    gb.check(lambda x: float((x ** 2).sum()), np.arange(3.0), grad=lambda x: 2 * x)


@gb.case
def returns_a_number():
    return 3.0


@gb.case(requires="gradbridge_no_such_module")
def needs_a_missing_module():
    import gradbridge_no_such_module  # noqa: F401


@gb.case
def fine():
    return gb.check(lambda x: float((x ** 2).sum()), np.arange(3.0), grad=lambda x: 2 * x)
'''


def test_errors_inside_cases_name_the_case_and_the_rest_still_run(runner, tmp_path):
    path = write(tmp_path, "errors.py", ERRORS)
    result = invoke(runner, "check", path)
    assert result.exit_code == 1
    out = result.stdout
    assert "ERROR   raises: the case raised RuntimeError: kaput (errors.py, line 12)" in out
    assert "Traceback" not in result.output
    assert ("ERROR   forgets_return: the case returned None (is a `return` missing?); a case must return the "
            "result of gb.check(...) or gb.compare(...)") in out
    assert "ERROR   returns_a_number: the case returned a float; a case must return" in out
    assert "skipped needs_a_missing_module: needs gradbridge_no_such_module, which is not installed" in out
    assert "passed  fine: the check passed" in out
    assert out.rstrip().endswith("5 cases: 1 passed, 3 failed (3 raised; --traceback shows where), 1 skipped")
    with_traceback = invoke(runner, "check", path, "--traceback", "--quiet")
    assert 'errors.py", line 12, in helper' in with_traceback.stdout
    assert "_cases.py" not in with_traceback.stdout  # gradbridge's own frame left out


def test_quiet_prints_one_line_per_case_and_the_summary(runner, tmp_path):
    path = write(tmp_path, "buggy_cases.py", BUGGY)
    result = invoke(runner, "check", path, "-q")
    assert result.exit_code == 1
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 5 and lines[-1] == "4 cases: 2 passed, 2 failed"
    assert "gradbridge check of" not in result.stdout


def test_check_writes_json_and_html(runner, tmp_path):
    path = write(tmp_path, "buggy_cases.py", BUGGY)
    errors = write(tmp_path, "errors.py", ERRORS)
    result = invoke(runner, "check", path, f"{errors}::raises", f"{errors}::fine", "-q",
                    "--json", tmp_path / "r" / "report.json", "--html", tmp_path / "report.html")
    assert result.exit_code == 1
    document = json.loads((tmp_path / "r" / "report.json").read_text())
    entries = document["entries"]
    assert [e["label"] for e in entries] == [
        "buggy_cases.py::numpy_cube_ok", "buggy_cases.py::numpy_sign_flip", "buggy_cases.py::torch transposed",
        "buggy_cases.py::torch transposed, expected to pass", "errors.py::raises", "errors.py::fine"]
    assert [e["outcome"] for e in entries] == ["passed", "failed", "passed", "failed", "error", "passed"]
    assert [e["passed"] for e in entries] == [True, False, False, False, False, True]
    assert [e["expect"] for e in entries] == ["pass", "pass", "fail", "pass", "pass", "pass"]
    assert entries[1]["result"]["rows"][0]["worst"]["input_index"] == [2]
    assert entries[4]["result"] is None and "RuntimeError: kaput" in entries[4]["message"]
    assert document["cases"] == {"total": 6, "passed": 3, "failed": 3, "errors": 1, "skipped": 0}
    page = (tmp_path / "report.html").read_text()
    assert "numpy_sign_flip" in page and "torch transposed (seeded bug, caught)" in page
    assert "1 case(s) without a report not shown" in page


def test_single_file_json_labels_are_case_names(runner, tmp_path):
    path = write(tmp_path, "good_cases.py", GOOD)
    result = invoke(runner, "check", path, "-q", "--json", tmp_path / "good.json")
    assert result.exit_code == 0
    entries = json.loads((tmp_path / "good.json").read_text())["entries"]
    assert [(e["label"], e["passed"], e["kind"]) for e in entries] == [("numpy_sin", True, "report"),
                                                                       ("torch linear", True, "report")]


def test_case_file_imports_its_neighbours(runner, tmp_path):
    (tmp_path / "my_ops.py").write_text("import numpy as np\n\ndef grad(x):\n    return np.cos(x)\n")
    path = write(tmp_path, "uses_neighbour.py", '''
        import numpy as np
        import gradbridge as gb
        from my_ops import grad

        @gb.case
        def sine():
            return gb.check(lambda x: float(np.sin(x).sum()), np.linspace(0, 1, 4), grad=grad)
    ''')
    before = list(sys.path)
    result = invoke(runner, "check", path, "-q")
    assert result.exit_code == 0, result.output
    assert sys.path == before


# -------------------------------------------------------------------------------- decorator and main()

def test_case_decorator_marks_and_returns_the_function():
    def plain():
        return 1

    assert gb.case(plain) is plain and plain() == 1
    marked = gb.case(name="x", expect="fail", requires="torch")(plain)
    assert marked is plain and plain.__gradbridge_case__.expect == "fail"
    assert plain.__gradbridge_case__.requires == ("torch",)
    with pytest.raises(gb.InvalidArgumentError, match="expect must be 'pass' or 'fail'"):
        gb.case(expect="passes")
    with pytest.raises(gb.InvalidArgumentError, match="a case takes no arguments"):
        gb.case(lambda x: x)


def test_main_returns_exit_codes_without_exiting(tmp_path, capsys):
    assert main(["check", str(write(tmp_path, "good_cases.py", GOOD)), "-q"], standalone_mode=False) == 0
    assert main(["check", str(tmp_path / "absent.py")], standalone_mode=False) == 2
    assert main(["check"], standalone_mode=False) == 2  # click's own usage error
    assert main(["--version"], standalone_mode=False) == 0
    captured = capsys.readouterr()
    assert f"Error: {tmp_path / 'absent.py'}: no such file" in captured.err
    assert "Usage: gradbridge check [OPTIONS] FILE.py[::NAME]..." in captured.err
    assert "Error: Missing argument" in captured.err


def test_console_script_runs_the_example_cases():
    script = shutil.which("gradbridge", path=str(Path(sys.executable).parent)) or shutil.which("gradbridge")
    assert script, "the gradbridge console script is not installed (pip install -e .)"
    completed = subprocess.run([script, "check", "examples/gradcheck_cases.py", "--quiet"], cwd=ROOT,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.strip().splitlines()
    assert lines[-1] == "4 cases: 4 passed, 0 failed"
    assert "passed  numpy_mlp_backprop_forgets_tanh_derivative: seeded bug caught" in completed.stdout
    assert "passed  torch_silu_function" in completed.stdout and "passed  jax_softplus_custom_vjp" in completed.stdout


def test_run_demo_still_works_from_python(capsys):
    from gradbridge.backends.demos import run_demo

    assert run_demo(["numpy"]) == 0
    out = capsys.readouterr().out
    assert "=> as expected: the seeded bug was caught" in out and "gradbridge check of softmax_loss" in out


def test_two_cases_with_one_name_is_a_usage_error(runner, tmp_path):
    path = write(tmp_path, "dup.py", '''
        import gradbridge as gb

        @gb.case(name="same")
        def first():
            pass

        @gb.case(name="same")
        def second():
            pass
    ''')
    result = invoke(runner, "check", path)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "dup.py: two cases are named 'same' (functions first and second)" in result.stderr
