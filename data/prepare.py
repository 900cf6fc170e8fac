"""Preparing the data set: read, clean, balance, split, write train.jsonl / val.jsonl; and reading them back.

The files hold only the user's prompt and the answer word, as chat messages:
    {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "yes"}], "label": true}
The system and developer (policy) messages are added when encoding, so a changed policy needs no
new preparation.
"""

import codecs
import json
import random
import tempfile
from pathlib import Path

from data.harmony import LABELS

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _read_columns(source: str, split: str, wanted: list[str]) -> tuple[list[str], dict[str, list]]:
    """(all column names, {name: values} for the wanted ones present) of a local file, a local
    folder laid out like a hub repo, or a hub id, read through datasets."""
    import datasets  # slow to import; only preparation needs it

    path = Path(source).expanduser()
    if path.is_file():
        builder = LOCAL_FORMATS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"{source}: unknown file type {path.suffix!r}; expected one of "
                             f"{sorted(LOCAL_FORMATS)}")
        if path.stat().st_size == 0:
            raise ValueError(f"{source}: the file is empty; expected rows with a prompt and a label")
        if builder in ("json", "csv"):
            _check_utf8(path)
        name, options = builder, {"data_files": str(path), "split": "train"}
    elif not path.exists() and _looks_like_a_path(source):
        raise FileNotFoundError(f"{source} not found: there is no such file or folder. Expected a "
                                f"{'/'.join(f[1:] for f in LOCAL_FORMATS)} file, a folder, or a hub id such "
                                "as walledai/JailbreakHub")
    else:  # a folder laid out like a hub repo (data/train-*.parquet ...) or a hub id
        name, options = (str(path) if path.is_dir() else source), {"split": split}
    # A local source is read into a throwaway cache: its Arrow copy is not worth keeping, and
    # tests would otherwise fill ~/.cache. Hub data sets use the usual cache, so they download once.
    bars = datasets.is_progress_bar_enabled()
    with tempfile.TemporaryDirectory() as scratch:
        if path.exists():
            options["cache_dir"] = scratch
            datasets.disable_progress_bars()  # "Generating train split" of a local file says nothing
        try:
            table = datasets.load_dataset(name, **options)
        except Exception as error:  # datasets raises many kinds: offline, unknown repo, bad file
            if path.exists():
                advice = "is it a well-formed file (or folder of files) with a header and at least one row?"
            else:
                advice = ("is the hub id right, and are we online? A local json/jsonl/csv/parquet "
                          "file works offline")
            raise ValueError(f"{source}: could not read it ({type(error).__name__}: {error}); {advice}") from error
        finally:
            if bars:
                datasets.enable_progress_bars()
        names = list(table.column_names)
        # Plain lists, read before the scratch cache that backs the table is deleted.
        return names, table.select_columns([c for c in wanted if c in names]).to_dict()


# Label forms a data file may use, case-insensitive; a CSV reader may hand any of them over as text.
LABEL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False,
               "jailbreak": True, "benign": False}


def _looks_like_a_path(source: str) -> bool:
    # A hub data set id is "name" or "owner/name"; a file suffix, a leading "." "/" "~" or a deeper
    # path can only be meant as a local file, so its absence is no question of being online.
    return (source.startswith((".", "/", "~")) or source.count("/") > 1
            or Path(source).suffix.lower() in LOCAL_FORMATS)


def _check_utf8(path: Path):
    """A text file that is not UTF-8 fails here, saying where, rather than deep inside the reader."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            pending = decoder.getstate()[0]  # the start of a character that the last chunk cut
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                at = offset - len(pending) + error.start
                raise ValueError(f"{path}: not UTF-8 text (byte {at} is 0x{error.object[error.start]:02x}); "
                                 "save the file as UTF-8 and try again") from None
            if not chunk:
                return
            offset += len(chunk)


def _as_label(value, source: str, row: int, column: str) -> bool:
    """True (jailbreak) or False (benign) from a boolean, 0/1, or one of LABEL_WORDS."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):  # 1.0 too: a CSV column with a gap reads as float
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in LABEL_WORDS:
        return LABEL_WORDS[value.strip().lower()]
    raise ValueError(f"{source}, row {row}, column {column!r}: expected a label (true/false, yes/no, 1/0 or "
                     f"jailbreak/benign), found {value!r}; fix that row, or name the label column with "
                     "--label-column")


def read_source(source: str, prompt_column: str = "prompt", label_column: str = "jailbreak",
                split: str = "train") -> tuple[list[tuple[str, bool]], dict]:
    """Unique (prompt, label) pairs in source order, and counts of what was dropped.

    Rows are numbered from 1 (the first data row, not counting a CSV header) in errors.
    Empty prompts are dropped; of repeated prompts the first is kept; a prompt whose copies disagree
    on the label is dropped altogether (ambiguous, and it would leak across the split).
    """
    names, columns = _read_columns(source, split, [prompt_column, label_column])
    missing = [c for c in (prompt_column, label_column) if c not in names]
    if missing:
        raise ValueError(f"{source}: column(s) {missing} not found; the columns are {names}. "
                         "Name the right ones with --prompt-column / --label-column")
    n_rows = len(columns[prompt_column])
    if n_rows == 0:
        raise ValueError(f"{source}: no rows; expected rows with a prompt and a label")

    label_of: dict[str, bool] = {}  # first label seen for each prompt; dicts keep source order
    conflicting: set[str] = set()
    empty = duplicates = 0
    for i, (prompt, value) in enumerate(zip(columns[prompt_column], columns[label_column]), start=1):
        label = _as_label(value, source, i, label_column)
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
            empty += 1
            continue
        if not isinstance(prompt, str):
            raise ValueError(f"{source}, row {i}, column {prompt_column!r}: expected text, found "
                             f"{type(prompt).__name__} {prompt!r}")
        prompt = prompt.strip()  # surrounding whitespace carries no meaning, and hides duplicates
        if prompt in label_of:
            duplicates += 1
            if label_of[prompt] != label:
                conflicting.add(prompt)
            continue
        label_of[prompt] = label
    pairs = [(p, l) for p, l in label_of.items() if p not in conflicting]
    counts = {"rows": n_rows, "empty": empty, "duplicates": duplicates,
              "conflicting": len(conflicting), "unique": len(pairs)}
    return pairs, counts


def write_splits(out_dir, train: list[tuple[str, bool]], val: list[tuple[str, bool]]) -> Path:
    """train.jsonl and val.jsonl in out_dir: one chat (user prompt, assistant label word) per line."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for file_name, rows in (("train.jsonl", train), ("val.jsonl", val)):
        with open(out / file_name, "w", encoding="utf-8") as f:
            for prompt, label in rows:
                messages = [{"role": "user", "content": prompt},
                            {"role": "assistant", "content": LABELS[label]}]
                f.write(json.dumps({"messages": messages, "label": label}, ensure_ascii=False) + "\n")
    return out


def prepare(source: str, out_dir: str, n: int = 400, seed: int = 0, val_fraction: float = 0.2,
            prompt_column: str = "prompt", label_column: str = "jailbreak",
            split: str = "train") -> dict:
    """Write a balanced, stratified train/val split of source to out_dir; print and return the counts.

    n/2 jailbreaks and n/2 benign prompts are drawn with the seed (all of a class if it has fewer),
    then each class is split val_fraction / rest. Same source and seed, same files.
    """
    if n < 4:
        raise ValueError(f"n={n}: need at least 4 examples (one of each class in train and val)")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction}: expected a fraction between 0 and 1")
    pairs, counts = read_source(source, prompt_column, label_column, split)

    rng = random.Random(seed)
    wanted = {True: n // 2, False: n - n // 2}
    train, val = [], []
    for label in (True, False):
        name = "jailbreak" if label else "benign"
        prompts = [p for p, l in pairs if l == label]
        counts[f"unique_{name}"] = len(prompts)
        if not prompts:
            raise ValueError(f"{source}: no row has {label_column!r} = {label}, so there is nothing to "
                             "balance against; both classes are needed")
        if len(prompts) < wanted[label]:
            print(f"note: only {len(prompts)} {name} prompts, fewer than the {wanted[label]} wanted; "
                  "taking all of them")
        sample = rng.sample(prompts, min(wanted[label], len(prompts)))  # in random order
        n_val = round(len(sample) * val_fraction)
        if n_val == 0 or n_val == len(sample):
            which = "validation" if n_val == 0 else "training"
            raise ValueError(f"{source}: the {which} split would hold no {name} prompt ({len(sample)} "
                             f"sampled, val_fraction={val_fraction}); a split with one class only "
                             "cannot be trained or scored. Raise n or change val_fraction")
        val += [(p, label) for p in sample[:n_val]]
        train += [(p, label) for p in sample[n_val:]]
        counts[f"train_{name}"] = len(sample) - n_val
        counts[f"val_{name}"] = n_val
    rng.shuffle(train)
    rng.shuffle(val)

    out = write_splits(out_dir, train, val)
    print(f"{source}: {counts['rows']} rows, dropped {counts['empty']} empty and {counts['duplicates']} "
          f"duplicate prompts ({counts['conflicting']} prompts with conflicting labels dropped entirely); "
          f"{counts['unique_jailbreak']} jailbreak and {counts['unique_benign']} benign unique prompts")
    print(f"train: {counts['train_jailbreak']} jailbreak + {counts['train_benign']} benign -> {out / 'train.jsonl'}")
    print(f"val:   {counts['val_jailbreak']} jailbreak + {counts['val_benign']} benign -> {out / 'val.jsonl'}")
    return counts


def read_split(path: str, require_both_classes: bool = True) -> list[dict]:
    """[{"prompt": str, "label": bool}] from a train.jsonl / val.jsonl written by prepare."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; write it with: python -m data --source ... --out DIR")
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                examples.append(_parse_line(line, path, line_number))
    if not examples:
        raise ValueError(f"{path}: the file is empty; expected one JSON object per line")
    classes = {e["label"] for e in examples}
    if require_both_classes and len(classes) < 2:
        raise ValueError(f"{path}: every example has label {classes.pop()}; a split with one class only "
                         "cannot be trained or scored. Prepare it again with python -m data")
    return examples


def _parse_line(line: str, path: Path, line_number: int) -> dict:
    where = f"{path}, line {line_number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        raise ValueError(f"{where}: expected an object with a 'messages' list and a 'label'")
    label = row.get("label")
    if not isinstance(label, bool):
        raise ValueError(f"{where}, field 'label': expected true or false, found {label!r}")
    by_role = {m.get("role"): m.get("content") for m in row["messages"] if isinstance(m, dict)}
    prompt = by_role.get("user")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"{where}: no user message with text content")
    answer = by_role.get("assistant")
    if answer is not None and answer != LABELS[label]:
        raise ValueError(f"{where}: the assistant answers {answer!r} but the label {label} is answered "
                         f"{LABELS[label]!r}; the file and the label words disagree")
    return {"prompt": prompt, "label": label}
