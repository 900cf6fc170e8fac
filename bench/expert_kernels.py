"""The expert kernels as training launches them, NF4 and MXFP4, timed per call on the GPU (issue 17's A/B).

gpt-oss-20b's shapes (32 experts, gate_up 2880 -> 5760, down 2880 -> 2880), each row given an expert
uniformly at random (as top-4 routing of rows / 4 tokens is on average). Per base and projection: the
forward (gate_up with the SwiGLU epilogue keeping y, as in training; down with its bias) and the input
gradient, each in ms per call (mean of 20 after a warm-up) and TFLOP/s; then the expert MLP's backward
past down (nf4_gemm.mlp_backward, or in a tree without it the compiled chain it replaced) in ms and GB/s.
Where the tree has model/fast/dense_gemm.py, the dense path too ("nf4 dense": the layer dequantised
by one kernel, then torch._grouped_mm; its dequantisation alone on a line of its own, in GB/s).
--tree times another checkout's kernels with this script, so two trees are compared on one GPU in one call:

    python3 bench/expert_kernels.py --rows 8192,16384 --tree OLD_CHECKOUT    # then without --tree
"""
import argparse
import json
import os
import sys

import torch

p = argparse.ArgumentParser()
p.add_argument("--rows", default="8192,16384")
p.add_argument("--tree", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
               help="the checkout whose model/ is timed (default: this one)")
args = p.parse_args()
sys.path.insert(0, os.path.abspath(args.tree))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
from model.fast import mxfp4_gemm, nf4_gemm  # noqa: E402
from model.weights.mxfp4 import MXFP4Tensor  # noqa: E402
from model.weights.nf4 import NF4Tensor  # noqa: E402
from tune_nf4_gemm import timed  # noqa: E402  (beside this script)

EXPERTS, HIDDEN, INTER, ALPHA, LIMIT = 32, 2880, 2880, 1.702, 7.0


def weights(base, n_in, n_out, g):
    if base == "nf4":
        return NF4Tensor(torch.randn(EXPERTS, n_in, n_out, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02)
    blocks = torch.randint(0, 256, (EXPERTS, n_out, n_in // 32, 16), dtype=torch.uint8, device="cuda", generator=g)
    scales = torch.randint(119, 123, (EXPERTS, n_out, n_in // 32), dtype=torch.uint8, device="cuda", generator=g)
    return MXFP4Tensor(blocks, scales)


def main():
    g = torch.Generator("cuda").manual_seed(0)
    print(json.dumps({"tree": os.path.abspath(args.tree), "gpu": torch.cuda.get_device_name()}))
    for rows in [int(r) for r in args.rows.split(",")]:
        counts = torch.bincount(torch.randint(0, EXPERTS, (rows,), device="cuda", generator=g), minlength=EXPERTS)
        offsets = counts.cumsum(0).to(torch.int32)
        paths = [("nf4", "nf4", nf4_gemm, False), ("mxfp4", "mxfp4", mxfp4_gemm, False)]
        try:                                    # (a tree from before the dense path has none)
            from model.fast import dense_gemm
            paths += [("nf4 dense", "nf4", dense_gemm.NF4, True), ("mxfp4 dense", "mxfp4", dense_gemm.MXFP4, True)]
        except ImportError:
            pass
        for name, base, gemm, dense in paths:
            for proj, n_in, n_out in (("gate_up", HIDDEN, 2 * INTER), ("down", INTER, HIDDEN)):
                w = weights(base, n_in, n_out, g)
                if dense:
                    ms = timed(lambda: gemm.base.dequantize(w))
                    moved = w.nbytes() + EXPERTS * n_in * n_out * 2
                    print(json.dumps({"rows": rows, "base": name, "proj": proj, "part": "dequantize",
                                      "ms": round(ms, 4), "GBps": round(moved / ms / 1e6)}), flush=True)
                bias = torch.randn(EXPERTS, n_out, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
                x = torch.randn(rows, n_in, device="cuda", dtype=torch.bfloat16, generator=g)
                dy = torch.randn(rows, n_out, device="cuda", dtype=torch.bfloat16, generator=g)
                if proj == "gate_up":
                    forward = lambda: gemm.grouped_mm_swiglu(x, w, offsets, bias, ALPHA, LIMIT)  # noqa: E731
                else:
                    forward = lambda: gemm.grouped_mm(x, w, offsets, bias)  # noqa: E731
                flop = 2 * rows * n_in * n_out
                for direction, fn in (("y", forward), ("dx", lambda: gemm.grouped_mm_t(dy, w, offsets))):
                    ms = timed(fn)
                    print(json.dumps({"rows": rows, "base": name, "proj": proj, "direction": direction,
                                      "ms": round(ms, 4), "TFLOPs": round(flop / ms / 1e9, 1)}), flush=True)
                del w, x, dy
        # the expert MLP's backward past down: one kernel where the tree has it, else the compiled chain
        y = torch.randn(rows, 2 * INTER, device="cuda", dtype=torch.bfloat16, generator=g) * 4
        gr = torch.randn(rows, INTER, device="cuda", dtype=torch.bfloat16, generator=g)
        wr = torch.rand(rows, device="cuda", generator=g).to(torch.bfloat16)
        if hasattr(nf4_gemm, "mlp_backward"):
            name, fn = "mlp_backward kernel", lambda: nf4_gemm.mlp_backward(y, gr, wr, ALPHA, LIMIT)
        else:
            from model.moe import expert_mlp_backward
            name, fn = "expert_mlp_backward compiled", lambda: expert_mlp_backward(y, gr, wr, ALPHA, LIMIT, compiled=True)
        ms = timed(fn)
        moved = (y.numel() * 2 + gr.numel() + wr.numel()) * 2 + rows * 4     # bytes read and written, once each
        print(json.dumps({"rows": rows, "part": name, "ms": round(ms, 4), "GBps": round(moved / ms / 1e6)}), flush=True)


if __name__ == "__main__":
    main()
