"""The experts' products as one dequantisation of the layer, then torch._grouped_mm (CUDA, where memory allows).

nf4_gemm.py and mxfp4_gemm.py dequantise each weight tile inside the product and never hold a bf16
copy of the weights. On Hopper that product runs at about half a bf16 grouped product's rate
(gpt-oss-20b's gate_up at 8,192 rows: 1.17 ms against 0.55 ms, docs/BENCHMARKS.md): the dequantisation
and the tensor cores take turns. Here the layer's experts are first written out in bf16 by one
memory-bound kernel (`dequantize` of the base's module: 0.33 ms and 1 GB for gpt-oss-20b's gate_up),
then multiplied by torch._grouped_mm at its full rate, and the copy is dropped at once. Faster, at the
price of that transient copy, so the memory plan chooses it (`GptOss.dense_experts`).

`Dequantised(nf4_gemm)` and `Dequantised(mxfp4_gemm)` have the fused modules' functions (grouped_mm,
grouped_mm_swiglu, grouped_mm_t), so model/fast/nf4_layer.py runs either the same way. The bias, the
added term and the SwiGLU are one epilogue kernel over the product's rows; the product's output is
rounded to bf16 before the bias is added (the fused kernels add it in fp32 first).
"""
from __future__ import annotations

import torch

from . import mxfp4_gemm, nf4_gemm
from .recompute import in_recomputation
from ..moe import grouped_matmul

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


if triton is not None:
    _swiglu = nf4_gemm._swiglu     # the fused kernels' SwiGLU epilogue
    _add = nf4_gemm._add           # for tl.reduce: tl.sum is not seen by the interpreter

    @triton.jit
    def _epilogue_kernel(y_ptr, offsets_ptr, bias_ptr, add_ptr, h_ptr, N, num_experts, alpha, limit,
                         HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr, SWIGLU: tl.constexpr, BR: tl.constexpr,
                         BC: tl.constexpr, EP: tl.constexpr):
        # y[r] += bias[e] (+ add[r]) in place for the rows of each expert e, and h = SwiGLU(y) (gate and
        # up y's even and odd columns). Rows past the last offset (padding: no expert) are left alone
        r = tl.program_id(0) * BR + tl.arange(0, BR)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        e = tl.arange(0, EP)
        ends = tl.load(offsets_ptr + e, mask=e < num_experts, other=2 ** 31 - 1)
        expert = tl.reduce((ends[None, :] <= r[:, None]).to(tl.int32), 1, _add)   # num_experts: past the end
        r_ok = expert < num_experts
        ok = r_ok[:, None] & (c < N)[None, :]
        at = r.to(tl.int64)[:, None] * N + c[None, :]
        y = tl.load(y_ptr + at, mask=ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(bias_ptr + expert[:, None] * N + c[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_ADD:
            y += tl.load(add_ptr + at, mask=ok, other=0.0).to(tl.float32)
        y = y.to(y_ptr.dtype.element_ty)
        if HAS_BIAS or HAS_ADD:
            tl.store(y_ptr + at, y, mask=ok)
        if SWIGLU:
            gate, up = tl.split(tl.reshape(y.to(tl.float32), (BR, BC // 2, 2)))
            h = _swiglu(gate, up, alpha, limit)
            half = tl.program_id(1) * (BC // 2) + tl.arange(0, BC // 2)
            tl.store(h_ptr + r.to(tl.int64)[:, None] * (N // 2) + half[None, :], h.to(h_ptr.dtype.element_ty),
                     mask=r_ok[:, None] & (half < N // 2)[None, :])


EPILOGUE_TILES = {"BR": 16, "BC": 128, "num_warps": 4}
# the epilogue's variants the dense path launches (tests/test_kernel_targets.py compiles each): gate_up
# (frozen bias and the SwiGLU; expert LoRA's term too), down (frozen bias), and the separate projections
# of expert LoRA with trained biases (its term, with or without a frozen bias); and on every GPU, h
# rebuilt from gate_up's output alone (expert LoRA's backward, model/fast/nf4_layer.py)
SWIGLU_ONLY = {"HAS_BIAS": False, "HAS_ADD": False, "SWIGLU": True}
EPILOGUE_VARIANTS = [{"HAS_BIAS": True, "HAS_ADD": False, "SWIGLU": True},
                     {"HAS_BIAS": True, "HAS_ADD": True, "SWIGLU": True},
                     {"HAS_BIAS": True, "HAS_ADD": False, "SWIGLU": False},
                     {"HAS_BIAS": True, "HAS_ADD": True, "SWIGLU": False},
                     {"HAS_BIAS": False, "HAS_ADD": True, "SWIGLU": False}]


def product(x, w, offsets):
    """x (rows, in) sorted by expert times w[e] (experts, in, out): moe.grouped_matmul, one
    torch._grouped_mm on CUDA (where GptOss.fast grants this path), its loop over the experts on the
    CPU (the tests), which reads the counts back. Rows past the last offset (padding) are left unwritten."""
    if x.is_cuda:
        return grouped_matmul(x, w, None, offsets)
    counts = offsets.diff(prepend=offsets.new_zeros(1)).tolist()
    y = x.new_empty(x.shape[0], w.shape[-1])
    y[:sum(counts)] = grouped_matmul(x[:sum(counts)], w, counts, offsets)
    return y


def outer(a, b, offsets):
    """a (rows, m) and b (rows, n) sorted by expert -> (experts, m, n), each expert's sum over its rows of
    a^T b (expert LoRA's weight gradients). Rows past the last offset (padding) are not read: one
    torch._grouped_mm on CUDA, a loop over the experts elsewhere."""
    if a.is_cuda:
        return torch._grouped_mm(a.t(), b, offs=offsets)
    counts = offsets.diff(prepend=offsets.new_zeros(1)).tolist()
    out = a.new_zeros(len(counts), a.shape[1], b.shape[1])
    for e, (ae, be) in enumerate(zip(a[:sum(counts)].split(counts), b[:sum(counts)].split(counts))):
        out[e] = ae.T @ be
    return out


def epilogue(y, offsets, bias, add, swiglu):
    """y (rows, out) sorted by expert, in place: + bias[e] (+ add); with swiglu (alpha, limit) also
    returns h = SwiGLU(y). One kernel."""
    rows, n = y.shape
    h = y.new_empty(rows, n // 2) if swiglu else None
    if bias is None and add is None and swiglu is None:
        return h
    alpha, limit = swiglu or (0.0, 0.0)
    t = EPILOGUE_TILES
    e = offsets.numel()
    grid = (triton.cdiv(rows, t["BR"]), triton.cdiv(n, t["BC"]))
    variant = {"HAS_BIAS": bias is not None, "HAS_ADD": add is not None, "SWIGLU": swiglu is not None}
    assert variant in EPILOGUE_VARIANTS or variant == SWIGLU_ONLY, variant
    _epilogue_kernel[grid](y, offsets, bias if bias is not None else y, add if add is not None else y,
                           h if swiglu else y, n, e, alpha, limit, **variant, EP=triton.next_power_of_2(e), **t)
    return h


class Dequantised:
    """The fused modules' three products (nf4_gemm's signatures, less the tiles) from `base`'s
    `dequantize`: the layer's weights in bf16 for one grouped product each, dropped as it returns.

    One copy outlives its call: gate_up's in gradient checkpointing's recomputation of a frozen expert
    layer (`recompute.in_recomputation`, grouped_mm_swiglu), whose backward follows at once and needs
    gate_up again for its input gradient. Kept for that product (`kept`), gate_up is dequantised twice
    a step instead of three times (+5% tokens/s at 2,048 tokens, +1% at 4,096, the peak unchanged:
    docs/BENCHMARKS.md). While it is held, down's input gradient, which comes first in the backward,
    runs on the fused kernel, so no second copy exists beside it. Expert LoRA runs in the same layer
    (its terms added in the epilogue) and keeps the same copy; with biases that train, the experts'
    separate projections (grouped_mm) keep none.
    """

    def __init__(self, base):
        self.base = base
        self.kept = None          # (w, its bf16 copy) from a recomputation, for the backward's product

    def _forward(self, x, weights, offsets, bias, add, swiglu, src):
        rows = x if src is None else x[src]
        y = product(rows, weights, offsets)
        del rows, weights                                          # the bf16 weights go with the call
        return y, epilogue(y, offsets, bias, add, swiglu)

    def grouped_mm(self, x, w, offsets, bias=None, src=None, add=None):
        return self._forward(x, self.base.dequantize(w), offsets, bias, add, None, src)[0]

    def grouped_mm_swiglu(self, x, w, offsets, bias, alpha: float, limit: float, keep_y=True, src=None, add=None):
        weights = self.base.dequantize(w)
        self.kept = (w, weights) if in_recomputation() else None  # (else: drops a copy whose backward never came)
        y, h = self._forward(x, weights, offsets, bias, add, (alpha, limit), src)
        return (y if keep_y else None), h

    def grouped_mm_t(self, dy, w, offsets, src=None):
        if self.kept is not None and self.kept[0] is not w:      # another matrix's copy is held
            return self.base.grouped_mm_t(dy, w, offsets, src=src)
        weights = self.kept[1] if self.kept is not None else self.base.dequantize(w)
        self.kept = None
        rows = dy if src is None else dy[src]
        return product(rows, weights.transpose(1, 2), offsets)


NF4, MXFP4 = Dequantised(nf4_gemm), Dequantised(mxfp4_gemm)


def for_base(fused, fast):
    """The products an expert layer runs: `fused` (nf4_gemm or mxfp4_gemm), or its Dequantised twin
    where the fast paths say dense_experts."""
    if fast is None or not fast.dense_experts:
        return fused
    return NF4 if fused is nf4_gemm else MXFP4
