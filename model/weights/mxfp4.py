"""MXFP4, the format of the hub's gpt-oss expert weights: 4-bit e2m1 codes in blocks of 32 sharing
a power-of-two scale.

`dequantize_mxfp4` reads the hub's blocks and scales; `quantize_mxfp4` writes them (OCP MX's rule),
for a BF16 checkpoint loaded with MXFP4 experts. `MXFP4Experts` keeps a layer's experts in these codes
as shipped (`--base mxfp4`), instead of re-quantising them to NF4, which moves each expert matrix by
5-12%. Only the experts: the hub ships attention and the rest in bf16, and those stay NF4 (what fits
the card). Where the gate allows the kernels (model/fast/mxfp4_gemm.py) the products read the codes
directly; the plain twin dequantises the layer and runs the grouped product, as NF4's does.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..fast import dense_gemm, mxfp4_gemm, nf4_layer
from ..moe import Experts, grouped_matmul

BLOCK = 32         # values sharing one scale, along the input dim
E2M1_EMAX = 2      # the largest e2m1 value, 6 = 1.5 x 2^2
# e2m1: codes 0-7 are these values, codes 8-15 the same negated (the top bit is the sign)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype=torch.bfloat16,
                     rows_per_chunk: int = 1 << 14) -> torch.Tensor:
    """blocks uint8 (..., n_blocks, 16), scales uint8 (..., n_blocks) -> (..., n_blocks * 32).

    Each byte holds two codes, the low nibble first; a block's values are multiplied by
    2^(scale - 127). Works a chunk of rows at a time so the float32 intermediate stays small.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    lead, n_blocks = blocks.shape[:-2], blocks.shape[-2]
    blocks = blocks.reshape(-1, n_blocks, 16)
    scales = scales.reshape(-1, n_blocks)
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    out = torch.empty(blocks.shape[0], n_blocks * 32, dtype=dtype, device=blocks.device)
    for start in range(0, blocks.shape[0], rows_per_chunk):
        b = blocks[start:start + rows_per_chunk]
        codes = torch.stack((b & 0x0F, b >> 4), dim=-1).reshape(*b.shape[:-1], 32)  # low nibble first
        exp = scales[start:start + rows_per_chunk].to(torch.int32) - 127
        vals = torch.ldexp(lut[codes.long()], exp.unsqueeze(-1).to(torch.float32))
        out[start:start + rows_per_chunk] = vals.reshape(b.shape[0], -1).to(dtype)
    return out.reshape(*lead, n_blocks * 32)


def quantize_mxfp4(w: torch.Tensor, rows_per_chunk: int = 1 << 14) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., n), n a multiple of 32 -> blocks uint8 (..., n/32, 16), scales uint8 (..., n/32).

    As OCP MX specifies: a block's scale is 2^(floor(log2(max|x|)) - 2) (2: e2m1's largest exponent),
    each value divided by it is rounded to the nearest e2m1 value, ties to the even code, and values
    past 6 saturate to 6. Values already of that form come back exactly.
    """
    if w.shape[-1] % BLOCK:
        raise ValueError(f"MXFP4 needs the last dim to be a multiple of {BLOCK}, got {tuple(w.shape)}")
    lead, n = w.shape[:-1], w.shape[-1]
    w = w.reshape(-1, n // BLOCK, BLOCK)
    # the midpoints between e2m1's magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6
    mid = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], device=w.device)
    blocks = torch.empty(w.shape[0], n // BLOCK, 16, dtype=torch.uint8, device=w.device)
    scales = torch.empty(w.shape[0], n // BLOCK, dtype=torch.uint8, device=w.device)
    for start in range(0, w.shape[0], rows_per_chunk):
        x = w[start:start + rows_per_chunk].float()                              # (rows, n/32, 32)
        amax = x.abs().amax(-1)
        exp = (torch.floor(torch.log2(amax)) - E2M1_EMAX).clamp(-127, 127)      # all-zero blocks: -127
        a = torch.ldexp(x.abs(), -exp.unsqueeze(-1))                           # exact: a power of two
        code = torch.bucketize(a, mid)                                         # ties go to the lower code
        tie = a == mid[code.clamp(max=len(mid) - 1)]
        code = (code + (tie & (code % 2 == 1))).clamp(max=7)                   # ... unless it is odd
        code = code | (torch.signbit(x).long() << 3)
        blocks[start:start + rows_per_chunk] = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
        scales[start:start + rows_per_chunk] = (exp + 127).to(torch.uint8)
    return blocks.reshape(*lead, n // BLOCK, 16), scales.reshape(*lead, n // BLOCK)


class MXFP4Tensor:
    """A frozen (experts, in, out) weight in MXFP4, stored as the hub stores it: blocks uint8
    (experts, out, in/32, 16) and scales uint8 (experts, out, in/32), blocks of 32 along `in`.

    Not registered buffers: like NF4 weights they stay on the device they were loaded to.
    """

    def __init__(self, blocks: torch.Tensor, scales: torch.Tensor, compute_dtype=torch.bfloat16):
        if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.dim() != 4 \
                or blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
            raise ValueError(f"MXFP4 expert blocks {tuple(blocks.shape)} ({blocks.dtype}) and scales "
                             f"{tuple(scales.shape)} ({scales.dtype}) are not (experts, out, in/32, 16) and "
                             "(experts, out, in/32), uint8")
        e, n_out, n_blocks, _ = blocks.shape
        self.blocks, self.scales = blocks.contiguous(), scales.contiguous()
        # e2m1's values, for the kernels (on the weights' device: no copy in a CUDA graph's capture)
        self.lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
        self.shape, self.dtype = (e, n_blocks * BLOCK, n_out), compute_dtype

    def dequantize(self) -> torch.Tensor:
        """(experts, in, out) in the compute dtype: a transposed view of the stored (experts, out, in)."""
        return dequantize_mxfp4(self.blocks, self.scales, self.dtype).transpose(1, 2)

    def nbytes(self) -> int:
        return self.blocks.numel() + self.scales.numel() + self.lut.numel() * 4


class _GroupedMXFP4(torch.autograd.Function):
    """The plain twin: dequantise the layer's experts, one grouped product; the backward dequantises
    again rather than keeping the bf16 weights."""

    @staticmethod
    def forward(ctx, x, w: MXFP4Tensor, counts, offsets):
        ctx.w, ctx.counts = w, counts
        ctx.save_for_backward(offsets)
        return grouped_matmul(x, w.dequantize(), counts, offsets)

    @staticmethod
    def backward(ctx, dy):
        (offsets,) = ctx.saved_tensors
        w = ctx.w.dequantize().transpose(1, 2)                  # (experts, out, in)
        return grouped_matmul(dy.contiguous(), w, ctx.counts, offsets), None, None, None


class MXFP4Experts(Experts):
    """The experts of one layer with gate_up_proj and down_proj in MXFP4 (one MXFP4Tensor each)."""

    def __init__(self, config):
        super().__init__(config)
        del self.gate_up_proj, self.down_proj   # the biases stay (small, bf16/fp32)
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.shapes = {"gate_up_proj": (e, h, 2 * i), "down_proj": (e, i, h)}   # (experts, in, out)
        self.mxfp4: dict[str, MXFP4Tensor] = {}

    def set_mxfp4(self, name: str, blocks: torch.Tensor, scales: torch.Tensor, compute_dtype=torch.bfloat16):
        """The hub's blocks and scales of matrix `name`, kept as they are."""
        w = MXFP4Tensor(blocks, scales, compute_dtype)
        assert w.shape == self.shapes[name], (name, w.shape, self.shapes[name])
        self.mxfp4[name] = w

    def set_weight(self, name: str, weight: torch.Tensor, compute_dtype=torch.bfloat16):
        """A dense (experts, in, out) weight, quantised to MXFP4 (quantize_mxfp4)."""
        self.set_mxfp4(name, *quantize_mxfp4(weight.transpose(1, 2)), compute_dtype)

    def dequantized(self, name: str) -> torch.Tensor:
        return self.mxfp4[name].dequantize()

    def project(self, name, x, expert, counts, offsets, fast=None, add=None):
        w = self.mxfp4[name]
        x, bias = x.to(w.dtype), getattr(self, name + "_bias")
        if nf4_layer.kernels_run(x, fast):  # one kernel each way, straight from the codes
            return nf4_layer.project(x, w, offsets, bias, expert, gemm=dense_gemm.for_base(mxfp4_gemm, fast), add=add)
        y = _GroupedMXFP4.apply(x, w, counts, offsets) + bias[expert].to(x.dtype)
        return y if add is None else y + add.to(y.dtype)

    def forward(self, x, weights, idx, fast=None, padding=None):
        """Experts.forward; where the kernels run and the biases are frozen (LoRA's case), one fused layer."""
        out = self.fused_layer(x, weights, idx, fast, padding)
        return super().forward(x, weights, idx, fast) if out is None else out

    def fused_layer(self, x, weights, idx, fast, padding=None, lora=None):
        """As NF4Experts.fused_layer: the layer as one autograd function where it runs, else None."""
        gate_up, down = self.mxfp4["gate_up_proj"], self.mxfp4["down_proj"]
        xc = x.to(gate_up.dtype)
        frozen = not (self.gate_up_proj_bias.requires_grad or self.down_proj_bias.requires_grad)
        if not (frozen and nf4_layer.kernels_run(xc, fast)):
            return None
        gemm = dense_gemm.for_base(mxfp4_gemm, fast)
        factors = None if lora is None else lora(xc.dtype)
        return nf4_layer.expert_layer(xc, weights, idx, self, gate_up, down, gemm, padding, factors).to(x.dtype)


def mxfp4_bytes(model: nn.Module) -> int:
    """Bytes held by the MXFP4 expert weights of a model (codes and scales)."""
    return sum(w.nbytes() for m in model.modules() if isinstance(m, MXFP4Experts) for w in m.mxfp4.values())
