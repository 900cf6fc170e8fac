"""Cross-entropy over a 201,088-word vocabulary without ever holding all the logits.

Only positions with a target are projected at all, a chunk of rows at a time, and never two chunks'
logits at once. With the head frozen (LoRA training), each chunk's gradient is formed while its
logits exist, in the forward; otherwise each chunk runs under activation checkpointing, so its
logits exist once in the forward and once, recomputed, in the backward.

`target_rows` picks the rows from the labels (where the labels live: on the CPU that costs the GPU
nothing); `cross_entropy_rows` takes them on the GPU and never looks at their values from the host,
so a CUDA graph can capture it. `chunked_cross_entropy` is the two together.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .fast.compiled import compilable

IGNORE = -100


def _chunk_loss(head, h, targets):
    logits = head(h).float()                                    # (chunk, vocab)
    return F.cross_entropy(logits, targets, reduction="sum")    # targets of -100 add nothing


@compilable
def softmax_minus_target(logits, targets):
    """One chunk's summed loss (float32) and its logits' gradient, softmax minus one-hot (zero for rows
    whose target is IGNORE), in the logits' dtype: logits (chunk, vocab), targets (chunk,).

    Plain, the float32 chain runs in place on one (chunk, vocab) copy. Compiled, it reads the bf16
    logits in four kernels (two reductions, two elementwise passes) and never writes them in float32:
    3.2 ms a 2,048-token step against ~4.3 (docs/BENCHMARKS.md, seventh session).
    """
    logits32 = logits.float()
    trained = (targets != IGNORE).float()[:, None]
    t = targets.clamp(min=0)[:, None]
    picked = logits32.gather(1, t)
    top = logits32.amax(dim=-1, keepdim=True)
    probs = logits32.sub_(top).exp_()                           # in place, as all that follows
    norm = probs.sum(dim=-1, keepdim=True)
    total = ((norm.log() + top - picked) * trained).sum()      # log-sum-exp minus the target's logit
    probs.div_(norm).scatter_add_(1, t, -trained).mul_(trained)   # softmax minus one-hot, if trained
    return total, probs.to(logits.dtype)


class _HeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of h @ W^T against targets, for a frozen head W: one pass over the logits.

    The only gradient is dL/dh = (softmax(logits) - onehot(target)) @ W. It is formed chunk by chunk
    in the forward, while each chunk's logits exist, and kept (rows x dim, small); the backward only
    scales it. The plain route keeps nothing and so projects every chunk twice more (recomputation
    and backward) across the 201,088-word vocabulary.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size: int, compiled: bool):
        total = h.new_zeros((), dtype=torch.float32)
        grad = torch.empty_like(h)
        for start in range(0, len(h), chunk_size):
            chunk = slice(start, start + chunk_size)
            logits = h[chunk] @ weight.T                                # (chunk, vocab): the one big tensor
            if not compiled:    # the float32 copy replaces the product, so the plain chain holds one of them
                logits = logits.float()
            loss, d_logits = softmax_minus_target(logits, targets[chunk], compiled=compiled)
            total += loss
            grad[chunk] = d_logits.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None, None, None


def target_rows(labels):
    """(rows, targets): the trained positions as rows of hidden[:, :-1].reshape(-1, dim), and their tokens.

    labels (batch, seq) are not shifted: position i predicts labels[i + 1]; -100 marks positions not
    trained. Both results are on the labels' device.
    """
    targets = labels[:, 1:].reshape(-1)
    rows = (targets != IGNORE).nonzero().squeeze(1)
    return rows, targets[rows]


def cross_entropy_rows(head, hidden, rows, targets, chunk_size: int = 256, compiled: bool = False):
    """Summed next-token loss (float32) of hidden (batch, seq, dim) at `rows`, against `targets`.

    rows and targets are on hidden's device. `head` maps (rows, dim) to logits (rows, vocab). A chunk
    of 256 rows of 201,088 logits is about 0.2 GB in float32: the frozen-head path holds one at a time
    (and its bf16 product while converting), the checkpointed path's cross-entropy three or four.
    compiled: the frozen head's softmax runs compiled (`softmax_minus_target`), on the bf16 logits, which
    are then held with their bf16 gradient and never copied to float32.
    """
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, rows)   # (targets, dim)
    frozen_head = type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad
    if torch.is_grad_enabled() and h.requires_grad and frozen_head:
        return _HeadCrossEntropy.apply(h, head.weight, targets, chunk_size, compiled)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(rows), chunk_size):
        chunk = slice(start, start + chunk_size)
        if torch.is_grad_enabled() and h.requires_grad:
            # nothing random in a chunk: no RNG state to save (a CUDA graph capture forbids reading it)
            total = total + checkpoint(_chunk_loss, head, h[chunk], targets[chunk], use_reentrant=False,
                                       preserve_rng_state=False)
        else:
            total = total + _chunk_loss(head, h[chunk], targets[chunk])
    return total


def chunked_cross_entropy(head, hidden, labels, chunk_size: int = 256, compiled: bool = False):
    """Summed next-token loss and the number of targets (a tensor on the labels' device).

    hidden (batch, seq, dim) are the final-norm states, labels (batch, seq) as `target_rows` takes them.
    """
    rows, targets = target_rows(labels)
    total = cross_entropy_rows(head, hidden, rows.to(hidden.device), targets.to(hidden.device), chunk_size, compiled)
    return total, torch.tensor(len(rows), device=labels.device)
