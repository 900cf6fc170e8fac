"""Session 17: nf4_gemm.mlp_backward's tiles at 8,192 and 16,384 rows (one-off sweep, kept in docs/bench)."""
import json, sys, os
import torch, triton
sys.path.insert(0, os.getcwd())
from model.fast import nf4_gemm
from model.moe import CLAMP_PASSES_AT_BOUND

def timed(fn, reps=50):
    fn(); torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / reps

inter = 2880
for rows in (8192, 16384):
    g = torch.Generator("cuda").manual_seed(0)
    y = torch.randn(rows, 2 * inter, device="cuda", generator=g).mul(4).bfloat16()
    gr = torch.randn(rows, inter, device="cuda", generator=g).bfloat16()
    w = torch.rand(rows, device="cuda", generator=g).bfloat16()
    ref_dy, ref_gh = nf4_gemm.mlp_backward(y, gr, w, 1.702, 7.0)
    for br in (8, 16, 32, 64):
        for bi in (32, 64, 128):
            for warps in (2, 4, 8):
                for stages in (1, 3):
                    t = {"BR": br, "BI": bi, "num_warps": warps, "num_stages": stages}
                    dy, gh = torch.empty_like(y), torch.empty(rows, device="cuda")
                    run = lambda: nf4_gemm._mlp_backward_kernel[(triton.cdiv(rows, br),)](
                        y, gr, w, dy, gh, rows, inter, 1.702, 7.0, AT_BOUND_PASSES=CLAMP_PASSES_AT_BOUND, **t)
                    try:
                        ms = timed(run)
                    except Exception as ex:
                        print(json.dumps({"rows": rows, **t, "error": str(ex)[:100]}), flush=True)
                        continue
                    print(json.dumps({"rows": rows, **t, "ms": round(ms, 4), "GBps": round((y.numel() * 4 + gr.numel() * 2) / ms / 1e6),
                                      "dy_equal": bool(torch.equal(dy, ref_dy)),
                                      "gh_rel": ((gh - ref_gh).norm() / ref_gh.norm()).item(),
                                      "current": t == {**nf4_gemm.MLP_BACKWARD_TILES}}), flush=True)
