"""Everything train.py reads and writes in --output-dir: checkpoints, metrics.jsonl, the folder's lock.

<output-dir>/
    .lock                          fcntl.flock'ed by the run using the folder; holds its pid
    metrics.jsonl                  one JSON line per log; only appended, or replaced whole (os.replace)
    checkpoint-<step>/
        adapter_model.safetensors, adapter_config.json   the adapter, PEFT's layout (lora.save_adapter)
        optimizer.safetensors      every tensor of the optimizer's state: state.<param index>.<name>
        rng.safetensors            torch_cpu, cuda.<device>: generator states (uint8)
        trainer_state.json         progress, data position, the optimizer's other state and param_groups,
                                   the config, the run's identity (config hash, data fingerprint)
        manifest.json              sha256 and size of each file above, and a sha256 of that list
    .tmp-checkpoint-<step>/        a save in progress; renamed to checkpoint-<step> when complete

No pickle: loading never runs code. A checkpoint is written to a temporary folder and renamed into
place, and every file is checked against the manifest before anything is loaded, so a crash, a full
disk or a flipped bit gives a checkpoint that is either whole or refused by name, never half-used.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors, save_file

from lora import load_adapter, save_adapter

FORMAT = 1
MANIFEST, STATE = "manifest.json", "trainer_state.json"
FILES = ("adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors", "rng.safetensors", STATE)
PROGRESS_COUNTERS = ("step", "epoch", "batch", "skipped_steps", "bad_in_a_row", "tokens", "target_tokens")


class Refused(Exception):
    """The folder or checkpoint cannot be used as asked: one line saying why and what to do."""


class Damaged(Refused):
    """A checkpoint that fails verification; names the file and what is wrong with it."""

    def __init__(self, folder: Path, file: str, why: str):
        super().__init__(f"{Path(folder) / file}: {why}")
        self.folder, self.file, self.why = Path(folder), file, why


class WriteFailed(Exception):
    """Writing to --output-dir failed (disk full, ...); earlier checkpoints are intact."""


@dataclasses.dataclass
class Checkpoint:
    """A verified checkpoint, read into memory: what is loaded is exactly what was checked."""
    folder: Path
    state: dict
    optimizer: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return self.state["progress"]["step"]


# ----------------------------------------------------------------------------- saving
def checkpoint_path(out: Path, step: int) -> Path:
    return Path(out) / f"checkpoint-{step}"


def run_identity(compute_config: dict, data_fingerprint: str) -> dict:
    """What makes two runs the same computation: the config fields that change the math, and the data."""
    return {"config": compute_config, "config_sha256": _json_sha256(compute_config),
            "data_fingerprint": data_fingerprint}


def save(out: Path, model, optimizer, progress: dict, config: dict, identity: dict, base: dict | None = None
         ) -> Path:
    """Write checkpoint-<step>: files into a temporary folder, a manifest last, then one rename.
    base: the adapter's base model, as lora.save_adapter records it (base_model, base_seed)."""
    step = progress["step"]
    final, tmp = checkpoint_path(out, step), Path(out) / f".tmp-checkpoint-{step}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(model, str(tmp), **(base or {}))
        tensors, other = split_optimizer_state(optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, str(tmp / "rng.safetensors"))
        state = {"format": FORMAT, "progress": progress, "optimizer": other, "config": config, "run": identity,
                 "scheduler": {"kind": "linear warm-up, then cosine", "step": step},  # lr is a function of step
                 "torch": torch.__version__}
        (tmp / STATE).write_text(json.dumps(state, indent=1), encoding="utf-8")
        write_manifest(tmp)
        if final.exists():  # the same step saved by an earlier attempt: set it aside, then swap
            _remove(final)
        os.replace(tmp, final)
        _fsync_dir(out)
    except (OSError, SafetensorError) as error:  # safetensors reports a full disk as its own error
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteFailed(f"cannot write {final.name} in {out}: {_os_reason(error)}. "
                          f"{_intact_note(out)} Free space or fix the folder, then continue with --resume auto") \
            from error
    return final


def save_final_adapter(model, out: Path, base: dict | None = None):
    """<output-dir>/adapter, for eval and PEFT (lora.save_adapter renames each file into place)."""
    try:
        save_adapter(model, str(Path(out) / "adapter"), **(base or {}))
    except (OSError, SafetensorError) as error:
        raise WriteFailed(f"cannot write {Path(out) / 'adapter'}: {_os_reason(error)}. {_intact_note(out)} "
                          "Free space, then run again with --resume auto to write it") from error


def write_manifest(folder: Path):
    """manifest.json: sha256 and size of every checkpoint file, and a sha256 of that list itself."""
    files = {}
    for name in FILES:
        data = (Path(folder) / name).read_bytes()
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        _fsync_file(Path(folder) / name)
    manifest = {"format": FORMAT, "files": files, "sha256": _json_sha256(files)}
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    _fsync_file(Path(folder) / MANIFEST)


def split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state_dict as (every tensor, for safetensors; the rest, for JSON).

    Nothing here knows AdamW: any optimizer whose state holds tensors and plain values, nested in dicts
    (bitsandbytes' AdamW8bit keeps its 8-bit moments, qmaps and absmax in a dict of its own beside an
    int step), is saved and restored whole. A tensor's key is its path: state.<index>.<name>[.<name>...].
    """
    tensors, other = {}, {}

    def walk(value, path: list[str]):
        if isinstance(value, torch.Tensor):
            tensors[".".join(["state", *path])] = value.detach().cpu().contiguous()
            return None
        if isinstance(value, dict) and any(isinstance(v, (torch.Tensor, dict)) for v in value.values()):
            kept = {k: walk(v, [*path, str(k)]) for k, v in value.items()}
            return {k: v for k, v in kept.items() if v is not None} or None
        return _to_json(value, "optimizer state " + ".".join(path))

    for index, state in state_dict["state"].items():
        for name, value in state.items():
            kept = walk(value, [str(index), name])
            if kept is not None:
                other.setdefault(str(index), {})[name] = kept
    return tensors, {"state": other, "param_groups": _to_json(state_dict["param_groups"], "param_groups")}


def join_optimizer_state(tensors: dict[str, torch.Tensor], other: dict) -> dict:
    """The inverse of split_optimizer_state: a state_dict for optimizer.load_state_dict."""
    state: dict[int, dict] = {int(i): {k: _from_json(v) for k, v in s.items()} for i, s in other["state"].items()}
    for key, value in tensors.items():
        _, index, *names = key.split(".")
        place = state.setdefault(int(index), {})
        for name in names[:-1]:
            place = place.setdefault(name, {})
        place[names[-1]] = value
    return {"state": state, "param_groups": _from_json(other["param_groups"])}


def _to_json(value, what: str):
    """JSON for plain values; tuples are tagged so that they come back as tuples (AdamW's betas)."""
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v, what) for v in value]}
    if isinstance(value, list):
        return [_to_json(v, what) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v, what) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{what}: a {type(value).__name__} cannot be saved in a checkpoint (tensors and plain "
                    "values can)")


def _from_json(value):
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_from_json(v) for v in value["__tuple__"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


# ----------------------------------------------------------------------------- finding, verifying, loading
def list_checkpoints(out: Path) -> list[Path]:
    """checkpoint-<step> folders in out, oldest first, whole or not (verify says which are whole)."""
    found = [(int(p.name[len("checkpoint-"):]), p) for p in Path(out).glob("checkpoint-*")
             if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir()] if Path(out).is_dir() else []
    return [path for _, path in sorted(found)]


def read(folder: Path) -> Checkpoint:
    """Read and verify a checkpoint: every file against the manifest, then the JSON's structure and
    values, then the tensors. Raises Damaged naming the first file found wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise Refused(f"{folder} is not a checkpoint: no such folder. Pass a checkpoint-<step> folder written "
                      "by train.py, or --resume auto")
    manifest = _read_json(folder, MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("sha256") != _json_sha256(files):
        raise Damaged(folder, MANIFEST, "its list of files does not match its own sha256 (edited or damaged)")
    data = {}
    for name in FILES:
        path = folder / name
        if name not in files:
            raise Damaged(folder, MANIFEST, f"{name} is not listed")
        if not path.is_file():
            raise Damaged(folder, name, "missing")
        data[name] = path.read_bytes()
        if len(data[name]) != files[name].get("bytes"):
            raise Damaged(folder, name, f"{len(data[name])} bytes, the manifest says {files[name].get('bytes')} "
                          "(truncated or extended)")
        if hashlib.sha256(data[name]).hexdigest() != files[name].get("sha256"):
            raise Damaged(folder, name, "its sha256 differs from the manifest's (the file changed after it was "
                          "written)")
    state = _parse_json(folder, STATE, data[STATE])
    check_state(folder, state)
    tensors = {}
    for name in ("optimizer.safetensors", "rng.safetensors", "adapter_model.safetensors"):
        try:
            tensors[name] = load_tensors(data[name])
        except Exception as error:  # safetensors raises its own error types for a bad header
            raise Damaged(folder, name, f"not a readable safetensors file ({error})") from error
    _parse_json(folder, "adapter_config.json", data["adapter_config.json"])
    indices = {i for g in state["optimizer"]["param_groups"] for i in g.get("params", [])}
    stray = sorted({k for k in tensors["optimizer.safetensors"] if int(k.split(".")[1]) not in indices})
    if stray or not all(re.fullmatch(r"state\.\d+\..+", k) for k in tensors["optimizer.safetensors"]):
        raise Damaged(folder, "optimizer.safetensors", f"tensors {stray[:3]} belong to no parameter group")
    cpu = tensors["rng.safetensors"].get("torch_cpu")
    if cpu is None or cpu.dtype != torch.uint8 or cpu.shape != torch.get_rng_state().shape:
        raise Damaged(folder, "rng.safetensors", "torch_cpu is missing or not a CPU generator state")
    return Checkpoint(folder, state, tensors["optimizer.safetensors"], tensors["rng.safetensors"])


def check_state(folder: Path, state: dict):
    """trainer_state.json's structure and values: types, ranges, and agreement with the folder's name."""
    def bad(why):
        raise Damaged(folder, STATE, why)

    for key, kind in (("progress", dict), ("optimizer", dict), ("config", dict), ("run", dict)):
        if not isinstance(state.get(key), kind):
            bad(f"'{key}' is missing or not a {kind.__name__}")
    progress, run = state["progress"], state["run"]
    for key in PROGRESS_COUNTERS:
        value = progress.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            bad(f"progress.{key} is {value!r}, expected a whole number >= 0")
    if folder.name.startswith("checkpoint-") and folder.name != f"checkpoint-{progress['step']}":
        bad(f"progress.step is {progress['step']} in a folder named {folder.name}")
    if progress["skipped_steps"] > progress["step"] or progress["bad_in_a_row"] > progress["skipped_steps"]:
        bad(f"counters disagree: {progress['skipped_steps']} skipped, {progress['bad_in_a_row']} bad in a row, "
            f"at step {progress['step']}")
    if progress["target_tokens"] > progress["tokens"]:
        bad(f"progress.target_tokens {progress['target_tokens']} exceeds progress.tokens {progress['tokens']}")
    best = progress.get("best")
    if best is not None and not (isinstance(best, dict) and isinstance(best.get("step"), int)
                                 and isinstance(best.get("f1"), (int, float))
                                 and 0 < best["step"] <= progress["step"] and 0 <= best["f1"] <= 1):
        bad(f"progress.best is {best!r}, expected null or a step <= {progress['step']} and an F1 in [0, 1]")
    if not isinstance(run.get("config"), dict) or run.get("config_sha256") != _json_sha256(run["config"]):
        bad("run.config does not match run.config_sha256 (edited after it was written)")
    if any(state["config"].get(k) != v for k, v in run["config"].items()):
        bad("config and run.config disagree (edited after it was written)")
    epochs = run["config"].get("epochs")
    if isinstance(epochs, int) and progress["epoch"] >= epochs:
        bad(f"progress.epoch is {progress['epoch']}, but the run has {epochs} epochs (0-based)")
    if not re.fullmatch(r"[0-9a-f]{64}", str(run.get("data_fingerprint"))):
        bad("run.data_fingerprint is not a sha256")
    groups = state["optimizer"].get("param_groups")
    if not isinstance(groups, list) or not groups or not isinstance(state["optimizer"].get("state"), dict) \
            or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        bad("optimizer.param_groups / optimizer.state are missing or malformed")


def choose(out: Path, resume: str | None, compute_config: dict, say) -> Checkpoint | None:
    """The checkpoint to resume from (None: a fresh run), verified.

    --resume auto takes the newest intact checkpoint: a damaged newer one is named, set aside as
    checkpoint-<step>.damaged, and skipped, loudly. An explicit folder that is damaged is refused.
    """
    out = Path(out)
    if resume is None:
        if list_checkpoints(out):
            raise Refused(f"{out} already holds checkpoints ({', '.join(p.name for p in list_checkpoints(out))}); "
                          "continue that run with --resume auto, or choose another --output-dir")
        return None
    if resume != "auto":
        try:
            checkpoint = read(Path(resume))
        except Damaged as error:
            raise Refused(f"cannot resume from {resume}: {error.file}: {error.why}. Resume from another "
                          "checkpoint (--resume auto takes the newest intact one)") from error
        same_run(checkpoint, compute_config)
        return checkpoint
    candidates = list_checkpoints(out)
    if not candidates:
        say(f"--resume auto: no checkpoint in {out}; starting fresh")
        return None
    for folder in reversed(candidates):
        try:
            checkpoint = read(folder)
        except Damaged as error:
            aside = folder.with_name(folder.name + ".damaged")
            _remove(aside)
            os.replace(folder, aside)
            say(f"warning: {folder.name} is damaged ({error.file}: {error.why}); set aside as {aside.name}",
                error=True)
            continue
        if folder != candidates[-1]:
            say(f"warning: falling back to {folder.name}, the newest intact checkpoint", error=True)
        same_run(checkpoint, compute_config)
        return checkpoint
    raise Refused(f"no intact checkpoint in {out}: all {len(candidates)} were damaged (set aside as "
                  "checkpoint-<step>.damaged). Start a new run in another --output-dir")


def same_run(checkpoint: Checkpoint, compute_config: dict):
    """Refuse a checkpoint of a run that was configured differently (the data is checked in restore).
    A setting the checkpoint does not hold (added to train.py after it was written) counts as its default."""
    from train_config import TrainConfig
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    saved = {**defaults, **checkpoint.state["run"]["config"]}
    differ = [f"--{k.replace('_', '-')}: {saved.get(k)!r} in the checkpoint, {v!r} now"
              for k, v in compute_config.items() if saved.get(k) != v]
    if differ:
        raise Refused(f"cannot resume from {checkpoint.folder}: the run there was configured differently:\n  "
                      + "\n  ".join(differ) + "\nResume with the checkpoint's settings, or start a new run in "
                      "another --output-dir")


def restore(checkpoint: Checkpoint, model, optimizer, identity: dict, total_steps: int) -> dict:
    """Load adapter, optimizer state and RNG states into the run; return its progress."""
    folder, progress = checkpoint.folder, checkpoint.state["progress"]
    if checkpoint.state["run"]["data_fingerprint"] != identity["data_fingerprint"]:
        raise Refused(f"cannot resume from {folder}: train.jsonl / val.jsonl differ from the data that run "
                      "trained on. Resume with the same --data, or start a new run")
    if progress["step"] > total_steps:
        raise Damaged(folder, STATE, f"progress.step {progress['step']} is past the run's last step {total_steps}")
    try:
        load_adapter(model, str(folder))
    except (OSError, ValueError) as error:
        raise Damaged(folder, "adapter_model.safetensors", str(error)) from error
    try:
        optimizer.load_state_dict(join_optimizer_state(checkpoint.optimizer, checkpoint.state["optimizer"]))
    except (KeyError, ValueError, TypeError, RuntimeError) as error:
        raise Damaged(folder, "optimizer.safetensors", f"does not fit this optimizer ({error})") from error
    torch.set_rng_state(checkpoint.rng["torch_cpu"])
    cuda = [checkpoint.rng[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in checkpoint.rng]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
    return dict(progress)


def prune(out: Path, keep_last: int, keep: set[int] = frozenset()):
    """Delete all but the newest keep_last checkpoints (0: keep all), and those of the steps in keep."""
    if keep_last:
        for old in list_checkpoints(out)[:-keep_last]:
            if int(old.name[len("checkpoint-"):]) not in keep:
                _remove(old)


def clean_leftovers(out: Path, say):
    """Remove what interrupted saves left: temporary checkpoint folders and temporary files."""
    out = Path(out)
    found = [*out.glob(".tmp-*"), *out.glob("adapter/*.tmp"), *out.glob("metrics.jsonl.tmp")]
    for path in found:
        _remove(path)
    if found:
        say(f"removed what an interrupted run left: {', '.join(sorted(p.name for p in found))}")


def _remove(path: Path):
    """Delete a file or folder; a folder is first renamed aside, so that it never exists half-deleted."""
    path = Path(path)
    if path.is_dir() and not path.name.startswith(".tmp-"):
        doomed = path.with_name(f".tmp-delete-{path.name}")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        path = doomed
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- metrics.jsonl
def append_metrics(metrics_path: Path, record: dict):
    """Append one JSON line (non-finite floats become null: strict JSON)."""
    record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    try:
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as error:
        raise WriteFailed(f"cannot append to {metrics_path}: {_os_reason(error)}. "
                          f"{_intact_note(Path(metrics_path).parent)} Free space, then continue with --resume auto") \
            from error


def log(metrics_path: Path, record: dict, started: float):
    """Append one JSON line to metrics.jsonl, stamped with the time (UTC) and the seconds since `started`
    (a time.monotonic() of this run's start; a resumed run counts from its own start). None: not rank 0."""
    if metrics_path is None:
        return
    stamp = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "elapsed": round(time.monotonic() - started, 3)}
    append_metrics(metrics_path, {**record, **stamp})


def keep_metrics(metrics_path: Path, until_step: int | None, say) -> list[dict]:
    """Keep the records up to until_step (None: none), replacing the file atomically; return them.

    On resume the steps after the checkpoint are dropped (the resumed run writes them again). The
    file is rewritten beside and renamed over the old one, so a crash here loses nothing. A partial
    last line (a crash mid-append) is dropped with a note.
    """
    metrics_path = Path(metrics_path)
    if not metrics_path.exists():
        return []
    kept, dropped = [], []
    lines = metrics_path.read_text(encoding="utf-8", errors="replace").splitlines() if until_step is not None else []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            step = record["step"]
        except (ValueError, TypeError, KeyError):
            dropped.append(number) if line.strip() else None
            continue
        if step <= until_step:
            kept.append(record)
    if dropped:
        say(f"note: {metrics_path}: dropped {len(dropped)} unreadable line(s) ({', '.join(map(str, dropped[:5]))}), "
            "left by a run that stopped mid-write")
    replace_file(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def replace_file(path: Path, text: str):
    """Write text beside path, fsync it, and rename it over path: readers see the old file or the new one."""
    tmp = Path(f"{path}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(Path(path).parent)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise WriteFailed(f"cannot rewrite {path}: {_os_reason(error)}; the old file is untouched. Free space, "
                          "then run again") from error


# ----------------------------------------------------------------------------- the folder's lock
@contextlib.contextmanager
def lock(out: Path, say):
    """Hold <output-dir>/.lock (fcntl.flock, with our pid in it) for the whole run.

    The kernel drops a flock when its process dies, so a lock that is free but names a pid was left
    by a run that ended without releasing it: it is taken over, with a note.
    """
    path = Path(out) / ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise Refused(f"cannot use {out}: {_os_reason(error)}. Choose a folder this user can write to") from error
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise Refused(f"{out} is in use by another run (pid {holder} holds {path}). Wait for it to finish, "
                          "or choose another --output-dir") from None
        previous = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if previous and previous != str(os.getpid()):
            say(f"note: took over {path} from pid {previous}, which ended without releasing it")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # empty: released cleanly (a pid left here means the run died)
        os.close(fd)  # closing drops the flock


def remove_if_only_lock(out: Path):
    """Remove a folder this run made that holds nothing but its (released) lock: a run stopped by a
    mistake before training leaves nothing on disk."""
    out = Path(out)
    if out.is_dir() and [p.name for p in out.iterdir()] == [".lock"]:
        (out / ".lock").unlink()
        out.rmdir()


# ----------------------------------------------------------------------------- small helpers
def _json_sha256(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _read_json(folder: Path, name: str):
    path = Path(folder) / name
    if not path.is_file():
        raise Damaged(folder, name, f"missing, so {folder} is not a checkpoint written by this train.py (or one "
                      "whose save did not finish)")
    return _parse_json(folder, name, path.read_bytes())


def _parse_json(folder: Path, name: str, data: bytes):
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise Damaged(folder, name, f"not valid JSON ({error})") from error


def _fsync_file(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path):
    with contextlib.suppress(OSError):  # not every file system lets a folder be fsync'ed
        _fsync_file(Path(folder))


def _os_reason(error: OSError | SafetensorError) -> str:
    if getattr(error, "errno", None) == errno.ENOSPC or f"(os error {errno.ENOSPC})" in str(error):
        return "no space left on the device"
    if isinstance(error, SafetensorError):
        return str(error)
    return f"{error.strerror or error} ({error.filename})" if error.filename else str(error.strerror or error)


def _intact_note(out: Path) -> str:
    done = list_checkpoints(out)
    return (f"Earlier checkpoints are intact (newest: {done[-1].name})." if done else
            "No checkpoint had been saved yet.")
