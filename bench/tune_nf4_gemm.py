"""The NF4 grouped-product kernels at gpt-oss-20b's shapes on the GPU: correctness, speed, tile sizes.

For each expert projection (gate_up: 2880 -> 5760, down: 2880 -> 2880; 32 experts, top-4 routing
of 2048 tokens = 8192 rows) and each direction (y = x W, dx = dy W^T), compares the kernel with
bitsandbytes' dequantisation followed by torch._grouped_mm (the path it replaces): relative error,
and time per call for each tile configuration. Then gate_up with the SwiGLU in its epilogue
(`grouped_mm_swiglu`) against the product followed by model/moe.py's compiled SwiGLU. Prints one
JSON line per measurement.
    python bench/tune_nf4_gemm.py [--rows 8192] [--out tune.json]
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model.fast import nf4_gemm  # noqa: E402
from model.moe import swiglu  # noqa: E402
from model.weights.nf4 import NF4Tensor  # noqa: E402

CONFIGS = [  # BM, BN, BK, warps, stages
    (128, 128, 64, 4, 3), (256, 64, 64, 4, 3), (256, 64, 64, 8, 3), (128, 128, 64, 4, 4), (256, 128, 64, 8, 3),
    (128, 64, 64, 4, 3), (128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4),
]


def timed(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps  # ms


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def epilogues(rows, offsets, alpha=1.702, limit=7.0):
    """gate_up's SwiGLU inside the kernel against the separate compiled SwiGLU, gpt-oss-20b's shapes."""
    experts, hidden, inter = offsets.numel(), 2880, 2880
    w_gu = NF4Tensor(torch.randn(experts, hidden, 2 * inter, device="cuda", dtype=torch.bfloat16) * 0.02)
    bias = torch.randn(experts, 2 * inter, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16) * 4     # some of y past the clamps
    y = nf4_gemm.grouped_mm(x, w_gu, offsets, bias)
    y2, h = nf4_gemm.grouped_mm_swiglu(x, w_gu, offsets, bias, alpha, limit)
    h_ref = swiglu(y, alpha, limit)
    r = {"epilogue": "swiglu", "rows": rows, "y_differ": int((y2 != y).sum()), "clamped": int((y.abs() > limit).sum()),
         "h_rel_err": rel(h, h_ref), "h_differ": int((h != h_ref).sum()), "of": h.numel(),
         "separate_ms": timed(lambda: swiglu(nf4_gemm.grouped_mm(x, w_gu, offsets, bias), alpha, limit)),
         "fused_ms": timed(lambda: nf4_gemm.grouped_mm_swiglu(x, w_gu, offsets, bias, alpha, limit)),
         "fused_h_only_ms": timed(lambda: nf4_gemm.grouped_mm_swiglu(x, w_gu, offsets, bias, alpha, limit,
                                                                      keep_y=False))}
    print(json.dumps(r), flush=True)
    return [r]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--out", default="tune.json")
    args = p.parse_args()
    torch.manual_seed(0)
    experts, hidden, inter = 32, 2880, 2880
    counts = torch.bincount(torch.multinomial(torch.ones(experts), args.rows, replacement=True), minlength=experts)
    offsets = counts.cumsum(0).to(torch.int32).cuda()
    results = []
    # the weights themselves: identity rows give y = W[e]; against bitsandbytes' dequantisation
    w = NF4Tensor(torch.randn(2, 128, 384, device="cuda", dtype=torch.bfloat16))
    eye = torch.eye(128, device="cuda", dtype=torch.bfloat16).repeat(2, 1)
    got = nf4_gemm.grouped_mm(eye, w, torch.tensor([128, 256], dtype=torch.int32, device="cuda")).view(2, 128, 384)
    r = {"weights": "identity rows vs bitsandbytes' dequantisation", "differ": int((got != w.dequantize()).sum()),
         "of": got.numel()}
    print(json.dumps(r), flush=True)
    results.append(r)
    for name, n_in, n_out in (("gate_up", hidden, 2 * inter), ("down", inter, hidden)):
        w = NF4Tensor(torch.randn(experts, n_in, n_out, device="cuda", dtype=torch.bfloat16) * 0.02)
        bias = torch.randn(experts, n_out, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(args.rows, n_in, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(args.rows, n_out, device="cuda", dtype=torch.bfloat16)
        expert = torch.repeat_interleave(torch.arange(experts, device="cuda"), counts.cuda())
        flops = 2 * args.rows * n_in * n_out

        def plain():
            return torch._grouped_mm(x, w.dequantize(), offs=offsets) + bias[expert]

        def plain_t():
            return torch._grouped_mm(dy, w.dequantize().transpose(1, 2), offs=offsets)

        ref, ref_t = plain(), plain_t()
        base = {"proj": name, "rows": args.rows, "plain_fwd_ms": timed(plain), "plain_bwd_ms": timed(plain_t),
                "dequant_ms": timed(w.dequantize)}
        print(json.dumps(base), flush=True)
        results.append(base)
        for bm, bn, bk, warps, stages in CONFIGS:
            tiles = {"BM": bm, "BN": bn, "BK": bk, "num_warps": warps, "num_stages": stages}
            r = {"proj": name, "tiles": tiles}
            try:
                r["fwd_rel_err"] = rel(nf4_gemm.grouped_mm(x, w, offsets, bias, tiles), ref)
                r["fwd_ms"] = timed(lambda: nf4_gemm.grouped_mm(x, w, offsets, bias, tiles))
                r["fwd_TFLOPs"] = round(flops / r["fwd_ms"] / 1e9, 1)
                r["bwd_rel_err"] = rel(nf4_gemm.grouped_mm_t(dy, w, offsets, tiles), ref_t)
                r["bwd_ms"] = timed(lambda: nf4_gemm.grouped_mm_t(dy, w, offsets, tiles))
                r["bwd_TFLOPs"] = round(flops / r["bwd_ms"] / 1e9, 1)
            except Exception as e:  # a tile that does not fit the GPU's shared memory, say
                r["error"] = repr(e)[:200]
            print(json.dumps(r), flush=True)
            results.append(r)
    results += epilogues(args.rows, offsets)
    with open(args.out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
