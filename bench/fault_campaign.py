"""Fault campaign on the tiny model (CPU): break a run in each way we know, then count the outcomes.

    python bench/fault_campaign.py --trials 3

Each class runs --trials times (random file, fault, moment; --seed fixes them) against one uninterrupted
reference run. Good outcomes: "exact" (the resumed run ends with the reference's adapter, bit for bit),
"fell back, exact", "refused by name", "one line". Bad: "different result", "traceback", anything else.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import checkpoints  # noqa: E402
import train  # noqa: E402
from data.synthetic import write_synthetic  # noqa: E402

ARGS = ["--model", "tiny", "--max-seq-len", "256", "--micro-batch-size", "2", "--grad-accum", "1", "--epochs", "2",
        "--lr", "3e-3", "--warmup-steps", "1", "--dropout", "0.05", "--save-every", "1", "--keep-last", "0"]
STEPS = 8  # 8 train examples, 2 per step, 2 epochs


def run(task, out, *extra) -> tuple[int, str]:
    """train.main in this process; (exit code, stdout + stderr)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        code = train.main([*ARGS, "--data", str(task), "--output-dir", str(out), *extra])
    return code, buffer.getvalue()


def child(task, out, *extra, **popen):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "train.py", *ARGS, "--data", str(task), "--output-dir", str(out),
                             *extra], cwd=ROOT, env=env, **popen)


def same_adapter(a: Path, b: Path) -> bool:
    x, y = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def resume_outcome(task, out, reference, prefix="") -> str:
    code, text = run(task, out, "--resume", "auto")
    if "Traceback" in text:
        return "traceback"
    if code != 0:
        return f"resume exit {code}"
    return prefix + ("exact" if same_adapter(out, reference) else "different result")


def wait_for_step(out: Path, proc, limit=300) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        path = out / "metrics.jsonl"
        if path.is_file() and '"kind": "train"' in path.read_text():
            return True
        time.sleep(0.05)
    return False


# ----------------------------------------------------------------------------- the classes
def sigkill_mid_run(task, work, reference, rng):
    out = work / "run"
    proc = child(task, out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(out, proc)
    time.sleep(rng.uniform(0, 1.5))
    proc.kill()
    proc.wait()
    return resume_outcome(task, out, reference)


def corrupt(task, work, reference, rng, explicit=False):
    out = work / "run"
    shutil.copytree(reference, out)
    name = rng.choice(checkpoints.FILES + (checkpoints.MANIFEST,))
    path = out / f"checkpoint-{STEPS}" / name
    data = bytearray(path.read_bytes())
    kind = rng.choice(["truncate", "zero-fill", "flip-byte", "delete"])
    if kind == "truncate":
        data = data[: rng.randrange(len(data))]
    elif kind == "zero-fill":
        data = bytearray(len(data))
    elif kind == "flip-byte":
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    path.unlink()
    if kind != "delete":
        path.write_bytes(bytes(data))
    if explicit:
        code, text = run(task, out, "--resume", str(path.parent))
        lines = [x for x in text.splitlines() if x.startswith("error:")]
        return "refused by name" if code == 2 and len(lines) == 1 and name in lines[0] and "Traceback" not in text \
            else f"exit {code}"
    return resume_outcome(task, out, reference, "fell back, ")


def edit_json(task, work, reference, rng):
    out = work / "run"
    shutil.copytree(reference, out)
    folder = out / f"checkpoint-{STEPS}"
    state = json.loads((folder / "trainer_state.json").read_text())
    field = rng.choice(["step", "epoch", "batch", "skipped_steps", "tokens"])
    state["progress"][field] = rng.choice([-1, 26, state["progress"][field] + 1])
    (folder / "trainer_state.json").write_text(json.dumps(state))
    if rng.random() < 0.5:
        checkpoints.write_manifest(folder)  # a careful forger: the checksums match the edit
    return resume_outcome(task, out, reference, "fell back, ")


def metrics_rewrite_crash(task, work, reference, rng):
    out = work / "run"
    shutil.copytree(reference, out)
    before = (out / "metrics.jsonl").read_bytes()
    real = getattr(os, "replace")
    setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    try:
        checkpoints.keep_metrics(out / "metrics.jsonl", rng.randrange(1, STEPS), lambda *a, **k: None)
        return "no error raised"
    except checkpoints.WriteFailed:
        pass
    finally:
        setattr(os, "replace", real)
    if (out / "metrics.jsonl").read_bytes() != before:
        return "history lost"
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # and a partial last line on top
    shutil.rmtree(out / f"checkpoint-{STEPS}")
    outcome = resume_outcome(task, out, reference)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if '"train"' in x]
    return outcome if steps == list(range(1, STEPS + 1)) else f"{outcome}, metrics {steps}"


def second_run(task, work, reference, rng):
    out = work / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import checkpoints, sys, time\n"
                               f"with checkpoints.lock({str(out)!r}, print):\n"
                               "    print('held', flush=True); time.sleep(600)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    holder.stdout.readline()
    try:
        code, text = run(task, out)
    finally:
        holder.kill()
        holder.wait()
    return "refused, names the pid" if code == 2 and f"pid {holder.pid}" in text else f"exit {code}"


def sigint_at_start(task, work, reference, rng):
    out = work / "run"
    proc = child(task, out, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(rng.uniform(0.0, 2.5))  # while Python starts, torch imports, the model is built (~3 s in all)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    if "Traceback" in err:
        return "traceback"
    if proc.returncode == 0:
        return "finished before the signal"
    last = err.strip().splitlines()[-1] if err.strip() else ""
    half = list(out.glob(".tmp-*")) if out.exists() else []
    if proc.returncode == 130 and "SIGINT" in last and not half:
        saved = bool(out.exists() and checkpoints.list_checkpoints(out))
        return "one line, checkpoint saved" if saved else "one line, nothing written"
    return f"exit {proc.returncode}: {last[:60]}"


def sigint_pipes_closed(task, work, reference, rng):
    out = work / "run"
    proc = child(task, out, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_step(out, proc)
    proc.stdout.close()
    proc.stderr.close()
    proc.send_signal(signal.SIGINT)
    if proc.wait() != 130:
        return f"exit {proc.returncode}"
    return resume_outcome(task, out, reference, "saved, ")


def disk_full(task, work, reference, rng):
    out, at = work / "run", rng.randrange(2, STEPS + 1)
    real = checkpoints.save_file

    def full(tensors, path, *a, **k):
        if f".tmp-checkpoint-{at}" in path:
            raise OSError(28, "No space left on device", path)
        return real(tensors, path, *a, **k)

    checkpoints.save_file = full
    try:
        code, text = run(task, out)
    finally:
        checkpoints.save_file = real
    errors = [x for x in text.splitlines() if x.startswith("error:")]
    if code != 1 or len(errors) != 1 or "no space left" not in errors[0] or "Traceback" in text:
        return f"exit {code}"
    return resume_outcome(task, out, reference, "one line, ")


CLASSES = {
    "SIGKILL mid-run, resume": sigkill_mid_run,
    "damaged newest checkpoint, --resume auto": corrupt,
    "damaged checkpoint, --resume PATH": lambda *a: corrupt(*a, explicit=True),
    "edited trainer_state.json, --resume auto": edit_json,
    "crash in the metrics rewrite + partial line": metrics_rewrite_crash,
    "second run on the folder": second_run,
    "SIGINT at a random moment of start-up": sigint_at_start,
    "SIGINT with stdout/stderr closed": sigint_pipes_closed,
    "disk full while saving, resume": disk_full,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="run only the classes whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        task, reference = tmp / "task", tmp / "reference"
        write_synthetic(str(task), n_train=8, n_val=4, seed=0)
        code, text = run(task, reference)
        assert code == 0, text[-2000:]
        print(f"reference: {STEPS} steps, checkpoints 1..{STEPS}; {args.trials} trials per class")
        for name, trial in CLASSES.items():
            if args.only not in name:
                continue
            outcomes = collections.Counter()
            for i in range(args.trials):
                work = tmp / f"{len(outcomes)}-{i}-{rng.random():.6f}"
                work.mkdir()
                outcomes[trial(task, work, reference, rng)] += 1
                shutil.rmtree(work, ignore_errors=True)
            print(f"{name:<46} {args.trials:>2} trials: " + ", ".join(f"{k} {v}" for k, v in outcomes.items()),
                  flush=True)


if __name__ == "__main__":
    main()
