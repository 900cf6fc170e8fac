"""Checkpoint loading: the hub's layout (sharded safetensors), MXFP4 experts, NF4 storage, errors."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import hf_twin
from model import GptOss, GptOssConfig, load_model
from model.gpt_oss import hub_shapes
from model.weights.loading import CheckpointError
from model.weights.mxfp4 import FP4_VALUES, dequantize_mxfp4
from model.weights.nf4 import NF4Experts, NF4Linear, nf4_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- MXFP4 by hand
def test_every_e2m1_code_nibble_order_and_scale_bias():
    # byte (hi << 4) | lo holds element 2i in lo and 2i+1 in hi
    codes = torch.arange(16, dtype=torch.uint8)
    expected = [0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6]
    assert list(FP4_VALUES) == expected
    lo, hi = codes, codes.flip(0)
    blocks = torch.zeros(1, 2, 16, dtype=torch.uint8)
    blocks[0, 0] = lo | (hi << 4)
    blocks[0, 1] = lo | (hi << 4)
    scales = torch.tensor([[127, 129]], dtype=torch.uint8)  # 2^0 and 2^2
    out = dequantize_mxfp4(blocks, scales, torch.float32)[0]
    first = torch.tensor([v for pair in zip(expected, expected[::-1]) for v in pair])
    assert torch.equal(out[:32], first)
    assert torch.equal(out[32:], first * 4)
    tiny = dequantize_mxfp4(torch.full((1, 1, 16), 0x22, dtype=torch.uint8),
                            torch.tensor([[120]], dtype=torch.uint8), torch.float32)
    assert torch.equal(tiny, torch.full((1, 32), 2 ** -7))  # code 2 is 1.0, times 2^(120-127)


def quantize_mxfp4(w: torch.Tensor):
    """Test-side encoder: w (..., n) -> blocks (..., n/32, 16), scales (..., n/32)."""
    lut = torch.tensor(FP4_VALUES[:8])
    x = w.reshape(*w.shape[:-1], -1, 32).float()
    amax = x.abs().amax(-1, keepdim=True).clamp(min=2 ** -20)
    exp = torch.ceil(torch.log2(amax / 6))
    scaled = x / 2 ** exp
    mag = (scaled.abs().unsqueeze(-1) - lut).abs().argmin(-1)
    code = (mag | ((scaled < 0).long() << 3)).to(torch.uint8)
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)
    return blocks, (exp.squeeze(-1) + 127).to(torch.uint8)


def write_checkpoint(model: GptOss, folder, mxfp4=False, shards=2, dtype=torch.bfloat16, drop=(), reshape=()):
    """Our state dict in the hub's layout: config.json, sharded safetensors and their index."""
    os.makedirs(folder, exist_ok=True)
    cfg = model.config.to_dict()
    tensors = {}
    for k, v in model.state_dict().items():
        if k in drop:
            continue
        v = v.detach().to(dtype).contiguous()
        if k in reshape:
            v = v[..., :-1].contiguous()
        if mxfp4 and k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = quantize_mxfp4(v.float().transpose(1, 2))  # stored (experts, out, in)
            tensors[k + "_blocks"], tensors[k + "_scales"] = blocks, scales
        else:
            tensors[k] = v
    if mxfp4:
        cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": []}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        part = {k: tensors[k] for k in names[i::shards]}
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, os.path.join(folder, fname))
        weight_map.update({k: fname for k in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return tensors


# ---------------------------------------------------------------- the hub's layout
def test_transformers_save_pretrained_loads_into_identical_tensors(tiny_model, tmp_path):
    hf = hf_twin(tiny_model)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    ours = load_model(str(tmp_path), device="cpu", dtype=torch.float32)
    ref = hf.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, ref[k]), k
    ids = torch.randint(0, 1024, (2, 20))
    with torch.no_grad():
        assert torch.equal(ours(ids), tiny_model(ids))


def test_mxfp4_checkpoint_loads_as_dequantised_by_hand(tiny_model, tmp_path):
    tensors = write_checkpoint(tiny_model, tmp_path, mxfp4=True)
    model = load_model(str(tmp_path), device="cpu", dtype=torch.float32)
    for name in ("gate_up_proj", "down_proj"):
        key = f"model.layers.1.mlp.experts.{name}"
        blocks, scales = tensors[key + "_blocks"], tensors[key + "_scales"]
        by_hand = torch.empty(blocks.shape[:2] + (blocks.shape[2] * 32,))
        lut = torch.tensor(FP4_VALUES)
        for e in range(blocks.shape[0]):          # element by element, the slow obvious way
            for r in range(blocks.shape[1]):
                for b in range(blocks.shape[2]):
                    for j in range(16):
                        byte = int(blocks[e, r, b, j])
                        s = 2.0 ** (int(scales[e, r, b]) - 127)
                        by_hand[e, r, b * 32 + 2 * j] = lut[byte & 15] * s
                        by_hand[e, r, b * 32 + 2 * j + 1] = lut[byte >> 4] * s
        got = getattr(model.model.layers[1].mlp.experts, name)
        assert torch.equal(got, by_hand.transpose(1, 2))
        # and the encoding really was close to the original weights
        orig = getattr(tiny_model.model.layers[1].mlp.experts, name)
        assert (got - orig).abs().max() < 0.25 * orig.abs().max()


# ---------------------------------------------------------------- NF4
def test_nf4_model_stays_close_to_the_bf16_model(tmp_path):
    torch.manual_seed(0)
    model = GptOss(GptOssConfig.from_name("tiny"))  # the init's scale, std 0.02
    write_checkpoint(model, tmp_path)
    dense = load_model(str(tmp_path), device="cpu", dtype=torch.bfloat16)
    nf4 = load_model(str(tmp_path), quantize="nf4", device="cpu", dtype=torch.bfloat16)
    layer = nf4.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, NF4Linear) and isinstance(layer.mlp.experts, NF4Experts)
    # each quantised matrix: NF4's relative error on normal weights is about 0.09 (blocks of 64)
    w = dense.model.layers[0].self_attn.q_proj.weight.float()
    err = (layer.self_attn.q_proj.dequantized_weight().float() - w).norm() / w.norm()
    assert 0.05 < err < 0.12
    gu = dense.model.layers[2].mlp.experts.gate_up_proj.float()
    err = (nf4.model.layers[2].mlp.experts.dequantized("gate_up_proj").float() - gu).norm() / gu.norm()
    assert 0.05 < err < 0.12
    ids = torch.randint(0, 1024, (2, 24))
    with torch.no_grad():
        a, b = dense(ids).float(), nf4(ids).float()
        # exactly the dense model holding the dequantised weights: storage changes nothing else
        for i, l in enumerate(nf4.model.layers):
            d = dense.model.layers[i]
            for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(d.self_attn, p).weight.copy_(getattr(l.self_attn, p).dequantized_weight())
            d.mlp.experts.gate_up_proj.copy_(l.mlp.experts.dequantized("gate_up_proj"))
            d.mlp.experts.down_proj.copy_(l.mlp.experts.dequantized("down_proj"))
        assert torch.equal(dense(ids).float(), b)
    # Against the unquantised model: 24 matrices (4 layers x q, k, v, o, gate_up, down) each off by
    # ~9% add up to ~18% in the logits here (measured); a wrong layout (transposed, unscaled) gives ~1.
    assert (a - b).norm() / a.norm() < 0.3
    # NF4 stores 4 bits a weight, plus per block of 64 one 8-bit absmax (double quantisation) and
    # per tensor a 1 KB table of the second-level code
    n = sum(m.numel() for k, m in dense.state_dict().items() if "proj" in k and "bias" not in k)
    n_tensors = 4 * 6  # per layer: q, k, v, o and the two expert matrices
    assert n / 2 < nf4_bytes(nf4) < n / 2 + n / 64 + 1200 * n_tensors

@pytest.mark.parametrize("group", [None, 3])
def test_nf4_experts_equal_dense_experts_on_their_dequantised_weights(tiny_model, group):
    from model.moe import Experts
    dense = tiny_model.model.layers[0].mlp.experts
    nf4 = NF4Experts(tiny_model.config, group)
    nf4.load_state_dict({k: v for k, v in dense.state_dict().items() if k.endswith("bias")}, strict=False)
    for name in ("gate_up_proj", "down_proj"):
        nf4.set_weight(name, getattr(dense, name).detach(), torch.float32)
    assert len(nf4.nf4["down_proj"]) == (1 if group is None else 3)  # 8 experts by 3: 3 + 3 + 2
    ref = Experts(tiny_model.config)
    ref.load_state_dict(dense.state_dict())
    with torch.no_grad():
        ref.gate_up_proj.copy_(nf4.dequantized("gate_up_proj"))
        ref.down_proj.copy_(nf4.dequantized("down_proj"))
    x = torch.randn(30, 64, requires_grad=True)
    w = torch.softmax(torch.randn(30, 2), -1)
    idx = torch.randint(0, 7, (30, 2))  # expert 7 unused: skipped without harm
    nf4(x, w, idx).pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    ref(x2, w, idx).pow(2).sum().backward()
    assert torch.allclose(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- bad checkpoints
def test_errors_name_the_file_and_tensor(tiny_model, tmp_path):
    write_checkpoint(tiny_model, tmp_path / "missing", drop=("model.layers.1.self_attn.sinks",))
    with pytest.raises(CheckpointError, match="model.layers.1.self_attn.sinks"):
        load_model(str(tmp_path / "missing"), device="cpu")
    write_checkpoint(tiny_model, tmp_path / "shape", reshape=("model.layers.0.mlp.router.weight",))
    with pytest.raises(CheckpointError, match=r"model-0000\d-of-00002.safetensors.*router.weight.*shape"):
        load_model(str(tmp_path / "shape"), device="cpu")
    write_checkpoint(tiny_model, tmp_path / "quant")
    cfg = json.loads((tmp_path / "quant" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq"}
    (tmp_path / "quant" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json.*gptq"):
        load_model(str(tmp_path / "quant"), device="cpu")
    with pytest.raises(CheckpointError, match="--model tiny"):
        load_model(str(tmp_path / "no-such-folder-or-repo"), device="cpu")


# ---------------------------------------------------------------- memory while loading
MEASURE = r"""
import resource, sys, torch
sys.path.insert(0, {root!r})
from model import load_model
from model.weights.nf4 import nf4_bytes
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
m = load_model({folder!r}, quantize={quantize!r}, device="cpu", dtype=torch.bfloat16)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
kept = nf4_bytes(m) + sum(p.numel() * p.element_size() for p in m.parameters())
print(after - before, kept)
"""


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_loading_never_holds_a_second_copy(tmp_path, quantize):
    # ~100 MB of bf16 weights in many small tensors (the largest 4 MB), so that a second copy of
    # the weights would stand far above the bound below
    config = GptOssConfig(vocab_size=1024, hidden_size=256, intermediate_size=256, num_hidden_layers=16,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=16,
                          num_experts_per_tok=2, sliding_window=8, pad_token_id=0)
    with torch.device("meta"):
        skeleton = GptOss(config)
    tensors = {k: torch.randn(v.shape, dtype=torch.bfloat16) * 0.02 for k, v in skeleton.state_dict().items()}
    total = sum(t.numel() * 2 for t in tensors.values())
    largest = max(t.numel() * 2 for t in tensors.values())
    slack = 4 * largest + 20e6  # one tensor in flight with its float32 / quantisation temporaries
    assert total > 2 * slack
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config.to_dict(), f)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    del tensors
    out = subprocess.run([sys.executable, "-c", MEASURE.format(root=ROOT, folder=str(tmp_path), quantize=quantize)],
                         capture_output=True, text=True, check=True).stdout.split()
    grown, kept = int(out[0]), int(out[1])
    assert grown < kept + slack, (grown / 1e6, kept / 1e6, total / 1e6)


# ---------------------------------------------------------------- gpt-oss-120b's shapes
def test_120b_shaped_mxfp4_layers_stream_into_nf4(tmp_path):
    """Layers of gpt-oss-120b's shape in the hub's MXFP4 layout: 128 experts, top 4, hidden 2880,
    64 query and 8 key/value heads of 64, a sliding and a full layer. Reduced to run in seconds on
    the CPU: 2 layers of 36, intermediate_size 32 of 2880 (so each expert matrix keeps 120b's
    2880-wide side and its 128 experts), a vocabulary of 1,024. The MXFP4 codes and scales are drawn
    at random, written as the hub stores them; the NF4 experts must be their dequantisation, up to
    NF4's own rounding, and the model must train (LoRA on attention)."""
    from lora import inject, lora_parameters
    preset = GptOssConfig.from_name("gpt-oss-120b")
    config = GptOssConfig.from_dict({**preset.to_dict(), "num_hidden_layers": 2, "layer_types": [], "intermediate_size": 32,
                             "vocab_size": 1024, "pad_token_id": 0, "eos_token_id": 1,
                             "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": []}})
    assert (config.num_local_experts, config.num_experts_per_tok, config.hidden_size) == (128, 4, 2880)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in hub_shapes(config).items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            e, n_in, n_out = shape                                  # stored (experts, out, in / 32, 16)
            tensors[name + "_blocks"] = torch.randint(0, 256, (e, n_out, n_in // 32, 16), dtype=torch.uint8, generator=g)
            tensors[name + "_scales"] = torch.randint(119, 123, (e, n_out, n_in // 32), dtype=torch.uint8, generator=g)
        elif name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    with open(tmp_path / "config.json", "w") as f:
        json.dump({k: v for k, v in config.to_dict().items()}, f)
    names = sorted(tensors)
    weight_map = {}
    for i in range(2):   # two shards, as the hub's
        part = {k: tensors[k] for k in names[i::2]}
        save_file(part, str(tmp_path / f"model-{i + 1:05d}-of-00002.safetensors"))
        weight_map.update({k: f"model-{i + 1:05d}-of-00002.safetensors" for k in part})
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)

    model = load_model(str(tmp_path), quantize="nf4", device="cpu", dtype=torch.float32, attention="eager")
    for layer in range(2):
        experts = model.model.layers[layer].mlp.experts
        assert isinstance(experts, NF4Experts) and experts.num_experts == 128
        for name in ("gate_up_proj", "down_proj")[layer:]:   # (one matrix of the second layer: time)
            key = f"model.layers.{layer}.mlp.experts.{name}"
            dense = dequantize_mxfp4(tensors[key + "_blocks"], tensors[key + "_scales"], torch.float32).transpose(1, 2)
            got = experts.dequantized(name)
            assert got.shape == dense.shape == hub_shapes(config)[key]
            # NF4 rounds each value to one of 16 levels of its block of 64's absmax: within half the widest gap
            assert (got - dense).abs().max() <= 0.2 * dense.abs().max()
            assert torch.corrcoef(torch.stack([got.flatten(), dense.flatten()]))[0, 1] > 0.99
    inject(model, rank=4, alpha=4, verbose=False)
    ids = torch.randint(0, 1024, (1, 12), generator=g)
    model.loss(ids, ids).backward()
    assert all(p.grad is not None for _, p in lora_parameters(model))
