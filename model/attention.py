"""Grouped-query attention with learned sinks, causal, with a sliding window on alternate layers.

`eager_attention` is the plain twin a reader learns from: it forms the full score matrix. The fast
path, flex attention with the sinks folded in through its log-sum-exp, is model/fast/flex.py.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import GptOssConfig
from .fast.flex import flex_attention_with_sinks
from .rope import apply_rotary


def eager_attention(q, k, v, sinks, window: int | None, doc_ids=None):
    """q (batch, seq, heads, d), k and v (batch, seq, kv_heads, d), sinks (heads,) -> (batch, seq, heads, d).

    Query i sees keys j with j <= i and, on sliding layers, i - window < j (the last `window` tokens).
    With doc_ids (batch, seq), a packed row, it sees only keys of its own document as well.
    Each head's sink is one more logit in the softmax whose probability is thrown away: every query
    row has its own, packed or not.
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
    if doc_ids is not None:                                     # (b, 1, t, t): same document only
        visible = visible & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    scores = scores.masked_fill(~visible, float("-inf"))
    sink = sinks.to(scores.dtype).view(1, h, 1, 1).expand(b, h, t, 1)
    logits = torch.cat([scores, sink], dim=-1)
    logits = logits - logits.amax(dim=-1, keepdim=True)        # bf16-safe
    probs = logits.softmax(dim=-1)[..., :-1]                   # drop the sink's share
    return (probs.to(v.dtype) @ v).transpose(1, 2)             # (b, t, h, d)


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

    def forward(self, x, cos, sin, flex: bool = False, compiled: bool = False, doc_ids=None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim)
        q, k = apply_rotary(q, cos, sin, compiled=compiled), apply_rotary(k, cos, sin, compiled=compiled)
        if flex:
            out = flex_attention_with_sinks(q, k, v, self.sinks, self.window, doc_ids, compiled=compiled)
        else:
            out = eager_attention(q, k, v, self.sinks, self.window, doc_ids)   # (b, t, heads, head_dim)
        return self.o_proj(out.reshape(b, t, self.n_heads * self.head_dim))
