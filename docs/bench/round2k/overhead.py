"""Session 22, issue 17: where bench.py's step spends time beyond the graph replay's kernels.
Dense path, embedding on the GPU, graphs, LoRA r16 q/k/v/o: per length, the bench step (sync each),
steps back to back (no sync between), and one step's phases timed with a sync after each."""
import json, os, statistics, sys, time
import torch
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
from bench import load, train_lora
from model.fast import gate
from model.fast.cuda_graph import GraphedStep, padded_step_inputs

model, _ = load(os.environ["CKPT"], {"embedding_device": os.environ.get("EMB") or None})
params, opt = train_lora(model)
model.dense_experts = True
g = GraphedStep(model, params, gate.decide("cuda"))
def sync(): torch.cuda.synchronize(); return time.perf_counter()
for seq in (2048, 4096):
    ids = torch.randint(0, model.config.vocab_size, (1, seq), device="cuda"); labels = ids.cpu()
    def one():
        g.step(ids, labels, 1.0 / (seq - 1)); opt.step(); opt.zero_grad(set_to_none=True)
    for _ in range(3): one()
    synced = []
    for _ in range(10):
        t = sync(); one(); synced.append(sync() - t)
    t = sync()
    for _ in range(10): one()
    b2b = (sync() - t) / 10
    graph = next(v for k, v in g.graphs.items() if k[0][1] == seq)[0]
    replay = []
    for _ in range(10):
        t = sync(); graph.replay(); replay.append(sync() - t)
    phases = {}
    for _ in range(5):
        t = sync()
        inp = padded_step_inputs(ids, labels, g.pad_id); t1 = sync()
        with torch.no_grad(): x = model.embed(inp[0])
        t2 = sync()
        key = (tuple(inp[0].shape), len(inp[1]), False)
        _, *static, total = g.graphs[key]
        for buf, v in zip(static, (x, *inp[1:])):
            buf.copy_(v.pin_memory() if v.device.type == "cpu" else v, non_blocking=True)
        t3 = sync(); graph.replay(); t4 = time.perf_counter(); t5 = sync()
        for p in g.params:
            if p.grad is None: p.grad = torch.zeros_like(p)
        torch._foreach_add_([p.grad for p in g.params], g.grads, alpha=1.0); t6 = sync()
        opt.step(); t7 = sync(); opt.zero_grad(set_to_none=True); t8 = sync()
        for k, v in {"inputs": t1 - t, "embed": t2 - t1, "copies": t3 - t2, "replay_launch": t4 - t3,
                     "replay_gpu": t5 - t3, "grad_add": t6 - t5, "opt_step": t7 - t6, "zero_grad": t8 - t7}.items():
            phases.setdefault(k, []).append(v)
    r = {"seq": seq, "synced_ms": round(statistics.median(synced) * 1e3, 1), "back_to_back_ms": round(b2b * 1e3, 1),
         "replay_alone_ms": round(statistics.median(replay) * 1e3, 1),
         **{k + "_ms": round(statistics.median(v) * 1e3, 2) for k, v in phases.items()}}
    print(json.dumps(r), flush=True)
