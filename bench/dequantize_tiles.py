"""The dense path's dequantisation kernels (nf4_gemm.dequantize, mxfp4_gemm.dequantize) timed per tile
choice on gpt-oss-20b's gate_up (32 x 2880 x 5760), in GB/s of bytes read and written; each result is
checked equal to the default tiles' (GPU).

    python3 bench/dequantize_tiles.py
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
from model.fast import mxfp4_gemm, nf4_gemm  # noqa: E402
from model.weights.mxfp4 import MXFP4Tensor  # noqa: E402
from model.weights.nf4 import NF4Tensor  # noqa: E402
from tune_nf4_gemm import timed  # noqa: E402

g = torch.Generator("cuda").manual_seed(0)
nf4 = NF4Tensor(torch.randn(32, 2880, 5760, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02)
mx = MXFP4Tensor(torch.randint(0, 256, (32, 5760, 90, 16), dtype=torch.uint8, device="cuda", generator=g),
                 torch.randint(119, 123, (32, 5760, 90), dtype=torch.uint8, device="cuda", generator=g))
for name, module, w in (("nf4", nf4_gemm, nf4), ("mxfp4", mxfp4_gemm, mx)):
    ref = module.dequantize(w)
    moved = w.nbytes() + ref.numel() * 2
    for bb in (32, 64, 128, 256, 512):
        for warps in (2, 4, 8):
            tiles = {**module.DEQUANTIZE_TILES, "BB": bb, "num_warps": warps}   # (NF4's: fused multiply-adds off)
            same = torch.equal(module.dequantize(w, tiles), ref)
            ms = timed(lambda: module.dequantize(w, tiles))
            print(json.dumps({"base": name, **tiles, "ms": round(ms, 4), "GBps": round(moved / ms / 1e6),
                              "equal": same, "default": tiles == module.DEQUANTIZE_TILES}), flush=True)
