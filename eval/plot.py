"""python -m eval.plot RUN_DIR: RUN_DIR/metrics.png, the training loss, learning rate and validation
F1 of a train.py run (its metrics.jsonl) against the optimizer step. Needs matplotlib.
"""
import argparse
import json
import sys
from pathlib import Path


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a metrics.jsonl, in file order."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg}); was the file "
                                 "written by train.py?") from None
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError(f"{path}, line {number}: expected an object with a 'step'")
            records.append(record)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train and not evals:
        raise ValueError(f"{path} holds no training or evaluation record yet; plot it once a step is logged")
    return train, evals


def _points(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    # a skipped step logs loss null: it is left out, not drawn as 0
    kept = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [s for s, _ in kept], [v for _, v in kept]


def plot(run_dir: str, out: str | None = None) -> Path:
    """Write the figure (default RUN_DIR/metrics.png) and return its path."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass the --output-dir of a train.py run")
    train, evals = read_metrics(path)
    try:
        import matplotlib
    except ImportError:
        raise ImportError("python -m eval.plot needs matplotlib, which is not installed: "
                          "pip install matplotlib") from None
    matplotlib.use("Agg")  # a file, no window: works on a machine without a display
    import matplotlib.pyplot as plt

    figure, (loss, lr, f1) = plt.subplots(3, 1, sharex=True, figsize=(8, 8))
    loss.plot(*_points(train, "loss"), lw=1)
    loss.set_ylabel("training loss")
    lr.plot(*_points(train, "lr"), lw=1, color="tab:orange")
    lr.set_ylabel("learning rate")
    f1.plot(*_points(evals, "f1"), marker="o", color="tab:green")
    f1.set_ylabel("validation F1")
    f1.set_ylim(-0.05, 1.05)
    f1.set_xlabel("optimizer step")
    for axes in (loss, lr, f1):
        axes.grid(alpha=0.3)
    figure.suptitle(str(Path(run_dir)))
    figure.tight_layout()
    target = Path(out) if out else Path(run_dir) / "metrics.png"
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.plot", description=__doc__)
    parser.add_argument("run_dir", help="a train.py --output-dir (it holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help="image path (default: RUN_DIR/metrics.png)")
    args = parser.parse_args(argv)
    try:
        target = plot(args.run_dir, args.out)
    except (OSError, ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
