"""Batched evaluation (``torch.func.vmap``) and batched VJPs (``is_grads_batched``) in the torch adapter.

Which path runs is decided once per prepared function on its first chunk, and said in ``notes``. These
tests run real torch code (no mocks): plain functions and modules take the batched path, functions vmap
cannot run fall back to the point-by-point loop, both paths give the same numbers, and seeded bugs are
caught (and correct functions pass) whichever path runs. ``TorchPrepared.batching = False`` forces the
loop, the reference the batched path is compared with.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Tuple

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gradbridge as gb  # noqa: E402
from gradbridge._adapter import CheckSpec  # noqa: E402

from gradbridge.backends import torch as torch_backend  # noqa: E402

pytestmark = pytest.mark.torch

BATCHED = "under torch.func.vmap"
FELL_BACK = "evaluated point by point"


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _prepare(fn: Callable[..., Any], *args: Any, params: Any = None, train: bool = False,
             promote: bool = True) -> torch_backend.TorchPrepared:
    spec = CheckSpec(fn=fn, args=args, kwargs={}, params=params, wrt=None, grad=None, seed=0, train=train,
                     arg_names=tuple(f"arg{i}" for i in range(len(args))), promote=promote)
    return torch_backend.ADAPTER.prepare(spec)


def _points(prepared: torch_backend.TorchPrepared, count: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return prepared.x0 + 1e-3 * rng.normal(size=(count, len(prepared.x0)))


def _both_paths(make: Callable[[], torch_backend.TorchPrepared], count: int = 17
                ) -> Tuple[torch_backend.TorchPrepared, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Evaluate and take VJPs of fresh prepared functions, batched and looped, at the same points."""
    batched, looped = make(), make()
    looped.batching = False
    points = _points(batched, count)
    results = []
    for prepared in (batched, looped):
        with prepared.session():
            values = prepared.evaluate(points)
            cotangents = np.random.default_rng(2).normal(size=(count, values.shape[1]))
            results.append((values, prepared.vjp(cotangents)))
    (bv, bg), (lv, lg) = results
    return batched, bv, lv, bg, lg


def _path_note(prepared: torch_backend.TorchPrepared, what: str = "evaluat") -> str:
    notes = [n for n in prepared.notes if ("torch.func.vmap" in n or "point by point" in n) and what in n]
    assert len(notes) == 1, prepared.notes
    return notes[0]


# --------------------------------------------------------------------------------------------------
# Functions of every kind.
# --------------------------------------------------------------------------------------------------


class ClassicSquare(torch.autograd.Function):
    """Old style: ``forward(ctx, ...)``, no ``setup_context``: torch refuses it under vmap."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class ModernCube(torch.autograd.Function):
    """New style with a generated vmap rule: runs under vmap."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x ** 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * g


class ModernCubeBug(ModernCube):
    """Seeded bug: one element of the gradient is off by 10%."""

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        grad = 3 * x ** 2 * g
        scale = torch.ones_like(grad)
        scale[..., 2] = 1.1
        return grad * scale


class ClassicSquareBug(ClassicSquare):
    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2.2 * x * g


def _item_control_flow(x):
    if x.sum().item() > 0:
        return torch.sin(x) * 2
    return torch.cos(x)


class _Dropout(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.drop = torch.nn.Dropout(0.3)

    def forward(self, x):
        return self.drop(torch.tanh(self.fc(x)))


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


PLAIN = {
    "sin_x2_sum": (lambda x: (torch.sin(x) * x ** 2).sum(), lambda: (_randn(7),)),
    "tanh_vector": (torch.tanh, lambda: (_randn(3, 4),)),
    "matmul_two_inputs": (lambda a, b: torch.tanh(a @ b), lambda: (_randn(3, 5), _randn(5, 2, seed=1))),
    "tuple_output": (lambda x: (x.exp(), {"s": (x ** 2).sum()}), lambda: (_randn(5),)),
    "softmax_logsumexp": (lambda x: torch.softmax(x, -1) + torch.logsumexp(x, 0), lambda: (_randn(4, 3),)),
    "modern_function": (ModernCube.apply, lambda: (_randn(5),)),
}


# --------------------------------------------------------------------------------------------------
# Which path runs, and the note saying so.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_plain_functions_are_evaluated_batched(name: str) -> None:
    fn, args = PLAIN[name]
    report = gb.check(fn, *args())
    assert report.passed, str(report)
    note = next(n for n in report.notes if "torch.func.vmap" in n)
    assert note.startswith("evaluated in batches of up to ") and note.endswith(BATCHED), report.notes


def test_module_is_evaluated_batched_and_vjps_too() -> None:
    model = _mlp()
    report = gb.check(model, _randn(5, 4).float())
    assert report.passed, str(report)
    assert any(n.startswith("evaluated in batches of up to ") for n in report.notes), report.notes
    assert any(n.startswith("VJPs computed in batches of up to ") for n in report.notes), report.notes


def test_module_closed_over_with_params_is_batched() -> None:
    model = _mlp(3).double()
    x = _randn(2, 4)
    report = gb.check(lambda x: model(x).pow(2).sum(1), x, params=model)
    assert report.passed, str(report)
    assert any(n.startswith("evaluated in batches of up to ") for n in report.notes), report.notes


def test_classic_autograd_function_falls_back_to_the_loop() -> None:
    report = gb.check(ClassicSquare.apply, _randn(12))
    assert report.passed, str(report)
    note = next(n for n in report.notes if "torch.func.vmap" in n)
    assert note.startswith("fn could not run under torch.func.vmap (RuntimeError: ") and note.endswith(FELL_BACK)
    assert "setup_context" in note
    # its backward runs with batched cotangents though (vector output: several VJPs)
    assert any(n.startswith("VJPs computed in batches") for n in report.notes), report.notes


def test_item_control_flow_falls_back_to_the_loop() -> None:
    report = gb.check(_item_control_flow, _randn(5) + 3)
    assert report.passed, str(report)
    note = next(n for n in report.notes if "torch.func.vmap" in n)
    assert ".item()" in note and note.endswith(FELL_BACK), note


def test_data_dependent_control_flow_falls_back_to_the_loop() -> None:
    report = gb.check(lambda x: torch.sin(x) if x.sum() > 0 else torch.cos(x), _randn(5) + 3)
    assert report.passed, str(report)
    assert "data-dependent control flow" in _path_note_from(report.notes)


def _path_note_from(notes) -> str:
    return next(n for n in notes if "torch.func.vmap" in n)


def test_in_place_write_into_a_closed_over_tensor_falls_back() -> None:
    acc = torch.zeros(4, dtype=torch.float64)

    def fn(x):
        buf = acc.clone()
        buf.add_(x)  # fine under vmap? no: an unbatched tensor written with a batched one
        return buf * x

    report = gb.check(fn, _randn(4))
    assert report.passed, str(report)
    assert _path_note_from(report.notes).endswith(FELL_BACK), report.notes


def test_train_mode_dropout_falls_back_and_keeps_the_frozen_mask() -> None:
    model = _Dropout().double()
    x = _randn(3, 4)
    report = gb.check(model, x, train=True)
    assert report.passed, str(report)
    note = _path_note_from(report.notes)
    assert "random" in note and note.endswith(FELL_BACK), note
    # the same check with the loop forced: identical outputs (the mask is re-drawn identically per point)
    make = lambda: _prepare(model, x, train=True)  # noqa: E731
    prepared, bv, lv, bg, lg = _both_paths(make)
    assert np.array_equal(bv, lv) and np.array_equal(bg, lg)


def test_function_appending_to_a_list_runs_once_per_evaluation() -> None:
    """A visible Python side effect in fn's own code: never run under vmap (a batched tensor kept by fn
    could not be taken back), so fn still runs once per evaluation with ordinary tensors."""
    seen = []

    def fn(x):
        y = torch.tanh(x)
        seen.append(y.detach().clone())
        return y * 2

    report = gb.check(fn, _randn(4))
    assert report.passed, str(report)
    # + the forward pass of the VJP graph, one for each of the determinism probe's two VJP calls, and for the
    # contracts: one VJP graph per linearity probe (four), the primal recorded for backward, the batched pullback's
    # forward, two runs per memory layout (non-contiguous, expanded) and one for the in-place writes
    assert len(seen) == report.evaluations + 1 + 2 + 4 + 1 + 1 + 4 + 1
    assert all(t.shape == (4,) for t in seen)
    assert "seen.append" in _path_note_from(report.notes), report.notes


def test_module_functions_named_like_mutating_methods_are_batched() -> None:
    """``torch.add``/``np.add`` are no side effects: only containers' mutating methods count."""
    report = gb.check(lambda x: torch.add(x, 1.0) * torch.sin(x), _randn(4))
    assert report.passed, str(report)
    assert _path_note_from(report.notes).endswith(BATCHED), report.notes


def test_tensor_kept_by_a_helper_is_noticed_at_run_time() -> None:
    """The side effect hides in a helper (not in fn's own code): the batched tensor it keeps is noticed
    after the first batched call, and fn goes to the loop."""
    kept = {}

    def remember(t):
        kept["last"] = t
        return t

    report = gb.check(lambda x: remember(torch.sin(x)) * 3, _randn(5))
    assert report.passed, str(report)
    assert "keeps tensors" in _path_note_from(report.notes), report.notes


def test_eval_mode_dropout_is_batched() -> None:
    report = gb.check(_Dropout().double(), _randn(3, 4))
    assert report.passed, str(report)
    assert _path_note_from(report.notes).endswith(BATCHED), report.notes


def test_params_as_plain_tensors_use_the_loop() -> None:
    w = _randn(3, 3, seed=4).requires_grad_(True)
    report = gb.check(lambda x: torch.tanh(x @ w), _randn(2, 3), params=[w])
    assert report.passed, str(report)
    assert "params= given as plain tensors" in " ".join(report.notes)


def test_function_that_behaves_differently_under_vmap_falls_back() -> None:
    """Python state changing with each call: the batched call sees one value for all points, the loop
    one per point; the agreement guard notices and the loop's outputs are returned."""
    calls = [0]

    def fn(x):
        calls[0] += 1
        return torch.sin(x) + 1e-3 * calls[0]

    prepared = _prepare(fn, _randn(4))
    points = _points(prepared, 8)
    with prepared.session():
        values = prepared.evaluate(points)
    assert prepared.paths["evaluate"].looped
    assert "different outputs under torch.func.vmap" in _path_note(prepared), prepared.notes
    # the loop's outputs: one call per point, each with its own counter value
    offsets = values - np.sin(points)
    assert np.allclose(offsets, offsets[:, :1]) and len(np.unique(np.round(offsets[:, 0], 6))) == 8
    report = gb.check(fn, _randn(4))  # and the check still reports the non-determinism
    assert not report.passed and "not deterministic" in report.problem


def _batched_calls_raising(after: int, error: type) -> Callable[..., Any]:
    """sin(x).sum(), raising ``error`` in its ``after``-th call under vmap (a batched point vector)."""
    batched_calls = [0]

    def fn(x):
        if torch._C._functorch.is_batchedtensor(x):
            batched_calls[0] += 1
            if batched_calls[0] == after:
                raise error(f"batched call {after} failed")
        return torch.sin(x).sum()

    return fn


def test_user_error_after_batching_was_decided_still_raises() -> None:
    class Boom(Exception):
        pass

    prepared = _prepare(_batched_calls_raising(2, Boom), _randn(4))
    with prepared.session():
        prepared.evaluate(_points(prepared, 8))
        assert prepared.paths["evaluate"].batched
        with pytest.raises(Boom):
            prepared.evaluate(_points(prepared, 5))
    assert prepared.paths["evaluate"].batched
    # through the check: 12 perturbed points in chunks of 8 and 4; the second (batched) chunk raises
    with pytest.raises(gb.FunctionEvaluationError) as info:
        gb.check(_batched_calls_raising(2, Boom), _randn(6), chunk_size=8, mode="full")
    assert isinstance(info.value.__cause__, Boom)


def test_function_raising_everywhere_raises_and_names_the_error() -> None:
    def fn(x):
        raise ValueError("broken")

    with pytest.raises(gb.FunctionEvaluationError, match="ValueError"):
        gb.check(fn, _randn(3))


# --------------------------------------------------------------------------------------------------
# Both paths give the same numbers.
# --------------------------------------------------------------------------------------------------


AGREEMENT = {
    **{name: (lambda fn=fn, args=args: _prepare(fn, *args())) for name, (fn, args) in PLAIN.items()},
    "mlp_module": lambda: _prepare(_mlp(), _randn(5, 4).float()),
    "mlp_params_closure": lambda: (lambda m: _prepare(lambda x: m(x).sum(1), _randn(3, 4), params=m))(_mlp(1).double()),
    "classic_function": lambda: _prepare(ClassicSquare.apply, _randn(6)),
    "mlp_promote_false": lambda: _prepare(_mlp(2), _randn(3, 4).float(), promote=False),
    # wide: vmap runs fn in sub-batches (of 8 here) rather than on all 17 points at once
    "wide_input_sub_batches": lambda: _prepare(lambda x: (torch.tanh(x) * x).sum(), _randn(40000)),
}


@pytest.mark.parametrize("name", sorted(AGREEMENT))
def test_batched_and_looped_results_agree(name: str) -> None:
    prepared, bv, lv, bg, lg = _both_paths(AGREEMENT[name])
    eps = 1e-12 if prepared.working_eps is None else 1e3 * prepared.working_eps
    for batched, looped in ((bv, lv), (bg, lg)):
        assert batched.shape == looped.shape
        scale = max(1.0, float(np.max(np.abs(looped))))
        assert np.max(np.abs(batched - looped)) <= eps * scale, name


def test_elementwise_function_agrees_bit_for_bit() -> None:
    prepared, bv, lv, bg, lg = _both_paths(lambda: _prepare(lambda x: torch.sin(x) * x.exp(), _randn(9)))
    assert prepared.paths["evaluate"].batched and prepared.paths["vjp"].batched
    assert np.array_equal(bv, lv) and np.array_equal(bg, lg)


def test_nan_outputs_come_back_from_the_batched_path() -> None:
    prepared = _prepare(lambda x: torch.log(x), _randn(4))
    with prepared.session():
        values = prepared.evaluate(_points(prepared, 9))
    assert prepared.paths["evaluate"].batched
    with np.errstate(invalid="ignore"):
        expected = np.log(_points(prepared, 9))
    assert np.array_equal(np.isnan(values), np.isnan(expected))


# --------------------------------------------------------------------------------------------------
# Seeded bugs are caught, correct functions pass, on either path.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batching", [True, False], ids=["batched", "looped"])
@pytest.mark.parametrize("mode", ["full", "fast"])
def test_seeded_bugs_are_caught_on_both_paths(batching: bool, mode: str, monkeypatch) -> None:
    monkeypatch.setattr(torch_backend.TorchPrepared, "batching", batching)  # the switch, not a mock
    x = _randn(6, seed=5)
    good = gb.check(ModernCube.apply, x, mode=mode)
    assert good.passed, str(good)
    bad = gb.check(ModernCubeBug.apply, x, mode=mode)
    assert not bad.passed, str(bad)
    assert {row.input for row in bad.failures} == {"arg0"}
    classic_good = gb.check(ClassicSquare.apply, x, mode=mode)
    assert classic_good.passed, str(classic_good)
    classic_bad = gb.check(ClassicSquareBug.apply, x, mode=mode)
    assert not classic_bad.passed, str(classic_bad)
    expected = BATCHED if batching else None
    note = [n for n in bad.notes if "torch.func.vmap" in n]
    assert (note[0].endswith(expected) if expected else not note), bad.notes


@pytest.mark.parametrize("batching", [True, False], ids=["batched", "looped"])
def test_wrong_module_gradient_is_caught_on_both_paths(batching: bool, monkeypatch) -> None:
    """A module whose forward uses a Function with a wrong backward, checked through the module path."""
    monkeypatch.setattr(torch_backend.TorchPrepared, "batching", batching)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(6, 6)

        def forward(self, x):
            return ModernCubeBug.apply(self.fc(x))

    torch.manual_seed(0)
    report = gb.check(Net().double(), _randn(2, 6))
    assert not report.passed, str(report)


# --------------------------------------------------------------------------------------------------
# Speed, printed for information only (never asserted).
# --------------------------------------------------------------------------------------------------


def test_speed_sanity_is_printed(capsys) -> None:
    n = 1024
    x = _randn(n, seed=9)
    fn = lambda x: (torch.sin(x) * x ** 2).sum()  # noqa: E731
    times = {}
    for batching in (True, False):
        torch_backend.TorchPrepared.batching = batching
        try:
            gb.check(fn, x, mode="full")
            start = time.perf_counter()
            report = gb.check(fn, x, mode="full")
            times[batching] = time.perf_counter() - start
        finally:
            torch_backend.TorchPrepared.batching = True
        assert report.passed
    with capsys.disabled():
        print(f"\n[speed] gb.check full, n={n}: batched {times[True]:.3f}s, looped {times[False]:.3f}s "
              f"({times[False] / times[True]:.1f}x)")


# --- batching decisions kept across checks ---

_ACTIVATION: Callable[[Any], Any] = torch.sin
_KEPT: list = []


def _per_point_calls(counter: list) -> Callable[[Any], Any]:
    """``sum(_ACTIVATION(x) * x)``, counting the calls fn gets with an unbatched tensor (point by point)."""
    from torch._C._functorch import is_batchedtensor

    def fn(x):
        if not is_batchedtensor(x):
            counter[0] += 1
        return (_ACTIVATION(x) * x).sum()

    return fn


def test_a_repeat_check_runs_batched_without_verifying_again() -> None:
    """The first check verifies the batched path against the loop (two extra point-by-point calls); a repeat
    check of the same function with the same shapes trusts it, and says it ran batched."""
    torch_backend.clear_cache()
    calls = [0]
    fn = _per_point_calls(calls)
    x = _randn(16, seed=3)
    first = gb.check(fn, x, mode="full")
    assert first.passed and any(BATCHED in note for note in first.notes), first.notes
    during_first = calls[0]
    again = gb.check(fn, x, mode="full")
    assert again.passed and any(BATCHED in note for note in again.notes), again.notes
    assert calls[0] - during_first == during_first - 2
    assert torch_backend.cache_size() == 1
    gb.check(fn, _randn(17, seed=4), mode="full")  # other shapes: verified afresh
    assert torch_backend.cache_size() == 2


def test_a_rebound_global_is_verified_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """A global fn reads is part of the key: rebinding it to a function that keeps the tensors it computes
    (which vmap would hand one batched tensor) makes the next check decide again, and fall back to the loop."""
    torch_backend.clear_cache()
    fn = _per_point_calls([0])
    x = _randn(16, seed=5)
    assert any(BATCHED in note for note in gb.check(fn, x, mode="full").notes)

    def keeping(t):
        out = torch.sin(t)
        _KEPT.append(out)
        return out

    monkeypatch.setattr(sys.modules[__name__], "_ACTIVATION", keeping)
    try:
        report = gb.check(fn, x, mode="full")
    finally:
        _KEPT.clear()
    assert report.passed
    assert any(FELL_BACK in note and "keeps tensors" in note for note in report.notes), report.notes


_LOGGED: list = []


def _log(t):
    _LOGGED.append(t)
    return t


def _maybe_keeping(x, keep):
    y = torch.sin(x)
    if keep:
        _log(y)
    return (y * x).sum()


def test_a_changed_argument_is_verified_afresh() -> None:
    """The arguments are part of the key: a flag that makes fn keep the tensors it computes (in a helper the
    static screen does not read) sends the next check through the full decision, which falls back to the
    loop."""
    torch_backend.clear_cache()
    x = torch.linspace(0.1, 1.0, 16, dtype=torch.float64)
    try:
        assert any(BATCHED in note for note in gb.check(_maybe_keeping, x, False, mode="full").notes)
        report = gb.check(_maybe_keeping, x, True, mode="full")
        assert report.passed
        assert any(FELL_BACK in note and "keeps tensors" in note for note in report.notes), report.notes
        unusable = 0
        for kept in _LOGGED:
            try:
                kept + 1
            except RuntimeError:  # a batched tensor that escaped from vmap
                unusable += 1
        assert unusable <= 1  # the one watched attempt that finds the escape (a known limit); never more
    finally:
        _LOGGED.clear()
