"""NF4 against MXFP4 experts (--base nf4 / --base mxfp4) on a GPU: gpt-oss-20b's shapes, random weights.

No checkpoint is read: each model is built on the GPU by load_model's own steps (its skeleton, then
each hub tensor placed), with random tensors in place of a file. Both get the same random MXFP4
expert codes (uniform codes, block scales 2^-8..2^-5, as bench/make_checkpoint.py writes them): NF4
re-quantises them as loading openai/gpt-oss-20b does, MXFP4 keeps them. Attention and the rest are the
same bf16 values (attention in NF4 both ways).

Prints one JSON line each, and writes them all to --out (a JSON list):
  - the MXFP4 kernels against dequantise-then-multiply on this GPU, layer 0's gate_up_proj and down_proj,
    2,048 tokens routed over the 32 experts (one expert empty): max abs diff, forward and input gradient,
    and whether the identity product gives the dequantised weights bit for bit;
  - per base: the loaded model's memory, then the training step (LoRA r=16 on q/k/v/o, gradient
    checkpointing, micro-batch 1, eager: no CUDA graphs) at 2,048 and 4,096 tokens: tokens/s (median of
    --steps after a warm-up) and peak allocated memory.
About two minutes on an H200 (each base: build ~20 s, Triton compiles, then the steps).
    python3 bench/mxfp4_vs_nf4.py --out FILE
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import step_time, train_lora  # noqa: E402  (bench/bench.py, beside this script)
from model import GptOssConfig  # noqa: E402
from model.fast import gate, mxfp4_gemm  # noqa: E402
from model.gpt_oss import hub_shapes  # noqa: E402
from model.moe import EXPERT_MATRICES  # noqa: E402
from model.weights import loading  # noqa: E402
from model.weights.mxfp4 import MXFP4Tensor, dequantize_mxfp4, mxfp4_bytes  # noqa: E402
from model.weights.nf4 import NF4Linear, nf4_bytes  # noqa: E402

GiB = 2 ** 30
DEVICE = "cuda"


def random_codes(shape, g):
    """Blocks and scales of an (experts, in, out) expert matrix, in the hub's layout, on the GPU."""
    e, n_in, n_out = shape
    blocks = torch.randint(0, 256, (e, n_out, n_in // 32, 16), dtype=torch.uint8, device=DEVICE, generator=g)
    scales = torch.randint(119, 123, (e, n_out, n_in // 32), dtype=torch.uint8, device=DEVICE, generator=g)
    return blocks, scales


def build(config, base: str, seed: int = 0):
    """gpt-oss with random weights on the GPU, attention in NF4 and the experts in `base`."""
    model = loading._skeleton(config, "nf4", base, False, "auto", None)
    g = torch.Generator(DEVICE).manual_seed(seed)
    for name, shape in hub_shapes(config).items():
        path, _, attr = name.rpartition(".")
        if attr in EXPERT_MATRICES:
            blocks, scales = random_codes(shape, g)
            if base == "mxfp4":
                model.get_submodule(path).set_mxfp4(attr, blocks, scales, torch.bfloat16)
            else:   # as load_model reads an MXFP4 checkpoint into NF4
                dense = dequantize_mxfp4(blocks, scales, torch.bfloat16).transpose(1, 2).contiguous()
                model.get_submodule(path).set_weight(attr, dense, torch.bfloat16)
            continue
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16, device=DEVICE)
        else:
            t = (torch.randn(shape, device=DEVICE, generator=g) * 0.02).to(torch.bfloat16)
        loading._place(model, name, t, torch.bfloat16)
    return model


def kernel_check(config, rows: int = 2048) -> dict:
    """The MXFP4 kernels against the dequantised weights, bf16 on this GPU (fp32 reference products)."""
    g = torch.Generator(DEVICE).manual_seed(1)
    e, k = config.num_local_experts, config.num_experts_per_tok
    out = {"check": "mxfp4 kernels vs dequantised dense", "gpu": torch.cuda.get_device_name()}
    for name, shape in hub_shapes(config).items():
        if not name.startswith("model.layers.0.mlp.experts.") or name.rpartition(".")[2] not in EXPERT_MATRICES:
            continue
        w = MXFP4Tensor(*random_codes(shape, g))
        dense = w.dequantize()                                           # (experts, in, out) bf16
        choice = torch.randint(0, e - 1, (rows * k,), device=DEVICE, generator=g)
        choice[choice >= 5] += 1                                         # expert 5 gets no row
        counts = torch.bincount(choice, minlength=e)                     # ragged, as routed
        offsets = counts.cumsum(0).to(torch.int32)
        n = int(offsets[-1])
        x = torch.randn(n, shape[1], device=DEVICE, generator=g).to(torch.bfloat16)
        dy = torch.randn(n, shape[2], device=DEVICE, generator=g).to(torch.bfloat16)
        expert = torch.repeat_interleave(torch.arange(e, device=DEVICE), counts)
        ref_y = torch.cat([x[expert == i].float() @ dense[i].float() for i in range(e)])
        ref_dx = torch.cat([dy[expert == i].float() @ dense[i].float().T for i in range(e)])
        y, dx = mxfp4_gemm.grouped_mm(x, w, offsets), mxfp4_gemm.grouped_mm_t(dy, w, offsets)
        # identity rows: each output is one weight, exactly (bf16 products summed in fp32)
        eye = torch.eye(shape[1], device=DEVICE, dtype=torch.bfloat16).repeat(2, 1)
        two = torch.zeros(e, dtype=torch.int32, device=DEVICE)
        two[0], two[1] = shape[1], shape[1]                              # experts 0 and 1, shape[1] rows each
        eye_y = mxfp4_gemm.grouped_mm(eye, w, two.cumsum(0).to(torch.int32))
        exact = torch.equal(eye_y, dense[:2].reshape(-1, shape[2]))
        short = name.rpartition(".")[2]
        out[short] = {"max_abs_diff_y": float((y.float() - ref_y).abs().max()),
                      "max_abs_ref_y": float(ref_y.abs().max()),
                      "max_abs_diff_dx": float((dx.float() - ref_dx).abs().max()),
                      "max_abs_ref_dx": float(ref_dx.abs().max()), "identity_bit_exact": exact}
    return out


def run_base(config, base: str, seqs, steps: int) -> list[dict]:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    model = build(config, base)
    torch.cuda.synchronize()
    loaded = {"base": base, "build_s": round(time.perf_counter() - t, 1),
              "loaded_GiB": round(torch.cuda.memory_allocated() / GiB, 2),
              "experts_GiB": round((mxfp4_bytes(model) if base == "mxfp4" else
                                    nf4_bytes(model) - _attention_nf4(model)) / GiB, 2)}
    print(json.dumps(loaded), flush=True)
    model.fast_paths = gate.decide(DEVICE)
    params, opt = train_lora(model)
    out = [loaded]
    for seq in seqs:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            dt, loss, _ = step_time(model, opt, seq, steps)
            r = {"base": base, "seq": seq, "step_s": round(dt, 3), "tok_s": round(seq / dt, 1),
                 "peak_GiB": round(torch.cuda.max_memory_allocated() / GiB, 2),
                 "reserved_GiB": round(torch.cuda.max_memory_reserved() / GiB, 2), "loss": round(loss, 3)}
        except torch.OutOfMemoryError as e:
            r = {"base": base, "seq": seq, "oom": True, "error": str(e).split(". ")[0]}
        print(json.dumps(r), flush=True)
        out.append(r)
    del model, params, opt
    return out


def _attention_nf4(model) -> int:
    """NF4 bytes outside the experts (the attention projections), so experts_GiB counts the experts only."""
    return sum(m.weight_nf4.nbytes() for m in model.modules() if isinstance(m, NF4Linear))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file for the results (a list of the lines printed)")
    p.add_argument("--preset", default="gpt-oss-20b")
    p.add_argument("--seqs", default="2048,4096")
    p.add_argument("--steps", type=int, default=3, help="timed steps per length, after one warm-up")
    args = p.parse_args()
    config = GptOssConfig.from_name(args.preset)
    seqs = [int(s) for s in args.seqs.split(",")]
    results = [kernel_check(config)]
    print(json.dumps(results[0]), flush=True)
    for base in ("nf4", "mxfp4"):
        results += run_base(config, base, seqs, args.steps)
        with open(args.out, "w") as f:       # after each base, so a cut-short run keeps what it measured
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
