"""Where a training step's time and memory go: a torch.profiler table at one length, and the
forward/backward peaks (with the failing op's traceback) at a long one.
    python bench/profile_step.py --checkpoint /tmp/ck --seq 2048 --long 65536
"""
import argparse
import os
import sys
import time
import traceback

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import train_lora  # noqa: E402  (bench/bench.py, beside this script)
from model import load_model  # noqa: E402

GiB = 2 ** 30


def step(model, opt, ids):
    total, count = model.loss(ids, ids, reduction="sum")
    (total / count).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--long", type=int, default=0)
    p.add_argument("--embedding-device", default=None)
    args = p.parse_args()
    model = load_model(args.checkpoint, quantize="nf4", device="cuda", embedding_device=args.embedding_device)
    _, opt = train_lora(model)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq), device="cuda")
    for _ in range(2):
        step(model, opt, ids)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        step(model, opt, ids)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / 3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(model, opt, ids)
        torch.cuda.synchronize()
    events = prof.key_averages()
    # kernels only: an op's row also carries its kernels' time, which would count them twice
    cuda_total = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e3
    print(f"seq {args.seq}: wall {wall * 1e3:.0f} ms/step, GPU kernel time {cuda_total:.0f} ms/step")
    print(events.table(sort_by="self_device_time_total", row_limit=22, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
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
