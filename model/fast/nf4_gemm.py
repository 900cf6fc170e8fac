"""Grouped matrix products read straight from NF4 weights (Triton, CUDA).

The plain route for an NF4 expert projection is: dequantise all the layer's experts to bf16 (1 GB
for gpt-oss-20b's gate_up_proj), then one grouped product. The dequantisation is pure memory
traffic, done three times a step (forward, recomputation, backward), and the bf16 copy is the
largest transient of the step. These kernels instead dequantise each weight tile in registers as
the product needs it: the weights are read at 4 bits and no bf16 copy exists.

Rows of x are sorted by expert; `offsets` holds the cumulative row counts (int32, on the GPU). The
tile grid is sized for the worst case (every expert ending in a partial tile) and each program finds
its expert and rows from the offsets, so nothing is read back to the host. The weight layout is
the hub's, (experts, in, out), quantised by bitsandbytes in blocks of 64 along `out`: byte b holds
elements 2b (high nibble) and 2b + 1 (low nibble), and a block's scale is its fp32 absmax.

    grouped_mm(x, w, offsets, bias)      y[r] = x[r] @ W[e] + bias[e]    for rows r of expert e
    grouped_mm_t(dy, w, offsets)         dx[r] = dy[r] @ W[e]^T          (the input's gradient)

    grouped_mm_swiglu(x, w, offsets, bias, alpha, limit)   y as grouped_mm's, and h = SwiGLU(y)
    mlp_backward(y, g, w, alpha, limit)  the expert MLP's backward past down: dy and <g, SwiGLU(y)> per row
    sum_rows(rows, inverse, k, weights)  each token's k expert rows summed (weighted): out, or dx

The forward and transposed products may read their rows in place (`src`: each sorted row's row of x,
so the expert layer never copies x[order // k]), and the forward may add a (rows, out) term before
rounding (`add`: expert LoRA's low-rank product). The expert MLP's SwiGLU rides in gate_up's epilogue:
`grouped_mm_swiglu` computes h from the tile it holds, so y is not read back for it. Its backward reads
y and g once, in one kernel (any weight format).

Each result is the same as dequantising and multiplying: the weights come out bit-identical to
bitsandbytes' dequantisation, only the order of the fp32 sums differs (tests/test_nf4_gemm.py runs
the kernels in Triton's interpreter on the CPU; bench/tune_nf4_gemm.py and check_cuda.py on the GPU).
"""
from __future__ import annotations

import bitsandbytes.functional as bnbf
import torch

from ..moe import CLAMP_PASSES_AT_BOUND

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without Triton; the dequantise-then-multiply path runs
    triton = None

BLOCKSIZE = 64  # bitsandbytes' block along the contiguous dim; the tiles below keep to whole blocks


def scales(w) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, offset): each block of 64's fp32 absmax is d + offset, the double quantisation undone as
    bitsandbytes does. The kernels add the offset as they load a scale, so the sum over every block
    of a layer (33 MB for gpt-oss-20b's gate_up) is never written: one fewer pass a launch. offset
    is a one-element float32 tensor on w's device (zero where the scales are not quantised)."""
    s = w.state
    if not s.nested:
        return s.absmax.float(), torch.zeros(1, device=s.absmax.device)
    return bnbf.dequantize_blockwise(s.absmax, s.state2), s.offset.float().reshape(1)


if triton is not None:
    @triton.jit
    def _program_tile(offsets_ptr, num_experts, n_cols, BM: tl.constexpr, BC: tl.constexpr):
        """This program's (BM, BC) output tile: its expert, rows [first, end) and column tile.

        The row tiles of each expert follow one another; expert -1 means past the last one (the grid
        is sized for the worst case, every expert ending in a partial tile).
        """
        c_tiles = (n_cols + BC - 1) // BC
        tile, tile_c = tl.program_id(0) // c_tiles, tl.program_id(0) % c_tiles
        expert = -1
        first = 0
        end = 0
        seen = 0      # tiles of the experts before e
        start = 0     # first row of expert e
        for e in range(num_experts):
            stop = tl.load(offsets_ptr + e)
            n = (stop - start + BM - 1) // BM
            mine = (tile >= seen) & (tile < seen + n)
            expert = tl.where(mine, e, expert)
            first = tl.where(mine, start + (tile - seen) * BM, first)
            end = tl.where(mine, stop, end)
            seen += n
            start = stop
        return expert, first, end, tile_c

    @triton.jit
    def _swiglu(gate, up, alpha, limit):
        """gpt-oss's clamped SwiGLU in fp32 of gate and up, each already rounded to y's dtype (as when y
        is stored and read back): the forward kernels' epilogue, here and in mxfp4_gemm.py."""
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        return (up + 1) * gate * (1 / (1 + tl.exp(-alpha * gate)))

    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def _source_rows(src_ptr, rows, row_ok, GATHER: tl.constexpr):
        """The rows of x (or dy) that the sorted rows read, in int64 (they scale a row's length): src[rows]
        if GATHER (each token's row once per chosen expert, read in place: no gathered copy is written),
        else the rows themselves."""
        if GATHER:
            return tl.load(src_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        return rows.to(tl.int64)

    @triton.jit
    def _mlp_backward_kernel(y_ptr, g_ptr, w_ptr, dy_ptr, gh_ptr, rows, inter, alpha, limit,
                             AT_BOUND_PASSES: tl.constexpr, BR: tl.constexpr, BI: tl.constexpr):
        # moe.expert_mlp_backward for BR rows in one pass over y (gate, up interleaved) and g: dy and <g, h>
        r = tl.program_id(0) * BR + tl.arange(0, BR)
        r_ok = r < rows
        dtype = dy_ptr.dtype.element_ty
        w = tl.load(w_ptr + r, mask=r_ok, other=0.0).to(dtype).to(tl.float32)   # as w.to(g.dtype)
        gh = tl.full((BR,), 0.0, tl.float32)
        for i0 in range(0, inter, BI):
            i = i0 + tl.arange(0, BI)
            ok = r_ok[:, None] & (i < inter)[None, :]
            both = 2 * i0 + tl.arange(0, 2 * BI)                      # y's columns 2i (gate) and 2i + 1 (up)
            at_y = r[:, None].to(tl.int64) * (2 * inter) + both[None, :]
            ok_y = r_ok[:, None] & (both < 2 * inter)[None, :]
            gate, up = tl.split(tl.reshape(tl.load(y_ptr + at_y, mask=ok_y, other=0.0).to(tl.float32), (BR, BI, 2)))
            g = tl.load(g_ptr + r[:, None].to(tl.int64) * inter + i[None, :], mask=ok, other=0.0).to(tl.float32)
            gc = tl.minimum(gate, limit)
            uc = tl.minimum(tl.maximum(up, -limit), limit)
            s = 1 / (1 + tl.exp(-alpha * gc))
            gh += tl.reduce(g * ((uc + 1) * gc * s), 1, _add)    # tl.sum, defined where the interpreter sees it
            dh = g * w[:, None]
            if AT_BOUND_PASSES:    # the installed torch's clamp passes the gradient at a bound (moe._within)
                pass_gate, pass_up = gate <= limit, (up >= -limit) & (up <= limit)
            else:
                pass_gate, pass_up = gate < limit, (up > -limit) & (up < limit)
            d_gate = tl.where(pass_gate, dh * (uc + 1) * s * (1 + alpha * gc * (1 - s)), 0.0)
            d_up = tl.where(pass_up, dh * gc * s, 0.0)
            tl.store(dy_ptr + at_y, tl.reshape(tl.join(d_gate, d_up), (BR, 2 * BI)).to(dtype), mask=ok_y)
        tl.store(gh_ptr + r, gh, mask=r_ok)

    @triton.jit
    def _sum_rows_kernel(rows_ptr, inverse_ptr, w_ptr, out_ptr, tokens, H, K: tl.constexpr, WEIGHTED: tl.constexpr,
                         BT: tl.constexpr, BH: tl.constexpr):
        # out[t] = sum over j < K of rows[inverse[t K + j]] (times w[t, j] if WEIGHTED), in fp32, j in order
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        c = tl.program_id(1) * BH + tl.arange(0, BH)
        t_ok = t < tokens
        ok = t_ok[:, None] & (c < H)[None, :]
        acc = tl.full((BT, BH), 0.0, tl.float32)
        for j in tl.static_range(K):
            r = tl.load(inverse_ptr + t * K + j, mask=t_ok, other=0).to(tl.int64)
            v = tl.load(rows_ptr + r[:, None] * H + c[None, :], mask=ok, other=0.0).to(tl.float32)
            if WEIGHTED:
                v *= tl.load(w_ptr + t * K + j, mask=t_ok, other=0.0).to(tl.float32)[:, None]
            acc += v
        tl.store(out_ptr + t.to(tl.int64)[:, None] * H + c[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _dequant_tile(packed_ptr, absmax_ptr, absmax_offset, code_ptr, expert, ks, k_ok, n0, K, N, dtype,
                      BN: tl.constexpr):
        """W[expert][ks, n0:n0+BN] in `dtype` as two halves: the even columns and the odd ones.

        Each block's scale is its d + offset, and each level times that scale, in fp32, then rounded:
        bitsandbytes' own arithmetic (the sum rounded before the product, which no fused multiply-add
        can merge), so the weights are bit-identical to its dequantisation.
        """
        BK: tl.constexpr = ks.shape[0]
        row = expert.to(tl.int64) * K + ks                            # rows of the (experts * in, out) matrix
        j = tl.arange(0, BN // 2)                                     # byte columns: elements n0+2j, n0+2j+1
        ok = k_ok[:, None] & (j[None, :] < (N - n0) // 2)
        byte = tl.load(packed_ptr + (row * (N // 2) + n0 // 2)[:, None] + j[None, :], mask=ok, other=0)
        b = tl.arange(0, BN // 64)                                    # the tile's blocks of 64, per row
        scale = tl.load(absmax_ptr + (row * (N // 64) + n0 // 64)[:, None] + b[None, :],
                        mask=k_ok[:, None] & (n0 + 64 * b[None, :] < N), other=0.0) + absmax_offset
        scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BK, BN // 64, 32)), (BK, BN // 2))
        byte = byte.to(tl.int32)
        code = tl.load(code_ptr + tl.arange(0, 16))                   # the 16 NF4 levels
        hi = tl.reshape(tl.gather(code, tl.reshape(byte >> 4, (BK * BN // 2,)), 0), (BK, BN // 2)) * scale
        lo = tl.reshape(tl.gather(code, tl.reshape(byte & 15, (BK * BN // 2,)), 0), (BK, BN // 2)) * scale
        return hi.to(dtype), lo.to(dtype)                             # columns n0 + 2j and n0 + 2j + 1

    @triton.jit
    def _dequantize_kernel(packed_ptr, qabsmax_ptr, absmax2_ptr, code2_ptr, absmax_offset_ptr, code_ptr, out_ptr,
                           n_blocks, BLOCK2: tl.constexpr, BB: tl.constexpr, PAIRS: tl.constexpr,
                           BF16: tl.constexpr):
        """BB blocks of 64 weights a program, in their stored order (32 bytes and one scale each), the
        double quantisation undone here too: each block's 8-bit scale code through its 256-value code
        book, times its group of BLOCK2 blocks' fp32 absmax, plus the offset, then _dequant_tile's
        arithmetic. Launched without fused multiply-adds (DEQUANTIZE_TILES), so the product and the sum
        round separately as in bitsandbytes' two kernels: bit-identical to its dequantisation.

        PAIRS (a 16-bit output; BF16: bfloat16, else float16): out_ptr is the output viewed as int32, and
        each byte's two weights are stored as one word, element 2j in its low half (little-endian): ~13%
        faster than joining the halves into one tile (docs/BENCHMARKS.md, round 2's eleventh session)."""
        b = tl.program_id(0) * BB + tl.arange(0, BB)
        ok = b < n_blocks
        byte = tl.load(packed_ptr + b.to(tl.int64)[:, None] * 32 + tl.arange(0, 32)[None, :], mask=ok[:, None],
                       other=0).to(tl.int32)
        q = tl.load(qabsmax_ptr + b, mask=ok, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + b // BLOCK2, mask=ok, other=0.0)
        scale = (scale + tl.load(absmax_offset_ptr))[:, None]
        code = tl.load(code_ptr + tl.arange(0, 16))
        hi = tl.reshape(tl.gather(code, tl.reshape(byte >> 4, (BB * 32,)), 0), (BB, 32)) * scale
        lo = tl.reshape(tl.gather(code, tl.reshape(byte & 15, (BB * 32,)), 0), (BB, 32)) * scale
        if PAIRS:
            dtype: tl.constexpr = tl.bfloat16 if BF16 else tl.float16
            even = hi.to(dtype).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            odd = lo.to(dtype).to(tl.int16, bitcast=True).to(tl.int32)
            tl.store(out_ptr + b.to(tl.int64)[:, None] * 32 + tl.arange(0, 32)[None, :], even | (odd << 16),
                     mask=ok[:, None])
        else:
            w = tl.reshape(tl.join(hi, lo), (BB, 64)).to(out_ptr.dtype.element_ty)   # element 2j, then 2j + 1
            tl.store(out_ptr + b.to(tl.int64)[:, None] * 64 + tl.arange(0, 64)[None, :], w, mask=ok[:, None])

    @triton.jit
    def _grouped_mm_kernel(x_ptr, src_ptr, packed_ptr, absmax_ptr, absmax_offset_ptr, code_ptr, offsets_ptr, bias_ptr,
                           add_ptr, y_ptr, h_ptr, K, N, num_experts, alpha, limit, GATHER: tl.constexpr,
                           HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr, STORE_Y: tl.constexpr, SWIGLU: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # y[rows of e] = x[rows of e] @ W[e] (+ bias[e]) (+ add[rows]); a program computes a (BM, BN) tile.
        # GATHER: sorted row r reads x's row src[r] (else row r). HAS_ADD: a (rows, N) term added before
        # rounding (expert LoRA's product). SWIGLU: also h = gpt-oss's clamped SwiGLU of y, whose gate and
        # up are y's even and odd columns
        expert, first, end, tile_n = _program_tile(offsets_ptr, num_experts, N, BM, BN)
        if expert < 0:
            return
        rows = first + tl.arange(0, BM)
        row_ok = rows < end
        src = _source_rows(src_ptr, rows, row_ok, GATHER)
        absmax_offset = tl.load(absmax_offset_ptr)
        even = tl.full((BM, BN // 2), 0.0, tl.float32)    # the tile's even and odd columns: the weights'
        odd = tl.full((BM, BN // 2), 0.0, tl.float32)     # two nibbles of a byte, never interleaved per step
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < K
            x = tl.load(x_ptr + src[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            hi, lo = _dequant_tile(packed_ptr, absmax_ptr, absmax_offset, code_ptr, expert, ks, k_ok, tile_n * BN,
                                   K, N, x.dtype, BN)
            even = tl.dot(x, hi, even)
            odd = tl.dot(x, lo, odd)
        half = tile_n * (BN // 2) + tl.arange(0, BN // 2)  # y's columns 2 * half (even) and 2 * half + 1 (odd)
        ok = row_ok[:, None] & (half < N // 2)[None, :]
        if HAS_BIAS:
            even += tl.load(bias_ptr + expert * N + 2 * half, mask=half < N // 2, other=0.0).to(tl.float32)[None, :]
            odd += tl.load(bias_ptr + expert * N + 2 * half + 1, mask=half < N // 2, other=0.0).to(tl.float32)[None, :]
        if HAS_ADD:  # read as stored (gate, up interleaved), then split as the tile holds it
            cols = tile_n * BN + tl.arange(0, BN)
            more = tl.load(add_ptr + rows[:, None].to(tl.int64) * N + cols[None, :],
                           mask=row_ok[:, None] & (cols < N)[None, :], other=0.0).to(tl.float32)
            more_even, more_odd = tl.split(tl.reshape(more, (BM, BN // 2, 2)))
            even += more_even
            odd += more_odd
        if STORE_Y:
            cols = tile_n * BN + tl.arange(0, BN)
            tl.store(y_ptr + rows[:, None].to(tl.int64) * N + cols[None, :],
                     tl.reshape(tl.join(even, odd), (BM, BN)).to(y_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & (cols < N)[None, :])
        if SWIGLU:  # on y rounded to its dtype, as when y is stored and read back
            dtype = h_ptr.dtype.element_ty
            h = _swiglu(even.to(dtype).to(tl.float32), odd.to(dtype).to(tl.float32), alpha, limit)
            tl.store(h_ptr + rows[:, None].to(tl.int64) * (N // 2) + half[None, :], h.to(dtype), mask=ok)

    @triton.jit
    def _grouped_mm_t_kernel(dy_ptr, src_ptr, packed_ptr, absmax_ptr, absmax_offset_ptr, code_ptr, offsets_ptr, dx_ptr,
                             K, N: tl.constexpr, num_experts, GATHER: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                             BN: tl.constexpr):
        # dx[rows of e] = dy[rows of e] @ W[e]^T; a program computes a (BM, BK) tile, summing over N.
        # GATHER: sorted row r reads dy's row src[r] (else row r).
        # It is computed transposed, dx^T = W[e] dy^T: the dequantised weights are then the product's
        # left operand, which Hopper's wgmma reads from registers. N, the loop's bound, is a constexpr
        # (one compilation per width): with a runtime bound the loop may run zero times, and on that
        # path the accumulator is not a wgmma's, so ptxas serialises every wgmma (warning C7515).
        expert, first, end, tile_k = _program_tile(offsets_ptr, num_experts, K, BM, BK)
        if expert < 0:
            return
        rows = first + tl.arange(0, BM)
        ks = tile_k * BK + tl.arange(0, BK)
        row_ok, k_ok = rows < end, ks < K
        src = _source_rows(src_ptr, rows, row_ok, GATHER)
        absmax_offset = tl.load(absmax_offset_ptr)
        acc = tl.full((BK, BM), 0.0, tl.float32)
        for n0 in range(0, N, BN):
            cols = n0 + tl.arange(0, BN)
            dy_t = tl.load(dy_ptr + src[None, :] * N + cols[:, None],
                           mask=row_ok[None, :] & (cols < N)[:, None], other=0.0)
            hi, lo = _dequant_tile(packed_ptr, absmax_ptr, absmax_offset, code_ptr, expert, ks, k_ok, n0, K, N,
                                   dy_t.dtype, BN)
            w = tl.reshape(tl.join(hi, lo), (BK, BN))                 # hi, lo, hi, lo... as dy's columns
            acc = tl.dot(w, dy_t, acc)
        tl.store(dx_ptr + rows[:, None].to(tl.int64) * K + ks[None, :], tl.trans(acc).to(dx_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & k_ok[None, :])


# Tile sizes chosen on an H100 with bench/tune_nf4_gemm.py at 8192 rows (docs/BENCHMARKS.md); the
# contiguous dim's tiles hold whole blocks of 64. The interpreter takes any.
TILES = {"BM": 128, "BN": 128, "BK": 64, "num_warps": 4, "num_stages": 3}    # y = x @ W
TILES_T = {"BM": 256, "BN": 64, "BK": 64, "num_warps": 4, "num_stages": 3}   # dx = dy @ W^T (BN: the sum)


MLP_BACKWARD_TILES = {"BR": 8, "BI": 128, "num_warps": 8, "num_stages": 1}   # rows, gate/up pairs a step


def tiles_for(capability: tuple[int, int]) -> tuple[dict, dict]:
    """(tiles of y = x @ W, tiles of dx = dy @ W^T) for a CUDA device's compute capability.

    A thread holds at most 255 registers; past that it spills to memory. Untimed away from the H100:
    each choice below is the tuned tile changed as little as keeps every variant from spilling and
    within the generation's shared memory (bench/kernel_targets.py prints both; tests/test_kernel_targets.py
    compiles them all)."""
    major = capability[0]
    if major == 9:      # Hopper: as tuned
        return TILES, TILES_T
    if major == 10:     # data-center Blackwell: the forward tile spills at 4 warps, not at 8
        return {**TILES, "num_warps": 8}, TILES_T
    # Ampere, Ada, consumer Blackwell (sm_120) and anything newer: without Hopper's wgmma the
    # (128, 128) forward tile spills, half as wide does not and still holds whole blocks of 64; the
    # transposed tile fits ~99 KB of shared memory and stops spilling at 8 warps.
    return {**TILES, "BN": 64}, {**TILES_T, "num_warps": 8}


def _tiles(x, transposed: bool) -> dict:
    """The tiles for x's device; any tiles do in the interpreter (CPU tensors)."""
    tiles, tiles_t = tiles_for(torch.cuda.get_device_capability(x.device)) if x.is_cuda else (TILES, TILES_T)
    return tiles_t if transposed else tiles


# The constexpr variants of the kernels that the functions below launch (tests/test_kernel_targets.py
# compiles each for every GPU generation): grouped_mm, and grouped_mm_swiglu with and without y; the
# expert layer's gate_up (frozen bias, SwiGLU; expert LoRA's term too) reads the token rows in place
# (GATHER), as does down's transposed product; expert LoRA's projections add their low-rank term in the
# epilogue (HAS_ADD).
FORWARD_VARIANTS = [{"GATHER": False, "HAS_BIAS": bias, "HAS_ADD": False, "STORE_Y": store_y, "SWIGLU": swiglu}
                    for bias in (True, False) for store_y, swiglu in ((True, False), (True, True), (False, True))] + \
                   [{"GATHER": True, "HAS_BIAS": True, "HAS_ADD": add, "STORE_Y": store_y, "SWIGLU": True}
                    for add in (False, True) for store_y in (True, False)] + \
                   [{"GATHER": False, "HAS_BIAS": bias, "HAS_ADD": True, "STORE_Y": True, "SWIGLU": False}
                    for bias in (True, False)]
TRANSPOSED_VARIANTS = [{"GATHER": False}, {"GATHER": True}]


def _check(x, w, offsets):
    e, k, n = w.shape
    assert x.is_contiguous(), x.stride()
    assert w.state.blocksize == BLOCKSIZE and n % BLOCKSIZE == 0, (w.state.blocksize, w.shape)
    assert offsets.dtype == torch.int32 and offsets.numel() == e, (offsets.dtype, offsets.shape)
    return e, k, n


def launch(kernel, operands: tuple, x, offsets, shape: tuple, bias, swiglu, store_y: bool, t: dict, src=None,
           add=None):
    """Launch a forward kernel over expert-sorted rows: this module's on NF4 `operands` (codes, block
    scales, their offset, code book), or mxfp4_gemm's on MXFP4's (codes, scales, value table). shape:
    (experts, in, out). The rows are x's own, or with `src` (int32, one per sorted row) x[src]. add:
    a (rows, out) term in x's dtype added to y before it is rounded."""
    e, k, n = shape
    assert x.shape[1] == k, (x.shape, shape)
    rows = _rows(x, src)
    variant = {"GATHER": src is not None, "HAS_BIAS": bias is not None, "HAS_ADD": add is not None,
               "STORE_Y": store_y, "SWIGLU": swiglu is not None}
    assert variant in FORWARD_VARIANTS, variant
    assert add is None or (add.shape == (rows, n) and add.dtype == x.dtype and add.is_contiguous()), add
    y = x.new_empty(rows, n) if store_y else None
    h = x.new_empty(rows, n // 2) if swiglu else None
    alpha, limit = swiglu or (0.0, 0.0)
    grid = ((triton.cdiv(rows, t["BM"]) + e) * triton.cdiv(n, t["BN"]),)
    some = y if store_y else h                                 # stands in for the pointers not used
    src_or = offsets if src is None else src                  # (offsets, int32 too, stands in for src)
    kernel[grid](x, src_or, *operands, offsets, bias if bias is not None else some,
                 add if add is not None else some, some, h if swiglu else some, k, n, e, alpha, limit, **variant, **t)
    return y, h


def launch_t(kernel, operands: tuple, dy, offsets, shape: tuple, t: dict, src=None):
    """Launch a transposed kernel, dy @ W[e]^T over expert-sorted rows (dy's own, or dy[src]; operands
    as for `launch`)."""
    e, k, n = shape
    assert dy.shape[1] == n, (dy.shape, shape)
    rows = _rows(dy, src)
    dx = dy.new_empty(rows, k)
    grid = ((triton.cdiv(rows, t["BM"]) + e) * triton.cdiv(k, t["BK"]),)
    kernel[grid](dy, offsets if src is None else src, *operands, offsets, dx, k, n, e, GATHER=src is not None, **t)
    return dx


def _rows(x, src) -> int:
    """How many sorted rows a product has: x's, or one per index in src (int32 rows of x)."""
    if src is None:
        return x.shape[0]
    assert src.dtype == torch.int32 and src.dim() == 1 and src.is_contiguous(), (src.dtype, src.shape)
    return src.shape[0]


def mlp_backward(y, g, w, alpha: float, limit: float):
    """moe.expert_mlp_backward in one kernel: y (rows, 2 * inter) gate_up's output, g (rows, inter) the
    gradient arriving at h = SwiGLU(y), w (rows,) the routing weights -> (dy, <g, h> per row in fp32).
    In fp32 throughout; the compiled chain it replaces took three kernels over the same rows."""
    rows, inter = g.shape
    assert y.shape == (rows, 2 * inter) and w.shape == (rows,) and y.is_contiguous() and g.is_contiguous()
    dy, gh = torch.empty_like(y), torch.empty(rows, device=y.device, dtype=torch.float32)
    t = MLP_BACKWARD_TILES
    _mlp_backward_kernel[(triton.cdiv(rows, t["BR"]),)](y, g, w.contiguous(), dy, gh, rows, inter, alpha, limit,
                                                         AT_BOUND_PASSES=CLAMP_PASSES_AT_BOUND, **t)
    return dy, gh


SUM_ROWS_TILES = {"BT": 8, "BH": 256, "num_warps": 4}
SUM_ROWS_VARIANTS = [{"WEIGHTED": True}, {"WEIGHTED": False}]    # the layer's output; the input's gradient


def sum_rows(rows, inverse, k: int, weights=None):
    """Each token's k rows summed (times its routing weights, if given), in one kernel: rows (tokens*k,
    dim) in moe.sort_by_expert's order, inverse its inverse permutation, weights (tokens, k) -> (tokens,
    dim) in rows' dtype. moe.weighted_sum and moe.sum_per_token's twin: a fixed order (slot 0 first) in
    fp32, without their gathered copy of the rows, product and separate reduction."""
    n, dim = inverse.numel() // k, rows.shape[1]
    assert rows.is_contiguous() and inverse.is_contiguous() and inverse.numel() == n * k, (rows.shape, inverse.shape)
    out = rows.new_empty(n, dim)
    t = SUM_ROWS_TILES
    w = weights.contiguous() if weights is not None else rows
    _sum_rows_kernel[(triton.cdiv(n, t["BT"]), triton.cdiv(dim, t["BH"]))](rows, inverse, w, out, n, dim, K=k,
                                                                          WEIGHTED=weights is not None, **t)
    return out


def operands(w, device) -> tuple:
    """What the kernels read of an NF4Tensor: its packed codes, each block's fp32 scale less the
    offset, the offset, the code book."""
    return w.packed, *scales(w), w.state.code.to(device=device, dtype=torch.float32)


# 128 blocks of 64 weights a program, on 8 warps: the best of 32 variants timed on an H200 (docs/BENCHMARKS.md,
# round 2's eleventh session); no fused multiply-adds (the scale's product and sum round separately, as
# bitsandbytes' do)
DEQUANTIZE_TILES = {"BB": 128, "num_warps": 8, "enable_fp_fusion": False}


def dequantize_takes(w) -> bool:
    """Whether `dequantize` takes the NF4Tensor w: double-quantised scales, and rows of whole blocks (where
    blocks span rows, bitsandbytes' CPU build was seen to differ)."""
    return w.state.nested and w.shape[-1] % BLOCKSIZE == 0


def dequantize(w, tiles: dict | None = None):
    """The whole NF4Tensor w in its compute dtype and shape in one kernel, scales decoded inside:
    bit-identical to bitsandbytes' dequantisation (two kernels, and an fp32 copy of the scales) where
    it takes w (`dequantize_takes`), for model/fast/dense_gemm.py, which multiplies it with
    torch._grouped_mm, and the attention's NF4Linear."""
    assert dequantize_takes(w), "the kernel takes double-quantised rows of whole blocks"
    s = w.state
    out = torch.empty(w.shape, device=w.packed.device, dtype=w.dtype)
    n_blocks, t = out.numel() // BLOCKSIZE, tiles or DEQUANTIZE_TILES
    pairs = out.element_size() == 2          # bf16 or fp16: each (even, odd) pair one 32-bit word
    _dequantize_kernel[(triton.cdiv(n_blocks, t["BB"]),)](
        w.packed, s.absmax, s.state2.absmax, s.state2.code, s.offset.float().reshape(1),
        s.code.to(device=w.packed.device, dtype=torch.float32), out.view(torch.int32) if pairs else out, n_blocks,
        BLOCK2=s.state2.blocksize, PAIRS=pairs, BF16=out.dtype == torch.bfloat16, **t)
    return out


def _forward(x, w, offsets, bias, swiglu, store_y, tiles, src, add=None):
    return launch(_grouped_mm_kernel, operands(w, x.device), x, offsets, _check(x, w, offsets), bias, swiglu,
                  store_y, tiles or _tiles(x, transposed=False), src, add)


def grouped_mm(x, w, offsets, bias=None, tiles: dict | None = None, src=None, add=None):
    """x (rows, in) sorted by expert, w an NF4Tensor (experts, in, out) -> x @ W[e] (+ bias[e]) (+ add).
    With src (int32 rows of x, sorted by expert), x[src] is multiplied without being formed; add
    (rows, out), in x's dtype, is added before the result is rounded."""
    return _forward(x, w, offsets, bias, None, True, tiles, src, add)[0]


def grouped_mm_swiglu(x, w, offsets, bias, alpha: float, limit: float, keep_y=True, tiles: dict | None = None,
                      src=None, add=None):
    """The expert MLP's first half: y = x @ W[e] + bias[e] (gate and up interleaved) and h = SwiGLU(y).

    Returns (y, h), y None unless `keep_y` (the backward needs it; a forward without gradient does not).
    src and add as for `grouped_mm`.
    """
    return _forward(x, w, offsets, bias, (alpha, limit), keep_y, tiles, src, add)


def grouped_mm_t(dy, w, offsets, tiles: dict | None = None, src=None):
    """dy (rows, out) sorted by expert, w an NF4Tensor (experts, in, out) -> dy @ W[e]^T; with src as
    for `grouped_mm`, dy[src] @ W[e]^T."""
    return launch_t(_grouped_mm_t_kernel, operands(w, dy.device), dy, offsets, _check(dy, w, offsets),
                    tiles or _tiles(dy, transposed=True), src)
