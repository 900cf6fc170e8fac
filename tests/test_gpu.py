"""The GPU suite: the fast paths against their plain twins, and train.py itself on a CUDA GPU.

Run with `pytest -m gpu` on a machine with a CUDA GPU (skipped elsewhere, with the reason). The
train.py runs use a small model (the tiny preset's widths) written in the hub's layout and loaded
as on a real run: NF4 base, bf16, the gate's fast paths, CUDA graphs, fused AdamW, CUDA RNG.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (this is the GPU suite)")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def fast(dense=False):
    """The GPU's fast paths; dense: with the experts' dense path (model/fast/dense_gemm.py) chosen."""
    import dataclasses
    from model.fast import gate
    return dataclasses.replace(gate.decide("cuda"), dense_experts=dense)


# --- the fast paths against their plain twins ------------------------------------------------------

@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("t, window", [(1000, 128), (1000, None), (4096, 128)])
def test_flex_attention_equals_eager_attention(t, window, compiled):
    from model.attention import eager_attention
    from model.fast.flex import flex_attention_with_sinks
    if not fast().flex_attention:
        pytest.skip(f"the gate chose eager attention here: {dict(fast().why)['attention']}")
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(1, t, h, 64, device="cuda", generator=g, dtype=torch.bfloat16) for h in (64, 8, 8))
    s = torch.randn(64, device="cuda", generator=g)
    inputs = [x.clone().requires_grad_() for x in (q, k, v, s)]
    ref = [x.detach().double().requires_grad_() for x in (q, k, v, s)]
    out = flex_attention_with_sinks(*inputs, window, compiled=compiled and fast().compiled)
    assert out.is_contiguous() or t % 128   # unpadded, it comes out as o_proj reads it: no copy
    expected = eager_attention(*ref, window)
    dy = torch.randn(out.shape, device="cuda", generator=g)
    got = torch.autograd.grad(out, inputs, dy.to(out.dtype))
    want = torch.autograd.grad(expected, ref, dy.double())
    assert rel(out, expected) < 1e-2
    for a, b in zip(got, want):
        assert rel(a, b) < 2e-2


def test_compiled_chains_equal_the_plain_chains():
    from model.gpt_oss import rms_norm
    from model.moe import swiglu
    from model.rope import apply_rotary
    if not fast().compiled:
        pytest.skip("the gate chose the plain chains here")
    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(2, 300, 2880, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.randn(2880, device="cuda", generator=g)
    gu = torch.randn(600, 5760, device="cuda", generator=g, dtype=torch.bfloat16) * 5
    q = torch.randn(2, 300, 8, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    cos, sin = (torch.randn(300, 32, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    q64 = torch.randn(2, 300, 64, 64, device="cuda", generator=g, dtype=torch.bfloat16)    # 20b's query heads
    cos2, sin2 = (torch.randn(2, 300, 32, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))  # packed
    for fn, args in ((rms_norm, (x, w, 1e-5)), (swiglu, (gu, 1.702, 7.0)), (apply_rotary, (q, cos, sin)),
                     (apply_rotary, (q64, cos2, sin2))):
        a = args[0].clone().requires_grad_()
        b = args[0].clone().requires_grad_()
        ya, yb = fn(a, *args[1:], compiled=True), fn(b, *args[1:], compiled=False)
        dy = torch.randn(ya.shape, device="cuda", generator=g, dtype=ya.dtype)
        (ga,), (gb,) = torch.autograd.grad(ya, a, dy), torch.autograd.grad(yb, b, dy)
        assert rel(ya, yb) < 1e-2 and rel(ga, gb) < 1e-2, fn.__name__
    # the sinks' scaling of flex's output: the gradients of the output and of the log-sum-exp
    from model.fast.flex import sink_scaled
    out = torch.randn(2, 300, 8, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    lse = torch.randn(2, 8, 300, device="cuda", generator=g).transpose(1, 2)      # strided, as flex's
    sinks = torch.randn(8, device="cuda", generator=g, dtype=torch.bfloat16)
    dy = torch.randn(out.shape, device="cuda", generator=g, dtype=out.dtype)
    results = []
    for compiled in (True, False):
        o, s = out.clone().requires_grad_(), lse.detach().clone().requires_grad_()
        y = sink_scaled(o, s, sinks, compiled=compiled)
        results.append((y, *torch.autograd.grad(y, (o, s), dy)))
    for a, b in zip(*results):
        assert rel(a, b) < 1e-2
    assert results[0][0].is_contiguous()      # o_proj's reshape copies nothing
    # the frozen head's softmax minus one-hot over the 201,088-word vocabulary, some rows untrained
    from model.loss import IGNORE, softmax_minus_target
    logits = torch.randn(300, 201088, device="cuda", generator=g, dtype=torch.bfloat16) * 3
    targets = torch.randint(0, 201088, (300,), device="cuda", generator=g)
    targets[::7] = IGNORE
    (la, ga), (lb, gb) = (softmax_minus_target(logits, targets, compiled=c) for c in (True, False))
    assert ga.dtype == gb.dtype == torch.bfloat16 and rel(la, lb) < 1e-5 and rel(ga, gb) < 1e-2
    assert ga[::7].eq(0).all()


def quantised_and_dense_experts(group=None, storage=None):
    """gpt-oss-20b-wide experts (8 of them) in 4-bit, frozen, and a dense bf16 twin holding their
    dequantised weights. storage: the 4-bit class (default NF4Experts in groups of `group`;
    test_mxfp4 passes MXFP4Experts)."""
    from model import GptOssConfig
    from model.moe import Experts
    from model.weights.nf4 import NF4Experts
    cfg = GptOssConfig(num_hidden_layers=1, num_local_experts=8, num_experts_per_tok=4)
    torch.manual_seed(0)
    ex = Experts(cfg).cuda()
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, 0.02)
    quantised = (storage(cfg) if storage else NF4Experts(cfg, group=group)).cuda()
    quantised.load_state_dict({k: v for k, v in ex.state_dict().items() if k.endswith("bias")}, strict=False)
    for name in ("gate_up_proj", "down_proj"):
        quantised.set_weight(name, getattr(ex, name).detach())
    quantised.requires_grad_(False)                     # frozen biases, as under LoRA
    dense = Experts(cfg).cuda().to(torch.bfloat16)
    with torch.no_grad():
        dense.gate_up_proj.copy_(quantised.dequantized("gate_up_proj"))
        dense.down_proj.copy_(quantised.dequantized("down_proj"))
        dense.gate_up_proj_bias.copy_(ex.gate_up_proj_bias)
        dense.down_proj_bias.copy_(ex.down_proj_bias)
    dense.requires_grad_(False)
    return quantised, dense


def routed(tokens, seed):
    """gpt-oss-20b-wide bf16 tokens, their routing weights and top-4 of 8 experts, and the generator
    that drew them (for what a test draws next)."""
    g = torch.Generator("cuda").manual_seed(seed)
    x = torch.randn(tokens, 2880, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.softmax(torch.randn(tokens, 4, device="cuda", generator=g), -1)
    idx = torch.rand(tokens, 8, device="cuda", generator=g).argsort(-1)[:, :4]
    return x, w, idx, g


def check_against_dense(quantised, dense, paths=None):
    """The 4-bit layer on the fast paths (`paths`, default the GPU's) against its dense twin run plainly
    (a loop over experts), 4,096 tokens in bf16: output, input/routing gradients and those of any trained
    parameter (an adapter's) within bf16 rounding of the accumulation."""
    x, w, idx, _ = routed(4096, seed=2)
    results = []
    for layer, p in ((quantised, paths or fast()), (dense, None)):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        trained = [t for t in layer.parameters() if t.requires_grad]
        y = layer(xi, wi, idx, p)
        dy = torch.randn(y.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(3), dtype=y.dtype)
        results.append((y, *torch.autograd.grad(y, (xi, wi, *trained), dy)))
    assert len(results[0]) == len(results[1])
    for a, b in zip(*results):
        assert rel(a, b) < 1.5e-2


@pytest.mark.parametrize("group", [None, 3])
def test_nf4_experts_equal_dense_experts_on_their_dequantised_weights(group):
    """The NF4 kernels' layer (one group) and the dequantise-then-multiply path (groups of 3) against
    dense bf16 experts holding the dequantised weights, run plainly (a loop over experts)."""
    check_against_dense(*quantised_and_dense_experts(group))


@pytest.mark.parametrize("storage", ["nf4", "mxfp4"])
def test_the_dense_path_equals_dense_experts_on_their_dequantised_weights(storage):
    """The experts dequantised a layer at a time, then torch._grouped_mm (dense_gemm.py), NF4 and MXFP4,
    against the dense bf16 twin run plainly; and the one-kernel dequantisations equal the storages' own
    in bf16, bit for bit, at gpt-oss-20b's widths."""
    from model.fast import mxfp4_gemm, nf4_gemm
    from model.weights.mxfp4 import MXFP4Experts
    quantised, dense = quantised_and_dense_experts(storage=MXFP4Experts if storage == "mxfp4" else None)
    for name in ("gate_up_proj", "down_proj"):
        w = quantised.mxfp4[name] if storage == "mxfp4" else quantised.nf4[name][0]
        got = (mxfp4_gemm if storage == "mxfp4" else nf4_gemm).dequantize(w)
        assert got.dtype == torch.bfloat16 and torch.equal(got, w.dequantize())
    check_against_dense(quantised, dense, fast(dense=True))


def expert_lora(base, seed=7):
    """LoRA r16 on both expert matrices of `base`, B random so that every adapter matrix has a gradient."""
    from lora.layers import LoRAExperts
    torch.manual_seed(seed)
    layer = LoRAExperts(base.requires_grad_(False), rank=16, alpha=16)
    torch.nn.init.normal_(layer.lora_B["gate_up_proj"], std=0.02)
    torch.nn.init.normal_(layer.lora_B["down_proj"], std=0.02)
    return layer


def test_the_attentions_one_kernel_dequantisation_is_bitsandbytes_bit_for_bit():
    """nf4_gemm.dequantize (the double quantisation undone inside, no fused multiply-adds) against
    bitsandbytes' CUDA dequantisation, at gpt-oss-20b's q, k and o shapes and three experts' gate_up,
    in bf16 and fp16 (each pair of weights stored as one 32-bit word)."""
    from model.fast import nf4_gemm
    from model.weights.nf4 import NF4Tensor
    g = torch.Generator("cuda").manual_seed(8)
    for dtype in (torch.bfloat16, torch.float16):
        for shape in ((4096, 2880), (512, 2880), (2880, 4096), (3, 2880, 5760)):
            weight = torch.randn(shape, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
            w = NF4Tensor(weight, compute_dtype=dtype)
            got = nf4_gemm.dequantize(w)
            assert got.dtype == dtype and torch.equal(got, w.dequantize()), (shape, dtype)


@pytest.mark.parametrize("dense_path", [False, True])
def test_expert_lora_on_the_nf4_kernels_equals_it_on_dense_experts(dense_path):
    """Expert LoRA in the fused NF4 layer (the low-rank terms added in the kernels' epilogue, the
    adapters' gradients as per-expert sums), and on the dense path, against the same adapter over the
    dense twin run plainly: output and input/routing gradients (check_against_dense), and every adapter
    matrix's gradient."""
    layers = [expert_lora(base) for base in quantised_and_dense_experts()]
    assert sum(t.requires_grad for t in layers[0].parameters()) == 4
    check_against_dense(*layers, fast(dense_path))


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("dense_path", [False, True])
def test_padding_gets_no_expert_and_leaves_no_trace_on_the_gpu(dense_path, lora):
    """A packed row's padding in the fused NF4 layer (and on the dense path; frozen, and with expert
    LoRA), where the rows the kernels leave unwritten hold whatever the allocator had: the real tokens'
    output and gradients (the adapter's too) are those of the layer run on them alone, the padding's are
    exactly zero, and nothing is NaN."""
    nf4, _ = quantised_and_dense_experts()
    nf4 = expert_lora(nf4) if lora else nf4
    x, w, idx, g = routed(4096, seed=5)
    dy = torch.randn(4096, 2880, device="cuda", generator=g, dtype=torch.bfloat16)
    padding = torch.zeros(4096, dtype=torch.bool, device="cuda")
    padding[3000:] = True
    torch.empty(8 * 2 ** 30, dtype=torch.uint8, device="cuda").fill_(255)   # NaN bits in the freed cache
    trained = [t for t in nf4.parameters() if t.requires_grad]
    xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = nf4(xi, wi, idx, fast(dense_path), padding)
    packed = (y, *torch.autograd.grad(y, (xi, wi, *trained), dy))
    xa, wa = x[:3000].clone().requires_grad_(), w[:3000].clone().requires_grad_()
    ya = nf4(xa, wa, idx[:3000], fast(dense_path))
    alone = (ya, *torch.autograd.grad(ya, (xa, wa, *trained), dy[:3000]))
    for a, b in zip(packed[:3], alone):
        assert a.isfinite().all() and a[3000:].eq(0).all()
        assert rel(a[:3000], b) < 1e-3
    for a, b in zip(packed[3:], alone[3:]):
        assert a.isfinite().all() and rel(a, b) < 1e-3


@pytest.mark.parametrize("dense_path", [False, True])
def test_experts_are_bit_reproducible(dense_path):
    """The same inputs give the same bits: each token's expert rows are summed in a fixed order (on the
    fused kernels and on the dense path)."""
    nf4, _ = quantised_and_dense_experts()
    x, w, idx, _ = routed(8192, seed=4)
    outs = []
    for _ in range(3):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = nf4(xi, wi, idx, fast(dense_path))
        outs.append((y, *torch.autograd.grad(y.float().square().sum(), (xi, wi))))
    for run in outs[1:]:
        for a, b in zip(run, outs[0]):
            assert torch.equal(a, b)


# --- train.py on the GPU -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """The tiny preset's widths in the hub's MXFP4 layout, with the tiny tokenizer: loaded as a real run loads."""
    from data import tiny_tokenizer, write_synthetic
    from model import GptOss, GptOssConfig
    from tests.test_loading import write_checkpoint
    folder = tmp_path_factory.mktemp("small_model")
    torch.manual_seed(0)
    model = GptOss(GptOssConfig.from_name("tiny"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.1)
    write_checkpoint(model, folder / "model", mxfp4=True)
    tiny_tokenizer().save(str(folder / "model" / "tokenizer.json"))
    write_synthetic(str(folder / "data"), n_train=48, n_val=16, seed=0)
    return folder


def train_args(small_model, out, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--model", str(small_model / "model"),
            "--data", str(small_model / "data"), "--output-dir", str(out), "--max-seq-len", "256",
            "--epochs", "2", "--lr", "3e-3", "--warmup-steps", "2", "--save-every", "4", *extra]


def run_train(small_model, out, *extra):
    done = subprocess.run(train_args(small_model, out, *extra), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def adapter(folder):
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def straight(small_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    log = run_train(small_model, out)
    assert "experts      NF4 Triton kernels" in log and "step: CUDA graphs" in log, log
    return out


def test_two_identical_runs_give_identical_adapters(small_model, straight, tmp_path):
    run_train(small_model, tmp_path)
    assert_same(adapter(tmp_path / "adapter"), adapter(straight / "adapter"))


def test_stopping_and_resuming_equals_the_straight_run(small_model, straight, tmp_path):
    run_train(small_model, tmp_path, "--max-steps", "5")
    run_train(small_model, tmp_path, "--resume", "auto")
    assert_same(adapter(tmp_path / "adapter"), adapter(straight / "adapter"))


def test_sigterm_mid_run_saves_and_resumes_exactly(small_model, straight, tmp_path):
    child = subprocess.Popen(train_args(small_model, tmp_path), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and child.poll() is None:
        if metrics.is_file() and sum(1 for line in metrics.read_text().splitlines() if '"train"' in line) >= 2:
            break
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=300)
    assert child.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert list(tmp_path.glob("checkpoint-*")), "the stop wrote no checkpoint"
    run_train(small_model, tmp_path, "--resume", "auto")
    assert_same(adapter(tmp_path / "adapter"), adapter(straight / "adapter"))


def test_the_plain_path_trains_too(small_model, tmp_path):
    log = run_train(small_model, tmp_path, "--kernels", "plain", "--max-steps", "3")
    assert "plain path: --kernels plain" in log and "step: eager" in log, log


def test_a_non_finite_step_is_skipped(small_model, tmp_path):
    """A learning rate that overflows the adapter gives non-finite losses: steps skipped, run stopped."""
    done = subprocess.run(train_args(small_model, tmp_path, "--lr", "1e30", "--warmup-steps", "0",
                                     "--max-grad-norm", "0", "--max-bad-steps", "2"),
                          cwd=ROOT, capture_output=True, text=True)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if r.get("kind") == "train" and r["skipped"]]
    assert skipped, records
    assert done.returncode in (0, 1), done.stderr[-2000:]


# --- long sequences: tiled experts and offloaded checkpoints on the GPU (issue 16) ---------------

def lora_grads(model, params, ids, graphed=None):
    """The adapter's gradient of one micro-batch's summed loss, eager or through a GraphedStep."""
    for p in params:
        p.grad = None
    if graphed is None:
        total, _ = model.loss(ids, ids.cpu(), "sum")
        total.backward()
    else:
        total = graphed.step(ids, ids.cpu(), 1.0)
    torch.cuda.synchronize()
    return total.detach().clone(), [p.grad.clone() for p in params]


@pytest.fixture(scope="module")
def small_nf4(small_model):
    from lora import inject, lora_parameters
    from model import load_model
    model = load_model(str(small_model / "model"), quantize="nf4", device="cuda", dtype=torch.bfloat16)
    inject(model, rank=8, alpha=8, verbose=False)
    generator = torch.Generator("cuda").manual_seed(3)
    for name, p in lora_parameters(model):   # B != 0, so A's gradients are not all zero
        if name.endswith("lora_B"):
            p.data.normal_(0, 0.02, generator=generator)
    model.gradient_checkpointing, model.fast_paths = True, fast()
    model.train()
    return model, [p for _, p in lora_parameters(model)]


def set_tile(model, tile):
    for block in model.model.layers:
        block.mlp.tile = tile


def test_tiled_experts_equal_the_whole_layer_eager_and_in_a_graph(small_nf4):
    """Tiles of 64 tokens over 300: the NF4 layer's rows are the same products, so the same bits;
    a CUDA graph of the tiled step (nested autograd in its backward) replays the eager step's bits."""
    from model.fast.cuda_graph import GraphedStep
    model, params = small_nf4
    ids = torch.randint(0, model.config.vocab_size, (1, 300), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(7))
    set_tile(model, None)
    whole = lora_grads(model, params, ids)
    set_tile(model, 64)
    try:
        tiled = lora_grads(model, params, ids)
        graphed = lora_grads(model, params, ids, GraphedStep(model, params, fast()))
    finally:
        set_tile(model, 8192)
    for a, b in zip([whole[0], *whole[1]], [tiled[0], *tiled[1]]):
        assert rel(a, b) < 1e-3
    assert torch.equal(tiled[0], graphed[0]) or rel(tiled[0], graphed[0]) < 1e-6
    for a, b in zip(tiled[1], graphed[1]):
        assert rel(a, b) < 1e-3


def test_kept_blocks_give_bit_identical_gradients_on_the_gpu(small_nf4):
    """Blocks outside checkpoint (NF4 expert kernels, flex attention): the recomputation's bits, eager
    and replayed as a CUDA graph (a graph captured per kept count)."""
    from model.fast.cuda_graph import GraphedStep
    model, params = small_nf4
    ids = torch.randint(0, model.config.vocab_size, (1, 300), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(9))
    results = []
    try:
        for kept in (0, 1, len(model.model.layers)):
            model.kept_blocks = kept
            results.append(lora_grads(model, params, ids))
            results.append(lora_grads(model, params, ids, GraphedStep(model, params, fast())))
    finally:
        model.kept_blocks = 0
    for other in results[1:]:
        assert torch.equal(results[0][0], other[0])
        for a, b in zip(results[0][1], other[1]):
            assert torch.equal(a, b)


def test_offloaded_checkpoints_give_bit_identical_gradients_on_the_gpu(small_nf4):
    """Pinned host copies on a side stream, prefetched in the backward: the same bits as kept on the GPU."""
    model, params = small_nf4
    ids = torch.randint(0, model.config.vocab_size, (1, 300), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(8))
    results = []
    for offload in (False, True):
        model.offload_activations = offload
        results.append(lora_grads(model, params, ids))
    model.offload_activations = False
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.equal(a, b)


def test_the_embedding_on_the_cpu_gives_bit_identical_gradients_eager_and_in_a_graph(small_nf4):
    """The table on the CPU (looked up into pinned memory, copied without blocking the host): the same
    bits as on the GPU, eager and over graph replays of new ids (each lookup's memory in use until its
    copy has read it)."""
    from model.fast.cuda_graph import GraphedStep
    model, params = small_nf4
    generator = torch.Generator("cuda").manual_seed(10)
    batches = [torch.randint(0, model.config.vocab_size, (1, 300), device="cuda", generator=generator)
               for _ in range(3)]
    on_gpu = [lora_grads(model, params, ids) for ids in batches]
    emb = model.model.embed_tokens
    emb.to("cpu")
    try:
        eager = [lora_grads(model, params, ids) for ids in batches]
        graphed = GraphedStep(model, params, fast())
        replayed = [lora_grads(model, params, ids, graphed) for ids in batches]
    finally:
        emb.to("cuda")
    for expected, got_eager, got_graph in zip(on_gpu, eager, replayed):
        for got in (got_eager, got_graph):
            assert torch.equal(expected[0], got[0])
            for a, b in zip(expected[1], got[1]):
                assert torch.equal(a, b)
