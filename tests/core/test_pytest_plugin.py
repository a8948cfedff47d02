"""The pytest plugin (``gradbridge.pytest_plugin``, auto-loaded through the ``pytest11`` entry point) and
``gradbridge.testing``, tested by running pytest on small test files with pytest's own ``pytester``.

Most runs are in-process (fast); the frameworks the inner tests use are imported here first, since
pytester removes modules first imported by an inner run and torch cannot be imported twice in one
process. One run is a subprocess: it checks that the entry point loads the plugin and that a session
using it imports no framework it did not ask for.
"""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest

import gradbridge as gb
from gradbridge import _hooks, _registry, testing

try:
    import torch
except ImportError:  # pragma: no cover - torch is installed wherever the full suite runs
    torch = None

pytest_plugins = ["pytester"]

needs_torch = pytest.mark.skipif(torch is None, reason='torch is not installed: pip install "gradbridge[torch]"')

# The inner tests' operations: correct and seeded-bug gradients, in NumPy and torch.
OPS = '''
import numpy as np

X = np.linspace(0.5, 2.0, 5)


def cube(x):
    return np.sum(x ** 3)


def cube_grad(x):
    return 3 * x ** 2


def cube_grad_sign_flip(x):
    g = 3 * x ** 2
    g[2] = -g[2]          # the seeded bug: one element has the wrong sign
    return g


def relu_sum(x):
    return np.sum(np.maximum(x, 0.0))


def relu_grad(x):
    return (x > 0).astype(float)
'''

TORCH_OPS = '''
import torch


class Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 2

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * x      # the seeded bug: the factor 2 is missing


T = torch.linspace(0.5, 2.0, 4, dtype=torch.float64)
'''

X = np.linspace(0.5, 2.0, 5)        # the inner tests' X, for the expected values
T = np.linspace(0.5, 2.0, 4)        # the inner tests' T


def _ops(pytester: pytest.Pytester, with_torch: bool = False) -> None:
    pytester.makepyfile(ops=OPS)
    if with_torch:
        pytester.makepyfile(torch_ops=TORCH_OPS)
    pytester.syspathinsert()


def _text(result: pytest.RunResult) -> str:
    return "\n".join(result.outlines + result.errlines)


def _number_after(label: str, text: str) -> float:
    match = re.search(re.escape(label) + r"\s*(\S+)", text)
    assert match, f"no line with {label!r} in:\n{text}"
    return float(match.group(1))


# ------------------------------------------------------------------------------------------ gradcheck

def test_passing_check_returns_the_report(pytester):
    _ops(pytester)
    pytester.makepyfile('''
        import gradbridge as gb
        from ops import X, cube, cube_grad

        def test_cube(gradcheck):
            report = gradcheck(cube, X, grad=cube_grad)
            assert isinstance(report, gb.Report)
            assert report.passed and report.function == "cube" and report.backend == "numpy"
    ''')
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)


def _assert_report_only(text: str) -> None:
    """The failure shows the report: no frames inside gradbridge, no arrays printed whole."""
    assert not re.search(r"gradbridge[/\\]\w+\.py", text), text
    assert "[[" not in text and "array(" not in text and "tensor(" not in text, text


def test_failing_numpy_check_shows_the_worst_element_not_internals(pytester):
    _ops(pytester)
    pytester.makepyfile('''
        from ops import X, cube, cube_grad_sign_flip

        def test_cube(gradcheck):
            gradcheck(cube, X, grad=cube_grad_sign_flip)
    ''')
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        ">       gradcheck(cube, X, grad=cube_grad_sign_flip)",   # the test's own line is where it points
        "E       gradbridge._errors.GradientCheckError: gradient check of cube FAILED: 1 of 1 block(s) wrong: x",
        "E       gradbridge check of cube: FAILED  (FAILED: 1 of 1 block(s) wrong: x)",
        "E         x -> out: 1 of 5 compared entries outside tolerance*",
        "E           worst element x[[]2] -> out:",
        "E             analytic (autodiff/grad): *",
        "E             numeric (finite diff.): *",
        "E             |difference| * vs allowed *x over*",
        "test_failing_numpy_check_shows_the_worst_element_not_internals.py:4: GradientCheckError",
    ])
    text = _text(result)
    assert _number_after("analytic (autodiff/grad):", text) == -3 * X[2] ** 2
    assert _number_after("numeric (finite diff.):", text) == pytest.approx(3 * X[2] ** 2, rel=1e-8)
    _assert_report_only(text)


@needs_torch
def test_failing_torch_function_names_the_element_with_the_missing_factor(pytester):
    _ops(pytester, with_torch=True)
    pytester.makepyfile('''
        from torch_ops import Square, T

        def test_square(gradcheck):
            gradcheck(Square.apply, T)
    ''')
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["E       gradbridge check of Square.apply: FAILED*",
                                 "E         backend torch *",
                                 "E           worst element x[[]*] -> out[[]*]:"])
    text = _text(result)
    where = re.search(r"worst element x\[(\d)\] -> out\[(\d)\]:", text)
    assert where and where.group(1) == where.group(2), text  # d(x_i^2)/dx_i: a diagonal entry
    analytic = _number_after("analytic (autodiff/grad):", text)
    numeric = _number_after("numeric (finite diff.):", text)
    assert analytic == pytest.approx(T[int(where.group(1))], rel=1e-12)   # the buggy backward: g * x
    assert numeric == pytest.approx(2 * analytic, rel=1e-8)               # the true derivative: 2x
    _assert_report_only(text)


def test_options_pass_through_and_the_error_carries_the_report(pytester):
    _ops(pytester)
    pytester.makepyfile('''
        import numpy as np
        import pytest
        import gradbridge as gb
        from ops import X, cube, cube_grad, cube_grad_sign_flip, relu_sum, relu_grad

        def test_mode(gradcheck):
            assert gradcheck(cube, X, grad=cube_grad, mode="fast").mode == "fast"
            assert gradcheck(cube, X, grad=cube_grad, mode="full").mode == "full"

        def test_kinks(gradcheck):
            x = np.array([-1.0, 0.0, 2.0])             # relu at its kink
            assert len(gradcheck(relu_sum, x, grad=relu_grad).nondifferentiable) == 1
            with pytest.raises(gb.GradientCheckError):
                gradcheck(relu_sum, x, grad=relu_grad, kinks="fail")

        def test_expected_failure_can_be_inspected(gradcheck):
            with pytest.raises(gb.GradientCheckError) as info:
                gradcheck(cube, X, grad=cube_grad_sign_flip)
            assert info.value.report.failures[0].worst.input_index == (2,)
            assert isinstance(info.value, AssertionError)

        def test_bad_argument_is_an_error_not_a_failed_check(gradcheck):
            with pytest.raises(gb.InvalidArgumentError, match="mode"):
                gradcheck(cube, X, grad=cube_grad, mode="sometimes")
    ''')
    result = pytester.runpytest()
    result.assert_outcomes(passed=4)


def test_default_mode_from_the_command_line_and_the_ini_file(pytester):
    _ops(pytester)
    pytester.makepyfile('''
        from ops import X, cube, cube_grad

        def test_default(gradcheck, pytestconfig):
            expected = pytestconfig.getoption("gradbridge_mode") or pytestconfig.getini("gradbridge_mode")
            assert gradcheck(cube, X, grad=cube_grad).mode == expected

        def test_explicit_mode_wins(gradcheck):
            assert gradcheck(cube, X, grad=cube_grad, mode="full").mode == "full"
    ''')
    pytester.runpytest("--gradbridge-mode=fast").assert_outcomes(passed=2)
    pytester.makeini("[pytest]\ngradbridge_mode = fast\n")
    pytester.runpytest().assert_outcomes(passed=2)

    pytester.makeini("[pytest]\ngradbridge_mode = sometimes\n")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "gradbridge_mode: expected one of auto, full, fast, got 'sometimes'" in _text(result)


# ------------------------------------------------------------------------------------------- backends

#: The backends gradbridge ships, from the registry (the inner tests check against this list).
BUILTIN = tuple(_registry.builtin_names())
#: The frameworks those backends import (all but NumPy): a session on NumPy imports none of them.
FRAMEWORKS = tuple(_registry.entry(name).framework_module for name in BUILTIN if name != "numpy")

BACKEND_TESTS = f'''
    import pytest
    from gradbridge.testing import parametrize_backends

    @parametrize_backends()
    def test_all(backend):
        assert backend in {BUILTIN!r}

    @parametrize_backends("pytorch", "numpy", "torch", argname="name")
    def test_some(name):
        assert name in ("torch", "numpy")

    def test_fixture(gb_backend):
        assert gb_backend in {BUILTIN!r}

    @pytest.mark.parametrize("gb_backend", ["numpy"])
    def test_fixture_parametrized_by_the_user(gb_backend):
        assert gb_backend == "numpy"
'''


def test_backend_parametrization_over_the_installed_backends(pytester):
    pytester.makepyfile(BACKEND_TESTS)
    result = pytester.runpytest("-v")
    installed = [n for n in BUILTIN if testing.missing_reason(n) is None]
    result.assert_outcomes(passed=len(installed) * 2 + 2 + 1, skipped=(len(BUILTIN) - len(installed)) * 2)
    result.stdout.fnmatch_lines_random([f"*::test_all[[]{n}] PASSED*" for n in installed]
                                       + [f"*::test_fixture[[]{n}] PASSED*" for n in installed]
                                       + ["*::test_some[[]torch] PASSED*", "*::test_some[[]numpy] PASSED*"])


def test_unknown_backend_name_is_a_collection_error(pytester):
    pytester.makepyfile('''
        from gradbridge.testing import parametrize_backends

        @parametrize_backends("pytoch")
        def test_typo(backend):
            pass
    ''')
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*ValueError: unknown backend 'pytoch'; gradbridge knows {', '.join(BUILTIN)}*"])


@pytest.fixture
def jax_not_importable(monkeypatch):
    """jax made unimportable the way Python itself marks a module as unavailable (``sys.modules[name] is
    None``: ``import jax`` raises ImportError and ``importlib.util.find_spec`` finds nothing), so this
    machine has a backend that is not installed. No framework is faked."""
    monkeypatch.setitem(sys.modules, "jax", None)
    assert testing.missing_reason("jax") == 'jax is not installed: pip install "gradbridge[jax]"'


def _installed_besides_jax() -> list:
    """The backends that run here while jax is made unimportable: every other one where all are installed."""
    return [n for n in BUILTIN if n != "jax" and testing.missing_reason(n) is None]


MISSING_BACKEND_TESTS = '''
    from gradbridge.testing import parametrize_backends

    @parametrize_backends("numpy", "jax")
    def test_decorated(backend):
        assert backend == "numpy"

    def test_fixture(gb_backend):
        assert gb_backend != "jax"
'''


def test_missing_backend_is_a_visible_skip_with_the_install_hint(pytester, jax_not_importable, monkeypatch):
    monkeypatch.setenv("CI", "true")  # a user's CI must not change what a missing backend means
    pytester.makepyfile(test_missing=MISSING_BACKEND_TESTS)
    result = pytester.runpytest("-v", "-rs")
    others = _installed_besides_jax()
    result.assert_outcomes(passed=1 + len(others), skipped=2 + (len(BUILTIN) - 1 - len(others)))
    result.stdout.fnmatch_lines_random([
        "test_missing.py::test_decorated[[]jax] SKIPPED (jax is not installed*",
        "test_missing.py::test_fixture[[]jax] SKIPPED (jax is not installed*",
        'SKIPPED [[]1] test_missing.py:3: jax is not installed: pip install "gradbridge[[]jax]"',
        # pytest folds setup skips of parametrized tests without a line number
        'SKIPPED [[]1] test_missing.py: jax is not installed: pip install "gradbridge[[]jax]"',
    ])
    assert "gradbridge/testing.py" not in _text(result)  # the skips point at the tests, not at gradbridge


@pytest.mark.parametrize("how", ["ini", "option"])
def test_missing_backend_fails_when_every_backend_is_required(pytester, jax_not_importable, how):
    pytester.makepyfile(test_missing=MISSING_BACKEND_TESTS)
    if how == "ini":
        pytester.makeini("[pytest]\ngradbridge_require_backends = true\n")
        result = pytester.runpytest()
    else:
        result = pytester.runpytest("--gradbridge-require-backends")
    others = _installed_besides_jax()
    result.assert_outcomes(passed=1 + len(others), errors=2 + (len(BUILTIN) - 1 - len(others)))
    result.stdout.fnmatch_lines_random([
        "ERROR test_missing.py::test_decorated[[]jax] - Failed: every backend is*",
        "ERROR test_missing.py::test_fixture[[]jax] - Failed: every backend is*",
    ])
    assert 'every backend is required (gradbridge_require_backends): jax is not installed: pip install ' \
           '"gradbridge[jax]"' in _text(result)


# ------------------------------------------------------------------------------------ session report

REPORT_TESTS = '''
    from ops import X, cube, cube_grad, cube_grad_sign_flip

    def test_pass(gradcheck):
        gradcheck(cube, X, grad=cube_grad)

    def test_fail(gradcheck):
        gradcheck(cube, X, grad=cube_grad_sign_flip)

    def test_two_checks(gradcheck):
        gradcheck(cube, X, grad=cube_grad)
        gradcheck(cube, 2 * X, grad=cube_grad, mode="fast")

    def test_without_checks():
        pass
'''


def test_report_option_writes_json_and_html_labelled_by_node_id(pytester):
    _ops(pytester)
    pytester.makepyfile(test_report=REPORT_TESTS)
    listeners = list(_hooks._listeners)
    result = pytester.runpytest("--gradbridge-report=reports/gb.json")
    result.assert_outcomes(passed=3, failed=1)
    assert _hooks._listeners == listeners  # the session's listener is gone with the session

    json_path, html_path = pytester.path / "reports" / "gb.json", pytester.path / "reports" / "gb.html"
    result.stdout.fnmatch_lines([f"*gradbridge: 4 checks, 1 failed; report written to {json_path} and {html_path}*"])
    document = json.loads(json_path.read_text())
    assert (document["checks"], document["failed"]) == (4, 1)
    assert [(e["label"], e["passed"]) for e in document["entries"]] == [
        ("test_report.py::test_pass", True), ("test_report.py::test_fail", False),
        ("test_report.py::test_two_checks", True), ("test_report.py::test_two_checks", True)]
    failing = document["entries"][1]["result"]
    assert failing["function"] == "cube" and failing["rows"][0]["worst"]["input_index"] == [2]
    assert [e["result"]["mode"] for e in document["entries"]] == ["full", "full", "full", "fast"]

    html = html_path.read_text(encoding="utf-8")
    assert html.lstrip().lower().startswith("<!doctype html") and "test_report.py::test_fail" in html


def test_report_path_ending_in_html(pytester):
    _ops(pytester)
    pytester.makepyfile(test_report=REPORT_TESTS)
    result = pytester.runpytest("--gradbridge-report", "out.html", "-k", "fail")
    result.assert_outcomes(failed=1, deselected=3)
    document = json.loads((pytester.path / "out.json").read_text())
    assert [(e["label"], e["passed"]) for e in document["entries"]] == [("test_report.py::test_fail", False)]
    assert "test_report.py::test_fail" in (pytester.path / "out.html").read_text(encoding="utf-8")


def test_no_report_and_no_summary_line_without_the_option(pytester):
    _ops(pytester)
    pytester.makepyfile(test_report=REPORT_TESTS)
    listeners = list(_hooks._listeners)
    result = pytester.runpytest()
    result.assert_outcomes(passed=3, failed=1)
    assert _hooks._listeners == listeners
    assert not list(pytester.path.rglob("*.json")) and not list(pytester.path.rglob("*.html"))
    assert "gradbridge:" not in _text(result)


# ----------------------------------------------------------------------------------- entry point, cost

def test_entry_point_loads_the_plugin_without_importing_frameworks(pytester):
    """A fresh interpreter: the plugin comes from the entry point, and a session that uses it on NumPy
    (and parametrizes over every backend) imports no framework."""
    _ops(pytester)
    pytester.makepyfile(f'''
        import sys
        from ops import X, cube, cube_grad

        def test_check(gradcheck):
            gradcheck(cube, X, grad=cube_grad)

        def test_backends(gb_backend):
            pass

        def test_zz_no_framework_imported():
            assert [m for m in {FRAMEWORKS!r} if m in sys.modules] == []
    ''')
    result = pytester.runpytest_subprocess("--gradbridge-report=r.json")
    passed_backends = sum(testing.missing_reason(n) is None for n in testing.BACKENDS)
    result.assert_outcomes(passed=2 + passed_backends, skipped=len(testing.BACKENDS) - passed_backends)
    result.stdout.fnmatch_lines([f"plugins:*gradbridge-{gb.__version__}*",
                                 "*gradbridge: 1 check, 0 failed; report written to *r.json and *r.html*"])


@pytest.mark.skipif(not __import__("importlib").util.find_spec("xdist"), reason="pytest-xdist is not installed")
def test_report_under_xdist_collects_every_worker(pytester):
    _ops(pytester)
    pytester.makepyfile(test_report=REPORT_TESTS)
    result = pytester.runpytest_subprocess("-n", "2", "--gradbridge-report=gb.json")
    result.assert_outcomes(passed=3, failed=1)
    document = json.loads((pytester.path / "gb.json").read_text())
    assert (document["checks"], document["failed"]) == (4, 1)
    assert sorted(e["label"] for e in document["entries"]) == sorted([
        "test_report.py::test_pass", "test_report.py::test_fail", "test_report.py::test_two_checks",
        "test_report.py::test_two_checks"])
