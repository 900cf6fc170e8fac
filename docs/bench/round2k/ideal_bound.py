"""Session 22, issue 17: the step if the experts' 4-bit products cost what torch._grouped_mm costs on bf16
weights already in memory: no dequantisation of the experts, and down's input gradient by torch._grouped_mm
too (the dense path runs it on the fused kernel while gate_up's copy is held). Measured by giving the dense
path (dense_gemm.NF4) every layer's experts as bf16 copies made once (38 GB: a speed bound, not a config).
Same process, same GPU: the in-bound configuration as it is first (dense path, embedding on the CPU)."""
import json, os, sys
import torch
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
from bench import load, sweep, train_lora
from model.fast import dense_gemm, gate, nf4_gemm
from model.fast.cuda_graph import GraphedStep

model, _ = load(os.environ["CKPT"], {"embedding_device": "cpu"})
params, opt = train_lora(model)
model.dense_experts = True
runs = sweep(model, opt, [2048, 4096], 8, "in-bound (dense path, embedding on the CPU)",
             GraphedStep(model, params, gate.decide("cuda")))
torch.cuda.empty_cache()
stored = {}
for layer in model.model.layers:
    for ws in layer.mlp.experts.nf4.values():
        stored[id(ws[0])] = nf4_gemm.dequantize(ws[0])
print(json.dumps({"stored_GiB": round(sum(t.numel() * 2 for t in stored.values()) / 2 ** 30, 1)}), flush=True)


class Stored:
    """The experts' bf16 copies as the 'dequantisation' (no kernel), and the transposed product by torch._grouped_mm."""
    def dequantize(self, w):
        return stored[id(w)]

    def grouped_mm_t(self, dy, w, offsets, src=None):
        rows = dy if src is None else dy[src]
        return dense_gemm.product(rows, stored[id(w)].transpose(1, 2), offsets)


dense_gemm.NF4.base = Stored()
runs += sweep(model, opt, [2048, 4096], 8, "bound: experts' products at bf16 torch._grouped_mm cost, no dequantisation",
              GraphedStep(model, params, gate.decide("cuda")))
