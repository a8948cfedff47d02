"""``promote=False``: checks in the arrays' own low precision (float32, float16, bfloat16), on every backend.

The requirement (issue "Low precision"): a function that only runs in float32 or bfloat16 (custom kernels
often do) can be checked with promotion turned off; correct code passes, while real bugs (1e-2 relative and
up in float32; gross ones, a sign flip or a factor 2, in float16 and bfloat16) are caught and located.
``benchmarks/precision_floor.py`` measures the smallest bug each precision can see.

The kernels come from ``kit_lowprec``: a NumPy-defined op that raises unless its inputs (and, in the
backward, its cotangent) are in the kernel's one dtype, turned into each framework's custom-gradient op.
The user's objects must come back exactly as they were: dtypes, values, module parameters and modes, the
default dtype, RNG states, JAX's x64 flag.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np
import pytest

import gradbridge as gb
from backend_matrix import require_backend
from kit_lowprec import KernelDtypeError, make_kernel

RNG = np.random.default_rng(20260)


@dataclass
class Op:
    name: str
    forward: Callable[..., np.ndarray]
    backward: Callable[..., Tuple[np.ndarray, ...]]
    inputs: Tuple[np.ndarray, ...]
    bug_element: Tuple[int, ...]  # where the one-element bug of the first input's gradient sits


def _dtanh(g, x):
    return (g * (1 - np.tanh(x) ** 2),)


OPS = [
    Op("tanh", np.tanh, _dtanh, (RNG.normal(size=8),), (5,)),
    Op("x*sin(x)", lambda x: x * np.sin(x), lambda g, x: (g * (np.sin(x) + x * np.cos(x)),),
       (RNG.uniform(0.5, 2.0, size=8) * RNG.choice([-1, 1], size=8),), (3,)),
    Op("matmul", lambda a, b: a @ b, lambda g, a, b: (g @ b.T, a.T @ g),
       (RNG.normal(size=(3, 4)), RNG.normal(size=(4, 2))), (1, 2)),
    Op("exp", np.exp, lambda g, x: (g * np.exp(x),), (RNG.normal(size=8),), (2,)),
]
OP_IDS = [op.name for op in OPS]


def scaled(factor: float, backward):
    """The backward with the first input's gradient multiplied by ``factor`` (1 + r, -1, 2...)."""
    def buggy(g, *xs):
        grads = list(backward(g, *xs))
        grads[0] = grads[0] * factor
        return tuple(grads)
    return buggy


def one_element(relative: float, index: Tuple[int, ...], backward):
    """The backward with one element of the first input's gradient off by ``relative``."""
    def buggy(g, *xs):
        grads = [np.array(x, dtype=np.float32, copy=True) for x in backward(g, *xs)]
        grads[0][index] *= 1 + relative
        return tuple(grads)
    return buggy


def check_kernel(backend: str, op: Op, backward, dtype: str, **options) -> gb.Report:
    fn, native, kit_options = make_kernel(backend, op.forward, backward, dtype)
    return gb.check(fn, *[native(a) for a in op.inputs], backend=backend, **kit_options, **options)


def leaf_names(report: gb.Report):
    names = []
    for row in report.rows:
        if row.input not in names and not row.input.startswith("("):
            names.append(row.input)
    return names


def assert_caught_on_first_input(report: gb.Report, element: Optional[Tuple[int, ...]] = None) -> None:
    assert not report.passed, str(report)
    first = leaf_names(report)[0]
    assert {row.input for row in report.failures} == {first}, str(report)
    if element is not None:
        worst = next(row.worst for row in report.failures if row.worst is not None)
        assert worst.input_index == element, str(report)


def _supports(backend: str, dtype: str) -> None:
    if backend in ("numpy", "autograd") and dtype == "bfloat16":  # autograd's arrays are NumPy's
        pytest.importorskip("ml_dtypes", reason="NumPy has bfloat16 only through ml_dtypes")


# ------------------------------------------------------------------------------------------------------
# A kernel that only runs in float32
# ------------------------------------------------------------------------------------------------------

def test_float32_kernel_is_not_silently_checked_in_float64(backend):
    """promote=True puts float64 copies into a float32-only kernel: that must end in a clear error naming
    promote=False (TensorFlow falls back to the given dtypes by itself and says so in the report)."""
    op = OPS[0]
    if backend == "tensorflow":
        report = check_kernel(backend, op, op.backward, "float32")
        assert report.passed, str(report)
        assert any("cannot run in float64" in note for note in report.notes), str(report)
        assert "float32" in report.step, str(report)
        return
    with pytest.raises(gb.FunctionEvaluationError, match="promote=False") as raised:
        check_kernel(backend, op, op.backward, "float32")
    assert "float32 only" in str(raised.value)
    assert isinstance(raised.value.__cause__, KernelDtypeError)


@pytest.mark.parametrize("mode", ["full", "fast"])
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_correct_float32_kernel_passes(backend, op, mode):
    report = check_kernel(backend, op, op.backward, "float32", promote=False, mode=mode)
    assert report.passed, str(report)
    assert len(leaf_names(report)) == len(op.inputs), str(report)
    note = next(n for n in report.notes if n.startswith("promote=False"))
    assert "float32" in note and "follow float32" in note, str(report)
    assert "float32" in report.step, str(report)


@pytest.mark.parametrize("mode", ["full", "fast"])
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_float32_kernel_with_a_one_percent_bug_fails(backend, op, mode):
    report = check_kernel(backend, op, scaled(1 + 1e-2, op.backward), "float32", promote=False, mode=mode)
    assert_caught_on_first_input(report)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_float32_kernel_with_a_sign_flip_fails(backend, op):
    report = check_kernel(backend, op, scaled(-1.0, op.backward), "float32", promote=False)
    assert_caught_on_first_input(report)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_float32_kernel_with_a_one_percent_bug_on_one_element_is_located(backend, op):
    report = check_kernel(backend, op, one_element(1e-2, op.bug_element, op.backward), "float32", promote=False)
    assert_caught_on_first_input(report, op.bug_element)


# ------------------------------------------------------------------------------------------------------
# float16 and bfloat16 kernels: correct passes, gross bugs fail (sub-percent bugs are below what these
# precisions can see: see benchmarks/precision_floor.py)
# ------------------------------------------------------------------------------------------------------

LOW = ["float16", "bfloat16"]


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_correct_half_precision_kernel_passes(backend, op, dtype):
    _supports(backend, dtype)
    report = check_kernel(backend, op, op.backward, dtype, promote=False)
    assert report.passed, str(report)
    assert any(n.startswith("promote=False") and f"follow {dtype}" in n for n in report.notes), str(report)


@pytest.mark.parametrize("bug", [-1.0, 2.0], ids=["sign flip", "factor 2"])
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_half_precision_kernel_with_a_gross_bug_fails(backend, op, dtype, bug):
    _supports(backend, dtype)
    report = check_kernel(backend, op, scaled(bug, op.backward), dtype, promote=False)
    assert_caught_on_first_input(report)


# ------------------------------------------------------------------------------------------------------
# Native ops in the frameworks' own low precisions
# ------------------------------------------------------------------------------------------------------

def _native(backend: str):
    """(tanh, sin, array-maker) of the framework."""
    if backend == "autograd":  # autograd.numpy on NumPy arrays (ml_dtypes' bfloat16)
        import autograd.numpy as anp
        from kit_lowprec import numpy_dtype
        return anp.tanh, anp.sin, lambda a, dtype: np.asarray(a).astype(numpy_dtype(dtype))
    if backend == "torch":
        import torch
        return torch.tanh, torch.sin, lambda a, dtype: torch.tensor(a, dtype=getattr(torch, dtype))
    if backend == "jax":
        import jax.numpy as jnp
        return jnp.tanh, jnp.sin, lambda a, dtype: jnp.asarray(a, dtype=getattr(jnp, dtype))
    import tensorflow as tf
    return tf.tanh, tf.sin, lambda a, dtype: tf.cast(tf.constant(a), getattr(tf, dtype))


NATIVE = [pytest.param(name, marks=getattr(pytest.mark, name)) for name in ("torch", "jax", "tensorflow", "autograd")]


def _native_options(framework: str) -> dict:
    """autograd's arrays are NumPy's: detection sees autograd in fn's code, which ``a @ b`` does not show, so
    the backend is named."""
    return {"backend": "autograd"} if framework == "autograd" else {}


@pytest.mark.parametrize("analytic", ["rev", "fwd"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", ["tanh", "x*sin(x)", "matmul"])
@pytest.mark.parametrize("framework", NATIVE)
def test_native_ops_pass_in_their_own_dtype(framework, name, dtype, analytic):
    require_backend(framework)
    tanh, sin, make = _native(framework)
    op = OPS[[o.name for o in OPS].index(name)]
    fn = {"tanh": tanh, "x*sin(x)": lambda x: x * sin(x), "matmul": lambda a, b: a @ b}[name]
    args = [make(a, dtype) for a in op.inputs]
    report = gb.check(fn, *args, promote=False, analytic=analytic, **_native_options(framework))
    assert report.passed, str(report)
    assert report.backend == framework, str(report)
    assert all(_dtype_name(a) == dtype for a in args)


@pytest.mark.parametrize("framework", NATIVE)
def test_native_float32_second_order_passes(framework):
    require_backend(framework)
    tanh, _, make = _native(framework)
    report = gb.check(lambda x: tanh(x) * x, make(OPS[0].inputs[0], "float32"), promote=False, order=2,
                      **_native_options(framework))
    assert report.passed, str(report)
    assert report.backend == framework, str(report)


def test_float64_leaves_stay_float64_next_to_float32_ones():
    """With promote=False a float64 leaf is untouched: fn sees it in float64, the float32 one in float32."""
    torch = pytest.importorskip("torch")
    seen = []

    def fn(x, w):
        seen.append((x.dtype, w.dtype))
        return torch.tanh(x) * w.double()

    x = torch.tensor(OPS[0].inputs[0], dtype=torch.float64)
    w = torch.tensor(OPS[1].inputs[0], dtype=torch.float32)
    report = gb.check(fn, x, w, promote=False)
    assert report.passed, str(report)
    assert set(seen) == {(torch.float64, torch.float32)}
    assert any("x: float64, w: float32" in n for n in report.notes), str(report)


# ------------------------------------------------------------------------------------------------------
# The user's objects are left as they were
# ------------------------------------------------------------------------------------------------------

def _rng_states():
    return random.getstate(), np.random.get_state()[1].copy()


def _same_rng(before, after) -> bool:
    return before[0] == after[0] and np.array_equal(before[1], after[1])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("outcome", ["pass", "fail"])
def test_arrays_keep_dtype_and_values(backend, dtype, outcome):
    _supports(backend, dtype)
    op = OPS[2]
    backward = op.backward if outcome == "pass" else scaled(-1.0, op.backward)
    fn, native, kit_options = make_kernel(backend, op.forward, backward, dtype)
    args = [native(a) for a in op.inputs]
    before = [np.asarray(_host(a), dtype=np.float64).copy() for a in args]
    rng = _rng_states()
    report = gb.check(fn, *args, backend=backend, promote=False, **kit_options)
    assert report.passed is (outcome == "pass"), str(report)
    for a, b in zip(args, before):
        assert _dtype_name(a) == dtype
        assert np.array_equal(np.asarray(_host(a), dtype=np.float64), b)
    assert _same_rng(rng, _rng_states())


def _dtype_name(a) -> str:
    return str(a.dtype).replace("torch.", "").replace("<dtype: '", "").replace("'>", "")


def _host(a):
    if hasattr(a, "detach"):
        import torch
        return a.detach().to(torch.float32).numpy()
    if hasattr(a, "numpy") and not isinstance(a, np.ndarray):
        return np.asarray(a.numpy()).astype(np.float32)
    return np.asarray(a).astype(np.float32)


# torch ----------------------------------------------------------------------------------------------

def _torch_module(dtype):
    torch = pytest.importorskip("torch")

    class Float32OnlyNet(torch.nn.Module):
        """A module whose forward refuses any parameter or input not in ``dtype``."""

        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 4)
            self.out = torch.nn.Linear(4, 2)
            self.register_buffer("scale", torch.full((2,), 0.5))
            self.dropout = torch.nn.Dropout(0.5)

        def forward(self, x):
            for name, t in [("x", x)] + list(self.named_parameters()) + list(self.named_buffers()):
                if t.dtype != dtype:
                    raise KernelDtypeError(f"net runs in {dtype} only; {name} is {t.dtype}")
            return self.out(self.dropout(torch.tanh(self.fc(x)))) * self.scale

    torch.manual_seed(0)
    return Float32OnlyNet().to(dtype)


def _module_state(model):
    import torch
    return ({k: (v.dtype, v.detach().clone(), v.requires_grad, None if v.grad is None else v.grad.clone())
             for k, v in model.named_parameters()},
            {k: v.clone() for k, v in model.named_buffers()},
            [m.training for m in model.modules()], torch.get_default_dtype(), torch.get_rng_state().clone())


def _assert_same_module_state(before, after):
    import torch
    params_b, buffers_b, modes_b, default_b, rng_b = before
    params_a, buffers_a, modes_a, default_a, rng_a = after
    assert params_b.keys() == params_a.keys()
    for k in params_b:
        dtype_b, value_b, req_b, grad_b = params_b[k]
        dtype_a, value_a, req_a, grad_a = params_a[k]
        assert dtype_a == dtype_b and req_a == req_b and torch.equal(value_a, value_b), k
        assert (grad_a is None) == (grad_b is None) and (grad_b is None or torch.equal(grad_a, grad_b)), k
    assert all(torch.equal(buffers_a[k], buffers_b[k]) and buffers_a[k].dtype == buffers_b[k].dtype
               for k in buffers_b)
    assert modes_a == modes_b and default_a == default_b and torch.equal(rng_a, rng_b)


@pytest.mark.torch
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_torch_module_is_checked_in_its_own_dtype_and_left_alone(dtype_name, train):
    torch = pytest.importorskip("torch")
    dtype = getattr(torch, dtype_name)
    model = _torch_module(dtype)
    model.train(train)
    model.fc.weight.grad = torch.ones_like(model.fc.weight)  # an existing .grad must survive
    x = torch.tensor(RNG.normal(size=(5, 3)), dtype=dtype)
    x_before = x.clone()
    before = _module_state(model)
    report = gb.check(lambda x: model(x), x, params=model, promote=False, train=train)
    assert report.passed, str(report)
    assert {"x", "fc.weight", "fc.bias", "out.weight", "out.bias"} <= set(leaf_names(report)), str(report)
    note = next(n for n in report.notes if n.startswith("promote=False"))
    assert f"fc.weight: {dtype_name}" in note, str(report)
    _assert_same_module_state(before, _module_state(model))
    assert x.dtype == dtype and torch.equal(x, x_before)
    with pytest.raises(gb.FunctionEvaluationError, match="promote=False"):
        gb.check(lambda x: model(x), x, params=model)  # float64 copies: the net refuses them
    _assert_same_module_state(before, _module_state(model))


@pytest.mark.torch
def test_torch_module_state_is_restored_when_fn_raises_mid_check():
    torch = pytest.importorskip("torch")
    model = _torch_module(torch.float32)
    model.train(True)
    x = torch.tensor(RNG.normal(size=(5, 3)), dtype=torch.float32)
    calls = []

    def fn(x):
        calls.append(1)
        if len(calls) > 4:
            raise RuntimeError("user code blew up")
        return model(x)

    before = _module_state(model)
    with pytest.raises(gb.FunctionEvaluationError, match="blew up"):
        gb.check(fn, x, params=model, promote=False)
    _assert_same_module_state(before, _module_state(model))


@pytest.mark.torch
def test_torch_plain_tensor_params_keep_their_dtype():
    torch = pytest.importorskip("torch")
    w = torch.tensor(RNG.normal(size=(3, 2)), dtype=torch.float32, requires_grad=True)
    b = torch.tensor(RNG.normal(size=2), dtype=torch.bfloat16)
    w_before, b_before = w.detach().clone(), b.clone()
    seen = []

    def fn(x):
        seen.append((w.dtype, b.dtype))
        return torch.tanh(x @ w) + b.float()

    x = torch.tensor(RNG.normal(size=(4, 3)), dtype=torch.float32)
    report = gb.check(fn, x, params=[w, b], promote=False)
    assert report.passed, str(report)
    assert set(seen) == {(torch.float32, torch.bfloat16)}
    assert w.dtype == torch.float32 and b.dtype == torch.bfloat16 and w.requires_grad and not b.requires_grad
    assert torch.equal(w.detach(), w_before) and torch.equal(b, b_before) and w.grad is None


@pytest.mark.torch
def test_torch_default_dtype_is_the_users_while_fn_runs():
    """promote=False runs fn as the user runs it: constants it creates follow the user's default dtype."""
    torch = pytest.importorskip("torch")
    seen = []

    def fn(x):
        c = torch.ones(x.shape)
        seen.append(c.dtype)
        return torch.tanh(x) * c

    report = gb.check(fn, torch.tensor(OPS[0].inputs[0], dtype=torch.float32), promote=False)
    assert report.passed, str(report)
    assert set(seen) == {torch.float32} and torch.get_default_dtype() == torch.float32


# JAX ------------------------------------------------------------------------------------------------

@pytest.mark.jax
@pytest.mark.parametrize("outcome", ["pass", "fail", "raise"])
def test_jax_runs_under_the_users_x64_setting_and_leaves_it(outcome):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    assert not jax.config.jax_enable_x64  # the project's tests run with JAX's default
    op = OPS[0]
    kernel, native, _ = make_kernel("jax", op.forward, op.backward if outcome == "pass" else scaled(-1.0, op.backward),
                                    "float32")
    seen = []

    def fn(x):
        seen.append(jnp.zeros(()).dtype)  # what a constant made inside fn gets: float32 unless x64 is on
        if outcome == "raise":
            raise ValueError("user code blew up")
        return kernel(x) * jnp.ones(x.shape)

    x = native(op.inputs[0])
    if outcome == "raise":
        with pytest.raises(gb.FunctionEvaluationError, match="blew up"):
            gb.check(fn, x, promote=False)
    else:
        report = gb.check(fn, x, promote=False)
        assert report.passed is (outcome == "pass"), str(report)
    assert not jax.config.jax_enable_x64
    assert set(seen) == {jnp.dtype("float32")}
    assert x.dtype == jnp.float32


@pytest.mark.jax
def test_jax_float64_leaf_next_to_float32_ones_is_checked_in_float64():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    seen = []

    def fn(x, w):
        seen.append((x.dtype, w.dtype))
        return jnp.tanh(x) * w

    x = jnp.asarray(OPS[0].inputs[0], dtype=jnp.float32)
    w = np.asarray(OPS[1].inputs[0], dtype=np.float64)  # a NumPy float64 leaf: JAX has no x64 arrays here
    report = gb.check(fn, x, w, promote=False)
    assert report.passed, str(report)
    assert set(seen) == {(jnp.dtype("float32"), jnp.dtype("float64"))}
    assert not jax.config.jax_enable_x64


# TensorFlow ----------------------------------------------------------------------------------------

@pytest.mark.tensorflow
@pytest.mark.parametrize("outcome", ["pass", "raise"])
def test_keras_model_runs_in_its_own_policy_and_is_left_alone(outcome):
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.BatchNormalization(), keras.layers.Dense(2)])
    x = tf.constant(RNG.normal(size=(5, 3)), dtype=tf.float32)
    model(x)
    before = [(v.path, v.dtype, np.array(v.numpy())) for v in model.variables]
    policies = [layer.dtype_policy.name for layer in model.layers]
    seen = []

    def fn(x):
        out = model(x)
        seen.append(out.dtype)
        if outcome == "raise":
            raise ValueError("user code blew up")
        return tf.reduce_sum(out ** 2, axis=1)

    if outcome == "raise":
        with pytest.raises(gb.FunctionEvaluationError, match="blew up"):
            gb.check(fn, x, params=model, promote=False)
    else:
        report = gb.check(fn, x, params=model, promote=False, train=True)
        assert report.passed, str(report)
        assert any(n.startswith("promote=False") and "follow float32" in n for n in report.notes), str(report)
        assert set(seen) == {tf.float32}
    after = [(v.path, v.dtype, np.array(v.numpy())) for v in model.variables]
    assert [(p, d) for p, d, _ in after] == [(p, d) for p, d, _ in before]
    assert all(np.array_equal(a, b) for (_, _, a), (_, _, b) in zip(after, before))
    assert [layer.dtype_policy.name for layer in model.layers] == policies


@pytest.mark.tensorflow
def test_tensorflow_variables_keep_dtype_and_value():
    tf = pytest.importorskip("tensorflow")
    w = tf.Variable(tf.cast(tf.constant(RNG.normal(size=(3, 2))), tf.bfloat16))
    value = w.numpy().copy()
    x = tf.constant(RNG.normal(size=(4, 3)), dtype=tf.float32)
    report = gb.check(lambda x: tf.tanh(x @ tf.cast(w, tf.float32)), x, params=[w], promote=False)
    assert report.passed, str(report)
    assert any("follow bfloat16" in n for n in report.notes), str(report)
    assert w.dtype == tf.bfloat16 and np.array_equal(w.numpy(), value)


# ------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------

def test_promote_must_be_a_bool():
    with pytest.raises(gb.InvalidArgumentError, match="promote"):
        gb.check(np.tanh, np.ones(3), grad=lambda g, x: (g,), promote="no")


def test_integer_arrays_have_nothing_to_check_in_their_own_dtype(backend):
    _, _, options = make_kernel(backend, np.tanh, _dtanh, "float32")
    if backend in ("numpy", "autograd"):  # autograd's arrays are NumPy's
        x = np.arange(3)
    elif backend == "torch":
        import torch
        x = torch.arange(3)
    elif backend == "jax":
        import jax.numpy as jnp
        x = jnp.arange(3)
    else:
        import tensorflow as tf
        x = tf.range(3)
    with pytest.raises(gb.InvalidArgumentError, match="no floating-point input"):
        gb.check(lambda x: x * 2, x, backend=backend, promote=False, **options)
