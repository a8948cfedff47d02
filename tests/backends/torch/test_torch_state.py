"""A check leaves the user's PyTorch objects bit-identical: after a pass, a failure and an exception.

Covered: parameter values, dtypes, ``requires_grad`` and existing ``.grad`` fields; buffers (BatchNorm
running statistics and ``num_batches_tracked``, also with ``train=True``); every submodule's
``training`` flag (models in train, eval and mixed modes); the global torch, NumPy and Python RNG
states; the default dtype and grad mode; the input tensors; plain tensors passed as ``params=``.
"""

from __future__ import annotations

import itertools
import random
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gradbridge as gb  # noqa: E402

pytestmark = pytest.mark.torch

OUTCOMES = ("pass", "fail", "raise", "raise_in_backward")
MODEL_MODES = ("train", "eval", "mixed")


class UserError(RuntimeError):
    """What the user's function raises mid-check."""


def _sin_function(sign: int = 1, raise_in_backward: bool = False) -> type:
    """sin as a custom Function; ``sign=-1`` seeds a sign-flip bug, ``raise_in_backward`` a crash."""

    class SinFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch.sin(x)

        @staticmethod
        def backward(ctx, grad):
            if raise_in_backward:
                raise UserError("backward blew up")
            (x,) = ctx.saved_tensors
            return sign * grad * torch.cos(x)

    return SinFunction


class SinLayer(torch.nn.Module):
    def __init__(self, function: type) -> None:
        super().__init__()
        self.function = function

    def forward(self, h):
        return self.function.apply(h)


def _function_for(outcome: str) -> type:
    return _sin_function(sign=-1 if outcome == "fail" else 1, raise_in_backward=outcome == "raise_in_backward")


def _model(outcome: str, model_mode: str) -> "torch.nn.Module":
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(), torch.nn.Dropout(0.3),
        SinLayer(_function_for(outcome)), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.05]))
        model[1].running_var.copy_(torch.tensor([0.5, 2.0, 1.5, 1.25]))
        model[1].num_batches_tracked.fill_(7)
    model[0].weight.grad = torch.full_like(model[0].weight, 0.25)
    model[5].bias.grad = torch.arange(2, dtype=torch.float32)
    model[1].bias.requires_grad_(False)  # a frozen parameter (not checked; its flag must survive)
    if model_mode == "train":
        model.train()
    elif model_mode == "eval":
        model.eval()
    else:
        model.train()
        model[1].eval()
        model[4].eval()
    return model


# --------------------------------------------------------------------------------------------------
# Snapshots: everything of the user's that a check could touch.
# --------------------------------------------------------------------------------------------------


def _tensor_state(t: "torch.Tensor") -> Dict[str, Any]:
    return {
        "object": t,
        "id": id(t),
        "value": t.detach().clone(),
        "dtype": t.dtype,
        "shape": tuple(t.shape),
        "requires_grad": t.requires_grad,
        "grad": None if t.grad is None else t.grad.detach().clone(),
        "grad_dtype": None if t.grad is None else t.grad.dtype,
        "data_ptr": t.data_ptr(),
    }


def _assert_tensor_state(before: Dict[str, Any], t: "torch.Tensor", what: str) -> None:
    assert id(t) == before["id"], f"{what}: a different object"
    assert t.dtype == before["dtype"], f"{what}: dtype {t.dtype}, was {before['dtype']}"
    assert tuple(t.shape) == before["shape"], what
    assert torch.equal(t.detach(), before["value"]), f"{what}: values changed"
    assert t.data_ptr() == before["data_ptr"], f"{what}: storage replaced"
    assert t.requires_grad == before["requires_grad"], f"{what}: requires_grad changed"
    if before["grad"] is None:
        assert t.grad is None, f"{what}: .grad was None, now set"
    else:
        assert t.grad is not None, f"{what}: .grad was dropped"
        assert t.grad.dtype == before["grad_dtype"] and torch.equal(t.grad, before["grad"]), f"{what}: .grad changed"


def _snapshot(module: Optional["torch.nn.Module"] = None, tensors: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    snap: Dict[str, Any] = {
        "torch_rng": torch.get_rng_state().clone(),
        "default_dtype": torch.get_default_dtype(),
        "grad_enabled": torch.is_grad_enabled(),
        "numpy_rng": np.random.get_state(),
        "python_rng": random.getstate(),
        "tensors": {name: _tensor_state(t) for name, t in (tensors or {}).items()},
    }
    if module is not None:
        snap["params"] = {name: _tensor_state(p) for name, p in module.named_parameters()}
        snap["buffers"] = {name: _tensor_state(b) for name, b in module.named_buffers()}
        snap["training"] = {name: m.training for name, m in module.named_modules()}
    return snap


def _assert_unchanged(snap: Dict[str, Any], module: Optional["torch.nn.Module"] = None,
                      tensors: Optional[Dict[str, Any]] = None) -> None:
    assert torch.equal(torch.get_rng_state(), snap["torch_rng"]), "global torch RNG state changed"
    assert torch.get_default_dtype() == snap["default_dtype"], "torch default dtype changed"
    assert torch.is_grad_enabled() == snap["grad_enabled"], "grad mode changed"
    numpy_now = np.random.get_state()
    assert numpy_now[0] == snap["numpy_rng"][0] and np.array_equal(numpy_now[1], snap["numpy_rng"][1]) \
        and numpy_now[2:] == snap["numpy_rng"][2:], "NumPy global RNG state changed"
    assert random.getstate() == snap["python_rng"], "Python random state changed"
    for name, t in (tensors or {}).items():
        _assert_tensor_state(snap["tensors"][name], t, f"tensor {name}")
    if module is not None:
        params = dict(module.named_parameters())
        assert set(params) == set(snap["params"])
        for name, p in params.items():
            _assert_tensor_state(snap["params"][name], p, f"parameter {name}")
        buffers = dict(module.named_buffers())
        assert set(buffers) == set(snap["buffers"])
        for name, b in buffers.items():
            _assert_tensor_state(snap["buffers"][name], b, f"buffer {name}")
        assert {name: m.training for name, m in module.named_modules()} == snap["training"]


def _disturb_global_rngs() -> None:
    """Put every global generator in a state no check would produce by re-seeding."""
    torch.manual_seed(1234)
    torch.rand(3)
    np.random.seed(4321)
    np.random.rand(5)
    random.seed(99)
    random.random()


def _raising_after(calls: int, fn: Callable[..., Any]) -> Callable[..., Any]:
    counter = itertools.count(1)

    def wrapped(*args):
        if next(counter) == calls:
            raise UserError(f"call {calls} failed")
        return fn(*args)

    return wrapped


def _run(outcome: str, fn: Callable[..., Any], *args: Any, **options: Any) -> Optional[gb.Report]:
    """Run the check for ``outcome`` and assert that outcome happened."""
    if outcome == "raise":
        fn = _raising_after(5, fn)
    if outcome.startswith("raise"):
        with pytest.raises(gb.FunctionEvaluationError) as info:
            gb.check(fn, *args, **options)
        assert isinstance(info.value.__cause__, UserError)
        return None
    report = gb.check(fn, *args, **options)
    assert report.passed == (outcome == "pass"), str(report)
    return report


# --------------------------------------------------------------------------------------------------
# Modules.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [False, True], ids=["train_False", "train_True"])
@pytest.mark.parametrize("model_mode", MODEL_MODES)
@pytest.mark.parametrize("outcome", OUTCOMES)
def test_module_state_is_untouched(outcome: str, model_mode: str, train: bool) -> None:
    model = _model(outcome, model_mode)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    x.grad = torch.ones_like(x)
    columns = torch.tensor([1, 0, 1])  # an integer input passed through unchanged
    _disturb_global_rngs()
    tensors = {"x": x, "columns": columns}
    snap = _snapshot(model, tensors)
    assert model[0].weight.dtype == torch.float32

    report = _run(outcome, lambda x, columns: model(x)[:, columns], x, columns, params=model, train=train)

    _assert_unchanged(snap, model, tensors)
    if report is not None:
        checked = {row.input for row in report.rows}
        assert {"x", "0.weight", "1.weight", "5.bias"} <= checked
        assert "1.bias" not in checked  # requires_grad=False: a constant of the module
        if outcome == "fail":
            assert {row.input for row in report.failures} >= {"x", "0.weight"}


@pytest.mark.parametrize("train", [False, True], ids=["train_False", "train_True"])
@pytest.mark.parametrize("model_mode", MODEL_MODES)
def test_modes_seen_inside_fn(model_mode: str, train: bool) -> None:
    """During the check every module is in eval mode, or left as the user set it with train=True."""
    model = _model("pass", model_mode)
    user_modes = {name: m.training for name, m in model.named_modules()}
    seen: List[Dict[str, bool]] = []

    def fn(x):
        seen.append({name: m.training for name, m in model.named_modules()})
        return model(x)

    report = gb.check(fn, torch.randn(5, 3, dtype=torch.float64), params=model, train=train)
    assert report.passed, str(report)
    expected = user_modes if train else {name: False for name in user_modes}
    assert seen and all(modes == expected for modes in seen)
    assert {name: m.training for name, m in model.named_modules()} == user_modes


@pytest.mark.parametrize("outcome", ("pass", "fail", "raise"))
def test_float32_model_stays_float32(outcome: str) -> None:
    model = _model(outcome, "train")
    x = torch.randn(5, 3)
    report = _run(outcome, lambda x: model(x), x, params=model, train=True)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model[1].running_mean.dtype == torch.float32 and model[1].running_var.dtype == torch.float32
    assert model[1].num_batches_tracked.dtype == torch.int64 and int(model[1].num_batches_tracked) == 7
    assert x.dtype == torch.float32
    if report is not None:
        # the check itself ran in float64 and says so
        assert any("float32" in note for note in report.notes), report.notes
    # the model still works as a float32 model afterwards
    model.eval()
    assert model(x).dtype == torch.float32


def test_check_under_no_grad_and_float64_default() -> None:
    model = _model("pass", "eval")
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        x = torch.randn(4, 3)
        assert x.dtype == torch.float64
        with torch.no_grad():
            snap = _snapshot(model, {"x": x})
            report = gb.check(lambda x: model(x), x, params=model)
            _assert_unchanged(snap, model, {"x": x})
            assert not torch.is_grad_enabled()
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(old)
    assert report.passed, str(report)


# --------------------------------------------------------------------------------------------------
# Plain tensors as params= (closed over by fn).
# --------------------------------------------------------------------------------------------------


def _plain_params():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 3, generator=g).requires_grad_(True)  # float32, trainable, with a .grad
    w.grad = torch.full((3, 3), 0.5)
    b = torch.randn(3, generator=g, dtype=torch.float64)  # float64, requires_grad False, no .grad
    return w, b


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("outcome", OUTCOMES)
def test_plain_tensor_params_checked_by_name_and_restored(outcome: str, order: int) -> None:
    w, b = _plain_params()
    params = [w, b]
    function = _function_for(outcome)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def fn(x):
        return function.apply(x @ w + b)

    _disturb_global_rngs()
    tensors = {"w": w, "b": b, "x": x}
    snap = _snapshot(None, tensors)
    report = _run(outcome, fn, x, params=params, order=order)
    _assert_unchanged(snap, None, tensors)
    assert params[0] is w and params[1] is b
    assert w.dtype == torch.float32 and b.dtype == torch.float64
    if report is not None:
        names = {row.input for row in report.rows}
        assert names == {"x", "params[0]", "params[1]"}
        if outcome == "fail":
            assert {row.input for row in report.failures if row.order == 1} == {"x", "params[0]", "params[1]"}
        if outcome == "pass" and order == 2:
            assert {row.input for row in report.rows if row.order == 2} == {"x", "params[0]", "params[1]"}


def test_plain_tensor_param_bug_located_by_name() -> None:
    """A bug that only affects the closed-over weight shows up as params[0] and nowhere else."""

    class ScaleWrongForW(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return x * w

        @staticmethod
        def backward(ctx, grad):
            x, w = ctx.saved_tensors
            return grad * w, grad * x * 2  # w's gradient doubled

    w = torch.randn(4, dtype=torch.float32)
    x = torch.randn(4, dtype=torch.float64)
    snap = _snapshot(None, {"w": w, "x": x})
    report = gb.check(lambda x: ScaleWrongForW.apply(x, w), x, params=[w])
    _assert_unchanged(snap, None, {"w": w, "x": x})
    assert not report.passed
    assert [row.input for row in report.failures] == ["params[0]"], str(report)
    assert report.row("x").status == "pass"


# --------------------------------------------------------------------------------------------------
# Randomness and non-determinism.
# --------------------------------------------------------------------------------------------------


def test_randomness_inside_fn_is_pinned_and_rngs_restored() -> None:
    x = torch.randn(5, dtype=torch.float64)

    def fn(x):
        noise = torch.rand(x.shape) + float(np.random.rand()) + random.random()
        return torch.sin(x) * (1 + 0.1 * noise)

    _disturb_global_rngs()
    snap = _snapshot(None, {"x": x})
    report = gb.check(fn, x)
    _assert_unchanged(snap, None, {"x": x})
    assert report.passed, str(report)
    assert report.problem is None


def test_function_changing_with_each_call_is_not_deterministic() -> None:
    calls = itertools.count()

    def fn(x):
        return torch.sin(x) + 1e-3 * next(calls)

    x = torch.randn(5, dtype=torch.float64)
    _disturb_global_rngs()
    snap = _snapshot(None, {"x": x})
    report = gb.check(fn, x)
    _assert_unchanged(snap, None, {"x": x})
    assert not report.passed
    assert report.problem is not None and "not deterministic" in report.problem
    with pytest.raises(gb.GradientCheckError) as info:
        gb.assert_check(fn, x)
    assert "not deterministic" in info.value.report.problem


def test_dropout_model_in_train_mode_restores_rng_and_mode() -> None:
    """train=True draws dropout masks from the (re-seeded) global generator: it must be put back."""
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Dropout(0.5), torch.nn.Linear(6, 1))
    x = torch.randn(4, 3)
    _disturb_global_rngs()
    snap = _snapshot(model, {"x": x})
    report = gb.check(lambda x: model(x), x, params=model, train=True)
    _assert_unchanged(snap, model, {"x": x})
    assert report.passed, str(report)
    # the next draw is exactly what it would have been without the check
    expected = torch.rand(4, generator=torch.Generator().set_state(snap["torch_rng"]))
    assert torch.equal(torch.rand(4), expected)


def test_fn_writing_into_an_unchecked_input_leaves_the_users_tensor_alone() -> None:
    x = torch.randn(4, dtype=torch.float64)
    scratch = torch.ones(4)  # float32, not checked (wrt=0); fn writes into it in place

    def fn(x, scratch):
        scratch.mul_(2.0)
        return torch.sin(x) * scratch

    tensors = {"x": x, "scratch": scratch}
    snap = _snapshot(None, tensors)
    report = gb.check(fn, x, scratch, wrt=0)
    _assert_unchanged(snap, None, tensors)
    assert report.passed, str(report)
    assert {row.input for row in report.rows} == {"x"}


def test_closed_over_float32_module_without_params_says_to_pass_it() -> None:
    model = torch.nn.Linear(3, 2)  # float32, not given as params=
    with pytest.raises(gb.FunctionEvaluationError, match="pass it as params=model"):
        gb.check(lambda x: model(x).sum(), torch.randn(4, 3))
    assert model.weight.dtype == torch.float32


def test_backend_that_does_not_match_the_arguments_is_named() -> None:
    pytest.importorskip("jax")
    with pytest.raises(gb.InvalidArgumentError, match="^backend: 'jax' was asked for, but the arguments are torch"):
        gb.check(torch.sin, torch.ones(3), backend="jax")


def test_integer_output_names_its_dtype() -> None:
    with pytest.raises(gb.FunctionEvaluationError, match="got a tensor of dtype int64"):
        gb.check(lambda x: x.argmax(), torch.ones(3))


def test_wrt_naming_a_frozen_parameter_says_it_is_frozen() -> None:
    layer = torch.nn.Linear(3, 2)
    layer.bias.requires_grad_(False)
    with pytest.raises(gb.InvalidArgumentError, match=r"^wrt: .*bias, which is held fixed \(requires_grad=False\)"):
        gb.check(layer, torch.randn(4, 3), params=layer, wrt="bias")
