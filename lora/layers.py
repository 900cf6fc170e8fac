"""LoRA modules: a frozen base layer plus a trainable low-rank update, scaled by alpha / r.

`LoRALinear` wraps an attention projection (nn.Linear or NF4Linear), `LoRARouter` the router's
logits, `LoRAExperts` a layer's experts (dense, NF4 or MXFP4) with one A/B pair per expert, computed over
the same expert-sorted rows as the experts themselves. The adapter lives in float32; in the forward
it is cast to the activations' dtype (bf16 on GPU), so its gradients land in the float32 tensors.
The base is never changed: B starts at zero, so a fresh adapter leaves the output exactly as it was.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.moe import EXPERT_MATRICES, Experts, Router, grouped_matmul
from model.weights.mxfp4 import MXFP4Experts
from model.weights.nf4 import NF4Experts, NF4Linear


def lora_scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    """alpha / r, or rsLoRA's alpha / sqrt(r) (keeps the update's size steady as the rank grows)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def init_lora_A(a: torch.Tensor, fan_in: int):
    """As PEFT and nn.Linear: kaiming_uniform_(a=sqrt(5)) on a (rank, in) matrix is U(-1/sqrt(in), 1/sqrt(in)).

    Written out so that the per-expert (experts, in, rank) tensors get the same bound as a 2-D A would.
    """
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        a.uniform_(-bound, bound)


def add_low_rank(y, x, lora_A, lora_B, scaling: float, dropout: nn.Module):
    """y + B(A(dropout(x))) * scaling, the update added inside the second product (one addmm): no
    separate scale and add passes over y. A, B (float32) are cast to the activations' dtype."""
    h = F.linear(dropout(x), lora_A.to(x.dtype))                            # (..., rank)
    y2 = torch.addmm(y.flatten(0, -2), h.flatten(0, -2).to(y.dtype), lora_B.to(y.dtype).T, alpha=scaling)
    return y2.view(y.shape)


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    if isinstance(module, NF4Linear) and module.weight_nf4 is not None:
        return module.weight_nf4.packed.device
    raise ValueError(f"cannot tell the device of {type(module).__name__}: it holds no tensors")


class LoRALinear(nn.Module):
    """y = base(x) + B(A(dropout(x))) * scaling, with base an nn.Linear or NF4Linear left frozen.

    lora_A (rank, in) and lora_B (out, rank) have PEFT's shapes, so they are saved as they are.
    """

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        assert isinstance(base_layer, (nn.Linear, NF4Linear)), type(base_layer)
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.rank, self.scaling = rank, lora_scaling(rank, alpha, use_rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = _device_of(base_layer)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=torch.float32))
        init_lora_A(self.lora_A, self.in_features)

    def forward(self, x):
        return add_low_rank(self.base_layer(x), x, self.lora_A, self.lora_B, self.scaling, self.dropout)

    def delta_weight(self) -> torch.Tensor:
        """The update in the base's layout (out, in), float32: W_merged = W + delta."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self):
        return f"rank={self.rank}, scaling={self.scaling:g}"


class LoRARouter(nn.Module):
    """The router with logits = base logits + B(A(dropout(x))) * scaling; top-k and softmax as the base's."""

    def __init__(self, base_layer: Router, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        assert isinstance(base_layer, Router), type(base_layer)
        self.base_layer = base_layer.requires_grad_(False)
        self.top_k = base_layer.top_k
        experts, hidden = base_layer.weight.shape
        self.rank, self.scaling = rank, lora_scaling(rank, alpha, use_rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, hidden, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(experts, rank, device=device, dtype=torch.float32))
        init_lora_A(self.lora_A, hidden)

    def logits(self, x):
        y = self.base_layer.logits(x)                           # (tokens, experts)
        return add_low_rank(y, x, self.lora_A, self.lora_B, self.scaling, self.dropout)

    def forward(self, x):
        return Router.forward(self, x)                          # the base's top-k, on our logits

    def delta_weight(self) -> torch.Tensor:
        """The update of the router weight (experts, hidden), float32."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self):
        return f"rank={self.rank}, scaling={self.scaling:g}"


class LoRAExperts(nn.Module):
    """A layer's experts with a low-rank update per expert on gate_up_proj and/or down_proj.

    For expert e and matrix W (experts, in, out), y = x @ W[e] + (dropout(x) @ A[e]) @ B[e] * scaling,
    A (experts, in, rank), B (experts, rank, out) in the experts' own layout (y = x @ W). Both
    products run over the expert-sorted rows with the base's counts and offsets: on CUDA in bf16 each
    is one grouped kernel, as the base's are; elsewhere `grouped_matmul`'s per-expert loop runs.
    Over NF4 or MXFP4 experts on their kernels (and without dropout) the terms ride in the frozen
    experts' own layer (`factors`, model/fast/nf4_layer.py); elsewhere the routing, sorting and SwiGLU
    are `Experts.forward`'s, and only `gate_up` and `down` change here.
    """

    def __init__(self, base_layer: Experts, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, matrices=EXPERT_MATRICES):
        super().__init__()
        assert isinstance(base_layer, Experts), type(base_layer)
        unknown = set(matrices) - set(EXPERT_MATRICES)
        assert matrices and not unknown, matrices
        self.base_layer = base_layer.requires_grad_(False)
        self.num_experts, self.alpha, self.limit = base_layer.num_experts, base_layer.alpha, base_layer.limit
        self.matrices = tuple(m for m in EXPERT_MATRICES if m in matrices)
        self.rank, self.scaling = rank, lora_scaling(rank, alpha, use_rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base_layer.gate_up_proj_bias.device
        e = self.num_experts
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for name in self.matrices:
            n_in, n_out = self.base_shape(name)[1:]
            self.lora_A[name] = nn.Parameter(torch.empty(e, n_in, rank, device=device, dtype=torch.float32))
            self.lora_B[name] = nn.Parameter(torch.zeros(e, rank, n_out, device=device, dtype=torch.float32))
            init_lora_A(self.lora_A[name], n_in)

    def base_shape(self, name: str) -> tuple[int, int, int]:
        """(experts, in, out) of the base matrix `name` (read off the biases: NF4 keeps no dense weight)."""
        hidden = self.base_layer.down_proj_bias.shape[1]
        two_inter = self.base_layer.gate_up_proj_bias.shape[1]
        n_in, n_out = (hidden, two_inter) if name == "gate_up_proj" else (two_inter // 2, hidden)
        return self.num_experts, n_in, n_out

    def low_rank(self, name: str, x, counts, offsets):
        """(dropout(x) @ A[e]) @ B[e] * scaling for rows x sorted by expert, in x's dtype (`factor`)."""
        a, b = self.factor(name, x.dtype)
        h = grouped_matmul(self.dropout(x), a, counts, offsets)   # (rows, rank)
        return grouped_matmul(h, b, counts, offsets)

    def factor(self, name: str, dtype):
        """A (experts, in, rank) and B (experts, rank, out) of matrix `name` in dtype, the scaling in B (not
        a pass over the (rows, out) product), the rank padded with zeros to a multiple of 8 (the grouped
        kernel wants 16-byte strides; zeros add exactly nothing)."""
        a, b = self.lora_A[name].to(dtype), (self.lora_B[name] * self.scaling).to(dtype)
        pad = -self.rank % 8
        return (F.pad(a, (0, pad)), F.pad(b, (0, 0, 0, pad))) if pad else (a, b)

    def gate_up(self, x, expert, counts, offsets, fast=None):
        update = self.update("gate_up_proj", x, counts, offsets)
        return self.base_layer.gate_up(x, expert, counts, offsets, fast, add=update)

    def down(self, x, expert, counts, offsets, fast=None):
        return self.base_layer.down(x, expert, counts, offsets, fast, add=self.update("down_proj", x, counts, offsets))

    def update(self, name: str, x, counts, offsets):
        """The low-rank term of matrix `name`, or None where it is not adapted: the base adds it to its
        product (the NF4 and MXFP4 kernels before rounding, in their epilogue; no pass of its own)."""
        return self.low_rank(name, x, counts, offsets) if name in self.lora_A else None

    def forward(self, x, weights, idx, fast=None, padding=None):
        """The 4-bit experts' fused layer with our terms in it where it runs (no dropout: the layer
        multiplies x itself), else the experts' routing with our gate_up and down."""
        if isinstance(self.dropout, nn.Identity) and isinstance(self.base_layer, (NF4Experts, MXFP4Experts)):
            out = self.base_layer.fused_layer(x, weights, idx, fast, padding, lora=self.factors)
            if out is not None:
                return out
        return Experts.forward(self, x, weights, idx, fast)

    def factors(self, dtype):
        """`factor` of gate_up_proj, then of down_proj, flattened (None, None where not adapted): what the
        frozen experts' fused layer takes (model/fast/nf4_layer.py)."""
        out = ()
        for name in EXPERT_MATRICES:
            out += self.factor(name, dtype) if name in self.lora_A else (None, None)
        return out

    def delta_weight(self, name: str) -> torch.Tensor:
        """The update of base matrix `name` in its layout (experts, in, out), float32."""
        return torch.bmm(self.lora_A[name], self.lora_B[name]) * self.scaling

    def extra_repr(self):
        return f"matrices={self.matrices}, rank={self.rank}, scaling={self.scaling:g}"


def base_tensor(module: nn.Module, name: str) -> torch.Tensor:
    """A base module's tensor `name` as a dense tensor (NF4 and MXFP4 weights dequantised)."""
    if isinstance(module, NF4Linear) and name == "weight":
        return module.dequantized_weight()
    if isinstance(module, (NF4Experts, MXFP4Experts)) and name in EXPERT_MATRICES:
        return module.dequantized(name)
    return getattr(module, name)


LORA_MODULES = (LoRALinear, LoRARouter, LoRAExperts)
