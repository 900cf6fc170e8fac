"""A Triton grouped product over bf16 experts against torch._grouped_mm, at gpt-oss-20b's shapes (GPU).

The dense path (model/fast/dense_gemm.py) multiplies expert-sorted rows by a layer's dequantised
experts with torch._grouped_mm (CUTLASS), which at 8,192 rows (256 an expert) runs at ~465 TFLOP/s
where one dense torch.mm of the same FLOPs runs at ~730 (bench/grouped_layouts.py). This asks whether
a Triton kernel with the fused kernels' tile scheme (nf4_gemm._program_tile: each program finds its
expert's rows from the offsets) and smaller row tiles does better: y = x @ W[e] and dx = dy @ W[e]^T,
tiles swept, each checked against torch._grouped_mm.

    python3 bench/dense_grouped_triton.py --rows 8192,16384
"""
import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grouped_layouts import EXPERTS, HIDDEN, INTER, routed, timed  # noqa: E402  (beside this script)
from model.fast.nf4_gemm import _program_tile  # noqa: E402


@triton.jit
def _dense_grouped_kernel(x_ptr, w_ptr, offsets_ptr, y_ptr, num_experts, K: tl.constexpr, N: tl.constexpr,
                          TRANS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # y[rows of e] = x[rows of e] @ W[e], W (experts, K, N); TRANS: @ W[e]^T with W stored (experts, N, K)
    expert, first, end, tile_n = _program_tile(offsets_ptr, num_experts, N, BM, BN)
    if expert < 0:
        return
    rows = first + tl.arange(0, BM)
    row_ok = rows < end
    cols = tile_n * BN + tl.arange(0, BN)
    col_ok = cols < N
    acc = tl.full((BM, BN), 0.0, tl.float32)
    base = expert.to(tl.int64) * K * N
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        a = tl.load(x_ptr + rows.to(tl.int64)[:, None] * K + ks[None, :], mask=row_ok[:, None], other=0.0)
        if TRANS:
            b = tl.load(w_ptr + base + cols[None, :] * K + ks[:, None], mask=col_ok[None, :], other=0.0)
        else:
            b = tl.load(w_ptr + base + ks[:, None] * N + cols[None, :], mask=col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def grouped(x, w, offsets, trans, tiles):
    """x (rows, K) @ w[e] (w (E, K, N)), or with trans @ w[e]^T (w (E, N, K))."""
    e = w.shape[0]
    k = x.shape[1]
    n = w.shape[1] if trans else w.shape[2]
    y = torch.empty(x.shape[0], n, device=x.device, dtype=x.dtype)
    bm, bn = tiles["BM"], tiles["BN"]
    grid = ((triton.cdiv(x.shape[0], bm) + e) * triton.cdiv(n, bn),)
    _dense_grouped_kernel[grid](x, w, offsets, y, e, K=k, N=n, TRANS=trans, **tiles)
    return y


TILE_SWEEP = [dict(BM=bm, BN=bn, BK=bk, num_warps=w, num_stages=s)
              for bm, bn, bk, w, s in [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 4, 4),
                                       (128, 128, 64, 8, 4), (64, 256, 64, 4, 4), (64, 128, 64, 4, 4),
                                       (64, 256, 64, 8, 3), (256, 128, 64, 8, 3)]]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="8192,16384")
    args = p.parse_args()
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "triton": triton.__version__}), flush=True)
    torch.manual_seed(0)
    for rows in (int(r) for r in args.rows.split(",")):
        _, offsets = routed(rows)
        for name, k, n in (("gate_up", HIDDEN, 2 * INTER), ("down", INTER, HIDDEN)):
            w = torch.randn(EXPERTS, k, n, device="cuda", dtype=torch.bfloat16) * 0.02     # (experts, in, out)
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            dy = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
            flop = 2 * rows * k * n
            for direction, a, trans in (("fwd", x, False), ("dx", dy, True)):
                ref = torch._grouped_mm(a, w.transpose(1, 2) if trans else w, offs=offsets)
                ms = timed(lambda: torch._grouped_mm(a, w.transpose(1, 2) if trans else w, offs=offsets))
                r = {"rows": rows, "matrix": name, "direction": direction,
                     "_grouped_mm": {"ms": round(ms, 4), "tflops": round(flop / ms / 1e9, 1)}}
                # the transposed product reads W (experts, in, out) as stored, as its (E, N', K') = (E, K, N)
                for tiles in TILE_SWEEP:
                    label = "{BM}x{BN}x{BK} w{num_warps} s{num_stages}".format(**tiles)
                    try:
                        out = grouped(a, w, offsets, trans, tiles)
                        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                        ms = timed(lambda: grouped(a, w, offsets, trans, tiles))
                        r[label] = {"ms": round(ms, 4), "tflops": round(flop / ms / 1e9, 1), "rel_err": f"{err:.1e}"}
                    except Exception as e:   # out of shared memory and the like: say so, go on
                        r[label] = f"{type(e).__name__}: {e}"[:160]
                print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
