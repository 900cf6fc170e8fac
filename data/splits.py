"""A run's data: train.jsonl / val.jsonl found or prepared, encoded with loss masks, and fingerprinted."""

import hashlib
from pathlib import Path

from data.harmony import encode_split, shortest_max_len
from data.prepare import prepare, read_split
from data.synthetic import write_synthetic


def load_splits(source: str, work_dir: str, tokenizer, max_len: int, n: int, seed: int,
                prompt_column: str = "prompt", label_column: str = "jailbreak") -> tuple[list, list[dict], str]:
    """(encoded training examples, validation examples, sha256 of both files).

    `source` is used as is when it is a folder holding train.jsonl and val.jsonl; 'synthetic' is the
    built-in task; anything else is prepared (deterministically, with the seed) into <work_dir>/data.
    Nothing is written before the source has been read and checked (prepare writes last).
    """
    shortest = shortest_max_len(tokenizer)
    if max_len < shortest:
        raise ValueError(f"--max-seq-len {max_len} is too short: the system message, policy, answer and a cut "
                         f"prompt need at least {shortest} tokens of this model's tokenizer. Pass --max-seq-len "
                         f"{shortest} or more")
    folder = Path(source).expanduser()
    if source == "synthetic":
        folder = Path(work_dir) / "data"
        counts = write_synthetic(str(folder), seed=seed)
        print(f"built-in synthetic task: {counts['train']} train, {counts['val']} val -> {folder}")
    elif not (folder.is_dir() and (folder / "train.jsonl").is_file()):
        folder = Path(work_dir) / "data"
        prepare(source, str(folder), n=n, seed=seed, prompt_column=prompt_column, label_column=label_column)
    train_set, n_cut = encode_split(tokenizer, read_split(str(folder / "train.jsonl")), max_len)
    val_set = read_split(str(folder / "val.jsonl"))
    digest = hashlib.sha256()
    for name in ("train.jsonl", "val.jsonl"):
        digest.update((folder / name).read_bytes())
    lengths = sorted(len(ids) for ids, _ in train_set)
    print(f"data {folder}: {len(train_set)} train, {len(val_set)} val; train tokens per example: median "
          f"{lengths[len(lengths) // 2]}, longest {lengths[-1]}; {n_cut} prompts cut to --max-seq-len {max_len}")
    return train_set, val_set, digest.hexdigest()
