"""Grouped matrix products read straight from MXFP4 expert weights (Triton, CUDA).

The MXFP4 twin of nf4_gemm.py, with the same three functions, grid and tile choice per GPU
generation: each weight tile is dequantised in registers as the product needs it, so the experts are
read at 4.25 bits and no bf16 copy exists. The layout is the hub's, (experts, out, in/32, 16) bytes and
(experts, out, in/32) scales: each output column's inputs are contiguous, byte b of a block holds
inputs 2b (low nibble) and 2b + 1 (high nibble), and a block of 32 inputs shares the scale
2^(byte - 127). A code is looked up in e2m1's 16 values and multiplied by its block's scale in fp32
(exact: a power of two), then rounded to the compute dtype: dequantize_mxfp4's arithmetic, so the
weights the products see are bit-identical to it.

    grouped_mm(x, w, offsets, bias)      y[r] = x[r] @ W[e] + bias[e]    for rows r of expert e
    grouped_mm_t(dy, w, offsets)         dx[r] = dy[r] @ W[e]^T          (the input's gradient)
    grouped_mm_swiglu(x, w, offsets, bias, alpha, limit)   y as grouped_mm's, and h = SwiGLU(y)

W[e] is the dense (in, out) matrix. As stored, a tile of W[e]^T is what reads contiguously, so the
forward is computed transposed (y^T = W[e]^T x^T: the dequantised weights are the product's left
operand, which Hopper's wgmma reads from registers) and the input gradient straight
(dx = dy @ W[e]^T, the weights on the right), the mirror image of nf4_gemm.py's pair.
tests/test_mxfp4.py runs the kernels in Triton's interpreter; bench/mxfp4_vs_nf4.py on the GPU.
"""
from __future__ import annotations

import torch

from . import nf4_gemm

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without Triton; the dequantise-then-multiply path runs
    triton = None

BLOCK = 32  # inputs sharing one scale; the tiles below keep to whole blocks along `in`


if triton is not None:
    _program_tile = nf4_gemm._program_tile   # the same grid: a program's expert and rows from the offsets
    _swiglu = nf4_gemm._swiglu               # the same SwiGLU epilogue
    _source_rows = nf4_gemm._source_rows     # the same rows read in place (GATHER)

    @triton.jit
    def _dequant_tile(blocks_ptr, scales_ptr, lut_ptr, expert, ns, n_ok, k0, K, N, dtype, BK: tl.constexpr):
        """W[expert]^T[ns, k0:k0+BK], i.e. (out, in), in `dtype`: rows ns of the stored matrix."""
        BN: tl.constexpr = ns.shape[0]
        row = expert.to(tl.int64) * N + ns                            # rows of the (experts * out, in) matrix
        j = tl.arange(0, BK // 2)                                     # bytes: inputs k0+2j, k0+2j+1
        ok = n_ok[:, None] & (j[None, :] < (K - k0) // 2)
        byte = tl.load(blocks_ptr + (row * (K // 2) + k0 // 2)[:, None] + j[None, :], mask=ok, other=0)
        b = tl.arange(0, BK // 32)                                    # the tile's blocks of 32, per row
        s = tl.load(scales_ptr + (row * (K // 32) + k0 // 32)[:, None] + b[None, :],
                    mask=n_ok[:, None] & (k0 + 32 * b[None, :] < K), other=127).to(tl.int32)
        # 2^(s - 127) built from its bits: exponent field s (s = 0 is 2^-127, a subnormal's bit 22)
        scale = tl.where(s == 0, 0x400000, s << 23).to(tl.float32, bitcast=True)
        scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BN, BK // 32, 16)), (BN, BK // 2))
        byte = byte.to(tl.int32)
        lut = tl.load(lut_ptr + tl.arange(0, 16))                     # e2m1's 16 values
        lo = tl.reshape(tl.gather(lut, tl.reshape(byte & 15, (BN * BK // 2,)), 0), (BN, BK // 2)) * scale
        hi = tl.reshape(tl.gather(lut, tl.reshape(byte >> 4, (BN * BK // 2,)), 0), (BN, BK // 2)) * scale
        return tl.reshape(tl.join(lo.to(dtype), hi.to(dtype)), (BN, BK))   # lo, hi, lo, hi... as the inputs

    @triton.jit
    def _dequantize_kernel(blocks_ptr, scales_ptr, lut_ptr, out_ptr, n_blocks, BB: tl.constexpr):
        """BB blocks of 32 inputs a program, in their stored order (16 bytes and one scale each), with
        _dequant_tile's arithmetic: bit-identical to dequantize_mxfp4."""
        b = tl.program_id(0) * BB + tl.arange(0, BB)
        ok = b < n_blocks
        byte = tl.load(blocks_ptr + b.to(tl.int64)[:, None] * 16 + tl.arange(0, 16)[None, :], mask=ok[:, None],
                       other=0).to(tl.int32)
        s = tl.load(scales_ptr + b, mask=ok, other=127).to(tl.int32)
        scale = tl.where(s == 0, 0x400000, s << 23).to(tl.float32, bitcast=True)[:, None]
        lut = tl.load(lut_ptr + tl.arange(0, 16))
        lo = tl.reshape(tl.gather(lut, tl.reshape(byte & 15, (BB * 16,)), 0), (BB, 16)) * scale
        hi = tl.reshape(tl.gather(lut, tl.reshape(byte >> 4, (BB * 16,)), 0), (BB, 16)) * scale
        w = tl.reshape(tl.join(lo, hi), (BB, 32)).to(out_ptr.dtype.element_ty)   # input 2j, then 2j + 1
        tl.store(out_ptr + b.to(tl.int64)[:, None] * 32 + tl.arange(0, 32)[None, :], w, mask=ok[:, None])

    @triton.jit
    def _grouped_mm_kernel(x_ptr, src_ptr, blocks_ptr, scales_ptr, lut_ptr, offsets_ptr, bias_ptr, add_ptr, y_ptr,
                           h_ptr, K: tl.constexpr, N, num_experts, alpha, limit, GATHER: tl.constexpr,
                           HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr, STORE_Y: tl.constexpr, SWIGLU: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # y[rows of e] = x[rows of e] @ W[e] (+ bias[e]); a program computes a (BM, BN) tile, as its
        # transpose W[e]^T x^T. SWIGLU: also h = gpt-oss's clamped SwiGLU of y (gate, up: y's even, odd columns)
        # K, the loop's bound, is a constexpr for the reason nf4_gemm's transposed kernel gives.
        # GATHER: sorted row r reads x's row src[r]; HAS_ADD: add[rows] joins y before it is rounded
        expert, first, end, tile_n = _program_tile(offsets_ptr, num_experts, N, BM, BN)
        if expert < 0:
            return
        rows = first + tl.arange(0, BM)
        row_ok = rows < end
        src = _source_rows(src_ptr, rows, row_ok, GATHER)
        ns = tile_n * BN + tl.arange(0, BN)
        n_ok = ns < N
        acc = tl.full((BN, BM), 0.0, tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            x_t = tl.load(x_ptr + src[None, :] * K + ks[:, None],
                          mask=row_ok[None, :] & (ks < K)[:, None], other=0.0)     # (BK, BM)
            w = _dequant_tile(blocks_ptr, scales_ptr, lut_ptr, expert, ns, n_ok, k0, K, N, x_t.dtype, BK)
            acc = tl.dot(w, x_t, acc)
        y = tl.trans(acc)                                                          # (BM, BN)
        if HAS_BIAS:
            y += tl.load(bias_ptr + expert * N + ns, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_ADD:
            y += tl.load(add_ptr + rows[:, None].to(tl.int64) * N + ns[None, :], mask=row_ok[:, None] & n_ok[None, :],
                         other=0.0).to(tl.float32)
        if STORE_Y:
            tl.store(y_ptr + rows[:, None].to(tl.int64) * N + ns[None, :], y.to(y_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & n_ok[None, :])
        if SWIGLU:  # on y rounded to its dtype, as when y is stored and read back
            dtype = h_ptr.dtype.element_ty
            gate, up = tl.split(tl.reshape(y.to(dtype).to(tl.float32), (BM, BN // 2, 2)))
            h = _swiglu(gate, up, alpha, limit)
            half = tile_n * (BN // 2) + tl.arange(0, BN // 2)
            tl.store(h_ptr + rows[:, None].to(tl.int64) * (N // 2) + half[None, :], h.to(dtype),
                     mask=row_ok[:, None] & (half < N // 2)[None, :])

    @triton.jit
    def _grouped_mm_t_kernel(dy_ptr, src_ptr, blocks_ptr, scales_ptr, lut_ptr, offsets_ptr, dx_ptr,
                             K, N, num_experts, GATHER: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                             BN: tl.constexpr):
        # dx[rows of e] = dy[rows of e] @ W[e]^T; a program computes a (BM, BK) tile, summing over N.
        # GATHER: sorted row r reads dy's row src[r]
        expert, first, end, tile_k = _program_tile(offsets_ptr, num_experts, K, BM, BK)
        if expert < 0:
            return
        rows = first + tl.arange(0, BM)
        ks = tile_k * BK + tl.arange(0, BK)
        row_ok = rows < end
        src = _source_rows(src_ptr, rows, row_ok, GATHER)
        acc = tl.full((BM, BK), 0.0, tl.float32)
        for n0 in range(0, N, BN):
            ns = n0 + tl.arange(0, BN)
            n_ok = ns < N
            dy = tl.load(dy_ptr + src[:, None] * N + ns[None, :],
                         mask=row_ok[:, None] & n_ok[None, :], other=0.0)
            w = _dequant_tile(blocks_ptr, scales_ptr, lut_ptr, expert, ns, n_ok, tile_k * BK, K, N, dy.dtype, BK)
            acc = tl.dot(dy, w, acc)
        tl.store(dx_ptr + rows[:, None].to(tl.int64) * K + ks[None, :], acc.to(dx_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (ks < K)[None, :])


def tiles_for(capability: tuple[int, int]) -> tuple[dict, dict]:
    """(tiles of y = x @ W, tiles of dx = dy @ W^T) for a CUDA device's compute capability.

    nf4_gemm.py's per generation (untimed for MXFP4: bench/mxfp4_vs_nf4.py measures the step), but on
    Hopper the forward at 8 warps: at the tuned 4 its transposed tile spills up to 96 bytes, at 8
    nothing (bench/kernel_targets.py). The dim along `in` (BK) holds whole blocks of 32."""
    tiles, tiles_t = nf4_gemm.tiles_for(capability)
    if capability[0] == 9:
        tiles = {**tiles, "num_warps": 8}
    return tiles, tiles_t


def _tiles(x, transposed: bool) -> dict:
    tiles, tiles_t = tiles_for(torch.cuda.get_device_capability(x.device)) if x.is_cuda else \
        (nf4_gemm.TILES, nf4_gemm.TILES_T)
    return tiles_t if transposed else tiles


FORWARD_VARIANTS = nf4_gemm.FORWARD_VARIANTS   # the constexpr variants launched, as for NF4
TRANSPOSED_VARIANTS = nf4_gemm.TRANSPOSED_VARIANTS


def _check(x, w, offsets):
    e, k, n = w.shape
    assert x.is_contiguous(), x.stride()
    assert w.blocks.is_contiguous() and w.scales.is_contiguous() and k % BLOCK == 0, w.shape
    assert offsets.dtype == torch.int32 and offsets.numel() == e, (offsets.dtype, offsets.shape)
    return e, k, n


DEQUANTIZE_TILES = {"BB": 128, "num_warps": 4}    # blocks of 32 a program (bench/dequantize_tiles.py)


def dequantize(w, tiles: dict | None = None):
    """The whole MXFP4Tensor w in its compute dtype, (experts, in, out), in one kernel: a transposed
    view of the stored (experts, out, in), which torch._grouped_mm reads as it is (dense_gemm.py)."""
    e, k, n = w.shape
    out = torch.empty(e, n, k, device=w.blocks.device, dtype=w.dtype)
    n_blocks, t = out.numel() // BLOCK, tiles or DEQUANTIZE_TILES
    _dequantize_kernel[(triton.cdiv(n_blocks, t["BB"]),)](w.blocks, w.scales, w.lut, out, n_blocks, **t)
    return out.transpose(1, 2)


def _forward(x, w, offsets, bias, swiglu, store_y, tiles, src, add=None):
    t = tiles or _tiles(x, transposed=False)
    assert t["BK"] % BLOCK == 0, t
    return nf4_gemm.launch(_grouped_mm_kernel, (w.blocks, w.scales, w.lut), x, offsets, _check(x, w, offsets),
                           bias, swiglu, store_y, t, src, add)


def grouped_mm(x, w, offsets, bias=None, tiles: dict | None = None, src=None, add=None):
    """x (rows, in) sorted by expert, w an MXFP4Tensor (experts, in, out) -> x @ W[e] (+ bias[e]) (+ add);
    src and add as for nf4_gemm.grouped_mm."""
    return _forward(x, w, offsets, bias, None, True, tiles, src, add)[0]


def grouped_mm_swiglu(x, w, offsets, bias, alpha: float, limit: float, keep_y=True, tiles: dict | None = None,
                      src=None, add=None):
    """The expert MLP's first half: y = x @ W[e] + bias[e] (gate and up interleaved) and h = SwiGLU(y).

    Returns (y, h), y None unless `keep_y`; src and add as for nf4_gemm.grouped_mm."""
    return _forward(x, w, offsets, bias, (alpha, limit), keep_y, tiles, src, add)


def grouped_mm_t(dy, w, offsets, tiles: dict | None = None, src=None):
    """dy (rows, out) sorted by expert, w an MXFP4Tensor (experts, in, out) -> dy @ W[e]^T (dy[src] with src)."""
    t = tiles or _tiles(dy, transposed=True)
    assert t["BK"] % BLOCK == 0, t
    return nf4_gemm.launch_t(_grouped_mm_t_kernel, (w.blocks, w.scales, w.lut), dy, offsets, _check(dy, w, offsets), t,
                             src)
