"""Time the evaluation of a validation split packed against padded, as train.py runs it (issue 14).

Padded: `eval_batch_size` prompts a forward, right-padded to the longest, at most --row x 2 tokens a
forward (train.py's bound: --max-seq-len x --micro-batch-size). Packed: the prompts packed
first-fit decreasing into rows of `--row` tokens, `--rows` rows a forward (train.py takes one), the
answer read at each document's last position. The first `n` prompts of the split for each n; a
warm-up evaluation first, so compilation is not timed. Both must give the same scores (bf16: close,
not bit-equal, since the shapes differ); the largest difference is printed.

    QLORA_GPU_MEMORY_GIB=15.58 python bench/eval_timing.py --checkpoint $CKPT --data DIR/val.jsonl --n 80,2000
    QLORA_GPU_MEMORY_GIB=15.58 python bench/eval_timing.py --random gpt-oss-20b --checkpoint .gpu/tokenizer.json ...

--per-forward then times every forward of each layout on its own, by size (where the time goes).

--random builds the named model with random weights straight into NF4 on the GPU (bench/big_memory.py's
builder, a second or two) instead of loading --checkpoint, which then only gives the tokenizer.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import load_tokenizer, read_split, render_prompts  # noqa: E402
from eval.score import score_rendered  # noqa: E402
from memory_plan import cap_gpu_memory  # noqa: E402
from model import load_model  # noqa: E402
from model.fast import gate  # noqa: E402


def timed(model, tokenizer, encoded, **options):
    torch.cuda.synchronize()
    start = time.perf_counter()
    scores = score_rendered(model, tokenizer, encoded, **options)
    torch.cuda.synchronize()
    return time.perf_counter() - start, scores


def time_each_forward(model, forwards: list):
    """Wrap model.hidden_states so each forward is timed on its own (synchronised: slower in all), its
    (tokens, rows, seconds) appended to `forwards`; `del model.hidden_states` undoes it."""
    forward = model.hidden_states

    def timed_forward(input_ids, *rest):
        torch.cuda.synchronize()
        start = time.perf_counter()
        h = forward(input_ids, *rest)
        torch.cuda.synchronize()
        forwards.append((input_ids.numel(), input_ids.shape[0], time.perf_counter() - start))
        return h
    model.hidden_states = timed_forward


def forward_summary(forwards) -> dict:
    """Forwards by size: how many, their seconds, tokens/s; and the slowest five."""
    out = {}
    for low, high in ((0, 512), (512, 2048), (2048, 4096), (4096, 1 << 30)):
        f = [x for x in forwards if low <= x[0] < high]
        if f:
            out[f"{low}-{high} tokens"] = {"forwards": len(f), "s": round(sum(x[2] for x in f), 2),
                                           "tok_per_s": round(sum(x[0] for x in f) / sum(x[2] for x in f))}
    out["slowest"] = [(n, r, round(t * 1e3, 1)) for n, r, t in sorted(forwards, key=lambda x: -x[2])[:5]]
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="a val.jsonl of python -m data")
    p.add_argument("--n", default="80,2000", help="prompt counts to time")
    p.add_argument("--batch-size", type=int, default=8, help="padded: prompts a forward (train.py's default)")
    p.add_argument("--row", type=int, default=4096, help="packed: row length (train.py's --max-seq-len)")
    p.add_argument("--rows", default="1,4", help="packed: rows a forward, each timed")
    p.add_argument("--random", default=None, help="a preset (gpt-oss-20b) built with random weights on the GPU")
    p.add_argument("--per-forward", action="store_true", help="also time each forward, by size (a second "
                   "pass of each layout, synchronised per forward)")
    args = p.parse_args()
    device = torch.device("cuda", torch.cuda.current_device())
    cap = cap_gpu_memory(device)
    if args.random:
        from big_memory import random_nf4_model   # beside this script
        from model import GptOssConfig
        model = random_nf4_model(GptOssConfig.from_name(args.random), device, False, False)
    else:
        model = load_model(args.checkpoint, quantize="nf4", device="cuda", dtype=torch.bfloat16)
    model.fast_paths = gate.decide("cuda")
    model.eval()
    tokenizer = load_tokenizer(args.checkpoint)
    examples = read_split(args.data)
    encoded_all, _ = render_prompts(tokenizer, [e["prompt"] for e in examples], args.row)
    timed(model, tokenizer, encoded_all[:16], batch_size=args.batch_size, max_tokens=2 * args.row)   # warm-up
    for rows in map(int, args.rows.split(",")):
        timed(model, tokenizer, encoded_all[:64], batch_size=rows, pack_len=args.row)
    for n in map(int, args.n.split(",")):
        if n > len(encoded_all):
            raise SystemExit(f"--n {n}: the split has {len(encoded_all)} prompts")
        encoded = encoded_all[:n]
        tokens = sum(map(len, encoded))
        padded_s, padded = timed(model, tokenizer, encoded, batch_size=args.batch_size, max_tokens=2 * args.row)
        result = {"n": n, "prompt_tokens": tokens, "cap_gib": cap, "padded_s": round(padded_s, 2),
                  "padded_prompts_per_s": round(n / padded_s, 1)}
        for rows in map(int, args.rows.split(",")):
            packed_s, packed = timed(model, tokenizer, encoded, batch_size=rows, pack_len=args.row)
            result[f"packed_{rows}_s"] = round(packed_s, 2)
            result[f"packed_{rows}_prompts_per_s"] = round(n / packed_s, 1)
            result[f"packed_{rows}_speedup"] = round(padded_s / packed_s, 2)
            result[f"packed_{rows}_max_score_diff"] = float(max(abs(a - b) for a, b in zip(padded, packed)))
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        print(json.dumps(result), flush=True)
        if args.per_forward:
            for name, options in [("padded", {"batch_size": args.batch_size, "max_tokens": 2 * args.row}),
                                  *[(f"packed_{r}", {"batch_size": r, "pack_len": args.row})
                                    for r in map(int, args.rows.split(","))]]:
                forwards = []
                time_each_forward(model, forwards)
                timed(model, tokenizer, encoded, **options)
                del model.hidden_states   # the class's own again
                print(json.dumps({"n": n, "per_forward": name, **forward_summary(forwards)}), flush=True)


if __name__ == "__main__":
    main()
