"""The in-place contracts on torch: a backward must not write its incoming gradient (right values in a test, a
corrupted gradient wherever that gradient is used again), and fn must not write its inputs."""

from __future__ import annotations

import numpy as np
import pytest

import gradbridge as gb
from backend_matrix import require_backend

pytestmark = pytest.mark.torch


def _scale(in_place: bool):
    import torch

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 3

        @staticmethod
        def backward(ctx, g):
            if in_place:
                g.mul_(3)  # right values, written into the incoming gradient
                return g
            return g * 3

    return Scale.apply


def test_a_backward_writing_its_incoming_gradient_fails() -> None:
    require_backend("torch")
    import torch

    x = torch.tensor(np.array([0.3, -0.7, 1.1, 0.5]))
    right = gb.check(_scale(False), x)
    assert right.passed and {"incoming gradient untouched", "inputs untouched"} <= {c.name for c in right.contracts}
    report = gb.check(_scale(True), x)
    assert not report.passed and all(row.passed for row in report.rows), str(report)
    assert [c.name for c in report.contracts if not c.passed] == ["incoming gradient untouched"], str(report)
    # what the contract protects against: the caller's gradient tensor is silently changed by the backward (a
    # cotangent passed to torch.autograd.grad, reused afterwards, is now 3x; the result aliases it)
    leaf = x.clone().requires_grad_(True)
    v = torch.ones(4, dtype=torch.float64)
    first = torch.autograd.grad(_scale(True)(leaf), leaf, v)[0]
    assert torch.equal(v, torch.full_like(v, 3.0)) and first is v


def test_the_html_report_shows_the_contracts() -> None:
    require_backend("torch")
    import torch

    from gradbridge._reporting.html import render_html

    report = gb.check(_scale(True), torch.tensor(np.array([0.3, -0.7, 1.1, 0.5])))
    page = render_html([report], [None])
    assert "contract VIOLATED: incoming gradient untouched" in page
    assert "contracts held: linear in the cotangent" in page
