"""QLoRA fine-tuning of gpt-oss: a frozen NF4 base, a LoRA adapter, and the loop in plain sight.

    python train.py --rank 16                     # gpt-oss-20b on JailbreakHub; a CUDA GPU of 16 GB
    python train.py --model tiny                  # a small random model on a built-in task; CPU, < 1 min
    python train.py --resume auto                 # continue from the newest checkpoint in --output-dir

One optimizer step is --grad-accum micro-batches of --micro-batch-size examples; its loss is the mean
over every answer token of the step, however the step is split. With --packing (the default) the
step's examples are laid end to end in rows of --max-seq-len tokens, each row one forward/backward.
What the GPU can hold is planned before loading (memory_plan.py). Checkpoints are safetensors + JSON
in <output-dir>/checkpoint-<step>/, every file checksummed (checkpoints.py); resuming from one
reproduces the uninterrupted run exactly. Ctrl-C finishes the step, saves, and stops (stopping.py).
"""
from __future__ import annotations

import os
import signal
import sys

# Growable segments, not fixed blocks (at 65,536 tokens on 16 GB fixed blocks lost 2 GiB): read once, when
# CUDA starts, which importing bitsandbytes already does, so before the imports. A user's own setting wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def stopped_while_loading(signum, frame):
    """Until main() takes over: a signal while torch loads (seconds) ends with one line, no traceback."""
    try:
        os.write(2, f"{signal.Signals(signum).name}: stopped while starting, before any training step\n".encode())
    finally:
        os._exit(128 + signum)


if __name__ == "__main__":  # first thing, before the slow imports below
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stopped_while_loading)

import contextlib  # noqa: E402 (the handlers above come first)
import dataclasses  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from train_config import (FREE_ON_RESUME, TrainConfig, UsageError, adapter_base, check, learning_rate,  # noqa: E402
                          parse_args, with_defaults)

if __name__ == "__main__":  # --help and malformed flags are answered before torch is imported (seconds)
    parse_args(sys.argv[1:], __doc__)

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import checkpoints  # noqa: E402
import distributed  # noqa: E402
from checkpoints import Refused, WriteFailed, log  # noqa: E402
from data import batch_order, load_tokenizer, make_batches, pack_rows, special_id, tiny_tokenizer  # noqa: E402
from data.splits import load_splits  # noqa: E402
from eval import evaluate, format_table  # noqa: E402
from eval.report import change  # noqa: E402
from lora import inject, lora_parameters  # noqa: E402
from memory_plan import fit, out_of_memory, placement  # noqa: E402
from model import GptOss, GptOssConfig, load_model  # noqa: E402
from model.fast import gate  # noqa: E402
from model.fast.cuda_graph import GraphedStep, graph_problem  # noqa: E402
from model.loss import IGNORE  # noqa: E402
from model.weights.loading import CheckpointError, mxfp4_experts  # noqa: E402
from stopping import Interrupted, SafeStream, StopSignals, say  # noqa: E402

NO_GPU = ("--model {model} needs a CUDA GPU, and none is visible. gpt-oss-20b in NF4 takes about 12 GB "
          "of GPU memory (a 16 GB card trains it at --max-seq-len 4096); gpt-oss-120b needs an 80 GB card. "
          "Without a GPU, try the small random model: python train.py --model tiny")


def main(argv=None) -> int:
    """The command line around a run: signals, stdout/stderr that may close, the folder's lock, and one
    clear line (never a traceback) for every way a run can end early. Returns the exit code."""
    # as at the top, for a caller that imported this module and then unset it (before NCCL's start)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    config, made, world = None, False, distributed.start()  # torchrun's ranks, or one process
    stdout = SafeStream(sys.stdout) if world.main else open(os.devnull, "w")  # rank 0 alone prints; all say errors
    with StopSignals() as stop, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(SafeStream(sys.stderr)):
        try:
            config = settle(parse_args(argv, __doc__))
            out = Path(config.output_dir)
            made = world.main and not out.exists()   # a run that stops on a mistake leaves nothing behind
            with user_errors(f"cannot use --output-dir {config.output_dir}"):
                out.mkdir(parents=True, exist_ok=True)
            with checkpoints.lock(out, say) if world.main else contextlib.nullcontext():
                return train(config, stop, world)
        except (UsageError, Refused, WriteFailed) as error:  # WriteFailed: the disk, not the user
            say(f"error: {error}", error=True)
            if config is not None and made and isinstance(error, UsageError):
                checkpoints.remove_if_only_lock(out)
            return 1 if isinstance(error, WriteFailed) else 2
        except torch.OutOfMemoryError as error:  # past the plan: one line, and the allocator's summary on disk
            say(f"error: {out_of_memory(error, config.output_dir)}", error=True)
            return 1
        except Interrupted as stopped:  # before the loop: every write so far was atomic
            say(f"{stopped}: stopped while starting, before any training step", error=True)
            return 128 + stopped.signum
        except KeyboardInterrupt:  # a second signal in the loop: stop at once, without saving
            where = f" in {config.output_dir}" if config else ""
            say(f"interrupted; nothing saved since the last checkpoint{where}", error=True)
            return 130
        finally:
            distributed.finish(world)


def settle(config: TrainConfig) -> TrainConfig:
    """Check the settings, fill in the defaults that depend on others, print the result."""
    check(with_defaults(config))
    print("config:\n" + "\n".join(f"  {k:<24} {v}" for k, v in dataclasses.asdict(config).items()))
    if config.model != "tiny" and not torch.cuda.is_available():
        raise UsageError(NO_GPU.format(model=config.model))
    return config


def train(config: TrainConfig, stop: StopSignals, world=distributed.World()) -> int:
    """The whole run: model, adapter, data, optimizer, then the loop of steps. Returns the exit code."""
    started = time.monotonic()  # metrics.jsonl's "elapsed" counts from here
    out, accum = Path(config.output_dir), config.grad_accum * world.size  # micro-batches a step, all ranks
    # ("auto"/None settings are the checkpoint's to decide: the memory plan below reads them from it)
    wanted = {k: v for k, v in distributed.global_config(dataclasses.asdict(config), world).items()
              if k not in FREE_ON_RESUME and v not in ("auto", None)}
    with world.rank0_first():  # rank 0 cleans up and sets damaged checkpoints aside; the others see the result
        if world.main:
            checkpoints.clean_leftovers(out, say)
        resume = checkpoints.choose(out, config.resume, wanted, say)  # before the slow loading: fail at once
    with user_errors(f"cannot load the model {config.model!r}"):   # (a hub id: its config.json only)
        model_config = GptOssConfig.from_name("tiny") if config.model == "tiny" else \
            GptOssConfig.from_pretrained(config.model)
    with user_errors("cannot plan the GPU memory"):
        device, fast = fit(config, model_config, resume)
    saved = distributed.global_config(dataclasses.asdict(config), world) | ({"world_size": world.size}
                                                                          if world.size > 1 else {})
    compute = {k: v for k, v in saved.items() if k not in FREE_ON_RESUME and k != "world_size"}

    # --- the model: frozen base (NF4 on GPU, the experts as --base says), then the adapter
    torch.manual_seed(config.seed)  # the tiny model's weights, the LoRA init, then dropout
    if config.model == "tiny":
        model = GptOss(GptOssConfig.from_name("tiny")).to(device)  # float32
        model = mxfp4_experts(model) if config.base == "mxfp4" else model
        tokenizer = tiny_tokenizer()
    else:
        with user_errors(f"cannot load the model {config.model!r}"):
            model = load_model(config.model, quantize="nf4", experts=config.base, device=device, dtype=torch.bfloat16,
                               **placement(config))
            tokenizer = load_tokenizer(config.model)
    model.gradient_checkpointing, model.offload_activations = config.gradient_checkpointing, config.offload_activations
    model.kept_blocks, model.dense_experts = config.kept_blocks, bool(config.dense_experts)
    model.set_expert_tile(config.expert_tile)
    with user_errors("cannot put LoRA into the model"):
        inject(model, targets=config.targets, rank=config.rank, alpha=config.alpha, dropout=config.dropout)
    params = [p for _, p in lora_parameters(model)]
    model.fast_paths = fast
    print(f"fast paths on {device}:\n{fast.describe(config.base)}")
    graphed = step_path(model, params, config.cuda_graphs, fast)

    # --- the data: train.jsonl / val.jsonl, encoded with loss masks
    with user_errors(f"cannot use the data {config.data!r}"), world.rank0_first():  # rank 0 prepares it
        train_set, val_set, fingerprint = load_splits(config.data, config.output_dir, tokenizer, config.max_seq_len,
                                                      config.n_examples, config.seed, config.prompt_column,
                                                      config.label_column)
    pad_id = special_id(tokenizer, "<|endoftext|>")
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / config.micro_batch_size) / accum)
    total_steps = config.epochs * steps_per_epoch
    identity = checkpoints.run_identity(compute, fingerprint)

    # --- the optimizer, on the adapter only (checkpoints keep any optimizer's whole state_dict)
    if config.optim == "adamw8bit":
        import bitsandbytes as bnb
        optimizer = bnb.optim.AdamW8bit(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                                      fused=device.type == "cuda")
    progress = {"step": 0, "epoch": 0, "batch": 0, "skipped_steps": 0, "bad_in_a_row": 0,
                "tokens": 0, "target_tokens": 0, "base_metrics": None, "best": None}
    if resume is not None:
        progress = checkpoints.restore(resume, model, optimizer, identity, total_steps)
        say(f"resumed from {resume.folder}: step {progress['step']} of {total_steps}, epoch "
            f"{progress['epoch']}, batch {progress['batch']}")
    metrics_path = out / "metrics.jsonl" if world.main else None  # rank 0 alone logs
    logged = world.from_rank0(metrics_path and checkpoints.keep_metrics(metrics_path, resume and resume.step, say))
    # the evaluation of the checkpoint's step, when it was logged: a finished run is not evaluated twice
    metrics = next((r for r in logged if r["kind"] == "eval" and r["step"] == progress["step"] > 0), None)
    if resume is None and config.eval_base:  # a fresh adapter (B = 0) leaves the base model's outputs unchanged
        progress["base_metrics"] = evaluate_and_log(model, tokenizer, val_set, config, 0, None, metrics_path,
                                                    started, world)
    print(f"{len(train_set)} training examples, {config.micro_batch_size} x {accum} per step: "
          f"{steps_per_epoch} steps per epoch, {total_steps} in all; device {device}")

    # --- the loop
    stop.phase = "loop"  # from here a signal finishes the step, saves a checkpoint, and stops
    bar = tqdm(total=total_steps, initial=progress["step"], desc="train", unit="step", dynamic_ncols=True,
               disable=not world.main)
    model.train()
    try:
        for epoch, next_batch, micro_batches in optimizer_steps(train_set, config, pad_id,
                                                                progress["epoch"], progress["batch"], accum):
            if config.max_steps and progress["step"] >= config.max_steps:
                break
            start = time.perf_counter()
            lr = learning_rate(progress["step"], total_steps, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, target_tokens = accumulate(model, world.share(micro_batches), graphed, count_targets(micro_batches))
            loss = world.sum_step(params, loss)  # the adapter's gradients and the loss over the ranks: once a step
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
            last = step == total_steps or step == config.max_steps

            # log
            record = {"kind": "train", "step": step, "epoch": epoch, "loss": loss.item(), "lr": lr,
                      "grad_norm": grad_norm.item(), "target_tokens": target_tokens, "tokens": tokens,
                      "row_tokens": sum(ids.numel() for ids, *_ in micro_batches),  # padding included
                      "tokens_per_second": tokens / seconds, "skipped": not finite, "skipped_steps": progress["skipped_steps"]}
            postfix = {"loss": f"{record['loss']:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tokens / seconds:.0f}"}
            if device.type == "cuda":                                    # (peak: the whole run's so far)
                postfix["mem"] = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}G"
            if graphed is not None:
                postfix["graphs"] = graphed.captures
            bar.set_postfix(postfix)
            bar.update(1)
            if step % config.log_every == 0 or not finite:
                log(metrics_path, record, started)
            if not finite:
                say(f"step {step}: non-finite loss ({record['loss']}) or gradient norm ({record['grad_norm']}); "
                    f"step skipped ({progress['bad_in_a_row']} in a row)")
                if progress["bad_in_a_row"] >= config.max_bad_steps:
                    last_good = (checkpoints.list_checkpoints(out) or ["none (no checkpoint was saved)"])[-1]
                    say(f"error: {progress['bad_in_a_row']} steps in a row had a non-finite loss or gradient, "
                        "so the run stops. Lower --lr or --max-grad-norm, or check the data; the last good "
                        f"checkpoint is {last_good}", error=True)
                    return 1

            # evaluate (always at the last step), checkpoint, stop
            metrics, best = None, progress["best"]
            if last and graphed is not None:  # the graphs' memory back for the final evaluation
                graphed = None
                torch.cuda.empty_cache()
            if (config.eval_every and step % config.eval_every == 0) or last:
                metrics = evaluate_and_log(model, tokenizer, val_set, config, step, progress["base_metrics"],
                                           metrics_path, started, world)
                if config.eval_every and (best is None or metrics["f1"] > best["f1"]):
                    progress["best"] = {"step": step, "f1": metrics["f1"]}  # its checkpoint is kept
            # read once, and agreed by the ranks: what is saved and what is said agree, all stop at one step
            signum = world.max(stop.signum or 0)
            if (config.save_every and step % config.save_every == 0) or last or signum \
                    or progress["best"] is not best:
                path = checkpoints.checkpoint_path(out, step)
                if world.main:
                    path = checkpoints.save(out, model, optimizer, progress, saved, identity, adapter_base(config))
                    checkpoints.prune(out, config.keep_last, keep={progress["best"]["step"]} if progress["best"] else set())
                world.barrier()  # the other ranks wait while rank 0 writes
            if signum:
                bar.close()  # the bar's last line before the message, which is then the last word
                say(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved in {path}. "
                    "Continue with --resume auto", error=True)
                return 128 + signum
            if last:
                break
    finally:
        bar.close()

    # --- the end: the adapter, and what the run achieved
    step, best = progress["step"], progress["best"]
    if metrics is None:  # resumed at the end of a run whose last evaluation was not logged
        metrics = evaluate_and_log(model, tokenizer, val_set, config, step, progress["base_metrics"], metrics_path,
                                   started, world)
    stop.phase = "done"  # the run is finishing anyway: signals are ignored from here
    if world.main:
        checkpoints.save_final_adapter(model, out, adapter_base(config))
    say(f"done: {step} of {total_steps} steps ({progress['skipped_steps']} skipped), validation F1 "
        f"{metrics['f1']:.4f}; adapter in {out / 'adapter'}, checkpoint in {checkpoints.checkpoint_path(out, step)}")
    if best is not None:
        say(f"best validation F1 {best['f1']:.4f} at step {best['step']}: "
            f"{checkpoints.checkpoint_path(out, best['step'])}")
    if device.type == "cuda":
        say(f"GPU memory: peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated, "
            f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved")
    return 0


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


def accumulate(model, micro_batches, graphed: GraphedStep | None = None, step_tokens: int | None = None
               ) -> tuple[torch.Tensor, int]:
    """Forward and backward over one optimizer step's micro-batches; returns (mean loss, target tokens).

    Each micro-batch's summed loss is divided by the target-token count of the WHOLE step, so the
    gradient is that of the mean over all the step's answer tokens: micro-batch 1 x accumulation 4
    gives the same update as micro-batch 4 x accumulation 1, however many tokens each example has.
    With `graphed`, each micro-batch is a CUDA graph replay that adds the same gradient. A packed
    micro-batch (data.PackedRows) also carries its document ids and positions, passed on as they are.
    step_tokens: the whole step's target tokens, where micro_batches are one rank's share of the step.
    """
    step_tokens = count_targets(micro_batches) if step_tokens is None else step_tokens
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


def count_targets(micro_batches) -> int:
    """The answer tokens the micro-batches' loss is over (labels are not shifted: position i predicts
    labels[i + 1], so the targets are labels[:, 1:])."""
    return sum(int((labels[:, 1:] != IGNORE).sum()) for _, labels, *_ in micro_batches)


def optimizer_steps(train_set, config: TrainConfig, pad_id: int, epoch: int, batch: int, accum: int | None = None):
    """(epoch, index of the next micro-batch, micro-batches) of each optimizer step from (epoch, batch) on.

    An epoch's batches depend only on (seed, epoch), so a resumed run rebuilds them and skips those
    done. The last step of an epoch takes what is left (fewer micro-batches); steps never span epochs.
    With packing, a step takes the same examples, packed first-fit decreasing into rows of
    --max-seq-len (data.pack), one row a micro-batch; the packing is a pure function of those examples,
    so the data position (epoch, batch) still says all a resumed run needs, and --micro-batch-size
    counts examples, of which micro-batch-size x grad-accum make a step, as without packing.
    accum: micro-batches a step over all ranks (default --grad-accum: one rank); the batch index is global.
    """
    accum = accum or config.grad_accum
    for e in range(epoch, config.epochs):
        if not config.packing:
            batches = make_batches(train_set, config.micro_batch_size, config.seed, e, pad_id)
        else:
            batches = batch_order([len(ids) for ids, *_ in train_set], config.micro_batch_size, config.seed, e)
        for first in range(batch if e == epoch else 0, len(batches), accum):
            chunk = batches[first:first + accum]
            if config.packing:
                yield e, first + len(chunk), pack_rows([train_set[i] for group in chunk for i in group],
                                                       config.max_seq_len, pad_id)
            else:
                yield e, first + len(chunk), chunk


# ----------------------------------------------------------------------------- evaluation and logging
def evaluate_and_log(model, tokenizer, val_set, config: TrainConfig, step: int, base: dict | None,
                     metrics_path: Path, started: float, world: distributed.World) -> dict:
    """Score val.jsonl, print the table (beside the base model's column when there is one), log it."""
    # each rank scores its share of the split; rank 0 (metrics_path) shows and logs the gathered metrics
    metrics = evaluate(model, tokenizer, val_set, batch_size=1 if config.packing else config.eval_batch_size,
                       threshold=config.threshold, max_len=config.max_seq_len, progress=metrics_path is not None,
                       pack_len=config.max_seq_len if config.packing else None,
                       max_tokens=config.max_seq_len * config.micro_batch_size, world=world)  # sharded over ranks
    name = "base" if step == 0 and base is None else f"step {step}"
    columns = {name: metrics}
    if base is not None:
        columns = {"base": base, name: metrics, "change": change(base, metrics)}
    say(f"validation ({len(val_set)} examples) at step {step}:\n{format_table(columns)}")
    log(metrics_path, {"kind": "eval", "step": step, **metrics}, started)
    return metrics


# ----------------------------------------------------------------------------- data
@contextlib.contextmanager
def user_errors(what: str):
    """Errors about what the user pointed us at (files, hub ids, settings) become one clear UsageError."""
    try:
        yield
    except (CheckpointError, OSError, ValueError) as error:  # CheckpointError is a ValueError
        raise UsageError(f"{what}: {error}") from error


if __name__ == "__main__":
    for signum in (signal.SIGINT, signal.SIGTERM):  # what main() leaves behind: nothing can kill the ending
        signal.signal(signum, signal.SIG_IGN)
    sys.exit(main())
