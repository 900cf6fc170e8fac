"""A/B on the GPU: the training step with one piece of the committed code swapped for what it replaced,
in one process on the same GPU, at one length, CUDA graphs on (a fresh graph for each variant).

    committed             the code as it is
    down recomputed       _NF4ExpertLayer without its skip: checkpointing's recomputation runs down and
                          the weighted sum too (as any layer's recomputation does)
    SwiGLU separate       gate_up's kernel without the SwiGLU in its epilogue, the compiled SwiGLU after it
    Experts.forward       NF4 experts through the generic layer (model/moe.py): each projection its own
                          autograd function, the SwiGLU a pass of its own, x[token]'s backward index_add_
    atomic sums           each token's k expert rows summed by index_add_ (atomic adds, the order they land
                          in) in the NF4 layer's forward and backward, instead of the fixed-order gather
                          and sum: what the deterministic default costs (issue 13's 3% question)

The committed code runs first and last, so drift between the two shows.
    python bench/ab_step.py --checkpoint /tmp/ck --seq 2048
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import step_time, train_lora  # noqa: E402  (bench/bench.py, beside this script)
from model import load_model  # noqa: E402
from model import moe  # noqa: E402
from model.weights import nf4  # noqa: E402
from model.fast import gate, nf4_gemm, nf4_layer  # noqa: E402
from model.fast.cuda_graph import GraphedStep  # noqa: E402


def separate_swiglu(x, w, offsets, bias, alpha, limit, keep_y=True):
    y = nf4_gemm.grouped_mm(x, w, offsets, bias)
    return y, moe.swiglu(y, alpha, limit)


def _token_of_row(inverse, k):
    """Each sorted row's token (order // k), from the inverse permutation the layer keeps."""
    return torch.empty_like(inverse).scatter_(0, inverse, torch.arange(len(inverse), device=inverse.device) // k)


def atomic_sum_per_token(rows, inverse, k):
    out = torch.zeros(len(inverse) // k, rows.shape[-1], dtype=rows.dtype, device=rows.device)
    return out.index_add_(0, _token_of_row(inverse, k), rows)


def atomic_weighted_sum(y, weights, inverse, x):
    k = weights.shape[1]
    w = weights.reshape(-1)[torch.argsort(inverse)]          # each sorted row's routing weight
    return atomic_sum_per_token(y * w[:, None].to(y.dtype), inverse, k).to(x.dtype)


VARIANTS = {  # name -> [(object, attribute, replacement), ...]
    "committed": [],
    "down recomputed": [(nf4_layer, "in_recomputation", lambda: False)],
    "SwiGLU separate": [(nf4_gemm, "grouped_mm_swiglu", separate_swiglu)],
    "Experts.forward": [(nf4.NF4Experts, "forward", moe.Experts.forward)],
    "atomic sums": [(nf4_layer, "weighted_sum", atomic_weighted_sum),
                    (nf4_layer, "sum_per_token", atomic_sum_per_token)],
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from the list above")
    args = p.parse_args()
    model = load_model(args.checkpoint, quantize="nf4", device="cuda", dtype=torch.bfloat16)
    params, opt = train_lora(model)
    for name in args.variants.split(",") + ["committed"]:
        swaps = VARIANTS[name]
        kept = [getattr(owner, attr) for owner, attr, _ in swaps]
        for owner, attr, fn in swaps:
            setattr(owner, attr, fn)
        try:
            dt, loss, _ = step_time(model, opt, args.seq, args.steps, GraphedStep(model, params, gate.decide("cuda")))
        finally:
            for (owner, attr, _), fn in zip(swaps, kept):
                setattr(owner, attr, fn)
        print(json.dumps({"variant": name, "seq": args.seq, "step_s": round(dt, 4), "tok_s": round(args.seq / dt, 1),
                          "loss": round(loss, 4)}), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
