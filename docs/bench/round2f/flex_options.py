"""Session 17: flex attention forward + backward at gpt-oss-20b's shapes (64 query heads, 8 kv heads, head
dim 64), causal and 128-token window, under kernel_options (one-off timing, kept in docs/bench)."""
import json, os, sys
import torch
sys.path.insert(0, os.getcwd())
from torch.nn.attention.flex_attention import flex_attention
from model.fast.flex import _block_mask

torch._dynamo.config.recompile_limit = 256
OPTIONS = [None,
           {"BLOCK_M1": 64, "BLOCK_N1": 128, "BLOCK_M2": 128, "BLOCK_N2": 64, "num_warps": 8, "num_stages": 3},
           {"BLOCK_M1": 32, "BLOCK_N1": 128, "BLOCK_M2": 128, "BLOCK_N2": 32, "num_warps": 4, "num_stages": 3},
           {"BLOCK_M1": 64, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 64, "num_warps": 4, "num_stages": 3},
           {"BLOCK_M1": 64, "BLOCK_N1": 128, "BLOCK_M2": 128, "BLOCK_N2": 64, "num_warps": 4, "num_stages": 2},
           {"BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32, "num_warps": 4, "num_stages": 4},
           {"BLOCK_M1": 64, "BLOCK_N1": 128, "BLOCK_M2": 128, "BLOCK_N2": 64, "num_warps": 8, "num_stages": 2}]

def timed(fn, reps=20):
    fn(); torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / reps

for t in (2048, 4096):
    for window in (None, 128):
        g = torch.Generator("cuda").manual_seed(0)
        q = torch.randn(1, 64, t, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        k = torch.randn(1, 8, t, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        v = torch.randn(1, 8, t, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        mask = _block_mask(t, window, "cuda")
        do = torch.randn(1, 64, t, 64, device="cuda", dtype=torch.bfloat16, generator=g)
        ref = None
        for opts in OPTIONS:
            f = torch.compile(flex_attention)
            kw = {"kernel_options": opts} if opts else {}
            def fwd():
                return f(q, k, v, block_mask=mask, enable_gqa=True, return_lse=True, **kw)
            def both():
                out, lse = fwd()
                torch.autograd.grad(out, (q, k, v), do)
            try:
                out, _ = fwd()
                grads = torch.autograd.grad(out, (q, k, v), do)
                if ref is None:
                    ref = grads
                diff = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(grads, ref))
                r = {"t": t, "window": window, "options": opts, "fwd_ms": round(timed(fwd), 4),
                     "fwd_bwd_ms": round(timed(both), 4), "grad_rel_vs_default": diff}
            except Exception as ex:
                r = {"t": t, "window": window, "options": opts, "error": str(ex)[:160]}
            print(json.dumps(r), flush=True)
