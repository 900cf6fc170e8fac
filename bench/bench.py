"""Load gpt-oss-20b (random weights, MXFP4 checkpoint) into NF4 and time our LoRA training step.

Reports load time and memory, then per sequence length (micro-batch 1, LoRA rank 16 on q/k/v/o,
gradient checkpointing): tokens/s (median step after warm-up) and peak allocated/reserved GPU memory,
going up the lengths until one no longer fits (above 16,384 tokens, the median of two timed steps
after the warm-up, not --steps). Writes JSON to --out. --graphs replays each step's forward and
backward as a CUDA graph (model/fast/cuda_graph.py); the first step of a length captures it.
    python bench/make_checkpoint.py /tmp/ck
    python bench/bench.py --checkpoint /tmp/ck --seqs 1024,2048,4096 --out $OUT/ours.json
    python bench/bench.py --checkpoint /tmp/ck --seqs 1024,2048,4096 --quick --graphs --out $OUT/graphs.json
    python bench/bench.py --checkpoint /tmp/ck --seqs 2048,4096 --graphs --config "embedding on cpu" --dense-experts 1
    python bench/bench.py --compare $OUT/ours.json $OUT/hf_peft_baseline.json
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lora import inject, lora_parameters  # noqa: E402
from lora.inject import DEFAULT_TARGETS  # noqa: E402
from model import load_model  # noqa: E402
from model.fast import gate  # noqa: E402
from model.fast.cuda_graph import GraphedStep, graph_problem  # noqa: E402
from model.weights.nf4 import nf4_bytes  # noqa: E402

GiB = 2 ** 30


CONFIGS = {  # name -> load_model options
    "default": {},
    "embedding on cpu": {"embedding_device": "cpu"},
    "emb cpu, nf4 lm_head": {"embedding_device": "cpu", "lm_head_nf4": True},
    "emb cpu, nf4 head, experts by 8": {"embedding_device": "cpu", "lm_head_nf4": True, "experts_per_group": 8},
}
FAST = {  # --quick: the default and the 16 GB card's configuration
    "default": {},
    "embedding on cpu": {"embedding_device": "cpu"},
}


def load(checkpoint, options):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    model = load_model(checkpoint, quantize="nf4", device="cuda", dtype=torch.bfloat16, **options)
    torch.cuda.synchronize()
    r = {"options": options, "load_s": round(time.perf_counter() - t, 1),
         "loaded_GiB": round(torch.cuda.memory_allocated() / GiB, 2),
         "load_peak_GiB": round(torch.cuda.max_memory_allocated() / GiB, 2),
         "host_peak_rss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
         "nf4_GiB": round(nf4_bytes(model) / GiB, 2)}
    print(json.dumps(r), flush=True)
    return model, r


def train_lora(model, targets=DEFAULT_TARGETS):
    """The benchmarked adapter on `model`: LoRA r=16 on `targets` (q/k/v/o), no dropout, gradient
    checkpointing, training mode; returns its parameters and their fused AdamW."""
    inject(model, targets=targets, rank=16, alpha=16, dropout=0.0)
    model.gradient_checkpointing = True
    model.train()
    params = [p for _, p in lora_parameters(model)]
    return params, torch.optim.AdamW(params, lr=1e-4, fused=True)


def train_step(model, opt, ids, labels, graphed=None):
    """One optimizer step on ids (1, seq), every next token a target: eager, or replayed as a CUDA graph
    (`graphed`; labels on the host, as train.py's batches have them). Returns the summed loss (on the GPU)
    and the number of targets."""
    if graphed is None:
        total, count = model.loss(ids, ids, reduction="sum")
        (total / count).backward()
    else:
        count = ids.shape[1] - 1
        total = graphed.step(ids, labels, 1.0 / count)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total, count


def step_time(model, opt, seq, steps, graphed=None, fresh_ids=False):
    """Median seconds of a training step at `seq` tokens after one warm-up step, the last loss, and
    each timed step's seconds. The same random tokens every step, or with fresh_ids new ones each step
    (drawn before the step's clock starts)."""
    ids = torch.randint(0, model.config.vocab_size, (1, seq), device="cuda")
    labels = ids.cpu()  # as train.py's batches: the target rows are found on the host
    times = []
    for _ in range(steps + 1):
        if fresh_ids:
            ids = torch.randint(0, model.config.vocab_size, (1, seq), device="cuda")
            labels = ids.cpu()
        torch.cuda.synchronize()
        t = time.perf_counter()
        total, count = train_step(model, opt, ids, labels, graphed)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:]), (total / count).item(), times[1:]


def sweep(model, opt, seqs, steps, label, graphed=None, fresh_ids=False):
    out = []
    for seq in seqs:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            dt, loss, times = step_time(model, opt, seq, steps if seq <= 16384 else 2, graphed, fresh_ids)
            r = {"config": label, "seq": seq, "step_s": round(dt, 3), "tok_s": round(seq / dt, 1),
                 "peak_GiB": round(torch.cuda.max_memory_allocated() / GiB, 2),
                 "reserved_GiB": round(torch.cuda.max_memory_reserved() / GiB, 2), "loss": round(loss, 3),
                 "graphs": graphed is not None, "captures": graphed.captures if graphed else 0,
                 "step_ms": [round(t * 1e3, 1) for t in times]}
        except torch.OutOfMemoryError as e:
            r = {"config": label, "seq": seq, "oom": True, "error": str(e).split(". ")[0]}
        print(json.dumps(r), flush=True)
        out.append(r)
        if r.get("oom"):
            break
    return out


def compare(ours_path, ref_path):
    ours = json.load(open(ours_path))
    ref = {r["seq"]: r for r in json.load(open(ref_path))["results"]}
    print(f"{'config':<28}{'seq':>7}{'ours tok/s':>12}{'ref tok/s':>11}{'speed x':>9}"
          f"{'ours GiB':>10}{'ref GiB':>9}")
    for r in ours["runs"]:
        b = ref.get(r["seq"], {})
        config = r["config"] + (", graphs" if r.get("graphs") else "")
        if r.get("oom"):
            print(f"{config:<28}{r['seq']:>7}{'OOM':>12}")
            continue
        sp = f"{r['tok_s'] / b['tok_s']:.2f}" if "tok_s" in b else ("ref OOM" if b.get("oom") else "-")
        print(f"{config:<28}{r['seq']:>7}{r['tok_s']:>12.0f}{b.get('tok_s', float('nan')):>11.0f}{sp:>9}"
              f"{r['peak_GiB']:>10.2f}{b.get('peak_GiB', float('nan')):>9.2f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint")
    p.add_argument("--seqs", default="1024,2048,4096,8192")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--variants", default="", help="seqs to rerun under each non-default config")
    p.add_argument("--quick", action="store_true", help="only the default and embedding-on-cpu configs")
    p.add_argument("--graphs", action="store_true", help="the step as CUDA graphs (configs that rule them "
                   "out, such as experts in groups, are skipped with the reason)")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="LoRA targets, as train.py's")
    p.add_argument("--base", choices=("nf4", "mxfp4"), default="nf4", help="the experts' storage, as train.py's")
    p.add_argument("--kept-blocks", default="0", help="comma-separated: blocks not checkpointed (as train.py's "
                   "--kept-blocks), each swept on the same loaded model")
    p.add_argument("--dense-experts", default="0", help="comma-separated 0/1: the experts dequantised a layer "
                   "at a time for torch._grouped_mm (GptOss.dense_experts), each swept on the same loaded model")
    p.add_argument("--config", action="append", default=[], help="only this config (a name in CONFIGS; repeatable), "
                   "over --seqs: e.g. 'embedding on cpu' alone, for its own peak in a fresh process")
    p.add_argument("--fresh-ids", action="store_true", help="new random tokens each step (default: the same ones "
                   "every step, as every figure in docs/BENCHMARKS.md before round 2's tenth session)")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--compare", nargs=2, metavar=("OURS", "REF"))
    args = p.parse_args()
    if args.compare:
        return compare(*args.compare)
    chosen = args.config
    unknown = [c for c in chosen if c not in CONFIGS]
    if unknown:
        p.error(f"--config: unknown {unknown}; known: {list(CONFIGS)}")
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "loads": [], "runs": []}
    for name, options in ({c: CONFIGS[c] for c in chosen} if chosen else FAST if args.quick else CONFIGS).items():
        seqs = args.seqs if name == "default" or chosen else args.variants
        if not seqs:
            continue
        model, r = load(args.checkpoint, {**options, "experts": args.base})
        result["loads"].append(r)
        params, opt = train_lora(model, args.targets)
        problem = graph_problem(model, gate.decide("cuda")) if args.graphs else None
        if problem is not None:
            print(json.dumps({"config": name, "graphs_skipped": problem}), flush=True)
            del model, opt
            continue
        kept = [int(k) for k in args.kept_blocks.split(",")]
        denses = [bool(int(d)) for d in args.dense_experts.split(",")]
        for k in kept:
            for dense in denses:
                model.kept_blocks, model.dense_experts = k, dense
                # a graph per setting: one captured with other blocks checkpointed would replay them so
                graphed = GraphedStep(model, params, gate.decide("cuda")) if args.graphs else None
                label = name + (f", kept {k}" if kept != [0] else "") + (", dense experts" if dense else "")
                result["runs"] += sweep(model, opt, [int(s) for s in seqs.split(",")], args.steps, label, graphed,
                                        args.fresh_ids)
                del graphed
        del model, opt
        with open(args.out, "w") as f:  # after each config, so a cut-short run keeps what it measured
            json.dump(result, f, indent=1)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
