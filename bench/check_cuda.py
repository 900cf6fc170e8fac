"""The CUDA fast paths against their plain twins, on the GPU (prints relative errors).

flex attention with sinks vs eager attention; grouped experts (torch._grouped_mm) vs the per-expert
loop; NF4 experts vs the dense experts holding the dequantised weights. Forward and backward.
    python bench/check_cuda.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GptOss, GptOssConfig  # noqa: E402
from model.attention import eager_attention, flex_attention_with_sinks  # noqa: E402
from model.moe import Experts, moe_reference  # noqa: E402
from model.nf4 import NF4Experts  # noqa: E402


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

    # 3. grouped experts at 20b's widths (8 experts to keep it small), bf16 vs the loop in fp64
    cfg = GptOssConfig(num_hidden_layers=1, num_local_experts=8, num_experts_per_tok=4)
    mlp = GptOss(cfg).model.layers[0].mlp.to(dev)
    x = torch.randn(1, 2048, 2880, device=dev)
    mlp_b = GptOss(cfg).model.layers[0].mlp.to(dev)
    mlp_b.load_state_dict(mlp.state_dict())
    mlp_b = mlp_b.to(torch.bfloat16)
    xb = x.to(torch.bfloat16).requires_grad_()
    out, (gx,) = grads(mlp_b, (xb,))
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
        dense = Experts(cfg).to(dev).to(torch.bfloat16)
        with torch.no_grad():
            dense.gate_up_proj.copy_(nf4.dequantized("gate_up_proj"))
            dense.down_proj.copy_(nf4.dequantized("down_proj"))
            dense.gate_up_proj_bias.copy_(ex.gate_up_proj_bias)
            dense.down_proj_bias.copy_(ex.down_proj_bias)
        do, (dg,) = grads(lambda a: dense(a, w, idx), (xt.clone().requires_grad_(),))
        no, (ng,) = grads(lambda a: nf4(a, w, idx), (xt.clone().requires_grad_(),))
        print(f"NF4 experts group={group} vs dense on dequantised weights: out rel {rel(no, do):.2e}, "
              f"grad rel {rel(ng, dg):.2e}")


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


if __name__ == "__main__":
    check_fused()
    check_lora_experts()
    main()
