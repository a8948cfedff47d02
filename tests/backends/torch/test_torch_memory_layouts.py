"""The memory-layout contracts on torch: fn and its backward must give the same values for non-contiguous and
expanded (stride-0) inputs as for contiguous ones with the same values, as Chainer checks by default. Every check
otherwise runs on contiguous float64 copies, so a kernel that indexes memory by shape, not stride, would pass."""

from __future__ import annotations

import numpy as np
import pytest

import gradbridge as gb
from backend_matrix import require_backend

pytestmark = pytest.mark.torch

X = np.array([[0.3, -0.7, 1.1], [0.5, 2.0, -1.4]])


def _contiguous_read(tensor):
    """The classic stride bug: reading a tensor's memory as if it were contiguous."""
    import torch

    strides, step = [], 1
    for size in reversed(tensor.shape):
        strides.insert(0, step)
        step *= size
    return torch.as_strided(tensor, tensor.shape, strides)


def _square(forward_bug: bool, backward_bug: bool):
    import torch

    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return (_contiguous_read(x) if forward_bug else x) ** 2

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * g * (_contiguous_read(x) if backward_bug else x)

    return Square.apply


def _layout_contracts(report):
    return {c.name: c for c in report.contracts if c.name.endswith(("contiguous inputs", "expanded inputs"))}


def test_a_stride_aware_rule_holds_both_layout_contracts() -> None:
    require_backend("torch")
    import torch

    report = gb.check(_square(False, False), torch.tensor(X))
    assert report.passed, str(report)
    contracts = _layout_contracts(report)
    assert set(contracts) == {"non-contiguous inputs", "expanded inputs"}, str(report)
    assert all(c.passed and c.checked for c in contracts.values()), str(report)


@pytest.mark.parametrize("forward_bug, backward_bug", [(True, False), (False, True)])
def test_a_kernel_reading_memory_as_contiguous_fails(forward_bug: bool, backward_bug: bool) -> None:
    require_backend("torch")
    import torch

    report = gb.check(_square(forward_bug, backward_bug), torch.tensor(X))
    assert not report.passed, str(report)
    assert all(row.passed for row in report.rows), str(report)  # on contiguous copies every entry is right
    violated = [c for c in report.contracts if not c.passed]
    assert [c.name for c in violated] == ["non-contiguous inputs"], str(report)
    assert ("fn gives other values" if forward_bug else "the backward gives other values") in violated[0].message


def test_a_function_that_raises_on_a_layout_is_reported_not_failed() -> None:
    require_backend("torch")
    import torch

    report = gb.check(lambda x: torch.sin(x.view(-1)), torch.tensor(X))
    assert report.passed, str(report)
    contracts = _layout_contracts(report)
    assert not contracts["non-contiguous inputs"].checked and "raises" in contracts["non-contiguous inputs"].message
    assert "contract not checked: non-contiguous inputs" in str(report)


def test_a_module_is_checked_with_non_contiguous_parameters() -> None:
    require_backend("torch")
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    report = gb.check(model, torch.tensor(X))
    assert report.passed, str(report)
    assert _layout_contracts(report)["non-contiguous inputs"].checked, str(report)
