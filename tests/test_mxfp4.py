"""MXFP4 experts (`--base mxfp4`): the quantiser, the Triton kernels in Triton's interpreter, loading
from MXFP4 and BF16 checkpoints, LoRA on top, and train.py end to end (CPU, tiny shapes).

The interpreter cannot do bf16 arithmetic, so the kernels run in float32 here, where the dequantised
weights are exact: multiplied by an identity they must come out bit for bit as dequantize_mxfp4's.
"""
import dataclasses
import importlib
import json
import math

import pytest
import torch
import triton  # noqa: F401  (a test requirement: without it these tests must fail, not vanish)

import memory_plan
from conftest import hf_twin  # noqa: F401  (conftest puts the repository on the path)
from lora import inject, lora_parameters
from lora.export import merged_tensor
from model import GptOss, GptOssConfig, load_model
from model.fast import dense_gemm as dense_gemm_module
from model.fast import gate
from model.fast import mxfp4_gemm as mxfp4_gemm_module
from model.fast import nf4_gemm as nf4_gemm_module
from model.gpt_oss import hub_shapes
from model.moe import EXPERT_MATRICES, Experts
from model.weights import loading
from model.weights.loading import mxfp4_experts
from model.weights.mxfp4 import FP4_VALUES, MXFP4Experts, MXFP4Tensor, dequantize_mxfp4, quantize_mxfp4
from model.weights.nf4 import NF4Linear
from test_loading import write_checkpoint
from test_nf4_gemm import (check_expert_lora_on_the_kernels, check_kernels_keep_forward_and_gradient,
                           check_padding_is_skipped, check_rows_read_in_place,
                           nf4_and_dense_experts, per_expert, routed_tokens)


@pytest.fixture(scope="module")
def gemm():
    """model.fast.mxfp4_gemm with its kernels (and nf4_gemm's grid, which it calls, and dense_gemm's
    epilogue, which expert LoRA's backward runs) built for the interpreter."""
    patch = pytest.MonkeyPatch()
    patch.setenv("TRITON_INTERPRET", "1")
    importlib.reload(nf4_gemm_module)
    module = importlib.reload(mxfp4_gemm_module)
    importlib.reload(dense_gemm_module)
    yield module
    patch.undo()
    importlib.reload(nf4_gemm_module)
    importlib.reload(mxfp4_gemm_module)
    importlib.reload(dense_gemm_module)


def random_mxfp4(experts, n_in, n_out, seed=0) -> MXFP4Tensor:
    """Random codes (every one of the 16) and scales 2^-9 .. 2^2, float32 compute."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, n_out, n_in // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(118, 130, (experts, n_out, n_in // 32), dtype=torch.uint8, generator=g)
    return MXFP4Tensor(blocks, scales, torch.float32)


# ---------------------------------------------------------------- the quantiser
def test_values_already_in_mxfp4_come_back_exactly():
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 150, (3, 40, 4), dtype=torch.uint8, generator=g)
    w = dequantize_mxfp4(blocks, scales, torch.float32)
    again = dequantize_mxfp4(*quantize_mxfp4(w), torch.float32)
    assert torch.equal(again, w)
    bf16 = dequantize_mxfp4(blocks, scales, torch.bfloat16)         # a BF16 checkpoint's own MXFP4 values
    assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(bf16), torch.bfloat16), bf16)


def test_a_block_quantised_by_hand():
    x = torch.zeros(32)
    # max |x| = 7: scale 2^(floor(log2 7) - 2) = 2^0. 1 -> 1; -2.5 is halfway between 2 (code 4) and
    # 3 (code 5): the even code, -2; 7 saturates to 6; 0.3 -> 0.5; 0.25, halfway between 0 and 0.5, -> 0;
    # 0.75, halfway between 0.5 (code 1) and 1 (code 2), -> 1; 5, between 4 (code 6) and 6 (code 7), -> 4
    x[:8] = torch.tensor([1.0, -2.5, 7.0, 0.3, 0.25, 0.75, 5.0, -0.1])
    blocks, scales = quantize_mxfp4(x)
    assert scales.tolist() == [127]
    codes = torch.stack((blocks & 15, blocks >> 4), -1).flatten().tolist()
    assert codes[:8] == [2, 8 + 4, 7, 1, 0, 2, 6, 8 + 0]            # -0.1 rounds to -0: code 8
    assert codes[8:] == [0] * 24
    assert dequantize_mxfp4(blocks, scales, torch.float32)[:8].tolist() == [1, -2, 6, 0.5, 0, 1, 4, -0.0]
    # the scale follows the block's largest magnitude: x / 64 is the same codes, scale 2^-6
    blocks2, scales2 = quantize_mxfp4(x / 64)
    assert torch.equal(blocks2, blocks) and scales2.tolist() == [127 - 6]


def test_the_error_is_bounded_by_the_blocks_scale():
    """Each value is off by at most half a step of e2m1 at its scale, or by the saturation of values
    in (6, 8) x scale to 6 x scale: at most 2 x scale, scale = 2^(floor(log2 max|x|) - 2)."""
    torch.manual_seed(2)
    w = torch.randn(16, 256) * torch.logspace(-3, 2, 16)[:, None]
    got = dequantize_mxfp4(*quantize_mxfp4(w), torch.float32)
    amax = w.view(16, 8, 32).abs().amax(-1, keepdim=True)
    step = torch.exp2(torch.floor(torch.log2(amax)) - 2)
    err = (got - w).view(16, 8, 32).abs()
    assert (err <= 2 * step).all()
    assert (err <= 0.5 * amax).all()
    assert (got - w).norm() / w.norm() < 0.15                         # about 4 bits' worth


# ---------------------------------------------------------------- the kernels (Triton's interpreter)
def test_the_kernels_see_dequantize_mxfp4s_weights_bit_for_bit(gemm):
    """x = identity per expert: y = x @ W[e] is W[e] itself (one product per sum); dy = identity: dx
    is W[e]^T. Ragged experts, the middle one empty; `in` = 96 leaves a half tile of 64."""
    experts, n_in, n_out = 3, 96, 192
    w = random_mxfp4(experts, n_in, n_out)
    dense = w.dequantize()                                            # (experts, in, out)
    counts = [n_in, 0, n_in]
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    y = gemm.grouped_mm(torch.eye(n_in).repeat(2, 1), w, offsets)
    assert torch.equal(y, torch.cat([dense[0], dense[2]]))
    y2, h = gemm.grouped_mm_swiglu(torch.eye(n_in).repeat(2, 1), w, offsets, torch.zeros(experts, n_out), 1.702, 7.0)
    assert torch.equal(y2, y)
    counts_t = [n_out, 0, n_out]
    dx = gemm.grouped_mm_t(torch.eye(n_out).repeat(2, 1), w, torch.tensor(counts_t).cumsum(0).to(torch.int32))
    assert torch.equal(dx, torch.cat([dense[0].T, dense[2].T]))


@pytest.mark.parametrize("experts, n_in, n_out, counts", [(3, 96, 192, [5, 0, 70]), (4, 64, 128, [0, 0, 0, 9]),
                                                          (2, 160, 64, [130, 1])])
def test_products_equal_dequantise_then_multiply(gemm, experts, n_in, n_out, counts):
    torch.manual_seed(0)
    w = random_mxfp4(experts, n_in, n_out, seed=3)
    dense = w.dequantize()
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    x, dy, bias = torch.randn(sum(counts), n_in), torch.randn(sum(counts), n_out), torch.randn(experts, n_out)
    expert = torch.repeat_interleave(torch.arange(experts), torch.tensor(counts))
    torch.testing.assert_close(gemm.grouped_mm(x, w, offsets, bias), per_expert(x, dense, counts) + bias[expert],
                               rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gemm.grouped_mm_t(dy, w, offsets), per_expert(dy, dense, counts, transpose=True),
                               rtol=1e-5, atol=1e-4)


def test_rows_read_in_place_equal_the_gathered_rows(gemm):
    check_rows_read_in_place(gemm, random_mxfp4(3, 96, 192), 96, 192, [5, 0, 70])


def test_every_generations_tiles_give_the_same_products(gemm):
    torch.manual_seed(5)
    experts, n_in, n_out, counts = 3, 96, 192, [5, 0, 140]
    w = random_mxfp4(experts, n_in, n_out, seed=4)
    dense = w.dequantize()
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    x, dy = torch.randn(sum(counts), n_in), torch.randn(sum(counts), n_out)
    seen = []
    for cap in [(8, 0), (9, 0), (10, 0), (12, 0)]:
        tiles, tiles_t = gemm.tiles_for(cap)
        if (tiles, tiles_t) in seen:
            continue
        seen.append((tiles, tiles_t))
        torch.testing.assert_close(gemm.grouped_mm(x, w, offsets, tiles=tiles), per_expert(x, dense, counts),
                                   rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(gemm.grouped_mm_t(dy, w, offsets, tiles=tiles_t),
                                   per_expert(dy, dense, counts, transpose=True), rtol=1e-5, atol=1e-4)
    assert len(seen) == 2, seen         # Hopper and data-center Blackwell alike (8 warps), and the rest


def mxfp4_and_dense_experts(seed=2):
    """A tiny config's MXFP4 experts and a dense twin holding the dequantised weights (float32)."""
    return nf4_and_dense_experts(seed, storage=MXFP4Experts)


def test_padding_tokens_get_no_mxfp4_expert_and_leave_no_trace(gemm, monkeypatch):
    config, mx, _ = mxfp4_and_dense_experts(5)
    check_padding_is_skipped(gemm, monkeypatch, config, mx.requires_grad_(False))


@pytest.mark.parametrize("train_biases", [False, True])
def test_mxfp4_experts_take_the_kernels_and_keep_forward_and_gradient(gemm, monkeypatch, train_biases):
    """test_nf4_gemm's check on MXFP4 experts, with one expert given no token."""
    config, mx, dense = mxfp4_and_dense_experts()
    x, weights, idx = routed_tokens(config)
    idx[idx == 3] = 4                                              # expert 3 gets no token
    check_kernels_keep_forward_and_gradient(gemm, monkeypatch, mx, dense, x, weights, idx, train_biases)


def test_expert_lora_on_the_mxfp4_kernels_equals_it_on_the_dequantised_experts(gemm, monkeypatch):
    config, mx, dense = nf4_and_dense_experts(seed=8, storage=MXFP4Experts)
    x, weights, idx = routed_tokens(config, n=40)
    check_expert_lora_on_the_kernels(gemm, monkeypatch, mx, dense, x, weights, idx)


def test_the_plain_twin_equals_the_dense_layer():
    """Without the kernels (the CPU, --kernels plain): dequantise, then the grouped product; the
    backward dequantises again."""
    config, mx, dense = mxfp4_and_dense_experts(seed=6)
    x = torch.randn(17, config.hidden_size)
    weights = torch.rand(17, config.num_experts_per_tok).softmax(-1)
    idx = torch.stack([torch.randperm(config.num_local_experts)[:config.num_experts_per_tok] for _ in range(17)])
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = mx(x1, weights, idx, gate.PLAIN), dense(x2, weights, idx)
    y1.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- loading, LoRA, the plan
def tiny_weights(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.3 if "sinks" in name or "router" in name else 0.1)
    return model


def test_an_mxfp4_checkpoint_keeps_its_codes_and_computes_as_its_dequantised_weights(tmp_path, capsys):
    torch.manual_seed(0)
    tensors = write_checkpoint(tiny_weights(GptOss(GptOssConfig.from_name("tiny"))), tmp_path, mxfp4=True)
    kept = load_model(str(tmp_path), device="cpu", dtype=torch.float32, experts="mxfp4")
    assert "experts: MXFP4, the checkpoint's codes as they are" in capsys.readouterr().out
    dense = load_model(str(tmp_path), device="cpu", dtype=torch.float32)   # dequantised on load
    for i, layer in enumerate(kept.model.layers):
        assert isinstance(layer.mlp.experts, MXFP4Experts)
        for name in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{i}.mlp.experts.{name}"
            w = layer.mlp.experts.mxfp4[name]
            assert torch.equal(w.blocks, tensors[key + "_blocks"]) and torch.equal(w.scales, tensors[key + "_scales"])
    ids = torch.randint(0, 1024, (2, 20))
    with torch.no_grad():
        assert (kept(ids) - dense(ids)).abs().max() < 1e-5
    nf4 = load_model(str(tmp_path), quantize="nf4", device="cpu", dtype=torch.float32, experts="mxfp4")
    layer = nf4.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, NF4Linear) and isinstance(layer.mlp.experts, MXFP4Experts)


def test_a_bf16_checkpoint_is_quantised_to_mxfp4_on_load(tmp_path, capsys):
    torch.manual_seed(1)
    tiny = tiny_weights(GptOss(GptOssConfig.from_name("tiny")))
    write_checkpoint(tiny, tmp_path, dtype=torch.float32)
    model = load_model(str(tmp_path), device="cpu", dtype=torch.float32, experts="mxfp4")
    assert "experts: MXFP4, quantised to MXFP4 on load from the checkpoint's dense weights" in capsys.readouterr().out
    for name in ("gate_up_proj", "down_proj"):
        w = getattr(tiny.model.layers[2].mlp.experts, name).detach()         # (experts, in, out)
        expected = dequantize_mxfp4(*quantize_mxfp4(w.transpose(1, 2)), torch.float32).transpose(1, 2)
        assert torch.equal(model.model.layers[2].mlp.experts.dequantized(name), expected)
    with pytest.raises(ValueError, match="experts must be"):
        load_model(str(tmp_path), device="cpu", experts="fp8")


def test_expert_lora_on_mxfp4_equals_it_on_the_dequantised_experts():
    torch.manual_seed(3)
    config = GptOssConfig.from_name("tiny")
    mx = mxfp4_experts(tiny_weights(GptOss(config, attention="eager")))
    dense = GptOss(config, attention="eager")
    dense.load_state_dict(mx.state_dict(), strict=False)
    for a, b in zip(mx.model.layers, dense.model.layers):
        for name in ("gate_up_proj", "down_proj"):
            getattr(b.mlp.experts, name).data.copy_(a.mlp.experts.dequantized(name))
    outs = []
    for model in (mx, dense):
        torch.manual_seed(4)
        inject(model, targets="experts", rank=4, alpha=8, verbose=False)
        for _, p in lora_parameters(model):
            torch.nn.init.normal_(p, std=0.05)                             # B too, so both get gradients
        ids = torch.randint(0, 1024, (2, 12))
        loss = model.loss(ids, ids)
        loss.backward()
        outs.append((loss.detach(), [p.grad for _, p in lora_parameters(model)]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    key = "model.layers.1.mlp.experts.down_proj"                           # the merged export reads the codes
    torch.testing.assert_close(merged_tensor(mx, key), merged_tensor(dense, key), rtol=0, atol=1e-6)


def test_the_memory_plan_counts_the_experts_at_4_25_bits():
    config = GptOssConfig.from_name("gpt-oss-20b")
    nf4 = memory_plan.need(config, 0, "adamw", 4096, False)
    mx = memory_plan.need(config, 0, "adamw", 4096, False, base="mxfp4")
    experts = config.num_hidden_layers * config.num_local_experts * config.hidden_size * 3 * config.intermediate_size
    assert math.isclose(mx.model - nf4.model, experts * (4.25 / 8 - memory_plan.NF4_BYTES_PER_WEIGHT), rel_tol=1e-9)


@pytest.mark.slow
def test_train_py_runs_the_tiny_model_with_mxfp4_experts(tmp_path, capsys):
    import train
    from data.synthetic import write_synthetic
    write_synthetic(str(tmp_path / "task"), n_train=8, n_val=4, seed=0)
    assert train.main(["--model", "tiny", "--base", "mxfp4", "--data", str(tmp_path / "task"), "--max-seq-len", "256",
                       "--micro-batch-size", "2", "--grad-accum", "1", "--max-steps", "2", "--targets",
                       "q_proj,experts", "--output-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "experts: MXFP4, quantised from the model's own weights" in out and "base                     mxfp4" in out
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    # the adapter says which base it was trained against, and python -m eval scores on that base: its
    # adapter column is train.py's last evaluation (a dense-expert base would score differently)
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_experts"] == "mxfp4"
    from eval.__main__ import main as evaluate
    report = evaluate(["--model", "tiny", "--adapter", str(tmp_path / "out" / "adapter"), "--data",
                       str(tmp_path / "task" / "val.jsonl"), "--max-len", "256",
                       "--out", str(tmp_path / "report.json")])
    last = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["kind"] == "eval"
    assert report["results"]["adapter"]["label_mass"] == pytest.approx(last["label_mass"], rel=1e-5)
    dense = evaluate(["--model", "tiny", "--data", str(tmp_path / "task" / "val.jsonl"), "--max-len", "256",
                      "--out", str(tmp_path / "dense.json")])
    assert dense["results"]["base"]["label_mass"] != pytest.approx(report["results"]["base"]["label_mass"], rel=1e-5)
    assert train.main(["--model", "tiny", "--base", "fp4", "--output-dir", str(tmp_path / "bad")]) == 2
    assert "--base must be nf4 or mxfp4, not 'fp4'" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (part of the GPU suite, pytest -m gpu)")
def test_on_the_gpu_mxfp4_experts_equal_dense_experts_on_their_dequantised_weights():
    """gpt-oss-20b's widths, bf16: the MXFP4 kernels' fused layer against dense experts holding the
    dequantised weights, run plainly (a loop over experts); output and input/routing gradients."""
    from test_gpu import check_against_dense, quantised_and_dense_experts
    check_against_dense(*quantised_and_dense_experts(storage=MXFP4Experts))


def random_mxfp4_and_dense_models(config, device, seed=0):
    """gpt-oss with random weights built as load_model builds one (its skeleton, then each hub tensor
    placed, on `device`), twice: experts in MXFP4 (random codes, every one of the 16, block scales
    2^-11..2^-8), and a twin with dense bf16 experts holding exactly their dequantised weights. The rest
    is bf16, the same tensors in both (normal, std 0.02; the experts' biases zero); both frozen, as under
    LoRA. A random 20b-wide model amplifies rounding: with the hub-like scales 2^-8..2^-5 one bf16
    rounding apart moves its logits by 15-30%, on either path; and a frozen bias is added before the
    kernels round but after torch's product rounds, a rounding apart that such a model would amplify."""
    mx = loading._skeleton(config, None, "mxfp4", False, "auto", None)
    dense = loading._skeleton(config, None, None, False, "auto", None)
    g = torch.Generator(device).manual_seed(seed)
    for name, shape in hub_shapes(config).items():
        path, _, attr = name.rpartition(".")
        if attr in EXPERT_MATRICES:                                    # shape (experts, in, out)
            e, n_in, n_out = shape
            blocks = torch.randint(0, 256, (e, n_out, n_in // 32, 16), dtype=torch.uint8, device=device, generator=g)
            scales = torch.randint(116, 120, (e, n_out, n_in // 32), dtype=torch.uint8, device=device, generator=g)
            mx.get_submodule(path).set_mxfp4(attr, blocks, scales, torch.bfloat16)
            weight = dequantize_mxfp4(blocks, scales, torch.bfloat16).transpose(1, 2).contiguous()
            loading._place(dense, name, weight, torch.bfloat16)
            continue
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16, device=device)
        elif ".experts." in name:                                      # the experts' biases
            t = torch.zeros(shape, dtype=torch.bfloat16, device=device)
        else:
            t = (torch.randn(shape, device=device, generator=g) * 0.02).to(torch.bfloat16)
        loading._place(mx, name, t, torch.bfloat16)
        loading._place(dense, name, t, torch.bfloat16)
    return mx.requires_grad_(False), dense.requires_grad_(False)


def logits_on_mxfp4_and_bf16_experts(mx, dense, ids, fast, plain):
    """Logits (float64) of the MXFP4 model on the fast paths, and of its bf16 twin on the same fast paths
    and on the plain ones; then of the twin with every down_proj 5% larger (an NF4-sized change)."""
    out = {}
    for key, model, paths in (("mxfp4", mx, fast), ("bf16", dense, fast), ("bf16 plain", dense, plain)):
        model.fast_paths = paths
        with torch.no_grad():
            out[key] = model(ids).double()                              # (batch, seq, vocab)
    with torch.no_grad():
        for layer in dense.model.layers:
            layer.mlp.experts.down_proj.mul_(1.05)
        dense.fast_paths = fast
        out["bf16, down x 1.05"] = dense(ids).double()
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (part of the GPU suite, pytest -m gpu)")
def test_on_the_gpu_20b_logits_on_mxfp4_experts_equal_a_bf16_model_on_their_dequantised_weights():
    """gpt-oss-20b's widths (32 experts, the full vocabulary), 4 layers (sliding and full attention),
    random weights: the MXFP4 model through the gate's fast paths (the MXFP4 kernels' fused layer)
    against the bf16 model holding the dequantised experts.

    On the same fast paths only the experts' products differ (the MXFP4 kernels against torch's bf16
    products): the logits agree to bf16 rounding, far closer than a 5% change of the experts moves them.
    Against the bf16 model run plainly (eager attention, op by op), the MXFP4 model is no further off
    than the bf16 model's own fast paths are: what is left there is bf16 rounding outside the experts."""
    fast, plain = gate.decide("cuda"), gate.decide("cuda", "plain")
    if not fast.nf4_kernels:
        pytest.skip(f"the gate chose the plain experts here: {dict(fast.why)['experts']}")
    config = dataclasses.replace(GptOssConfig.from_name("gpt-oss-20b"), num_hidden_layers=4, layer_types=[])
    mx, dense = random_mxfp4_and_dense_models(config, "cuda")
    ids = torch.randint(0, config.vocab_size, (2, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    out = logits_on_mxfp4_and_bf16_experts(mx, dense, ids, fast, plain)

    def rel(a, b):
        return ((out[a] - out[b]).norm() / out[b].norm()).item()

    def top1(a, b):
        return (out[a].argmax(-1) == out[b].argmax(-1)).double().mean().item()

    same_paths, nf4_sized = rel("mxfp4", "bf16"), rel("bf16, down x 1.05", "bf16")
    assert same_paths < 5e-3 and top1("mxfp4", "bf16") > 0.98, (same_paths, top1("mxfp4", "bf16"))
    assert nf4_sized > 2 * same_paths + 5e-3, (nf4_sized, same_paths)      # the bound above can fail
    mx_plain, bf16_plain = rel("mxfp4", "bf16 plain"), rel("bf16", "bf16 plain")
    assert mx_plain < 1.1 * bf16_plain + 1e-3 and mx_plain < 3e-2, (mx_plain, bf16_plain)
    assert top1("mxfp4", "bf16 plain") > 0.9
