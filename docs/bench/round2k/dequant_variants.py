"""Session 22, issue 17: NF4's one-kernel dequantisation (nf4_gemm.dequantize, 3.5-3.6 TB/s on gate_up)
against variants: the 16 levels read from global memory (L1) instead of tl.gather; each (even, odd)
pair stored as one 32-bit word instead of joined and reshaped. Every output checked equal to the kernel's."""
import json, os, sys
import torch, triton, triton.language as tl
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
from model.fast import nf4_gemm
from model.weights.nf4 import NF4Tensor
from tune_nf4_gemm import timed

@triton.jit
def _variant(packed_ptr, qabsmax_ptr, absmax2_ptr, code2_ptr, absmax_offset_ptr, code_ptr, out_ptr, n_blocks,
             BLOCK2: tl.constexpr, BB: tl.constexpr, GLOBAL_CODE: tl.constexpr, PAIRS: tl.constexpr):
    b = tl.program_id(0) * BB + tl.arange(0, BB)
    ok = b < n_blocks
    byte = tl.load(packed_ptr + b.to(tl.int64)[:, None] * 32 + tl.arange(0, 32)[None, :], mask=ok[:, None],
                   other=0).to(tl.int32)
    q = tl.load(qabsmax_ptr + b, mask=ok, other=0).to(tl.int32)
    scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + b // BLOCK2, mask=ok, other=0.0)
    scale = (scale + tl.load(absmax_offset_ptr))[:, None]
    if GLOBAL_CODE:
        hi = tl.load(code_ptr + (byte >> 4)) * scale
        lo = tl.load(code_ptr + (byte & 15)) * scale
    else:
        code = tl.load(code_ptr + tl.arange(0, 16))
        hi = tl.reshape(tl.gather(code, tl.reshape(byte >> 4, (BB * 32,)), 0), (BB, 32)) * scale
        lo = tl.reshape(tl.gather(code, tl.reshape(byte & 15, (BB * 32,)), 0), (BB, 32)) * scale
    if PAIRS:   # out_ptr: the bf16 output viewed as int32, one word an (even, odd) pair, little-endian
        h = hi.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        l = lo.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32)
        tl.store(out_ptr + b.to(tl.int64)[:, None] * 32 + tl.arange(0, 32)[None, :], h | (l << 16), mask=ok[:, None])
    else:
        w = tl.reshape(tl.join(hi, lo), (BB, 64)).to(tl.bfloat16)
        tl.store(out_ptr + b.to(tl.int64)[:, None] * 64 + tl.arange(0, 64)[None, :], w, mask=ok[:, None])

def variant(w, bb, warps, global_code, pairs):
    s = w.state
    out = torch.empty(w.shape, device=w.packed.device, dtype=torch.bfloat16)
    n_blocks = out.numel() // 64
    _variant[(triton.cdiv(n_blocks, bb),)](
        w.packed, s.absmax, s.state2.absmax, s.state2.code, s.offset.float().reshape(1),
        s.code.to(device=w.packed.device, dtype=torch.float32), out.view(torch.int32) if pairs else out, n_blocks,
        BLOCK2=s.state2.blocksize, BB=bb, GLOBAL_CODE=global_code, PAIRS=pairs, num_warps=warps, enable_fp_fusion=False)
    return out

g = torch.Generator("cuda").manual_seed(0)
for shape in ((32, 2880, 5760), (32, 2880, 2880)):
    w = NF4Tensor(torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02)
    ref = nf4_gemm.dequantize(w)
    moved = w.nbytes() + ref.numel() * 2
    ms = timed(lambda: nf4_gemm.dequantize(w), reps=40)
    print(json.dumps({"shape": shape, "kernel": "nf4_gemm.dequantize", "ms": round(ms, 4), "GBps": round(moved / ms / 1e6)}), flush=True)
    for gc in (False, True):
        for pairs in (False, True):
            for bb in (32, 64, 128, 256):
                for warps in (4, 8):
                    try:
                        same = torch.equal(variant(w, bb, warps, gc, pairs), ref)
                        ms = timed(lambda: variant(w, bb, warps, gc, pairs), reps=40)
                        r = {"ms": round(ms, 4), "GBps": round(moved / ms / 1e6), "equal": same}
                    except Exception as e:
                        r = {"error": str(e)[:200]}
                    print(json.dumps({"shape": shape, "global_code": gc, "pairs": pairs, "BB": bb, "warps": warps, **r}), flush=True)
    del w, ref
