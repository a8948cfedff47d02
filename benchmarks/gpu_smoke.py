"""A check on CUDA tensors and a CUDA module: verdicts, and the CUDA RNG state left as it was.

Run on a machine with a GPU (``python benchmarks/gpu_smoke.py``); exits non-zero on any surprise.
Not part of the test suite: CI has no GPU.
"""

from __future__ import annotations

import sys

import torch

import gradbridge as gb


class Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, g.t() @ x


class LinearBuggy(Linear):
    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, g[:1].t() @ x[:1]


def main() -> int:
    assert torch.cuda.is_available(), "no GPU"
    device = torch.device("cuda")
    x = torch.randn(8, 5, device=device)
    w = torch.randn(3, 5, device=device)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                torch.nn.BatchNorm1d(7), torch.nn.Linear(7, 2)).to(device).train()
    torch.cuda.manual_seed_all(123)
    cuda_state = torch.cuda.get_rng_state_all()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    results = {
        "correct Function on CUDA passes": gb.check(Linear.apply, x, w).passed,
        "buggy Function on CUDA is caught": not gb.check(LinearBuggy.apply, x, w).passed,
        "CUDA model, eval mode, passes": gb.check(lambda x: model(x).square().sum(), x, params=model).passed,
        "CUDA model, train mode (dropout frozen), passes":
            gb.check(lambda x: model(x).square().sum(), x, params=model, train=True).passed,
        "fast mode on CUDA passes": gb.check(Linear.apply, x, w, mode="fast").passed,
        "order 2 on CUDA passes": gb.check(Linear.apply, x, w, order=2).passed,
    }
    results["CUDA RNG state restored"] = all(torch.equal(a, b) for a, b in
                                             zip(cuda_state, torch.cuda.get_rng_state_all()))
    results["model weights and dtypes unchanged"] = all(
        torch.equal(v, weights[k]) and v.dtype == weights[k].dtype for k, v in model.state_dict().items())
    results["model still in train mode"] = all(m.training for m in model.modules())
    for name, ok in results.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    print(torch.__version__, torch.cuda.get_device_name())
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
