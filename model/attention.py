"""Grouped-query attention with learned sinks, causal, with a sliding window on alternate layers.

`eager_attention` is the plain twin a reader learns from: it forms the full score matrix.
`flex_attention_with_sinks` is the CUDA path: flex attention never forms the score matrix and
returns each row's log-sum-exp, through which the sinks are folded in exactly.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GptOssConfig
from .rope import apply_rotary


def eager_attention(q, k, v, sinks, window: int | None):
    """q (batch, seq, heads, d), k and v (batch, seq, kv_heads, d), sinks (heads,) -> (batch, seq, heads, d).

    Query i sees keys j with j <= i and, on sliding layers, i - window < j (the last `window` tokens).
    Each head's sink is one more logit in the softmax whose probability is thrown away.
    """
    b, t, h, d = q.shape
    group = h // k.shape[2]
    q = q.transpose(1, 2)                                      # (b, h, t, d)
    k = k.transpose(1, 2).repeat_interleave(group, dim=1)      # (b, h, t, d)
    v = v.transpose(1, 2).repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * d ** -0.5             # (b, h, t, t)
    i = torch.arange(t, device=q.device)
    visible = i[:, None] >= i[None, :]
    if window is not None:
        visible &= i[:, None] - i[None, :] < window
    scores = scores.masked_fill(~visible, float("-inf"))
    sink = sinks.to(scores.dtype).view(1, h, 1, 1).expand(b, h, t, 1)
    logits = torch.cat([scores, sink], dim=-1)
    logits = logits - logits.amax(dim=-1, keepdim=True)        # bf16-safe
    probs = logits.softmax(dim=-1)[..., :-1]                   # drop the sink's share
    return (probs.to(v.dtype) @ v).transpose(1, 2)             # (b, t, h, d)


@functools.lru_cache(maxsize=8)
def _mask_mod(window: int | None):
    # one function object per window, whatever the length: compiled flex guards on its identity
    if window is None:
        def visible(b, h, qi, ki):
            return qi >= ki
    else:
        def visible(b, h, qi, ki):
            return (qi >= ki) & (qi - ki < window)
    return visible


BLOCK = 128  # flex attention's tile: the mask is described block by block


def visible_blocks(t: int, window: int | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Which (query block, key block) pairs hold some visible and all visible pairs, (t/128, t/128).

    Worked out from the blocks' first and last positions, never from a (t, t) mask: at 64k tokens
    that mask alone is 4 GB.
    """
    n = t // BLOCK
    blk = torch.arange(n, device=device)
    q0, q1 = blk[:, None] * BLOCK, blk[:, None] * BLOCK + BLOCK - 1      # first and last query
    k0, k1 = blk[None, :] * BLOCK, blk[None, :] * BLOCK + BLOCK - 1      # first and last key
    some, every = k0 <= q1, k1 <= q0                                     # causal: key <= query
    if window is not None:                                               # and query - key < window
        some &= q0 - k1 < window
        every &= q1 - k0 < window
    return some, every


# Kept for good, never evicted: a CUDA graph replays reads of the masks its capture used. One per
# padded length and window: kilobytes at training lengths, ~16 MB at the model's 131,072 tokens.
@functools.lru_cache(maxsize=None)
def _block_mask(t: int, window: int | None, device: str):
    from torch.nn.attention.flex_attention import BlockMask

    some, every = visible_blocks(t, window, device)
    partial = some & ~every

    def listing(m):  # per query block: how many key blocks, and their indices first
        order = torch.argsort((~m).to(torch.int8), dim=1, stable=True)
        return m.sum(1).to(torch.int32)[None, None], order.to(torch.int32)[None, None]

    num, idx = listing(partial)
    full_num, full_idx = listing(every)
    return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=BLOCK,
                                    mask_mod=_mask_mod(window), seq_lengths=(t, t))


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    # Each variant compiles once: causal or windowed, with or without grad, each dtype, and a second
    # length (then dynamic). A run that trains, evaluates and checks passes dynamo's default limit of
    # 8, past which flex silently falls back to an implementation that forms the full score matrix.
    limit = torch._dynamo.config
    limit.recompile_limit = max(limit.recompile_limit, 64)
    return torch.compile(flex_attention)


def flex_attention_with_sinks(q, k, v, sinks, window: int | None):
    """Same function as `eager_attention`, through flex attention (CUDA).

    With L the row's log-sum-exp over the keys, adding a sink s gives softmax weights scaled by
    exp(L) / (exp(L) + exp(s)) = sigmoid(L - s), so the output is the sink-free output times that.
    """
    b, t, h, d = q.shape
    # Pad the length to a multiple of flex's 128-row blocks: few distinct shapes to compile, and
    # padded keys sit after every real query, so the causal mask already hides them.
    tp = -(-t // BLOCK) * BLOCK
    q, k, v = (F.pad(x, (0, 0, 0, 0, 0, tp - t)).transpose(1, 2) for x in (q, k, v))  # (b, heads, tp, d)
    mask = _block_mask(tp, window, str(q.device))
    out, lse = _compiled_flex()(q, k, v, block_mask=mask, enable_gqa=True, return_lse=True)
    scale = torch.sigmoid(lse - sinks.float().view(1, h, 1))   # (b, h, tp), float32
    return (out * scale.unsqueeze(-1).to(out.dtype)).transpose(1, 2)[:, :t]


class Attention(nn.Module):
    def __init__(self, config: GptOssConfig, layer_idx: int):
        super().__init__()
        c = config
        self.head_dim, self.n_heads, self.n_kv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)
        self.sinks = nn.Parameter(torch.zeros(c.num_attention_heads))
        sliding = c.layer_types[layer_idx] == "sliding_attention"
        self.window = c.sliding_window if sliding else None

    def forward(self, x, cos, sin, impl: str = "eager"):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attend = flex_attention_with_sinks if impl == "flex" else eager_attention
        out = attend(q, k, v, self.sinks, self.window)          # (b, t, heads, head_dim)
        return self.o_proj(out.reshape(b, t, self.n_heads * self.head_dim))
