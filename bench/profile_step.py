"""Where a training step's time and memory go: a torch.profiler table at one length, and the
forward/backward peaks (with the failing op's traceback) at a long one.
    python bench/profile_step.py --checkpoint /tmp/ck --seq 2048 --long 65536
    python bench/profile_step.py --checkpoint /tmp/ck --seq 2048 --graphs --dense-experts --kernels 40
"""
import argparse
import json
import os
import re
import sys
import time
import traceback

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import train_lora, train_step  # noqa: E402  (bench/bench.py, beside this script)
from model import load_model  # noqa: E402
from model.fast import gate  # noqa: E402
from model.fast.cuda_graph import GraphedStep  # noqa: E402

GiB = 2 ** 30


# Kernel names -> the parts of the step (issue 17's breakdown); the first pattern that matches wins.
PARTS = [
    ("nf4 experts y = x W (forward, recomputation; SwiGLU epilogue)", r"_grouped_mm_kernel"),
    ("nf4 experts dx = dy W^T (backward)", r"_grouped_mm_t_kernel"),
    ("one-kernel dequantisation (the dense path's experts; q/k/v/o)", r"_dequantize_kernel"),
    ("dense experts: bias, SwiGLU epilogue", r"_epilogue_kernel"),
    ("dense experts: torch._grouped_mm", r"GroupProblem|grouped_?gemm|GroupedGemm|grouped_mm"),
    ("attention (flex, forward and backward)", r"flex|triton_tem_fused|attention"),
    ("optimizer (AdamW)", r"adam|multi_tensor|foreach"),
    ("routing: sort, gather, permute", r"sort|radix|gather|index|scatter|cumsum|topk|bitonic"),
    ("other matrix products (q/k/v/o bf16 GEMM, bitsandbytes' scale decode, LoRA, router, lm_head)",
     r"gemm|cutlass|xmma|nvjet|sm90|sm80|ampere|hopper|kernel_nf4|dequantize|splitK|cublas"),
    ("loss (chunked cross-entropy)", r"softmax|log_softmax|nll|cross_entropy"),
    ("elementwise and reductions (norms, SwiGLU backward, rows' sums, rotary, residuals, casts)",
     r"triton_|_mlp_backward_kernel|_sum_rows_kernel|_rotary_kernel|elementwise|vectorized|reduce|copy|fill|Memcpy|"
     r"Memset|cat|mul|add"),
]


def part_of(kernel: str) -> str:
    """The part of the step a kernel's name belongs to: the first pattern of PARTS that matches it."""
    return next((name for name, pattern in PARTS if re.search(pattern, kernel, re.I)), "unmatched")


def breakdown(events, wall_ms, kernel_ms, config, seq):
    """GPU kernel time a step by part, against the floors of the NF4 expert products."""
    parts = {name: 0.0 for name, _ in PARTS} | {"unmatched": 0.0}
    for e in events:
        if e.device_type != DeviceType.CUDA:
            continue
        parts[part_of(e.key)] += e.self_device_time_total / 1e3
    # the experts' work: gate_up (h -> 2i) and down (i -> h) over seq x k rows; forward, recomputation
    # (gate_up only) and two transposed products: 5 products a step, as FLOPs at the GPU's bf16 peak
    h, i, k = config.hidden_size, config.intermediate_size, config.num_experts_per_tok
    # per layer, y: gate_up (h x 2i) twice and down (i x h) once; dx: one of each
    flop = config.num_hidden_layers * 2 * seq * k * h * i * (2 * 2 + 1 + 2 + 1)
    return {"seq": seq, "wall_ms": round(wall_ms, 1), "kernel_ms": round(kernel_ms, 1),
            "between_kernels_ms": round(wall_ms - kernel_ms, 1),
            "parts_ms": {n: round(v, 1) for n, v in parts.items()},
            "experts_flop": flop, "experts_ms_at_989_tflops": round(flop / 989e12 * 1e3, 1)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--long", type=int, default=0)
    p.add_argument("--embedding-device", default=None)
    p.add_argument("--kernels", type=int, default=0, help="also list this many kernels, the longest first")
    p.add_argument("--kept-blocks", type=int, default=0, help="blocks not checkpointed, as train.py's --kept-blocks")
    p.add_argument("--dense-experts", action="store_true", help="the experts' dense path (GptOss.dense_experts)")
    p.add_argument("--graphs", action="store_true", help="the step replayed as a CUDA graph, as bench.py --graphs "
                   "times it: its kernels back to back, where the eager step leaves the GPU idle between them")
    args = p.parse_args()
    model = load_model(args.checkpoint, quantize="nf4", device="cuda", embedding_device=args.embedding_device)
    params, opt = train_lora(model)
    model.kept_blocks, model.dense_experts = args.kept_blocks, args.dense_experts
    graphed = GraphedStep(model, params, gate.decide("cuda")) if args.graphs else None
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq), device="cuda")
    labels = ids.cpu()
    for _ in range(2):
        train_step(model, opt, ids, labels, graphed)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        train_step(model, opt, ids, labels, graphed)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / 3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        train_step(model, opt, ids, labels, graphed)
        torch.cuda.synchronize()
    events = prof.key_averages()
    # kernels only: an op's row also carries its kernels' time, which would count them twice
    cuda_total = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e3
    print(f"seq {args.seq}: wall {wall * 1e3:.0f} ms/step, GPU kernel time {cuda_total:.0f} ms/step")
    print(json.dumps(breakdown(events, wall * 1e3, cuda_total, model.config, args.seq)))
    print(events.table(sort_by="self_device_time_total", row_limit=22, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
    kernels = sorted((e for e in events if e.device_type == DeviceType.CUDA), key=lambda e: -e.self_device_time_total)
    for e in kernels[:args.kernels]:
        print(json.dumps({"ms": round(e.self_device_time_total / 1e3, 2), "calls": e.count,
                          "part": part_of(e.key).split(" (")[0], "kernel": e.key[:160]}))
    if args.long:
        del ids
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, model.config.vocab_size, (1, args.long), device="cuda")
        try:
            total, count = model.loss(ids, ids, reduction="sum")
            print(f"seq {args.long}: forward peak {torch.cuda.max_memory_allocated() / GiB:.2f} GiB, "
                  f"after forward {torch.cuda.memory_allocated() / GiB:.2f} GiB", flush=True)
            (total / count).backward()
            print(f"seq {args.long}: backward peak {torch.cuda.max_memory_allocated() / GiB:.2f} GiB")
        except torch.OutOfMemoryError as e:
            print(f"seq {args.long}: OOM at peak {torch.cuda.max_memory_allocated() / GiB:.2f} GiB: {e}"[:600])
            print("".join(traceback.format_exc().splitlines(True)[-14:]))


if __name__ == "__main__":
    main()
