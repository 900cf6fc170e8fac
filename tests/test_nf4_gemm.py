"""The NF4 grouped-product kernels, run in Triton's interpreter on the CPU.

On the GPU they run in bf16 (bench/check_cuda.py compares them there); the interpreter cannot do
bf16 arithmetic, so here they run in float32, where the dequantised weights are exact and the only
difference from dequantise-then-multiply is the order of the sums.
"""
import importlib

import pytest
import torch
import triton  # noqa: F401  (a test requirement: without it these tests must fail, not vanish)

from model import GptOssConfig
from model.fast import dense_gemm as dense_gemm_module
from model.fast import gate
from model.fast import nf4_gemm as nf4_gemm_module
from model.moe import Experts
from model.weights.nf4 import NF4Experts, NF4Tensor


@pytest.fixture(scope="module")
def gemm():
    """model.fast.nf4_gemm with its kernels built for the interpreter (the switch is read when they are
    defined), and dense_gemm's epilogue, which expert LoRA's backward runs."""
    patch = pytest.MonkeyPatch()
    patch.setenv("TRITON_INTERPRET", "1")
    module = importlib.reload(nf4_gemm_module)
    importlib.reload(dense_gemm_module)
    yield module
    patch.undo()
    importlib.reload(nf4_gemm_module)
    importlib.reload(dense_gemm_module)


def per_expert(x, w, counts, transpose=False):
    out, start = [], 0
    for e, c in enumerate(counts):
        out.append(x[start:start + c] @ (w[e].T if transpose else w[e]))
        start += c
    return torch.cat(out)


# (experts, in, out, rows per expert): empty experts, partial tiles in every direction, an expert
# spanning several row tiles, and out not a multiple of the 128-wide tile (2880 is not either)
SHAPES = [(3, 96, 192, [5, 0, 70]), (4, 64, 128, [0, 0, 0, 9]), (2, 200, 64, [130, 1])]


@pytest.mark.parametrize("experts, n_in, n_out, counts", SHAPES)
def test_products_equal_dequantise_then_multiply(gemm, experts, n_in, n_out, counts):
    torch.manual_seed(0)
    w = NF4Tensor(torch.randn(experts, n_in, n_out), compute_dtype=torch.float32)
    dense = w.dequantize()
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    x, dy = torch.randn(sum(counts), n_in), torch.randn(sum(counts), n_out)
    bias = torch.randn(experts, n_out)
    expert = torch.repeat_interleave(torch.arange(experts), torch.tensor(counts))

    y = gemm.grouped_mm(x, w, offsets, bias)
    torch.testing.assert_close(y, per_expert(x, dense, counts) + bias[expert], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gemm.grouped_mm(x, w, offsets), per_expert(x, dense, counts), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gemm.grouped_mm_t(dy, w, offsets), per_expert(dy, dense, counts, transpose=True),
                               rtol=1e-5, atol=1e-4)


def check_rows_read_in_place(gemm, w, n_in, n_out, counts, seed=0):
    """The products with src (rows read in place from fewer token rows) are bit for bit those of the
    gathered copy: forward, with the SwiGLU epilogue, and transposed; and a term added in the epilogue
    is the term added after."""
    g = torch.Generator().manual_seed(seed)
    tokens = 7
    src = torch.randint(0, tokens, (sum(counts),), generator=g, dtype=torch.int32)
    x, dy = torch.randn(tokens, n_in, generator=g), torch.randn(tokens, n_out, generator=g)
    bias = torch.randn(len(counts), n_out, generator=g)
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    gathered = gemm.grouped_mm_swiglu(x[src.long()], w, offsets, bias, 1.702, 7.0)
    in_place = gemm.grouped_mm_swiglu(x, w, offsets, bias, 1.702, 7.0, src=src)
    for a, b in zip(gathered, in_place):
        assert torch.equal(a, b)
    assert torch.equal(gemm.grouped_mm_t(dy[src.long()], w, offsets), gemm.grouped_mm_t(dy, w, offsets, src=src))
    # a (rows, out) term added in the epilogue (expert LoRA's product) equals adding it after, in float32
    rows = x[src.long()]
    more = torch.randn(len(src), n_out, generator=g)
    for b in (bias, None):
        assert torch.equal(gemm.grouped_mm(rows, w, offsets, b, add=more), gemm.grouped_mm(rows, w, offsets, b) + more)


def test_rows_read_in_place_equal_the_gathered_rows(gemm):
    torch.manual_seed(0)
    check_rows_read_in_place(gemm, NF4Tensor(torch.randn(3, 96, 192), compute_dtype=torch.float32), 96, 192,
                             [5, 0, 70])


def test_the_kernels_weights_are_bitsandbytes_own_bit_for_bit(gemm):
    """Identity rows pick out W[e] itself: the weights the kernels multiply by equal bitsandbytes'
    dequantisation exactly, double-quantised scales and partial tiles included (float32: the
    interpreter's products)."""
    torch.manual_seed(6)
    w = NF4Tensor(torch.randn(2, 64, 192) * 0.02, compute_dtype=torch.float32)
    assert w.state.nested
    eye = torch.eye(64).repeat(2, 1)
    got = gemm.grouped_mm(eye, w, torch.tensor([64, 128], dtype=torch.int32))
    assert torch.equal(got.view(2, 64, 192), w.dequantize())


def test_every_generations_tiles_give_the_same_products(gemm):
    """The tiles tiles_for picks for each GPU generation (here in the interpreter, which takes any)
    compute what dequantise-then-multiply does, partial tiles included (out = 192: 64-wide tiles
    fill it, 128-wide ones end half empty)."""
    torch.manual_seed(5)
    experts, n_in, n_out, counts = 3, 96, 192, [5, 0, 140]
    w = NF4Tensor(torch.randn(experts, n_in, n_out), compute_dtype=torch.float32)
    dense = w.dequantize()
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    x, dy, bias = torch.randn(sum(counts), n_in), torch.randn(sum(counts), n_out), torch.randn(experts, n_out)
    expert = torch.repeat_interleave(torch.arange(experts), torch.tensor(counts))
    seen = []
    for cap in [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]:
        tiles, tiles_t = gemm.tiles_for(cap)
        if (tiles, tiles_t) in seen:
            continue
        seen.append((tiles, tiles_t))
        torch.testing.assert_close(gemm.grouped_mm(x, w, offsets, bias, tiles=tiles),
                                   per_expert(x, dense, counts) + bias[expert], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(gemm.grouped_mm_t(dy, w, offsets, tiles=tiles_t),
                                   per_expert(dy, dense, counts, transpose=True), rtol=1e-5, atol=1e-4)
    assert len(seen) == 3, seen       # Hopper's, data-center Blackwell's and the rest


def test_sum_rows_equals_the_gathered_sums(gemm):
    """Each token's k rows summed (weighted: the layer's output; not: its input's gradient) in one
    kernel, equal to moe.weighted_sum and moe.sum_per_token, with widths that leave partial tiles."""
    from model.moe import sort_by_expert, sum_per_token, weighted_sum
    torch.manual_seed(4)
    n, k, dim = 37, 4, 300
    idx = torch.stack([torch.randperm(8)[:k] for _ in range(n)])
    _, _, _, _, inverse = sort_by_expert(idx, 8)
    rows, weights = torch.randn(n * k, dim), torch.rand(n, k)
    torch.testing.assert_close(gemm.sum_rows(rows, inverse, k, weights), weighted_sum(rows, weights, inverse, rows),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gemm.sum_rows(rows, inverse, k), sum_per_token(rows, inverse, k), rtol=1e-6, atol=1e-6)


def test_scales_undo_the_double_quantisation(gemm):
    torch.manual_seed(1)
    w = NF4Tensor(torch.randn(2, 64, 512), compute_dtype=torch.float32)
    codes = torch.stack([w.packed.view(-1) >> 4, w.packed.view(-1) & 15], dim=1).view(-1).long()
    d, offset = gemm.scales(w)
    by_hand = w.state.code[codes] * (d + offset).repeat_interleave(64)
    assert torch.equal(by_hand.view(w.shape), w.dequantize())
    assert w.state.nested and offset.shape == (1,) and offset.item() != 0      # the offset is the kernels' to add


def nf4_and_dense_experts(seed=2, storage=NF4Experts):
    """A tiny config's 4-bit experts (NF4Experts, or test_mxfp4's MXFP4Experts) and a dense twin holding
    the dequantised weights (float32)."""
    torch.manual_seed(seed)
    config = GptOssConfig.from_name("tiny")
    dense = Experts(config)
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.1)
    quantised = storage(config)
    quantised.gate_up_proj_bias.data.copy_(dense.gate_up_proj_bias)
    quantised.down_proj_bias.data.copy_(dense.down_proj_bias)
    for name in ("gate_up_proj", "down_proj"):
        quantised.set_weight(name, getattr(dense, name).data, compute_dtype=torch.float32)
        getattr(dense, name).data.copy_(quantised.dequantized(name))
    return config, quantised, dense


def routed_tokens(config, n=23):
    x = torch.randn(n, config.hidden_size) * 4                    # large enough to reach the SwiGLU's clamps
    weights = torch.rand(n, config.num_experts_per_tok).softmax(-1)
    idx = torch.stack([torch.randperm(config.num_local_experts)[:config.num_experts_per_tok] for _ in range(n)])
    return x, weights, idx


def count_calls(gemm, monkeypatch):
    calls = []
    for name in ("grouped_mm", "grouped_mm_t", "grouped_mm_swiglu"):
        fn = getattr(gemm, name)
        monkeypatch.setattr(gemm, name, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
    return calls


@pytest.mark.parametrize("train_biases", [False, True])
def test_nf4_experts_take_the_kernels_and_keep_forward_and_gradient(gemm, monkeypatch, train_biases):
    config, nf4, dense = nf4_and_dense_experts()
    x, weights, idx = routed_tokens(config)
    assert nf4.limit < 8, "x * 4 is meant to reach the clamps"
    check_kernels_keep_forward_and_gradient(gemm, monkeypatch, nf4, dense, x, weights, idx, train_biases)


def check_kernels_keep_forward_and_gradient(gemm, monkeypatch, quantised, dense, x, weights, idx, train_biases,
                                            fast=None):
    """A layer's 4-bit experts (NF4, or test_mxfp4's MXFP4) through the kernels equal the same layer
    dequantised: output, and the gradients of the input, the routing weights and (when they train) the
    biases.

    Frozen biases (LoRA's case) take the fused layer (`_NF4ExpertLayer`), with its own backward; biases
    that train take Experts.forward over the separate products. fast: the paths (default: the CPU's).
    """
    biases = ("gate_up_proj_bias", "down_proj_bias")
    for name in biases:
        getattr(quantised, name).requires_grad_(train_biases)
        getattr(dense, name).requires_grad_(train_biases)
    calls = count_calls(gemm, monkeypatch)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    w1, w2 = weights.clone().requires_grad_(), weights.clone().requires_grad_()
    y1, y2 = quantised(x1, w1, idx, fast or gate.decide("cpu")), dense(x2, w2, idx)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    layer = ["grouped_mm_swiglu", "grouped_mm", "grouped_mm_t", "grouped_mm_t"]
    assert calls == (["grouped_mm"] * 2 + ["grouped_mm_t"] * 2 if train_biases else layer), calls
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-4)
    for name in biases:
        if train_biases:
            torch.testing.assert_close(getattr(quantised, name).grad, getattr(dense, name).grad, rtol=1e-5,
                                       atol=1e-5)
        else:
            assert getattr(quantised, name).grad is None


def expert_lora(base, matrices=("gate_up_proj", "down_proj")):
    """LoRA r4 on `matrices` of frozen experts `base`, every adapter matrix ~ N(0, 0.1) (B too, so that
    each has a gradient), the same for the same base shapes."""
    from lora.layers import LoRAExperts
    torch.manual_seed(9)
    layer = LoRAExperts(base.requires_grad_(False), rank=4, alpha=8, matrices=matrices)
    for p in layer.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    return layer


def check_expert_lora_on_the_kernels(gemm, monkeypatch, quantised, dense, x, weights, idx, fast=None,
                                     matrices=("gate_up_proj", "down_proj")):
    """Expert LoRA (on `matrices`) over 4-bit experts runs in the frozen experts' fused layer
    (`_NF4ExpertLayer`, the SwiGLU in gate_up's epilogue), whose kernels add the low-rank terms (`add`),
    and equals it over the same experts dequantised (Experts.forward): output, and the gradients of
    the input, the routing weights and every adapter matrix."""
    layers = [expert_lora(base, matrices) for base in (quantised, dense)]
    calls = count_calls(gemm, monkeypatch)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    w1, w2 = weights.clone().requires_grad_(), weights.clone().requires_grad_()
    y1, y2 = layers[0](x1, w1, idx, fast or gate.decide("cpu")), layers[1](x2, w2, idx)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert calls == ["grouped_mm_swiglu", "grouped_mm", "grouped_mm_t", "grouped_mm_t"], calls
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-4)
    grads = [[p.grad for p in layer.parameters() if p.requires_grad] for layer in layers]
    assert len(grads[0]) == 2 * len(matrices)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("matrices", [("gate_up_proj", "down_proj"), ("gate_up_proj",), ("down_proj",)])
def test_expert_lora_on_the_kernels_equals_it_on_the_dequantised_experts(gemm, monkeypatch, matrices):
    config, nf4, dense = nf4_and_dense_experts(seed=8)
    x, weights, idx = routed_tokens(config, n=40)
    check_expert_lora_on_the_kernels(gemm, monkeypatch, nf4, dense, x, weights, idx, matrices=matrices)


def test_expert_lora_with_dropout_takes_the_separate_projections(gemm, monkeypatch):
    """The fused layer multiplies x itself, so an adapter with dropout (which must see its own dropped
    copy of x) runs Experts.forward over the separate products instead."""
    from lora.layers import LoRAExperts
    config, nf4, _ = nf4_and_dense_experts(seed=8)
    layer = LoRAExperts(nf4.requires_grad_(False), rank=4, alpha=8, dropout=0.1)
    calls = count_calls(gemm, monkeypatch)
    x, weights, idx = routed_tokens(config)
    layer(x.requires_grad_(), weights, idx, gate.decide("cpu")).sum().backward()
    assert calls == ["grouped_mm"] * 2 + ["grouped_mm_t"] * 2, calls


@pytest.mark.parametrize("early_stop", [True, False])
def test_checkpoint_recomputation_skips_down_and_keeps_gradients_exact(gemm, monkeypatch, early_stop):
    """Under the model's checkpointing, the recomputation runs gate_up only, and every gradient is
    bit-identical to the same layer without checkpointing; also where checkpoint does not stop the
    recomputation early (the layer's NaN stand-in output then flows on, into nothing saved)."""
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop
    from model.fast.recompute import mark_recomputation
    config, nf4, _ = nf4_and_dense_experts(seed=4)
    nf4.requires_grad_(False)
    x, weights, idx = routed_tokens(config)
    calls = count_calls(gemm, monkeypatch)
    grads = {}
    for checkpointed in (False, True):
        xi, wi = x.clone().requires_grad_(), weights.clone().requires_grad_()
        calls.clear()
        with set_checkpoint_early_stop(early_stop):
            if checkpointed:   # the layer and a residual add, as in a block
                y = checkpoint(lambda a, b: a + nf4(a, b, idx, gate.decide("cpu")), xi, wi, use_reentrant=False,
                               context_fn=mark_recomputation)
            else:
                y = xi + nf4(xi, wi, idx, gate.decide("cpu"))
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads[checkpointed] = (y.detach(), xi.grad, wi.grad, list(calls))
    assert grads[False][3] == ["grouped_mm_swiglu", "grouped_mm", "grouped_mm_t", "grouped_mm_t"]
    assert grads[True][3] == ["grouped_mm_swiglu", "grouped_mm", "grouped_mm_swiglu", "grouped_mm_t", "grouped_mm_t"]
    for a, b in zip(grads[False][:3], grads[True][:3]):
        assert torch.equal(a, b)


def test_swiglu_epilogue_equals_the_separate_swiglu(gemm):
    """gate_up with the SwiGLU in its epilogue stores the same y and the model's SwiGLU of it, also
    where the clamps bind; without keep_y it stores h alone."""
    from model.moe import swiglu
    torch.manual_seed(3)
    experts, hidden, inter, counts = 3, 64, 96, [40, 0, 131]
    w_gu = NF4Tensor(torch.randn(experts, hidden, 2 * inter), compute_dtype=torch.float32)
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    bias = torch.randn(experts, 2 * inter)
    x = torch.randn(sum(counts), hidden)
    alpha, limit = 1.702, 7.0

    y, h = gemm.grouped_mm_swiglu(x, w_gu, offsets, bias, alpha, limit)
    assert torch.equal(y, gemm.grouped_mm(x, w_gu, offsets, bias))       # the same tile, stored as before
    assert (y[:, 0::2] > limit).any() and (y[:, 1::2].abs() > limit).any()  # both clamps are exercised
    torch.testing.assert_close(h, swiglu(y, alpha, limit), rtol=1e-5, atol=1e-5)
    none, h2 = gemm.grouped_mm_swiglu(x, w_gu, offsets, bias, alpha, limit, keep_y=False)
    assert none is None and torch.equal(h2, h)


def test_mlp_backward_kernel_equals_the_plain_backward(gemm):
    """The expert MLP's backward in one kernel (dy and <g, h> per row) against moe.expert_mlp_backward,
    its definition: rows and widths that are not multiples of the kernel's tiles, both clamps binding, and
    values exactly on the bounds, where the gradient passes or not as the installed torch's clamp does."""
    from model.moe import expert_mlp_backward
    torch.manual_seed(4)
    rows, inter, alpha, limit = 37, 100, 1.702, 7.0
    y = torch.randn(rows, 2 * inter) * 6
    y[:5, 0::2], y[5:10, 1::2], y[10:15, 1::2] = limit, limit, -limit    # on the bounds (7.0 is exact)
    g, w = torch.randn(rows, inter), torch.rand(rows)
    dy, gh = gemm.mlp_backward(y, g, w, alpha, limit)
    ref_dy, ref_gh = expert_mlp_backward(y, g, w, alpha, limit)
    assert (y[:, 0::2] > limit).any() and (y[:, 1::2].abs() > limit).any()
    torch.testing.assert_close(dy, ref_dy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-5)
    assert torch.equal(dy[:15] == 0, ref_dy[:15] == 0)       # the bounds pass the gradient exactly as the reference


def poison_past_the_last_offset(gemm, monkeypatch):
    """Make the kernels' unwritten rows (past offsets[-1]) NaN, as uninitialised memory may be; return
    the (rows given, rows computed) of each call."""
    seen = []

    def poisoned(fn, *args, **kwargs):
        out = fn(*args, **kwargs)
        end = int(args[2][-1])                              # offsets, every function's third argument
        src = kwargs.get("src")                             # the sorted rows, read in place from the tokens'
        seen.append((args[0].shape[0] if src is None else src.shape[0], end))
        for t in out if isinstance(out, tuple) else (out,):
            if t is not None:
                t[end:] = float("nan")
        return out

    for name in ("grouped_mm", "grouped_mm_t", "grouped_mm_swiglu"):
        monkeypatch.setattr(gemm, name, lambda *a, _fn=getattr(gemm, name), **k: poisoned(_fn, *a, **k))
    return seen


def test_padding_tokens_get_no_expert_and_leave_no_trace(gemm, monkeypatch):
    config, nf4, _ = nf4_and_dense_experts(seed=5)
    check_padding_is_skipped(gemm, monkeypatch, config, nf4.requires_grad_(False))


def test_padding_leaves_no_trace_in_expert_lora_either(gemm, monkeypatch):
    config, nf4, _ = nf4_and_dense_experts(seed=5)
    check_padding_is_skipped(gemm, monkeypatch, config, expert_lora(nf4))


def check_padding_is_skipped(gemm, monkeypatch, config, layer, fast=None):
    """A fused expert layer (NF4 or MXFP4, frozen, or expert LoRA on it) with some tokens marked padding:
    the kernels compute only the other tokens' rows, whose output and gradients (the adapter's too)
    equal the layer run on those tokens alone; the padding's output and gradients are exactly zero,
    though the rows left unwritten hold NaN."""
    x, weights, idx = routed_tokens(config, n=23)
    padding = torch.zeros(23, dtype=torch.bool)
    padding[[3, 15, 16, 17, 18, 19, 20, 21, 22]] = True
    real = ~padding
    seen = poison_past_the_last_offset(gemm, monkeypatch)
    g = torch.randn(23, config.hidden_size)
    x1, w1 = x.clone().requires_grad_(), weights.clone().requires_grad_()
    fast = fast or gate.decide("cpu")
    trained = [p for p in layer.parameters() if p.requires_grad]
    y1 = layer(x1, w1, idx, fast, padding)
    y1.backward(g)
    k = config.num_experts_per_tok
    assert seen == [(23 * k, 14 * k)] * 4                    # gate_up, down, and both transposed products
    grads = [p.grad for p in trained]
    for p in trained:
        p.grad = None
    x2, w2 = x[real].clone().requires_grad_(), weights[real].clone().requires_grad_()
    y2 = layer(x2, w2, idx[real], fast)
    y2.backward(g[real])
    for a, p in zip(grads, trained):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y1[real], y2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x1.grad[real], x2.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w1.grad[real], w2.grad, rtol=1e-6, atol=1e-6)
    for t in (y1, x1.grad, w1.grad):
        assert t.isfinite().all() and t[padding].eq(0).all()


def test_a_packed_rows_padding_skips_the_experts_and_changes_no_document(gemm, monkeypatch, tiny_model):
    """A tiny model with NF4 experts on the kernels: a packed row's padding (data.PADDING_DOC) reaches
    the experts as padding, and every document's logits and the LoRA gradients are those of the
    examples alone."""
    from data import packed_rows
    from lora import inject, lora_parameters
    from test_model import summed_alone
    config = tiny_model.config
    for block in tiny_model.model.layers:
        dense, nf4 = block.mlp.experts, NF4Experts(config)
        for name in ("gate_up_proj", "down_proj"):
            nf4.set_weight(name, getattr(dense, name).data, compute_dtype=torch.float32)
            getattr(nf4, name + "_bias").data.copy_(getattr(dense, name + "_bias"))
        block.mlp.experts = nf4.requires_grad_(False)
    tiny_model.fast_paths = gate.decide("cpu")
    assert tiny_model.fast_paths.nf4_kernels
    inject(tiny_model, rank=4, alpha=8, verbose=False)
    params = [p for _, p in lora_parameters(tiny_model)]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    docs = [torch.randint(1, 1000, (n,), generator=g).tolist() for n in (17, 9, 26)]
    examples = [(d, [-100] * (len(d) - 4) + d[-4:]) for d in docs]
    row = packed_rows(examples, 60, pad_id=0)                              # 8 pad tokens
    seen = poison_past_the_last_offset(gemm, monkeypatch)
    total, count = tiny_model.loss(row.input_ids, row.labels, "sum", row.doc_ids, row.positions)
    packed = torch.autograd.grad(total, params)
    k = config.num_experts_per_tok
    assert seen and all(rows == 60 * k and end == 52 * k for rows, end in seen), seen
    alone_total, alone = summed_alone(tiny_model, examples, params)
    torch.testing.assert_close(total.detach(), alone_total, rtol=1e-6, atol=1e-5)
    for a, b in zip(packed, alone):
        assert a.isfinite().all() and (a - b).abs().max() < 1e-5
