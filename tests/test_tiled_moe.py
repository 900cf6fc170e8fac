"""The experts of a long sequence a tile of tokens at a time (model/fast/tiled_moe.py): the same logits,
loss and gradients as the whole layer at once; the NF4 kernels' calls per tile; no tiling at or
below the tile size."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from lora import inject, lora_parameters
from model.fast import gate
from model.fast.recompute import mark_recomputation
from model.fast.tiled_moe import TILE_TOKENS, tiles
from test_lora import randomize
from test_nf4_gemm import count_calls, gemm, nf4_and_dense_experts, routed_tokens  # noqa: F401 (a fixture)

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "router", "experts")


def set_tile(model, tile):
    for block in model.model.layers:
        block.mlp.tile = tile


def test_tiles_only_above_the_tile_size():
    assert tiles(4096, TILE_TOKENS) is None and tiles(TILE_TOKENS, TILE_TOKENS) is None
    assert tiles(10, None) is None
    assert tiles(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert len(tiles(131072, TILE_TOKENS)) == 16


@pytest.mark.parametrize("dtype, checkpointing", [(torch.float32, False), (torch.float32, True),
                                                    (torch.float64, True)])
def test_tiled_equals_untiled_logits_loss_and_every_lora_gradient(tiny_model, dtype, checkpointing):
    """LoRA on attention, router and experts (their parameters pass through the tiled function);
    2 x 21 tokens in tiles of 8 (the last one partial). Each token's sum over its experts is the
    same; the expert LoRA weights' gradients are sums over tiles.

    Not bit-identical on the CPU: its BLAS takes another kernel for a product of fewer rows, so an
    expert's rows can differ in their last bit (4e-7 of 2.0 in one layer's output in float32), which
    the layers above carry on, to 1.3e-6 of the largest gradient of layer 0's q_proj. In float64 the
    same comparison is within 1e-12: the same math."""
    tiny_model.to(dtype)
    inject(tiny_model, targets=ALL, rank=4, alpha=8)
    randomize(tiny_model)
    tiny_model.to(dtype)
    tiny_model.gradient_checkpointing = checkpointing
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(3))
    results = {}
    for tile in (None, 8):
        set_tile(tiny_model, tile)
        tiny_model.zero_grad()
        with torch.no_grad():
            logits = tiny_model(ids)
        loss = tiny_model.loss(ids, ids)
        loss.backward()
        results[tile] = (logits, loss.detach(), {n: p.grad.clone() for n, p in lora_parameters(tiny_model)})
    (l1, loss1, g1), (l2, loss2, g2) = results[None], results[8]
    assert any("experts" in n for n in g1) and all(g.abs().sum() > 0 for g in g1.values())
    exact, grads = (1e-6, 1e-5) if dtype == torch.float32 else (1e-12, 1e-12)
    assert relative(l2, l1) < exact and relative(loss2, loss1) < exact
    for name in g1:
        assert relative(g2[name], g1[name]) < grads, (name, relative(g2[name], g1[name]))


def relative(a, b):
    """The largest difference, relative to the largest magnitude."""
    return float((a - b).abs().max() / b.abs().max())


def test_tiled_nf4_layer_recomputes_one_tile_at_a_time_and_keeps_gradients(gemm, monkeypatch):
    """The fused NF4 layer in tiles under the model's checkpointing: the block's recomputation runs no
    product at all; the backward recomputes gate_up per tile (down skipped) and takes its two
    transposed products: five products a tile, as the untiled layer has. Output and gradients: those
    of the whole layer without checkpointing, bit for bit."""
    from model.fast.tiled_moe import tiled_experts
    config, nf4, _ = nf4_and_dense_experts(seed=4)
    nf4.requires_grad_(False)
    x, weights, idx = routed_tokens(config, n=23)
    calls = count_calls(gemm, monkeypatch)
    fast = gate.decide("cpu")
    results = {}
    for tile in (None, 8):
        xi, wi = x.clone().requires_grad_(), weights.clone().requires_grad_()
        calls.clear()
        if tile is None:
            y = xi + nf4(xi, wi, idx, fast)
        else:   # the layer and a residual add, as in a block
            y = checkpoint(lambda a, b: a + tiled_experts(nf4, a, b, idx, fast, tile), xi, wi, use_reentrant=False,
                           context_fn=mark_recomputation)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results[tile] = (y.detach(), xi.grad, wi.grad, list(calls))
    forward = ["grouped_mm_swiglu", "grouped_mm"] * 3                    # 3 tiles: 8, 8, 7 tokens
    backward = ["grouped_mm_swiglu", "grouped_mm_t", "grouped_mm_t"] * 3
    assert results[8][3] == forward + backward, results[8][3]
    for a, b in zip(results[None][:3], results[8][:3]):
        assert torch.equal(a, b)     # each row's products are the same, however many rows a call has


def test_short_sequences_take_the_whole_layer_at_once(tiny_model, monkeypatch):
    """At or below the tile size nothing changes: the experts are called once, not through the tiles."""
    import model.fast.tiled_moe as tiled
    called = []
    monkeypatch.setattr(tiled._TiledExperts, "apply", lambda *a: called.append(1))
    mlp = tiny_model.model.layers[0].mlp
    mlp(torch.randn(1, TILE_TOKENS // 256, tiny_model.config.hidden_size))
    assert not called


def test_dropout_masks_are_replayed_tile_by_tile(tiny_model):
    """Expert LoRA with dropout: the backward's recomputation of each tile draws the tile's own masks
    again, so the gradients are those of plain autograd over the same tiles from the same seed."""
    from model.fast.tiled_moe import tiled_experts, tiles as spans
    inject(tiny_model, targets=("experts",), rank=4, alpha=8, dropout=0.3)
    randomize(tiny_model)
    tiny_model.train()
    mlp = tiny_model.model.layers[0].mlp
    x = torch.randn(37, tiny_model.config.hidden_size)
    weights, idx = mlp.router(x)
    weights = weights.detach()
    params = [p for p in mlp.experts.parameters() if p.requires_grad]
    dy = torch.randn(37, tiny_model.config.hidden_size)
    grads = []
    for tiled in (False, True):
        torch.manual_seed(11)
        xi = x.clone().requires_grad_()
        if tiled:
            y = tiled_experts(mlp.experts, xi, weights, idx, None, 8)
        else:   # plain autograd, tile by tile, drawing the masks in the same order
            y = torch.cat([mlp.experts(xi[s], weights[s], idx[s]) for s in spans(37, 8)])
        grads.append(torch.autograd.grad(y, [xi, *params], dy))
    assert torch.equal(grads[0][0], grads[1][0])           # each token's input gradient: its own tile's
    for a, b in zip(grads[0][1:], grads[1][1:]):          # the weights': tiles summed in another order
        assert relative(b, a) < 1e-6                       # (a mask drawn anew would differ by O(1))
