"""Cross-entropy over a 201,088-word vocabulary without ever holding all the logits.

Only positions with a target are projected at all, a chunk of rows at a time; each chunk runs
under activation checkpointing, so its logits exist once in the forward and once, recomputed,
in the backward, and never for two chunks at once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def _chunk_loss(head, h, targets):
    logits = head(h).float()                                    # (chunk, vocab)
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_cross_entropy(head, hidden, labels, chunk_size: int = 256):
    """Summed next-token loss and the number of targets.

    hidden (batch, seq, dim) are the final-norm states, labels (batch, seq) the tokens to predict at
    each position, not shifted: position i predicts labels[i + 1]; -100 marks positions not trained.
    `head` maps (rows, dim) to logits (rows, vocab). A chunk of 256 rows of 201,088 logits is about
    0.2 GB in float32; the cross-entropy holds three or four such at once.

    The target rows are found where the labels live: labels left on the CPU cost the GPU no sync.
    """
    targets = labels[:, 1:].reshape(-1)
    keep = targets != IGNORE
    rows_kept = keep.nonzero().squeeze(1)                       # on labels' device
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, rows_kept.to(hidden.device))
    targets = targets[rows_kept].to(hidden.device)              # (targets, dim), (targets,)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk_size):
        rows = slice(start, start + chunk_size)
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_loss, head, h[rows], targets[rows], use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h[rows], targets[rows])
    return total, keep.sum()
