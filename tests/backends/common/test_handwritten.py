"""The ``grad=`` path of the adapter kit offers exactly the capabilities of the framework's prepared function.

The core asks capabilities with ``isinstance`` (:mod:`gradbridge._adapter`); a wrapper that always defines
``evaluate_edits`` would promise edited points the framework cannot build. Real NumPy and PyTorch adapters.
"""

from __future__ import annotations

import numpy as np
import pytest

from gradbridge._adapter import CheckSpec, EditedEvaluation, capabilities
from gradbridge._registry import get_adapter
from gradbridge.backends.common.handwritten import HandWrittenGradient

from backend_matrix import require_backend


def _spec(fn, x, grad) -> CheckSpec:
    return CheckSpec(fn=fn, args=(x,), kwargs={}, params=None, wrt=None, grad=grad, seed=0, train=False,
                     arg_names=("x",), promote=True)


def test_a_framework_without_edited_points_gets_none_through_grad() -> None:
    require_backend("autograd")
    pytest.importorskip("autograd")
    spec = _spec(lambda x: np.sum(x ** 2), np.ones(3), lambda x: 2 * x)
    inner = get_adapter("autograd").prepare(_spec(lambda x: np.sum(x ** 2), np.ones(3), None))
    prepared = get_adapter("autograd").prepare(spec)
    assert not isinstance(inner, EditedEvaluation)
    assert isinstance(prepared, HandWrittenGradient)
    assert not isinstance(prepared, EditedEvaluation), capabilities(prepared)


def test_a_framework_that_builds_edited_points_keeps_them_through_grad() -> None:
    require_backend("torch")
    torch = pytest.importorskip("torch")
    x = torch.ones(3, dtype=torch.float64)
    prepared = get_adapter("torch").prepare(_spec(lambda t: (t ** 2).sum(), x, lambda t: 2 * t.detach().numpy()))
    assert isinstance(prepared, HandWrittenGradient) and isinstance(prepared, EditedEvaluation)
    with prepared.session():
        prepared.evaluate(prepared.x0[None, :])
        edited = prepared.evaluate_edits(np.array([1]), np.array([2.0]))
    assert np.allclose(edited, [[6.0]])
