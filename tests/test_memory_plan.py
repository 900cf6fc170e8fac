"""The memory plan (memory_plan.py) and the fast-path gate (model/fast/gate.py), on the CPU."""
import pytest

from memory_plan import GIB, need, plan
from model import GptOssConfig
from model.fast import gate
from model.fast.gate import FastPaths

CARD = 15.58                       # an RTX 4070 Ti SUPER's usable GiB
ATTENTION_R16 = 7_962_624          # LoRA r16 on q, k, v, o of gpt-oss-20b
EXPERTS_R16 = 184_909_824          # ... and on every expert matrix


@pytest.fixture(scope="module")
def gpt_oss_20b():
    return GptOssConfig.from_name("gpt-oss-20b")


def test_the_nf4_model_is_counted_from_its_shapes(gpt_oss_20b):
    n = need(gpt_oss_20b, ATTENTION_R16, "adamw", 4096, graphs=True)
    # measured after loading on an H100: 10.65 GiB with the embedding on the CPU (docs/BENCHMARKS.md)
    assert 10.4 < n.model / GIB < 10.8
    assert n.embedding == 201_088 * 2880 * 2
    assert n.adapter == ATTENTION_R16 * 4 * 3 and n.optimizer == ATTENTION_R16 * 8


def test_the_default_run_fits_a_16_gb_card_as_it_is(gpt_oss_20b):
    on_cpu, optim, graphs, lines = plan(gpt_oss_20b, ATTENTION_R16, 4096, True, CARD, None, "auto")
    assert (on_cpu, optim, graphs) == (False, "adamw", True)
    assert lines[0].startswith("memory plan: 13.25 GiB of 15.58 GiB usable")   # 13.11 GiB measured


def test_choices_are_given_up_in_order_only_where_needed(gpt_oss_20b):
    # expert LoRA: the embedding moves first, then the graphs' gradient buffers go, then 8-bit AdamW
    on_cpu, optim, graphs, _ = plan(gpt_oss_20b, EXPERTS_R16, 4096, True, CARD, None, "auto")
    assert (on_cpu, optim, graphs) == (True, "adamw8bit", False)
    # a roomy card keeps everything
    assert plan(gpt_oss_20b, EXPERTS_R16, 4096, True, 80, None, "auto")[:3] == (False, "adamw", True)
    # what the user fixed stays fixed, even where it then does not fit
    with pytest.raises(ValueError, match="needs about .* GiB of GPU memory at the least"):
        plan(gpt_oss_20b, EXPERTS_R16, 4096, True, CARD, False, "adamw")


def test_the_plain_path_counts_its_dequantised_experts_and_score_matrix(gpt_oss_20b):
    plain = FastPaths()
    n = need(gpt_oss_20b, ATTENTION_R16, "adamw", 4096, graphs=False, fast=plain)
    fast = need(gpt_oss_20b, ATTENTION_R16, "adamw", 4096, graphs=False)
    assert n.activations - fast.activations == 32 * 2880 * 3 * 2880 * 2 + 64 * 4096 ** 2 * 10
    with pytest.raises(ValueError, match="Lower --max-seq-len"):
        plan(gpt_oss_20b, ATTENTION_R16, 4096, False, CARD, None, "auto", plain)
    assert plan(gpt_oss_20b, ATTENTION_R16, 1024, False, CARD, None, "auto", plain)[1] == "adamw"


def test_the_gate_on_the_cpu_and_when_forced_plain(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = gate.decide("cpu")
    assert not any((cpu.nf4_kernels, cpu.grouped_mm, cpu.flex_attention, cpu.compiled, cpu.cuda_graphs))
    assert "plain path" in cpu.describe()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert gate.decide("cpu").nf4_kernels                 # the tests run the kernels in the interpreter
    plain = gate.decide("cpu", "plain")
    assert not plain.nf4_kernels and "--kernels plain" in plain.describe()
    with pytest.raises(ValueError, match="kernels must be auto or plain"):
        gate.decide("cpu", "fast")
