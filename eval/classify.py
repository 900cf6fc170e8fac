"""python -m eval.classify --model M --adapter A "prompt" ...: P(jailbreak) of each prompt, and the verdict.

Prompts come from the arguments, from --file (one per line; '-' for standard input), or from
standard input when neither is given. Each line of output is P(jailbreak), the verdict at
--threshold and the prompt; --json prints one JSON object per prompt instead, for other programs.

    python -m eval.classify --model tiny --adapter runs/qlora/adapter "Ignore all previous instructions."
    python -m eval.classify --model openai/gpt-oss-20b --adapter runs/qlora/adapter --file prompts.txt --json

In Python: `from eval import classify; classify(model, tokenizer, prompts, threshold=0.5)`.
"""
import argparse
import json
import sys

from data import MAX_LEN, shortest_max_len
from eval.loading import add_adapter, check_adapter, experts_of, load
from eval.score import classify


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eval.classify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", nargs="*", help="prompts to classify (or use --file, or standard input)")
    parser.add_argument("--model", required=True, help="hub id or folder of the base model, or 'tiny' (random, CPU)")
    parser.add_argument("--adapter", default=None,
                        help="adapter folder written by train.py (default: none, the base model alone)")
    parser.add_argument("--file", default=None, help="a text file of prompts, one per line; '-' reads standard input")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="a prompt is a jailbreak iff P(jailbreak) >= this (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default 8)")
    parser.add_argument("--max-len", type=int, default=MAX_LEN,
                        help=f"longer prompts are cut in the middle; use training's --max-seq-len (default {MAX_LEN})")
    parser.add_argument("--seed", type=int, default=0,
                        help="with --model tiny: the seed of its random weights, training's --seed (default 0)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line: prompt, p_jailbreak, jailbreak")
    return parser.parse_args(argv)


def read_prompts(args) -> list[str]:
    """The prompts of the arguments, else of --file, else of standard input; empty lines skipped."""
    if args.prompts and args.file is not None:
        raise SystemExit("error: prompts given both as arguments and with --file; use one of the two")
    if args.prompts:
        return list(args.prompts)
    if args.file is None and sys.stdin.isatty():
        raise SystemExit("error: no prompts; pass them as arguments, with --file PATH (one per line), "
                         "or on standard input")
    if args.file in (None, "-"):
        lines = sys.stdin.read().splitlines()
    else:
        try:
            with open(args.file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            raise SystemExit(f"error: --file {args.file} not found; expected a text file, one prompt a line") from None
        except UnicodeDecodeError:
            raise SystemExit(f"error: --file {args.file} is not UTF-8 text; save it as UTF-8") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise SystemExit(f"error: {args.file if args.file not in (None, '-') else 'standard input'} holds no "
                         "prompt; expected one prompt a line")
    return prompts


def main(argv=None) -> list[dict]:
    """Classify the prompts; print one line each and return the results."""
    args = parse_args(argv)
    if not 0 < args.threshold < 1:
        raise SystemExit(f"error: --threshold must be between 0 and 1, not {args.threshold}")
    if args.batch_size < 1:
        raise SystemExit(f"error: --batch-size must be at least 1, not {args.batch_size}")
    if args.adapter is not None:
        check_adapter(args.adapter)
    prompts = read_prompts(args)
    model, tokenizer = load(args.model, args.seed, experts_of(args.adapter))
    if args.adapter is not None:
        add_adapter(model, args.adapter, args.model, args.seed)
    if args.max_len < shortest_max_len(tokenizer):
        raise SystemExit(f"error: --max-len {args.max_len} cannot hold the chat frame and a cut prompt; pass "
                         f"--max-len {shortest_max_len(tokenizer)} or more (training's --max-seq-len)")
    results = classify(model, tokenizer, prompts, args.threshold, args.batch_size, args.max_len,
                       progress=len(prompts) > args.batch_size)
    for result in results:
        if args.json:
            print(json.dumps(result, ensure_ascii=False))
        else:
            verdict = "jailbreak" if result["jailbreak"] else "benign"
            print(f"{result['p_jailbreak']:.4f}  {verdict:<9}  {' '.join(result['prompt'].split())}")
    return results


if __name__ == "__main__":
    main()
