"""Time the evaluation of a validation split packed against padded, as train.py runs it (issue 14).

Padded: `eval_batch_size` prompts a forward, right-padded to the longest, at most --row x 2 tokens a
forward (train.py's bound: --max-seq-len x --micro-batch-size). Packed: the prompts packed
first-fit decreasing into rows of `--row` tokens, `--rows` rows a forward (train.py takes one), the
answer read at each document's last position. The first `n` prompts of the split for each n; a
warm-up evaluation first, so compilation is not timed. Both must give the same scores (bf16: close,
not bit-equal, since the shapes differ); the largest difference is printed.

    QLORA_GPU_MEMORY_GIB=15.58 python bench/eval_timing.py --checkpoint $CKPT --data DIR/val.jsonl --n 80,2000
    QLORA_GPU_MEMORY_GIB=15.58 python bench/eval_timing.py --random gpt-oss-20b --checkpoint .gpu/tokenizer.json ...

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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="a val.jsonl of python -m data")
    p.add_argument("--n", default="80,2000", help="prompt counts to time")
    p.add_argument("--batch-size", type=int, default=8, help="padded: prompts a forward (train.py's default)")
    p.add_argument("--row", type=int, default=4096, help="packed: row length (train.py's --max-seq-len)")
    p.add_argument("--rows", default="1,4", help="packed: rows a forward, each timed")
    p.add_argument("--random", default=None, help="a preset (gpt-oss-20b) built with random weights on the GPU")
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


if __name__ == "__main__":
    main()
