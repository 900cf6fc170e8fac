"""The mixture of experts: a top-k router and clamped SwiGLU experts.

`moe_reference` is the plain twin (a loop over experts, each on its own tokens). `Experts.forward`
is the path used everywhere: the (token, expert) pairs are sorted by expert once, and each of the
two projections is one grouped matrix product over all experts (`torch._grouped_mm` where the gate,
model/fast/gate.py, allows it; a loop over experts otherwise).

Every sum here runs in a fixed order: each token's k expert outputs are gathered back into
(token, slot) order and summed, never scattered with atomic adds, so a run is bit-reproducible.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GptOssConfig
from .fast.compiled import compilable
from .fast.tiled_moe import TILE_TOKENS, tiled_experts, tiles


EXPERT_MATRICES = ("gate_up_proj", "down_proj")  # the experts' weights, as the hub names them


class Router(nn.Module):
    def __init__(self, config: GptOssConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.zeros(config.num_local_experts, config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(config.num_local_experts))

    def logits(self, x):
        return F.linear(x, self.weight, self.bias)              # (tokens, experts)

    def forward(self, x):
        """x (tokens, hidden) -> routing weights (tokens, k) and expert indices (tokens, k)."""
        top, idx = torch.topk(self.logits(x), self.top_k, dim=-1)
        return top.softmax(dim=-1), idx                         # softmax over the k chosen only


def swiglu_reference(gate_up, alpha: float, limit: float):
    """gpt-oss's clamped SwiGLU; gate and up are interleaved along the last dim (even, odd)."""
    gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return (up + 1) * gate * torch.sigmoid(alpha * gate)


def _clamp_passes_at_bound() -> bool:
    """Whether the installed torch's clamp passes the gradient at a bound (torch < 2.14: yes; 2.14: no).

    A value can sit exactly on the bound (7.0 is a bf16 value), and the SwiGLU backward follows the
    installed torch there, so it equals autograd's, and transformers', gradient on every version.
    """
    x = torch.ones((), requires_grad=True)
    (grad,) = torch.autograd.grad(x.clamp(max=1.0), x)
    return bool(grad == 1)


CLAMP_PASSES_AT_BOUND = _clamp_passes_at_bound()


def _within(x, low, high):
    """Where clamp(x, low, high) passes the gradient (either bound may be None)."""
    inside = torch.ones_like(x, dtype=torch.bool)
    if CLAMP_PASSES_AT_BOUND:
        inside = inside if low is None else inside & (x >= low)
        return inside if high is None else inside & (x <= high)
    inside = inside if low is None else inside & (x > low)
    return inside if high is None else inside & (x < high)


def swiglu_backward(gate_up, dh, alpha: float, limit: float):
    """The gradient of `swiglu_reference`'s input from its output's gradient dh."""
    gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
    g, u = gate.clamp(max=limit), up.clamp(-limit, limit)
    s = torch.sigmoid(alpha * g)
    d_gate = dh * (u + 1) * s * (1 + alpha * g * (1 - s)) * _within(gate, None, limit)
    d_up = dh * g * s * _within(up, -limit, limit)
    return torch.stack((d_gate, d_up), dim=-1).flatten(-2)


class _SwiGLU(torch.autograd.Function):
    """`swiglu_reference` with a hand-written backward that keeps only its input.

    Autograd would keep five intermediates of (rows, inter) each; at 64k tokens x top-4 each is
    1.5 GB, so recomputing them in the backward is what lets long sequences fit.
    """

    @staticmethod
    def forward(ctx, gate_up, alpha, limit):
        ctx.save_for_backward(gate_up)
        ctx.alpha, ctx.limit = alpha, limit
        return swiglu_reference(gate_up, alpha, limit)

    @staticmethod
    def backward(ctx, dy):
        (gate_up,) = ctx.saved_tensors
        return swiglu_backward(gate_up, dy, ctx.alpha, ctx.limit), None, None


@compilable
def swiglu(gate_up, alpha: float, limit: float):
    return _SwiGLU.apply(gate_up, alpha, limit)


def expert_mlp_backward(gate_up, g, w, alpha: float, limit: float):
    """The expert MLP's backward past down, for out = w * (SwiGLU(gate_up) @ W_down + b) per row.

    g = d_out @ W_down^T (unweighted), w the rows' routing weights. Returns the gradient of gate_up
    and each row's <g, h>, h = SwiGLU(gate_up) rebuilt here: the part of the routing weight's
    gradient <d_out, h @ W_down + b> that comes through W_down. The fused expert layer runs it as one
    kernel (nf4_gemm.mlp_backward); this is its definition, which the tests hold the kernel to.
    """
    h = swiglu_reference(gate_up, alpha, limit)
    gh = (g.float() * h.float()).sum(-1)
    return swiglu_backward(gate_up, g * w[:, None].to(g.dtype), alpha, limit), gh


def sort_by_expert(idx, num_experts: int):
    """(tokens, k) expert indices -> the (token, expert) pairs sorted by expert, all on idx's device:
    order (indices into idx.reshape(-1), stable), each sorted pair's expert, the pairs per expert
    (int64), their running total (int32, the grouped kernels' offsets), and the inverse permutation
    (sorted rows back to (token, slot) order).

    An index of num_experts means no expert (`skip_padding`): such pairs sort last, past the last
    offset, where the grouped kernels neither read nor write."""
    flat = idx.reshape(-1)
    # sorted as int16 (any expert count fits): a radix sort's passes go with the key's bytes, and a
    # stable sort of the same values gives the same order
    order = torch.argsort(flat.to(torch.int16), stable=True)
    # (bincount would read the largest index back to the host: a sync per layer)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=idx.device).index_add_(
        0, flat, torch.ones_like(flat))[:num_experts]
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))
    return order, flat[order], counts, counts.cumsum(0).to(torch.int32), inverse


def skip_padding(idx, padding, num_experts: int):
    """idx with the padding tokens' experts replaced by num_experts, "no expert" to sort_by_expert.

    The fused layer (model/fast/nf4_layer.py) then spends nothing on a packed row's padding; what its
    kernels leave unwritten for those rows is masked out of every result."""
    return idx if padding is None else idx.masked_fill(padding[:, None], num_experts)


def sum_per_token(rows, inverse, k: int):
    """Rows (tokens*k, dim) in sort_by_expert's order -> each token's k rows summed, (tokens, dim).

    Gathered back into (token, slot) order and summed over the slots: a fixed order, no atomics.
    """
    return rows[inverse].view(-1, k, rows.shape[-1]).sum(1)


def weighted_sum(y, weights, inverse, x):
    """Each token's expert outputs weighted by its routing weights and summed: y (tokens*k, hidden) in
    sort_by_expert's order, weights (tokens, k) -> (tokens, hidden) like x."""
    k = weights.shape[1]
    rows = y[inverse].view(-1, k, y.shape[-1])                 # (tokens, k, hidden): (token, slot) order
    return (rows * weights[..., None].to(y.dtype)).sum(1).to(x.dtype)


class _PairRows(torch.autograd.Function):
    """x[order // k]: each token's row once per chosen expert, in sorted order. The backward sums each
    token's k row gradients in a fixed order (autograd's own would scatter them with atomic adds)."""

    @staticmethod
    def forward(ctx, x, order, inverse, k: int):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x[order // k]

    @staticmethod
    def backward(ctx, dy):
        (inverse,) = ctx.saved_tensors
        return sum_per_token(dy, inverse, ctx.k), None, None, None


def pair_rows(x, order, inverse, k: int):
    return _PairRows.apply(x, order, inverse, k)


def use_grouped_kernel(x, fast) -> bool:
    """Whether torch._grouped_mm multiplies these rows: where the gate allows it, on CUDA, in bf16."""
    return fast is not None and fast.grouped_mm and x.is_cuda and x.dtype == torch.bfloat16


def grouped_matmul(x, w, counts: list[int] | None, offsets):
    """Rows of x (sorted by expert, counts[e] rows for expert e) times w[e] (experts, in, out).

    With counts None one grouped kernel does all experts (offsets: cumulative counts, int32);
    otherwise a loop over experts (never over tokens) is the plain equivalent.
    """
    if counts is None:
        return torch._grouped_mm(x, w, offs=offsets)
    outs = [xe @ w[e] for e, xe in enumerate(x.split(counts)) if counts[e]]
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[-1])


class Experts(nn.Module):
    """All experts of one layer: gate_up_proj (experts, hidden, 2*inter), down_proj (experts, inter, hidden).

    The layout is the hub's (input dim first, y = x @ W). `gate_up` and `down` are the two projections
    over expert-sorted rows; the NF4 and MXFP4 storages replace `project`, LoRA wraps them, and all keep `forward`.
    """

    def __init__(self, config: GptOssConfig):
        super().__init__()
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.num_experts, self.alpha, self.limit = e, config.swiglu_alpha, config.swiglu_limit
        self.gate_up_proj = nn.Parameter(torch.zeros(e, h, 2 * i))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(e, 2 * i))
        self.down_proj = nn.Parameter(torch.zeros(e, i, h))
        self.down_proj_bias = nn.Parameter(torch.zeros(e, h))

    def project(self, name: str, x, expert, counts, offsets, fast=None, add=None):
        """x @ W[e] + bias[e] (+ add, rows by out) for matrix `name` (gate_up_proj or down_proj) over
        expert-sorted rows; the NF4 and MXFP4 storages override this one method (their kernels add
        `add`, expert LoRA's product, before rounding)."""
        y = grouped_matmul(x, getattr(self, name), counts, offsets) + getattr(self, name + "_bias")[expert]
        return y if add is None else y + add.to(y.dtype)

    def gate_up(self, x, expert, counts, offsets, fast=None, add=None):
        return self.project("gate_up_proj", x, expert, counts, offsets, fast, add)

    def down(self, x, expert, counts, offsets, fast=None, add=None):
        return self.project("down_proj", x, expert, counts, offsets, fast, add)

    def forward(self, x, weights, idx, fast=None, padding=None):
        """x (tokens, hidden), routing weights and indices (tokens, k) -> (tokens, hidden).

        fast: the gate's FastPaths (None: the plain path). padding (tokens,) bool: tokens whose output
        is never used; the NF4 and MXFP4 fused layers skip them, this path computes them as any."""
        n, k = idx.shape
        order, expert, counts_t, offsets, inverse = sort_by_expert(idx, self.num_experts)   # (tokens*k,) pairs
        # the loop needs the counts on the host; the grouped kernel does not (no device sync)
        counts = None if use_grouped_kernel(x, fast) else counts_t.tolist()
        compiled = fast is not None and fast.compiled
        gate_up = self.gate_up(pair_rows(x, order, inverse, k), expert, counts, offsets, fast)
        h = swiglu(gate_up, self.alpha, self.limit, compiled=compiled)
        y = self.down(h, expert, counts, offsets, fast)         # (tokens*k, hidden)
        return weighted_sum(y, weights, inverse, x)


class MLP(nn.Module):
    def __init__(self, config: GptOssConfig):
        super().__init__()
        self.router = Router(config)
        self.experts = Experts(config)
        self.tile = TILE_TOKENS   # above this many tokens the experts run a tile at a time (model/fast/tiled_moe.py)

    def forward(self, x, fast=None, padding=None):
        """x (batch, seq, hidden); padding (batch, seq) bool or None: tokens the experts may skip
        (`Experts.forward`)."""
        b, t, d = x.shape
        flat = x.reshape(-1, d)
        weights, idx = self.router(flat)
        if tiles(len(flat), self.tile):   # a long sequence: intermediates bounded by the tile
            return tiled_experts(self.experts, flat, weights, idx, fast, self.tile).view(b, t, d)
        padding = None if padding is None else padding.reshape(-1)
        return self.experts(flat, weights, idx, fast, padding).view(b, t, d)


def moe_reference(mlp: MLP, x):
    """The plain twin of `MLP.forward` on dense experts: each expert on its own tokens, one at a time."""
    b, t, d = x.shape
    flat = x.reshape(-1, d)
    weights, idx = mlp.router(flat)
    ex = mlp.experts
    out = torch.zeros_like(flat)
    for e in range(ex.num_experts):
        token, slot = torch.where(idx == e)
        if len(token) == 0:
            continue
        gu = flat[token] @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e]
        y = swiglu_reference(gu, ex.alpha, ex.limit) @ ex.down_proj[e] + ex.down_proj_bias[e]
        out.index_add_(0, token, (y * weights[token, slot, None]).to(flat.dtype))
    return out.view(b, t, d)
