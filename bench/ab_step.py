"""A/B on the GPU: the training step with one piece of the committed code swapped for what it replaced,
in one process on the same GPU, at one length, CUDA graphs on (a fresh graph for each variant).

    committed             the code as it is
    down recomputed       _NF4ExpertLayer without its skip: checkpointing's recomputation runs down and
                          the weighted sum too (as any layer's recomputation does)
    SwiGLU separate       gate_up's kernel without the SwiGLU in its epilogue, the compiled SwiGLU after it
    Experts.forward       NF4 experts through the generic layer (model/moe.py): each projection its own
                          autograd function, the SwiGLU a pass of its own, x[token]'s backward index_add_

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


VARIANTS = {  # name -> (object, attribute, replacement)
    "committed": None,
    "down recomputed": (nf4_layer, "in_recomputation", lambda: False),
    "SwiGLU separate": (nf4_gemm, "grouped_mm_swiglu", separate_swiglu),
    "Experts.forward": (nf4.NF4Experts, "forward", moe.Experts.forward),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    model = load_model(args.checkpoint, quantize="nf4", device="cuda", dtype=torch.bfloat16)
    params, opt = train_lora(model)
    for name in list(VARIANTS) + ["committed"]:
        swap = VARIANTS[name]
        if swap is not None:
            owner, attr, fn = swap
            kept = getattr(owner, attr)
            setattr(owner, attr, fn)
        try:
            dt, loss = step_time(model, opt, args.seq, args.steps, GraphedStep(model, params, gate.decide("cuda")))
        finally:
            if swap is not None:
                setattr(owner, attr, kept)
        print(json.dumps({"variant": name, "seq": args.seq, "step_s": round(dt, 4), "tok_s": round(args.seq / dt, 1),
                          "loss": round(loss, 4)}), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
