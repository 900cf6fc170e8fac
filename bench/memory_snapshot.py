"""train.py under the CUDA allocator's eye: where the memory is when a run runs out of it (issue 16).

Runs train.main with the arguments after `--`, the allocator recording each allocation's Python stack.
Right after the model loads, prints one JSON line of the allocator's counts (allocated, reserved, the
free memory split between live blocks, per pool); --empty-after-load then empties the cache, a
variant. When CUDA runs out of memory, dumps the allocator's snapshot to --out
(torch.cuda.memory._snapshot's pickle, for https://pytorch.org/memory_viz) and prints a summary of it:
per pool, the mapped bytes, the live bytes and the free bytes between them, the largest free block,
and the Python lines that allocated the most live memory.

Caveat, measured: with the history recorded, two 65,536-token runs (growable segments) stopped in
their first backward with "SystemError: run_backward returned NULL without setting an exception" and
no snapshot; --no-history ran. Record at shorter lengths, or read train.py's own out-of-memory.txt.

--headroom X passes train.py's --memory-headroom X (the share of the GPU the plan's estimate may fill),
so a run the plan would refuse can be tried under the same cap.

    QLORA_GPU_MEMORY_GIB=15.58 python bench/memory_snapshot.py --out oom.pickle --headroom 1.0 -- \
        --model $CKPT --data DIR --rank 16 --max-seq-len 65536
"""
import argparse
import collections
import json
import os
import pickle
import sys
import traceback

# as train.py sets it; here before anything touches CUDA (recording the history does), or it comes too late
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

MIB, GIB = 2 ** 20, 2 ** 30


def counts(tag: str) -> dict:
    s = torch.cuda.memory_stats()
    return {"at": tag, **{f"{k}_gib": round(s.get(f"{k}_bytes.all.current", 0) / GIB, 3)
                          for k in ("allocated", "reserved", "inactive_split")},
            **{f"{k}_{pool}_gib": round(s.get(f"{k}_bytes.{pool}_pool.current", 0) / GIB, 3)
               for k in ("allocated", "reserved") for pool in ("small", "large")}}


def where(frames) -> str:
    """The innermost frame in this project's files (else the innermost at all)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for f in frames or []:
        if f.get("filename", "").startswith(root):
            return f"{os.path.relpath(f['filename'], root)}:{f['line']} {f['name']}"
    return f"{frames[0]['filename']}:{frames[0]['line']}" if frames else "?"


def summarise(snapshot) -> dict:
    pools = collections.defaultdict(lambda: collections.Counter())
    largest_free = collections.defaultdict(int)
    live_by_line = collections.Counter()
    free_sizes = collections.defaultdict(list)
    for seg in snapshot["segments"]:
        kind = f"{seg['segment_type']}{' expandable' if seg.get('is_expandable') else ''} stream {seg['stream']}"
        pools[kind]["segments"] += 1
        pools[kind]["mapped"] += seg["total_size"]
        for b in seg["blocks"]:
            pools[kind][b["state"]] += b["size"]
            if b["state"] == "inactive":
                largest_free[kind] = max(largest_free[kind], b["size"])
                free_sizes[kind].append(b["size"])
            else:
                live_by_line[where(b.get("frames"))] += b["size"]
    out = {}
    for kind, c in pools.items():
        sizes = sorted(free_sizes[kind], reverse=True)
        out[kind] = {**{k: round(v / GIB, 3) if k != "segments" else v for k, v in c.items()},
                     "largest_free_mib": round(largest_free[kind] / MIB, 1), "free_blocks": len(sizes),
                     "free_blocks_over_64mib": sum(s > 64 * MIB for s in sizes),
                     "free_in_blocks_under_4mib_gib": round(sum(s for s in sizes if s < 4 * MIB) / GIB, 3)}
    out["live_by_line_gib"] = {k: round(v / GIB, 3) for k, v in live_by_line.most_common(25)}
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True, help="the snapshot's pickle, written when CUDA runs out of memory")
    p.add_argument("--headroom", type=float, default=None)
    p.add_argument("--no-history", action="store_true", help="record nothing: train.py's own allocator, only "
                   "the headroom and the load-time counts changed (its out-of-memory.txt then tells)")
    p.add_argument("--empty-after-load", action="store_true", help="torch.cuda.empty_cache() after loading")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    args = p.parse_args()
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    if args.headroom is not None:
        rest = [*rest, "--memory-headroom", str(args.headroom)]
    print(json.dumps({"PYTORCH_CUDA_ALLOC_CONF": os.environ["PYTORCH_CUDA_ALLOC_CONF"]}), flush=True)
    if not args.no_history:
        torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")

    def on_oom(device, alloc, device_alloc, device_free):
        try:   # called from the allocator, maybe on autograd's thread: nothing may escape
            snapshot = torch.cuda.memory._snapshot()
            with open(args.out, "wb") as f:
                pickle.dump(snapshot, f)
            print(json.dumps({"oom": True, "asked_mib": round(alloc / MIB, 1), **counts("oom"),
                              "summary": summarise(snapshot)}), flush=True)
        except Exception:
            traceback.print_exc()

    if not args.no_history:
        torch._C._cuda_attach_out_of_memory_observer(on_oom)
    load = train.load_model

    def load_and_count(*a, **k):
        model = load(*a, **k)
        torch.cuda.synchronize()
        print(json.dumps(counts("loaded")), flush=True)
        if args.empty_after_load:
            torch.cuda.empty_cache()
            print(json.dumps(counts("loaded, cache emptied")), flush=True)
        return model

    train.load_model = load_and_count
    rc = train.main(rest)
    print(json.dumps({"rc": rc, **counts("end"), "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
                      "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3)}), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
