"""The CUDA fast paths against their plain twins, on the GPU (prints relative errors).

flex attention with sinks vs eager attention; grouped experts (torch._grouped_mm) vs the per-expert
loop; NF4 experts vs the dense experts holding the dequantised weights. Forward and backward. Then
the step as CUDA graphs (model/fast/cuda_graph.py) vs the eager step: PASS/FAIL lines, and the exit code
is 1 if one fails.
    python bench/check_cuda.py
"""
import json
import os
import sys
import tempfile
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GptOss, GptOssConfig  # noqa: E402
from model.attention import eager_attention  # noqa: E402
from model.fast import gate  # noqa: E402
from model.fast.flex import flex_attention_with_sinks  # noqa: E402
from model.moe import MLP, Experts, moe_reference  # noqa: E402
from model.weights.nf4 import NF4Experts  # noqa: E402


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def grads(fn, inputs):
    """Output and input gradients for one fixed upstream gradient (the same for every variant)."""
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator(out.device).manual_seed(1), device=out.device)
    return out, torch.autograd.grad(out, inputs, g.to(out.dtype))


def main():
    torch.manual_seed(0)
    dev = "cuda"
    # 1. whole tiny model, float32: flex path vs eager path, logits and all gradients
    cfg = GptOssConfig.from_name("tiny")
    m = GptOss(cfg, attention="eager").to(dev)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if not n.endswith("norm.weight"):
                p.normal_(0, 0.1)
    ids = torch.randint(0, cfg.vocab_size, (3, 300), device=dev)
    res = {}
    for impl in ("eager", "flex"):
        m.attention = impl
        m.zero_grad()
        loss = m.loss(ids, ids)
        loss.backward()
        res[impl] = (m(ids).detach(), [p.grad.clone() for p in m.parameters()])
    print(f"tiny fp32 flex vs eager: logits max abs {(res['flex'][0] - res['eager'][0]).abs().max().item():.2e}, "
          f"worst grad rel {max(rel(a, b) for a, b in zip(res['flex'][1], res['eager'][1])):.2e}")

    # 2. one attention at gpt-oss-20b's shapes, bf16, both window kinds, T not a multiple of 128
    for t in (1000, 4096):
        for window in (128, None):
            q = torch.randn(1, t, 64, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(1, t, 8, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(1, t, 8, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
            s = torch.randn(64, device=dev, requires_grad=True)
            fo, fg = grads(lambda *a: flex_attention_with_sinks(*a, window), (q, k, v, s))
            ref = [x.detach().double().requires_grad_() for x in (q, k, v, s)]
            eo, eg = grads(lambda *a: eager_attention(*a, window), ref)
            print(f"attention T={t} window={window} bf16 vs fp64: out rel {rel(fo, eo):.2e}, "
                  f"grad rel q {rel(fg[0], eg[0]):.2e} k {rel(fg[1], eg[1]):.2e} v {rel(fg[2], eg[2]):.2e} "
                  f"sinks {rel(fg[3], eg[3]):.2e}")

    # 3. grouped experts at 20b's widths (8 experts to keep it small) vs the per-expert loop, both bf16
    cfg = GptOssConfig(num_hidden_layers=1, num_local_experts=8, num_experts_per_tok=4)
    mlp_b = MLP(cfg).to(dev)
    with torch.no_grad():
        for p in mlp_b.parameters():
            p.normal_(0, 0.02)
    mlp_b = mlp_b.to(torch.bfloat16)
    xb = torch.randn(1, 2048, 2880, device=dev, dtype=torch.bfloat16).requires_grad_()
    out, (gx,) = grads(lambda a: mlp_b(a, gate.decide("cuda")), (xb,))
    ref_out, (gref,) = grads(lambda a: moe_reference(mlp_b, a), (xb,))
    print(f"grouped experts vs per-expert loop, both bf16: out rel {rel(out, ref_out):.2e}, grad rel {rel(gx, gref):.2e}")

    # 4. NF4 experts vs dense experts holding the dequantised weights, bf16, group sizes 8 and 3
    ex = Experts(cfg).to(dev)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, 0.02)
    xt = torch.randn(4096, 2880, device=dev, dtype=torch.bfloat16)
    w = torch.softmax(torch.randn(4096, 4, device=dev), -1)
    idx = torch.rand(4096, 8, device=dev).argsort(-1)[:, :4]
    idx = torch.where(idx == 5, 6, idx)  # expert 5 unused
    for group in (8, 3):
        nf4 = NF4Experts(cfg, group=group).to(dev)
        nf4.load_state_dict({k: v for k, v in ex.state_dict().items() if k.endswith("bias")}, strict=False)
        for name in ("gate_up_proj", "down_proj"):
            nf4.set_weight(name, getattr(ex, name).detach().to(dev))
        nf4.requires_grad_(False)  # frozen biases, as under LoRA: the fused MLP's condition
        dense = Experts(cfg).to(dev).to(torch.bfloat16)
        with torch.no_grad():
            dense.gate_up_proj.copy_(nf4.dequantized("gate_up_proj"))
            dense.down_proj.copy_(nf4.dequantized("down_proj"))
            dense.gate_up_proj_bias.copy_(ex.gate_up_proj_bias)
            dense.down_proj_bias.copy_(ex.down_proj_bias)
        do, (dg, dwg) = grads(lambda a, b: dense(a, b, idx), (xt.clone().requires_grad_(), w.clone().requires_grad_()))
        no, (ng, nwg) = grads(lambda a, b: nf4(a, b, idx, gate.decide("cuda")), (xt.clone().requires_grad_(), w.clone().requires_grad_()))
        path = "_NF4ExpertLayer" if group == cfg.num_local_experts else "dequantise, then _grouped_mm"
        print(f"NF4 experts group={group} ({path}) vs dense on dequantised weights: out rel {rel(no, do):.2e}, "
              f"grad rel x {rel(ng, dg):.2e}, routing weights {rel(nwg, dwg):.2e}")


def check_fused():
    """Each torch.compile'd elementwise chain against its plain self (fn.__wrapped__), bf16 and fp32."""
    from model.gpt_oss import rms_norm
    from model.moe import swiglu
    from model.rope import apply_rotary
    dev = "cuda"
    for dtype in (torch.float32, torch.bfloat16):
        for rows in (1000, 8192):
            gu = (torch.randn(rows, 5760, device=dev) * 5).to(dtype)
            x = torch.randn(1, rows, 2880, device=dev, dtype=dtype)
            w = torch.randn(2880, device=dev)
            q = torch.randn(1, rows, 8, 64, device=dev, dtype=dtype)
            cos, sin = torch.randn(rows, 32, device=dev, dtype=dtype), torch.randn(rows, 32, device=dev, dtype=dtype)
            for name, fn, args in (("swiglu", swiglu, (gu, 1.702, 7.0)), ("rms_norm", rms_norm, (x, w, 1e-5)),
                                   ("rotary", apply_rotary, (q, cos, sin))):
                a = args[0].clone().requires_grad_()
                fo, (fg,) = grads(lambda t: fn(t, *args[1:]), (a,))
                po, (pg,) = grads(lambda t: fn.__wrapped__(t, *args[1:]), (a,))
                print(f"compiled {name} {dtype} rows={rows} vs plain: out rel {rel(fo, po):.2e}, grad rel {rel(fg, pg):.2e}")


def check_lora_experts():
    """Expert LoRA on the grouped bf16 kernel (rank 4 is padded to the kernel's multiple of 8)
    against a per-expert loop on W + A B * scaling in float32."""
    from lora import inject
    from model.moe import swiglu_reference
    for rank in (4, 16):
        torch.manual_seed(0)
        model = GptOss(GptOssConfig.from_name("tiny")).cuda().to(torch.bfloat16)
        inject(model, targets=["experts"], rank=rank, verbose=False)
        ex = model.model.layers[1].mlp.experts
        with torch.no_grad():
            for p in ex.parameters():
                p.normal_(0, 0.1)
        x = torch.randn(300, 64, device="cuda", dtype=torch.bfloat16) * 3
        weights = torch.softmax(torch.randn(300, 2, device="cuda"), -1)
        idx = torch.randint(0, 8, (300, 2), device="cuda")
        got = ex(x, weights, idx).float()
        base = ex.base_layer
        w = {n: getattr(base, n).float() + ex.delta_weight(n) for n in ("gate_up_proj", "down_proj")}
        want = torch.zeros(300, 64, device="cuda")
        for e in range(8):
            token, slot = torch.where(idx == e)
            gu = x[token].float() @ w["gate_up_proj"][e] + base.gate_up_proj_bias[e].float()
            y = swiglu_reference(gu, ex.alpha, ex.limit) @ w["down_proj"][e] + base.down_proj_bias[e].float()
            want.index_add_(0, token, y * weights[token, slot, None])
        print(f"expert LoRA rank {rank}, grouped bf16 vs per-expert loop fp32: rel {rel(got, want):.2e}")


def lora_model(model, rank=8):
    """LoRA on attention, routers and experts, with B random too so that every gradient is non-trivial."""
    from lora import inject, lora_parameters
    inject(model, targets="q_proj,k_proj,v_proj,o_proj,router,experts", rank=rank, alpha=2 * rank, verbose=False)
    g = torch.Generator("cuda").manual_seed(1)
    with torch.no_grad():
        for name, p in lora_parameters(model):
            if "lora_B" in name:
                p.normal_(0.0, 0.02, generator=g)
    model.gradient_checkpointing = True
    return model.train()


def small_nf4_model(folder):
    """A 4-layer model of moderate widths, written as a bf16 checkpoint and loaded as train.py does (NF4)."""
    from safetensors.torch import save_file
    from model import load_model
    config = GptOssConfig(vocab_size=8192, hidden_size=512, intermediate_size=512, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_local_experts=8,
                          num_experts_per_tok=2, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    state = GptOss(config).state_dict()
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config.to_dict(), f)
    return load_model(folder, quantize="nf4", device="cuda", dtype=torch.bfloat16)


def compare_graphed_with_eager(name, model, shapes) -> bool:
    """Two steps of two micro-batches each (shapes, then the same shapes with new tokens: replays of
    graphs captured in one pool), GraphedStep against `(model.loss_rows(...) * scale).backward()` on
    the same padded inputs: summed losses and the LoRA gradients accumulated over the step.

    Bit-comparable by design: top-2 routing adds two terms per token in the experts' index_add_ (the
    same in any order), and the scale is a power of two (scaling the backward's input or its output
    rounds alike). The eager step run twice shows the GPU's own run-to-run noise, printed beside.
    """
    from lora import lora_parameters
    from model.fast.cuda_graph import GraphedStep, padded_step_inputs
    params = [p for _, p in lora_parameters(model)]
    vocab, pad_id, scale = model.config.vocab_size, model.config.pad_token_id, 2.0 ** -9
    gen = torch.Generator().manual_seed(2)

    def micro_batch(shape):  # on the CPU, as train.py's; the first 40 positions are prompt, untrained
        ids = torch.randint(0, vocab, shape, generator=gen)
        labels = ids.clone()
        labels[:, :40] = -100
        return ids, labels

    def eager(batches):
        for p in params:
            p.grad = None
        totals = []
        for ids, labels in batches:
            total = model.loss_rows(*(t.cuda() for t in padded_step_inputs(ids, labels, pad_id)))
            (total * scale).backward()
            totals.append(total.detach().float())
        return torch.stack(totals), [p.grad.clone() for p in params]

    def graphed(batches):
        for p in params:
            p.grad = None
        totals = torch.stack([step.step(ids, labels, scale) for ids, labels in batches])
        return totals, [p.grad.clone() for p in params]

    def worst(a, b):  # (losses, grads) pairs -> (loss rel, worst grad rel), max-abs relative
        r = [((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item() for x, y in zip([a[0], *a[1]], [b[0], *b[1]])]
        return r[0], max(r[1:])

    passed = True
    try:
        step = GraphedStep(model, params, gate.decide("cuda"))
        for n in range(2):
            batches = [micro_batch(shape) for shape in shapes]
            ref, again, got = eager(batches), eager(batches), graphed(batches)
            noise, diff = worst(again, ref), worst(got, ref)
            tol = max(1e-5, 2 * max(noise))
            ok = max(diff) <= tol and step.captures == len(shapes)
            passed &= ok
            print(f"{'PASS' if ok else 'FAIL'} graphs, {name}, step {n + 1} {shapes}: graph vs eager loss rel "
                  f"{diff[0]:.1e}, worst LoRA grad rel {diff[1]:.1e} (tolerance {tol:.0e}; eager vs eager "
                  f"{noise[0]:.1e}, {noise[1]:.1e}); {step.captures} captures")
    except Exception as e:
        traceback.print_exc()
        print(f"FAIL graphs, {name}: {type(e).__name__}: {e}")
        return False
    return passed


def check_graphs() -> bool:
    """GraphedStep against the eager step (bf16: in float32 the experts' per-expert loop cannot be
    captured, which graph_problem must say), and the configurations graphs refuse."""
    from model.fast.cuda_graph import graph_problem
    ok = True

    def verdict(passed, line):
        nonlocal ok
        ok &= passed
        print(f"{'PASS' if passed else 'FAIL'} {line}")

    tiny = GptOssConfig.from_name("tiny")
    torch.manual_seed(0)
    problem = graph_problem(lora_model(GptOss(tiny, attention="flex").cuda()), gate.decide("cuda"))
    verdict(problem is not None and "per-expert loop" in problem, f"graphs refuse the float32 model: {problem}")

    torch.manual_seed(0)
    model = GptOss(tiny, attention="flex")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not n.endswith("norm.weight"):
                p.normal_(0, 0.1)
    model = lora_model(model.cuda().to(torch.bfloat16))
    ok &= compare_graphed_with_eager("tiny bf16", model, [(2, 200), (1, 333)])
    del model

    with tempfile.TemporaryDirectory() as folder:
        model = lora_model(small_nf4_model(folder))
        ok &= compare_graphed_with_eager("small NF4 bf16", model, [(2, 300), (1, 1000)])
        del model
        from model import load_model
        model = lora_model(load_model(folder, quantize="nf4", device="cuda", embedding_device="cpu"))
        ok &= compare_graphed_with_eager("small NF4 bf16, embedding on the CPU", model, [(2, 300)])
    return ok


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("bench/check_cuda.py checks the CUDA paths: it needs a CUDA GPU, and none is visible")
    check_fused()
    check_lora_experts()
    main()
    torch._dynamo.reset()  # the checks above compiled flex in many variants; start the graphs afresh
    sys.exit(0 if check_graphs() else 1)
