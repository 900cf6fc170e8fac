"""The rotary embedding as one Triton kernel each way (CUDA; Triton's interpreter on the CPU).

`model.rope.apply_rotary` rotates each head's two halves by the position's angle. Compiled by
torch.compile (with dynamic shapes) its forward ran at ~1.2 TB/s on q, a quarter of the H200's
bandwidth (docs/BENCHMARKS.md, round 2, seventh session: call 2's profile). Here a program takes one
token: it reads the token's cos and sin once and rotates every head in registers. The backward is the
same kernel with sin negated: out = (a c - b s, b c + a s) has the transposed Jacobian
(dy_a c + dy_b s, dy_b c - dy_a s). The arithmetic is float32, rounded once to x's dtype, as the
compiled chain's.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without Triton; model.rope's plain chain runs
    triton = None


if triton is not None:
    @triton.jit
    def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, seq, cos_batch_stride, heads,
                       INVERSE: tl.constexpr, HALF: tl.constexpr, HEADS: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)                         # (batch * seq) tokens, one a program
        at = (token // seq) * cos_batch_stride + (token % seq) * HALF   # cos and sin (batch or 1, seq, HALF)
        i = tl.arange(0, HALF)
        c = tl.load(cos_ptr + at + i).to(tl.float32)[None, :]
        s = tl.load(sin_ptr + at + i).to(tl.float32)[None, :]
        if INVERSE:
            s = -s
        h = tl.arange(0, HEADS)[:, None]
        ok = h < heads
        row = x_ptr + token * heads * 2 * HALF + h * 2 * HALF + i[None, :]
        a = tl.load(row, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(row + HALF, mask=ok, other=0.0).to(tl.float32)
        dst = out_ptr + token * heads * 2 * HALF + h * 2 * HALF + i[None, :]
        tl.store(dst, (a * c - b * s).to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(dst + HALF, (b * c + a * s).to(out_ptr.dtype.element_ty), mask=ok)


def rotate(x, cos, sin, inverse: bool = False):
    """x (batch, seq, heads, head_dim) rotated by cos, sin ((seq, head_dim/2) or (batch, seq, head_dim/2));
    `inverse`: by the opposite angle (the backward)."""
    b, t, heads, d = x.shape
    x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    assert cos.shape[-2:] == (t, d // 2) and cos.shape == sin.shape and d // 2 == triton.next_power_of_2(d // 2)
    out = torch.empty_like(x)
    _rotary_kernel[(b * t,)](x, cos, sin, out, t, t * (d // 2) if cos.dim() == 3 else 0, heads,
                             INVERSE=inverse, HALF=d // 2, HEADS=triton.next_power_of_2(heads), num_warps=4)
    return out


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return rotate(dy, cos, sin, inverse=True), None, None


def apply_rotary(x, cos, sin):
    """`model.rope.apply_rotary` through the kernel, both ways (cos and sin take no gradient)."""
    return _Rotary.apply(x, cos, sin)
