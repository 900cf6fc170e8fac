"""What a training run needs of the GPU, worked out before anything is loaded, and the choices that fit.

The estimate adds up the frozen NF4 model (from the checkpoint's config.json: shapes only), the
adapter with its gradient, the graph step's gradient buffers and the optimizer's states, and the
activations of one micro-batch: a formula in the sequence length with named per-token constants
measured on gpt-oss-20b (below; docs/BENCHMARKS.md), covering the checkpointed blocks' inputs (or,
offloaded, the few on the GPU), one block's recomputation, and the experts' tile. `plan` turns it
into choices: the embedding on the CPU, offloaded checkpoints, an NF4 lm_head, bitsandbytes' 8-bit
AdamW, or a clear stop naming the flags that would fit, instead of running out of memory minutes in;
and, with memory to spare, the experts dequantised a layer at a time for torch._grouped_mm
(`dense_experts_bytes`), then blocks kept from recomputation (`kept_block_bytes`).

    QLORA_GPU_MEMORY_GIB=15.58 python train.py ...   # behave as on a card with 15.58 GiB usable
"""
from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

GIB = 2 ** 30
CAP_VARIABLE = "QLORA_GPU_MEMORY_GIB"

# Activations of one micro-batch of t tokens, in bytes (bf16; h hidden, i intermediate, k experts a
# token, L layers; `activations` below):
#
#   L x t x h x 2                           the checkpointed blocks' inputs (exact); with
#                                           --offload-activations only OFFLOAD_RESIDENT_BLOCKS of them
# + BLOCK_BYTES_PER_TOKEN_HIDDEN x h x t    one block's recomputation and backward outside the experts
#                                           (norms, q/k/v, attention's output, residuals, their
#                                           gradients) and the final norm's and loss's rows
# + EXPERT_BYTES_PER_ROW_INTER x i x k x min(t, tile)
#                                           one expert layer's backward over its rows: gate_up's output,
#                                           its gradient and down's input gradient; a tile of rows
#                                           above TILE_TOKENS (model/fast/tiled_moe.py)
# + FIXED_ACTIVATION_BYTES                  the loss's chunk of logits and what does not grow with t
#
# Fitted to gpt-oss-20b's measured peaks (docs/BENCHMARKS.md, one H200, LoRA r16 on attention, eager):
# bench/big_memory.py's sweep at 2,048, 8,192, 32,768 and 131,072 tokens fits 19.98, 9.05 and 0.25 GiB;
# the constants are those rounded up, so the estimate sits 0-2% above each measured peak (and 1.9%
# above 65,536 tokens offloaded in tiles of 2,048). The script prints the fit again on each sweep.
BLOCK_BYTES_PER_TOKEN_HIDDEN = 20.5
EXPERT_BYTES_PER_ROW_INTER = 9.5
FIXED_ACTIVATION_BYTES = 0.25 * GIB
OFFLOAD_RESIDENT_BLOCKS = 2   # offloaded: a block's input being recomputed from, and the one fetched ahead
# A kept block (--kept-blocks: not checkpointed, so not recomputed) holds what its backward reads
# instead of its input alone: this much more per token and hidden unit, measured on gpt-oss-20b
# (intermediate = hidden, 4 experts a token), graphed, frozen experts / expert adapters as well
# (docs/BENCHMARKS.md). Spare memory goes to kept blocks last, after a forward's worth is set aside
# for an evaluation that runs beside the training graphs.
KEPT_BLOCK_BYTES_PER_TOKEN_HIDDEN = 34.0
# Expert adapters ride in the frozen experts' layer (model/fast/nf4_layer.py), which also keeps the
# layer's input and its rows' rank-wide products: 40.2 measured at 2,048 tokens, 31.2 at 4,096 (dense path)
KEPT_BLOCK_EXPERT_ADAPTERS_BYTES_PER_TOKEN_HIDDEN = 42.0
# Loading: one layer's experts in bf16 while they are converted; measured 0.54 GiB above the loaded
# gpt-oss-20b (32 experts), scaled by the size of a layer's gate_up_proj
LOAD_BYTES_20B = 0.54 * GIB
SMALL_TILE = 2048       # the experts' smaller tile, where the default one does not fit (measured at 65,536 tokens)
SMALL_CARD_GIB = 24     # below this, padded micro-batches run without CUDA graphs (train.py)
HEADROOM = 0.92          # the allocator's fragmentation and the graph pool's slack (--memory-headroom's default)
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)   # codes, 8-bit block scales, their fp32 scales
MXFP4_BYTES_PER_WEIGHT = 4.25 / 8                       # codes, one 8-bit scale per 32 (--base mxfp4's experts)
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2}          # per trainable parameter: the two moments


def cap_gpu_memory(device) -> float | None:
    """Apply QLORA_GPU_MEMORY_GIB (emulating a smaller card) to the caching allocator; return the cap in GiB."""
    value = os.environ.get(CAP_VARIABLE)
    if not value:
        return None
    try:
        gib = float(value)
    except ValueError:
        raise ValueError(f"{CAP_VARIABLE}={value!r}: expected a number of GiB, e.g. 15.58") from None
    total = torch.cuda.get_device_properties(device).total_memory / GIB
    if not 0 < gib <= total:
        raise ValueError(f"{CAP_VARIABLE}={value}: expected a number of GiB above 0 and at most this GPU's "
                         f"{total:.2f}")
    torch.cuda.set_per_process_memory_fraction(gib / total, device)
    return gib


def usable_gib(device) -> float:
    """What this process may allocate on the GPU: the cap if one is set, else what is free now."""
    cap = os.environ.get(CAP_VARIABLE)
    if cap:
        return float(cap)
    free, _ = torch.cuda.mem_get_info(device)
    return free / GIB


@dataclass
class Need:
    """Bytes a configuration needs, by part."""
    model: float
    embedding: float
    adapter: float
    optimizer: float
    activations: float
    loading: float = 0.0      # above the model, while the largest tensor is converted
    host: float = 0.0         # pinned host memory for offloaded blocks' inputs (not on the GPU)

    def total(self, embedding_on_gpu: bool) -> float:
        """The GPU's peak: training, or loading where that is higher."""
        resident = self.model + self.embedding * embedding_on_gpu
        return max(resident + self.adapter + self.optimizer + self.activations, resident + self.loading)


def checkpointed_inputs(config, tokens: int) -> float:
    """Bytes of every block's input, which checkpointing keeps (bf16): the formula's first term."""
    return config.num_hidden_layers * tokens * config.hidden_size * 2


def activations(config, tokens: int, offload: bool = False, tile: int | None = None, lm_head_nf4: bool = False,
                fast=None) -> tuple[float, float]:
    """(GPU bytes, pinned host bytes) of one micro-batch's activations of `tokens` tokens (the formula
    above the constants); tile: model/fast/tiled_moe.py's (default TILE_TOKENS)."""
    from model.fast.tiled_moe import TILE_TOKENS
    t, h, i = tokens, config.hidden_size, config.intermediate_size
    k, layers = config.num_experts_per_tok, config.num_hidden_layers
    tile = TILE_TOKENS if tile is None else tile
    inputs = checkpointed_inputs(config, t)
    on_gpu = inputs // layers * min(layers, OFFLOAD_RESIDENT_BLOCKS) if offload else inputs
    block = BLOCK_BYTES_PER_TOKEN_HIDDEN * h * t + EXPERT_BYTES_PER_ROW_INTER * i * k * min(t, tile)
    if lm_head_nf4:   # an NF4 head is dequantised whole for each chunk of the loss, before the blocks' backward
        block = max(block, config.vocab_size * h * 2)
    total = on_gpu + block + FIXED_ACTIVATION_BYTES
    if fast is not None and not fast.nf4_kernels:   # a layer's experts dequantised to bf16, both matrices
        total += config.num_local_experts * h * 3 * i * 2
    if fast is not None and not fast.flex_attention:   # eager attention's (heads, t, t) scores, ~5 copies
        total += config.num_attention_heads * t ** 2 * 10
    return total, inputs if offload else 0.0


def need(config, trainable: int, optim: str, tokens_per_micro_batch: int, graphs: bool, fast=None,
         offload: bool = False, lm_head_nf4: bool = False, base: str = "nf4", tile: int | None = None) -> Need:
    """The estimate for a GptOssConfig in NF4 (the experts as `base` says), `trainable` adapter parameters
    in float32, under the gate's `fast` paths (None: every fast path); offload: --offload-activations;
    lm_head_nf4: the head in NF4; tile: the experts' tile of tokens (None: TILE_TOKENS)."""
    nf4, mxfp4, bf16 = _weights(json.dumps(config.to_dict(), sort_keys=True), lm_head_nf4, base)
    embedding = config.vocab_size * config.hidden_size * 2
    # weights and their gradients in float32; the graph step keeps a second gradient buffer
    adapter = trainable * 4 * (3 if graphs else 2)
    gpu, host = activations(config, tokens_per_micro_batch, offload, tile, lm_head_nf4, fast)
    gate_up = config.num_local_experts * config.hidden_size * 2 * config.intermediate_size
    loading = LOAD_BYTES_20B * gate_up / (32 * 2880 * 5760)
    return Need(model=nf4 * NF4_BYTES_PER_WEIGHT + mxfp4 * MXFP4_BYTES_PER_WEIGHT + bf16 * 2,
                embedding=embedding, adapter=adapter,
                optimizer=trainable * OPTIMIZER_BYTES[optim], activations=gpu, loading=loading, host=host)


@functools.lru_cache(maxsize=16)
def _weights(config_json: str, lm_head_nf4: bool, base: str = "nf4") -> tuple[int, int, int]:
    """(weights in NF4, in MXFP4, in bf16) but the embedding, from the model's shapes (built on meta: a
    fraction of a second, so kept per config for the plan's many tries)."""
    from model.config import GptOssConfig
    from model.gpt_oss import hub_shapes
    nf4, mxfp4, bf16 = 0, 0, 0
    head = ("lm_head.weight",) if lm_head_nf4 else ()
    for name, shape in hub_shapes(GptOssConfig.from_dict(json.loads(config_json))).items():
        n = 1
        for s in shape:
            n *= s
        if name == "model.embed_tokens.weight":
            continue
        quantised = name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                                   "experts.gate_up_proj", "experts.down_proj", *head))
        in_mxfp4 = base == "mxfp4" and name.endswith(("experts.gate_up_proj", "experts.down_proj"))
        nf4, mxfp4, bf16 = nf4 + n * (quantised and not in_mxfp4), mxfp4 + n * in_mxfp4, bf16 + n * (not quantised)
    return nf4, mxfp4, bf16


class Plan(NamedTuple):
    """The choices that fit, and the lines that say so."""
    embedding_on_cpu: bool
    optim: str
    graphs: bool
    lines: list[str]
    offload: bool = False
    lm_head_nf4: bool = False
    tile: int = 0     # the experts' tile of tokens (model/fast/tiled_moe.py)
    kept: int = 0     # blocks not checkpointed (GptOss.kept_blocks)
    dense: bool = False   # the experts' dense path (GptOss.dense_experts)


def dense_experts_bytes(config, tokens: int) -> float:
    """What the experts' dense path (model/fast/dense_gemm.py) adds to the peak: a layer's gate_up in
    bf16 while it is multiplied, and the rows it multiplies gathered (measured +0.91 to +1.02 GiB on
    gpt-oss-20b at 2,048 and 4,096 tokens, docs/BENCHMARKS.md; this gives 1.03 and 1.08)."""
    h, i = config.hidden_size, config.intermediate_size
    return config.num_local_experts * h * 2 * i * 2 + tokens * config.num_experts_per_tok * h * 2


def kept_block_bytes(config, tokens: int, expert_adapters: bool = False) -> float:
    """What one kept block holds above a checkpointed one's input, for a micro-batch of `tokens`."""
    per = KEPT_BLOCK_EXPERT_ADAPTERS_BYTES_PER_TOKEN_HIDDEN if expert_adapters else KEPT_BLOCK_BYTES_PER_TOKEN_HIDDEN
    return per * tokens * config.hidden_size


# The formula above is for checkpointed blocks; without checkpointing nothing of it was measured
NOT_CHECKPOINTED = ("  --no-gradient-checkpointing: every block keeps its own activations, which this estimate "
                    "does not count (it is for checkpointed blocks): the run may need far more, and the plan "
                    "cannot say whether it fits")


def _options(value, preferred):
    """The settings to try: the user's own, or (None, "auto") each of `preferred` in order."""
    return [value] if value is not None and value != "auto" else list(preferred)


def plan(config, trainable: int, tokens_per_micro_batch: int, graphs: bool, usable: float,
         embedding_on_cpu: bool | None, optim: str, fast=None, offload: bool | None = False,
         lm_head_nf4: bool | None = False, base: str = "nf4", tile: int | None = None,
         headroom: float = HEADROOM, kept: int | None = 0, expert_adapters: bool = False,
         dense: bool | None = False) -> Plan:
    """The choices that fit `usable` GiB; ValueError, naming the flags that would fit, if none does.

    None / "auto" leave a choice to the plan. Given up only where the run does not fit otherwise, in
    this order: the embedding on the GPU (costs nothing), the experts' tile of TILE_TOKENS (a smaller
    one, SMALL_TILE, where the experts already run in tiles: a little speed), CUDA graphs (speed), AdamW's float32
    moments (bitsandbytes' 8-bit AdamW changes the update a little), the bf16 lm_head (an NF4 head: the
    logits change a little), and last the blocks' inputs on the GPU (--offload-activations: pinned host
    memory, copies that overlap compute, no graphs). `headroom`: the share of `usable` the estimate may
    fill (--memory-headroom); the rest is the allocator's (the default run on the 16 GB card reserved
    1.05 GiB above its allocated peak, docs/BENCHMARKS.md). `kept`: blocks not checkpointed, counted
    as fixed like the rest; None: as many as the memory left over holds (speed bought with memory
    nothing else wants), none where the blocks' inputs are offloaded or a plain path runs. `expert_adapters`:
    LoRA on the experts, whose kept blocks hold more. `dense`: the experts' dense path (True counted as
    fixed where `fast` runs it); None: where the spare memory holds it twice (the training graph's copy
    and an evaluation's beside it), before any kept block: per GiB it buys more (docs/BENCHMARKS.md).
    """
    from model.fast.gate import dense_experts_problem
    from model.fast.tiled_moe import TILE_TOKENS
    fits = usable * GIB * headroom
    tiles = [tile] if tile else [TILE_TOKENS] + [SMALL_TILE] * (tokens_per_micro_batch > TILE_TOKENS)
    layers = config.num_hidden_layers
    per_block = kept_block_bytes(config, tokens_per_micro_batch, expert_adapters)
    fixed = min(kept or 0, layers)
    dense_cost = dense_experts_bytes(config, tokens_per_micro_batch)
    can_dense = dense_experts_problem(fast) is None
    # the per-block constants were measured on the fast paths; a plain path keeps more (eager attention
    # its score matrices), so there the plan keeps no block unless asked
    measured = fast is None or (fast.nf4_kernels and fast.flex_attention and (fast.grouped_mm or not expert_adapters))
    tried = []
    for off in _options(offload, [False, True]):
        for head in _options(lm_head_nf4, [False, True]):
            for opt in _options(optim, ["adamw", "adamw8bit"]):
                for g in ([True, False] if graphs and not off else [False]):
                    for t in tiles:
                        # offloading is for long rows: there the embedding leaves the GPU as well (its
                        # lookup is nothing beside such a step, and offloading needs the allocator room)
                        for on_cpu in _options(embedding_on_cpu, [True] if off else [False, True]):
                            n = need(config, trainable, opt, tokens_per_micro_batch, g, fast, off, head, base, t)
                            d = bool(dense) and can_dense
                            total = n.total(not on_cpu) + fixed * per_block + d * dense_cost
                            tried.append(total)
                            if total <= fits:
                                inputs = checkpointed_inputs(config, tokens_per_micro_batch)
                                if dense is None and can_dense and not off and measured:
                                    # its copy in the training step, and an evaluation's beside the graphs
                                    d = fits - total - (n.activations - inputs) >= 2 * dense_cost
                                    total += d * dense_cost
                                n_kept = fixed if kept is not None else 0 if off or not measured else \
                                    spare_blocks(fits - total - d * dense_cost, n, inputs, layers, per_block)
                                total += (n_kept - fixed) * per_block
                                lines = describe(n, total, usable, opt, on_cpu, off, head, g, graphs,
                                                 tokens_per_micro_batch, t, n_kept, layers, per_block,
                                                 d * dense_cost)
                                if dense and not can_dense:
                                    lines.append(f"  --dense-experts: not here ({dense_experts_problem(fast)}); the fused "
                                                 "kernels run")
                                return Plan(on_cpu, opt, g, lines, off, head, t, n_kept, d)
    kept_note = (f"--kept-blocks {fixed} alone takes {fixed * per_block / GIB:.1f} GiB; with --kept-blocks 0: "
                 if fixed else "")
    raise ValueError(
        f"this run needs about {min(tried) / GIB:.1f} GiB of GPU memory at the least, and {usable:.2f} GiB is "
        f"usable ({tokens_per_micro_batch} tokens a micro-batch, {trainable:,} trainable parameters). "
        + kept_note + would_fit(config, trainable, tokens_per_micro_batch, usable, fast, base, headroom))


def spare_blocks(spare: float, n: Need, inputs: float, layers: int, per_block: float) -> int:
    """How many blocks the spare bytes keep, after a forward's worth of activations (n.activations less
    the checkpointed blocks' `inputs`) is set aside for an evaluation beside the training graphs."""
    evaluation = n.activations - inputs
    return max(0, min(layers, int((spare - evaluation) // per_block)))


def describe(n: Need, total: float, usable: float, opt: str, on_cpu: bool, offload: bool, head: bool, g: bool,
             graphs: bool, tokens: int, tile: int, kept: int = 0, layers: int = 0, per_block: float = 0.0,
             dense: float = 0.0) -> list[str]:
    tiled = f", experts {tile} tokens at a time" if tokens > tile else ""
    line = (f"memory plan: {total / GIB:.2f} GiB of {usable:.2f} GiB usable (model {n.model / GIB:.2f}"
            f"{', NF4 lm_head' if head else ''}, embedding {'CPU' if on_cpu else f'{n.embedding / GIB:.2f}'}, "
            f"adapter {n.adapter / GIB:.2f}, optimizer {opt} {n.optimizer / GIB:.2f}, activations "
            f"{n.activations / GIB:.2f} for {tokens} tokens a micro-batch{tiled}"
            f"{'' if g or not graphs else '; no CUDA graphs'})")
    if dense:
        line += (f"\n  the experts dequantised a layer at a time for torch._grouped_mm ({dense / GIB:.2f} GiB, in the "
                 "total; --dense-experts)")
    if kept:
        line += (f"\n  the last {kept} of {layers} blocks keep their activations ({kept * per_block / GIB:.2f} GiB, in "
                 "the total), not recomputed in the backward (--kept-blocks)")
    if offload:
        line += f"\n  --offload-activations: the blocks' inputs in {n.host / GIB:.2f} GiB of pinned host memory"
    return [line]


def would_fit(config, trainable: int, tokens: int, usable: float, fast=None, base: str = "nf4",
              headroom: float = HEADROOM) -> str:
    """What to change, naming flags: every saving at once, and the longest --max-seq-len that then fits."""
    fits = usable * GIB * headroom
    saving = (f"--embedding-on-cpu --offload-activations --lm-head-nf4 --optim adamw8bit --cuda-graphs off "
              f"--expert-tile {SMALL_TILE}")
    lowest = need(config, trainable, "adamw8bit", 0, False, fast, True, True, base, SMALL_TILE)
    if lowest.total(False) > fits:
        return (f"Even the model alone does not fit ({lowest.total(False) / GIB:.1f} GiB with {saving}): "
                "use a GPU with more memory, or adapt fewer modules (--targets)")
    low, high = 0, tokens   # the most tokens that fit with every saving (need grows with tokens)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if need(config, trainable, "adamw8bit", mid, False, fast, True, True, base,
                                        SMALL_TILE).total(False) <= fits else (low, mid)
    if low >= tokens - 1:
        return f"It fits with {saving}"
    share = need(config, trainable, "adamw8bit", tokens, False, fast, True, True, base, SMALL_TILE).total(False) \
        / (usable * GIB)
    closer = (f"; or, with those flags, --memory-headroom {math.ceil(share * 100) / 100:.2f} (the plan's share of the "
              f"GPU, now {headroom:g}): less room for the allocator, so it may run out of memory mid-run"
              if share < 0.98 else "")
    return (f"With {saving} it fits up to --max-seq-len {low} (and --micro-batch-size 1 without --packing); "
            f"or adapt fewer modules (--targets){closer}")


def out_of_memory(error: Exception, output_dir) -> str:
    """The one line train.py says when the GPU ran out of memory after all (the plan's estimate was
    short), with the allocator's own account of its memory written beside the run for a closer look."""
    line = str(error).split(". ")[0]   # "CUDA out of memory", and how much was asked for
    if torch.cuda.is_available():
        line += f" at {torch.cuda.max_memory_allocated() / GIB:.2f} GiB allocated"
        path = os.path.join(output_dir, "out-of-memory.txt")
        try:
            with open(path, "w") as f:
                f.write(str(error) + "\n\n" + torch.cuda.memory_summary())
            line += f" (the allocator's summary: {path})"
        except OSError:   # a full disk must not turn the one line into a traceback
            pass
    return (f"{line}. The memory plan's estimate fell short: lower --max-seq-len (or --micro-batch-size "
            "without --packing), or give memory back with --embedding-on-cpu, --optim adamw8bit, --lm-head-nf4 "
            "or --offload-activations")


def expert_adapters(targets: str) -> bool:
    """Whether --targets (as a string) names expert matrices: they take torch._grouped_mm's path, and
    their kept blocks hold more."""
    return any(t in targets for t in ("experts", "gate_up_proj", "down_proj"))


def placement(config) -> dict:
    """load_model's options for where the weights live, as the plan settled them."""
    return {"embedding_device": "cpu" if config.embedding_on_cpu else None, "lm_head_nf4": bool(config.lm_head_nf4)}


def fit(config, model_config, resume=None):
    """train.py's device and the gate's fast paths on it; on a GPU, its "auto" settings
    (--embedding-on-cpu, --offload-activations, --lm-head-nf4, --optim, --cuda-graphs) settled by the
    plan, printed, before anything loads. A resumed run keeps its checkpoint's optimizer."""
    from lora.inject import count_trainable
    from model.fast import gate
    if resume is not None and config.optim == "auto":
        config.optim = resume.state["config"]["optim"]
    if resume is not None and config.lm_head_nf4 is None:   # the head's storage is part of the math
        config.lm_head_nf4 = resume.state["config"].get("lm_head_nf4", False)
    if not torch.cuda.is_available():
        from model.fast.tiled_moe import TILE_TOKENS
        config.expert_tile = config.expert_tile or TILE_TOKENS
        config.kept_blocks = config.kept_blocks or 0   # the CPU's memory is not planned: none unless asked
        config.dense_experts = False                    # nor is there a torch._grouped_mm kernel
        config.embedding_on_cpu = bool(config.embedding_on_cpu)
        config.offload_activations, config.lm_head_nf4 = bool(config.offload_activations), bool(config.lm_head_nf4)
        config.optim = "adamw" if config.optim == "auto" else config.optim
        return torch.device("cpu"), gate.decide("cpu", config.kernels)
    device = torch.device("cuda", torch.cuda.current_device())
    if gate.bf16_problem(device):
        raise ValueError(gate.bf16_problem(device))
    cap_gpu_memory(device)
    trainable = count_trainable(model_config, targets=config.targets, rank=config.rank)
    fast = gate.decide(device, config.kernels)
    # graphs need dropout 0, and torch._grouped_mm where expert adapters run (model/fast/cuda_graph.py)
    graphs = config.cuda_graphs != "off" and config.dropout == 0 and fast.cuda_graphs and (
        fast.grouped_mm or not expert_adapters(config.targets))
    if graphs and not config.packing and usable_gib(device) < SMALL_CARD_GIB and config.cuda_graphs == "auto":
        # right-padded micro-batches come in many shapes, a graph each, and every graph keeps its
        # memory: measured, they filled 15.58 GiB by step 16 (docs/BENCHMARKS.md). Packed rows: one shape.
        print(f"no CUDA graphs: padded micro-batches take many shapes, which a card under {SMALL_CARD_GIB} GiB "
              "cannot hold a graph each for (--packing gives one shape)")
        graphs = False
    if config.offload_activations and config.cuda_graphs == "on":
        raise ValueError("--offload-activations and --cuda-graphs on: a CUDA graph cannot replay the offloaded "
                         "copies; pass one of them")
    chosen = plan(model_config, trainable, config.max_seq_len * (1 if config.packing else config.micro_batch_size),
                  graphs, usable_gib(device), config.embedding_on_cpu, config.optim, fast,
                  config.offload_activations, config.lm_head_nf4, config.base, config.expert_tile,
                  config.memory_headroom, config.kept_blocks if config.gradient_checkpointing else 0,
                  expert_adapters(config.targets), config.dense_experts)
    if not config.gradient_checkpointing:
        print(NOT_CHECKPOINTED)
    config.embedding_on_cpu, config.optim, config.expert_tile = chosen.embedding_on_cpu, chosen.optim, chosen.tile
    config.kept_blocks, config.dense_experts = chosen.kept, chosen.dense
    config.offload_activations, config.lm_head_nf4 = chosen.offload, chosen.lm_head_nf4
    if not chosen.graphs and config.cuda_graphs == "auto":
        config.cuda_graphs = "off"
    print("\n".join(chosen.lines))
    return device, fast
