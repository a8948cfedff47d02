"""torch.library custom ops: named as their author wrote them (qualified name, schema parameters), never run under
vmap without a batching rule (torch's fallback would loop them and print a C++ warning per check onto stderr), and
torch's own ``torch.library.opcheck`` tests reported beside the gradient check: a fake kernel of the wrong shape and
an undeclared in-place write must fail, a correct op must hold every test."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import gradbridge as gb
from backend_matrix import require_backend

pytestmark = pytest.mark.torch

_names = itertools.count()


def _scaled_mul(fake_bug: bool = False, mutation_bug: bool = False, vmap_rule: bool = False):
    """``x * weight * alpha`` as a ``torch.library.custom_op`` with ``register_autograd``; ``fake_bug``: its fake
    kernel returns the wrong shape; ``mutation_bug``: it writes ``x`` in place without declaring it; ``vmap_rule``:
    it has a ``register_vmap`` batching rule. A new op name per call (ops live for the process)."""
    import torch

    name = f"gradbridge_tests::scaled_mul_{next(_names)}"

    @torch.library.custom_op(name, mutates_args=(), schema="(Tensor x, Tensor weight, float alpha) -> Tensor")
    def op(x, weight, alpha):
        out = x * weight * alpha
        if mutation_bug:
            x.add_(1.0)  # an undeclared write, after the output is computed
        return out

    @op.register_fake
    def _(x, weight, alpha):
        return x.new_empty(x.shape[:-1]) if fake_bug else torch.empty_like(x)

    def setup(ctx, inputs, output):
        x, weight, alpha = inputs
        ctx.save_for_backward(x, weight)
        ctx.alpha = alpha

    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        return g * weight * ctx.alpha, g * x * ctx.alpha, None

    op.register_autograd(backward, setup_context=setup)
    if vmap_rule:
        @op.register_vmap
        def _(info, in_dims, x, weight, alpha):
            x = x.movedim(in_dims[0], 0) if in_dims[0] is not None else x
            weight = weight.movedim(in_dims[1], 0) if in_dims[1] is not None else weight
            return x * weight * alpha, 0
    return op, name


def _args():
    import torch

    gen = np.random.default_rng(11)
    return torch.tensor(gen.normal(size=(3, 4))), torch.tensor(gen.normal(size=(3, 4))), 2.0


def _opcheck(report) -> dict:
    return {c.name: c for c in report.contracts if c.name.startswith("opcheck ")}


def test_a_custom_op_is_named_by_its_qualified_name_and_schema_parameters() -> None:
    require_backend("torch")
    op, name = _scaled_mul()
    report = gb.check(op, *_args())
    assert report.passed, str(report)
    assert report.function == name
    assert [row.input for row in report.rows] == ["x", "weight"], str(report)


def test_an_op_without_a_batching_rule_never_runs_under_vmap_and_says_so(capfd) -> None:
    require_backend("torch")
    op, name = _scaled_mul()
    report = gb.check(op, *_args())
    assert report.passed, str(report)
    assert not [line for line in capfd.readouterr().err.splitlines() if "batching rule" in line]
    assert any(name in note and "no vmap batching rule" in note for note in report.notes), report.notes
    batched = [c for c in report.contracts if c.name == "batched (vmap)"]
    assert batched and not batched[0].checked and "register_vmap" in batched[0].message, str(report)


def test_an_op_with_a_batching_rule_runs_batched_and_holds_the_batched_contract() -> None:
    require_backend("torch")
    op, _ = _scaled_mul(vmap_rule=True)
    report = gb.check(op, *_args())
    assert report.passed, str(report)
    assert not any("no vmap batching rule" in note for note in report.notes), report.notes


def test_a_correct_op_holds_the_opcheck_tests_and_contracts_all_compiles_it() -> None:
    require_backend("torch")
    op, _ = _scaled_mul()
    tests = _opcheck(gb.check(op, *_args()))
    assert {"opcheck test_schema", "opcheck test_autograd_registration", "opcheck test_faketensor"} == {
        name for name, c in tests.items() if c.checked and c.passed}
    assert not tests["opcheck test_aot_dispatch_dynamic"].checked
    thorough = _opcheck(gb.check(op, *_args(), contracts="all"))
    assert all(c.checked and c.passed for c in thorough.values()) and len(thorough) == 4, thorough


def test_a_fake_kernel_of_the_wrong_shape_fails_opcheck_with_every_row_right() -> None:
    require_backend("torch")
    op, _ = _scaled_mul(fake_bug=True)
    report = gb.check(op, *_args())
    assert all(row.passed for row in report.rows), str(report)
    assert not report.passed and [c.name for c in report.contracts if not c.passed] == ["opcheck test_faketensor"]
    assert "torch.library.opcheck fails" in _opcheck(report)["opcheck test_faketensor"].message


def test_an_undeclared_in_place_write_fails_opcheck_test_schema() -> None:
    require_backend("torch")
    op, _ = _scaled_mul(mutation_bug=True)
    report = gb.check(op, *_args())
    failed = {c.name for c in report.contracts if not c.passed}
    assert not report.passed and {"opcheck test_schema", "inputs untouched"} <= failed, str(report)


def test_a_function_calling_an_op_without_a_batching_rule_is_not_vmapped(capfd) -> None:
    require_backend("torch")
    import torch

    op, name = _scaled_mul()
    x, w, alpha = _args()
    report = gb.check(lambda t: torch.tanh(op(t, w, alpha)), x)  # the op closed over, read from fn's code
    assert report.passed, str(report)
    assert any(name in note and "no vmap batching rule" in note for note in report.notes), report.notes
    assert not [line for line in capfd.readouterr().err.splitlines() if "batching rule" in line]
