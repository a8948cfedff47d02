"""Seeded bugs in hand-written PyTorch gradients: each must be caught AND located, and its fix must pass.

Every bug lives in the ``backward`` (or ``jvp``) of a classic-style ``torch.autograd.Function``. A check
must fail (``report.passed`` is False), the failing row must name the bugged input (and only it), and
for bugs that touch single elements the worst element must be the bugged one. The corrected Function
must pass. Each case runs in ``mode="full"`` and ``mode="fast"`` (which must still localise the bug
by re-running the full check on the failing leaf).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import pytest

torch = pytest.importorskip("torch")

import gradbridge as gb  # noqa: E402

pytestmark = pytest.mark.torch

Function = torch.autograd.Function
MODES = ("full", "fast")


def _randn(*shape: int, seed: int = 0, low: Optional[float] = None) -> torch.Tensor:
    """A float64 tensor; with ``low``, every element's magnitude is at least ``low`` (keeps factors non-zero)."""
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if low is not None:
        t = torch.sign(t) * (low + t.abs())
    return t


# --------------------------------------------------------------------------------------------------
# Correct Functions and their seeded-bug subclasses (the subclass only replaces ``backward``).
# --------------------------------------------------------------------------------------------------


class Sin(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sin(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.cos(x)


class SinSignFlip(Sin):
    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return -grad * torch.cos(x)


class SinRelError1e3(Sin):
    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.cos(x) * (1 + 1e-3)


class SinRelError1e4(Sin):
    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.cos(x) * (1 + 1e-4)


class Square(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 2

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * grad * x


class SquareMissingFactor2(Square):
    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * x


class MatMul(Function):
    """out = x @ w for square matrices, so a transposed gradient still has the right shape."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return grad @ w.t(), x.t() @ grad


class MatMulTransposedGrad(MatMul):
    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return grad @ w, x.t() @ grad


class XSinX(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sin(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (torch.sin(x) + x * torch.cos(x))


class XSinXDroppedTerm(XSinX):
    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * x * torch.cos(x)  # product rule: the sin(x) term is missing


class AddBias(Function):
    """out[i, j] = x[i, j] + b[j]: the bias is broadcast over the batch (dim 0)."""

    @staticmethod
    def forward(ctx, x, b):
        return x + b

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.sum(0)


class AddBiasWrongAxis(AddBias):
    @staticmethod
    def backward(ctx, grad):
        return grad, grad.sum(1)  # legal for a square batch, and wrong


class ThreeInputs(Function):
    """out = x * y + sin(z)."""

    @staticmethod
    def forward(ctx, x, y, z):
        ctx.save_for_backward(x, y, z)
        return x * y + torch.sin(z)

    @staticmethod
    def backward(ctx, grad):
        x, y, z = ctx.saved_tensors
        return grad * y, grad * x, grad * torch.cos(z)


class ThreeInputsWrongY(ThreeInputs):
    @staticmethod
    def backward(ctx, grad):
        x, y, z = ctx.saved_tensors
        return grad * y, grad * y, grad * torch.cos(z)  # y's gradient uses y instead of x


class Tanh(Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y ** 2)


class TanhWrongAtIndex3(Tanh):
    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        g = grad * (1 - y ** 2)
        index = torch.arange(g.numel()).reshape(g.shape)
        return torch.where(index == 3, 1.5 * g, g)


class Exp(Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.exp(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * y


class ExpZeroAt2_1(Exp):
    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        g = (grad * y).clone()
        g[2, 1] = 0.0  # a gradient dropped for one element of a matrix
        return g


@dataclass(frozen=True)
class Case:
    name: str
    correct: type
    buggy: type
    make_inputs: Callable[[], Tuple[torch.Tensor, ...]]
    failing: str  # the only input whose row must fail
    passing: Sequence[str] = ()  # inputs whose rows must still pass
    index: Optional[Tuple[int, ...]] = None  # element-local bug: the worst element's input index
    ratio: Optional[float] = None  # analytic / numeric at the worst element, where the bug fixes it


CASES = [
    Case("sign_flip", Sin, SinSignFlip, lambda: (_randn(6, seed=1, low=0.2),), "x", ratio=-1.0),
    Case("missing_factor_2", Square, SquareMissingFactor2, lambda: (_randn(6, seed=2, low=0.2),), "x", ratio=0.5),
    Case("transposed_matmul", MatMul, MatMulTransposedGrad, lambda: (_randn(3, 3, seed=3), _randn(3, 3, seed=4)),
         "x", passing=("w",)),
    Case("dropped_product_rule_term", XSinX, XSinXDroppedTerm, lambda: (_randn(6, seed=5, low=0.3),), "x"),
    Case("bias_summed_over_wrong_axis", AddBias, AddBiasWrongAxis, lambda: (_randn(4, 4, seed=6), _randn(4, seed=7)),
         "b", passing=("x",)),
    Case("one_of_three_inputs", ThreeInputs, ThreeInputsWrongY,
         lambda: (_randn(4, seed=8, low=0.2), _randn(4, seed=9, low=0.2), _randn(4, seed=10)), "y",
         passing=("x", "z")),
    Case("one_element_of_50", Tanh, TanhWrongAtIndex3, lambda: (_randn(50, seed=11),), "x", index=(3,), ratio=1.5),
    Case("one_element_of_matrix", Exp, ExpZeroAt2_1, lambda: (_randn(4, 5, seed=12),), "x", index=(2, 1), ratio=0.0),
    Case("relative_error_1e-3", Sin, SinRelError1e3, lambda: (_randn(6, seed=13),), "x", ratio=1 + 1e-3),
    Case("relative_error_1e-4", Sin, SinRelError1e4, lambda: (_randn(6, seed=14),), "x", ratio=1 + 1e-4),
]


def _rows_by_input(report: gb.Report, order: int = 1):
    rows = {}
    for row in report.rows:
        if row.order == order:
            rows.setdefault(row.input, []).append(row)
    return rows


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_seeded_bug_is_caught_and_located(case: Case, mode: str) -> None:
    inputs = case.make_inputs()
    report = gb.check(case.buggy.apply, *inputs, mode=mode)

    assert not report.passed, f"{case.name} was not caught in {mode} mode:\n{report}"
    assert report.problem is None
    rows = _rows_by_input(report)
    assert {row.input for row in report.failures} == {case.failing}, str(report)
    for name in case.passing:
        assert name in rows and all(row.status == "pass" for row in rows[name]), str(report)

    bad = report.row(case.failing)
    assert bad.status == "fail"
    assert bad.mismatches > 0
    assert bad.worst is not None, "a failing row must name its worst element"
    assert len(bad.worst.input_index) == len(bad.shape)
    assert all(0 <= i < n for i, n in zip(bad.worst.input_index, bad.shape))
    assert bad.worst.ratio > 1
    if mode == "fast":
        assert "then full" in bad.method, bad.method  # localised by the full check on this leaf
    if case.index is not None:
        assert bad.worst.input_index == case.index, str(report)
        assert bad.worst.output_index == case.index, str(report)  # element-wise op: diagonal Jacobian
        assert bad.mismatches == 1, str(report)
    if case.ratio is not None:
        if case.ratio == 0.0:
            assert bad.worst.analytic == 0.0 and abs(bad.worst.numeric) > 1e-3
        else:
            assert bad.worst.analytic / bad.worst.numeric == pytest.approx(case.ratio, abs=1e-7)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corrected_function_passes(case: Case, mode: str) -> None:
    inputs = case.make_inputs()
    report = gb.check(case.correct.apply, *inputs, mode=mode)
    assert report.passed, str(report)
    expected_inputs = {case.failing, *case.passing}
    assert expected_inputs <= {row.input for row in report.rows}
    assert all(row.status == "pass" for row in report.rows)


def test_custom_function_leaves_inputs_alone() -> None:
    """The bugged Function runs on copies: the user's inputs keep their values and flags."""
    x = _randn(3, 3, seed=20).requires_grad_(True)
    w = _randn(3, 3, seed=21)
    x_before, w_before = x.detach().clone(), w.clone()
    report = gb.check(MatMulTransposedGrad.apply, x, w)
    assert not report.passed
    assert torch.equal(x.detach(), x_before) and torch.equal(w, w_before)
    assert x.requires_grad and not w.requires_grad
    assert x.grad is None and w.grad is None


# --------------------------------------------------------------------------------------------------
# order=2: wrong double backward, invisible to order=1.
# --------------------------------------------------------------------------------------------------


class CubeGrad(Function):
    """3 x^2 as a Function of its own, so that the gradient of Cube's backward is hand-written too."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return 3 * x ** 2

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 6 * x


class CubeGradWrong(CubeGrad):
    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 3 * x  # the second derivative is 6x


class Cube(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * CubeGrad.apply(x)


class CubeViaWrongGradFunction(Cube):
    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * CubeGradWrong.apply(x)


class CubeDetachedInBackward(Cube):
    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 3 * x.detach() ** 2  # right value, but invisible to double backward


class CubePlain(Cube):
    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 3 * x ** 2


class Mul(Function):
    """out = x * w elementwise."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return grad * w, grad * x


class MulDetachedW(Mul):
    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return grad * w.detach(), grad * x  # d(grad_x)/dw is lost


@dataclass(frozen=True)
class SecondOrderCase:
    name: str
    correct: type
    buggy: type
    make_inputs: Callable[[], Tuple[torch.Tensor, ...]]
    failing: Tuple[str, str]  # (input, output) of the only failing order-2 row


SECOND_ORDER_CASES = [
    SecondOrderCase("backward_uses_function_with_wrong_backward", Cube, CubeViaWrongGradFunction,
                    lambda: (_randn(5, seed=30, low=0.3),), ("x", "grad[x]")),
    SecondOrderCase("detach_in_backward", CubePlain, CubeDetachedInBackward,
                    lambda: (_randn(5, seed=31, low=0.3),), ("x", "grad[x]")),
    SecondOrderCase("detach_of_one_saved_input", Mul, MulDetachedW,
                    lambda: (_randn(4, seed=32, low=0.3), _randn(4, seed=33, low=0.3)), ("w", "grad[x]")),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", SECOND_ORDER_CASES, ids=[c.name for c in SECOND_ORDER_CASES])
def test_wrong_double_backward_caught_only_by_order_2(case: SecondOrderCase, mode: str) -> None:
    inputs = case.make_inputs()
    first = gb.check(case.buggy.apply, *inputs, mode=mode, order=1)
    assert first.passed, f"the first derivative is right:\n{first}"

    second = gb.check(case.buggy.apply, *inputs, mode=mode, order=2)
    assert not second.passed, str(second)
    assert all(row.passed for row in second.rows if row.order == 1), str(second)
    failing = {(row.input, row.output) for row in second.failures}
    assert {row.order for row in second.failures} == {2}
    if mode == "full":
        assert failing == {case.failing}, str(second)
    else:  # fast projects all outputs together, then localises the failing leaf with the full check
        assert {i for i, _ in failing} == {case.failing[0]}, str(second)
        assert case.failing in failing, str(second)
    bad = second.row(case.failing[0], case.failing[1], order=2)
    assert bad.status == "fail" and bad.worst is not None and bad.worst.ratio > 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", SECOND_ORDER_CASES, ids=[c.name for c in SECOND_ORDER_CASES])
def test_correct_double_backward_passes(case: SecondOrderCase, mode: str) -> None:
    report = gb.check(case.correct.apply, *case.make_inputs(), mode=mode, order=2)
    assert report.passed, str(report)
    assert any(row.order == 2 and row.status == "pass" for row in report.rows)


# --------------------------------------------------------------------------------------------------
# Forward mode: a Function's jvp.
# --------------------------------------------------------------------------------------------------


class SinWithJvp(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        return torch.sin(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.cos(x)

    @staticmethod
    def jvp(ctx, tangent):
        (x,) = ctx.saved_tensors
        return tangent * torch.cos(x)


class SinWithWrongJvp(SinWithJvp):
    @staticmethod
    def jvp(ctx, tangent):
        (x,) = ctx.saved_tensors
        return tangent * torch.sin(x)


class SinWithWrongJvpAt2(SinWithJvp):
    @staticmethod
    def jvp(ctx, tangent):
        (x,) = ctx.saved_tensors
        out = tangent * torch.cos(x)
        out = out.clone()
        out[2] = -out[2]
        return out


@pytest.mark.parametrize("mode", MODES)
def test_correct_jvp_passes_forward_mode(mode: str) -> None:
    report = gb.check(SinWithJvp.apply, _randn(6, seed=40), analytic="fwd", mode=mode)
    assert report.passed, str(report)
    assert [row.analytic_mode for row in report.rows] == ["fwd"]
    assert report.rows[0].status == "pass"
    assert report.jvps > 0


@pytest.mark.parametrize("mode", MODES)
def test_wrong_jvp_caught_in_forward_mode(mode: str) -> None:
    report = gb.check(SinWithWrongJvp.apply, _randn(6, seed=41), analytic="fwd", mode=mode)
    assert not report.passed, str(report)
    bad = report.row("x")
    assert bad.status == "fail" and bad.analytic_mode == "fwd" and bad.worst is not None


@pytest.mark.parametrize("mode", MODES)
def test_wrong_jvp_element_located_and_backward_still_passes(mode: str) -> None:
    report = gb.check(SinWithWrongJvpAt2.apply, _randn(6, seed=42, low=0.2), analytic="both", mode=mode)
    assert not report.passed, str(report)
    by_mode = {row.analytic_mode: row for row in report.rows}
    assert set(by_mode) == {"rev", "fwd", "rev vs fwd"}
    assert by_mode["rev"].status == "pass", str(report)
    assert by_mode["fwd"].status == "fail", str(report)
    assert by_mode["rev vs fwd"].status == "fail", str(report)  # VJP and JVP disagree
    assert by_mode["fwd"].worst.input_index == (2,)
    assert by_mode["fwd"].worst.output_index == (2,)


@pytest.mark.parametrize("mode", MODES)
def test_function_without_jvp_is_unsupported_not_failed(mode: str) -> None:
    report = gb.check(Sin.apply, _randn(5, seed=43), analytic="both", mode=mode)
    by_mode = {row.analytic_mode: row for row in report.rows}
    assert by_mode["rev"].status == "pass", str(report)
    assert by_mode["fwd"].status == "unsupported", str(report)
    assert "jvp" in by_mode["fwd"].message
    assert report.passed, str(report)
    assert report.failures == []


def test_missing_jvp_does_not_hide_a_wrong_backward() -> None:
    report = gb.check(SinSignFlip.apply, _randn(5, seed=44, low=0.2), analytic="both")
    by_mode = {row.analytic_mode: row for row in report.rows}
    assert by_mode["rev"].status == "fail"
    assert by_mode["fwd"].status == "unsupported"
    assert not report.passed


# --------------------------------------------------------------------------------------------------
# nn.Modules: parameters checked by name.
# --------------------------------------------------------------------------------------------------


def _mlp_with_dropout() -> "torch.nn.Module":
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2))


class BatchNormNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(3, 4)
        self.bn = torch.nn.BatchNorm1d(4)
        self.fc2 = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def _batchnorm_net() -> BatchNormNet:
    torch.manual_seed(1)
    net = BatchNormNet()
    with torch.no_grad():  # non-trivial running statistics, so eval and train modes really differ
        net.bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        net.bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.5, 1.0]))
    return net


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_mlp_with_dropout_passes_with_named_params(train: bool) -> None:
    model = _mlp_with_dropout()
    x = _randn(5, 3, seed=50).float()
    report = gb.check(lambda x: model(x), x, params=model, train=train)
    assert report.passed, str(report)
    names = {row.input for row in report.rows}
    assert names == {"x", "0.weight", "0.bias", "3.weight", "3.bias"}
    assert {row.kind for row in report.rows if row.input != "x"} == {"param"}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_dropout_mask_is_on_only_in_train_mode_and_frozen(train: bool) -> None:
    """train=True must really run dropout, with one mask for every evaluation; the default must not."""
    model = _mlp_with_dropout()
    masks = []

    def fn(x):
        h = model[2](model[1](model[0](x)))
        masks.append((h == 0).detach().clone())
        return model[3](h)

    report = gb.check(fn, _randn(5, 3, seed=50), params=model, train=train)
    assert report.passed, str(report)
    # + the forward pass of the VJP graph, one for each of the determinism probe's two VJP calls, and for the
    # contracts: one VJP graph per linearity probe (four), the primal recorded for backward, the batched pullback's
    # forward, two runs per memory layout (non-contiguous, expanded) and one for the in-place writes
    assert len(masks) == report.evaluations + 1 + 2 + 4 + 1 + 1 + 4 + 1
    assert all(torch.equal(mask, masks[0]) for mask in masks)
    assert bool(masks[0].any()) == train


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_batchnorm_net_passes_with_named_params(train: bool) -> None:
    net = _batchnorm_net()
    x = _randn(6, 3, seed=51)
    report = gb.check(lambda x: net(x), x, params=net, train=train)
    assert report.passed, str(report)
    names = {row.input for row in report.rows}
    assert names == {"x", "fc1.weight", "fc1.bias", "bn.weight", "bn.bias", "fc2.weight", "fc2.bias"}


def test_module_as_fn_uses_its_parameters() -> None:
    net = _batchnorm_net()
    report = gb.check(net, _randn(6, 3, seed=52))
    assert report.passed, str(report)
    assert {"fc1.weight", "bn.weight", "fc2.bias"} <= {row.input for row in report.rows}


class CustomLinear(torch.nn.Module):
    """A module whose square weight goes through a (possibly buggy) custom Function."""

    def __init__(self, function: type) -> None:
        super().__init__()
        self.function = function
        self.weight = torch.nn.Parameter(_randn(3, 3, seed=60))
        self.bias = torch.nn.Parameter(_randn(3, seed=61))

    def forward(self, x):
        return AddBias.apply(self.function.apply(x, self.weight), self.bias)


class TransposedWGrad(MatMul):
    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return grad @ w.t(), grad.t() @ x  # the weight gradient, transposed


@pytest.mark.parametrize("mode", MODES)
def test_bug_in_a_module_parameter_is_located_by_name(mode: str) -> None:
    model = torch.nn.Sequential(torch.nn.Tanh(), CustomLinear(TransposedWGrad))
    x = _randn(3, 3, seed=62)
    report = gb.check(lambda x: model(x), x, params=model, mode=mode)
    assert not report.passed
    assert {row.input for row in report.failures} == {"1.weight"}, str(report)
    assert report.row("1.bias").status == "pass" and report.row("x").status == "pass"
    assert report.row("1.weight").kind == "param"

    fixed = torch.nn.Sequential(torch.nn.Tanh(), CustomLinear(MatMul))
    assert gb.check(lambda x: fixed(x), x, params=fixed, mode=mode).passed


# --------------------------------------------------------------------------------------------------
# Plain tensors closed over by fn (params=[...]): first and second order.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_plain_tensor_params_correct_function_passes_order_2(mode: str, dtype) -> None:
    w = _randn(3, 3, seed=70).to(dtype).requires_grad_(True)
    b = _randn(3, seed=71).to(dtype)  # requires_grad False: still checked, as params[1]
    x = _randn(4, 3, seed=72)
    report = gb.check(lambda x: torch.tanh(x @ w + b), x, params=[w, b], mode=mode, order=2)
    assert report.passed, str(report)
    for order in (1, 2):
        assert {row.input for row in report.rows if row.order == order} == {"x", "params[0]", "params[1]"}


@pytest.mark.parametrize("mode", MODES)
def test_plain_tensor_param_wrong_double_backward_located(mode: str) -> None:
    w = _randn(4, seed=73, low=0.3)
    x = _randn(4, seed=74, low=0.3)
    fn = lambda x: MulDetachedW.apply(x, w)  # noqa: E731
    assert gb.check(fn, x, params=[w], mode=mode).passed
    report = gb.check(fn, x, params=[w], mode=mode, order=2)
    assert not report.passed, str(report)
    assert {(row.input, row.order) for row in report.failures} == {("params[0]", 2)}, str(report)
    assert report.row("params[0]", "grad[x]", order=2).status == "fail"


def test_nothing_compared_is_not_a_pass() -> None:
    """analytic="fwd" on a Function without jvp compares nothing: that must not read as a pass."""
    report = gb.check(SinSignFlip.apply, _randn(5, seed=45, low=0.2), analytic="fwd")
    assert {row.status for row in report.rows} == {"unsupported"}
    assert not report.passed
    assert "nothing was compared" in report.summary()


def test_input_without_derivative_formula_is_reported_as_no_gradient() -> None:
    """igamma has no derivative for its first input: named as "no gradient", the other input still checked."""
    a = torch.tensor([1.5, 2.0], dtype=torch.float64)
    x = torch.tensor([0.5, 1.0], dtype=torch.float64)
    report = gb.check(torch.igamma, a, x)
    assert report.row("arg0").status == "no-gradient"
    assert "not implemented" in report.row("arg0").message
    assert not report.row("arg0").passed  # the numeric derivative is not zero: the gradient is missing
    assert report.row("arg1").status == "pass"


def test_no_gradient_where_the_function_is_flat_passes() -> None:
    class NoBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, k):
            return x * 2.0 + 0.0 * k

        @staticmethod
        def backward(ctx, g):
            raise NotImplementedError("the derivative of NoBackward is not implemented")

    report = gb.check(lambda x, k: NoBackward.apply(x, k) + x.sin(), torch.ones(3, dtype=torch.float64),
                      torch.ones(3, dtype=torch.float64))
    assert {row.status for row in report.rows} == {"no-gradient"}
    assert [row.passed for row in report.rows] == [False, True]  # x's gradient is missing; k's is zero anyway
