"""``vjp_transposed``: ``J t`` from transposing the adapter's own VJP (torch and JAX), never forward mode.

For each backend the transposed products must equal the dense Jacobian the adapter's :meth:`vjp` implies
(``vjp(I)``) times the tangents: for plain functions, several inputs, module parameters / parameter
pytrees and custom backward rules. A seeded wrong backward gives the same wrong ``J`` as the VJP (not the
true Jacobian). Backward passes that cannot be differentiated or transposed raise ModeUnsupportedError,
and the user's state (``requires_grad``, ``.grad``, training mode, JAX's x64 flag) is untouched. Real torch
and JAX code, no mocks.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import numpy as np
import pytest

from gradbridge._adapter import CheckSpec
from gradbridge._errors import ModeUnsupportedError


def _spec(fn: Callable[..., Any], args: Tuple[Any, ...], params: Any = None, wrt: Any = None,
          train: bool = False) -> CheckSpec:
    return CheckSpec(fn=fn, args=args, kwargs={}, params=params, wrt=wrt, grad=None, seed=0, train=train,
                     arg_names=tuple(f"arg{i}" for i in range(len(args))), promote=True)


def _tangents(prepared: Any, count: int = 9, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, len(prepared.x0)))


def _jacobian_from_vjp(prepared: Any) -> np.ndarray:
    """The dense (m, n) Jacobian the adapter's reverse mode implements: one VJP per unit cotangent."""
    m = prepared.evaluate(prepared.x0[None]).shape[1]
    return prepared.vjp(np.eye(m))


def _numeric_jacobian(prepared: Any, step: float = 1e-6) -> np.ndarray:
    """Central differences of the prepared function: the true Jacobian, to about 1e-9."""
    n = len(prepared.x0)
    plus = prepared.evaluate(prepared.x0 + step * np.eye(n))
    minus = prepared.evaluate(prepared.x0 - step * np.eye(n))
    return ((plus - minus) / (2 * step)).T


def _assert_transposes_vjp(prepared: Any, count: int = 9) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inside the session: ``vjp_transposed(T) == T @ J.T`` with ``J`` from ``vjp``; returns T, J t, J."""
    with prepared.session():
        jacobian = _jacobian_from_vjp(prepared)
        tangents = _tangents(prepared, count)
        products = prepared.vjp_transposed(tangents)
    expected = tangents @ jacobian.T
    assert products.shape == expected.shape and products.dtype == np.float64
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(products, expected, rtol=1e-10, atol=1e-12 * scale)
    return tangents, products, jacobian


def _assert_consistent_with_vjp_not_truth(prepared: Any) -> None:
    """A seeded wrong backward: J t follows the VJP's (wrong) Jacobian, which differs from the true one."""
    tangents, products, jacobian = _assert_transposes_vjp(prepared)
    with prepared.session():
        true = _numeric_jacobian(prepared)
    assert np.max(np.abs(jacobian - true)) > 1e-3, "the seeded bug should change the VJP's Jacobian"
    assert np.max(np.abs(products - tangents @ true.T)) > 1e-3


# ==================================================================================================
# torch
# ==================================================================================================


def _torch():
    return pytest.importorskip("torch")


def _torch_prepare(fn: Callable[..., Any], *args: Any, params: Any = None, wrt: Any = None, train: bool = False):
    from gradbridge.backends import torch as torch_backend

    return torch_backend.ADAPTER.prepare(_spec(fn, args, params, wrt, train))


def _randn(*shape: int, seed: int = 0):
    torch = _torch()
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _torch_matmul(wrong: Optional[str] = None) -> Callable[..., Any]:
    """The benchmark's classic matmul Function (``forward(ctx, ...)`` + ``backward``); ``wrong="transposed"``
    seeds a transposed weight in the input gradient (square weights only)."""
    torch = _torch()

    class MatMul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return x @ w

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            return (g @ w if wrong == "transposed" else g @ w.t()), x.t() @ g

    return MatMul.apply


def _torch_square(factor: float = 2.0, sign: float = 1.0) -> Callable[..., Any]:
    """``x**2`` as a classic Function whose backward is ``sign * factor * x * g`` (right: 2, +1)."""
    torch = _torch()

    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return sign * factor * x * g

    return Square.apply


def _torch_sine(sign: float = 1.0) -> Callable[..., Any]:
    torch = _torch()

    class Sine(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch.sin(x)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return sign * g * torch.cos(x)

    return Sine.apply


def _mlp(seed: int = 0):
    torch = _torch()
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


@pytest.mark.torch
@pytest.mark.parametrize("case", ["vector", "matrix", "tuple_output"])
def test_torch_plain_functions(case: str) -> None:
    torch = _torch()
    fn, args = {
        "vector": (lambda x: torch.sin(x) * x ** 2, (_randn(7),)),
        "matrix": (torch.tanh, (_randn(3, 4),)),
        "tuple_output": (lambda x: (x.exp(), {"s": (x ** 2).sum()}), (_randn(5),)),
    }[case]
    _assert_transposes_vjp(_torch_prepare(fn, *args))


@pytest.mark.torch
def test_torch_multi_input_batched_and_looped_agree() -> None:
    torch = _torch()

    def fn(a, b):
        return torch.tanh(a @ b) + a.sum()

    args = (_randn(3, 5), _randn(5, 2, seed=1))
    batched = _torch_prepare(fn, *args)
    _, products, _ = _assert_transposes_vjp(batched, count=12)
    assert batched.paths["transposed"].batched
    assert any(n.startswith("transposed VJPs (J t) computed in batches of up to 12") for n in batched.notes)
    looped = _torch_prepare(fn, *args)
    looped.batching = False
    with looped.session():
        np.testing.assert_allclose(looped.vjp_transposed(_tangents(looped, 12)), products, rtol=1e-12, atol=1e-14)


@pytest.mark.torch
def test_torch_module_parameters() -> None:
    torch = _torch()
    model = _mlp()
    _assert_transposes_vjp(_torch_prepare(model, _randn(5, 4).float()))
    closed = _mlp(3).double()
    _assert_transposes_vjp(_torch_prepare(lambda x: closed(x).pow(2).sum(1), _randn(2, 4), params=closed))


@pytest.mark.torch
def test_torch_plain_tensors_as_params() -> None:
    """``params=[w]`` swapped in through ``.data``: its gradient piece comes from the user's tensor."""
    torch = _torch()
    w = _randn(4, 3, seed=2).requires_grad_(True)
    _assert_transposes_vjp(_torch_prepare(lambda x: torch.tanh(x @ w), _randn(2, 4), params=[w]))
    assert w.requires_grad and w.grad is None and w.dtype == torch.float64


@pytest.mark.torch
def test_torch_classic_autograd_functions() -> None:
    torch = _torch()
    _assert_transposes_vjp(_torch_prepare(_torch_matmul(), _randn(6, 4), _randn(4, 3, seed=1)))
    _assert_transposes_vjp(_torch_prepare(lambda x: _torch_square()(x) + torch.sin(x), _randn(8)))


@pytest.mark.torch
@pytest.mark.parametrize("bug", ["sign_flip", "transposed_weight", "missing_factor"])
def test_torch_seeded_wrong_backward_is_transposed_as_implemented(bug: str) -> None:
    fn, args = {
        "sign_flip": (_torch_sine(sign=-1.0), (_randn(6),)),
        "transposed_weight": (_torch_matmul("transposed"), (_randn(5, 4), _randn(4, 4, seed=1))),
        "missing_factor": (_torch_square(factor=1.0), (_randn(6),)),
    }[bug]
    _assert_consistent_with_vjp_not_truth(_torch_prepare(fn, *args))


@pytest.mark.torch
def test_torch_once_differentiable_is_unsupported() -> None:
    torch = _torch()
    from torch.autograd.function import once_differentiable

    class Once(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        @once_differentiable
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * x * g

    prepared = _torch_prepare(lambda x: Once.apply(x) + torch.sin(x), _randn(5))
    with prepared.session():
        prepared.evaluate(prepared.x0[None])
        with pytest.raises(ModeUnsupportedError, match="once_differentiable"):
            prepared.vjp_transposed(_tangents(prepared))


@pytest.mark.torch
def test_torch_numpy_in_backward_is_unsupported() -> None:
    """The NumPy kit's backward leaves the graph entirely; one next to a torch op leaves it in part
    (the leaf's gradient is still on a graph: the consistency of J t with J^T u finds it)."""
    torch = _torch()
    import kit_torch

    op, to_native, _ = kit_torch.make(lambda a: a * a, lambda g, a: (2 * a * g,))
    x = to_native(np.linspace(0.5, 1.5, 6))
    for fn in (op, lambda x: op(x) + torch.sin(x)):
        prepared = _torch_prepare(fn, x)
        with prepared.session():
            prepared.evaluate(prepared.x0[None])
            prepared.vjp(np.eye(6))  # reverse mode itself works
            with pytest.raises(ModeUnsupportedError, match="outside autograd"):
                prepared.vjp_transposed(_tangents(prepared))


@pytest.mark.torch
def test_torch_zero_rows_and_constant_outputs() -> None:
    """Outputs that do not depend on the input are zero rows of J; a linear fn still gives J t."""
    torch = _torch()
    _assert_transposes_vjp(_torch_prepare(lambda x: torch.cat([x ** 2, torch.ones(3, dtype=x.dtype)]), _randn(4)))
    _assert_transposes_vjp(_torch_prepare(lambda x: 3.0 * x[:2], _randn(4)))
    prepared = _torch_prepare(lambda x: torch.ones(3, dtype=torch.float64), _randn(4))
    _, products, _ = _assert_transposes_vjp(prepared)
    assert not products.any()


@pytest.mark.torch
def test_torch_input_without_derivative_formula_has_zero_columns() -> None:
    """igamma has no derivative for its first input: vjp gives zeros there, so J t ignores that tangent."""
    torch = _torch()
    a = torch.tensor([1.5, 2.0, 2.5], dtype=torch.float64)
    x = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
    prepared = _torch_prepare(torch.igamma, a, x)
    _, _, jacobian = _assert_transposes_vjp(prepared)
    assert not jacobian[:, :3].any() and jacobian[:, 3:].any()
    assert set(prepared.undefined_gradients) == {"arg0"}


@pytest.mark.torch
def test_torch_user_state_is_untouched() -> None:
    torch = _torch()
    model = _mlp(1)
    model.train()
    model[1].eval()  # mixed modes come back as they were
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    model[0].weight.requires_grad_(False)
    flags[0] = False
    marker = torch.full_like(model[2].weight, 7.0)
    model[2].weight.grad = marker.clone()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _randn(3, 4).float().requires_grad_(True)
    default_dtype = torch.get_default_dtype()
    _assert_transposes_vjp(_torch_prepare(model, x))
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model[0].weight.grad is None and model[0].bias.grad is None
    assert torch.equal(model[2].weight.grad, marker)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert x.requires_grad and x.grad is None and x.dtype == torch.float32
    assert torch.get_default_dtype() == default_dtype


# ==================================================================================================
# JAX
# ==================================================================================================


def _jax():
    return pytest.importorskip("jax")


def _jax_prepare(fn: Callable[..., Any], *args: Any, wrt: Any = None):
    import gradbridge.backends.jax as jax_backend

    return jax_backend.ADAPTER.prepare(_spec(fn, args, wrt=wrt))


def _array(*shape: int, seed: int = 0):
    _jax()
    import jax.numpy as jnp

    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype=jnp.float32)


def _custom_vjp(forward: Callable[..., Any], backward: Callable[..., Any]) -> Any:
    """A ``jax.custom_vjp`` op: ``backward(g, *inputs)`` returns one gradient per input."""
    jax = _jax()

    @jax.custom_vjp
    def op(*inputs):
        return forward(*inputs)

    op.defvjp(lambda *inputs: (forward(*inputs), inputs), lambda inputs, g: tuple(backward(g, *inputs)))
    return op


def _jax_matmul(wrong: Optional[str] = None) -> Any:
    return _custom_vjp(lambda x, w: x @ w,
                       lambda g, x, w: ((g @ w if wrong == "transposed" else g @ w.T), x.T @ g))


@pytest.mark.jax
@pytest.mark.parametrize("case", ["vector", "matrix", "tuple_output"])
def test_jax_plain_functions(case: str) -> None:
    _jax()
    import jax.numpy as jnp

    fn, args = {
        "vector": (lambda x: jnp.sin(x) * x ** 2, (_array(7),)),
        "matrix": (jnp.tanh, (_array(3, 4),)),
        "tuple_output": (lambda x: (jnp.exp(x), {"s": jnp.sum(x ** 2)}), (_array(5),)),
    }[case]
    _assert_transposes_vjp(_jax_prepare(fn, *args))


@pytest.mark.jax
def test_jax_multi_input() -> None:
    _jax()
    import jax.numpy as jnp

    _assert_transposes_vjp(_jax_prepare(lambda a, b: jnp.tanh(a @ b) + jnp.sum(a), _array(3, 5), _array(5, 2, seed=1)))


@pytest.mark.jax
def test_jax_parameter_pytree() -> None:
    _jax()
    import jax.numpy as jnp

    params = {"dense1": {"w": _array(4, 6, seed=1), "b": _array(6, seed=2)}, "out": _array(6, 3, seed=3)}

    def mlp(params, x):
        hidden = jnp.tanh(x @ params["dense1"]["w"] + params["dense1"]["b"])
        return hidden @ params["out"]

    _assert_transposes_vjp(_jax_prepare(mlp, params, _array(5, 4)))


@pytest.mark.jax
def test_jax_custom_vjp_ops() -> None:
    _jax()
    import jax.numpy as jnp

    _assert_transposes_vjp(_jax_prepare(_jax_matmul(), _array(6, 4), _array(4, 3, seed=1)))
    square = _custom_vjp(lambda x: x * x, lambda g, x: (2 * x * g,))
    _assert_transposes_vjp(_jax_prepare(lambda x: square(x) + jnp.sin(x), _array(8)))


@pytest.mark.jax
@pytest.mark.parametrize("bug", ["sign_flip", "transposed_weight", "missing_factor"])
def test_jax_seeded_wrong_bwd_is_transposed_as_implemented(bug: str) -> None:
    _jax()
    import jax.numpy as jnp

    fn, args = {
        "sign_flip": (_custom_vjp(jnp.sin, lambda g, x: (-g * jnp.cos(x),)), (_array(6),)),
        "transposed_weight": (_jax_matmul("transposed"), (_array(5, 4), _array(4, 4, seed=1))),
        "missing_factor": (_custom_vjp(lambda x: x * x, lambda g, x: (x * g,)), (_array(6),)),
    }[bug]
    _assert_consistent_with_vjp_not_truth(_jax_prepare(fn, *args))


def _python_branch_on_fixed(op: Any) -> Callable[..., Any]:
    """fn branching in Python on an unchecked array: the compiled maps cannot trace it (the per-check path)."""
    def fn(x, w):
        return op(x) * w if float(w.sum()) > 0 else -op(x)
    return fn


@pytest.mark.jax
def test_jax_per_check_path() -> None:
    _jax()
    import jax.numpy as jnp

    square = _custom_vjp(lambda x: x * x, lambda g, x: (2 * x * g,))
    prepared = _jax_prepare(_python_branch_on_fixed(lambda x: square(x) + jnp.sin(x)), _array(4), jnp.ones(4),
                            wrt=(0,))
    _assert_transposes_vjp(prepared)
    assert prepared.eager_path.transposes is not None  # the compiled path could not run it


@pytest.mark.jax
@pytest.mark.parametrize("path", ["compiled", "per_check"])
@pytest.mark.parametrize("kind", ["nonlinear", "callback", "comparison"])
def test_jax_non_transposable_bwd_is_unsupported(kind: str, path: str) -> None:
    jax = _jax()
    import jax.numpy as jnp

    def callback_bwd(g, x):
        struct = jax.ShapeDtypeStruct(x.shape, x.dtype)
        return (jax.pure_callback(lambda a, b: 2 * a * b, struct, x, g, vmap_method="sequential"),)

    backward = {"nonlinear": lambda g, x: (2 * x * g * g,),
                "callback": callback_bwd,
                "comparison": lambda g, x: (jnp.where(g > 0, g, 0.0) * 2 * x,)}[kind]
    op = _custom_vjp(lambda x: x * x, backward)
    if path == "compiled":
        prepared = _jax_prepare(lambda x: op(x) + jnp.sin(x), _array(4))
    else:
        prepared = _jax_prepare(_python_branch_on_fixed(op), _array(4), jnp.ones(4), wrt=(0,))
    with prepared.session():
        prepared.evaluate(prepared.x0[None])
        prepared.vjp(np.eye(4))  # reverse mode itself works
        with pytest.raises(ModeUnsupportedError, match="JAX cannot transpose the VJP"):
            prepared.vjp_transposed(_tangents(prepared))


@pytest.mark.jax
def test_jax_pure_callback_kit_is_unsupported() -> None:
    _jax()
    import kit_jax

    op, to_native, _ = kit_jax.make(lambda a: a * a, lambda g, a: (2 * a * g,))
    prepared = _jax_prepare(op, to_native(np.linspace(0.5, 1.5, 5)))
    with prepared.session():
        prepared.evaluate(prepared.x0[None])
        with pytest.raises(ModeUnsupportedError, match="pure_callback"):
            prepared.vjp_transposed(_tangents(prepared))


@pytest.mark.jax
def test_jax_leaves_without_reverse_mode_have_zero_columns() -> None:
    """A while_loop has no reverse mode and stop_gradient a symbolic zero: vjp gives zeros, so does J t."""
    jax = _jax()
    import jax.numpy as jnp

    def fn(x, y, z):
        power = jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] * y, c[1] + 1), (y, 0))[0]
        return jnp.sin(x) * 2 + power + jax.lax.stop_gradient(z) ** 2

    prepared = _jax_prepare(fn, _array(3), _array(3, seed=1), _array(3, seed=2))
    _, _, jacobian = _assert_transposes_vjp(prepared)
    assert jacobian[:, :3].any() and not jacobian[:, 3:].any()
    assert set(prepared.undefined_gradients) == {"arg1", "arg2"}


@pytest.mark.jax
def test_jax_transposed_maps_are_cached_across_checks() -> None:
    """A second check of the same function (new values, same shapes) reuses the compiled transposed
    maps: fn is not traced again (it counts its traces; compiled code runs no Python)."""
    _jax()
    import jax.numpy as jnp

    traces = [0]
    square = _custom_vjp(lambda x: x * x, lambda g, x: (2 * x * g,))

    def fn(x, w):
        traces[0] += 1
        return square(x) * w + jnp.sin(x)

    _assert_transposes_vjp(_jax_prepare(fn, _array(5), _array(5, seed=1)))
    after_first = traces[0]
    _assert_transposes_vjp(_jax_prepare(fn, _array(5, seed=2), _array(5, seed=3)))
    assert traces[0] == after_first


@pytest.mark.jax
def test_jax_unsupported_verdict_is_cached_too() -> None:
    _jax()
    import jax.numpy as jnp

    traces = [0]
    op = _custom_vjp(lambda x: x * x, lambda g, x: (2 * x * g * g,))

    def fn(x):
        traces[0] += 1
        return op(x) + jnp.sin(x)

    for seed in (0, 1):
        prepared = _jax_prepare(fn, _array(4, seed=seed))
        with prepared.session():
            prepared.evaluate(prepared.x0[None])
            prepared.vjp(np.eye(4))
            before = traces[0]
            with pytest.raises(ModeUnsupportedError):
                prepared.vjp_transposed(_tangents(prepared))
        if seed == 1:
            assert traces[0] == before


@pytest.mark.jax
def test_jax_x64_flag_is_untouched() -> None:
    jax = _jax()
    import jax.numpy as jnp

    before = bool(jax.config.jax_enable_x64)
    _assert_transposes_vjp(_jax_prepare(lambda x: jnp.tanh(x) * x, _array(4)))
    assert bool(jax.config.jax_enable_x64) == before
    assert jnp.zeros(2).dtype == (jnp.float64 if before else jnp.float32)
