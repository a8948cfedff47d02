"""Contract checks on the rules, on every backend (``gradbridge/_checking/contracts.py``): a backward must be
linear in its incoming gradient (a zero cotangent gives zero), a forward-mode rule linear in its tangent, and the
primal a rule computes under differentiation must equal fn(x). Each violation fails the check with a sentence
naming it; correct rules hold every contract.

The seeded bugs live in NumPy backwards built by the kits into each framework's own custom-rule mechanism, so the
same bug is checked the same way everywhere.
"""

from __future__ import annotations

import numpy as np
import pytest

import gradbridge as gb
from backend_matrix import require_backend
from kit_torch import tanh_with_jvp
from kits import make_op

X0 = np.array([[0.3, -0.7, 1.1], [0.5, 2.0, -1.4]])


def _tanh(x):
    return np.tanh(x)


def _tanh_backward(g, x):
    return (g * (1 - np.tanh(x) ** 2),)


BUGGY = {
    # a gradient clipped on the way in: right for the unit cotangents of a Jacobian, wrong for larger ones
    "clips the incoming gradient": lambda g, x: (np.clip(g, -1, 1) * (1 - np.tanh(x) ** 2),),
    "squares the incoming gradient": lambda g, x: (g * np.abs(g) * (1 - np.tanh(x) ** 2),),
    "adds a constant term": lambda g, x: (g * (1 - np.tanh(x) ** 2) + 1e-3,),
}


def _check(backend: str, backward):
    op, to_native, options = make_op(backend, _tanh, backward)
    return gb.check(op, to_native(X0), **options)


def test_a_correct_rule_holds_every_contract(backend: str) -> None:
    report = _check(backend, _tanh_backward)
    assert report.passed, str(report)
    names = [c.name for c in report.contracts]
    assert "linear in the cotangent" in names and all(c.passed for c in report.contracts), report.contracts
    assert "contracts: held: linear in the cotangent" in str(report)


@pytest.mark.parametrize("bug", sorted(BUGGY))
def test_a_backward_not_linear_in_its_cotangent_fails(backend: str, bug: str) -> None:
    report = _check(backend, BUGGY[bug])
    assert not report.passed, str(report)
    violated = [c for c in report.contracts if not c.passed]
    assert [c.name for c in violated] == ["linear in the cotangent"], str(report)
    assert "contract VIOLATED: linear in the cotangent" in str(report)
    if bug == "adds a constant term":
        assert "zero cotangent is not zero" in violated[0].message, violated[0].message
    else:
        assert "not linear in its incoming gradient" in violated[0].message, violated[0].message


def test_clipping_invisible_to_the_jacobian_is_caught_by_the_contract_alone(backend: str) -> None:
    """Clipping at 10: every unit cotangent of the Jacobian passes through unchanged, so each Jacobian entry is
    right; only the contract sees the rule."""
    report = _check(backend, lambda g, x: (np.clip(g, -10, 10) * (1 - np.tanh(x) ** 2),))
    assert all(row.passed for row in report.rows), str(report)
    big = _check(backend, lambda g, x: (np.clip(g, -2, 2) * (1 - np.tanh(x) ** 2),))
    assert not big.passed and all(row.passed for row in big.rows), str(big)
    assert [c.name for c in big.contracts if not c.passed] == ["linear in the cotangent"], str(big)


# --- the primal under differentiation: frameworks whose rules compute their own forward ---

def test_a_jax_custom_vjp_fwd_with_another_primal_fails() -> None:
    require_backend("jax")
    import jax
    import jax.numpy as jnp

    def make(offset: float):
        @jax.custom_vjp
        def f(x):
            return jnp.sin(x)

        f.defvjp(lambda x: (jnp.sin(x) * (1 + offset), jnp.cos(x)), lambda c, g: (g * c,))
        return f

    x = jnp.asarray(X0, dtype=jnp.float32)
    assert gb.check(make(0.0), x).passed
    report = gb.check(make(1e-6), x)
    assert not report.passed and all(row.passed for row in report.rows), str(report)
    violated = [c for c in report.contracts if not c.passed]
    assert [c.name for c in violated] == ["primal under differentiation"], str(report)
    assert "fwd" in violated[0].message and "out[" in violated[0].message


def test_a_jax_custom_jvp_rule_with_another_primal_fails() -> None:
    require_backend("jax")
    import jax
    import jax.numpy as jnp

    def make(offset: float):
        @jax.custom_jvp
        def f(x):
            return jnp.sin(x)

        @f.defjvp
        def rule(primals, tangents):
            (x,), (t,) = primals, tangents
            return jnp.sin(x) + offset, jnp.cos(x) * t

        return f

    x = jnp.asarray(X0, dtype=jnp.float32)
    assert gb.check(make(0.0), x).passed
    report = gb.check(make(1e-5), x)
    assert not report.passed, str(report)
    assert [c.name for c in report.contracts if not c.passed] == ["primal under differentiation"], str(report)


def test_a_torch_function_whose_forward_changes_under_grad_fails() -> None:
    require_backend("torch")
    import torch

    def make(offset: float):
        class Sin(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                ctx.save_for_backward(x)
                # e.g. a cached or fused kernel taken only when a graph is recorded
                return torch.sin(x) + (offset if ctx.needs_input_grad[0] else 0.0)

            @staticmethod
            def backward(ctx, g):
                (x,) = ctx.saved_tensors
                return g * torch.cos(x)

        return Sin.apply

    x = torch.tensor(X0)
    assert gb.check(make(0.0), x).passed
    report = gb.check(make(1e-7), x)
    assert not report.passed and all(row.passed for row in report.rows), str(report)
    assert [c.name for c in report.contracts if not c.passed] == ["primal under differentiation"], str(report)


def test_a_torch_jvp_not_linear_in_its_tangent_fails() -> None:
    require_backend("torch")
    import torch

    def make(clip: bool):
        return tanh_with_jvp(lambda t, y: (t.clamp(-2, 2) if clip else t) * (1 - y ** 2))

    x = torch.tensor(X0)
    right = gb.check(make(False), x)
    assert right.passed and {"linear in the cotangent", "linear in the tangent"} <= {c.name for c in right.contracts}
    report = gb.check(make(True), x)
    assert not report.passed, str(report)
    assert [c.name for c in report.contracts if not c.passed] == ["linear in the tangent"], str(report)


def test_contracts_can_be_switched_off_and_the_option_is_validated(backend: str) -> None:
    op, to_native, options = make_op(backend, _tanh, lambda g, x: (np.clip(g, -2, 2) * (1 - np.tanh(x) ** 2),))
    off = gb.check(op, to_native(X0), contracts=False, **options)
    assert off.passed and off.contracts == [], str(off)  # every Jacobian entry is right: only a contract sees it
    with pytest.raises(gb.InvalidArgumentError, match=r"^contracts: expected True"):
        gb.check(op, to_native(X0), contracts="yes", **options)
