"""Frozen weights stored as bitsandbytes NF4 (4-bit NormalFloat, double-quantised, blocks of 64).

`NF4Linear` replaces an nn.Linear; `NF4Experts` replaces a layer's dense experts and keeps the
grouped computation. The plain path dequantises the layer's experts and runs one grouped matrix
product; where the gate allows the NF4 kernels, each projection is one Triton kernel that reads the
4-bit codes directly, and with frozen biases (LoRA's case) the whole layer is one autograd function
(both in model/fast/nf4_layer.py). Nothing keeps a dequantised weight for the backward: it is rebuilt
there.
"""
from __future__ import annotations

import bitsandbytes.functional as bnbf
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..fast import dense_gemm, nf4_gemm, nf4_layer
from ..moe import Experts, grouped_matmul, use_grouped_kernel

BLOCKSIZE = 64


class NF4Tensor:
    """A frozen tensor in NF4: the packed codes and bitsandbytes' QuantState.

    Neither is a registered buffer, so `Module.to` does not move them: NF4 weights stay on the device
    they were quantised on (load_model quantises them where they are to be used).
    """

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


def dequantize(w: NF4Tensor, kernel: bool) -> torch.Tensor:
    """w in its compute dtype: bitsandbytes' dequantisation (two kernels and an fp32 copy of the scales),
    or with `kernel` the NF4 kernels' one kernel (nf4_gemm.dequantize), bit-identical, where it takes w
    (every gpt-oss projection's)."""
    return nf4_gemm.dequantize(w) if kernel and nf4_gemm.dequantize_takes(w) else w.dequantize()


class _NF4Matmul(torch.autograd.Function):
    """x W^T + b with W in NF4; the backward dequantises W again rather than keeping it.

    (bitsandbytes' matmul_4bit does the same arithmetic; this is lighter on the host, which at
    short sequences is what bounds the step.)
    """

    @staticmethod
    def forward(ctx, x, w: NF4Tensor, bias, kernel: bool):
        ctx.w, ctx.kernel = w, kernel
        return F.linear(x, dequantize(w, kernel), bias)

    @staticmethod
    def backward(ctx, dy):
        return dy @ dequantize(ctx.w, ctx.kernel), None, None, None     # W and its bias are frozen


class NF4Linear(nn.Module):
    """y = x W^T + b with W frozen in NF4. `kernel`: W dequantised by the NF4 kernels' one kernel
    (bit-identical to bitsandbytes'); the model sets it where those kernels run (GptOss.decode)."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_nf4: NF4Tensor | None = None
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.kernel = False

    def set_weight(self, weight: torch.Tensor, compute_dtype=torch.bfloat16):
        assert weight.shape == (self.out_features, self.in_features), weight.shape
        self.weight_nf4 = NF4Tensor(weight, compute_dtype)

    def forward(self, x):
        w = self.weight_nf4
        bias = None if self.bias is None else self.bias.to(w.dtype)
        return _NF4Matmul.apply(x.to(w.dtype), w, bias, self.kernel)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_nf4.dequantize()

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4"


def nf4_grouped_matmul(x, weights: list[NF4Tensor], counts, offsets, transpose=False, fast=None):
    """Rows of x sorted by expert times each expert's dequantised weight.

    `weights` holds the experts in groups (each an NF4 tensor (group, in, out)). With one group,
    the weights are dequantised in one call and multiplied in one grouped product, with no host
    sync; with several, at most one group exists in bf16 at a time, and the rows are sliced per
    group from the host-side `counts`.
    """
    def project(rows, w, sub_counts, sub_offsets):
        w = w.dequantize()
        return grouped_matmul(rows, w.transpose(1, 2) if transpose else w, sub_counts, sub_offsets)

    if len(weights) == 1:
        return project(x, weights[0], counts, offsets)
    if counts is None:
        counts = offsets.diff(prepend=offsets.new_zeros(1)).tolist()
    outs, start, e0 = [], 0, 0
    for w in weights:
        sub = counts[e0:e0 + w.shape[0]]
        n = sum(sub)
        if n:
            sub_offsets = torch.tensor(sub, device=x.device).cumsum(0).to(torch.int32)
            outs.append(project(x[start:start + n], w, None if use_grouped_kernel(x, fast) else sub, sub_offsets))
        start, e0 = start + n, e0 + w.shape[0]
    if not outs:
        return x.new_zeros(0, weights[0].shape[1 if transpose else 2])
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class _GroupedNF4(torch.autograd.Function):
    """nf4_grouped_matmul with a backward that dequantises again instead of keeping the weights."""

    @staticmethod
    def forward(ctx, x, weights, counts, offsets, fast):
        ctx.weights, ctx.counts, ctx.fast = weights, counts, fast
        ctx.save_for_backward(offsets)
        return nf4_grouped_matmul(x, weights, counts, offsets, fast=fast)

    @staticmethod
    def backward(ctx, dy):
        (offsets,) = ctx.saved_tensors
        dx = nf4_grouped_matmul(dy.contiguous(), ctx.weights, ctx.counts, offsets, transpose=True, fast=ctx.fast)
        return dx, None, None, None, None


class NF4Experts(Experts):
    """The experts of one layer with gate_up_proj and down_proj in NF4.

    Each matrix is quantised in groups of `group` experts (default: all, one tensor): one group is
    one dequantisation and one grouped product. Smaller groups bound the bf16 copy that exists at
    once, at the price of a host sync per projection.
    """

    def __init__(self, config, group: int | None = None):
        super().__init__(config)
        # the dense parameters are dropped; the biases stay (small, and kept in bf16/fp32)
        del self.gate_up_proj, self.down_proj
        self.group = group or self.num_experts
        self.nf4: dict[str, list[NF4Tensor]] = {}

    def set_weight(self, name: str, weight: torch.Tensor, compute_dtype=torch.bfloat16):
        """weight (experts, in, out), the dense layout."""
        self.nf4[name] = [NF4Tensor(weight[g:g + self.group], compute_dtype)
                          for g in range(0, self.num_experts, self.group)]

    def dequantized(self, name: str) -> torch.Tensor:
        return torch.cat([w.dequantize() for w in self.nf4[name]])

    def project(self, name, x, expert, counts, offsets, fast=None, add=None):
        ws = self.nf4[name]
        x, bias = x.to(ws[0].dtype), getattr(self, name + "_bias")
        if len(ws) == 1 and nf4_layer.kernels_run(x, fast):  # one kernel each way, no bf16 copy of the weights
            return nf4_layer.project(x, ws[0], offsets, bias, expert, gemm=dense_gemm.for_base(nf4_gemm, fast),
                                     add=add)
        y = _GroupedNF4.apply(x, ws, counts, offsets, fast) + bias[expert].to(x.dtype)
        return y if add is None else y + add.to(y.dtype)

    def forward(self, x, weights, idx, fast=None, padding=None):
        """Experts.forward; where the kernels run and the biases are frozen (LoRA's case), one fused layer."""
        out = self.fused_layer(x, weights, idx, fast, padding)
        return super().forward(x, weights, idx, fast) if out is None else out

    def fused_layer(self, x, weights, idx, fast, padding=None, lora=None):
        """The layer as one autograd function (nf4_layer.expert_layer) where the kernels run on one group
        and the biases are frozen, else None. lora(dtype): expert LoRA's factors in that dtype."""
        gate_up, down = self.nf4["gate_up_proj"], self.nf4["down_proj"]
        xc = x.to(gate_up[0].dtype)
        frozen = not (self.gate_up_proj_bias.requires_grad or self.down_proj_bias.requires_grad)
        if not (len(gate_up) == len(down) == 1 and frozen and nf4_layer.kernels_run(xc, fast)):
            return None
        gemm = dense_gemm.for_base(nf4_gemm, fast)
        factors = None if lora is None else lora(xc.dtype)
        return nf4_layer.expert_layer(xc, weights, idx, self, gate_up[0], down[0], gemm, padding, factors).to(x.dtype)


def nf4_bytes(model: nn.Module) -> int:
    """Bytes held by the NF4 weights of a model (codes and quantisation statistics)."""
    total = 0
    for m in model.modules():
        if isinstance(m, NF4Linear) and m.weight_nf4 is not None:
            total += m.weight_nf4.nbytes()
        elif isinstance(m, NF4Experts):
            total += sum(w.nbytes() for ws in m.nf4.values() for w in ws)
    return total
