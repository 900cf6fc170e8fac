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
from model import nf4_gemm as nf4_gemm_module
from model.moe import Experts
from model.nf4 import NF4Experts, NF4Tensor


@pytest.fixture(scope="module")
def gemm():
    """model.nf4_gemm with its kernels built for the interpreter (the switch is read when they are defined)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("TRITON_INTERPRET", "1")
    yield importlib.reload(nf4_gemm_module)
    patch.undo()
    importlib.reload(nf4_gemm_module)


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


def test_scales_undo_the_double_quantisation(gemm):
    torch.manual_seed(1)
    w = NF4Tensor(torch.randn(2, 64, 512), compute_dtype=torch.float32)
    codes = torch.stack([w.packed.view(-1) >> 4, w.packed.view(-1) & 15], dim=1).view(-1).long()
    by_hand = w.state.code[codes] * gemm.scales(w).repeat_interleave(64)
    assert torch.equal(by_hand.view(w.shape), w.dequantize())


def test_nf4_experts_take_the_kernels_and_keep_forward_and_gradient(gemm, monkeypatch):
    """A layer's NF4 experts through the kernels equal the same layer dequantised, values and input gradient."""
    torch.manual_seed(2)
    config = GptOssConfig.from_name("tiny")
    dense = Experts(config)
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.1)
    nf4 = NF4Experts(config)
    nf4.gate_up_proj_bias.data.copy_(dense.gate_up_proj_bias)
    nf4.down_proj_bias.data.copy_(dense.down_proj_bias)
    for name in ("gate_up_proj", "down_proj"):
        nf4.set_weight(name, getattr(dense, name).data, compute_dtype=torch.float32)
        getattr(dense, name).data.copy_(nf4.dequantized(name))   # the dense twin holds the same weights

    calls = []
    for name in ("grouped_mm", "grouped_mm_t"):
        fn = getattr(gemm, name)
        monkeypatch.setattr(gemm, name, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
    x = torch.randn(23, config.hidden_size)
    weights = torch.rand(23, config.num_experts_per_tok).softmax(-1)
    idx = torch.stack([torch.randperm(config.num_local_experts)[:config.num_experts_per_tok] for _ in range(23)])
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = nf4(x1, weights, idx), dense(x2, weights, idx)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert calls.count("grouped_mm") == 2 and calls.count("grouped_mm_t") == 2, calls
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
