"""`evaluate`: a model's metrics on a split (used by train.py and `python -m eval`), and the table."""

import time

from data import MAX_LEN, render_prompts
from eval.metrics import classification_metrics
from eval.score import answer_label, generate_answers, score_rendered

# Rows of the side-by-side table, in order.
TABLE_ROWS = ("n", "n_jailbreak", "accuracy", "precision", "recall", "f1", "roc_auc", "tp", "fp", "tn",
              "fn", "label_mass", "n_cut", "generate_unparseable", "generate_accuracy", "seconds")


def evaluate(model, tokenizer, examples: list[dict], batch_size: int = 8, threshold: float = 0.5,
             generate: bool = False, max_len: int | None = MAX_LEN, max_new_tokens: int = 32,
             progress: bool = False, pack_len: int | None = None, max_tokens: int | None = None,
             world=None) -> dict:
    """Metrics of the model on read_split's examples, plus n and timing; flat, JSON-ready.

    label_mass is the mean full-vocabulary probability of the two label words (1.0: the model
    answers with nothing else). With generate, also greedy answers: the share that has no parseable
    label word, and the accuracy counting those as wrong. pack_len: score the prompts packed into rows
    of that many tokens (eval.score.score_rendered). world (train.py's distributed.World): each of its
    ranks scores every world.size-th prompt, the scores are gathered, and every rank gets the metrics of
    the whole split.
    """
    if not examples:
        raise ValueError("no examples to evaluate")
    prompts = [example["prompt"] for example in examples]
    labels = [bool(example["label"]) for example in examples]
    start = time.perf_counter()
    encoded, n_cut = render_prompts(tokenizer, prompts, max_len)   # cut as training cut them
    rank, size = (world.rank, world.size) if world is not None else (0, 1)
    mine = score_rendered(model, tokenizer, encoded[rank::size], batch_size, progress, return_raw=True,
                          pack_len=pack_len, max_tokens=max_tokens)
    scores, raw = [0.0] * len(encoded), [(0.0, 0.0)] * len(encoded)
    for r, (part_scores, part_raw) in enumerate(world.gather(mine) if world is not None else [mine]):
        scores[r::size], raw[r::size] = part_scores, part_raw
    seconds = time.perf_counter() - start
    result = {
        "n": len(examples),
        "n_jailbreak": sum(labels),
        "threshold": threshold,
        **classification_metrics(labels, scores, threshold),
        "label_mass": sum(p_no + p_yes for p_no, p_yes in raw) / len(raw),
        "n_cut": n_cut,
        "seconds": seconds,
        "examples_per_second": len(examples) / seconds if seconds > 0 else None,
    }
    if generate:
        start = time.perf_counter()
        answers = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, max_len, progress)
        predicted = [answer_label(answer) for answer in answers]
        result["generate_unparseable"] = sum(p is None for p in predicted) / len(predicted)
        result["generate_accuracy"] = sum(p == label for p, label in zip(predicted, labels)) / len(labels)
        result["generate_seconds"] = time.perf_counter() - start
    return result


def change(base: dict, adapted: dict) -> dict:
    """adapted - base for every number both have (None where either is None)."""
    out = {}
    for key, value in base.items():
        other = adapted.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(other, (int, float)):
            out[key] = other - value
        else:
            out[key] = None
    return out


def _cell(value, signed: bool) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:+.4f}" if signed else f"{value:.4f}"
    return f"{value:+d}" if signed else str(value)


def format_table(columns: dict[str, dict]) -> str:
    """A plain-text table: one row per metric in TABLE_ROWS, one column per result ("change" signed)."""
    keys = [key for key in TABLE_ROWS if any(key in column for column in columns.values())]
    cells = [["metric", *columns]] + [[key, *(_cell(c.get(key), name == "change") for name, c in columns.items())]
                                   for key in keys]
    widths = [max(len(row[j]) for row in cells) for j in range(len(cells[0]))]
    lines = ["  ".join(cell.rjust(w) if j else cell.ljust(w) for j, (cell, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
