"""Frozen weights stored as bitsandbytes NF4 (4-bit NormalFloat, double-quantised, blocks of 64).

`NF4Linear` replaces an nn.Linear; `NF4Experts` replaces a layer's dense experts and keeps the
grouped computation: each projection dequantises the layer's experts once and runs one grouped
matrix product. Neither keeps the dequantised weight for the backward: it is rebuilt there.
"""
from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
import torch.nn as nn

from .moe import Experts, grouped_matmul

BLOCKSIZE = 64


class NF4Tensor:
    """A frozen tensor in NF4: the packed codes (a buffer of its owner) and bitsandbytes' QuantState."""

    def __init__(self, weight: torch.Tensor, compute_dtype=torch.bfloat16):
        self.shape, self.dtype = tuple(weight.shape), compute_dtype
        self.packed, self.state = bnbf.quantize_4bit(weight.to(compute_dtype), blocksize=BLOCKSIZE,
                                                     compress_statistics=True, quant_type="nf4")

    def dequantize(self) -> torch.Tensor:
        return bnbf.dequantize_4bit(self.packed, self.state).to(self.dtype).view(self.shape)

    def nbytes(self) -> int:
        s = self.state
        extra = [s.absmax, s.code] + ([s.state2.absmax, s.state2.code] if s.nested else [])
        return self.packed.numel() + sum(t.numel() * t.element_size() for t in extra)


class NF4Linear(nn.Module):
    """y = x W^T + b with W frozen in NF4 (bitsandbytes' 4-bit matmul; its backward dequantises again)."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_nf4: NF4Tensor | None = None
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def set_weight(self, weight: torch.Tensor, compute_dtype=torch.bfloat16):
        assert weight.shape == (self.out_features, self.in_features), weight.shape
        self.weight_nf4 = NF4Tensor(weight, compute_dtype)

    def forward(self, x):
        w = self.weight_nf4
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return bnb.matmul_4bit(x.to(w.dtype), w.packed.t(), quant_state=w.state, bias=bias)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_nf4.dequantize()

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4"


class _GroupedNF4(torch.autograd.Function):
    """x (rows sorted by expert, in) @ dequantize(w)[e] without saving the dequantised weights."""

    @staticmethod
    def forward(ctx, x, w: NF4Tensor, counts, offsets):
        ctx.w, ctx.counts = w, counts
        ctx.save_for_backward(offsets)
        return grouped_matmul(x, w.dequantize(), counts, offsets)

    @staticmethod
    def backward(ctx, dy):
        (offsets,) = ctx.saved_tensors
        w_t = ctx.w.dequantize().transpose(1, 2).contiguous()    # (experts, out, in)
        return grouped_matmul(dy.contiguous(), w_t, ctx.counts, offsets), None, None, None


class NF4Experts(Experts):
    """The experts of one layer with gate_up_proj and down_proj in NF4, each as one quantised tensor."""

    def __init__(self, config):
        super().__init__(config)
        # the dense parameters are dropped; the biases stay (small, and kept in bf16/fp32)
        del self.gate_up_proj, self.down_proj
        self.nf4: dict[str, NF4Tensor] = {}

    def set_weight(self, name: str, weight: torch.Tensor, compute_dtype=torch.bfloat16):
        self.nf4[name] = NF4Tensor(weight, compute_dtype)

    def dequantized(self, name: str) -> torch.Tensor:
        return self.nf4[name].dequantize()

    def gate_up(self, x, expert, counts, offsets):
        w = self.nf4["gate_up_proj"]
        return _GroupedNF4.apply(x.to(w.dtype), w, counts, offsets) + self.gate_up_proj_bias[expert].to(w.dtype)

    def down(self, x, expert, counts, offsets):
        w = self.nf4["down_proj"]
        return _GroupedNF4.apply(x.to(w.dtype), w, counts, offsets) + self.down_proj_bias[expert].to(w.dtype)


def nf4_bytes(model: nn.Module) -> int:
    """Bytes held by the NF4 weights of a model (codes and quantisation statistics)."""
    total = 0
    for m in model.modules():
        if isinstance(m, NF4Linear) and m.weight_nf4 is not None:
            total += m.weight_nf4.nbytes()
        elif isinstance(m, NF4Experts):
            total += sum(w.nbytes() for w in m.nf4.values())
    return total
