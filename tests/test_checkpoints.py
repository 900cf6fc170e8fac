"""checkpoints.py: checkpoints that cannot lie (every file checked, damaged ones refused by name or
passed over for the newest intact one), any optimizer's state, metrics.jsonl that a crash cannot eat,
the lock on --output-dir, and signals from start-up to the end of a run (also with stdout closed).

CPU, the tiny model, a 4-step run built once per module and copied per case. The runs are marked slow.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import checkpoints
import train
from data.synthetic import write_synthetic
from test_train import ROOT, adapter, assert_same_tensors, metrics, two_cpu_threads  # noqa: F401 (autouse)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """8 train / 4 val examples: 4 optimizer steps at 2 x 1."""
    folder = tmp_path_factory.mktemp("task")
    write_synthetic(str(folder), n_train=8, n_val=4, seed=0)
    return folder


def run(task, out, *extra):
    return train.main(["--model", "tiny", "--data", str(task), "--output-dir", str(out), "--max-seq-len", "256",
                       "--micro-batch-size", "2", "--grad-accum", "1", "--epochs", "1", "--lr", "3e-3",
                       "--warmup-steps", "1", "--dropout", "0.05", "--save-every", "1", "--keep-last", "0", *extra])


@pytest.fixture(scope="module")
def finished(task, tmp_path_factory):
    """A whole run: checkpoint-1 ... checkpoint-4, adapter/, metrics.jsonl. Copy it before changing it."""
    out = tmp_path_factory.mktemp("finished")
    assert run(task, out) == 0
    return out


@pytest.fixture
def copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def err_lines(capsys):
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.strip() and "train:" not in line]  # not the progress bar


# --- faults ----------------------------------------------------------------------------------------

def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def zero_fill(path):
    path.write_bytes(bytes(path.stat().st_size))


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def delete(path):
    path.unlink()


FAULTS = {"truncate": truncate, "zero-fill": zero_fill, "flip-byte": flip_byte, "delete": delete}
FILES = checkpoints.FILES + (checkpoints.MANIFEST,)


def edit_state(folder, change, resign=True):
    """Change trainer_state.json; with resign, write a manifest that matches (a careful forger)."""
    path = folder / "trainer_state.json"
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state))
    if resign:
        checkpoints.write_manifest(folder)


EDITS = {  # name: (change, resign, what the message says)
    "step, not re-signed": (lambda s: s["progress"].update(step=26), False, "the manifest"),
    "step": (lambda s: s["progress"].update(step=26), True, "progress.step is 26 in a folder named checkpoint-4"),
    "negative counter": (lambda s: s["progress"].update(skipped_steps=-1), True, "progress.skipped_steps is -1"),
    "config": (lambda s: s["config"].update(rank=8), True, "config and run.config disagree"),
    "run.config": (lambda s: s["run"]["config"].update(lr=1.0), True, "run.config does not match"),
    "epoch past the end": (lambda s: s["progress"].update(epoch=5), True, "progress.epoch is 5"),
    "best": (lambda s: s["progress"].update(best={"step": 9, "f1": 2.0}), True, "progress.best"),
}


def refused_by_name_then_passed_over(task, copy, capsys, says):
    """--resume <the damaged checkpoint-4>: one clear line naming it, nothing written. --resume auto:
    checkpoint-4 is named and set aside, and checkpoint-3 (intact) is what the run would load."""
    capsys.readouterr()
    before = sorted(os.listdir(copy))
    assert run(task, copy, "--resume", str(copy / "checkpoint-4")) == 2
    lines = err_lines(capsys)
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert f"cannot resume from {copy / 'checkpoint-4'}: " in lines[0] and all(s in lines[0] for s in says), lines
    assert sorted(os.listdir(copy)) == before
    compute = json.loads((copy / "checkpoint-3" / "trainer_state.json").read_text())["run"]["config"]
    said = []
    chosen = checkpoints.choose(copy, "auto", compute, lambda line, error=False: said.append(line))
    assert chosen.folder == copy / "checkpoint-3" and chosen.step == 3
    assert said[0].startswith("warning: checkpoint-4 is damaged (") and all(s in said[0] for s in says), said
    assert said[1] == "warning: falling back to checkpoint-3, the newest intact checkpoint"
    assert (copy / "checkpoint-4.damaged").is_dir() and not (copy / "checkpoint-4").exists()


@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("name", FILES)
def test_a_damaged_file_is_refused_by_name_or_passed_over(task, copy, capsys, name, fault):
    FAULTS[fault](copy / "checkpoint-4" / name)
    refused_by_name_then_passed_over(task, copy, capsys, [name])


@pytest.mark.slow
@pytest.mark.parametrize("edit", EDITS)
def test_edited_trainer_state_is_refused_by_name_or_passed_over(task, copy, capsys, edit):
    change, resign, says = EDITS[edit]
    edit_state(copy / "checkpoint-4", change, resign)
    refused_by_name_then_passed_over(task, copy, capsys, ["trainer_state.json", says])


@pytest.mark.slow
@pytest.mark.parametrize("name, damage", [
    ("optimizer.safetensors", flip_byte), ("rng.safetensors", zero_fill), ("adapter_model.safetensors", truncate),
    ("manifest.json", delete), ("trainer_state.json", lambda p: edit_state(p.parent, EDITS["step"][0])),
], ids=["optimizer-flip-byte", "rng-zero-fill", "adapter-truncate", "manifest-delete", "step-re-signed"])
def test_resuming_past_a_damaged_checkpoint_ends_exactly_as_the_uninterrupted_run(task, finished, copy, capsys,
                                                                                   name, damage):
    damage(copy / "checkpoint-4" / name)
    assert run(task, copy, "--resume", "auto") == 0
    err = capsys.readouterr().err
    assert f"checkpoint-4 is damaged ({name}" in err and "falling back to checkpoint-3" in err
    assert_same_tensors(adapter(copy / "adapter"), adapter(finished / "adapter"))
    assert_same_tensors(load_file(str(copy / "checkpoint-4" / "optimizer.safetensors")),
                        load_file(str(finished / "checkpoint-4" / "optimizer.safetensors")))
    assert [r["step"] for r in metrics(copy, "train")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_only_damaged_checkpoints_is_a_clear_error_not_a_fresh_start(finished, copy, task, capsys):
    for folder in checkpoints.list_checkpoints(copy):
        flip_byte(folder / "rng.safetensors")
    assert run(task, copy, "--resume", "auto") == 2
    assert "no intact checkpoint in" in capsys.readouterr().err
    assert not checkpoints.list_checkpoints(copy)                         # all set aside, none loaded


@pytest.mark.slow
def test_a_checkpoint_of_an_older_format_is_named_not_a_traceback(finished, copy):
    (copy / "checkpoint-4" / "manifest.json").unlink()
    with pytest.raises(checkpoints.Damaged, match="manifest.json: missing, so .* is not a checkpoint"):
        checkpoints.read(copy / "checkpoint-4")


# --- any optimizer ---------------------------------------------------------------------------------

def bnb_like_state():
    """The shape of bitsandbytes' AdamW8bit state: uint8 states, qmap/absmax tensors, an int step."""
    g = torch.Generator().manual_seed(0)
    return {"state": {0: {"step": 7, "state1": torch.randint(0, 255, (64,), dtype=torch.uint8, generator=g),
                          "qmap1": torch.randn(256, generator=g), "absmax1": torch.rand(2, generator=g),
                          "unorm_vec": torch.zeros(1)}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.995), "eps": 1e-8, "weight_decay": 0.0,
                              "optim_bits": 8, "max_unorm": 0.0, "skip_zeros": False, "params": [0]}]}


def torch_state(make):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    optimizer = make(params)
    for _ in range(2):
        sum((p ** 2).sum() for p in params).backward()
        optimizer.step()
    return optimizer.state_dict()


@pytest.mark.parametrize("state_dict", [
    pytest.param(lambda: torch_state(lambda p: torch.optim.AdamW(p, lr=1e-2)), id="AdamW"),
    pytest.param(lambda: torch_state(lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True)), id="Adam-amsgrad"),
    pytest.param(lambda: torch_state(lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9)), id="SGD-momentum"),
    pytest.param(lambda: torch_state(lambda p: torch.optim.Adagrad(p, lr=1e-2)), id="Adagrad"),
    pytest.param(bnb_like_state, id="AdamW8bit-like"),
])
def test_any_optimizer_state_round_trips_through_safetensors_and_json(tmp_path, state_dict):
    original = state_dict()
    tensors, other = checkpoints.split_optimizer_state(original)
    checkpoints.save_file(tensors, str(tmp_path / "o.safetensors"))
    (tmp_path / "o.json").write_text(json.dumps(other))
    back = checkpoints.join_optimizer_state(load_file(str(tmp_path / "o.safetensors")),
                                            json.loads((tmp_path / "o.json").read_text()))
    assert back["param_groups"] == original["param_groups"]
    assert "betas" not in original["param_groups"][0] or isinstance(back["param_groups"][0]["betas"], tuple)
    assert back["state"].keys() == original["state"].keys()
    for index, state in original["state"].items():
        assert back["state"][index].keys() == state.keys()
        for name, value in state.items():
            restored = back["state"][index][name]
            if isinstance(value, torch.Tensor):
                assert value.dtype == restored.dtype and torch.equal(value, restored)
            else:
                assert type(value) is type(restored) and value == restored


def test_a_resumed_optimizer_continues_exactly_as_the_original(tmp_path):
    make = lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, betas=(0.8, 0.9))  # noqa: E731
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(4, 3))]
    b = [torch.nn.Parameter(a[0].detach().clone())]
    opt_a, opt_b = make(a), make(b)
    for params, opt in ((a, opt_a), (b, opt_b)):
        (params[0] ** 3).sum().backward()
        opt.step()
        opt.zero_grad()
    tensors, other = checkpoints.split_optimizer_state(opt_a.state_dict())
    checkpoints.save_file(tensors, str(tmp_path / "o.safetensors"))     # copies: state_dict() shares tensors
    opt_b = make(b)  # a fresh optimizer, as after a restart
    opt_b.load_state_dict(checkpoints.join_optimizer_state(load_file(str(tmp_path / "o.safetensors")),
                                                           json.loads(json.dumps(other))))
    for params, opt in ((a, opt_a), (b, opt_b)):
        (params[0] ** 3).sum().backward()
        opt.step()
    assert torch.equal(a[0], b[0])


# --- metrics.jsonl ---------------------------------------------------------------------------------

def write_records(path, steps):
    path.write_text("".join(json.dumps({"kind": "train", "step": s}) + "\n" for s in steps))


@pytest.mark.parametrize("fail_at", ["replace", "fsync"])
def test_a_crash_while_metrics_are_rewritten_loses_nothing(tmp_path, monkeypatch, fail_at):
    path = tmp_path / "metrics.jsonl"
    write_records(path, range(1, 9))
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.os, fail_at, crash)
    with pytest.raises(checkpoints.WriteFailed, match="no space left|the old file is untouched"):
        checkpoints.keep_metrics(path, 4, print)
    monkeypatch.undo()
    assert path.read_bytes() == before                                    # the whole history is still there
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
    assert [r["step"] for r in checkpoints.keep_metrics(path, 4, print)] == [1, 2, 3, 4]


def test_a_partial_last_line_is_dropped_with_a_note(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    write_records(path, range(1, 6))
    with open(path, "a") as f:
        f.write('{"kind": "train", "st')                                 # a crash mid-append
    kept = checkpoints.keep_metrics(path, 4, print)
    assert [r["step"] for r in kept] == [1, 2, 3, 4]
    assert "dropped 1 unreadable line(s) (6)" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


@pytest.mark.slow
def test_resuming_over_a_partial_line_and_resuming_a_finished_run(task, finished, copy, capsys):
    with open(copy / "metrics.jsonl", "a") as f:
        f.write('{"kind": "eval", "st')
    assert run(task, copy, "--resume", "auto") == 0                       # finished: nothing to train
    out = capsys.readouterr().out
    assert "dropped 1 unreadable line(s)" in out and "done: 4 of 4 steps" in out
    assert [r["step"] for r in metrics(copy, "eval")] == [4]              # not evaluated, nor logged, twice
    assert metrics(copy, "train") == metrics(finished, "train")


# --- the lock ----------------------------------------------------------------------------------------

def test_a_second_run_on_the_same_folder_is_refused_naming_the_holder(task, tmp_path, capsys):
    with checkpoints.lock(tmp_path, print):
        assert run(task, tmp_path) == 2
    lines = err_lines(capsys)
    assert lines == [f"error: {tmp_path} is in use by another run (pid {os.getpid()} holds {tmp_path / '.lock'}). "
                     "Wait for it to finish, or choose another --output-dir"]
    assert sorted(os.listdir(tmp_path)) == [".lock"]                      # nothing else touched


def test_a_lock_left_by_a_dead_run_is_taken_over_with_a_note(tmp_path, capsys):
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".lock").write_text(child.stdout)                         # a pid, but no flock: it died
    with checkpoints.lock(tmp_path, print):
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    assert f"took over {tmp_path / '.lock'} from pid {child.stdout.strip()}" in capsys.readouterr().out
    assert (tmp_path / ".lock").read_text() == ""                          # released


# --- signals and failures while saving ---------------------------------------------------------------

@pytest.mark.slow
def test_a_signal_during_a_save_is_named_by_the_checkpoint_written_after_it(task, tmp_path, monkeypatch, capsys):
    save, saved = checkpoints.save, []

    def signal_while_saving(out, model, optimizer, progress, *args):
        saved.append(progress["step"])
        if progress["step"] == 2:
            signal.raise_signal(signal.SIGTERM)  # between the "save?" and the "stop?" of step 2
        return save(out, model, optimizer, progress, *args)

    monkeypatch.setattr(checkpoints, "save", signal_while_saving)
    assert run(task, tmp_path) == 128 + signal.SIGTERM
    assert saved == [1, 2, 3]                                             # step 3 ran, was saved, then stop
    assert f"checkpoint saved in {tmp_path / 'checkpoint-3'}" in capsys.readouterr().err


@pytest.mark.slow
def test_a_signal_after_the_loop_is_ignored(task, tmp_path, monkeypatch):
    save_final_adapter = checkpoints.save_final_adapter

    def signal_then_save(model, out, base=None):
        signal.raise_signal(signal.SIGINT)
        save_final_adapter(model, out, base)

    monkeypatch.setattr(checkpoints, "save_final_adapter", signal_then_save)
    assert run(task, tmp_path, "--max-steps", "1") == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_full_disk_while_saving_is_one_line_and_the_folder_stays_resumable(task, finished, tmp_path,
                                                                            monkeypatch, capsys):
    save_file, calls = checkpoints.save_file, []

    def full_at_step_3(tensors, path, *args, **kwargs):
        calls.append(path)
        if ".tmp-checkpoint-3" in path and path.endswith("optimizer.safetensors"):  # as safetensors says it
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_file", full_at_step_3)
    assert run(task, tmp_path) == 1
    lines = err_lines(capsys)
    assert lines == [f"error: cannot write checkpoint-3 in {tmp_path}: no space left on the device. Earlier "
                     "checkpoints are intact (newest: checkpoint-2). Free space or fix the folder, then continue "
                     "with --resume auto"]
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name) == ["checkpoint-1", "checkpoint-2"]
    monkeypatch.undo()
    assert run(task, tmp_path, "--resume", "auto") == 0
    assert_same_tensors(adapter(tmp_path / "adapter"), adapter(finished / "adapter"))


@pytest.mark.slow
def test_leftovers_of_interrupted_saves_are_removed_at_start(task, copy, capsys):
    shutil.copytree(copy / "checkpoint-2", copy / ".tmp-checkpoint-5")
    (copy / "adapter" / "adapter_model.safetensors.tmp").write_bytes(b"half")
    (copy / "metrics.jsonl.tmp").write_text("{")
    assert run(task, copy, "--resume", "auto") == 0
    assert "removed what an interrupted run left: .tmp-checkpoint-5, adapter_model.safetensors.tmp, " \
           "metrics.jsonl.tmp" in capsys.readouterr().out
    assert not [p for p in copy.rglob("*") if ".tmp" in p.name]


@pytest.mark.slow
def test_the_best_validation_checkpoint_is_kept_and_named(task, tmp_path, monkeypatch, capsys):
    evaluate, f1s = train.evaluate, iter([0.2, 0.9, 0.5, 0.4])

    def scripted_f1(*args, **kwargs):
        return dict(evaluate(*args, **kwargs), f1=next(f1s))

    monkeypatch.setattr(train, "evaluate", scripted_f1)
    assert run(task, tmp_path, "--eval-every", "1", "--keep-last", "1", "--save-every", "0") == 0
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["progress"]["best"] == {"step": 2, "f1": 0.9}
    assert f"best validation F1 0.9000 at step 2: {tmp_path / 'checkpoint-2'}" in capsys.readouterr().out


# --- child processes: start-up, and stdout/stderr closed under a Ctrl-C --------------------------------

def child(task, out, *extra, **popen):
    argv = [sys.executable, "train.py", "--model", "tiny", "--data", str(task), "--output-dir", str(out),
            "--max-seq-len", "256", "--micro-batch-size", "2", "--grad-accum", "1", "--lr", "3e-3",
            "--warmup-steps", "1", "--dropout", "0.05", "--save-every", "1", "--keep-last", "0", *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    return subprocess.Popen(argv, cwd=ROOT, env=env, **popen)


def wait_for(predicate, what, limit=300):
    deadline = time.monotonic() + limit  # a bound on waiting, not a timing assertion
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigint_at_start_up_is_one_line_and_writes_nothing_half(task, tmp_path):
    proc = child(task, tmp_path, "--epochs", "1", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "config:\n"                          # main() has started
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT
    assert err.strip().splitlines()[-1] == "SIGINT: stopped while starting, before any training step", err
    assert "Traceback" not in err
    assert not checkpoints.list_checkpoints(tmp_path) and not list(tmp_path.glob(".tmp-*"))
    assert not (tmp_path / ".lock").exists() or (tmp_path / ".lock").read_text() == ""   # taken or not: released


@pytest.mark.slow
def test_ctrl_c_with_stdout_and_stderr_closed_still_saves_and_resumes_exactly(task, tmp_path):
    # the reference: 6 steps straight (of a 40-step schedule)
    assert run(task, tmp_path / "straight", "--epochs", "10", "--max-steps", "6") == 0
    # `train.py 2>&1 | tee log` and Ctrl-C: tee dies first, then train.py gets SIGINT
    out = tmp_path / "piped"
    proc = child(task, out, "--epochs", "10", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 1,
             "the first step")
    proc.stdout.close()
    proc.stderr.close()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 128 + signal.SIGINT                   # not 1 (BrokenPipeError), not 120
    stopped_at = checkpoints.list_checkpoints(out)[-1]
    step = checkpoints.read(stopped_at).step
    assert 1 <= step < 6, "the child must be stopped by the signal, not by running out of steps"
    assert run(task, out, "--epochs", "10", "--max-steps", "6", "--resume", "auto") == 0
    assert_same_tensors(adapter(out / "adapter"), adapter(tmp_path / "straight" / "adapter"))
    assert_same_tensors(load_file(str(out / "checkpoint-6" / "optimizer.safetensors")),
                        load_file(str(tmp_path / "straight" / "checkpoint-6" / "optimizer.safetensors")))


def test_a_setting_added_after_the_checkpoint_counts_as_its_default():
    """A checkpoint written before --base existed resumes a run at the default (nf4), and is refused,
    by name, for another value; a setting it does hold is compared as saved."""
    state = {"run": {"config": {"rank": 16}}, "progress": {"step": 3}}
    old = checkpoints.Checkpoint(folder="checkpoint-3", state=state, optimizer={}, rng={})
    checkpoints.same_run(old, {"rank": 16, "base": "nf4"})
    with pytest.raises(checkpoints.Refused, match="--base: 'nf4' in the checkpoint, 'mxfp4' now"):
        checkpoints.same_run(old, {"rank": 16, "base": "mxfp4"})
    with pytest.raises(checkpoints.Refused, match="--rank: 16 in the checkpoint, 8 now"):
        checkpoints.same_run(old, {"rank": 8, "base": "nf4"})
