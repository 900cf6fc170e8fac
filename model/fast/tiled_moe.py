"""The expert MLP of a long sequence, a tile of tokens at a time, forward and backward.

A layer's experts work on tokens x k rows: at 131,072 tokens gate_up's output alone is 5.6 GiB, and
the backward holds several such buffers. Each token's output depends on its own row only, so the
layer can run a tile of tokens at a time. `tiled_experts` does that and keeps only its inputs
(the experts' input, the routing weights and indices): the backward recomputes each tile's forward
and takes that tile's gradients before the next, so the intermediates are bounded by the tile, not
the sequence. In gradient checkpointing's recomputation of the block (`recompute.in_recomputation`)
it does nothing but keep its inputs again: the backward recomputes the tiles itself.

Exact: each token's sum over its k experts is the same; the products run on fewer rows at once, so
only the order of a weight gradient's sum over tiles differs (tiles are added in order).
"""
from __future__ import annotations

import torch

from .recompute import in_recomputation, recomputation

# Above this many tokens a layer's experts run in tiles of this many (at 8,192 tokens x top-4 x
# 5,760 gate_up's output is 360 MiB); at and below it, one call as before, at no cost.
TILE_TOKENS = 8192


def tiles(tokens: int, tile: int | None) -> list[slice] | None:
    """The token ranges of each tile, or None where the layer runs whole (tokens <= tile, or tile None)."""
    if tile is None or tokens <= tile:
        return None
    return [slice(start, min(start + tile, tokens)) for start in range(0, tokens, tile)]


def tiled_experts(experts, x, weights, idx, fast, tile: int):
    """`experts(x, weights, idx, fast)` a tile of tokens at a time: x (tokens, hidden), weights and
    idx (tokens, k) -> (tokens, hidden). The experts' trainable parameters (LoRA) get their gradients
    through this function too."""
    params = [p for p in experts.parameters() if p.requires_grad]
    return _TiledExperts.apply(x, weights, idx, experts, fast, tile, *params)


def draws_random(module) -> bool:
    """Whether the module's forward draws random numbers (dropout in training)."""
    return module.training and any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in module.modules())


def rng_state(device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(state, device):
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


class _TiledExperts(torch.autograd.Function):
    """Keeps (x, weights, idx); the backward recomputes one tile and takes its gradients, tile by tile."""

    @staticmethod
    def forward(ctx, x, weights, idx, experts, fast, tile, *params):
        ctx.save_for_backward(x, weights, idx)
        ctx.experts, ctx.fast, ctx.tile, ctx.n_params = experts, fast, tile, len(params)
        if in_recomputation():
            # the block's recomputation only wanted the saved inputs (this is the block's last op that
            # saves any); the output is never used. NaN makes any misuse loud.
            return torch.full_like(x, float("nan"))
        # dropout (on expert LoRA) draws a mask per tile: the backward replays each tile's RNG state
        ctx.rng = [] if draws_random(experts) else None
        out = torch.empty_like(x)                                   # (tokens, hidden)
        for s in tiles(len(x), tile):
            if ctx.rng is not None:
                ctx.rng.append(rng_state(x.device))
            out[s] = experts(x[s], weights[s], idx[s], fast)
        return out

    @staticmethod
    def backward(ctx, d_out):
        x, weights, idx = ctx.saved_tensors
        experts = ctx.experts
        params = [p for p in experts.parameters() if p.requires_grad]
        assert len(params) == ctx.n_params, "the experts' trainable parameters changed between forward and backward"
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx = torch.zeros_like(x) if want_x else None
        dw = torch.zeros_like(weights) if want_w else None
        d_params = [None] * len(params)
        for j, s in enumerate(tiles(len(x), ctx.tile)):
            xs = x[s].detach().requires_grad_(want_x)
            ws = weights[s].detach().requires_grad_(want_w)
            inputs = [t for t, wanted in ((xs, want_x), (ws, want_w)) if wanted] + params
            # marked as a recomputation: an NF4 expert layer keeps what its backward needs and skips
            # the rest of its forward (model/fast/nf4_layer.py), as in the block's recomputation
            devices = [x.device] if x.is_cuda else []
            with torch.random.fork_rng(devices, enabled=ctx.rng is not None), torch.enable_grad(), recomputation():
                if ctx.rng is not None:
                    set_rng_state(ctx.rng[j], x.device)
                out = experts(xs, ws, idx[s], ctx.fast)
            grads = list(torch.autograd.grad(out, inputs, d_out[s], allow_unused=True))
            del out
            if want_x:
                g = grads.pop(0)
                if g is not None:
                    dx[s] = g
            if want_w:
                g = grads.pop(0)
                if g is not None:
                    dw[s] = g
            for i, g in enumerate(grads):                          # summed over tiles, in order
                if g is not None:
                    d_params[i] = g if d_params[i] is None else d_params[i].add_(g)
        return (dx, dw, None, None, None, None, *d_params)
