"""Flex attention with gpt-oss's sinks: the CUDA path of `model.attention.eager_attention`.

Flex attention never forms the score matrix and returns each row's log-sum-exp, through which the
sinks are folded in exactly. The mask is described block by block, never as a (t, t) tensor.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


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
