"""Time gradbridge against the frameworks' own gradient checkers on the same functions, in one run.

Workloads (float64, n inputs): ``sum(sin(x) * x**2)``, ``tanh(x)`` (vector output), a matmul custom
op (x of shape (n/16, 16) times a 16x16 weight), and an MLP loss. Each row prints the median time of
each checker, the ratio anchor/gradbridge, gradbridge's evaluations of fn and analytic (VJP/JVP) calls,
and the floor: the time of that many plain calls of fn, the cost of the evaluations themselves. Both
sides must agree on the verdict (all pass here). An anchor whose previous size took long enough that
this size would pass ``--anchor-limit`` seconds (scaled by its evaluation count) is skipped, and so
is a full check whose dense Jacobian gradbridge refuses to build.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import gradbridge as gb


#: Seconds an anchor may be predicted to take before it is skipped (set by --anchor-limit).
ANCHOR_LIMIT = 60.0
_last_anchor: Dict[Tuple[str, str], Tuple[int, float]] = {}


def anchor_time(key: Tuple[str, str], n: int, run: Callable[[], object], repeats: int) -> Optional[float]:
    """Median time of the anchor, or None when the last size predicts more than ANCHOR_LIMIT seconds
    (a full Jacobian's cost grows like n^2 for vector outputs: predicted from that, conservatively)."""
    if key in _last_anchor:
        previous_n, previous_s = _last_anchor[key]
        if previous_s * (n / previous_n) ** 2 > ANCHOR_LIMIT:
            return None
    seconds = median_time(run, repeats)
    _last_anchor[key] = (n, seconds)
    return seconds


def floor_time(fn: Callable, args: tuple, calls: int) -> float:
    """Seconds for ``calls`` plain calls of fn at the checked point (the evaluations themselves)."""
    calls = max(1, calls)
    start = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    return time.perf_counter() - start


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


def torch_rows(sizes: List[int], repeats: int, emit: Callable[[List[str]], None] = lambda row: None) -> List[List[str]]:
    import torch

    rows: List[List[str]] = _Emitting(emit)
    for n in sizes:
        for name, (fn, args) in torch_workloads(n).items():
            for fast in (False, True):
                anchor = anchor_time(("torch", f"{name}{fast}"), n,
                                     lambda: torch.autograd.gradcheck(fn, args, fast_mode=fast), repeats)
                rows.append(_row("torch", name, n, "fast" if fast else "full", f"gradcheck(fast_mode={fast})",
                                 anchor, fn, args, "fast" if fast else "full", repeats))
    return rows


class _Emitting(list):
    """A list of rows that also hands each appended row to ``emit`` (printing as the run goes)."""

    def __init__(self, emit: Callable[[List[str]], None]) -> None:
        super().__init__()
        self.emit = emit

    def append(self, row: List[str]) -> None:
        super().append(row)
        self.emit(row)


def _row(framework, name, n, mode, anchor_name, anchor, fn, args, gb_mode, repeats) -> List[str]:
    """One table row: gradbridge timed here, next to the anchor's time (None: skipped)."""
    try:
        report = gb.check(fn, *args, mode=gb_mode)
    except gb.InvalidArgumentError as exc:  # a full Jacobian too large to build
        return [framework, name, str(n), mode, anchor_name, _seconds(anchor), "refused", "-", "-", "-",
                str(exc).split(";")[0][:40]]
    ours = median_time(lambda: gb.check(fn, *args, mode=gb_mode), repeats)
    floor = floor_time(fn, args, report.evaluations)
    ratio = "-" if anchor is None else f"{anchor / ours:.2f}"
    return [framework, name, str(n), mode, anchor_name, _seconds(anchor), f"{ours:.4f}", ratio,
            f"{report.evaluations}+{report.vjps + report.jvps}", f"{floor:.4f}", "pass" if report.passed else "FAIL"]


def _seconds(value: Optional[float]) -> str:
    return f"> {ANCHOR_LIMIT:.0f} (skipped)" if value is None else f"{value:.4f}"


def jax_rows(sizes: List[int], repeats: int, emit: Callable[[List[str]], None] = lambda row: None) -> List[List[str]]:
    """``jax.test_util.check_grads`` (projection only, order 1, rev mode) against gradbridge full and fast."""
    import jax
    import jax.numpy as jnp
    from jax.test_util import check_grads

    rows: List[List[str]] = _Emitting(emit)
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
                anchor = anchor_time(("jax", name), n, lambda: check_grads(fn, args, order=1, modes=["rev"]),
                                     repeats)
                for mode in ("full", "fast"):
                    rows.append(_row("jax", name, n, mode, "check_grads(order=1, rev)", anchor, fn, args, mode,
                                     repeats))
    return rows


def tensorflow_rows(sizes: List[int], repeats: int, emit: Callable[[List[str]], None] = lambda row: None) -> List[List[str]]:
    """``tf.test.compute_gradient`` (full Jacobians, comparison left to the caller) against gradbridge full."""
    import tensorflow as tf

    rows: List[List[str]] = _Emitting(emit)
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
            anchor = anchor_time(("tensorflow", name), n, lambda: tf.test.compute_gradient(fn, list(args)), repeats)
            rows.append(_row("tensorflow", name, n, "full", "tf.test.compute_gradient", anchor, fn, args, "full",
                             repeats))
    return rows


RUNNERS = {"torch": torch_rows, "jax": jax_rows, "tensorflow": tensorflow_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 256, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frameworks", nargs="+", default=list(RUNNERS))
    parser.add_argument("--anchor-limit", type=float, default=ANCHOR_LIMIT,
                        help="skip an anchor predicted to take longer than this many seconds")
    args = parser.parse_args()
    globals()["ANCHOR_LIMIT"] = args.anchor_limit
    header = ["framework", "workload", "n", "mode", "anchor", "anchor s", "gradbridge s", "ratio",
              "gb evals+AD", "floor s", "gb verdict"]
    widths = [10, 15, 5, 4, 26, 8, 12, 6, 11, 8, 10]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    print(line(header), flush=True)
    for framework in args.frameworks:  # rows print as they finish: a long run shows its progress
        for row in RUNNERS[framework](args.sizes, args.repeats, lambda row: print(line(row), flush=True)):
            pass


if __name__ == "__main__":
    main()
