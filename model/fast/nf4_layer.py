"""The NF4 experts' fast path: the Triton kernels of model/fast/nf4_gemm.py as autograd functions.

MXFP4 experts (model/weights/mxfp4.py) take the same path with model/fast/mxfp4_gemm.py's kernels,
which have the same three functions: `gemm` names the module whose kernels read the weights, or its
dense twin (model/fast/dense_gemm.py: the layer dequantised, then torch._grouped_mm) where memory allows.

`project` is one expert projection, x @ W[e] (+ bias[e]), both ways from the 4-bit codes.
`expert_layer` is a whole layer of frozen NF4 experts (LoRA's case), from the routing to the weighted
sum, with a backward of its own that keeps only gate_up's output and skips down in gradient
checkpointing's recomputation; expert LoRA's low-rank terms ride in it (`lora`). Their plain twin is
`NF4Experts`' dequantise-then-multiply path.
"""
from __future__ import annotations

import torch

from . import dense_gemm, nf4_gemm
from .dense_gemm import outer, product
from .recompute import in_recomputation
from ..moe import skip_padding, sort_by_expert


def kernels_run(x, fast) -> bool:
    """Whether the NF4 kernels multiply x: where the gate allows them, in bf16 on CUDA (any dtype in
    Triton's interpreter on the CPU)."""
    return fast is not None and fast.nf4_kernels and (x.dtype == torch.bfloat16 or not x.is_cuda)


def project(x, w, offsets, bias, expert, gemm=nf4_gemm, add=None):
    """x @ W[e] + bias[e] (+ add) over expert-sorted rows; the kernel adds a frozen bias, a trained one
    is added here. add (rows, out): a term the kernel adds before rounding (expert LoRA's product)."""
    add = None if add is None else add.to(x.dtype).contiguous()
    if not bias.requires_grad:
        return _FusedNF4.apply(x.contiguous(), w, offsets, bias.to(x.dtype), gemm, add)
    y = _FusedNF4.apply(x.contiguous(), w, offsets, None, gemm, add)
    return y + bias[expert].to(y.dtype)


def expert_layer(x, weights, idx, layer, gate_up, down, gemm=nf4_gemm, padding=None, lora=None):
    """A layer of frozen experts, weights gate_up and down read by `gemm`'s kernels: x (tokens, hidden)
    in the weights' dtype -> (tokens, hidden). padding (tokens,) bool: tokens given no expert, whose
    output and gradients are zeros (a packed row's padding: no work spent on it). lora: expert LoRA's
    factors (A gate_up, B gate_up, A down, B down) in x's dtype, A (experts, in, rank), B (experts, rank,
    out) with the scaling in it, None for a matrix not adapted (lora/layers.py's LoRAExperts.factors)."""
    return _NF4ExpertLayer.apply(x, weights, idx, layer, gate_up, down, gemm, padding, *(lora or (None,) * 4))


class _FusedNF4(torch.autograd.Function):
    """x @ W[e] (+ bias[e], frozen) (+ add) with the dequantisation inside the product (nf4_gemm.py),
    both ways; add's gradient is the output's."""

    @staticmethod
    def forward(ctx, x, w, offsets, bias, gemm, add):
        ctx.w, ctx.gemm = w, gemm
        ctx.save_for_backward(offsets)
        return gemm.grouped_mm(x, w, offsets, bias, add=add)

    @staticmethod
    def backward(ctx, dy):
        (offsets,) = ctx.saved_tensors
        d_add = dy if ctx.needs_input_grad[5] else None
        return ctx.gemm.grouped_mm_t(dy.contiguous(), ctx.w, offsets), None, None, None, None, d_add


class _NF4ExpertLayer(torch.autograd.Function):
    """A layer's frozen NF4 experts, from the routing to the weighted sum, with a backward of its own.

    The backward keeps only gate_up's output y (as the unfused SwiGLU does): down's input gradient
    is w * (d_out @ W_down^T), and the routing weight's gradient <d_out, h @ W_down + b> splits into
    <d_out @ W_down^T, h> + <d_out, b> with h = SwiGLU(y) rebuilt from y. Nothing past gate_up is
    needed again, so in gradient checkpointing's recomputation (`recompute.in_recomputation`) down and the
    weighted sum are skipped: five NF4 products a checkpointed step instead of six (gate_up, with the
    SwiGLU in its epilogue, in the forward and the recomputation; down once; a transposed product
    each in the backward).

    Padding tokens get no expert (`moe.skip_padding`): their rows sort past the last offset, which
    no kernel reads or writes, so the buffers hold whatever was there; every result leaves this layer
    through a mask (output, input and routing gradients zero on those tokens), never through arithmetic
    on those rows that could carry a NaN out.

    Expert LoRA (a_gu, b_gu, a_d, b_d; `expert_layer`) adds (rows @ A[e]) @ B[e] to each adapted
    projection inside its product (the `add` term), so the layer keeps this shape: gate_up's output y
    and its rows' low-rank inner product u_gu (rows, rank) are kept, down is again skipped in the
    recomputation, and the backward adds the adapters' small products beside the frozen ones: down's
    input gradient gains (d_out @ B_d^T) @ A_d^T before the SwiGLU's backward (so the routing weight's
    gradient sees the adapted down), gate_up's (dy @ B_gu^T) @ A_gu^T. The adapters' own gradients are
    per-expert sums over rows (`outer`); down's read h = SwiGLU(y), rebuilt from y by the epilogue kernel.
    """

    @staticmethod
    def forward(ctx, x, weights, idx, layer, gate_up, down, gemm, padding, a_gu, b_gu, a_d, b_d):
        """x (tokens, hidden) in the weights' compute dtype, routing weights and indices (tokens, k)."""
        k = idx.shape[1]
        routed = skip_padding(idx, padding, layer.num_experts)
        order, _, _, offsets, inverse = sort_by_expert(routed, layer.num_experts)
        src = (order // k).to(torch.int32)        # each (token, expert) pair's token: the rows the kernels read
        keep = any(ctx.needs_input_grad[:2]) or any(ctx.needs_input_grad[8:])
        u_gu = None if a_gu is None else product(x[src], a_gu, offsets)       # (rows, rank)
        add = None if a_gu is None else product(u_gu, b_gu, offsets)
        # rows: (token, expert) pairs
        y, h = gemm.grouped_mm_swiglu(x.contiguous(), gate_up, offsets, layer.gate_up_proj_bias.to(x.dtype),
                                      layer.alpha, layer.limit, keep_y=keep, src=src, add=add)
        del add
        if keep:
            ctx.save_for_backward(y, weights, idx, order, src, offsets, inverse, padding,
                                  None if a_gu is None else x, u_gu, a_gu, b_gu, a_d, b_d)
            ctx.layer, ctx.matrices, ctx.gemm = layer, (gate_up, down), gemm
        if in_recomputation():
            # The recomputation wanted the saved tensors and stops once it has them; the block's last
            # saving op is this one, so the output is never used. NaN makes any misuse loud.
            return torch.full_like(x, float("nan"))
        add = None if a_d is None else product(product(h, a_d, offsets), b_d, offsets)
        out = gemm.grouped_mm(h, down, offsets, layer.down_proj_bias.to(x.dtype), add=add)
        del h, add
        return masked(nf4_gemm.sum_rows(out, inverse, k, weights), padding)

    @staticmethod
    def backward(ctx, d_out):
        y, weights, idx, order, src, offsets, inverse, padding, x, u_gu, *lora = ctx.saved_tensors
        a_gu, b_gu, a_d, b_d = lora
        layer, (n, k), gemm = ctx.layer, idx.shape, ctx.gemm
        gate_up, down = ctx.matrices
        w = weights.reshape(-1)[order]            # each row's routing weight
        d_out = d_out.contiguous()
        g = gemm.grouped_mm_t(d_out, down, offsets, src=src)   # d_out @ W_down^T, by (token, expert) row
        da_d = db_d = None
        if a_d is not None:                        # down's adapter: out += (h @ A_d) @ B_d, weighted by w
            rows = d_out[src]
            v = product(rows, b_d.transpose(1, 2), offsets)                      # (rows, rank)
            g += product(v, a_d.transpose(1, 2), offsets)
            h = dense_gemm.epilogue(y, offsets, None, None, (layer.alpha, layer.limit))
            wv = w[:, None].to(v.dtype)
            db_d = outer(product(h, a_d, offsets) * wv, rows, offsets)
            da_d = outer(h, v * wv, offsets)
            del rows, v, h
        dy, gh = nf4_gemm.mlp_backward(y, g, w, layer.alpha, layer.limit)
        del g                      # (each (rows, ...) buffer goes as soon as it is used: at 128k tokens each is GBs)
        dxs = gemm.grouped_mm_t(dy, gate_up, offsets)
        da_gu = db_gu = None
        if a_gu is not None:                       # gate_up's adapter: y += (x @ A_gu) @ B_gu
            v = product(dy, b_gu.transpose(1, 2), offsets)
            dxs += product(v, a_gu.transpose(1, 2), offsets)
            db_gu, da_gu = outer(u_gu, dy, offsets), outer(x[src], v, offsets)
            del v
        del dy
        # each token's k rows summed in (token, slot) order: no atomics
        dx = masked(nf4_gemm.sum_rows(dxs, inverse, k), padding)
        dw = masked(gh[inverse].view(n, k) + (d_out.float() @ layer.down_proj_bias.float().T).gather(1, idx), padding)
        return dx, dw.to(weights.dtype), None, None, None, None, None, None, da_gu, db_gu, da_d, db_d


def masked(t, padding):
    """t (tokens, ...) with the padding tokens' values replaced by zeros (not multiplied: they may be NaN)."""
    return t if padding is None else t.masked_fill(padding[:, None], 0)
