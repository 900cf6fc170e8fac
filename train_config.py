"""train.py's settings: TrainConfig (one field per command-line flag, with its help) and their checks.

The run prints the config at start and saves it with every checkpoint; FREE_ON_RESUME names the fields
that a resumed run may change, every other field is part of the run's identity. Nothing here imports
torch or the parts, so `python train.py --help` answers at once.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DATA = "walledai/JailbreakHub"
# data.MAX_LEN, written out so that the command line needs no import of data/ (and torch): --help
# answers at once. tests/test_train.py checks that the two agree.
MAX_SEQ_LEN = 4096
# The tiny model's default --max-seq-len: on the CPU, eager attention forms each packed row's whole
# (row x row) score matrix, so its rows stay short (its examples are ~250 tokens).
TINY_SEQ_LEN = 512


def option(default, help: str, type=None):
    """A TrainConfig field with its command-line help (and its type where the default is None)."""
    return field(default=default, metadata={"help": help, "type": type})


@dataclass
class TrainConfig:
    # what to train, on what
    model: str = option("openai/gpt-oss-20b", "hub id or local folder of a gpt-oss checkpoint (BF16 or "
                        "MXFP4); 'tiny' builds a small random model, no download, CPU is enough")
    base: str = option("nf4", "how the frozen experts are stored: nf4, or mxfp4 (the MXFP4 codes gpt-oss ships, "
                       "kept as they are and read by their own kernels; a BF16 checkpoint's experts are "
                       "quantised to MXFP4 on load). Attention stays NF4 either way")
    data: str | None = option(None, "hub id, a json/jsonl/csv/parquet file, or a folder holding train.jsonl and "
                       "val.jsonl; 'synthetic' is a small built-in task. Default: " + DEFAULT_DATA
                       + ", or synthetic with --model tiny", type=str)
    prompt_column: str = option("prompt", "column of the prompt text in a --data file or hub data set")
    label_column: str = option("jailbreak", "column of the label in a --data file or hub data set: true/false, "
                               "yes/no, 1/0 or jailbreak/benign (any case)")
    n_examples: int = option(400, "examples drawn from --data when it is prepared here (half of each class)")
    output_dir: str = option("runs/qlora", "folder for checkpoints, the prepared data, metrics.jsonl and adapter/")
    # the adapter
    rank: int = option(16, "LoRA rank r")
    alpha: float | None = option(None, "LoRA alpha: the update is scaled by alpha / rank (default: alpha = rank)",
                          type=float)
    dropout: float = option(0.0, "dropout on the input of each LoRA update, in training (above 0, the step "
                            "cannot be a CUDA graph)")
    targets: str = option("q_proj,k_proj,v_proj,o_proj", "comma-separated modules to adapt: q_proj, k_proj, "
                          "v_proj, o_proj, router, experts, gate_up_proj, down_proj, or regular "
                          "expressions over full module names")
    # the optimisation
    lr: float = option(2e-4, "peak learning rate of AdamW")
    warmup_steps: int = option(10, "optimizer steps of linear warm-up to --lr; then a cosine decay")
    min_lr_ratio: float = option(0.0, "the cosine ends at lr * this, at the last step of the last epoch")
    weight_decay: float = option(0.0, "AdamW's decoupled weight decay on the adapter")
    max_grad_norm: float = option(1.0, "clip the adapter's gradient to this norm (0: no clipping)")
    epochs: int = option(3, "passes over the training split")
    micro_batch_size: int = option(2, "examples per forward/backward pass")
    grad_accum: int = option(4, "micro-batches per optimizer step")
    max_seq_len: int | None = option(None, f"longest example in tokens, and the length of a packed row; longer "
                                     f"prompts are cut in the middle. Default {MAX_SEQ_LEN}, {TINY_SEQ_LEN} with "
                                     "--model tiny", type=int)
    packing: bool = option(True, "lay each step's examples end to end in rows of --max-seq-len tokens, each "
                           "document attending only to itself (exact): few, full rows of one shape, one CUDA "
                           "graph. Without: micro-batches of --micro-batch-size right-padded examples")
    seed: int = option(0, "seeds the LoRA initialisation, dropout, data preparation and order (and the "
                       "tiny model's weights)")
    gradient_checkpointing: bool = option(True, "recompute each block in the backward: far less memory")
    kept_blocks: int | None = option(None, "with checkpointing, the last this many blocks keep their activations "
                                     "instead of being recomputed in the backward: faster, more memory, the same "
                                     "gradients; default: as many as the memory plan finds room for", type=int)
    dense_experts: bool | None = option(None, "dequantise a layer's experts to bf16 for each product and multiply "
                                        "with torch._grouped_mm (Hopper, data-center Blackwell): faster, ~1 GB more "
                                        "GPU memory for gpt-oss-20b; default: where the memory plan has room",
                                        type=bool)
    embedding_on_cpu: bool | None = option(None, "keep the embedding on the CPU (saves ~1.1 GB of GPU memory); "
                                           "default: where the memory plan needs it", type=bool)
    offload_activations: bool | None = option(None, "keep the checkpointed blocks' inputs in pinned CPU memory, "
                                              "copied out and back beside the compute (no CUDA graphs; at 131,072 "
                                              "tokens 0.7 GB a block); default: where the memory plan needs it", type=bool)
    lm_head_nf4: bool | None = option(None, "store the lm_head in NF4 (saves ~0.8 GB; the logits change a little); "
                                      "default: only where the memory plan needs it", type=bool)
    expert_tile: int | None = option(None, "above this many tokens a micro-batch's experts run this many tokens at "
                                     "a time, which bounds their memory (bits of the gradient sums may differ); "
                                     "default: 8192, or 2048 where the memory plan needs it", type=int)
    optim: str = option("auto", "adamw, adamw8bit (bitsandbytes' 8-bit AdamW: moments in a quarter of the "
                        "memory) or auto (adamw8bit only where the memory plan says adamw does not fit)")
    kernels: str = option("auto", "fast paths: auto (every one this GPU and the installed torch/Triton allow, "
                          "printed at start) or plain (none: the plain twins, slower, same math)")
    cuda_graphs: str = option("auto", "replay each micro-batch's forward and backward as a CUDA graph, far "
                              "fewer launches from the host: on, off, or auto (on where the model allows it)")
    memory_headroom: float = option(0.92, "the share of the GPU's usable memory the memory plan's estimate may "
                                    "fill; the rest is the allocator's room. Higher fits longer rows at the risk "
                                    "of running out of memory mid-run (a 16 GB card: 65,536 tokens at 0.95)")
    max_steps: int = option(0, "stop after this many optimizer steps (0: all epochs); the learning-rate "
                            "schedule still spans all epochs")
    max_bad_steps: int = option(5, "stop when this many steps in a row have a non-finite loss or gradient")
    # evaluation, logging, checkpoints
    eval_every: int = option(0, "evaluate on val.jsonl every N steps (0: only at the end)")
    eval_batch_size: int = option(8, "prompts per forward pass in evaluation (with --packing: one packed row "
                                  "of --max-seq-len a forward)")
    eval_base: bool = option(False, "evaluate the base model before training, as a column of the eval table")
    threshold: float = option(0.5, "P(jailbreak) at or above which a prompt counts as a jailbreak")
    log_every: int = option(1, "write a metrics.jsonl line every N steps")
    save_every: int = option(50, "checkpoint every N steps (0: only at the end); always at the end")
    keep_last: int = option(2, "checkpoints kept (0: all); older ones are deleted")
    resume: str | None = option(None, "a checkpoint folder, or 'auto' for the newest in --output-dir "
                                "(default: none, a fresh run)", type=str)


# Fields that may change between a run and its resumption: they do not change what is computed
# (gradient checkpointing, the embedding's device and CUDA graphs give the same math; bits may differ).
FREE_ON_RESUME = {"output_dir", "resume", "max_steps", "max_bad_steps", "eval_every", "eval_batch_size",
                  "eval_base", "threshold", "log_every", "save_every", "keep_last", "gradient_checkpointing",
                  "embedding_on_cpu", "offload_activations", "cuda_graphs", "kernels", "packing",  # packing: the same steps
                  "expert_tile", "memory_headroom", "kept_blocks", "dense_experts"}

class UsageError(Exception):
    """A mistake in what the user asked for: printed as one clear message, never as a traceback."""


def parse_args(argv=None, description: str | None = None) -> TrainConfig:
    """The command line, one flag per TrainConfig field (--micro-batch-size for micro_batch_size)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if isinstance(f.default, bool):  # --flag / --no-flag
            default = f" (default {flag if f.default else '--no-' + flag[2:]})"
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help + default)
        elif f.metadata["type"] is bool:  # --flag / --no-flag, or neither: decided at run time
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        else:  # a None default is explained in the help text itself
            default = "" if f.default is None else f" (default {f.default})"
            parser.add_argument(flag, type=f.metadata["type"] or type(f.default), default=f.default,
                                help=help + default)
    return TrainConfig(**vars(parser.parse_args(argv)))


def adapter_base(config: TrainConfig) -> dict:
    """The base model an adapter of this run belongs to, as save_adapter records it (tiny: and its seed)."""
    return {"base_model": config.model, "base_seed": config.seed if config.model == "tiny" else None,
            "base_experts": config.base}


def with_defaults(config: TrainConfig) -> TrainConfig:
    """The defaults that depend on other settings filled in: row length and data by model, alpha by rank."""
    if config.max_seq_len is None:
        config.max_seq_len = TINY_SEQ_LEN if config.model == "tiny" else MAX_SEQ_LEN
    if config.data is None:
        config.data = "synthetic" if config.model == "tiny" else DEFAULT_DATA
    if config.alpha is None:
        config.alpha = float(config.rank)
    return config


def check(config: TrainConfig):
    """Ranges of the settings, all problems in one message."""
    problems = []
    for f in dataclasses.fields(config):  # inf and nan pass every comparison below, or fail it oddly
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"--{f.name.replace('_', '-')} must be a finite number, not {value}")
    if problems:
        raise UsageError("; ".join(problems))
    for name in ("rank", "epochs", "micro_batch_size", "grad_accum", "max_seq_len", "eval_batch_size",
                 "log_every", "max_bad_steps", "n_examples", "expert_tile"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1, not {getattr(config, name)}")
    for name in ("warmup_steps", "weight_decay", "max_grad_norm", "max_steps", "eval_every", "save_every",
                 "keep_last", "kept_blocks"):
        if getattr(config, name) is not None and getattr(config, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must not be negative, not {getattr(config, name)}")
    if not config.lr > 0:
        problems.append(f"--lr must be positive, not {config.lr}")
    if not 0 <= config.dropout < 1:
        problems.append(f"--dropout must be in [0, 1), not {config.dropout}")
    if config.optim not in ("auto", "adamw", "adamw8bit"):
        problems.append(f"--optim must be auto, adamw or adamw8bit, not {config.optim!r}")
    if config.base not in ("nf4", "mxfp4"):
        problems.append(f"--base must be nf4 or mxfp4, not {config.base!r}")
    if config.kernels not in ("auto", "plain"):
        problems.append(f"--kernels must be auto or plain, not {config.kernels!r}")
    if config.cuda_graphs not in ("auto", "on", "off"):
        problems.append(f"--cuda-graphs must be auto, on or off, not {config.cuda_graphs!r}")
    if not 0 <= config.min_lr_ratio <= 1:
        problems.append(f"--min-lr-ratio must be in [0, 1], not {config.min_lr_ratio}")
    if not 0.5 <= config.memory_headroom <= 1:
        problems.append(f"--memory-headroom must be in [0.5, 1], not {config.memory_headroom}")
    if not 0 < config.threshold < 1:
        problems.append(f"--threshold must be between 0 and 1, not {config.threshold}")
    out = Path(config.output_dir).expanduser()
    in_the_way = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if in_the_way is not None:
        problems.append(f"--output-dir {config.output_dir}: {in_the_way} is a file, not a folder; choose "
                        "another --output-dir")
    if problems:
        raise UsageError("; ".join(problems))


def learning_rate(step: int, total_steps: int, config: TrainConfig) -> float:
    """The learning rate of 0-based optimizer step `step`: linear warm-up, then cosine to min_lr_ratio * lr."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)
