"""What a training run needs of the GPU, worked out before anything is loaded, and the choices that fit.

The estimate adds up the frozen NF4 model (from the checkpoint's config.json: shapes only), the
adapter with its gradient, the graph step's gradient buffers and the optimizer's states, and the
activations of one micro-batch (a per-token figure measured on gpt-oss-20b at 4,096 tokens; see
docs/BENCHMARKS.md). `plan` turns it into choices: the embedding on the CPU, bitsandbytes' 8-bit
AdamW, or a clear stop naming the flags that would fit, instead of running out of memory minutes in.

    QLORA_GPU_MEMORY_GIB=15.58 python train.py ...   # behave as on a card with 15.58 GiB usable
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

GIB = 2 ** 30
CAP_VARIABLE = "QLORA_GPU_MEMORY_GIB"
# Activations of a checkpointed step per token of a micro-batch (bf16, gpt-oss-20b): the blocks'
# saved inputs, one block's recomputation and the chunked loss. Measured: 4,096 tokens took 1.44 GiB
# above the loaded model (docs/BENCHMARKS.md); scaled by hidden size for other widths.
ACTIVATION_BYTES_PER_TOKEN_20B = 1.44 * GIB / 4096
SMALL_CARD_GIB = 24     # below this, padded micro-batches run without CUDA graphs (train.py)
HEADROOM = 0.92          # the allocator's fragmentation and the graph pool's slack
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

    def total(self, embedding_on_gpu: bool) -> float:
        return self.model + self.adapter + self.optimizer + self.activations + self.embedding * embedding_on_gpu


def need(config, trainable: int, optim: str, tokens_per_micro_batch: int, graphs: bool, fast=None,
         base: str = "nf4") -> Need:
    """The estimate for a GptOssConfig in NF4 (the experts as `base` says), `trainable` adapter
    parameters in float32, under the gate's `fast` paths (None: every fast path)."""
    from model.gpt_oss import hub_shapes
    nf4, bf16, mxfp4 = 0, 0, 0
    for name, shape in hub_shapes(config).items():
        n = 1
        for s in shape:
            n *= s
        if name == "model.embed_tokens.weight":
            continue
        quantised = name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                                   "experts.gate_up_proj", "experts.down_proj"))
        in_mxfp4 = base == "mxfp4" and name.endswith(("experts.gate_up_proj", "experts.down_proj"))
        nf4, bf16 = nf4 + n * (quantised and not in_mxfp4), bf16 + n * (not quantised)
        mxfp4 += n * in_mxfp4
    embedding = config.vocab_size * config.hidden_size * 2
    # weights and their gradients in float32; the graph step keeps a second gradient buffer
    adapter = trainable * 4 * (3 if graphs else 2)
    per_token = ACTIVATION_BYTES_PER_TOKEN_20B * config.hidden_size / 2880
    activations = per_token * tokens_per_micro_batch
    if fast is not None and not fast.nf4_kernels:   # a layer's experts dequantised to bf16, both matrices
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        activations += e * h * 3 * i * 2
    if fast is not None and not fast.flex_attention:   # eager attention's (heads, t, t) scores, ~5 copies
        activations += config.num_attention_heads * tokens_per_micro_batch ** 2 * 10
    model = nf4 * NF4_BYTES_PER_WEIGHT + mxfp4 * MXFP4_BYTES_PER_WEIGHT + bf16 * 2
    return Need(model=model, embedding=embedding, adapter=adapter,
                optimizer=trainable * OPTIMIZER_BYTES[optim], activations=activations)


def plan(config, trainable: int, tokens_per_micro_batch: int, graphs: bool, usable: float,
         embedding_on_cpu: bool | None, optim: str, fast=None, base: str = "nf4") -> tuple[bool, str, bool, list[str]]:
    """(embedding on the CPU, optimizer, CUDA graphs, lines to print) that fit `usable` GiB; ValueError
    if nothing does.

    None / "auto" leave the choice to the plan. Given up only where the run does not fit otherwise, in
    this order: the embedding on the GPU (costs nothing), CUDA graphs (speed), AdamW's float32 moments
    (bitsandbytes' 8-bit AdamW changes the update a little).
    """
    fits = usable * GIB * HEADROOM
    choices = [(opt, on_cpu, g)
               for opt in ([optim] if optim != "auto" else ["adamw", "adamw8bit"])
               for g in ([True, False] if graphs else [False])
               for on_cpu in ([embedding_on_cpu] if embedding_on_cpu is not None else [False, True])]
    tried = []
    for opt, on_cpu, g in choices:
        n = need(config, trainable, opt, tokens_per_micro_batch, g, fast, base)
        total = n.total(not on_cpu)
        tried.append(total)
        if total <= fits:
            lines = [f"memory plan: {total / GIB:.2f} GiB of {usable:.2f} GiB usable (model {n.model / GIB:.2f}, "
                     f"embedding {'CPU' if on_cpu else f'{n.embedding / GIB:.2f}'}, adapter {n.adapter / GIB:.2f}, "
                     f"optimizer {opt} {n.optimizer / GIB:.2f}, activations {n.activations / GIB:.2f} for "
                     f"{tokens_per_micro_batch} tokens a micro-batch{'' if g or not graphs else '; no CUDA graphs'})"]
            return on_cpu, opt, g, lines
    raise ValueError(
        f"this run needs about {min(tried) / GIB:.1f} GiB of GPU memory at the least, and {usable:.2f} GiB is "
        f"usable ({tokens_per_micro_batch} tokens a micro-batch, {trainable:,} trainable parameters). Lower "
        "--max-seq-len or --micro-batch-size, adapt fewer modules (--targets), pass --embedding-on-cpu and "
        "--optim adamw8bit, or --cuda-graphs off")


def fit(config, model_config, resume=None):
    """train.py's device and the gate's fast paths on it; on a GPU, its "auto" settings
    (--embedding-on-cpu, --optim, --cuda-graphs) settled by the plan, printed, before anything loads.
    A resumed run keeps its checkpoint's optimizer."""
    from lora.inject import count_trainable
    from model.fast import gate
    if resume is not None and config.optim == "auto":
        config.optim = resume.state["config"]["optim"]
    if not torch.cuda.is_available():
        config.embedding_on_cpu = bool(config.embedding_on_cpu)
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
        fast.grouped_mm or not any(t in config.targets for t in ("experts", "gate_up_proj", "down_proj")))
    if graphs and not config.packing and usable_gib(device) < SMALL_CARD_GIB and config.cuda_graphs == "auto":
        # right-padded micro-batches come in many shapes, a graph each, and every graph keeps its
        # memory: measured, they filled 15.58 GiB by step 16 (docs/BENCHMARKS.md). Packed rows: one shape.
        print(f"no CUDA graphs: padded micro-batches take many shapes, which a card under {SMALL_CARD_GIB} GiB "
              "cannot hold a graph each for (--packing gives one shape)")
        graphs = False
    config.embedding_on_cpu, config.optim, graphs, lines = plan(
        model_config, trainable, config.max_seq_len * (1 if config.packing else config.micro_batch_size),
        graphs, usable_gib(device), config.embedding_on_cpu, config.optim, fast, config.base)
    if not graphs and config.cuda_graphs == "auto":
        config.cuda_graphs = "off"
    print("\n".join(lines))
    return device, fast
