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

from .moe import Experts, grouped_matmul, use_grouped_kernel

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


def _dequantize_into(w: NF4Tensor, out: torch.Tensor):
    if out.is_cuda:  # bitsandbytes writes straight into the buffer on CUDA
        bnbf.dequantize_4bit(w.packed, w.state, out=out.view(w.state.shape))
    else:
        out.copy_(w.dequantize())


def nf4_grouped_matmul(x, weights: list[NF4Tensor], counts: list[int], group: int, transpose=False):
    """Rows of x sorted by expert (counts[e] rows each) times each expert's dequantised weight.

    Experts are taken `group` at a time: their weights are dequantised into one (group, in, out)
    buffer and multiplied in one grouped product, so at most `group` experts exist in bf16 at once.
    Experts that no row uses are never dequantised.
    """
    outs, start = [], 0
    for g0 in range(0, len(weights), group):
        active = [e for e in range(g0, min(g0 + group, len(weights))) if counts[e]]
        n = sum(counts[e] for e in active)
        if not active:
            continue
        w0 = weights[active[0]]
        buf = torch.empty((len(active),) + w0.shape, dtype=w0.dtype, device=x.device)
        for j, e in enumerate(active):
            _dequantize_into(weights[e], buf[j])
        if transpose:
            buf = buf.transpose(1, 2)
        sub = [counts[e] for e in active]
        rows = x[start:start + n]
        if use_grouped_kernel(rows):
            offsets = torch.tensor(sub, device=x.device).cumsum(0).to(torch.int32)
            outs.append(grouped_matmul(rows, buf, None, offsets))
        else:
            outs.append(grouped_matmul(rows, buf, sub, None))
        start += n
    if not outs:
        return x.new_zeros(0, weights[0].shape[0 if transpose else 1])
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class _GroupedNF4(torch.autograd.Function):
    """nf4_grouped_matmul with a backward that dequantises again instead of keeping the weights."""

    @staticmethod
    def forward(ctx, x, weights, counts, group):
        ctx.weights, ctx.counts, ctx.group = weights, counts, group
        return nf4_grouped_matmul(x, weights, counts, group)

    @staticmethod
    def backward(ctx, dy):
        dx = nf4_grouped_matmul(dy.contiguous(), ctx.weights, ctx.counts, ctx.group, transpose=True)
        return dx, None, None, None


class NF4Experts(Experts):
    """The experts of one layer with gate_up_proj and down_proj in NF4, one quantised tensor per expert.

    Per-expert storage lets a projection dequantise only the experts in use, `group` at a time
    (all at once by default: one grouped kernel per projection).
    """

    def __init__(self, config, group: int | None = None):
        super().__init__(config)
        # the dense parameters are dropped; the biases stay (small, and kept in bf16/fp32)
        del self.gate_up_proj, self.down_proj
        self.group = group or self.num_experts
        self.nf4: dict[str, list[NF4Tensor]] = {}

    def set_weight(self, name: str, weight: torch.Tensor, compute_dtype=torch.bfloat16):
        """weight (experts, in, out), dense layout; quantised one expert at a time."""
        self.nf4[name] = [NF4Tensor(w, compute_dtype) for w in weight]

    def dequantized(self, name: str) -> torch.Tensor:
        return torch.stack([w.dequantize() for w in self.nf4[name]])

    def _project(self, name, x, expert, counts, offsets):
        ws = self.nf4[name]
        if counts is None:
            counts = offsets.diff(prepend=offsets.new_zeros(1)).tolist()
        y = _GroupedNF4.apply(x.to(ws[0].dtype), ws, counts, self.group)
        return y + getattr(self, name + "_bias")[expert].to(y.dtype)

    def gate_up(self, x, expert, counts, offsets):
        return self._project("gate_up_proj", x, expert, counts, offsets)

    def down(self, x, expert, counts, offsets):
        return self._project("down_proj", x, expert, counts, offsets)


def nf4_bytes(model: nn.Module) -> int:
    """Bytes held by the NF4 weights of a model (codes and quantisation statistics)."""
    total = 0
    for m in model.modules():
        if isinstance(m, NF4Linear) and m.weight_nf4 is not None:
            total += m.weight_nf4.nbytes()
        elif isinstance(m, NF4Experts):
            total += sum(w.nbytes() for ws in m.nf4.values() for w in ws)
    return total
