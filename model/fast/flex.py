"""Flex attention with gpt-oss's sinks: the CUDA path of `model.attention.eager_attention`.

Flex attention never forms the score matrix and returns each row's log-sum-exp, through which the
sinks are folded in exactly. The mask is described block by block, never as a (t, t) tensor.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .compiled import compilable


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
    (num, idx), (full_num, full_idx) = _listing(some & ~every), _listing(every)
    return BlockMask.from_kv_blocks(num[None, None], idx[None, None], full_num[None, None], full_idx[None, None],
                                    BLOCK_SIZE=BLOCK, mask_mod=_mask_mod(window), seq_lengths=(t, t))


def _document_mask_mod(doc_ids, window: int | None):
    """`_mask_mod(window)` within each document of doc_ids (batch, padded seq).

    Built afresh per call from one code object: flex lifts the tensors a mask_mod closes over as
    inputs (torch's BlockMask flattens its closure), so new doc ids need no new compile, and under a
    CUDA graph doc_ids is memory of the graph's own, refilled by each replay.
    """
    causal = _mask_mod(window)

    def visible(b, h, qi, ki):
        return causal(b, h, qi, ki) & (doc_ids[b, qi] == doc_ids[b, ki])
    return visible


def document_blocks(doc_ids, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`visible_blocks` of packed rows: (batch, n, n) blocks with some, and with all, pairs visible.

    doc_ids (batch, t), t a multiple of BLOCK, never decrease along a row (documents lie end to end),
    so a block's documents run from its first token's to its last token's. From those alone, on the
    device and without a (t, t) mask: a key block before the query block shares a document with it
    iff its last document is the query block's first; the closest pair of that document is then
    (the key block's last token, the query block's first), which the window must reach. A block is
    all visible iff both blocks are one and the same document and the positions allow every pair.
    """
    b, t = doc_ids.shape
    some, every = visible_blocks(t, window, doc_ids.device)              # (n, n): the positions alone
    first, last = doc_ids[:, ::BLOCK], doc_ids[:, BLOCK - 1::BLOCK]      # (b, n) each
    q_first, q_last = first[:, :, None], last[:, :, None]                # query blocks down
    k_first, k_last = first[:, None, :], last[:, None, :]                # key blocks across
    n = t // BLOCK
    diagonal = torch.eye(n, dtype=torch.bool, device=doc_ids.device)
    some = some & ((k_last == q_first) | diagonal)
    every = every & (k_first == k_last) & (k_last == q_first) & (q_first == q_last)
    return some, every


def _listing(m):
    """Per query block: how many key blocks, and their indices first (stable), as BlockMask takes them."""
    order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True)
    return m.sum(-1).to(torch.int32), order.to(torch.int32)


def document_block_mask(doc_ids, window: int | None):
    """The BlockMask of packed rows, doc_ids (batch, t) with t a multiple of BLOCK: see `document_blocks`.

    All on doc_ids' device with no host sync, so a CUDA graph may capture it (and recompute it from
    the graph's doc ids at each replay).
    """
    from torch.nn.attention.flex_attention import BlockMask

    t = doc_ids.shape[1]
    some, every = document_blocks(doc_ids, window)
    num, idx = _listing(some & ~every)
    full_num, full_idx = _listing(every)
    return BlockMask.from_kv_blocks(num[:, None], idx[:, None], full_num[:, None], full_idx[:, None],
                                    BLOCK_SIZE=BLOCK, mask_mod=_document_mask_mod(doc_ids, window),
                                    seq_lengths=(t, t))


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    # Each variant compiles once: causal or windowed, with or without grad, each dtype, and a second
    # length (then dynamic). A run that trains, evaluates and checks passes dynamo's default limit of
    # 8, past which flex silently falls back to an implementation that forms the full score matrix.
    limit = torch._dynamo.config
    limit.recompile_limit = max(limit.recompile_limit, 64)
    return torch.compile(flex_attention)


def flex_attention_with_sinks(q, k, v, sinks, window: int | None, doc_ids=None, compiled: bool = False):
    """Same function as `eager_attention`, through flex attention (CUDA); doc_ids as it takes them.

    With L the row's log-sum-exp over the keys, adding a sink s gives softmax weights scaled by
    exp(L) / (exp(L) + exp(s)) = sigmoid(L - s), so the output is the sink-free output times that
    (`sink_scaled`, compiled into one kernel each way where `compiled`).
    """
    b, t = q.shape[:2]
    # Pad the length to a multiple of flex's 128-row blocks: few distinct shapes to compile, and
    # padded keys sit after every real query, so the causal mask already hides them. A length
    # already a multiple (packed rows always are) is not padded: a pad copies q, k and v, 0.6 GiB
    # at 65,536 tokens, beside the originals, which the caller still holds.
    tp = -(-t // BLOCK) * BLOCK
    if tp != t:
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, tp - t)) for x in (q, k, v))
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))                   # (b, heads, tp, d), views
    if doc_ids is None:
        mask = _block_mask(tp, window, str(q.device))
    else:  # the padded keys and queries are one more document, after the row's last
        doc_ids = torch.cat([doc_ids, (doc_ids[:, -1:] + 1).expand(b, tp - t)], dim=1)   # (b, tp)
        mask = document_block_mask(doc_ids, window)
    out, lse = _compiled_flex()(q, k, v, block_mask=mask, enable_gqa=True, return_lse=True)
    # flex lays its output out as q is, (b, tp, h, d) in memory: taken in that order, the result is
    # contiguous as o_proj's reshape wants it, and nothing is copied
    return sink_scaled(out.transpose(1, 2), lse.transpose(1, 2), sinks, compiled=compiled)[:, :t]


@compilable
def sink_scaled(out, lse, sinks):
    """out (b, t, heads, d) times sigmoid(lse - sink) (lse (b, t, heads) float32, a sink per head)."""
    scale = torch.sigmoid(lse - sinks.float())          # (b, t, heads), float32
    return out * scale.unsqueeze(-1).to(out.dtype)
