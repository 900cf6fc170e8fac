"""Offloaded checkpoints (model/fast/offload.py) on the CPU: the copies go out and back, the blocks'
own inputs are let go, and every gradient is bit-identical to checkpointing without offloading."""
import pytest
import torch

from lora import inject, lora_parameters
from model.fast import gate, offload as offload_module
from model.fast.cuda_graph import graph_problem
from model.fast.offload import Offload, to_device, to_host
from test_lora import randomize


def test_the_copy_functions_give_the_same_values_in_new_memory():
    x = torch.randn(3, 5, 8)
    host = to_host(x, None)
    back, ready = to_device(host, x.device, None)
    assert torch.equal(host, x) and torch.equal(back, x) and ready is None
    assert host.data_ptr() != x.data_ptr() and back.data_ptr() != host.data_ptr()


def test_a_kept_input_is_handed_to_the_forward_then_fetched_back_as_a_leaf():
    offload = Offload("cpu")
    x = torch.randn(2, 4, requires_grad=True) * 2          # a non-leaf, as a block's input is
    first, second = offload.keep(x), offload.keep(x + 1)
    assert first.get() is x and first.gpu is None         # the forward's own tensor, then let go
    second.get()
    offload.forward_done()                                 # the last block's input starts back
    assert second.gpu is not None and first.gpu is None
    again = second.get()                                   # the recomputation: a copy, a leaf like x
    assert torch.equal(again, x + 1) and again.is_leaf and again.requires_grad
    assert first.gpu is not None                           # ... and the block before it is fetched
    assert torch.equal(first.get(), x)


@pytest.mark.parametrize("tile", [None, 8])
def test_offloaded_gradients_are_bit_identical_and_the_inputs_leave(tiny_model, monkeypatch, tile):
    """Also with the experts in tiles (model/fast/tiled_moe.py), as at long sequences."""
    for block in tiny_model.model.layers:
        block.mlp.tile = tile
    inject(tiny_model, targets=("q_proj", "v_proj", "experts"), rank=4, alpha=8)
    randomize(tiny_model)
    tiny_model.gradient_checkpointing = True
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(5))
    kept = []
    keep = offload_module.Offload.keep
    monkeypatch.setattr(offload_module.Offload, "keep", lambda self, x: kept.append(keep(self, x)) or kept[-1])
    grads = {}
    for offloaded in (False, True):
        tiny_model.offload_activations = offloaded
        tiny_model.zero_grad()
        loss = tiny_model.loss(ids, ids)
        if offloaded:   # after the forward: each block's input on the "host" only, but the last, fetched back
            assert len(kept) == tiny_model.config.num_hidden_layers
            assert all(k.gpu is None for k in kept[:-1]) and kept[-1].gpu is not None
        loss.backward()
        grads[offloaded] = (loss.detach(), {n: p.grad.clone() for n, p in lora_parameters(tiny_model)})
    assert torch.equal(grads[False][0], grads[True][0])
    for name, g in grads[False][1].items():
        assert g.abs().sum() > 0 and torch.equal(grads[True][1][name], g), name


def test_kept_blocks_are_not_offloaded(tiny_model, monkeypatch):
    """Offloading applies to the checkpointed blocks only; the kept ones hold their own activations."""
    inject(tiny_model, targets=("q_proj", "experts"), rank=4, alpha=8)
    randomize(tiny_model)
    tiny_model.gradient_checkpointing = tiny_model.offload_activations = True
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 15), generator=torch.Generator().manual_seed(6))
    kept = []
    keep = offload_module.Offload.keep
    monkeypatch.setattr(offload_module.Offload, "keep", lambda self, x: kept.append(keep(self, x)) or kept[-1])
    grads = []
    for n in (0, 3):
        kept.clear()
        tiny_model.kept_blocks = n
        tiny_model.zero_grad()
        tiny_model.loss(ids, ids).backward()
        assert len(kept) == tiny_model.config.num_hidden_layers - n
        grads.append([p.grad.clone() for _, p in lora_parameters(tiny_model)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_offloading_without_checkpointing_or_gradients_does_nothing(tiny_model, monkeypatch):
    made = []
    monkeypatch.setattr(offload_module.Offload, "__init__", lambda self, device: made.append(device))
    tiny_model.offload_activations = True
    ids = torch.randint(0, tiny_model.config.vocab_size, (1, 9))
    tiny_model.loss(ids, ids).backward()                   # not checkpointing: nothing to offload
    tiny_model.gradient_checkpointing = True
    with torch.no_grad():
        tiny_model.loss(ids, ids)
    assert not made


def test_offloading_rules_out_cuda_graphs(tiny_model):
    inject(tiny_model, targets=("q_proj",), rank=4, alpha=8)
    tiny_model.gradient_checkpointing = tiny_model.offload_activations = True
    assert "offloaded to host memory" in graph_problem(tiny_model, gate.decide("cpu"))
