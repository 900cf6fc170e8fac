"""The memory plan (memory_plan.py) and the fast-path gate (model/fast/gate.py), on the CPU."""
import pytest

from lora.inject import count_trainable
from memory_plan import (EXPERT_BYTES_PER_ROW_INTER, GIB, HEADROOM, NF4_BYTES_PER_WEIGHT, activations,
                         dense_experts_bytes, kept_block_bytes, need, plan)
from model.fast.tiled_moe import TILE_TOKENS
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



HOPPER = FastPaths(nf4_kernels=True, grouped_mm=True, flex_attention=True, compiled=True, cuda_graphs=True)


def test_spare_memory_buys_the_experts_dense_path_first_where_the_gpu_runs_it(gpt_oss_20b):
    """The dense path (a layer's gate_up in bf16 and the gathered rows) is chosen where the spare memory
    holds it twice, the training step's copy and an evaluation's, before any kept block; counted as
    fixed where asked for; never where torch._grouped_mm is no single kernel, which the plan says."""
    cost = dense_experts_bytes(gpt_oss_20b, 4096)
    assert cost == 32 * 2880 * 5760 * 2 + 4096 * 4 * 2880 * 2
    roomy = plan(gpt_oss_20b, ATTENTION_R16, 4096, True, 80, None, "auto", HOPPER, kept=None, dense=None)
    assert roomy.dense and roomy.kept == 24 and "dequantised a layer at a time for torch._grouped_mm (1.08 GiB" \
        in roomy.lines[0]
    # the boundary: just enough spare for two copies after an evaluation's worth, then just short of it
    n = need(gpt_oss_20b, ATTENTION_R16, "adamw", 4096, True, HOPPER)
    enough = (n.total(True) + n.activations - 24 * 4096 * 2880 * 2 + 2 * cost) / GIB / HEADROOM
    assert plan(gpt_oss_20b, ATTENTION_R16, 4096, True, enough + 1e-3, None, "auto", HOPPER, dense=None).dense
    short = plan(gpt_oss_20b, ATTENTION_R16, 4096, True, enough - 1e-3, None, "auto", HOPPER, kept=None, dense=None)
    assert not short.dense and "dequantised" not in short.lines[0]
    # asked for, it is counted like a kept block, in the total
    def total(p):
        return float(p.lines[0].split("memory plan: ")[1].split(" GiB")[0])
    fixed = plan(gpt_oss_20b, ATTENTION_R16, 4096, True, CARD, None, "auto", HOPPER, dense=True)
    unasked = plan(gpt_oss_20b, ATTENTION_R16, 4096, True, CARD, None, "auto", HOPPER)
    assert fixed.dense and not unasked.dense and abs(total(fixed) - total(unasked) - cost / GIB) < 0.01
    # the user's card (sm_89): torch._grouped_mm loops over the experts there, so never, and said so
    ada = FastPaths(nf4_kernels=True, flex_attention=True, compiled=True, cuda_graphs=True)
    assert not plan(gpt_oss_20b, ATTENTION_R16, 2048, True, 80, None, "auto", ada, kept=None, dense=None).dense
    asked = plan(gpt_oss_20b, ATTENTION_R16, 2048, True, CARD, None, "auto", ada, dense=True)
    assert not asked.dense and asked.lines[-1] == ("  --dense-experts: not here (torch._grouped_mm is a single "
                                                   "kernel on sm_90/sm_100 only); the fused kernels run")

def test_the_default_run_fits_a_16_gb_card_as_it_is(gpt_oss_20b):
    chosen = plan(gpt_oss_20b, ATTENTION_R16, 4096, True, CARD, None, "auto", offload=None, lm_head_nf4=None)
    assert chosen[:3] == (False, "adamw", True) and not chosen.offload and not chosen.lm_head_nf4
    assert chosen.lines[0].startswith("memory plan: 13.23 GiB of 15.58 GiB usable")   # 13.11 GiB measured
    assert chosen.tile == TILE_TOKENS and "at a time" not in chosen.lines[0]


def test_choices_are_given_up_in_order_only_where_needed(gpt_oss_20b):
    # expert LoRA: the embedding moves first, then the graphs' gradient buffers go, then 8-bit AdamW;
    # offloaded checkpoints come last (measured: 13.75 GiB, docs/BENCHMARKS.md)
    chosen = plan(gpt_oss_20b, EXPERTS_R16, 4096, True, CARD, None, "auto", offload=None, lm_head_nf4=None)
    assert chosen[:3] == (True, "adamw8bit", False) and not chosen.offload and not chosen.lm_head_nf4
    # a roomy card keeps everything
    assert plan(gpt_oss_20b, EXPERTS_R16, 4096, True, 80, None, "auto")[:3] == (False, "adamw", True)
    # what the user fixed stays fixed, even where it then does not fit
    with pytest.raises(ValueError, match="needs about .* GiB of GPU memory at the least"):
        plan(gpt_oss_20b, EXPERTS_R16, 4096, True, CARD, False, "adamw")


def test_spare_memory_keeps_blocks_from_recomputation_after_an_evaluations_worth(gpt_oss_20b):
    base = plan(gpt_oss_20b, ATTENTION_R16, 4096, True, CARD, None, "auto")          # nothing kept: kept=0
    # the default run on the 16 GB card: what is left after an evaluation's worth holds no block
    auto = plan(gpt_oss_20b, ATTENTION_R16, 4096, True, CARD, None, "auto", kept=None)
    assert auto.kept == 0 and auto.lines == base.lines
    # 2,048 tokens there: some blocks, and the estimate with them still within the headroom
    short = plan(gpt_oss_20b, ATTENTION_R16, 2048, True, CARD, None, "auto", kept=None)
    n = need(gpt_oss_20b, ATTENTION_R16, "adamw", 2048, graphs=True)
    per_block = kept_block_bytes(gpt_oss_20b, 2048)
    evaluation = n.activations - 24 * 2048 * 2880 * 2
    total = n.total(True) + short.kept * per_block
    assert 0 < short.kept < 24 and total + evaluation <= CARD * GIB * HEADROOM < total + evaluation + per_block
    assert f"the last {short.kept} of 24 blocks keep their activations" in short.lines[0]
    # an 80 GB card keeps them all, with expert adapters too, which hold more a block
    assert plan(gpt_oss_20b, ATTENTION_R16, 4096, True, 80, None, "auto", kept=None).kept == 24
    assert kept_block_bytes(gpt_oss_20b, 4096, expert_adapters=True) > kept_block_bytes(gpt_oss_20b, 4096)
    assert plan(gpt_oss_20b, EXPERTS_R16, 4096, True, 80, None, "auto", kept=None, expert_adapters=True).kept == 24
    # a plain path keeps more than was measured (eager attention its score matrices): none unless asked
    plain = FastPaths(nf4_kernels=True, grouped_mm=True, flex_attention=False, compiled=True, cuda_graphs=True)
    assert plan(gpt_oss_20b, ATTENTION_R16, 2048, True, 80, None, "auto", plain, kept=None).kept == 0
    assert plan(gpt_oss_20b, ATTENTION_R16, 2048, True, 80, None, "auto", plain, kept=3).kept == 3
    # offloaded inputs mean memory is short: none kept unless asked
    assert plan(gpt_oss_20b, ATTENTION_R16, 65536, True, 80, None, "auto", offload=True, kept=None).kept == 0
    # a count the user gave is counted like the rest: on the 16 GB card at 4,096 tokens, 4 blocks move
    # the embedding to the CPU; all 24 fit no way, and the message says what they take
    fixed = plan(gpt_oss_20b, ATTENTION_R16, 4096, True, CARD, None, "auto", kept=4)
    assert fixed.kept == 4 and fixed.embedding_on_cpu and "the last 4 of 24" in fixed.lines[0]
    with pytest.raises(ValueError, match="needs about .* --kept-blocks 24 alone takes 9.0 GiB; with --kept-blocks 0: "
                                         "It fits with --embedding-on-cpu"):
        plan(gpt_oss_20b, ATTENTION_R16, 4096, True, CARD, None, "auto", kept=24, offload=None, lm_head_nf4=None)


def test_the_plain_path_counts_its_dequantised_experts_and_score_matrix(gpt_oss_20b):
    plain = FastPaths()
    n = need(gpt_oss_20b, ATTENTION_R16, "adamw", 4096, graphs=False, fast=plain)
    fast = need(gpt_oss_20b, ATTENTION_R16, "adamw", 4096, graphs=False)
    assert n.activations - fast.activations == 32 * 2880 * 3 * 2880 * 2 + 64 * 4096 ** 2 * 10
    with pytest.raises(ValueError, match="it fits up to --max-seq-len"):
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


def test_the_start_line_names_the_experts_kernels_of_the_runs_base(monkeypatch):
    """One decision per device serves both bases; the printed line names the kernels that will run."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    interpreted = gate.decide("cpu")
    monkeypatch.setattr(gate.torch.cuda, "get_device_capability", lambda index: (9, 0))
    hopper = gate._cuda_paths.__wrapped__(0)     # what an H100 gets, built here without the cache
    assert interpreted.nf4_kernels and hopper.nf4_kernels
    for paths, where in ((interpreted, "in Triton's interpreter (TRITON_INTERPRET=1)"), (hopper, "on sm_90")):
        nf4, mxfp4 = paths.describe(), paths.describe("mxfp4")
        assert f"  experts      NF4 Triton kernels (model/fast/nf4_gemm.py) {where}\n" in nf4
        assert f"  experts      MXFP4 Triton kernels (model/fast/mxfp4_gemm.py) {where}\n" in mxfp4
        assert "NF4" not in mxfp4 and "MXFP4" not in nf4
        assert paths.describe("nf4") == nf4                     # NF4 is the default base
        assert nf4.splitlines()[1:] == mxfp4.splitlines()[1:]   # only the experts' line differs
    # where the kernels do not run, the plain line is the same for both bases
    monkeypatch.delenv("TRITON_INTERPRET")
    assert gate.decide("cpu").describe("mxfp4") == gate.decide("cpu").describe("nf4")
    assert "plain path: dequantise, then multiply" in gate.decide("cpu").describe("mxfp4")
    with pytest.raises(ValueError, match="base must be one of nf4, mxfp4, not 'fp4'"):
        hopper.describe("fp4")


# ---------------------------------------------------------------- the sequence length, offloading, 120b
@pytest.fixture(scope="module")
def gpt_oss_120b():
    return GptOssConfig.from_name("gpt-oss-120b")


def test_activations_grow_with_the_sequence_and_tiles_bound_the_experts(gpt_oss_20b):
    lengths = [2048, 4096, 8192, 32768, 131072]
    for offload in (False, True):
        act = [activations(gpt_oss_20b, t, offload)[0] for t in lengths]
        assert act == sorted(act) and len(set(act)) == len(act)
    # the checkpointed inputs alone are 24 x t x 2880 x 2 bytes; offloaded, they go to the host
    inputs = 24 * 131072 * 2880 * 2
    on, off = activations(gpt_oss_20b, 131072, True), activations(gpt_oss_20b, 131072, False)
    assert off[0] - on[0] == inputs - 2 * 131072 * 2880 * 2 and on[1] == inputs and off[1] == 0
    # above the tile the experts' share stops growing: tiles of 8,192 against the whole sequence
    whole = activations(gpt_oss_20b, 131072, tile=131072)[0]
    assert whole - off[0] == pytest.approx(EXPERT_BYTES_PER_ROW_INTER * 2880 * 4 * (131072 - TILE_TOKENS))
    assert activations(gpt_oss_20b, 4096, tile=131072) == activations(gpt_oss_20b, 4096)


def test_the_full_context_needs_less_offloaded_and_fits_a_24_gb_card_only_so(gpt_oss_20b):
    kept = need(gpt_oss_20b, ATTENTION_R16, "adamw", 131072, graphs=False)
    offloaded = need(gpt_oss_20b, ATTENTION_R16, "adamw", 131072, graphs=False, offload=True)
    assert offloaded.total(True) < kept.total(True) - 15 * GIB
    chosen = plan(gpt_oss_20b, ATTENTION_R16, 131072, True, 23.5, None, "auto", offload=None, lm_head_nf4=None)
    assert chosen.offload and not chosen.graphs and "pinned host memory" in "\n".join(chosen.lines)
    assert chosen.embedding_on_cpu          # with offloading the embedding leaves too (as measured: 20.19 GiB)
    assert not plan(gpt_oss_20b, ATTENTION_R16, 131072, True, 79, None, "auto", offload=None).offload
    assert not plan(gpt_oss_20b, ATTENTION_R16, 4096, True, 23.5, None, "auto", offload=None).offload


def test_120b_attention_lora_fits_80_gb_and_at_the_full_context_with_offloading(gpt_oss_120b, gpt_oss_20b):
    n = need(gpt_oss_120b, count_trainable(gpt_oss_120b, rank=16), "adamw", 4096, graphs=True)
    # 36 layers x 128 experts x (2880 x 5760 + 2880 x 2880) weights in NF4, about 54 GiB
    experts = 36 * 128 * 3 * 2880 * 2880
    assert 0.99 < n.model / (experts * NF4_BYTES_PER_WEIGHT) < 1.03
    assert n.loading > 3 * need(gpt_oss_20b, ATTENTION_R16, "adamw", 4096, graphs=True).loading
    card = 79.1                              # an 80 GB H100's memory
    trainable = count_trainable(gpt_oss_120b, rank=16)
    short = plan(gpt_oss_120b, trainable, 4096, True, card, None, "auto", offload=None, lm_head_nf4=None)
    assert not short.offload and not short.lm_head_nf4
    full = plan(gpt_oss_120b, trainable, 131072, True, card, None, "auto", offload=None, lm_head_nf4=None)
    assert full.offload and full.optim == "adamw"
    with pytest.raises(ValueError, match="at the least"):   # the full context kept on the GPU does not fit
        plan(gpt_oss_120b, trainable, 131072, True, card, None, "auto", offload=False, lm_head_nf4=False)


def test_long_rows_may_take_the_small_tile_and_65k_tokens_need_a_higher_headroom_on_the_16_gb_card(gpt_oss_20b):
    """At 65,536 tokens under the 15.58 GiB cap train.py peaked at 14.40 GiB allocated, 14.69 reserved,
    with every saving but 8-bit AdamW and the experts 2,048 tokens at a time; at 61,142 tokens, the
    plan's own choice, 14.09 allocated but 15.30 reserved (docs/BENCHMARKS.md). So the default headroom
    refuses 65,536, naming the flags, the length that fits and the headroom that would take it; at
    --memory-headroom 0.95 the plan is the measured run's. The estimate is within 10% above the peak."""
    estimate = need(gpt_oss_20b, ATTENTION_R16, "adamw", 65536, False, None, True, True, tile=2048).total(False)
    assert 1.0 < estimate / (14.40 * GIB) < 1.1
    with pytest.raises(ValueError, match="--expert-tile 2048 it fits up to --max-seq-len 6.*--memory-headroom 0.94"):
        plan(gpt_oss_20b, ATTENTION_R16, 65536, True, CARD, None, "auto", offload=None, lm_head_nf4=None)
    measured = plan(gpt_oss_20b, ATTENTION_R16, 65536, True, CARD, None, "auto", offload=None, lm_head_nf4=None,
                    headroom=0.95)
    assert (measured.embedding_on_cpu, measured.offload, measured.lm_head_nf4, measured.optim, measured.graphs,
            measured.tile) == (True, True, True, "adamw", False, 2048)
    # the small tile where it is all that is missing; never below the default tile's length
    tight = need(gpt_oss_20b, ATTENTION_R16, "adamw", 16384, False, tile=2048).total(True) / GIB / HEADROOM
    chosen = plan(gpt_oss_20b, ATTENTION_R16, 16384, False, tight + 0.01, False, "adamw", offload=False,
                  lm_head_nf4=False)
    assert chosen.tile == 2048 and "experts 2048 tokens at a time" in chosen.lines[0]
    assert plan(gpt_oss_20b, ATTENTION_R16, 8192, False, 80, None, "auto").tile == TILE_TOKENS


def test_too_small_a_card_is_told_the_flags_and_the_length_that_fit(gpt_oss_20b, gpt_oss_120b):
    with pytest.raises(ValueError) as e:
        plan(gpt_oss_20b, ATTENTION_R16, 131072, True, 14.0, None, "auto", offload=None, lm_head_nf4=None)
    message = str(e.value)
    assert "--offload-activations" in message and "--embedding-on-cpu" in message
    longest = int(message.split("fits up to --max-seq-len ")[1].split()[0])
    assert 0 < longest < 131072
    assert plan(gpt_oss_20b, ATTENTION_R16, longest, True, 14.0, True, "adamw8bit", offload=True, lm_head_nf4=True)
    with pytest.raises(ValueError, match="Even the model alone does not fit"):
        plan(gpt_oss_120b, ATTENTION_R16, 4096, True, 24, None, "auto", offload=None, lm_head_nf4=None)


def test_the_headroom_option_defaults_to_the_plans_own():
    from train_config import TrainConfig
    assert TrainConfig().memory_headroom == HEADROOM


def test_train_pys_plan_on_a_16_gb_gpu_takes_the_headroom_and_flags_no_checkpointing(gpt_oss_20b, monkeypatch, capsys):
    """memory_plan.fit as train.py calls it on a GPU (the GPU's queries stood in for on the CPU): the
    headroom reaches the plan (65,536 tokens refused by default, taken at 0.95), and a run without
    gradient checkpointing is told that the estimate does not cover it."""
    import torch
    import memory_plan
    from train_config import TrainConfig, with_defaults
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(gate, "bf16_problem", lambda device: None)
    hopper = FastPaths(nf4_kernels=True, grouped_mm=True, flex_attention=True, compiled=True, cuda_graphs=True,
                       capability=(9, 0))
    monkeypatch.setattr(gate, "decide", lambda device, kernels="auto": hopper)
    monkeypatch.setattr(memory_plan, "cap_gpu_memory", lambda device: CARD)
    monkeypatch.setenv(memory_plan.CAP_VARIABLE, str(CARD))
    with pytest.raises(ValueError, match="--memory-headroom 0.94"):
        memory_plan.fit(TrainConfig(max_seq_len=65536), gpt_oss_20b)
    config = TrainConfig(max_seq_len=65536, memory_headroom=0.95)
    memory_plan.fit(config, gpt_oss_20b)
    assert config.offload_activations and config.lm_head_nf4 and config.embedding_on_cpu
    assert memory_plan.NOT_CHECKPOINTED not in capsys.readouterr().out
    memory_plan.fit(with_defaults(TrainConfig(gradient_checkpointing=False)), gpt_oss_20b)
    assert memory_plan.NOT_CHECKPOINTED in capsys.readouterr().out
    # the kept blocks: the plan's count where none was asked for, none without checkpointing
    config = with_defaults(TrainConfig(max_seq_len=2048))
    memory_plan.fit(config, gpt_oss_20b)
    assert 0 < config.kept_blocks < 24 and "keep their activations" in capsys.readouterr().out
    config = with_defaults(TrainConfig(max_seq_len=2048, kept_blocks=1))
    memory_plan.fit(config, gpt_oss_20b)
    assert config.kept_blocks == 1
    config = with_defaults(TrainConfig(max_seq_len=2048, gradient_checkpointing=False))
    memory_plan.fit(config, gpt_oss_20b)
    assert config.kept_blocks == 0
