"""The torch adapter's per-call shortcuts give exactly what the general paths give.

A small check is dominated by fixed costs per evaluation, per VJP and per session, so the adapter takes
shortcuts where nothing needs doing: the default generator's seeded state put back with ``set_state``
instead of re-seeding, arguments filled into a template, a single-tensor output flattened without a tree
walk or a concatenation, the VJP loops calling autograd's engine the way ``torch.autograd.grad`` does,
the side-effect screen's disassembly kept per code object. These tests pin down that each shortcut is
invisible: the same random draws, the same numbers bit for bit, copies where a view would leak, the
general path wherever an override or a mode could see the difference.
"""

from __future__ import annotations

import gc
import random
import time
from typing import Any, Callable

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gradbridge as gb  # noqa: E402
from gradbridge.backends.common import reach  # noqa: E402
from gradbridge._adapter import CheckSpec  # noqa: E402
from gradbridge._agreement import agree  # noqa: E402
from gradbridge.backends import torch as torch_backend  # noqa: E402
from gradbridge.backends.torch import compat, side_effects  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

pytestmark = pytest.mark.torch

SEED = 0


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _prepare(fn: Callable[..., Any], *args: Any, params: Any = None, promote: bool = True,
             wrt: Any = None) -> torch_backend.TorchPrepared:
    spec = CheckSpec(fn=fn, args=args, kwargs={}, params=params, wrt=wrt, grad=None, seed=SEED, train=False,
                     arg_names=tuple(f"arg{i}" for i in range(len(args))), promote=promote)
    return torch_backend.ADAPTER.prepare(spec)


def _points(prepared: torch_backend.TorchPrepared, count: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return prepared.x0 + 1e-3 * rng.normal(size=(count, len(prepared.x0)))


# --------------------------------------------------------------------------------------------------
# Re-seeding: set_state of the seeded state is the same as manual_seed, every time.
# --------------------------------------------------------------------------------------------------


def _draws(x: torch.Tensor) -> torch.Tensor:
    """Draws from every global generator; torch.randn(1) twice leaves a cached normal sample behind."""
    a = torch.randn(1)
    b = torch.rand(3, dtype=torch.float64)
    c = torch.randn(1, dtype=torch.float64)
    d = torch.normal(0.0, 1.0, (5,))
    return torch.cat([x.sum().reshape(1), a.double(), b, c, d.double(),
                      torch.tensor([np.random.rand(), random.random()], dtype=torch.float64)])


def test_every_evaluation_sees_the_freshly_seeded_generators() -> None:
    x = _randn(4)
    torch.manual_seed(SEED)
    random.seed(SEED)
    np.random.seed(SEED)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # as in the session
    try:
        expected = _draws(x).numpy()
    finally:
        torch.set_default_dtype(default)
    torch.manual_seed(123)  # the user's state, to be put back
    user_state = torch.get_rng_state()
    torch.randn(7)
    after_user_draws = torch.get_rng_state()  # the user's state once the draws below came from it
    torch.set_rng_state(user_state)
    prepared = _prepare(_draws, x)
    with prepared.session():
        first = prepared.evaluate(np.stack([prepared.x0] * 3))
        torch.randn(7)  # draws between evaluations (inside the session) change nothing, and come from the
        random.random()  # user's own generators: each evaluation puts back the state it found
        again = prepared.evaluate(prepared.x0[None])
        pulled = prepared.vjp(np.ones((1, first.shape[1])))  # the forward of a VJP is re-seeded too
    assert torch.equal(torch.get_rng_state(), after_user_draws)
    np.testing.assert_array_equal(first, np.stack([expected] * 3))
    np.testing.assert_array_equal(again[0], expected)
    np.testing.assert_array_equal(pulled[0], np.ones(4))


def test_a_second_session_of_the_same_prepared_function_draws_the_same() -> None:
    x = _randn(3)
    prepared = _prepare(_draws, x)
    rows = []
    for _ in range(2):
        with prepared.session():
            rows.append(prepared.evaluate(prepared.x0[None]))
        torch.rand(11)
    np.testing.assert_array_equal(rows[0], rows[1])


# --------------------------------------------------------------------------------------------------
# Outputs: a view of fn's output is copied before fn can write into it again.
# --------------------------------------------------------------------------------------------------


def test_an_output_buffer_fn_keeps_and_rewrites_gives_one_row_per_point() -> None:
    buffer = torch.zeros(5, dtype=torch.float64)

    def fn(x):
        torch.sin(x, out=buffer)  # the same tensor object comes back every time
        return buffer

    x = _randn(5)
    prepared = _prepare(fn, x)
    points = _points(prepared, 9)
    with prepared.session():
        values = prepared.evaluate(points)
    np.testing.assert_array_equal(values, np.sin(points))


@pytest.mark.parametrize("count", [3, 9])
def test_an_identity_output_does_not_share_the_points_memory(count: int) -> None:
    prepared = _prepare(lambda x: x, _randn(6))
    points = _points(prepared, count)
    kept = points.copy()
    with prepared.session():
        values = prepared.evaluate(points)
    assert not np.shares_memory(values, points)
    values[:] = 0.0
    np.testing.assert_array_equal(points, kept)


def test_outputs_of_every_structure_flatten_as_the_tree_walk_does() -> None:
    def fn(x):
        return {"b": (x.exp(), 3, [x.sum()]), "a": torch.arange(3), "c": x.float() * 2}

    x = _randn(4)
    prepared = _prepare(fn, x)
    points = _points(prepared, 3)
    with prepared.session():
        values = prepared.evaluate(points)
    assert [spec.name for spec in prepared.output_specs] == ["out['b'][0]", "out['b'][2][0]", "out['c']"]
    for point, row in zip(points, values):
        expected = np.concatenate([np.exp(point), [point.sum()], (point.astype(np.float32) * 2).astype(np.float64)])
        np.testing.assert_allclose(row, expected, rtol=1e-6)


def test_an_output_that_changes_size_raises_the_same_error_as_before() -> None:
    calls = iter(range(100))

    def fn(x):
        return x[: 2 + next(calls) % 2]

    with pytest.raises(gb.FunctionEvaluationError, match="all input arrays must have the same shape"):
        gb.check(fn, _randn(4))


# --------------------------------------------------------------------------------------------------
# Arguments: filled into a template (tensors and constants) or rebuilt (containers), the same either way.
# --------------------------------------------------------------------------------------------------


def test_arguments_with_constants_and_unchecked_tensors_reach_fn_as_before() -> None:
    seen = []

    def fn(x, scale, counts, tag, w):
        seen.append((type(scale), counts.dtype, tag, w.dtype))
        counts.add_(1)  # a copy each call: the user's tensor and the next call never see it
        return torch.sin(x) * scale + (counts.double() * w).sum()

    counts = torch.arange(4)
    x, w = _randn(4), _randn(4, seed=3).float()
    prepared = _prepare(fn, x, 2.5, counts, "tag", w, wrt=(0,))
    assert prepared.problem._slots is not None  # no container among the arguments: the template path
    points = _points(prepared, 3)
    with prepared.session():
        values = prepared.evaluate(points)
    assert torch.equal(counts, torch.arange(4))
    assert seen[0] == (float, torch.int64, "tag", torch.float64)  # the float32 tensor promoted, as before
    expected = np.sin(points) * 2.5 + float((torch.arange(4).double() + 1) @ w.double())
    np.testing.assert_allclose(values, expected, rtol=1e-15, atol=1e-15)


def test_arguments_in_containers_are_rebuilt() -> None:
    def fn(pair, extra):
        a, b = pair
        return torch.tanh(a @ b) + extra["shift"]

    a, b = _randn(2, 3), _randn(3, 2, seed=1)
    shift = torch.tensor(0.5, dtype=torch.float64)
    prepared = _prepare(fn, (a, b), {"shift": shift})
    assert prepared.problem._slots is None
    report = gb.check(fn, (a, b), {"shift": shift})
    assert report.passed, str(report)
    with prepared.session():
        values = prepared.evaluate(prepared.x0[None])
    np.testing.assert_allclose(values[0], (torch.tanh(a @ b) + 0.5).reshape(-1).numpy(), rtol=1e-15)


# --------------------------------------------------------------------------------------------------
# VJPs: the engine called directly gives torch.autograd.grad's numbers; modes and overrides see the call.
# --------------------------------------------------------------------------------------------------


class _Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * grad * x ** 2


VJP_CASES = {
    "scalar": (lambda x: (torch.sin(x) * x ** 2).sum(), lambda: (_randn(6),), {}),
    "vector": (torch.tanh, lambda: (_randn(3, 4),), {}),
    "two_inputs_tuple": (lambda a, b: (a @ b, (a ** 2).sum()), lambda: (_randn(2, 3), _randn(3, 2, seed=1)), {}),
    "custom_function": (_Cube.apply, lambda: (_randn(5),), {}),
    "float32_promote_false": (lambda x: torch.tanh(x) * x, lambda: (_randn(5).float(),), {"promote": False}),
}


@pytest.mark.parametrize("name", sorted(VJP_CASES))
def test_vjps_through_the_engine_equal_torch_autograd_grad(name: str, monkeypatch) -> None:
    fn, make_args, options = VJP_CASES[name]
    assert compat._engine() is not None  # this torch offers the engine call
    results = []
    for direct in (True, False):
        if not direct:
            monkeypatch.setattr(compat, "_run_backward", None)  # torch.autograd.grad throughout
        prepared = _prepare(fn, *make_args(), **options)
        with prepared.session():
            m = prepared.evaluate(prepared.x0[None]).shape[1]
            cotangents = np.random.default_rng(5).normal(size=(3, m))
            results.append(prepared.vjp(cotangents))
    np.testing.assert_array_equal(results[0], results[1])


def test_params_given_as_plain_tensors_still_get_their_gradients() -> None:
    w = _randn(3, 3, seed=4).requires_grad_(True)
    prepared = _prepare(lambda x: torch.tanh(x @ w).sum(), _randn(2, 3), params=[w])
    with prepared.session():
        prepared.evaluate(prepared.x0[None])
        pulled = prepared.vjp(np.array([[1.0], [2.0]]))
    x = torch.tensor(prepared.x0[:6].reshape(2, 3), requires_grad=True)
    ww = w.detach().clone().requires_grad_(True)
    gx, gw = torch.autograd.grad(torch.tanh(x @ ww).sum(), [x, ww])
    expected = np.concatenate([gx.reshape(-1).numpy(), gw.reshape(-1).numpy()])
    np.testing.assert_allclose(pulled, np.stack([expected, 2 * expected]), rtol=1e-14)
    assert w.grad is None


class _SeesGrad(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.grads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.autograd.grad:
            self.grads += 1
        return func(*args, **(kwargs or {}))


def test_a_torch_function_mode_sees_every_backward_call() -> None:
    fn = lambda x: (torch.sin(x) * x ** 2).sum()  # noqa: E731
    prepared = _prepare(fn, _randn(5))
    with prepared.session():
        prepared.evaluate(prepared.x0[None])
        expected = prepared.vjp(np.array([[1.0], [-2.0], [0.5]]))
    prepared = _prepare(fn, _randn(5))
    mode = _SeesGrad()
    with prepared.session(), mode:
        prepared.evaluate(prepared.x0[None])
        got = prepared.vjp(np.array([[1.0], [-2.0], [0.5]]))
    assert mode.grads == 3
    np.testing.assert_array_equal(got, expected)


def test_a_backward_error_propagates_unchanged_through_the_engine_call() -> None:
    class Broken(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            raise ValueError("backward blew up")

    with pytest.raises(gb.FunctionEvaluationError, match="ValueError.*backward blew up"):
        gb.check(Broken.apply, _randn(4), mode="fast")


# --------------------------------------------------------------------------------------------------
# The side-effect screen and the escape watch.
# --------------------------------------------------------------------------------------------------


def _calls_update_on(owner: Any) -> Callable:
    return lambda x: owner.update(x)  # one code object for every owner


def test_the_screen_keeps_instructions_per_code_object_but_judges_each_closure() -> None:
    mutable, module = {}, torch.nn.Module()
    first, second, third = _calls_update_on(mutable), _calls_update_on(module), _calls_update_on(mutable)
    assert first.__code__ is second.__code__
    assert side_effects._visible_side_effect(first) == "fn calls owner.update(...)"
    assert side_effects._visible_side_effect(second) is None
    assert side_effects._visible_side_effect(third) == "fn calls owner.update(...)"
    assert first.__code__ in reach._INSTRUCTIONS


def _classic_cube() -> type:
    class ClassicCube(torch.autograd.Function):  # forward(ctx, ...), no setup_context: vmap refuses it
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x ** 3

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return 3 * grad * x ** 2

    return ClassicCube


def test_a_classic_function_refused_by_vmap_once_is_not_tried_again(monkeypatch) -> None:
    ClassicCube, Another = _classic_cube(), _classic_cube()
    x = _randn(12)
    first = gb.check(ClassicCube.apply, x)
    tries = []
    vmap = torch.func.vmap
    monkeypatch.setattr(torch.func, "vmap", lambda *a, **k: tries.append(a) or vmap(*a, **k))
    second = gb.check(ClassicCube.apply, x)
    assert first.passed and second.passed, str(second)
    note = next(n for n in first.notes if "torch.func.vmap" in n)
    assert "setup_context" in note and note in second.notes
    assert not tries  # the refusal was remembered
    other = gb.check(Another.apply, x)  # another class: tried (and refused) on its own
    assert tries and other.passed and any("setup_context" in n for n in other.notes)


@pytest.mark.parametrize("fn", [lambda x: (torch.sin(x) * x).sum(), lambda x: (x.exp(), {"s": (x ** 2).sum()})],
                         ids=["tensor", "tree"])
def test_batched_outputs_are_freed_without_a_garbage_collection(fn) -> None:
    prepared = _prepare(fn, _randn(6))
    enabled = gc.isenabled()
    with prepared.session():
        prepared.evaluate(prepared.x0[None])  # outputs known: no names, no tree-walk closures
        gc.disable()
        try:
            watch = side_effects._EscapeWatch()
            prepared._evaluate_vmap(_points(prepared, 8), watch)
            assert watch.refs and all(ref() is None for ref in watch.refs)
        finally:
            if enabled:
                gc.enable()


def test_agreement_is_unchanged_by_the_exact_shortcut() -> None:
    eps = float(np.finfo(np.float64).eps)
    a = np.array([[1.0, np.inf, -np.inf, 0.0]])
    assert agree(a, a.copy(), eps)
    assert agree(a + np.array([[1e-15, 0, 0, 0]]), a, eps)
    assert not agree(a + np.array([[1e-6, 0, 0, 0]]), a, eps)
    nan = np.array([[np.nan, 1.0]])
    assert agree(nan, nan.copy(), eps)
    assert not agree(nan, np.array([[1.0, 1.0]]), eps)
    assert not agree(np.array([[np.inf]]), np.array([[-np.inf]]), eps)
    assert not agree(a, a[:, :3], eps)


# --------------------------------------------------------------------------------------------------
# Overhead, printed for information only (never asserted: the machine may be busy).
# --------------------------------------------------------------------------------------------------


def test_overhead_next_to_gradcheck_is_printed(capsys) -> None:
    x = _randn(16, seed=9).requires_grad_(True)
    fn = lambda x: (torch.sin(x) * x ** 2).sum()  # noqa: E731

    def best(run: Callable[[], object], calls: int = 50) -> float:
        run()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(calls):
                run()
            times.append((time.perf_counter() - start) / calls)
        return min(times)

    ours = {mode: best(lambda: gb.check(fn, x, mode=mode)) for mode in ("fast", "full")}
    theirs = {mode: best(lambda: torch.autograd.gradcheck(fn, (x,), fast_mode=mode == "fast"))
              for mode in ("fast", "full")}
    with capsys.disabled():
        print("\n[overhead] n=16 sum(sin(x)*x^2): " + ", ".join(
            f"{mode}: gb.check {ours[mode] * 1e3:.2f} ms, gradcheck {theirs[mode] * 1e3:.2f} ms" for mode in ours))
