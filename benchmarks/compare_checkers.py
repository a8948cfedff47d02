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
                rows.append(["torch", name, str(n), "fast" if fast else "full",
                             f"gradcheck(fast_mode={fast})", f"{anchor:.4f}", f"{ours:.4f}", f"{anchor / ours:.2f}",
                             "pass" if verdict else "FAIL"])
    return rows


RUNNERS = {"torch": torch_rows}


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
