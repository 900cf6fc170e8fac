"""gpt-oss as plain PyTorch: embedding, decoder blocks (attention + MoE), final norm, lm_head.

The module tree mirrors the hub's tensor names (`model.layers.N.self_attn.q_proj.weight`, ...),
so a checkpoint's keys are our state_dict's keys.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention
from .config import GptOssConfig
from .fast import gate
from .fast.compiled import compilable
from .fast.offload import Offload
from .fast.recompute import mark_recomputation
from .loss import chunked_cross_entropy, cross_entropy_rows
from .moe import MLP
from .rope import rotary_cos_sin
from .weights.nf4 import NF4Linear

# In packed rows, a document number this high or higher is padding (data.batches.PADDING_DOC writes it):
# no real token sees it, and the experts skip it where their fused layer runs.
PADDING_DOC = 2 ** 31


@compilable
def rms_norm(x, weight, eps: float):
    """In float32: x / sqrt(mean(x^2) + eps) * weight, cast back to x's dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * h).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, compiled: bool = False):
        return rms_norm(x, self.weight, self.eps, compiled=compiled)


class Block(nn.Module):
    def __init__(self, config: GptOssConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, fast: gate.FastPaths, flex: bool, doc_ids=None):
        c = fast.compiled
        x = x + self.self_attn(self.input_layernorm(x, c), cos, sin, flex, c, doc_ids)
        padding = None if doc_ids is None else doc_ids >= PADDING_DOC     # (batch, seq)
        return x + self.mlp(self.post_attention_layernorm(x, c), fast, padding)


class Decoder(nn.Module):
    def __init__(self, config: GptOssConfig):
        super().__init__()
        # padding_idx as in the reference: the pad token's row gets no gradient
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def hub_shapes(config: GptOssConfig) -> dict[str, tuple]:
    """Every tensor of the model by its hub name, with its shape in the dense layout (built on meta: no memory)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in GptOss(config).state_dict().items()}


class GptOss(nn.Module):
    """`GptOss(config)` is randomly initialised; `load_model` fills one from a checkpoint.

    attention: "eager" (plain, forms the score matrix), "flex" (CUDA) or "auto" (the gate's choice).
    `fast_paths` is the gate's decision (model/fast/gate.py) that the forward passes down; None: the
    device's own, decided at the first forward.
    """

    def __init__(self, config: GptOssConfig, attention: str = "auto"):
        super().__init__()
        if attention not in ("auto", "eager", "flex"):
            raise ValueError(f"attention must be auto, eager or flex, not {attention!r}")
        self.config = config
        self.attention = attention
        self.gradient_checkpointing = False  # recompute each block in the backward, keep its input only
        self.offload_activations = False     # with checkpointing: keep those inputs in host memory (fast/offload.py)
        self.kept_blocks = 0                 # with checkpointing: so many last blocks are not (memory for speed)
        self.dense_experts = False           # a layer's experts in bf16 for each product (memory for speed)
        self.fast_paths: gate.FastPaths | None = None
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._rotary = {}  # (power of two, device, dtype) -> (cos, sin): see `rotary`
        self._nf4_linear_kernel = None   # what the NF4Linear modules were last set to (`decode`)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)

    def rotary(self, t: int, device, dtype):
        """cos and sin (t, head_dim / 2) for positions 0..t-1: the first rows of a table kept per power of two.

        Tables are kept, never rebuilt or dropped: a CUDA graph capture cannot build one (that copies
        the frequencies to the GPU), and each replay reads the table its capture saw. Powers of two
        keep them few and all together under four times the longest length's.
        """
        n = 1 << max(t - 1, 0).bit_length()
        key = (n, device, dtype)
        if key not in self._rotary:
            with torch.inference_mode(False):  # a table made under inference mode could not train later
                self._rotary[key] = rotary_cos_sin(self.config, torch.arange(n, device=device), dtype)
        cos, sin = self._rotary[key]
        return cos[:t], sin[:t]

    def embed(self, input_ids):
        """input_ids (batch, seq) -> embeddings (batch, seq, hidden) on the blocks' device.

        The embedding may live on the CPU (load_model's embedding_device): a lookup there is cheap,
        and its 1 GB table stays off the GPU.
        """
        emb = self.model.embed_tokens
        return emb(input_ids.to(emb.weight.device)).to(self.model.norm.weight.device)

    def fast(self, device) -> gate.FastPaths:
        """The fast paths in use on `device`: those set on the model, else the gate's choice; with
        `dense_experts` (model/fast/dense_gemm.py) where the experts' kernels and torch._grouped_mm run."""
        fast = self.fast_paths or gate.decide(device)
        if self.dense_experts and not fast.dense_experts and gate.dense_experts_problem(fast) is None:
            return dataclasses.replace(fast, dense_experts=True)
        return fast

    def decode(self, x, doc_ids=None, positions=None):
        """Embeddings (batch, seq, hidden) -> final-norm states, through every block.

        Packed rows (several documents end to end) pass doc_ids and positions, both (batch, seq) on
        x's device: a token attends only to its own document, at its position within that document.
        Tokens numbered PADDING_DOC or above are padding: their states are never used, so the fused
        expert layer gives them no expert and they come out of it as zeros (every other part computes
        them as any token).
        """
        fast = self.fast(x.device)
        if fast.nf4_kernels != self._nf4_linear_kernel:
            # the attention's NF4 weights: one kernel each, where the NF4 kernels run. A walk over the
            # modules (0.2 ms), so only when the choice changes; a module put in after it keeps its own
            # setting, which costs speed only (both dequantisations give the same bits)
            for m in self.modules():
                if isinstance(m, NF4Linear):
                    m.kernel = fast.nf4_kernels
            self._nf4_linear_kernel = fast.nf4_kernels
        flex = self.attention == "flex" or (self.attention == "auto" and fast.flex_attention and x.is_cuda)
        cos, sin = self.rotary(x.shape[1], x.device, x.dtype)       # (seq, head_dim / 2)
        if positions is not None:  # a gather from the kept table: no table built, so a graph may capture it
            cos, sin = cos[positions], sin[positions]                # (batch, seq, head_dim / 2)
        # a capture forbids reading the RNG state; graphs run without dropout, so a block draws nothing random
        keep_rng = not (x.is_cuda and torch.cuda.is_current_stream_capturing())
        checkpointing = self.gradient_checkpointing and torch.is_grad_enabled()
        offload = Offload(x.device) if checkpointing and self.offload_activations else None
        # the last kept_blocks blocks keep their activations (as memory_plan fits them): the backward
        # reaches them first, and not recomputing a block gives the same values, bit for bit
        recomputed = len(self.model.layers) - min(self.kept_blocks, len(self.model.layers))
        for i, block in enumerate(self.model.layers):
            if not checkpointing or i >= recomputed:
                x = block(x, cos, sin, fast, flex, doc_ids)
            elif offload is not None:   # the block's input goes to host memory, back for its recomputation
                x = checkpoint(offload.run, block, offload.keep(x), cos, sin, fast, flex, doc_ids, use_reentrant=False,
                               preserve_rng_state=keep_rng, context_fn=mark_recomputation)
            else:
                x = checkpoint(block, x, cos, sin, fast, flex, doc_ids, use_reentrant=False,
                               preserve_rng_state=keep_rng, context_fn=mark_recomputation)
        if offload is not None:
            offload.forward_done()
        return self.model.norm(x, fast.compiled)

    def set_expert_tile(self, tokens: int):
        """Above `tokens` tokens a forward, every layer's experts run a tile of that many at a time
        (model/fast/tiled_moe.py): less memory, the same result up to the order of gradient sums."""
        for block in self.model.layers:
            block.mlp.tile = tokens

    def hidden_states(self, input_ids, doc_ids=None, positions=None):
        """input_ids (batch, seq) -> final-norm states (batch, seq, hidden).

        No attention mask for right-padded rows: under the causal mask no real token sees padding or
        another example. Packed rows pass doc_ids and positions (batch, seq): see `decode`.
        """
        return self.decode(self.embed(input_ids), *self._on_device(doc_ids, positions))

    def _on_device(self, *tensors):
        device = self.model.norm.weight.device
        return [None if t is None else t.to(device, non_blocking=True) for t in tensors]

    def forward(self, input_ids, doc_ids=None, positions=None):
        """Logits (batch, seq, vocab). For training use `loss`, which never forms them all."""
        return self.lm_head(self.hidden_states(input_ids, doc_ids, positions))

    def loss(self, input_ids, labels, reduction: str = "mean", doc_ids=None, positions=None):
        """Next-token cross-entropy over positions whose label is not -100 (labels not shifted).

        reduction "mean" gives the mean; "sum" gives (summed loss, number of target tokens), so that
        a step can normalise over all its micro-batches.
        """
        hidden = self.hidden_states(input_ids, doc_ids, positions)
        total, count = chunked_cross_entropy(self.lm_head, hidden, labels, compiled=self.fast(hidden.device).compiled)
        if reduction == "sum":
            return total, count
        if reduction != "mean":
            raise ValueError(f"reduction must be mean or sum, not {reduction!r}")
        return total / count.clamp(min=1).to(total.device)

    def loss_rows(self, input_ids, rows, targets, doc_ids=None, positions=None):
        """Summed loss at given rows (`model.loss.target_rows`), rows and targets on the GPU."""
        return self.decoded_loss(self.embed(input_ids), rows, targets, *self._on_device(doc_ids, positions))

    def decoded_loss(self, x, rows, targets, doc_ids=None, positions=None):
        """`loss_rows` from the embeddings x: all on the GPU, no host sync, what a CUDA graph captures."""
        return cross_entropy_rows(self.lm_head, self.decode(x, doc_ids, positions), rows, targets,
                                  compiled=self.fast(x.device).compiled)
