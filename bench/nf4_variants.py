"""Variants of the NF4 grouped-product kernels (model/fast/nf4_gemm.py) to time on an H100/H200 (issue 17).

docs/kernel_sass_report.md reads the sm_90 SASS of the
training kernels: the forward waits for each wgmma before dequantising the next tile, runs two
m64n64 SS wgmma groups per step (x read from shared memory twice), and the transposed kernel's
wgmmas are all serialised by ptxas (C7515) although Triton asked for one in flight. Each variant
below changes one of those and nothing in the arithmetic of the weights: every weight is still
bf16(code[i] * absmax) with the product in fp32, bitsandbytes' own dequantisation.

    fwd_joined    y = x W as ONE dot over the dequantised tile with gate and up interleaved (hi, lo,
                  hi, lo... as W's columns): m64n128 wgmmas instead of two m64n64 groups, x read once
                  from shared memory per step; the epilogue splits gate and up from the accumulator.
    fwd_pair      fwd_joined whose code-book lookup takes a 256-entry table of byte -> (code[hi], code[lo])
                  pairs (the same kernel, PAIRS): a lookup at 2b and 2b + 1, no nibble arithmetic.
                  Interpreter only: Triton 3.8 does not compile it for sm_90 (INTERPRETER_ONLY below).
    fwd_t_constexpr  y^T = W^T x^T with K (the loop's bound) a constexpr: the dequantised weights as
                  wgmma's register operand, pipelined, as mxfp4_gemm's forward.
(The transposed kernel's variant, N a constexpr, won its A/B and is nf4_gemm's kernel now.)

    python3 bench/nf4_variants.py --interpret     # CPU: Triton's interpreter, tiny shapes, exactness
    python3 bench/nf4_variants.py [--rows 8192,16384] [--out variants.json]   # GPU: times, JSON lines

The static SASS counts of each variant come from bench/nf4_sass.py (which imports static_targets()).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if "--interpret" in sys.argv:          # read by triton.jit when the kernels below are defined
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model.fast import nf4_gemm  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

_program_tile, _dequant_tile, _swiglu = nf4_gemm._program_tile, nf4_gemm._dequant_tile, nf4_gemm._swiglu


@triton.jit
def _epilogue(acc, rows, row_ok, expert, tile_n, bias_ptr, y_ptr, h_ptr, N, alpha, limit,
              HAS_BIAS: tl.constexpr, STORE_Y: tl.constexpr, SWIGLU: tl.constexpr, BM: tl.constexpr,
              BN: tl.constexpr):
    """nf4_gemm's forward epilogue on an accumulator whose columns are y's own (gate, up interleaved)."""
    cols = tile_n * BN + tl.arange(0, BN)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * N + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if STORE_Y:
        tl.store(y_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (cols < N)[None, :])
    if SWIGLU:
        even, odd = tl.split(tl.reshape(acc, (BM, BN // 2, 2)))
        half = tile_n * (BN // 2) + tl.arange(0, BN // 2)
        dtype = h_ptr.dtype.element_ty
        h = _swiglu(even.to(dtype).to(tl.float32), odd.to(dtype).to(tl.float32), alpha, limit)
        tl.store(h_ptr + rows[:, None].to(tl.int64) * (N // 2) + half[None, :], h.to(dtype),
                 mask=row_ok[:, None] & (half < N // 2)[None, :])


@triton.jit
def _fwd_joined_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, offsets_ptr, bias_ptr, y_ptr, h_ptr,
                       K, N, num_experts, alpha, limit, HAS_BIAS: tl.constexpr, STORE_Y: tl.constexpr,
                       SWIGLU: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       PAIRS: tl.constexpr = False):
    # nf4_gemm._grouped_mm_kernel with one dot per step over the (BK, BN) tile in W's own column order.
    # PAIRS (fwd_pair): code_ptr is the 256-entry byte -> pair-of-levels table, one lookup per level
    expert, first, end, tile_n = _program_tile(offsets_ptr, num_experts, N, BM, BN)
    if expert < 0:
        return
    rows = first + tl.arange(0, BM)
    row_ok = rows < end
    acc = tl.full((BM, BN), 0.0, tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if PAIRS:
            w = _dequant_pairs(packed_ptr, absmax_ptr, code_ptr, expert, ks, k_ok, tile_n * BN, K, N, x.dtype, BN)
        else:
            hi, lo = _dequant_tile(packed_ptr, absmax_ptr, code_ptr, expert, ks, k_ok, tile_n * BN, K, N, x.dtype,
                                   BN)
            w = tl.reshape(tl.join(hi, lo), (BK, BN))
        acc = tl.dot(x, w, acc)
    _epilogue(acc, rows, row_ok, expert, tile_n, bias_ptr, y_ptr, h_ptr, N, alpha, limit, HAS_BIAS, STORE_Y,
              SWIGLU, BM, BN)


@triton.jit
def _fwd_t_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, offsets_ptr, bias_ptr, y_ptr, h_ptr,
                  K: tl.constexpr, N, num_experts, alpha, limit, HAS_BIAS: tl.constexpr, STORE_Y: tl.constexpr,
                  SWIGLU: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # y^T = W[e]^T x^T with K (the summed dim) a constexpr: the dequantised weights are wgmma's register
    # operand, as in the transposed kernel, and the loop bound is known (no C7515 serialisation)
    expert, first, end, tile_n = _program_tile(offsets_ptr, num_experts, N, BM, BN)
    if expert < 0:
        return
    rows = first + tl.arange(0, BM)
    row_ok = rows < end
    acc = tl.full((BN, BM), 0.0, tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < K
        x_t = tl.load(x_ptr + rows[None, :].to(tl.int64) * K + ks[:, None],
                      mask=row_ok[None, :] & k_ok[:, None], other=0.0)
        hi, lo = _dequant_tile(packed_ptr, absmax_ptr, code_ptr, expert, ks, k_ok, tile_n * BN, K, N, x_t.dtype, BN)
        acc = tl.dot(tl.trans(tl.reshape(tl.join(hi, lo), (BK, BN))), x_t, acc)
    _epilogue(tl.trans(acc), rows, row_ok, expert, tile_n, bias_ptr, y_ptr, h_ptr, N, alpha, limit, HAS_BIAS,
              STORE_Y, SWIGLU, BM, BN)


@triton.jit
def _dequant_pairs(packed_ptr, absmax_ptr, pair_ptr, expert, ks, k_ok, n0, K, N, dtype, BN: tl.constexpr):
    """W[expert][ks, n0:n0+BN] in `dtype`, in W's column order: each level looked up at 2 * byte and
    2 * byte + 1 of the 256-entry table pair[b] = (code[b >> 4], code[b & 15]) (no nibble arithmetic),
    times its block's scale in fp32. (A 2-D gather of pair[byte, :] fails to compile for sm_90 as well.)"""
    BK: tl.constexpr = ks.shape[0]
    row = expert.to(tl.int64) * K + ks
    j = tl.arange(0, BN // 2)
    ok = k_ok[:, None] & (j[None, :] < (N - n0) // 2)
    byte = tl.load(packed_ptr + (row * (N // 2) + n0 // 2)[:, None] + j[None, :], mask=ok, other=0).to(tl.int32)
    b = tl.arange(0, BN // 64)
    scale = tl.load(absmax_ptr + (row * (N // 64) + n0 // 64)[:, None] + b[None, :],
                    mask=k_ok[:, None] & (n0 + 64 * b[None, :] < N), other=0.0)
    scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BK, BN // 64, 64)), (BK, BN))
    pair = tl.load(pair_ptr + tl.arange(0, 512))
    at = tl.reshape(tl.join(2 * byte, 2 * byte + 1), (BK * BN,))
    levels = tl.reshape(tl.gather(pair, at, 0), (BK, BN))
    return (levels * scale).to(dtype)


def pair_table(code: torch.Tensor) -> torch.Tensor:
    """(512,) fp32: entries 2b, 2b + 1 = code[b >> 4], code[b & 15] (a byte's high nibble is the even element)."""
    b = torch.arange(256, device=code.device)
    return torch.stack([code[b >> 4], code[b & 15]], dim=1).reshape(-1).float().contiguous()


def _pair_operands(w, device):
    packed, scales, code = nf4_gemm.operands(w, device)
    return packed, scales, pair_table(code)


# the transposed forward's tiles: BN is wgmma's M (64 a warpgroup), BM its N (up to 256)
TILES_FWD_T = {"BM": 128, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3}
# name -> (kernel, operands(w, device), constexprs beyond the tiles)
VARIANTS = {"fwd_joined": (_fwd_joined_kernel, nf4_gemm.operands, {}),
            "fwd_t_constexpr": (_fwd_t_kernel, nf4_gemm.operands, {})}
# Exact in the interpreter, but Triton 3.8 does not compile it for sm_90: both forms of the pair gather
# trip an assertion in TritonGPUOptimizeThreadLocality (`GatherLoweringHelper(op).isWarpLocal()`), so it
# is neither counted nor timed.
INTERPRETER_ONLY = {"fwd_pair": (_fwd_joined_kernel, _pair_operands, {"PAIRS": True})}

_BIG = {**nf4_gemm.TILES, "BM": 256, "num_warps": 8}
# the tiles each variant is checked with in the interpreter, and timed with on the GPU
TILE_SETS = {"fwd_joined": [nf4_gemm.TILES, _BIG], "fwd_pair": [nf4_gemm.TILES, _BIG],
             "fwd_t_constexpr": [TILES_FWD_T, {**TILES_FWD_T, "BM": 64}, {**TILES_FWD_T, "BN": 64, "num_warps": 4},
                                 {**TILES_FWD_T, "num_stages": 4}, {**TILES_FWD_T, "BM": 256}]}


def forward(name, x, w, offsets, bias, swiglu=None, keep_y=True, tiles=None):
    """As nf4_gemm.grouped_mm_swiglu (swiglu = (alpha, limit)) or grouped_mm (swiglu None): (y, h)."""
    kernel, ops, constexprs = {**VARIANTS, **INTERPRETER_ONLY}[name]
    return nf4_gemm.launch(kernel, ops(w, x.device), x, offsets, nf4_gemm._check(x, w, offsets), bias, swiglu,
                           keep_y, {**(tiles or TILE_SETS[name][0]), **constexprs})


def static_targets():
    """For bench/nf4_sass.py: (name, kernel, constexprs, tiles, MMA shape per loop step) at gpt-oss-20b's
    gate_up sizes, the training variant (bias, y kept, SwiGLU)."""
    from model.fast import targets
    targets.POINTERS.setdefault("pair_ptr", "*fp32")        # the byte -> pair-of-levels table
    t = nf4_gemm.TILES
    swiglu = {"HAS_BIAS": True, "STORE_Y": True, "SWIGLU": True}
    out = [("fwd current BM256 8w", nf4_gemm._grouped_mm_kernel, swiglu, _BIG, (256, 128, 64)),
           ("fwd current 4 stages", nf4_gemm._grouped_mm_kernel, swiglu, {**t, "num_stages": 4}, (128, 128, 64))]
    joined = {**swiglu, "PAIRS": False}     # named, or the compiled signature would take it as a runtime value
    out.append(("fwd_joined", _fwd_joined_kernel, joined, t, (128, 128, 64)))
    out.append(("fwd_joined BM256 8w", _fwd_joined_kernel, joined, _BIG, (256, 128, 64)))
    ft = TILES_FWD_T
    out.append(("fwd_t_constexpr", _fwd_t_kernel, swiglu, ft, (ft["BN"], ft["BM"], ft["BK"])))   # K from the sizes
    return out


# ---------------------------------------------------------------- CPU: Triton's interpreter
def check_interpreter():
    """Tiny shapes, float32 (the interpreter has no bf16 arithmetic): the weights bit-identical to
    bitsandbytes' dequantisation (identity rows, no bias), and each product equal to the current kernel's."""
    from model.weights.nf4 import NF4Tensor
    assert os.environ.get("TRITON_INTERPRET") == "1"
    results = []
    # (experts, in, out, rows per expert): empty experts, partial tiles, several row tiles, out % 128 != 0
    shapes = [(3, 96, 192, [5, 0, 70]), (4, 64, 128, [0, 0, 0, 9]), (2, 200, 64, [130, 1]), (3, 64, 192, [40, 0, 131])]
    for seed, (experts, n_in, n_out, counts) in enumerate(shapes):
        torch.manual_seed(seed)
        w = NF4Tensor(torch.randn(experts, n_in, n_out), compute_dtype=torch.float32)
        dense = w.dequantize()
        offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
        x, bias = torch.randn(sum(counts), n_in) * 4, torch.randn(experts, n_out)
        eye = torch.eye(n_in).repeat(experts, 1)
        eye_offsets = torch.arange(1, experts + 1, dtype=torch.int32) * n_in
        ref_y, ref_h = nf4_gemm.grouped_mm_swiglu(x, w, offsets, bias, 1.702, 7.0)
        for name in {**VARIANTS, **INTERPRETER_ONLY}:
            for tiles in TILE_SETS[name][:2]:
                r = {"variant": name, "tiles": tiles, "shape": [experts, n_in, n_out, counts]}
                y, h = forward(name, x, w, offsets, bias, (1.702, 7.0), tiles=tiles)
                r["y_equal_current"] = bool(torch.equal(y, ref_y))
                r["h_equal_current"] = bool(torch.equal(h, ref_h))
                r["y_max_abs_diff"] = (y - ref_y).abs().max().item() if y.numel() else 0.0
                r["h_max_abs_diff"] = (h - ref_h).abs().max().item() if h.numel() else 0.0
                ident, _ = forward(name, eye, w, eye_offsets, None, None, tiles=tiles)
                r["weights_differ"], r["weights_of"] = int((ident.view(experts, n_in, n_out) != dense).sum()), dense.numel()
                torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-4)
                assert r["weights_differ"] == 0, r
                print(json.dumps(r), flush=True)
                results.append(r)
    # the pair table is the code book rearranged, exactly
    code = torch.randn(16)
    pair = pair_table(code).view(256, 2)
    assert all(pair[b, 0] == code[b >> 4] and pair[b, 1] == code[b & 15] for b in range(256))
    return results


# ---------------------------------------------------------------- GPU: times
def gpu(rows_list, out):
    from model.weights.nf4 import NF4Tensor
    from tune_nf4_gemm import timed   # beside this script
    torch.manual_seed(0)
    experts, hidden, inter, alpha, limit = 32, 2880, 2880, 1.702, 7.0
    results = []

    def emit(r):
        print(json.dumps(r), flush=True)
        results.append(r)

    # the weights: identity rows give y = W[e], against bitsandbytes' dequantisation (bf16, on the GPU)
    w = NF4Tensor(torch.randn(2, 128, 384, device="cuda", dtype=torch.bfloat16))
    eye = torch.eye(128, device="cuda", dtype=torch.bfloat16).repeat(2, 1)
    eye_offsets = torch.tensor([128, 256], dtype=torch.int32, device="cuda")
    for name in VARIANTS:
        got = forward(name, eye, w, eye_offsets, None)[0].view(2, 128, 384)
        emit({"variant": name, "weights_differ": int((got != w.dequantize()).sum()), "of": got.numel()})
    for rows in rows_list:
        counts = torch.bincount(torch.multinomial(torch.ones(experts), rows, replacement=True), minlength=experts)
        offsets = counts.cumsum(0).to(torch.int32).cuda()
        for proj, n_in, n_out in (("gate_up", hidden, 2 * inter), ("down", inter, hidden)):
            w = NF4Tensor(torch.randn(experts, n_in, n_out, device="cuda", dtype=torch.bfloat16) * 0.02)
            bias = torch.randn(experts, n_out, device="cuda", dtype=torch.bfloat16) * 0.02
            x = torch.randn(rows, n_in, device="cuda", dtype=torch.bfloat16) * 4
            flops = 2 * rows * n_in * n_out
            base = {"rows": rows, "proj": proj}
            swiglu = (alpha, limit) if proj == "gate_up" else None   # training's forwards: gate_up keeps y
            ref_y, ref_h = nf4_gemm._forward(x, w, offsets, bias, swiglu, True, None)
            ms = timed(lambda: nf4_gemm._forward(x, w, offsets, bias, swiglu, True, None))
            emit({**base, "variant": "current", "ms": ms, "TFLOPs": round(flops / ms / 1e9, 1)})
            for name in VARIANTS:
                for tiles in TILE_SETS[name]:
                    r = {**base, "variant": name, "tiles": tiles}
                    try:
                        fn = lambda: forward(name, x, w, offsets, bias, swiglu, tiles=tiles)  # noqa: E731
                        y, h = fn()
                        r["y_differ_from_current"] = int((y != ref_y).sum())
                        if h is not None:
                            r["h_differ_from_current"] = int((h != ref_h).sum())
                        r["ms"] = timed(fn)
                        r["TFLOPs"] = round(flops / r["ms"] / 1e9, 1)
                    except Exception as e:   # a tile that does not fit, say
                        r["error"] = repr(e)[:300]
                    emit(r)
    with open(out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "results": results}, f, indent=1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--interpret", action="store_true", help="CPU: check exactness in Triton's interpreter")
    p.add_argument("--rows", default="8192,16384")
    p.add_argument("--out", default="nf4_variants.json")
    args = p.parse_args()
    if args.interpret:
        check_interpreter()
    else:
        gpu([int(r) for r in args.rows.split(",")], args.out)


if __name__ == "__main__":
    main()
