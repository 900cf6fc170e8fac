"""torch._grouped_mm at gpt-oss-20b's expert shapes: the weights' memory layout, and what grouping costs (GPU).

The dense path (model/fast/dense_gemm.py) multiplies expert-sorted rows by a layer's dequantised
experts, W (experts, in, out) as the hub lays them out: the forward reads W, the input gradient its
transposed view. This times both products with W stored that way and stored transposed ((experts, out,
in), read through a transposed view), over rows split among the experts as a random router splits
them (multinomial counts), and beside them one dense torch.mm of the same rows and FLOPs (no grouping).

    python3 bench/grouped_layouts.py --rows 8192,16384
"""
import argparse
import json
import statistics

import torch

EXPERTS, HIDDEN, INTER = 32, 2880, 2880


def timed(fn, reps=30):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def routed(rows):
    """(counts, offsets on the GPU) of `rows` rows split among the experts as a uniform random router splits them."""
    counts = torch.distributions.Multinomial(rows, torch.full((EXPERTS,), 1.0 / EXPERTS)).sample().long()
    return counts, counts.cumsum(0).to(torch.int32).cuda()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="8192,16384")
    args = p.parse_args()
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}), flush=True)
    torch.manual_seed(0)
    for rows in (int(r) for r in args.rows.split(",")):
        counts, offsets = routed(rows)
        for name, k, n in (("gate_up", HIDDEN, 2 * INTER), ("down", INTER, HIDDEN)):
            w = torch.randn(EXPERTS, k, n, device="cuda", dtype=torch.bfloat16) * 0.02     # (experts, in, out)
            w_t = w.transpose(1, 2).contiguous()                                          # (experts, out, in)
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            dy = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
            flop = 2 * rows * k * n
            r = {"rows": rows, "matrix": name, "max_count": int(counts.max()), "min_count": int(counts.min())}
            cases = {
                "fwd, W (in, out)": lambda: torch._grouped_mm(x, w, offs=offsets),
                "fwd, W stored (out, in)": lambda: torch._grouped_mm(x, w_t.transpose(1, 2), offs=offsets),
                "dx, W (in, out)": lambda: torch._grouped_mm(dy, w.transpose(1, 2), offs=offsets),
                "dx, W stored (out, in)": lambda: torch._grouped_mm(dy, w_t, offs=offsets),
                "fwd, one dense mm": lambda: x @ w[0],
                "dx, one dense mm": lambda: dy @ w[0].T,
            }
            same = torch.equal(cases["fwd, W (in, out)"](), cases["fwd, W stored (out, in)"]())
            for case, fn in cases.items():
                ms = timed(fn)
                r[case] = {"ms": round(ms, 4), "tflops": round(flop / ms / 1e9, 1)}
            r["fwd layouts bit-identical"] = same
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
