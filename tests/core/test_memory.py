"""Bounded memory: a check never allocates past its budget, and a failing check still names the bug.

The checks that matter run in a subprocess under a hard address-space limit (``RLIMIT_AS``), on the
failing paths, where a check used to build the dense Jacobian and its temporaries and die: a custom
layer norm with a wrong backward on a (64, 128) input (8192 inputs and outputs) and a dense map of 2048
inputs. The budget is ``memory=`` (default: half of what the process can still get, the address-space
limit included); the in-process tests pin its option, its error and the fallback to random projections.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import gradbridge as gb
from gradbridge._checking.memory import available_bytes, parse_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")

LIMIT_PRELUDE = """
import resource, sys
cap = int(float(sys.argv[1]) * 2 ** 30)
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
"""


def run_capped(script: str, gib: float, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter whose address space is capped at ``gib`` GiB."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               MALLOC_ARENA_MAX="2", PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-c", LIMIT_PRELUDE + textwrap.dedent(script), str(gib)],
                          capture_output=True, text=True, timeout=timeout, env=env)


LAYER_NORM = """
import torch, gradbridge as gb

class LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        mu = x.mean(-1, keepdim=True)
        inv = 1 / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
        xhat = (x - mu) * inv
        ctx.save_for_backward(xhat, inv, w)
        return xhat * w + b

    @staticmethod
    def backward(ctx, g):
        xhat, inv, w = ctx.saved_tensors
        gx = g * w
        dx = inv * (gx - gx.mean(-1, keepdim=True))  # the xhat * mean(gx * xhat) term is dropped
        return dx, (g * xhat).sum(0), g.sum(0)

torch.manual_seed(0)
x = torch.randn(64, 128, dtype=torch.float64)
report = gb.check(LayerNorm.apply, x, torch.randn(128, dtype=torch.float64), torch.randn(128, dtype=torch.float64))
print("PASSED" if report.passed else "FAILED", sorted(r.input for r in report.failures),
      report.failures[0].worst.input_index if report.failures else None)
"""


@pytest.mark.torch
def test_a_failing_layer_norm_check_fits_in_3_gib_and_names_the_input():
    pytest.importorskip("torch")
    result = run_capped(LAYER_NORM, 3.0)
    assert result.returncode == 0, result.stderr[-3000:]
    verdict, failing = result.stdout.split(" ", 1)
    assert verdict == "FAILED" and failing.startswith("['x']"), result.stdout  # named after forward's signature
    assert "None" not in failing, result.stdout  # an element is named


DENSE = """
import numpy as np, gradbridge as gb
n = 2048
rng = np.random.default_rng(0)
A = rng.normal(size=(n, n)) / np.sqrt(n)
x = rng.normal(size=n)

def vjp(g, x):
    out = A.T @ ((1 - np.tanh(A @ x) ** 2) * g)
    out[7] *= 1.001
    return out

report = gb.check(lambda x: np.tanh(A @ x), x, grad=vjp)
row = report.failures[0]
print(report.passed, report.mode, row.input, row.worst.input_index)
"""


def test_a_failing_dense_check_under_a_1_gib_cap_localises_the_element():
    """The full comparison would take ~1.1 GiB (dense Jacobian and ladder for 2048 x 2048): under a
    1 GiB address space the default budget sends it to random projections and bisection."""
    result = run_capped(DENSE, 1.0)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["False", "fast", "x", "(7,)"], result.stdout


def _dense_case(n: int, bug_at: int = 3):
    rng = np.random.default_rng(1)
    A = rng.normal(size=(n, n)) / np.sqrt(n)

    def vjp(g, x):
        out = A.T @ ((1 - np.tanh(A @ x) ** 2) * g)
        out[bug_at] *= 1.001
        return out

    return (lambda x: np.tanh(A @ x)), rng.normal(size=n), vjp


def test_auto_mode_over_the_memory_budget_takes_random_projections_and_names_the_element():
    fn, x, vjp = _dense_case(300)
    report = gb.check(fn, x, grad=vjp, memory="8MiB")
    assert report.mode == "fast" and not report.passed, str(report)
    assert report.failures[0].worst.input_index == (3,), str(report)
    assert any("above memory=8 MiB" in note for note in report.notes), report.notes


def test_auto_mode_within_the_budget_is_still_full():
    fn, x, vjp = _dense_case(300)
    report = gb.check(fn, x, grad=vjp)
    assert report.mode == "full" and report.failures[0].worst.input_index == (3,), str(report)


def test_full_mode_over_the_budget_is_refused_before_allocating():
    fn, x, vjp = _dense_case(300)
    with pytest.raises(gb.InvalidArgumentError, match=r"memory: a full check .* needs about .* above memory=8 MiB"):
        gb.check(fn, x, grad=vjp, mode="full", memory=8 * 2 ** 20)


@pytest.mark.parametrize("text, expected", [("4GiB", 4 * 2 ** 30), ("512MB", 512 * 10 ** 6), ("1.5 g", int(1.5 * 2 ** 30)),
                                            (2 ** 30, 2 ** 30), (None, None)])
def test_memory_option_sizes(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("bad", ["lots", "4 parsecs", -1, 10, True, float("inf"), [4]])
def test_memory_option_rejects_what_is_not_a_size(bad):
    with pytest.raises(gb.InvalidArgumentError, match="^memory: "):
        gb.check(np.sin, np.ones(3), grad=np.cos, memory=bad)


def test_the_default_budget_sees_the_address_space_limit():
    script = """
    from gradbridge._checking.memory import available_bytes
    print(available_bytes())
    """
    result = run_capped(script, 1.0)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 0 < int(result.stdout) < 2 ** 30 < available_bytes(), result.stdout
