"""Functions compiled with ``torch.compile``: the check runs their compiled code (never under vmap, which makes
torch.compile skip the function for good: the user's compiled function would run eagerly ever after), says so, names
the original function's inputs, and compares the compiled function with the eager one it was made from (the
"compiled = eager" contract). A seeded miscompilation (a backend that scales the graph's output by 1 + 1e-4) passes
every row, since the compiled function is consistent with its own finite differences, and fails the contract."""

from __future__ import annotations

import numpy as np
import pytest

import gradbridge as gb
from backend_matrix import require_backend

pytestmark = pytest.mark.torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles _layer afresh: dynamo's per-code recompile limit counts every earlier compile of it (in
    any order), and past it runs the code eagerly."""
    require_backend("torch")
    import torch

    torch._dynamo.reset()
    yield


def _counting_backend(scale: float = 1.0):
    """A torch.compile backend running the captured graph as is (``scale``: times a factor, a seeded
    miscompilation), counting compilations and runs of compiled code."""
    counts = {"compiled": 0, "runs": 0}

    def backend(graph_module, example_inputs):
        counts["compiled"] += 1

        def run(*args):
            counts["runs"] += 1
            out = graph_module.forward(*args)
            if scale == 1.0:
                return out
            return type(out)(o * scale for o in out) if isinstance(out, (tuple, list)) else out * scale

        return run

    return backend, counts


def _layer(x, w):
    import torch

    return torch.tanh(x @ w).sum(-1)


def _args():
    import torch

    gen = np.random.default_rng(2)
    return torch.tensor(gen.normal(size=(4, 5))), torch.tensor(gen.normal(size=(5, 3)))


def test_a_compiled_function_is_checked_through_its_compiled_code_and_stays_compiled() -> None:
    require_backend("torch")
    import torch

    backend, counts = _counting_backend()
    compiled = torch.compile(_layer, backend=backend)
    report = gb.check(compiled, *_args())
    assert report.passed, str(report)
    assert report.function == "_layer" and [row.input for row in report.rows] == ["x", "w"]
    assert counts["runs"] >= report.evaluations, counts  # every evaluation ran compiled code
    assert any("fn is compiled (torch.compile)" in note for note in report.notes), report.notes
    contract = next(c for c in report.contracts if c.name == "compiled = eager")
    assert contract.checked and contract.passed and "compiled" in contract.message, str(report)
    runs = counts["runs"]
    compiled(*_args())
    assert counts["runs"] == runs + 1  # torch.compile still runs the user's function compiled after the check


def test_a_miscompiled_function_fails_compiled_equals_eager_with_every_row_right() -> None:
    require_backend("torch")
    import torch

    backend, _ = _counting_backend(scale=1 + 1e-4)
    report = gb.check(torch.compile(_layer, backend=backend), *_args())
    assert all(row.passed for row in report.rows), str(report)
    assert not report.passed and [c.name for c in report.contracts if not c.passed] == ["compiled = eager"], str(report)
    assert "the compiled function's outputs differ from the eager function's" in next(
        c.message for c in report.contracts if not c.passed)


def test_a_compiled_module_is_named_by_its_own_parameters() -> None:
    require_backend("torch")
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    backend, counts = _counting_backend()
    report = gb.check(torch.compile(model, backend=backend), torch.randn(5, 3, dtype=torch.float64))
    assert report.passed, str(report)
    assert {"0.weight", "2.bias"} <= {row.input for row in report.rows}, str(report)
    assert counts["runs"] > 0


def test_random_draws_make_compiled_and_eager_not_comparable_not_a_false_alarm() -> None:
    require_backend("torch")
    import torch

    backend, _ = _counting_backend()

    def noisy(x, w):
        return _layer(x, w) + 0.1 * torch.randn(4, dtype=x.dtype)  # drawn again, the same, for each evaluation

    report = gb.check(torch.compile(noisy, backend=backend), *_args())
    contract = next(c for c in report.contracts if c.name == "compiled = eager")
    assert report.passed and not contract.checked and "random" in contract.message, str(report)


def test_layout_contracts_of_a_compiled_function_run_only_when_asked_each_costing_a_compilation() -> None:
    require_backend("torch")
    import torch

    backend, counts = _counting_backend()
    report = gb.check(torch.compile(_layer, backend=backend), *_args())
    layouts = [c for c in report.contracts if c.name in ("non-contiguous inputs", "expanded inputs")]
    assert len(layouts) == 2 and not any(c.checked for c in layouts), str(report)
    assert all("contracts='all' runs it" in c.message for c in layouts)
    default = counts["compiled"]
    backend, counts = _counting_backend()
    thorough = gb.check(torch.compile(_layer, backend=backend), *_args(), contracts="all")
    assert all(c.checked and c.passed for c in thorough.contracts if c.name.endswith(("contiguous inputs",
                                                                                      "expanded inputs")))
    assert counts["compiled"] > default, (counts, default)  # torch.compile guards on strides
