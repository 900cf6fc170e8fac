"""A/B on the GPU: the experts' token dispatch and combine as model/moe.py does it (x[token], then
index_add_, whose backward and forward use atomics) against gathers whose backward is a gather too and
a batched product for the weighted sum (no atomics), in one process on the same GPU, at one length,
CUDA graphs on. The gathers measured 0.8% slower (docs/BENCHMARKS.md), so model/moe.py keeps index_add_.
    python bench/ab_dispatch.py --checkpoint /tmp/ck --seq 2048
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import step_time, train_lora  # noqa: E402  (bench/bench.py, beside this script)
from model import load_model  # noqa: E402
from model import moe  # noqa: E402
from model.cuda_graph import GraphedStep  # noqa: E402


class _Dispatch(torch.autograd.Function):
    """src rows gathered by `index` (each row of src taken `k` times, as index // k); the backward
    gathers by `inverse` (index's inverse permutation) and sums each row's k copies: no atomics."""

    @staticmethod
    def forward(ctx, src, index, inverse, k: int):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return src.index_select(0, index // k if k > 1 else index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        g = grad.index_select(0, inverse)
        return g.view(-1, ctx.k, g.shape[-1]).sum(1) if ctx.k > 1 else g, None, None, None


def gathers_forward(self, x, weights, idx):
    """Experts.forward with the gathers and a batched weighted sum (the CUDA path: grouped kernels)."""
    n, k = idx.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))
    expert = flat[order]
    counts_t = torch.zeros(self.num_experts, dtype=torch.long, device=x.device).index_add_(0, flat, torch.ones_like(flat))
    offsets = counts_t.cumsum(0).to(torch.int32)
    rows = _Dispatch.apply(x, order, inverse, k)
    h = moe.swiglu(self.gate_up(rows, expert, None, offsets), self.alpha, self.limit)
    y = self.down(h, expert, None, offsets)
    y = _Dispatch.apply(y, inverse, order, 1).view(n, k, -1)
    return torch.bmm(weights.to(y.dtype).unsqueeze(1), y).squeeze(1).to(x.dtype)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    model = load_model(args.checkpoint, quantize="nf4", device="cuda", dtype=torch.bfloat16)
    params, opt = train_lora(model)
    index_add = moe.Experts.forward
    try:
        for name, forward in (("gathers + bmm", gathers_forward), ("index + index_add_", index_add),
                              ("gathers + bmm, again", gathers_forward)):
            moe.Experts.forward = forward           # the one thing that differs; a fresh graph for each
            dt, _ = step_time(model, opt, args.seq, args.steps, GraphedStep(model, params))
            print(json.dumps({"dispatch": name, "seq": args.seq, "step_s": round(dt, 4),
                              "tok_s": round(args.seq / dt, 1)}), flush=True)
            torch.cuda.empty_cache()
    finally:
        moe.Experts.forward = index_add


if __name__ == "__main__":
    main()
