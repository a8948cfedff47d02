"""The smallest gradient bug gradbridge catches at each precision, measured on every backend.

For each backend and precision (float64 with ``promote=True``; float32, float16 and bfloat16 with
``promote=False``, where the backend has the dtype) and a few smooth functions (elementwise ``tanh``,
``x*sin(x)``, ``exp`` on 8 elements, a 4x4 by 4x4 ``matmul``), a custom op is built in the framework's own
custom-gradient mechanism (a ``torch.autograd.Function``, a ``jax.custom_vjp``, a ``tf.custom_gradient``,
a NumPy ``grad=``). Its forward runs in the checked dtype; its backward computes in float32 (float64 for the
float64 rows), multiplies the first input's gradient by ``1 + r`` (all of it, or one element only) and
rounds to the dtype, as a low-precision kernel that accumulates in float32 would.

``r`` is scanned downwards over the grid 1, 3e-1, 1e-1, ..., 1e-9: the number printed is the smallest ``r``
such that the bug is caught at ``r`` and at every larger grid value (">1" when even ``r = 1`` passes).
Correct code (``r = 0``) is checked at 3 random points per function: "false alarms" counts the
correct checks that failed. Default check options (``mode="auto"``, which is full for these sizes).

    python benchmarks/precision_floor.py                      # every installed backend
    python benchmarks/precision_floor.py --backends torch jax
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

import gradbridge as gb

BACKENDS = ("numpy", "torch", "jax", "tensorflow")
PRECISIONS = ("float64", "float32", "float16", "bfloat16")
GRID = [1.0] + [float(f"{m}e-{k}") for k in range(1, 10) for m in (3, 1)]  # 1, 0.3, 0.1, 0.03, ..., 3e-9, 1e-9
CORRECT_POINTS = 3


# --- the functions, written once over a tiny namespace of array operations ---------------------------------

class Ops:
    """tanh, sin, cos, exp, matmul, transpose for one framework."""

    def __init__(self, tanh, sin, cos, exp, matmul, transpose) -> None:
        self.tanh, self.sin, self.cos, self.exp, self.matmul, self.T = tanh, sin, cos, exp, matmul, transpose


def functions(o: Ops) -> Dict[str, Tuple[Callable, Callable]]:
    """name -> (forward(*xs), backward(g, *xs) -> gradients), in the framework's ops."""
    return {
        "tanh": (lambda x: o.tanh(x), lambda g, x: [g * (1 - o.tanh(x) ** 2)]),
        "x*sin(x)": (lambda x: x * o.sin(x), lambda g, x: [g * (o.sin(x) + x * o.cos(x))]),
        "exp": (lambda x: o.exp(x), lambda g, x: [g * o.exp(x)]),
        "matmul 4x4": (lambda a, b: o.matmul(a, b), lambda g, a, b: [o.matmul(g, o.T(b)), o.matmul(o.T(a), g)]),
    }


FUNCTION_NAMES = ("tanh", "x*sin(x)", "exp", "matmul 4x4")


def inputs(name: str, seed: int) -> List[np.ndarray]:
    rng = np.random.default_rng(seed)
    if name == "matmul 4x4":
        return [rng.normal(size=(4, 4)), rng.normal(size=(4, 4))]
    if name == "x*sin(x)":
        return [rng.uniform(0.3, 2.5, size=8) * rng.choice([-1.0, 1.0], size=8)]
    return [rng.normal(size=8)]


def bug_mask(shape: Tuple[int, ...], r: float, one_element: bool) -> np.ndarray:
    """Multiplies the first input's gradient: ``1 + r`` everywhere, or at its element 1 only."""
    mask = np.ones(shape)
    if one_element:
        mask.reshape(-1)[1] = 1.0 + r
    else:
        mask[...] = 1.0 + r
    return mask


# --- one custom op per backend ----------------------------------------------------------------------

def numpy_op(name: str, dtype: str, mask: np.ndarray):
    """(fn, to_native, options): the NumPy forward rounded to ``dtype``, the buggy VJP as ``grad=``."""
    np_dtype = _numpy_dtype(dtype)
    wide = np.float64 if dtype == "float64" else np.float32
    forward, backward = functions(Ops(np.tanh, np.sin, np.cos, np.exp, np.matmul, np.transpose))[name]

    def fn(*xs):
        return np.asarray(forward(*[np.asarray(x).astype(wide) for x in xs]), dtype=wide).astype(np_dtype)

    def grad(g, *xs):
        grads = backward(np.asarray(g).astype(wide), *[np.asarray(x).astype(wide) for x in xs])
        grads[0] = grads[0] * mask.astype(wide)
        return tuple(np.asarray(gr, dtype=wide).astype(np_dtype) for gr in grads)

    return fn, (lambda a: np.asarray(a).astype(np_dtype)), {"grad": grad}


def torch_op(name: str, dtype: str, mask: np.ndarray):
    import torch

    forward, backward = functions(Ops(torch.tanh, torch.sin, torch.cos, torch.exp, torch.matmul, lambda t: t.T))[name]
    torch_dtype = getattr(torch, dtype)

    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *xs):
            ctx.save_for_backward(*xs)
            return forward(*xs)

        @staticmethod
        def backward(ctx, g):
            xs = ctx.saved_tensors
            wide = torch.float64 if g.dtype == torch.float64 else torch.float32
            grads = backward(g.to(wide), *[x.to(wide) for x in xs])
            grads[0] = grads[0] * torch.as_tensor(mask, dtype=wide)
            return tuple(gr.to(x.dtype) for gr, x in zip(grads, xs))

    return Op.apply, (lambda a: torch.tensor(a, dtype=torch_dtype)), {}


def jax_op(name: str, dtype: str, mask: np.ndarray):
    import jax
    import jax.numpy as jnp

    forward, backward = functions(Ops(jnp.tanh, jnp.sin, jnp.cos, jnp.exp, jnp.matmul, jnp.transpose))[name]
    jax_dtype = getattr(jnp, dtype)

    @jax.custom_vjp
    def op(*xs):
        return forward(*xs)

    def op_fwd(*xs):
        return forward(*xs), xs

    def op_bwd(xs, g):
        wide = jnp.float64 if g.dtype == jnp.float64 else jnp.float32
        grads = backward(g.astype(wide), *[x.astype(wide) for x in xs])
        grads[0] = grads[0] * jnp.asarray(mask, dtype=wide)
        return tuple(gr.astype(x.dtype) for gr, x in zip(grads, xs))

    op.defvjp(op_fwd, op_bwd)
    if dtype == "float64":  # a float64 JAX array needs x64; promote=True checks float64 copies anyway
        return op, (lambda a: np.asarray(a, dtype=np.float64)), {}
    return op, (lambda a: jnp.asarray(a, dtype=jax_dtype)), {}


def tensorflow_op(name: str, dtype: str, mask: np.ndarray):
    import tensorflow as tf

    forward, backward = functions(Ops(tf.tanh, tf.sin, tf.cos, tf.exp, tf.matmul, tf.transpose))[name]
    tf_dtype = tf.as_dtype(dtype)

    @tf.custom_gradient
    def op(*xs):
        def grad(g):
            wide = tf.float64 if g.dtype == tf.float64 else tf.float32
            grads = backward(tf.cast(g, wide), *[tf.cast(x, wide) for x in xs])
            grads[0] = grads[0] * tf.constant(mask, wide)
            return [tf.cast(gr, x.dtype) for gr, x in zip(grads, xs)]

        return forward(*xs), grad

    return op, (lambda a: tf.cast(tf.constant(a, dtype=tf.float64), tf_dtype)), {}


MAKERS = {"numpy": numpy_op, "torch": torch_op, "jax": jax_op, "tensorflow": tensorflow_op}


def _numpy_dtype(dtype: str) -> Any:
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def supported(backend: str, dtype: str) -> bool:
    if backend == "numpy" and dtype == "bfloat16":
        return importlib.util.find_spec("ml_dtypes") is not None
    return True


# --- measuring --------------------------------------------------------------------------------------

def caught(backend: str, dtype: str, name: str, r: float, one_element: bool, seed: int = 0) -> bool:
    xs = inputs(name, seed)
    fn, native, options = MAKERS[backend](name, dtype, bug_mask(xs[0].shape, r, one_element))
    report = gb.check(fn, *[native(a) for a in xs], backend=backend, promote=(dtype == "float64"), **options)
    return not report.passed


def floor(backend: str, dtype: str, name: str, one_element: bool) -> Optional[float]:
    """Smallest grid r caught together with every larger grid r; None when r = 1 is not caught."""
    smallest = None
    for r in GRID:
        if not caught(backend, dtype, name, r, one_element):
            break
        smallest = r
    return smallest


def false_alarms(backend: str, dtype: str) -> Tuple[int, int]:
    alarms = total = 0
    for name in FUNCTION_NAMES:
        for seed in range(CORRECT_POINTS):
            alarms += caught(backend, dtype, name, 0.0, False, seed=100 + seed)
            total += 1
    return alarms, total


def _format(r: Optional[float]) -> str:
    if r is None:
        return ">1"
    return "1" if r == 1.0 else f"{r:.0e}".replace("e-0", "e-")


def measure(backends: List[str], precisions: List[str]) -> List[List[str]]:
    rows = []
    for dtype in precisions:
        for backend in backends:
            if not supported(backend, dtype):
                rows.append([dtype, backend] + ["n/a"] * (len(FUNCTION_NAMES) + 1))
                continue
            cells = [f"{_format(floor(backend, dtype, name, False))} / {_format(floor(backend, dtype, name, True))}"
                     for name in FUNCTION_NAMES]
            alarms, total = false_alarms(backend, dtype)
            rows.append([dtype + (" (promote)" if dtype == "float64" else ""), backend] + cells + [f"{alarms}/{total}"])
    return rows


def markdown(rows: List[List[str]]) -> str:
    header = ["precision", "backend"] + list(FUNCTION_NAMES) + ["false alarms"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=None, choices=BACKENDS,
                        help="backends to measure (default: every installed one)")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    args = parser.parse_args(argv)
    backends = args.backends or [b for b in BACKENDS if importlib.util.find_spec(b) is not None]
    started = time.perf_counter()
    rows = measure(backends, args.precisions)
    print("Smallest relative bug r caught (backward x (1+r): whole gradient / one element), "
          f"grid 1e-9..1 in steps of 1, 3; gradbridge {gb.__version__}:\n")
    print(markdown(rows))
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
