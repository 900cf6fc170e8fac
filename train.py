"""QLoRA fine-tuning of gpt-oss: a frozen NF4 base, a LoRA adapter, and the loop in plain sight.

    python train.py --rank 16                     # gpt-oss-20b on JailbreakHub; a CUDA GPU of 16 GB
    python train.py --model tiny                  # a small random model on a built-in task; CPU, < 1 min
    python train.py --resume auto                 # continue from the newest checkpoint in --output-dir

One optimizer step is --grad-accum micro-batches of --micro-batch-size examples; its loss is the mean
over every answer token of the step, however the step is split. With --packing (the default) the
step's examples are laid end to end in rows of --max-seq-len tokens, each row one forward/backward.
Checkpoints are safetensors + JSON in <output-dir>/checkpoint-<step>/; resuming from one reproduces
the uninterrupted run exactly.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
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
    embedding_on_cpu: bool | None = option(None, "keep the embedding on the CPU (saves ~1.1 GB of GPU memory); "
                                           "default: where the memory plan needs it", type=bool)
    optim: str = option("auto", "adamw, adamw8bit (bitsandbytes' 8-bit AdamW: moments in a quarter of the "
                        "memory) or auto (adamw8bit only where the memory plan says adamw does not fit)")
    kernels: str = option("auto", "fast paths: auto (every one this GPU and the installed torch/Triton allow, "
                          "printed at start) or plain (none: the plain twins, slower, same math)")
    cuda_graphs: str = option("auto", "replay each micro-batch's forward and backward as a CUDA graph, far "
                              "fewer launches from the host: on, off, or auto (on where the model allows it)")
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
                  "embedding_on_cpu", "cuda_graphs", "kernels", "packing"}  # packing: the same steps

NO_GPU = ("--model {model} needs a CUDA GPU, and none is visible. gpt-oss-20b in NF4 takes about 12 GB "
          "of GPU memory (a 16 GB card trains it at --max-seq-len 4096); gpt-oss-120b needs an 80 GB card. "
          "Without a GPU, try the small random model: python train.py --model tiny")


class UsageError(Exception):
    """A mistake in what the user asked for: printed as one clear message, never as a traceback."""


def parse_args(argv=None) -> TrainConfig:
    """The command line, one flag per TrainConfig field (--micro-batch-size for micro_batch_size)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


# --help and malformed flags are answered before torch and the parts below are imported (seconds).
if __name__ == "__main__":
    parse_args()

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data import (batch_order, encode_split, load_tokenizer, make_batches, pack_rows, prepare,  # noqa: E402
                  read_split, shortest_max_len, special_id, tiny_tokenizer, write_synthetic)
from eval import evaluate, format_table  # noqa: E402
from eval.report import change  # noqa: E402
from lora import inject, load_adapter, lora_parameters, save_adapter  # noqa: E402
from lora.inject import count_trainable  # noqa: E402
from memory_plan import SMALL_CARD_GIB, cap_gpu_memory, plan, usable_gib  # noqa: E402
from model import GptOss, GptOssConfig, load_model  # noqa: E402
from model.fast import gate  # noqa: E402
from model.fast.cuda_graph import GraphedStep, graph_problem  # noqa: E402
from model.weights.loading import CheckpointError  # noqa: E402
from model.loss import IGNORE  # noqa: E402


def main(argv=None) -> int:
    config = parse_args(argv)
    # Growable segments instead of fixed blocks: far less memory lost between blocks on a small card
    # (read when CUDA first allocates; a user's own setting wins).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    try:
        return train(config)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, without saving
        print(f"interrupted; nothing saved since the last checkpoint in {config.output_dir}", file=sys.stderr)
        return 130


def train(config: TrainConfig) -> int:
    """The whole run: model, adapter, data, optimizer, then the loop of steps. Returns the exit code."""
    started = time.monotonic()  # metrics.jsonl's "elapsed" counts from here
    tiny = config.model == "tiny"
    if config.max_seq_len is None:
        config.max_seq_len = TINY_SEQ_LEN if tiny else MAX_SEQ_LEN
    check(config)
    if config.data is None:
        config.data = "synthetic" if tiny else DEFAULT_DATA
    if config.alpha is None:
        config.alpha = float(config.rank)
    print("config:\n" + "\n".join(f"  {k:<24} {v}" for k, v in dataclasses.asdict(config).items()))
    if not tiny and not torch.cuda.is_available():
        raise UsageError(NO_GPU.format(model=config.model))
    resume_from = find_resume(config)  # before the slow loading: a wrong --resume fails at once
    device = fit_memory(config, resume_from)
    out = Path(config.output_dir)  # created once the model and the data have loaded: no empty folder on an error

    # --- the model: frozen base (NF4 on GPU), then the adapter
    torch.manual_seed(config.seed)  # the tiny model's weights, the LoRA init, then dropout
    if tiny:
        model = GptOss(GptOssConfig.from_name("tiny")).to(device)  # float32
        tokenizer = tiny_tokenizer()
    else:
        with user_errors(f"cannot load the model {config.model!r}"):
            model = load_model(config.model, quantize="nf4", device="cuda", dtype=torch.bfloat16,
                               embedding_device="cpu" if config.embedding_on_cpu else None)
            tokenizer = load_tokenizer(config.model)
    model.gradient_checkpointing = config.gradient_checkpointing
    with user_errors("cannot put LoRA into the model"):
        inject(model, targets=config.targets, rank=config.rank, alpha=config.alpha, dropout=config.dropout)
    params = [p for _, p in lora_parameters(model)]
    model.fast_paths = gate.decide(device, config.kernels)
    print(f"fast paths on {device}:\n{model.fast_paths.describe()}")
    graphed = step_path(model, params, config.cuda_graphs, model.fast_paths)

    # --- the data: train.jsonl / val.jsonl, encoded with loss masks
    train_set, val_set, fingerprint = load_data(config, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    pad_id = special_id(tokenizer, "<|endoftext|>")
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / config.micro_batch_size) / config.grad_accum)
    total_steps = config.epochs * steps_per_epoch

    # --- the optimizer, on the adapter only
    if config.optim == "adamw8bit":
        import bitsandbytes as bnb
        optimizer = bnb.optim.AdamW8bit(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                                      fused=device.type == "cuda")
    progress = {"step": 0, "epoch": 0, "batch": 0, "skipped_steps": 0, "bad_in_a_row": 0,
                "tokens": 0, "target_tokens": 0, "base_metrics": None}
    metrics_path = out / "metrics.jsonl"
    if resume_from is not None:
        progress = load_checkpoint(resume_from, model, optimizer, fingerprint)
        keep_metrics_until(metrics_path, progress["step"])
        print(f"resumed from {resume_from}: step {progress['step']} of {total_steps}, epoch "
              f"{progress['epoch']}, batch {progress['batch']}")
    else:
        metrics_path.unlink(missing_ok=True)
        if config.eval_base:  # a fresh adapter (B = 0) leaves the base model's outputs unchanged
            progress["base_metrics"] = evaluate_and_log(model, tokenizer, val_set, config, 0, None,
                                                        metrics_path, started)
    print(f"{len(train_set)} training examples, {config.micro_batch_size} x {config.grad_accum} per step: "
          f"{steps_per_epoch} steps per epoch, {total_steps} in all; device {device}")

    # --- the loop
    stop = {"signal": None}  # set by SIGINT/SIGTERM: finish the step, save, exit
    restore_signals = catch_signals(stop)
    bar = tqdm(total=total_steps, initial=progress["step"], desc="train", unit="step", dynamic_ncols=True)
    saved_at = progress["step"] if resume_from is not None else None
    evaluated_at, metrics = None, None
    model.train()
    try:
        for epoch, next_batch, micro_batches in optimizer_steps(train_set, config, pad_id,
                                                                progress["epoch"], progress["batch"]):
            if config.max_steps and progress["step"] >= config.max_steps:
                tqdm.write(f"--max-steps {config.max_steps} reached")
                break
            start = time.perf_counter()
            lr = learning_rate(progress["step"], total_steps, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, target_tokens = accumulate(model, micro_batches, graphed)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf)
            finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
            if finite:
                optimizer.step()
                progress["bad_in_a_row"] = 0
            else:  # the update is dropped; the data and the schedule move on
                progress["skipped_steps"] += 1
                progress["bad_in_a_row"] += 1
            optimizer.zero_grad(set_to_none=True)
            tokens = sum(int((ids != pad_id).sum()) for ids, *_ in micro_batches)
            seconds = time.perf_counter() - start
            progress.update(step=progress["step"] + 1, epoch=epoch, batch=next_batch,
                            tokens=progress["tokens"] + tokens,
                            target_tokens=progress["target_tokens"] + target_tokens)
            step = progress["step"]

            # log
            record = {"kind": "train", "step": step, "epoch": epoch, "loss": loss.item(), "lr": lr,
                      "grad_norm": grad_norm.item(), "target_tokens": target_tokens, "tokens": tokens,
                      "tokens_per_second": tokens / seconds, "skipped": not finite,
                      "skipped_steps": progress["skipped_steps"]}
            postfix = {"loss": f"{record['loss']:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tokens / seconds:.0f}"}
            if device.type == "cuda":
                postfix["mem"] = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}G"
            if graphed is not None:
                postfix["graphs"] = graphed.captures
            bar.set_postfix(postfix)
            bar.update(1)
            if step % config.log_every == 0 or not finite:
                log(metrics_path, {k: None if isinstance(v, float) and not math.isfinite(v) else v  # strict JSON
                                   for k, v in record.items()}, started)
            if not finite:
                tqdm.write(f"step {step}: non-finite loss ({record['loss']}) or gradient norm "
                           f"({record['grad_norm']}); step skipped ({progress['bad_in_a_row']} in a row)")
                if progress["bad_in_a_row"] >= config.max_bad_steps:
                    last = latest_checkpoint(out)
                    tqdm.write(f"error: {progress['bad_in_a_row']} steps in a row had a non-finite loss or "
                               "gradient, so the run stops. Lower --lr or --max-grad-norm, or check the data; "
                               f"the last good checkpoint is {last or 'none (no checkpoint was saved)'}",
                               file=sys.stderr)
                    return 1

            # evaluate, checkpoint
            if config.eval_every and step % config.eval_every == 0:
                metrics = evaluate_and_log(model, tokenizer, val_set, config, step, progress["base_metrics"],
                                           metrics_path, started)
                evaluated_at = step
            if (config.save_every and step % config.save_every == 0) or stop["signal"] is not None:
                path = save_checkpoint(out, model, optimizer, progress, config, fingerprint)
                saved_at = step
            if stop["signal"] is not None:
                tqdm.write(f"stopped by {signal.Signals(stop['signal']).name} after step {step}; checkpoint "
                           f"saved in {path}. Continue with --resume auto")
                return 128 + stop["signal"]
    finally:
        bar.close()
        restore_signals()

    # --- the end: checkpoint, adapter, evaluation
    step = progress["step"]
    path = save_checkpoint(out, model, optimizer, progress, config, fingerprint) if saved_at != step else \
        checkpoint_path(out, step)
    save_adapter(model, str(out / "adapter"), **adapter_base(config))
    if graphed is not None:  # the graphs' memory back for the evaluation
        del graphed
        torch.cuda.empty_cache()
    if evaluated_at != step:
        metrics = evaluate_and_log(model, tokenizer, val_set, config, step, progress["base_metrics"], metrics_path,
                                   started)
    print(f"done: {step} of {total_steps} steps ({progress['skipped_steps']} skipped), validation F1 "
          f"{metrics['f1']:.4f}; adapter in {out / 'adapter'}, checkpoint in {path}")
    if device.type == "cuda":
        print(f"GPU memory: peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated, "
              f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved")
    return 0


# ----------------------------------------------------------------------------- memory
def fit_memory(config: TrainConfig, resume_from) -> torch.device:
    """The device; on a GPU, settle --embedding-on-cpu, --optim and --cuda-graphs ("auto") from the
    memory plan, before anything loads."""
    with user_errors(f"cannot load the model {config.model!r}"):   # (a hub id: its config.json only)
        model_config = GptOssConfig.from_name("tiny") if config.model == "tiny" else \
            GptOssConfig.from_pretrained(config.model)
    if not torch.cuda.is_available():
        config.embedding_on_cpu = bool(config.embedding_on_cpu)
        config.optim = "adamw" if config.optim == "auto" else config.optim
        return torch.device("cpu")
    device = torch.device("cuda", torch.cuda.current_device())
    if resume_from is not None and config.optim == "auto":   # the optimizer state on disk decides
        config.optim = read_trainer_state(resume_from)["config"]["optim"]
    if gate.bf16_problem(device):
        raise UsageError(gate.bf16_problem(device))
    with user_errors("cannot plan the GPU memory"):
        cap_gpu_memory(device)
        trainable = count_trainable(model_config, targets=config.targets, rank=config.rank)
        fast = gate.decide(device, config.kernels)
        # graphs need dropout 0, and torch._grouped_mm where expert adapters run (model/fast/cuda_graph.py)
        graphs = config.cuda_graphs != "off" and config.dropout == 0 and fast.cuda_graphs and (
            fast.grouped_mm or not any(t in config.targets for t in ("experts", "gate_up_proj", "down_proj")))
        if graphs and not config.packing and usable_gib(device) < SMALL_CARD_GIB and config.cuda_graphs == "auto":
            # right-padded micro-batches come in many shapes, a graph each, and every graph keeps its
            # memory: measured, they filled 15.58 GiB by step 16 (docs/BENCHMARKS.md). Packed rows: one shape.
            print("no CUDA graphs: padded micro-batches take many shapes, which a card under "
                  f"{SMALL_CARD_GIB} GiB cannot hold a graph each for (--packing gives one shape)")
            graphs = False
        config.embedding_on_cpu, config.optim, graphs, lines = plan(
            model_config, trainable, config.max_seq_len * (1 if config.packing else config.micro_batch_size),
            graphs, usable_gib(device), config.embedding_on_cpu, config.optim, fast)
        if not graphs and config.cuda_graphs == "auto":
            config.cuda_graphs = "off"
    print("\n".join(lines))
    return device


# ----------------------------------------------------------------------------- one step
def step_path(model, params, cuda_graphs: str, fast: gate.FastPaths) -> GraphedStep | None:
    """The GraphedStep that runs each micro-batch, or None for the eager step; says which, and why."""
    problem = graph_problem(model, fast) if cuda_graphs != "off" else "--cuda-graphs off"
    if problem is not None and cuda_graphs == "on":
        raise UsageError(f"--cuda-graphs on, but the step cannot be a CUDA graph: {problem}. "
                         "Use --cuda-graphs auto or off")
    if problem is not None:
        print(f"step: eager, not CUDA graphs ({problem})")
        return None
    print("step: CUDA graphs (one captured per padded micro-batch shape, then replayed; one in all for "
          "packed rows)")
    return GraphedStep(model, params, fast)


def accumulate(model, micro_batches, graphed: GraphedStep | None = None) -> tuple[torch.Tensor, int]:
    """Forward and backward over one optimizer step's micro-batches; returns (mean loss, target tokens).

    Each micro-batch's summed loss is divided by the target-token count of the WHOLE step, so the
    gradient is that of the mean over all the step's answer tokens: micro-batch 1 x accumulation 4
    gives the same update as micro-batch 4 x accumulation 1, however many tokens each example has.
    With `graphed`, each micro-batch is a CUDA graph replay that adds the same gradient. A packed
    micro-batch (data.PackedRows) also carries its document ids and positions, passed on as they are.
    """
    # labels are not shifted: position i predicts labels[i + 1], so the targets are labels[:, 1:]
    step_tokens = sum(int((labels[:, 1:] != IGNORE).sum()) for _, labels, *_ in micro_batches)
    assert step_tokens > 0, "a step without a single target token: every answer was masked"
    loss_sum = 0.0
    for input_ids, labels, *packed in micro_batches:  # (batch, seq) each; packed: (doc_ids, positions) or ()
        if graphed is not None:
            total = graphed.step(input_ids, labels, 1.0 / step_tokens, *packed)
        else:
            total, _ = model.loss(input_ids, labels, "sum", *packed)
            (total / step_tokens).backward()
        loss_sum = loss_sum + total.detach().float()  # stays on the device: no sync per micro-batch
    return loss_sum / step_tokens, step_tokens


def learning_rate(step: int, total_steps: int, config: TrainConfig) -> float:
    """The learning rate of 0-based optimizer step `step`: linear warm-up, then cosine to min_lr_ratio * lr."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def optimizer_steps(train_set, config: TrainConfig, pad_id: int, epoch: int, batch: int):
    """(epoch, index of the next micro-batch, micro-batches) of each optimizer step from (epoch, batch) on.

    An epoch's batches depend only on (seed, epoch), so a resumed run rebuilds them and skips those
    done. The last step of an epoch takes what is left (fewer micro-batches); steps never span epochs.
    With packing, a step takes the same examples, packed first-fit decreasing into rows of
    --max-seq-len (data.pack), one row a micro-batch; the packing is a pure function of those examples,
    so the data position (epoch, batch) still says all a resumed run needs, and --micro-batch-size
    counts examples, of which micro-batch-size x grad-accum make a step, as without packing.
    """
    for e in range(epoch, config.epochs):
        if not config.packing:
            batches = make_batches(train_set, config.micro_batch_size, config.seed, e, pad_id)
        else:
            batches = batch_order([len(ids) for ids, *_ in train_set], config.micro_batch_size, config.seed, e)
        for first in range(batch if e == epoch else 0, len(batches), config.grad_accum):
            chunk = batches[first:first + config.grad_accum]
            if config.packing:
                yield e, first + len(chunk), pack_rows([train_set[i] for group in chunk for i in group],
                                                       config.max_seq_len, pad_id)
            else:
                yield e, first + len(chunk), chunk


# ----------------------------------------------------------------------------- evaluation and logging
def evaluate_and_log(model, tokenizer, val_set, config: TrainConfig, step: int, base: dict | None,
                     metrics_path: Path, started: float) -> dict:
    """Score val.jsonl, print the table (beside the base model's column when there is one), log it."""
    metrics = evaluate(model, tokenizer, val_set, batch_size=1 if config.packing else config.eval_batch_size,
                       threshold=config.threshold, max_len=config.max_seq_len, progress=True,
                       pack_len=config.max_seq_len if config.packing else None)
    name = "base" if step == 0 and base is None else f"step {step}"
    columns = {name: metrics}
    if base is not None:
        columns = {"base": base, name: metrics, "change": change(base, metrics)}
    tqdm.write(f"validation ({len(val_set)} examples) at step {step}:\n{format_table(columns)}")
    log(metrics_path, {"kind": "eval", "step": step, **metrics}, started)
    return metrics


def log(metrics_path: Path, record: dict, started: float):
    """Append one JSON line to metrics.jsonl, stamped with the time (UTC) and the seconds since `started`
    (a time.monotonic() of this run's start; a resumed run counts from its own start)."""
    stamp = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "elapsed": round(time.monotonic() - started, 3)}
    with open(metrics_path, "a", encoding="utf-8") as f:
        f.write(json.dumps({**record, **stamp}) + "\n")


def keep_metrics_until(metrics_path: Path, step: int):
    """On resume: drop the lines of steps after the checkpoint, which the resumed run writes again."""
    if not metrics_path.is_file():
        return
    lines = [line for line in metrics_path.read_text(encoding="utf-8").splitlines()
             if line.strip() and json.loads(line)["step"] <= step]
    metrics_path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


# ----------------------------------------------------------------------------- data
def load_data(config: TrainConfig, tokenizer) -> tuple[list, list[dict], str]:
    """(encoded training examples, validation examples, fingerprint of both files).

    --data is used as is when it is a folder holding train.jsonl and val.jsonl; otherwise it is
    prepared (deterministically, with the seed) into <output-dir>/data.
    """
    shortest = shortest_max_len(tokenizer)
    if config.max_seq_len < shortest:
        raise UsageError(f"--max-seq-len {config.max_seq_len} is too short: the system message, policy, "
                         f"answer and a cut prompt need at least {shortest} tokens of this model's tokenizer. "
                         f"Pass --max-seq-len {shortest} or more (default {MAX_SEQ_LEN})")
    # Nothing is written before the source has been read and checked: prepare() writes last.
    source, folder = config.data, Path(config.data).expanduser()
    with user_errors(f"cannot use the data {source!r}"):
        if source == "synthetic":
            folder = Path(config.output_dir) / "data"
            counts = write_synthetic(str(folder), seed=config.seed)
            print(f"built-in synthetic task: {counts['train']} train, {counts['val']} val -> {folder}")
        elif not (folder.is_dir() and (folder / "train.jsonl").is_file()):
            folder = Path(config.output_dir) / "data"
            prepare(source, str(folder), n=config.n_examples, seed=config.seed,
                    prompt_column=config.prompt_column, label_column=config.label_column)
        train_examples = read_split(str(folder / "train.jsonl"))
        val_set = read_split(str(folder / "val.jsonl"))
        train_set, n_cut = encode_split(tokenizer, train_examples, config.max_seq_len)
    digest = hashlib.sha256()
    for name in ("train.jsonl", "val.jsonl"):
        digest.update((folder / name).read_bytes())
    lengths = sorted(len(ids) for ids, _ in train_set)
    print(f"data {folder}: {len(train_set)} train, {len(val_set)} val; train tokens per example: median "
          f"{lengths[len(lengths) // 2]}, longest {lengths[-1]}; {n_cut} prompts cut to --max-seq-len "
          f"{config.max_seq_len}")
    return train_set, val_set, digest.hexdigest()


def adapter_base(config: TrainConfig) -> dict:
    """The base model an adapter of this run belongs to, as save_adapter records it (tiny: and its seed)."""
    return {"base_model": config.model, "base_seed": config.seed if config.model == "tiny" else None}


@contextlib.contextmanager
def user_errors(what: str):
    """Errors about what the user pointed us at (files, hub ids, settings) become one clear UsageError."""
    try:
        yield
    except (CheckpointError, FileNotFoundError, ValueError) as error:  # CheckpointError is a ValueError
        raise UsageError(f"{what}: {error}") from error


# ----------------------------------------------------------------------------- checkpoints
# <output-dir>/checkpoint-<step>/
#     adapter_model.safetensors, adapter_config.json    the adapter, PEFT's layout (lora.save_adapter)
#     optimizer.safetensors                              AdamW state: state.<param index>.<name>
#     rng.safetensors                                    torch_cpu, cuda.<device>: generator states (uint8)
#     trainer_state.json                                 progress, data position, schedule, param_groups, config
# No pickle anywhere: loading a checkpoint never runs code.
def checkpoint_path(out: Path, step: int) -> Path:
    return out / f"checkpoint-{step}"


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in out, oldest first (the temporary folders start with '.')."""
    found = []
    for path in out.glob("checkpoint-*") if out.is_dir() else []:
        suffix = path.name.removeprefix("checkpoint-")
        if suffix.isdigit() and (path / "trainer_state.json").is_file():
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def save_checkpoint(out: Path, model, optimizer, progress: dict, config: TrainConfig, fingerprint: str) -> Path:
    """Write checkpoint-<step> into a temporary folder and rename it into place; keep the last --keep-last."""
    step = progress["step"]
    final, tmp = checkpoint_path(out, step), out / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-save
    save_adapter(model, str(tmp), **adapter_base(config))
    opt = optimizer.state_dict()
    save_file({f"state.{index}.{name}": value.detach().cpu().contiguous()
               for index, state in opt["state"].items() for name, value in state.items()},
              str(tmp / "optimizer.safetensors"))
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
    trainer_state = {
        "progress": progress,  # step, data position (epoch, next batch), counters
        "scheduler": {"kind": "linear warm-up, then cosine", "step": step},  # lr is a function of the step
        "param_groups": opt["param_groups"],
        "config": dataclasses.asdict(config),
        "data_fingerprint": fingerprint,
        "torch": torch.__version__,
    }
    with open(tmp / "trainer_state.json", "w", encoding="utf-8") as f:
        json.dump(trainer_state, f, indent=1)
    if final.exists():  # the same step saved by an earlier attempt of this run
        shutil.rmtree(final)
    os.replace(tmp, final)
    if config.keep_last:
        for old in list_checkpoints(out)[:-config.keep_last]:
            shutil.rmtree(old)
    return final


def read_trainer_state(folder: Path) -> dict:
    path = Path(folder) / "trainer_state.json"
    if not path.is_file():
        raise UsageError(f"{folder} is not a checkpoint: it has no trainer_state.json. Pass a "
                         "checkpoint-<step> folder written by train.py, or --resume auto")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def find_resume(config: TrainConfig) -> Path | None:
    """The checkpoint to resume from (None: a fresh run); refuses one whose run was configured otherwise."""
    out = Path(config.output_dir)
    if config.resume is None:
        if list_checkpoints(out):
            raise UsageError(f"{out} already holds checkpoints ({', '.join(p.name for p in list_checkpoints(out))}); "
                             "continue that run with --resume auto, or choose another --output-dir")
        return None
    if config.resume == "auto":
        folder = latest_checkpoint(out)
        if folder is None:
            print(f"--resume auto: no checkpoint in {out}; starting fresh")
            return None
    else:
        folder = Path(config.resume)
    saved = read_trainer_state(folder)["config"]
    differ = [f"--{k.replace('_', '-')}: {saved.get(k)!r} in the checkpoint, {v!r} now"
              for k, v in dataclasses.asdict(config).items()
              if k not in FREE_ON_RESUME and saved.get(k) != v and v != "auto"]   # auto: the checkpoint's
    if differ:
        raise UsageError(f"cannot resume from {folder}: the run there was configured differently:\n  "
                         + "\n  ".join(differ) + "\nResume with the checkpoint's settings, or start a new "
                         "run in another --output-dir")
    return folder


def load_checkpoint(folder: Path, model, optimizer, fingerprint: str) -> dict:
    """Restore adapter, optimizer, RNG states; return the progress (step, data position, counters)."""
    state = read_trainer_state(folder)
    if state["data_fingerprint"] != fingerprint:
        raise UsageError(f"cannot resume from {folder}: train.jsonl / val.jsonl differ from the data that "
                         "run trained on. Resume with the same --data, or start a new run")
    with user_errors(f"cannot resume from {folder}"):
        load_adapter(model, str(folder))
    opt_state: dict[int, dict] = {}
    for key, value in load_file(str(Path(folder) / "optimizer.safetensors")).items():
        _, index, name = key.split(".", 2)
        opt_state.setdefault(int(index), {})[name] = value
    groups = [dict(group, betas=tuple(group["betas"])) for group in state["param_groups"]]
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    rng = load_file(str(Path(folder) / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    cuda = [rng[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in rng]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
    return state["progress"]


# ----------------------------------------------------------------------------- signals
def catch_signals(stop: dict):
    """SIGINT/SIGTERM set stop["signal"] (a second one interrupts at once); returns a function to undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # handlers can only be set from the main thread

    def handler(signum, frame):
        if stop["signal"] is not None:
            raise KeyboardInterrupt
        stop["signal"] = signum
        tqdm.write(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                   "(send it again to stop at once)")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    return lambda: [signal.signal(s, h) for s, h in previous.items()]


# ----------------------------------------------------------------------------- command line
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
                 "log_every", "max_bad_steps", "n_examples"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1, not {getattr(config, name)}")
    for name in ("warmup_steps", "weight_decay", "max_grad_norm", "max_steps", "eval_every", "save_every",
                 "keep_last"):
        if getattr(config, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must not be negative, not {getattr(config, name)}")
    if not config.lr > 0:
        problems.append(f"--lr must be positive, not {config.lr}")
    if not 0 <= config.dropout < 1:
        problems.append(f"--dropout must be in [0, 1), not {config.dropout}")
    if config.optim not in ("auto", "adamw", "adamw8bit"):
        problems.append(f"--optim must be auto, adamw or adamw8bit, not {config.optim!r}")
    if config.kernels not in ("auto", "plain"):
        problems.append(f"--kernels must be auto or plain, not {config.kernels!r}")
    if config.cuda_graphs not in ("auto", "on", "off"):
        problems.append(f"--cuda-graphs must be auto, on or off, not {config.cuda_graphs!r}")
    if not 0 <= config.min_lr_ratio <= 1:
        problems.append(f"--min-lr-ratio must be in [0, 1], not {config.min_lr_ratio}")
    if not 0 < config.threshold < 1:
        problems.append(f"--threshold must be between 0 and 1, not {config.threshold}")
    out = Path(config.output_dir).expanduser()
    in_the_way = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if in_the_way is not None:
        problems.append(f"--output-dir {config.output_dir}: {in_the_way} is a file, not a folder; choose "
                        "another --output-dir")
    if problems:
        raise UsageError("; ".join(problems))


if __name__ == "__main__":
    sys.exit(main())
