"""python -m eval --model openai/gpt-oss-20b [--adapter runs/x/adapter] --data data_out/val.jsonl

Scores a split with the base model and, given --adapter, with base + adapter; prints the metrics
side by side (base | adapter | change) and writes them as JSON.
"""

import argparse
import json
from pathlib import Path

from data import MAX_LEN, read_split
from eval.loading import add_adapter, check_adapter, experts_of, load
from eval.report import change, evaluate, format_table


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="hub id, checkpoint folder, or 'tiny' (random, CPU)")
    parser.add_argument("--adapter", default=None, help="adapter folder: evaluate base and base + adapter")
    parser.add_argument("--data", required=True, help="a val.jsonl written by python -m data")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=0.5, help="predict jailbreak iff P(jailbreak) >= this")
    parser.add_argument("--max-len", type=int, default=MAX_LEN,
                        help="longer prompts are cut in the middle, as in training; use training's value")
    parser.add_argument("--generate", action="store_true",
                        help="also answer greedily and report the share of answers not in format")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="with --generate: answer length limit")
    parser.add_argument("--out", default=None, help="JSON report path (default: eval_report.json beside --data)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny model's random weights")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    """Run the evaluation; returns the report that it also prints and writes."""
    args = parse_args(argv)
    print(vars(args))
    data_path = Path(args.data)
    if not data_path.is_file():
        raise SystemExit(f"error: --data {args.data} not found; expected a val.jsonl written by "
                         "python -m data --out DIR")
    if args.adapter is not None:
        check_adapter(args.adapter)
    try:
        examples = read_split(str(data_path))
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    out = Path(args.out) if args.out else data_path.parent / "eval_report.json"

    model, tokenizer = load(args.model, args.seed, experts_of(args.adapter))
    options = dict(batch_size=args.batch_size, threshold=args.threshold, generate=args.generate,
                   max_len=args.max_len, max_new_tokens=args.max_new_tokens, progress=True)
    results = {"base": evaluate(model, tokenizer, examples, **options)}
    if args.adapter is not None:
        add_adapter(model, args.adapter, args.model, args.seed)  # injects LoRA into the model, in place
        results["adapter"] = evaluate(model, tokenizer, examples, **options)
        results["change"] = change(results["base"], results["adapter"])

    print(format_table(results))
    report = {"config": vars(args), "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
