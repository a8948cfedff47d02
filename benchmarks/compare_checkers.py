"""Time gradbridge against the frameworks' own gradient checkers on the same functions, in one run.

Workloads (float64, n inputs): ``sum(sin(x) * x**2)``, ``tanh(x)`` (vector output), a matmul custom
op (x of shape (n/16, 16) times a 16x16 weight), and an MLP loss. Each row prints the median time of
each checker and the ratio anchor/gradbridge. Both sides must agree on the verdict (all pass here).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List, Tuple

import gradbridge as gb


def median_time(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: first-call costs (imports, compilation, caches) are not what we compare
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def torch_workloads(n: int) -> Dict[str, Tuple[Callable, tuple]]:
    import torch

    class MatMul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return x @ w

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            return g @ w.t(), x.t() @ g

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dtype=torch.float64, generator=g, requires_grad=True)
    xm = torch.randn(max(1, n // 16), 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(16, 16, dtype=torch.float64, generator=g, requires_grad=True)
    hidden = max(1, n // 16)
    w1 = torch.randn(16, hidden, dtype=torch.float64, generator=g, requires_grad=True)
    inputs = torch.randn(8, 16, dtype=torch.float64, generator=g)
    mlp = lambda w1: torch.tanh(inputs @ w1).pow(2).sum()
    return {
        "sum(sin(x)*x^2)": (lambda x: (torch.sin(x) * x ** 2).sum(), (x,)),
        "tanh(x)": (torch.tanh, (x,)),
        "matmul Function": (MatMul.apply, (xm, w)),
        "MLP loss": (mlp, (w1,)),
    }


def torch_rows(sizes: List[int], repeats: int) -> List[List[str]]:
    import torch

    rows = []
    for n in sizes:
        for name, (fn, args) in torch_workloads(n).items():
            for fast in (False, True):
                anchor = median_time(lambda: torch.autograd.gradcheck(fn, args, fast_mode=fast), repeats)
                ours = median_time(lambda: gb.check(fn, *args, mode="fast" if fast else "full"), repeats)
                verdict = gb.check(fn, *args, mode="fast" if fast else "full").passed
                rows.append(_row("torch", name, n, "fast" if fast else "full", f"gradcheck(fast_mode={fast})",
                                 anchor, ours, verdict))
    return rows


def _row(framework, name, n, mode, anchor_name, anchor, ours, verdict) -> List[str]:
    return [framework, name, str(n), mode, anchor_name, f"{anchor:.4f}", f"{ours:.4f}", f"{anchor / ours:.2f}",
            "pass" if verdict else "FAIL"]


def jax_rows(sizes: List[int], repeats: int) -> List[List[str]]:
    """``jax.test_util.check_grads`` (projection only, order 1, rev mode) against gradbridge full and fast."""
    import jax
    import jax.numpy as jnp
    from jax.test_util import check_grads

    rows = []
    with jax.enable_x64(True):
        for n in sizes:
            key = jax.random.key(0)
            x = jax.random.normal(key, (n,), dtype=jnp.float64)
            xm = jax.random.normal(key, (max(1, n // 16), 16), dtype=jnp.float64)
            w = jax.random.normal(jax.random.key(1), (16, 16), dtype=jnp.float64)
            w1 = jax.random.normal(key, (16, max(1, n // 16)), dtype=jnp.float64)
            inputs = jax.random.normal(jax.random.key(2), (8, 16), dtype=jnp.float64)
            workloads = {
                "sum(sin(x)*x^2)": (lambda x: jnp.sum(jnp.sin(x) * x ** 2), (x,)),
                "tanh(x)": (jnp.tanh, (x,)),
                "matmul": (jnp.matmul, (xm, w)),
                "MLP loss": (lambda w1: jnp.sum(jnp.tanh(inputs @ w1) ** 2), (w1,)),
            }
            for name, (fn, args) in workloads.items():
                anchor = median_time(lambda: check_grads(fn, args, order=1, modes=["rev"]), repeats)
                for mode in ("full", "fast"):
                    ours = median_time(lambda: gb.check(fn, *args, mode=mode), repeats)
                    rows.append(_row("jax", name, n, mode, "check_grads(order=1, rev)", anchor, ours,
                                     gb.check(fn, *args, mode=mode).passed))
    return rows


def tensorflow_rows(sizes: List[int], repeats: int) -> List[List[str]]:
    """``tf.test.compute_gradient`` (full Jacobians, comparison left to the caller) against gradbridge full."""
    import tensorflow as tf

    rows = []
    for n in sizes:
        g = tf.random.Generator.from_seed(0)
        x = g.normal((n,), dtype=tf.float64)
        xm = g.normal((max(1, n // 16), 16), dtype=tf.float64)
        w = g.normal((16, 16), dtype=tf.float64)
        w1 = g.normal((16, max(1, n // 16)), dtype=tf.float64)
        inputs = g.normal((8, 16), dtype=tf.float64)
        workloads = {
            "sum(sin(x)*x^2)": (lambda x: tf.reduce_sum(tf.sin(x) * x ** 2), (x,)),
            "tanh(x)": (tf.tanh, (x,)),
            "matmul": (tf.matmul, (xm, w)),
            "MLP loss": (lambda w1: tf.reduce_sum(tf.tanh(inputs @ w1) ** 2), (w1,)),
        }
        for name, (fn, args) in workloads.items():
            anchor = median_time(lambda: tf.test.compute_gradient(fn, list(args)), repeats)
            ours = median_time(lambda: gb.check(fn, *args), repeats)
            rows.append(_row("tensorflow", name, n, "full", "tf.test.compute_gradient", anchor, ours,
                             gb.check(fn, *args).passed))
    return rows


RUNNERS = {"torch": torch_rows, "jax": jax_rows, "tensorflow": tensorflow_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 256, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frameworks", nargs="+", default=list(RUNNERS))
    args = parser.parse_args()
    header = ["framework", "workload", "n", "mode", "anchor", "anchor s", "gradbridge s", "ratio", "gb verdict"]
    rows = []
    for framework in args.frameworks:
        rows.extend(RUNNERS[framework](args.sizes, args.repeats))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


if __name__ == "__main__":
    main()
