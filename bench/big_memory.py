"""Memory and speed of long sequences and of gpt-oss-120b, on a random model built straight into NF4 on the GPU.

No checkpoint file: each tensor of the model is drawn at random on the GPU, in bf16, and put in place
through the loader's own path (model/weights/loading.py: NF4 for attention and experts, the
embedding on the CPU or not, an NF4 lm_head or not), one at a time; speed and memory depend on the
shapes only. Then LoRA r16 on q/k/v/o, gradient checkpointing, fused AdamW, and per sequence length
--steps training steps (forward, backward, optimizer step) on one packed row of random tokens, every
token a target (the loss's worst case), through the model code and fast paths train.py uses
(eager: no CUDA graphs). The GPU is capped as train.py caps it (QLORA_GPU_MEMORY_GIB). Before
loading it prints memory_plan.py's estimate per length (and its choices: embedding, NF4 head,
offloaded checkpoints); after each length one JSON line: the estimate beside the measured peaks and
tokens/s after the first step. With three lengths or more (on both sides of the experts' tile) a
last line fits memory_plan.py's activation constants to the measured peaks.

    python bench/big_memory.py --model gpt-oss-20b --sweep 2048,8192,32768,131072 --steps 2
    python bench/big_memory.py --model gpt-oss-20b --seq-len 131072 --cap-gib 23.5 --steps 2 --offload on
    python bench/big_memory.py --model gpt-oss-120b --seq-len 2048 --cap-gib 79 --steps 3
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")   # as train.py

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import memory_plan  # noqa: E402
from lora import inject, lora_parameters  # noqa: E402
from lora.inject import count_trainable  # noqa: E402
from model import GptOssConfig  # noqa: E402
from model.fast import gate  # noqa: E402
from model.fast.tiled_moe import TILE_TOKENS  # noqa: E402
from model.gpt_oss import hub_shapes  # noqa: E402
from model.weights.loading import _place, _skeleton  # noqa: E402  (the loader's own placing, without a file)

GIB = 2 ** 30
SWITCH = {"auto": None, "on": True, "off": False}


def random_nf4_model(config, device, embedding_on_cpu: bool, lm_head_nf4: bool, seed: int = 0):
    """A GptOss with random weights, built as load_model builds one (NF4 on `device`), a tensor at a time."""
    torch.manual_seed(seed)
    model = _skeleton(config, "nf4", "nf4", lm_head_nf4, "auto", None)
    for name, shape in hub_shapes(config).items():
        embedding = name == "model.embed_tokens.weight"
        if name.endswith("norm.weight"):
            t = torch.ones(shape, device=device, dtype=torch.bfloat16)
        elif name.endswith("bias"):
            t = torch.zeros(shape, device=device, dtype=torch.bfloat16)
        else:   # (the router's 0.02 spreads the tokens about evenly over the experts)
            t = torch.randn(shape, device=device, dtype=torch.bfloat16) * 0.02
        _place(model, name, t.cpu() if embedding and embedding_on_cpu else t, torch.bfloat16)
        del t
    return model


def settle(config, trainable, lengths, usable, args):
    """The placement for the whole sweep (from the longest length's plan), then each length's plan."""
    longest = memory_plan.plan(config, trainable, max(lengths), False, usable, SWITCH[args.embedding_on_cpu],
                               "adamw", None, SWITCH[args.offload], SWITCH[args.lm_head_nf4])
    plans = {}
    for t in lengths:
        p = memory_plan.plan(config, trainable, t, False, usable, longest.embedding_on_cpu, "adamw", None,
                             SWITCH[args.offload], longest.lm_head_nf4)
        n = memory_plan.need(config, trainable, "adamw", t, False, None, p.offload, p.lm_head_nf4, tile=args.tile)
        plans[t] = (p, n)
    return longest.embedding_on_cpu, longest.lm_head_nf4, plans


def step(model, optimizer, seq):
    """One training step on one packed row of `seq` random tokens (a single document), as train.py's."""
    ids = torch.randint(0, model.config.vocab_size, (1, seq))
    doc_ids, positions = torch.zeros(1, seq, dtype=torch.long), torch.arange(seq)[None]
    total, count = model.loss(ids, ids, "sum", doc_ids, positions)
    (total / count.to(total.device)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return (total / count.to(total.device)).item()


def fit_constants(rows, config):
    """Least squares of memory_plan's three activation constants on the measured peaks."""
    h, i, k = config.hidden_size, config.intermediate_size, config.num_experts_per_tok
    a, b = [], []
    for r in rows:
        t = r["seq_len"]
        resident = (min(config.num_hidden_layers, memory_plan.OFFLOAD_RESIDENT_BLOCKS) if r["offload"]
                    else config.num_hidden_layers) * t * h * 2
        a.append([h * t, i * k * min(t, r["tile"] or t), 1.0])
        b.append(r["measured_activations_gib"] * GIB - resident)
    x = torch.linalg.lstsq(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)[:, None]).solution
    return {"fit": "memory_plan constants from these peaks", "BLOCK_BYTES_PER_TOKEN_HIDDEN": round(float(x[0]), 2),
            "EXPERT_BYTES_PER_ROW_INTER": round(float(x[1]), 2), "FIXED_ACTIVATION_BYTES_GIB": round(float(x[2]) / GIB, 3)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt-oss-20b", choices=["gpt-oss-20b", "gpt-oss-120b"])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--sweep", default="", help="comma-separated lengths in one process (overrides --seq-len)")
    p.add_argument("--cap-gib", type=float, default=None, help="cap the GPU as QLORA_GPU_MEMORY_GIB does")
    p.add_argument("--steps", type=int, default=2, help="steps per length; tokens/s from those after the first")
    p.add_argument("--offload", default="auto", choices=list(SWITCH), help="offloaded checkpoints (auto: the plan)")
    p.add_argument("--embedding-on-cpu", default="auto", choices=list(SWITCH))
    p.add_argument("--lm-head-nf4", default="auto", choices=list(SWITCH))
    p.add_argument("--tile", type=int, default=TILE_TOKENS, help="the experts' tile of tokens (model/fast/tiled_moe.py)")
    args = p.parse_args()
    lengths = [int(s) for s in args.sweep.split(",")] if args.sweep else [args.seq_len]

    device = torch.device("cuda", torch.cuda.current_device())
    if args.cap_gib is not None:
        os.environ[memory_plan.CAP_VARIABLE] = str(args.cap_gib)
    cap = memory_plan.cap_gpu_memory(device)
    usable = memory_plan.usable_gib(device)
    config = GptOssConfig.from_name(args.model)
    trainable = count_trainable(config, rank=16)
    try:
        on_cpu, head_nf4, plans = settle(config, trainable, lengths, usable, args)
    except ValueError as error:   # measured anyway, with every saving: what the plan's stop would prevent
        print(json.dumps({"plan": "does not fit", "error": str(error)}), flush=True)
        args.offload = "on" if args.offload == "auto" else args.offload
        args.embedding_on_cpu = "on" if args.embedding_on_cpu == "auto" else args.embedding_on_cpu
        args.lm_head_nf4 = "on" if args.lm_head_nf4 == "auto" else args.lm_head_nf4
        on_cpu, head_nf4, plans = settle(config, trainable, lengths, 1e6, args)
    print(json.dumps({"plan": args.model, "usable_gib": round(usable, 2), "embedding_on_cpu": on_cpu,
                      "lm_head_nf4": head_nf4, "estimate_gib": {t: round(n.total(not on_cpu) / GIB, 2)
                                                                for t, (_, n) in plans.items()},
                      "offload": {t: pl.offload for t, (pl, _) in plans.items()},
                      "model_estimate_gib": round(plans[lengths[0]][1].model / GIB, 2)}), flush=True)

    start = time.perf_counter()
    model = random_nf4_model(config, device, on_cpu, head_nf4)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - start
    inject(model, rank=16, alpha=16, dropout=0.0, verbose=False)
    model.gradient_checkpointing = True
    for block in model.model.layers:
        block.mlp.tile = args.tile
    model.fast_paths = gate.decide(device)
    model.train()
    params = [q for _, q in lora_parameters(model)]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    torch.cuda.empty_cache()
    loaded = torch.cuda.memory_allocated()
    print(json.dumps({"built": args.model, "build_s": round(build_s, 1), "loaded_gib": round(loaded / GIB, 2),
                      "build_peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2)}), flush=True)

    rows = []
    for seq in lengths:
        plan, n = plans[seq]
        model.offload_activations = plan.offload
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        row = {"model": args.model, "seq_len": seq, "cap_gib": cap, "estimate_gib": round(n.total(not on_cpu) / GIB, 2),
               "offload": plan.offload, "tile": args.tile if seq > args.tile else None,
               "embedding_on_cpu": on_cpu, "lm_head_nf4": head_nf4}
        try:
            times = []
            for _ in range(args.steps):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                loss = step(model, optimizer, seq)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            later = times[1:] or times
            peak = torch.cuda.max_memory_allocated()
            row.update(peak_allocated_gib=round(peak / GIB, 2),
                       peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 2),
                       tokens_per_s=round(seq * len(later) / sum(later), 1), first_step_s=round(times[0], 2),
                       loss=round(loss, 3),
                       # above what was loaded: activations, plus the adapter's gradient and AdamW's moments
                       measured_activations_gib=round((peak - loaded - trainable * 12) / GIB, 3),
                       estimate_activations_gib=round(n.activations / GIB, 3))
            row["estimate_error"] = round(row["estimate_gib"] / row["peak_allocated_gib"] - 1, 3)
            rows.append(row)
        except torch.OutOfMemoryError as error:
            row.update(oom=True, error=str(error).split(". ")[0])
            optimizer.zero_grad(set_to_none=True)
        print(json.dumps(row), flush=True)
    if len(rows) >= 3 and any(r["tile"] for r in rows) and not all(r["tile"] for r in rows):   # both sides of the tile
        print(json.dumps(fit_constants(rows, config)), flush=True)


if __name__ == "__main__":
    main()
