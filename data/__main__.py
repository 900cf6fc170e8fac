"""python -m data --source walledai/JailbreakHub --out data_out: write train.jsonl and val.jsonl."""

import argparse

from data.batches import padding_share
from data.harmony import MAX_LEN, encode_split
from data.prepare import prepare, read_split
from data.tokenizer import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", default="walledai/JailbreakHub",
                        help="hub data set id, a folder laid out like one, or a json/jsonl/csv/parquet file")
    parser.add_argument("--out", required=True, help="folder for train.jsonl and val.jsonl")
    parser.add_argument("--n", type=int, default=400, help="examples to draw, half of each class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--prompt-column", default="prompt", help="column of the prompt text")
    parser.add_argument("--label-column", default="jailbreak",
                        help="column of the label: true/false, yes/no, 1/0 or jailbreak/benign (any case)")
    parser.add_argument("--split", default="train", help="split of a hub data set")
    parser.add_argument("--tokenizer", default=None,
                        help="optional: model folder, hub id or 'tiny', to report token lengths and cuts")
    parser.add_argument("--max-len", type=int, default=MAX_LEN,
                        help="with --tokenizer: the length to report cuts for, and train.py's packed row length")
    parser.add_argument("--micro-batch-size", type=int, default=2,
                        help="with --tokenizer: report the padding of train.py's micro-batches of this many examples")
    parser.add_argument("--grad-accum", type=int, default=4,
                        help="with --tokenizer: and of its packed rows, each step's micro-batch-size x grad-accum "
                             "examples packed")
    args = parser.parse_args()
    print(vars(args))
    try:
        prepare(args.source, args.out, n=args.n, seed=args.seed, val_fraction=args.val_fraction,
                prompt_column=args.prompt_column, label_column=args.label_column, split=args.split)
    except (FileNotFoundError, ValueError) as error:  # what the user pointed at: one line, no traceback
        raise SystemExit(f"error: {error}") from None
    if args.tokenizer is not None:
        tokenizer = load_tokenizer(args.tokenizer)
        for name in ("train", "val"):
            encoded, n_cut = encode_split(tokenizer, read_split(f"{args.out}/{name}.jsonl"), args.max_len)
            lengths = sorted(len(ids) for ids, _ in encoded)
            print(f"{name}: {len(encoded)} examples, tokens median {lengths[len(lengths) // 2]}, "
                  f"longest {lengths[-1]}; {n_cut} cut in the middle to max_len={args.max_len}")
            padded, packed = padding_share(lengths, args.micro_batch_size, args.grad_accum, args.max_len, args.seed)
            print(f"{name}: padding {padded:.1%} of the tokens in right-padded micro-batches of "
                  f"{args.micro_batch_size}, {packed:.1%} in packed rows of {args.max_len} (train.py --packing, "
                  f"{args.micro_batch_size} x {args.grad_accum} examples a step)")


if __name__ == "__main__":
    main()
