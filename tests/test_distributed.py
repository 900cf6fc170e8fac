"""distributed.py and train.py under torchrun: 2 ranks (gloo, CPU) x accumulation 2 are the step of one
process x accumulation 4, and a checkpoint of the one resumes on the other.

The runs are subprocesses (torchrun is `python -m torch.distributed.run`), one thread each, on the tiny
model and data/synthetic.py's task: 24 examples, 2 x 4 a step, 3 steps.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import distributed
from data.synthetic import write_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_py(out, task, *extra, ranks=1):
    """train.py on the small task, in one process or under torchrun with `ranks` processes."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] \
        if ranks > 1 else [sys.executable]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    result = subprocess.run([*launch, "train.py", "--model", "tiny", "--data", task, "--output-dir", str(out),
                             "--max-seq-len", "256", "--micro-batch-size", "2", "--epochs", "1", "--lr", "3e-3",
                             "--warmup-steps", "1", "--dropout", "0", "--save-every", "1", *extra],
                            cwd=ROOT, capture_output=True, text=True, timeout=240,
                            env={**env, "OMP_NUM_THREADS": "1"})
    return result


def adapter(folder):
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def assert_close(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:  # float32 sums in another order (two ranks' halves, then their sum): ~1e-7
        assert a[key].dtype == torch.float32
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def train_losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"], r["target_tokens"]) for r in map(json.loads, f) if r["kind"] == "train"]


def evaluations(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "eval"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("task")
    write_synthetic(str(folder), n_train=24, n_val=4, seed=0)
    return str(folder)


@pytest.fixture(scope="module")
def one_process(task, tmp_path_factory):
    """python train.py --grad-accum 4: the run that 2 ranks x --grad-accum 2 must reproduce."""
    out = tmp_path_factory.mktemp("one")
    result = train_py(out, task, "--grad-accum", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_one_rank_world_passes_everything_through_untouched():
    world = distributed.World()
    batches, loss = [1, 2, 3, 4, 5], torch.tensor(2.5)
    assert world.main and world.share(batches) == batches
    assert world.sum_step([], loss) is loss and world.max(15) == 15 and world.from_rank0({"a": 1}) == {"a": 1}
    assert world.gather([0.5, 0.25]) == [[0.5, 0.25]]
    assert distributed.global_config({"grad_accum": 3, "rank": 8}, world) == {"grad_accum": 3, "rank": 8}
    assert distributed.global_config({"grad_accum": 3}, distributed.World(1, 4)) == {"grad_accum": 12}
    assert distributed.World(1, 2).share(batches) == [2, 4] and not distributed.World(1, 2).main


def test_no_torchrun_environment_means_no_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.start() == distributed.World()
    assert not torch.distributed.is_initialized()


def test_the_allocator_setting_is_in_place_before_the_process_group_starts(monkeypatch):
    """NCCL's start may touch CUDA, which reads PYTORCH_CUDA_ALLOC_CONF once: set it first."""
    import train
    seen = []

    def start():
        seen.append(os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
        raise SystemExit(3)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.setattr(train.distributed, "start", start)
    with pytest.raises(SystemExit):
        train.main(["--model", "tiny"])
    assert seen == ["expandable_segments:True"]


def test_the_allocator_setting_is_in_place_before_torch_is_imported():
    """Importing bitsandbytes (and model/) starts CUDA's allocator, which reads PYTORCH_CUDA_ALLOC_CONF
    then and never again: train.py must set it before its first import of torch. A fresh interpreter,
    the variable unset, records it at the moment torch's import begins."""
    import subprocess
    import sys
    probe = """
import os, sys
seen = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
        return None
sys.meta_path.insert(0, Watch())
import train
print(seen)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['expandable_segments:True']"


@pytest.mark.slow
def test_two_ranks_x_accumulation_2_equal_one_process_x_accumulation_4(task, one_process, tmp_path):
    result = train_py(tmp_path, task, "--grad-accum", "2", ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stdout.count("config:") == 1                           # rank 0 alone prints
    assert_close(adapter(tmp_path / "adapter"), adapter(one_process / "adapter"))
    # the same steps, the loss a mean over the whole step's answer tokens, logged once (by rank 0)
    two, one = train_losses(tmp_path), train_losses(one_process)
    assert [(s, n) for s, _, n in two] == [(s, n) for s, _, n in one] and len(one) == 3
    for (_, a, _), (_, b, _) in zip(two, one):
        assert a == pytest.approx(b, rel=1e-6)
    # evaluation sharded over the ranks and gathered: the whole split's metrics, as one process has them
    two, one = evaluations(tmp_path), evaluations(one_process)
    assert [(r["step"], r["n"], r["tp"], r["fp"], r["tn"], r["fn"]) for r in two] == \
        [(r["step"], r["n"], r["tp"], r["fp"], r["tn"], r["fn"]) for r in one] and one[-1]["n"] == 4
    for a, b in zip(two, one):
        assert a["label_mass"] == pytest.approx(b["label_mass"], rel=1e-4)
    state = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())
    assert (state["config"]["grad_accum"], state["config"]["world_size"]) == (4, 2)   # the global step
    assert (state["progress"]["epoch"], state["progress"]["batch"]) == (0, 12)        # global micro-batches
    assert (tmp_path / ".lock").read_text() == ""                       # taken by rank 0 and released


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_on_one_process_with_the_same_global_batch(task, one_process, tmp_path):
    result = train_py(tmp_path, task, "--grad-accum", "2", "--max-steps", "1", ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]
    # a mistake found by rank 0 (checkpoints there, no --resume): its message, and one line from rank 1
    mistake = train_py(tmp_path, task, "--grad-accum", "2", ranks=2)
    assert mistake.returncode != 0 and "already holds checkpoints (checkpoint-1)" in mistake.stderr
    assert "rank 1: rank 0 stopped while starting" in mistake.stderr and "[rank1]" not in mistake.stderr
    # another global batch is another run: refused, saying which setting differs
    refused = train_py(tmp_path, task, "--grad-accum", "2", "--resume", "auto")
    assert refused.returncode == 2 and "--grad-accum: 4 in the checkpoint, 2 now" in refused.stderr
    resumed = train_py(tmp_path, task, "--grad-accum", "4", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_close(adapter(tmp_path / "adapter"), adapter(one_process / "adapter"))
    assert [s for s, _, _ in train_losses(tmp_path)] == [1, 2, 3]
