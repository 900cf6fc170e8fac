"""The network against transformers' GptOss on the same weights (tiny config, float32, CPU)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import hf_config, hf_twin
from lora import inject, lora_parameters
from model import GptOss, GptOssConfig
from model.attention import eager_attention
from model.fast.cuda_graph import GraphedStep, graph_problem, padded_step_inputs
from model.gpt_oss import PADDING_DOC
from model.loss import chunked_cross_entropy, cross_entropy_rows, target_rows
from model.moe import moe_reference, sort_by_expert
from model.weights.nf4 import NF4Experts
from model.rope import yarn_inv_freq

TOL = 1e-4  # float32 end to end; observed differences are ~3e-6


def test_presets_have_the_hub_shapes():
    c = GptOssConfig.from_name("gpt-oss-20b")
    assert (c.num_hidden_layers, c.num_local_experts, c.hidden_size, c.vocab_size) == (24, 32, 2880, 201088)
    assert c.layer_types[:2] == ["sliding_attention", "full_attention"]
    assert GptOssConfig.from_name("gpt-oss-120b").num_local_experts == 128
    t = GptOssConfig.from_name("tiny")
    assert t.num_experts_per_tok < t.num_local_experts and "sliding_attention" in t.layer_types


def test_config_reads_both_rope_spellings():
    old = GptOssConfig.from_dict({"rope_theta": 1000.0, "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
                                  "num_hidden_layers": 2, "unknown_field": 1})
    new = GptOssConfig.from_dict({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1000.0},
                                  "num_hidden_layers": 2})
    assert old.rope_theta == new.rope_theta == 1000.0 and old.rope_scaling == new.rope_scaling


def test_yarn_frequencies_equal_the_reference():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    for name in ("gpt-oss-20b", "tiny"):
        config = GptOssConfig.from_name(name)
        ours, factor = yarn_inv_freq(config)
        ref, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config(config), "cpu")
        assert torch.allclose(ours, ref, rtol=1e-6, atol=0), (ours - ref).abs().max()
        assert abs(factor - ref_factor) < 1e-12 and abs(factor - 1.3466) < 1e-4


@pytest.mark.parametrize("packed", [False, True])
def test_the_rotary_kernel_equals_the_plain_rotary_both_ways(monkeypatch, packed):
    """model/fast/rotary.py in Triton's interpreter (float32): the rotation, and its gradient through
    the inverse rotation, equal the plain chain's; 3 heads (a masked power-of-two tile), cos and sin
    per position or, as packed rows give them, per row and position."""
    import importlib

    from model.fast import rotary
    from model.rope import rotary_reference
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernel = importlib.reload(rotary)
    try:
        g = torch.Generator().manual_seed(3)
        x = torch.randn(2, 5, 3, 16, generator=g)
        cos, sin = (torch.randn(*((2,) if packed else ()), 5, 8, generator=g) for _ in range(2))
        dy = torch.randn(2, 5, 3, 16, generator=g)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = kernel.apply_rotary(a, cos, sin), rotary_reference(b, cos, sin)
        (ga,), (gb,) = torch.autograd.grad(ya, a, dy), torch.autograd.grad(yb, b, dy)
        torch.testing.assert_close(ya, yb, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-6)
    finally:
        monkeypatch.undo()
        importlib.reload(rotary)


def test_logits_equal_transformers(tiny_model):
    hf = hf_twin(tiny_model)
    ids = torch.randint(0, tiny_model.config.vocab_size, (3, 37))  # batch > 1, seq > window of 8
    with torch.no_grad():
        ours, ref = tiny_model(ids), hf(input_ids=ids).logits
    assert (ours - ref).abs().max() < TOL


def test_loss_and_gradients_equal_transformers(tiny_model):
    hf = hf_twin(tiny_model)
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 30))
    labels = ids.clone()
    labels[:, :11] = -100
    loss = tiny_model.loss(ids, labels)
    ref = hf(input_ids=ids, labels=labels).loss
    assert abs(loss.item() - ref.item()) < TOL
    loss.backward()
    ref.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in tiny_model.named_parameters():
        g, r = p.grad, hf_params[name].grad
        assert r is not None and g is not None, name
        assert (g - r).abs().max() < TOL * max(1.0, r.abs().max().item()), name  # embedding grad = input grad


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 20))
    grads = []
    for ckpt in (False, True):
        tiny_model.zero_grad()
        tiny_model.gradient_checkpointing = ckpt
        tiny_model.loss(ids, ids).backward()
        grads.append([p.grad.clone() for p in tiny_model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kept", [1, 2, 99])
def test_kept_blocks_skip_the_recomputation_and_give_the_same_gradients(tiny_model, monkeypatch, kept):
    """The last `kept` blocks run outside checkpoint (99: all of them); the gradients keep every bit."""
    import model.gpt_oss as gpt_oss
    inject(tiny_model, targets=("q_proj", "v_proj", "experts"), rank=4, alpha=8)
    for name, p in lora_parameters(tiny_model):    # B != 0: every adapter's gradient flows
        torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(name)))
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(4))
    checkpointed = []
    wrapped = gpt_oss.checkpoint
    monkeypatch.setattr(gpt_oss, "checkpoint", lambda block, *a, **k: checkpointed.append(block) or wrapped(block, *a, **k))
    tiny_model.gradient_checkpointing = True
    grads = []
    for n in (0, kept):
        tiny_model.zero_grad()
        tiny_model.kept_blocks = n
        checkpointed.clear()
        loss = tiny_model.loss(ids, ids)
        loss.backward()
        grads.append((loss.detach(), {name: p.grad.clone() for name, p in tiny_model.named_parameters() if p.grad is not None}))
        layers = list(tiny_model.model.layers)
        assert checkpointed == layers[:max(len(layers) - n, 0)]
    assert torch.equal(grads[0][0], grads[1][0]) and grads[0][1].keys() == grads[1][1].keys()
    for name, g in grads[0][1].items():
        assert g.abs().sum() > 0 and torch.equal(grads[1][1][name], g), name


def test_grouped_experts_equal_the_per_expert_loop(tiny_model):
    x = torch.randn(2, 25, tiny_model.config.hidden_size) * 3  # large enough to hit the swiglu clamp
    mlp = tiny_model.model.layers[0].mlp
    assert torch.allclose(mlp(x), moe_reference(mlp, x), atol=1e-5)


def test_sort_by_expert_is_a_stable_sort_with_counts_and_inverse():
    """120b's 128 experts and the "no expert" index past them: the (token, expert) pairs in expert order,
    ties in their original order, the counts per expert, and the inverse permutation."""
    torch.manual_seed(0)
    idx = torch.stack([torch.randperm(129)[:4] for _ in range(300)])
    order, expert, counts, offsets, inverse = sort_by_expert(idx, 128)
    flat = idx.reshape(-1)
    assert torch.equal(order, torch.argsort(flat, stable=True)) and torch.equal(expert, flat[order])
    assert torch.equal(counts, torch.bincount(flat, minlength=129)[:128]) and offsets[-1] == counts.sum()
    assert torch.equal(order[inverse], torch.arange(len(flat)))


def test_sliding_window_sees_the_last_n_tokens():
    # value of token j is one-hot j: the output row shows exactly which keys a query attends to
    t, w = 12, 4
    q = torch.zeros(1, t, 1, 4)
    k = torch.zeros(1, t, 1, 4)
    v = torch.eye(t).view(1, t, 1, t)
    out = eager_attention(q, k, v, torch.tensor([-1e9]), window=w)[0, :, 0]  # (t, t)
    for i in range(t):
        seen = (out[i] > 0).nonzero().flatten().tolist()
        assert seen == list(range(max(0, i - w + 1), i + 1))


def test_sinks_take_their_share():
    # one key, score 0: with sink s the kept weight is 1 / (1 + e^s)
    q, k, v = torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 1, 4), torch.ones(1, 1, 1, 4)
    sinks = torch.tensor([0.0, 2.0])
    out = eager_attention(q, k, v, sinks, window=None)[0, 0, :, 0]
    assert torch.allclose(out, torch.sigmoid(-sinks))


def test_chunked_loss_equals_plain_cross_entropy():
    torch.manual_seed(1)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 9))
    labels[0, :5] = -100
    labels[2, 3] = -100
    total, count = chunked_cross_entropy(head, hidden, labels, chunk_size=4)
    logits = head(hidden)[:, :-1].reshape(-1, 50)
    ref = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    assert count.item() == (labels[:, 1:] != -100).sum().item()
    assert torch.allclose(total, ref, atol=1e-5)
    g, = torch.autograd.grad(total, hidden)
    g_ref, = torch.autograd.grad(ref, hidden)
    assert torch.allclose(g, g_ref, atol=1e-6)
    assert g[0, :4].abs().sum() == 0  # positions predicting ignored labels get no gradient


def test_frozen_head_loss_forms_its_gradient_in_one_pass_and_equals_plain_cross_entropy():
    """With the head frozen (always, in LoRA training) the gradient is formed in the forward; same values."""
    torch.manual_seed(2)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 9))
    labels[0, :5] = -100
    labels[2, 3] = -100
    total, _ = chunked_cross_entropy(head, hidden, labels, chunk_size=4)
    assert type(total.grad_fn).__name__ == "_HeadCrossEntropyBackward"
    ref = F.cross_entropy(head(hidden)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(total, ref, rtol=1e-6, atol=1e-5)
    g, = torch.autograd.grad(total * 0.37, hidden)              # the upstream gradient scales it
    g_ref, = torch.autograd.grad(ref * 0.37, hidden)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)
    assert g[0, :4].abs().sum() == 0 and g[2, 2].abs().sum() == 0   # ignored targets: no gradient


def test_loss_at_target_rows_equals_the_chunked_loss_and_plain_cross_entropy(tiny_model):
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 30))
    labels = ids.clone()
    labels[:, :11] = -100
    labels[1, 24:] = -100
    rows, targets = target_rows(labels)
    flat = labels[:, 1:].reshape(-1)
    assert rows.tolist() == [i for i, t in enumerate(flat.tolist()) if t != -100]
    assert torch.equal(targets, flat[rows])

    hidden = tiny_model.hidden_states(ids)
    chunked, count = chunked_cross_entropy(tiny_model.lm_head, hidden, labels, chunk_size=8)
    at_rows = cross_entropy_rows(tiny_model.lm_head, hidden, rows, targets, chunk_size=8)
    plain = F.cross_entropy(tiny_model.lm_head(hidden)[:, :-1].reshape(-1, tiny_model.config.vocab_size),
                            flat, reduction="sum")
    assert count.item() == len(rows) == 32
    params = list(tiny_model.parameters())
    g_rows = torch.autograd.grad(at_rows, params, retain_graph=True)
    for other in (chunked, plain, tiny_model.loss_rows(ids, rows, targets)):
        torch.testing.assert_close(at_rows, other, rtol=1e-6, atol=0)
        for name, a, b in zip(dict(tiny_model.named_parameters()), g_rows,
                              torch.autograd.grad(other, params, retain_graph=True)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_mean_loss_is_sum_over_count(tiny_model):
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 16))
    labels = torch.full_like(ids, -100)
    labels[0, 5:9] = ids[0, 5:9]
    labels[1, 14:] = ids[1, 14:]
    with torch.no_grad():
        total, count = tiny_model.loss(ids, labels, reduction="sum")
        mean = tiny_model.loss(ids, labels)
    assert count.item() == 6 and torch.allclose(mean, total / 6)


def test_swiglu_backward_equals_autograd():
    from model.moe import swiglu, swiglu_reference
    x = (torch.randn(50, 12, dtype=torch.float64) * 6).requires_grad_()  # many values past the clamp at 7
    x.data[0, :4] = torch.tensor([7.0, -7.0, 7.0, 7.0], dtype=torch.float64)  # exactly on the bounds
    g = torch.randn(50, 6, dtype=torch.float64)
    ours, = torch.autograd.grad(swiglu(x, 1.702, 7.0), x, g)
    ref, = torch.autograd.grad(swiglu_reference(x, 1.702, 7.0), x, g)
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: swiglu(t, 1.702, 7.0), (x[1:4].detach().requires_grad_(),))


def test_block_mask_by_hand_equals_flex_from_the_dense_mask():
    from torch.nn.attention.flex_attention import create_block_mask
    from model.fast.flex import _block_mask, _mask_mod
    for t, window in ((1024, 128), (1024, None), (768, 200), (512, 8)):
        ours = _block_mask(t, window, "cpu")
        ref = create_block_mask(_mask_mod(window), None, None, t, t, device="cpu")
        for a, b in ((ours.kv_num_blocks, ref.kv_num_blocks), (ours.full_kv_num_blocks, ref.full_kv_num_blocks)):
            assert torch.equal(a, b), (t, window)
        for num, a, b in ((ours.kv_num_blocks, ours.kv_indices, ref.kv_indices),
                          (ours.full_kv_num_blocks, ours.full_kv_indices, ref.full_kv_indices)):
            for row in range(num.shape[-1]):
                n = int(num[0, 0, row])
                assert sorted(a[0, 0, row, :n].tolist()) == sorted(b[0, 0, row, :n].tolist())


# --- CUDA graphs: what a CPU can check (bench/check_cuda.py compares graph and eager on a GPU) -----

def test_padding_a_micro_batch_for_a_graph_changes_neither_loss_nor_gradients(tiny_model):
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 37))
    labels = ids.clone()
    labels[:, :9] = -100
    labels[1, 30:] = -100                                                # an example that ends early
    padded_ids, rows, targets = padded_step_inputs(ids, labels, pad_id=0, multiple=16)
    assert padded_ids.shape == (2, 48) and torch.equal(padded_ids[:, :37], ids)
    assert len(rows) == 64 and (targets[49:] == -100).all()              # 49 targets, padded rows ignored
    params = list(tiny_model.parameters())
    total, count = tiny_model.loss(ids, labels, reduction="sum")
    padded = tiny_model.loss_rows(padded_ids, rows, targets)
    assert count.item() == 49
    torch.testing.assert_close(padded, total, rtol=1e-6, atol=0)
    for a, b in zip(torch.autograd.grad(padded, params), torch.autograd.grad(total, params)):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()               # other shapes round a little otherwise
    _, rows, _ = padded_step_inputs(ids, torch.full_like(labels, -100), pad_id=0, multiple=16)
    assert len(rows) == 16                                               # never an empty step


def test_graph_problem_names_what_rules_graphs_out(tiny_config):
    from model.fast.gate import FastPaths
    fast = FastPaths(nf4_kernels=True, grouped_mm=True, cuda_graphs=True)   # as on an H100
    model = GptOss(tiny_config)
    inject(model, rank=4, verbose=False)
    assert graph_problem(model, fast) == "the model is on the CPU; CUDA graphs need a CUDA GPU"
    with pytest.raises(ValueError, match="cannot replay the step as a CUDA graph: the model is on the CPU"):
        GraphedStep(model, [p for _, p in lora_parameters(model)], fast)

    with_dropout = GptOss(tiny_config)
    inject(with_dropout, rank=4, dropout=0.1, verbose=False)
    assert "model.layers.0.self_attn.q_proj.dropout has dropout 0.1" in graph_problem(with_dropout, fast)

    model.model.embed_tokens.to("meta")          # may live anywhere (load_model's embedding_device):
    assert graph_problem(model, fast) == "the model is on the CPU; CUDA graphs need a CUDA GPU"   # looked up outside
    model.lm_head.to("meta")
    assert graph_problem(model, fast).startswith("lm_head.weight is on meta, the trainable parameters on cpu")

    grouped = GptOss(tiny_config)
    grouped.model.layers[1].mlp.experts = NF4Experts(tiny_config, group=4)   # load_model's experts_per_group
    inject(grouped, rank=4, verbose=False)
    assert graph_problem(grouped, fast).startswith("model.layers.1.mlp.experts holds its experts in groups of 4")

    model.requires_grad_(False)
    assert graph_problem(model, fast) == "the model has no trainable parameters"


# --- packed rows: several documents end to end, each attending only to itself ----------------------

def packed_row(docs, row_len):
    from data import packed_rows
    return packed_rows([(d, [-100] + d[1:]) for d in docs], row_len, pad_id=0)


def random_docs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 1000, (n,), generator=g).tolist() for n in lengths]


def test_a_packed_row_gives_each_document_the_logits_it_has_alone(tiny_model):
    docs = random_docs((13, 30, 5, 21))                     # 30 > the window of 8: sliding layers matter
    row = packed_row(docs, 80)                              # 11 pad tokens at the end
    assert row.doc_ids[0].tolist() == [0] * 13 + [1] * 30 + [2] * 5 + [3] * 21 + [PADDING_DOC] * 11
    assert row.positions[0, 13:16].tolist() == [0, 1, 2]    # positions restart per document
    with torch.no_grad():
        packed = tiny_model(row.input_ids, row.doc_ids, row.positions)[0]
        at = 0
        for d in docs:
            alone = tiny_model(torch.tensor([d]))[0]
            assert (packed[at:at + len(d)] - alone).abs().max() < 1e-5
            at += len(d)


def test_a_document_never_sees_another(tiny_model):
    docs = random_docs((13, 30, 5, 21))
    row = packed_row(docs, 72)
    changed = row.input_ids.clone()
    changed[0, 43:48] = torch.tensor(random_docs((5,), seed=1)[0])   # document 2's tokens
    with torch.no_grad():
        a = tiny_model(row.input_ids, row.doc_ids, row.positions)[0]
        b = tiny_model(changed, row.doc_ids, row.positions)[0]
    assert not torch.equal(a[43:48], b[43:48])
    assert torch.equal(a[:43], b[:43])                        # the documents before: bit for bit
    # after: the experts' grouped products hold these tokens' rows at other offsets (the changed
    # tokens route elsewhere), where a product rounds differently; attention alone is bit for bit
    assert (a[48:] - b[48:]).abs().max() < 1e-5
    q, k, v = torch.randn(1, 72, 4, 16), torch.randn(1, 72, 2, 16), torch.randn(1, 72, 2, 16)
    sinks = torch.randn(4)
    for window in (None, 8):
        ref = eager_attention(q, k, v, sinks, window, row.doc_ids)
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for x in (q2, k2, v2):
            x[:, 43:48] = torch.randn(1, 5, *x.shape[2:])
        out = eager_attention(q2, k2, v2, sinks, window, row.doc_ids)
        assert torch.equal(ref[:, :43], out[:, :43]) and torch.equal(ref[:, 48:], out[:, 48:])
        assert not torch.equal(ref[:, 43:48], out[:, 43:48]) and out.isfinite().all()


def summed_alone(model, examples, params):
    """The summed loss of each (ids, labels) example run alone, and the sum of their gradients."""
    total, grads = 0.0, [torch.zeros_like(p) for p in params]
    for ids, labels in examples:
        t, _ = model.loss(torch.tensor([ids]), torch.tensor([labels]), "sum")
        total = total + t.detach()
        for acc, g in zip(grads, torch.autograd.grad(t, params)):
            acc += g
    return total, grads


def test_packed_gradients_equal_the_sum_over_the_examples_alone_sinks_included(tiny_model):
    inject(tiny_model, rank=4, alpha=8, verbose=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in lora_parameters(tiny_model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    sinks = [b.self_attn.sinks for b in tiny_model.model.layers]
    for s in sinks:
        s.requires_grad_(True)                                # train the sinks too: their gradient must flow
    params = [p for _, p in lora_parameters(tiny_model)] + sinks
    docs = random_docs((17, 9, 26))
    examples = [(d, [-100] * (len(d) - 4) + d[-4:]) for d in docs]   # the last 4 tokens are targets
    from data import packed_rows
    row = packed_rows(examples, 60, pad_id=0)
    total, count = tiny_model.loss(row.input_ids, row.labels, "sum", row.doc_ids, row.positions)
    packed = torch.autograd.grad(total, params)
    alone_total, alone = summed_alone(tiny_model, examples, params)
    assert count.item() == 3 * 4                              # 4 targets each, none across documents
    torch.testing.assert_close(total.detach(), alone_total, rtol=1e-6, atol=1e-5)
    for a, b in zip(packed, alone):
        assert (a - b).abs().max() < 1e-5
    assert all(s.abs().sum() > 0 for s in packed[-len(sinks):])   # every layer's sinks learn


def test_packed_step_inputs_for_a_graph_change_neither_loss_nor_gradients(tiny_model):
    row = packed_row(random_docs((13, 20)), 37)
    labels = row.input_ids.clone()
    labels[row.positions < 5] = -100                          # each document's first 5 are not trained
    labels[row.doc_ids == 2] = -100
    ids, rows, targets, doc_ids, positions = padded_step_inputs(row.input_ids, labels, pad_id=0, multiple=16,
                                                                doc_ids=row.doc_ids, positions=row.positions)
    assert ids.shape == doc_ids.shape == positions.shape == (1, 48) and doc_ids[0, 37:].eq(PADDING_DOC + 1).all()
    total, _ = tiny_model.loss(row.input_ids, labels, "sum", row.doc_ids, row.positions)
    padded = tiny_model.loss_rows(ids, rows, targets, doc_ids, positions)
    torch.testing.assert_close(padded, total, rtol=1e-6, atol=0)


@pytest.mark.parametrize("lengths", [(300, 200, 12, 500), (128, 128, 256, 1, 511), (1024,), (5, 1019)])
def test_document_block_mask_equals_flex_from_the_dense_mask(lengths):
    """The block mask of packed rows, built from per-block first and last document ids, is exactly
    the one flex works out from the same mask_mod over every (query, key) pair."""
    from torch.nn.attention.flex_attention import create_block_mask
    from model.fast.flex import _document_mask_mod, document_block_mask
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    doc_ids = torch.stack([doc_ids, doc_ids.flip(0).neg() + len(lengths)])   # a second row, other boundaries
    doc_ids = torch.cat([doc_ids, (doc_ids[:, -1:] + 1).expand(2, -doc_ids.shape[1] % 128)], dim=1)
    t = doc_ids.shape[1]
    for window in (128, None, 200, 8):
        ours = document_block_mask(doc_ids, window)
        ref = create_block_mask(_document_mask_mod(doc_ids, window), 2, None, t, t, device="cpu")
        for a, b in ((ours.kv_num_blocks, ref.kv_num_blocks), (ours.full_kv_num_blocks, ref.full_kv_num_blocks)):
            assert torch.equal(a, b), (lengths, window)
        for num, a, b in ((ours.kv_num_blocks, ours.kv_indices, ref.kv_indices),
                          (ours.full_kv_num_blocks, ours.full_kv_indices, ref.full_kv_indices)):
            for row in range(2):
                for q in range(num.shape[-1]):
                    n = int(num[row, 0, q])
                    assert sorted(a[row, 0, q, :n].tolist()) == sorted(b[row, 0, q, :n].tolist())


@pytest.mark.parametrize("t, packed", [(256, False), (200, False), (256, True)])
def test_flex_attention_with_sinks_equals_eager_attention_on_the_cpu(monkeypatch, t, packed):
    """flex_attention_with_sinks (flex itself uncompiled: on the CPU it runs as written, forward only)
    against the eager twin (the sink scale is float32, so 1e-6), sinks included; and its output comes back (b, t, h, d) contiguous when no
    padding was needed, so o_proj's reshape copies nothing. Gradients: tests/test_gpu.py."""
    from torch.nn.attention.flex_attention import flex_attention
    from model.attention import eager_attention
    from model.fast import flex
    monkeypatch.setattr(flex, "_compiled_flex", lambda: flex_attention)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, t, h, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    sinks = torch.randn(4, generator=g, dtype=torch.float64)
    doc_ids = torch.cat([torch.zeros(2, 100, dtype=torch.long), torch.ones(2, t - 100, dtype=torch.long)], 1) \
        if packed else None
    for window in (None, 64):
        out = flex.flex_attention_with_sinks(q, k, v, sinks, window, doc_ids)
        torch.testing.assert_close(out, eager_attention(q, k, v, sinks, window, doc_ids), rtol=1e-6, atol=1e-6)
        assert out.is_contiguous() or t % flex.BLOCK   # b = 2: a padded length comes back sliced
