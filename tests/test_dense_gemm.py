"""The experts' dense path (model/fast/dense_gemm.py): the layer's 4-bit experts dequantised by one
kernel, then one grouped product. On the CPU the kernels run in Triton's interpreter (float32, where
the dequantised weights are exact) and the product is a loop over the experts; the GPU test
(tests/test_gpu.py) holds torch._grouped_mm in bf16 to the fused kernels."""
import dataclasses
import importlib

import pytest
import torch
import triton  # noqa: F401  (a test requirement: without it these tests must fail, not vanish)

from model import GptOss, GptOssConfig
from model.fast import dense_gemm as dense_gemm_module
from model.fast import gate
from model.fast import mxfp4_gemm as mxfp4_gemm_module
from model.fast import nf4_gemm as nf4_gemm_module
from model.moe import swiglu_reference
from model.weights.mxfp4 import MXFP4Experts
from model.weights.nf4 import NF4Tensor
from test_mxfp4 import random_mxfp4
from test_nf4_gemm import (check_expert_lora_on_the_kernels, check_kernels_keep_forward_and_gradient,
                           check_padding_is_skipped, expert_lora, nf4_and_dense_experts, per_expert,
                           routed_tokens)

MODULES = (nf4_gemm_module, mxfp4_gemm_module, dense_gemm_module)   # in import order


@pytest.fixture(scope="module")
def dense():
    """model.fast.dense_gemm with its kernels, and the fused modules' dequantisations, built for the
    interpreter."""
    patch = pytest.MonkeyPatch()
    patch.setenv("TRITON_INTERPRET", "1")
    for m in MODULES:
        importlib.reload(m)
    yield dense_gemm_module
    patch.undo()
    for m in MODULES:
        importlib.reload(m)


# the CPU's paths with the experts' kernels in the interpreter, and the dense path chosen
DENSE = dataclasses.replace(gate.cpu_paths(), nf4_kernels=True, dense_experts=True)


def nf4(experts, n_in, n_out, seed=0):
    torch.manual_seed(seed)
    return NF4Tensor(torch.randn(experts, n_in, n_out), compute_dtype=torch.float32)


# (not bfloat16: Triton's interpreter rounds to it by truncation; tests/test_gpu.py holds bf16 to bitsandbytes)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequantize_is_bitsandbytes_and_dequantize_mxfp4s_own_bit_for_bit(dense, dtype):
    """One kernel writes the whole tensor as the storages' own dequantisation does: NF4 with its
    double-quantised scales, in fp32 and in a 16-bit dtype (stored as pairs in 32-bit words), MXFP4
    (every code, scales 2^-9..2^2) as the transposed view of its stored (experts, out, in), which
    torch._grouped_mm reads as it is."""
    torch.manual_seed(0)
    w = NF4Tensor(torch.randn(3, 96, 192), compute_dtype=dtype)
    assert w.state.nested
    got = nf4_gemm_module.dequantize(w)
    assert got.dtype == dtype and torch.equal(got, w.dequantize())
    m = random_mxfp4(3, 96, 192)
    got = mxfp4_gemm_module.dequantize(m)
    assert torch.equal(got, m.dequantize()) and got.shape == (3, 96, 192) and got.stride() == (96 * 192, 1, 96)


def test_the_attentions_nf4_weights_take_the_one_kernel_where_the_nf4_kernels_run(dense):
    """NF4Linear dequantised by nf4_gemm.dequantize gives bitsandbytes' output and input gradient bit for bit
    (300 blocks: the second-level scales' last group partial); the model sets the switch from its fast
    paths at a forward whenever their choice changes."""
    from model.weights.nf4 import NF4Linear
    torch.manual_seed(3)
    layer = NF4Linear(128, 150, bias=torch.randn(150))
    layer.set_weight(torch.randn(150, 128), compute_dtype=torch.float32)
    x = torch.randn(5, 128)
    out = []
    for kernel in (False, True):
        layer.kernel = kernel
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        out.append((y, xi.grad))
    assert all(torch.equal(a, b) for a, b in zip(*out))
    model = GptOss(GptOssConfig.from_name("tiny"))
    q = model.model.layers[0].self_attn.q_proj
    layer = NF4Linear(q.in_features, q.out_features)
    layer.set_weight(q.weight.data, compute_dtype=torch.float32)
    model.model.layers[0].self_attn.q_proj = layer
    for paths in (DENSE, gate.cpu_paths()):
        model.fast_paths = paths
        model(torch.tensor([[1, 2, 3]]))
        assert layer.kernel is paths.nf4_kernels


@pytest.mark.parametrize("storage", ["nf4", "mxfp4"])
def test_products_equal_dequantise_then_multiply(dense, storage):
    """The three products, with a frozen bias, an added term and the SwiGLU in the epilogue, rows read
    through src, an empty expert, and rows past the last offset (padding) left unwritten."""
    experts, n_in, n_out, counts, padding = 3, 96, 192, [5, 0, 70], 4
    w = nf4(experts, n_in, n_out, seed=1) if storage == "nf4" else random_mxfp4(experts, n_in, n_out, seed=1)
    gemm = dense.NF4 if storage == "nf4" else dense.MXFP4
    weights = w.dequantize()
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    rows = sum(counts) + padding
    tokens = torch.randn(30, n_in) * 3
    src = torch.randint(0, 30, (rows,), dtype=torch.int32)
    x, dy, add = tokens[src], torch.randn(rows, n_out), torch.randn(rows, n_out)
    bias = torch.randn(experts, n_out)
    expert = torch.repeat_interleave(torch.arange(experts), torch.tensor(counts))
    ref = per_expert(x, weights, counts) + bias[expert]
    real = slice(0, sum(counts))

    torch.testing.assert_close(gemm.grouped_mm(x, w, offsets, bias)[real], ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gemm.grouped_mm(x, w, offsets, bias, add=add)[real], ref + add[real],
                               rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gemm.grouped_mm(x, w, offsets)[real], per_expert(x, weights, counts),
                               rtol=1e-5, atol=1e-4)
    y, h = gemm.grouped_mm_swiglu(tokens, w, offsets, bias, 1.702, 7.0, src=src)
    torch.testing.assert_close(y[real], ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h[real], swiglu_reference(y[real], 1.702, 7.0), rtol=1e-5, atol=1e-5)
    assert (y[real, 0::2] > 7).any(), "the SwiGLU's clamp is meant to be reached"
    assert gemm.grouped_mm_swiglu(tokens, w, offsets, bias, 1.702, 7.0, keep_y=False, src=src)[0] is None
    torch.testing.assert_close(gemm.grouped_mm_t(dy, w, offsets)[real], per_expert(dy, weights, counts, True),
                               rtol=1e-5, atol=1e-4)
    dy_tokens = torch.randn(30, n_out)
    torch.testing.assert_close(gemm.grouped_mm_t(dy_tokens, w, offsets, src=src)[real],
                               per_expert(dy_tokens[src], weights, counts, True), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("storage", [None, MXFP4Experts])
@pytest.mark.parametrize("train_biases", [False, True])
def test_a_dense_expert_layer_keeps_forward_and_gradient(dense, monkeypatch, storage, train_biases):
    """test_nf4_gemm's check, with the dense path chosen: NF4 and MXFP4 experts equal the layer
    dequantised (output, gradients of input, routing weights and trained biases), through the
    Dequantised products."""
    config, quantised, reference = nf4_and_dense_experts(seed=3, **({"storage": storage} if storage else {}))
    x, weights, idx = routed_tokens(config)
    gemm = dense.MXFP4 if storage else dense.NF4
    check_kernels_keep_forward_and_gradient(gemm, monkeypatch, quantised, reference, x, weights, idx, train_biases,
                                            fast=DENSE)


def test_expert_lora_on_the_dense_path_equals_it_on_the_dequantised_experts(dense, monkeypatch):
    config, quantised, reference = nf4_and_dense_experts(seed=8)
    x, weights, idx = routed_tokens(config, n=40)
    check_expert_lora_on_the_kernels(dense.NF4, monkeypatch, quantised, reference, x, weights, idx, fast=DENSE)


def test_padding_skips_the_dense_path_too(dense, monkeypatch):
    config, quantised, _ = nf4_and_dense_experts(seed=5)
    check_padding_is_skipped(dense.NF4, monkeypatch, config, quantised.requires_grad_(False), fast=DENSE)


def test_the_model_chooses_the_dense_path_only_where_its_kernels_run():
    """GptOss.dense_experts is a request: granted where the experts' kernels and torch._grouped_mm both
    run (the dequantisation is a Triton kernel, the product one grouped kernel), else the paths stay."""
    model = GptOss(GptOssConfig.from_name("tiny"))
    model.dense_experts = True
    both = gate.FastPaths(nf4_kernels=True, grouped_mm=True)
    for paths, granted in ((both, True), (dataclasses.replace(both, grouped_mm=False), False),
                           (dataclasses.replace(both, nf4_kernels=False), False)):
        model.fast_paths = paths
        assert model.fast("cpu").dense_experts is granted
    model.dense_experts = False
    model.fast_paths = both
    assert model.fast("cpu").dense_experts is False



def count_base_calls(monkeypatch, gate_up):
    """Record nf4_gemm's dequantisations and fused products, each as (function, "gate_up" or "down")."""
    calls = []
    for name in ("dequantize", "grouped_mm", "grouped_mm_swiglu", "grouped_mm_t"):
        fn = getattr(nf4_gemm_module, name)

        def counted(*args, _fn=fn, _name=name, **kwargs):
            w = args[0] if _name == "dequantize" else args[1]
            calls.append((_name, "gate_up" if w is gate_up else "down"))
            return _fn(*args, **kwargs)
        monkeypatch.setattr(nf4_gemm_module, name, counted)
    return calls


def checkpointed_and_not(layer, x, weights, idx, calls):
    """The calls of `layer` on the dense path without gradient checkpointing and under it (as the model's
    blocks run it), whose output is the same and whose gradients (input, routing, trained parameters)
    are equal within float32 rounding; nothing stays held after."""
    from torch.utils.checkpoint import checkpoint
    from model.fast.recompute import mark_recomputation
    out = {}
    for checkpointed in (False, True):
        xi, wi = x.clone().requires_grad_(), weights.clone().requires_grad_()
        calls.clear()
        if checkpointed:
            y = checkpoint(lambda a, b: a + layer(a, b, idx, DENSE), xi, wi, use_reentrant=False,
                           context_fn=mark_recomputation)
        else:
            y = xi + layer(xi, wi, idx, DENSE)
        trained = [p for p in layer.parameters() if p.requires_grad]
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        out[checkpointed] = (y.detach(), list(calls), xi.grad, wi.grad, *[p.grad for p in trained])
        for p in trained:
            p.grad = None
        assert dense_gemm_module.NF4.kept is None
    assert torch.equal(out[False][0], out[True][0])
    for a, b in zip(out[False][2:], out[True][2:]):     # the fused kernels sum in another order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    return out[False][1], out[True][1]


@pytest.mark.parametrize("adapted", [False, True])
def test_a_recomputation_keeps_gate_up_for_the_backward_that_follows(dense, monkeypatch, adapted):
    """Under the model's checkpointing, the recomputation's copy of gate_up serves the backward's input
    gradient (gate_up dequantised twice in all, not three times), down's input gradient runs on the fused
    kernel meanwhile, and the gradients (an adapter's too) equal the layer's without checkpointing
    (float32). Expert LoRA rides in the same layer, so it is recomputed the same way."""
    config, quantised, _ = nf4_and_dense_experts(seed=4)
    layer = expert_lora(quantised) if adapted else quantised.requires_grad_(False)
    calls = count_base_calls(monkeypatch, quantised.nf4["gate_up_proj"][0])
    plain, checkpointed = checkpointed_and_not(layer, *routed_tokens(config), calls)
    assert plain == [("dequantize", "gate_up"), ("dequantize", "down"), ("dequantize", "down"),
                     ("dequantize", "gate_up")]
    assert checkpointed == [("dequantize", "gate_up"), ("dequantize", "down"), ("dequantize", "gate_up"),
                            ("grouped_mm_t", "down")]
