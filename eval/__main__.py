"""python -m eval --model openai/gpt-oss-20b [--adapter runs/x/adapter] --data data_out/val.jsonl

Scores a split with the base model and, given --adapter, with base + adapter; prints the metrics
side by side (base | adapter | change) and writes them as JSON.
"""

import argparse
import json
from pathlib import Path

import torch

from data import MAX_LEN, load_tokenizer, read_split, tiny_tokenizer
from eval.report import change, evaluate, format_table
from model import GptOss, GptOssConfig, load_model


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


def load(name: str, seed: int):
    """(model, tokenizer): the tiny random model on the CPU, or a checkpoint in NF4 on the GPU."""
    if name == "tiny":
        torch.manual_seed(seed)
        return GptOss(GptOssConfig.from_name("tiny")).eval(), tiny_tokenizer()
    if not torch.cuda.is_available():
        raise SystemExit(f"error: --model {name} needs a CUDA GPU (NF4 weights, bf16 compute) and none "
                         "was found; run on a GPU machine, or pass --model tiny to check the pipeline")
    try:
        model = load_model(name, quantize="nf4")
        tokenizer = load_tokenizer(name)
    except (OSError, ValueError) as error:  # CheckpointError is a ValueError
        raise SystemExit(f"error: could not load --model {name}: {error}") from None
    return model.eval(), tokenizer


def main(argv=None) -> dict:
    """Run the evaluation; returns the report that it also prints and writes."""
    args = parse_args(argv)
    print(vars(args))
    data_path = Path(args.data)
    if not data_path.is_file():
        raise SystemExit(f"error: --data {args.data} not found; expected a val.jsonl written by "
                         "python -m data --out DIR")
    if args.adapter is not None and not Path(args.adapter).is_dir():
        raise SystemExit(f"error: --adapter {args.adapter} is not a folder; expected one saved by training")
    try:
        examples = read_split(str(data_path))
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    out = Path(args.out) if args.out else data_path.parent / "eval_report.json"

    model, tokenizer = load(args.model, args.seed)
    options = dict(batch_size=args.batch_size, threshold=args.threshold, generate=args.generate,
                   max_len=args.max_len, max_new_tokens=args.max_new_tokens, progress=True)
    results = {"base": evaluate(model, tokenizer, examples, **options)}
    if args.adapter is not None:
        from lora import load_adapter  # only this path needs lora/

        try:
            load_adapter(model, args.adapter)  # injects LoRA into the model, in place
        except (OSError, ValueError) as error:
            raise SystemExit(f"error: could not load --adapter {args.adapter}: {error}") from None
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
