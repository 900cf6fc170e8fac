"""A micro-batch's forward and backward replayed as one CUDA graph.

At short sequences the step is bound by the host: 24 layers x (forward, recompute, backward) are
thousands of small kernel launches, each costing the CPU more than the GPU. A CUDA graph records the
launches once and replays them all with one call.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..loss import IGNORE, target_rows
from ..weights.mxfp4 import MXFP4Experts
from ..weights.nf4 import NF4Experts
from .flex import BLOCK
from .gate import FastPaths

MULTIPLE = BLOCK  # tokens are padded to flex attention's block (it pads to that anyway), target rows alike


def graph_problem(model: nn.Module, fast: FastPaths) -> str | None:
    """Why the training step of `model` cannot be captured in a CUDA graph under the gate's `fast`
    paths, or None if it can."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        return "the model has no trainable parameters"
    for name, m in model.named_modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            return (f"{name} has dropout {m.p:g}: a checkpointed block replays its dropout mask from the "
                    "saved RNG state, which a capture cannot read; train with dropout 0")
    if getattr(model, "offload_activations", False) and getattr(model, "gradient_checkpointing", False):
        return ("the blocks' inputs are offloaded to host memory (--offload-activations), into buffers made "
                "at each step, which a replayed graph would not own")
    for name, m in model.named_modules():
        if isinstance(m, NF4Experts) and m.group < m.num_experts:
            return (f"{name} holds its experts in groups of {m.group} (experts_per_group), which slices the "
                    "rows by counts read back to the host; load without experts_per_group")
    device = trainable[0].device
    embedding = model.model.embed_tokens.weight                     # looked up outside the graph
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device != device and t is not embedding:
            return (f"{name} is on {t.device}, the trainable parameters on {device}: a graph replays the "
                    "work of one GPU only")
    if device.type != "cuda":
        return f"the model is on the {device.type.upper()}; CUDA graphs need a CUDA GPU"
    if not fast.cuda_graphs:
        return "the gate chose the plain path (--kernels plain, or a GPU without bf16)"
    dtype = model.model.embed_tokens.weight.dtype
    if dtype != torch.bfloat16:
        return (f"with {dtype} activations the experts run their per-expert loop, which reads the expert "
                "counts back to the host; only bfloat16 runs the grouped kernels")
    if not fast.grouped_mm:
        # Without torch._grouped_mm (one kernel on sm_90/sm_100 only), only the fused NF4 (or MXFP4) layer
        # keeps the expert counts on the GPU: frozen experts in one group, not wrapped (by LoRA).
        for i, block in enumerate(model.model.layers):
            m = block.mlp.experts
            fused = isinstance(m, (NF4Experts, MXFP4Experts)) and fast.nf4_kernels and \
                not any(p.requires_grad for p in m.parameters())
            if not fused:
                return (f"layer {i}'s experts ({type(m).__name__}) would loop over the experts with counts read "
                        "back to the host: torch._grouped_mm is a single kernel on sm_90/sm_100 only")
    return None


def padded_step_inputs(input_ids, labels, pad_id: int, multiple: int = MULTIPLE, doc_ids=None, positions=None):
    """(input_ids, rows, targets) of a micro-batch, padded: tokens to a multiple of `multiple`, rows too.

    Exact: the model is causal, so pad tokens appended after a row change no real position; padded
    rows (row 0, target -100) add nothing to the loss. Padding makes one graph serve every micro-batch
    of about the same length. Computed where the labels are (CPU labels: no GPU sync).
    Packed rows also give (doc_ids, positions), padded too: the pad tokens are one more document.
    """
    extra = -input_ids.shape[1] % multiple
    input_ids = F.pad(input_ids, (0, extra), value=pad_id)     # (batch, padded seq)
    rows, targets = target_rows(F.pad(labels, (0, extra), value=IGNORE))
    n = multiple * max(1, -(-len(rows) // multiple))           # rows rounded up, never none
    out = (input_ids, F.pad(rows, (0, n - len(rows))), F.pad(targets, (0, n - len(rows)), value=IGNORE))
    if doc_ids is None:
        return out
    doc_ids = torch.cat([doc_ids, (doc_ids[:, -1:] + 1).expand(-1, extra)], dim=1)
    return (*out, doc_ids, F.pad(positions, (0, extra)))


class GraphedStep:
    """One micro-batch's forward and backward, `model.decoded_loss(...)` and its gradient, as a CUDA graph.

    A graph replays fixed kernels on fixed memory. So the inputs are copied into static buffers (the
    embeddings, looked up outside the graph wherever the embedding lives, the target rows and their
    tokens; for packed rows also the document ids and positions, from which the graph itself builds
    the attention block masks and gathers the rotary angles at each replay), and a graph is captured
    per key, the padded (batch, seq) shape, the number of target rows and whether the rows are packed:
    a new key costs a capture (two warm-up runs and the recording), a known one a replay. Packed rows
    of one length and about as many targets are one key: one graph for the whole run.
    What a replay reads besides (rotary tables, attention block masks) is cached for good by the model. All graphs draw their temporaries from one memory pool,
    which is safe as they never run at the same time.
    The graph never touches `param.grad` (autograd could re-assign it instead of accumulating in
    place, which a replay would silently miss): it writes the gradient of the micro-batch's summed
    loss into static buffers shared by all graphs, and `step` adds scale x those into `param.grad`,
    as `(total * scale).backward()` would.
    """

    def __init__(self, model: nn.Module, params, fast: FastPaths):
        problem = graph_problem(model, fast)
        if problem is not None:
            raise ValueError(f"cannot replay the step as a CUDA graph: {problem}")
        self.model, self.params = model, list(params)
        self.pad_id = model.config.pad_token_id
        self.grads = [torch.zeros_like(p) for p in self.params]    # the graphs' gradient outputs
        self.pool = torch.cuda.graph_pool_handle()
        self.side = torch.cuda.Stream()                             # for the warm-up runs
        self.graphs = {}  # key -> (graph, static embeddings, rows, targets[, doc ids, positions], summed loss)
        self.captures = 0

    def step(self, input_ids, labels, scale: float, doc_ids=None, positions=None) -> torch.Tensor:
        """Add scale x d(summed loss)/d(param) to each param.grad; return the summed loss (float32, on the GPU).

        Packed rows pass their doc_ids and positions (batch, seq), as `GptOss.loss` takes them.
        """
        ids, rows, targets, *packed = padded_step_inputs(input_ids, labels, self.pad_id, doc_ids=doc_ids,
                                                         positions=positions)
        with torch.no_grad():
            x = self.model.embed(ids)                               # (batch, seq, hidden) on the GPU
        inputs = (x, rows, targets, *packed)                        # what decoded_loss takes, in order
        key = (tuple(ids.shape), len(rows), bool(packed))
        if key not in self.graphs:
            self.graphs[key] = self._capture(inputs)
        graph, *static, total = self.graphs[key]
        for buffer, value in zip(static, inputs):
            # from pinned memory the copy is asynchronous; from pageable memory the driver may wait
            buffer.copy_(value.pin_memory() if value.device.type == "cpu" else value, non_blocking=True)
        graph.replay()
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        torch._foreach_add_([p.grad for p in self.params], self.grads, alpha=scale)
        return total.clone()

    def _capture(self, inputs):
        device = self.grads[0].device
        static = [t.to(device, copy=True) for t in inputs]         # filled with this micro-batch
        # warm-up off the capture: compiles, autotunes and lazily initialised state happen here
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            for _ in range(2):
                torch.autograd.grad(self.model.decoded_loss(*static), self.params, allow_unused=True)
        torch.cuda.current_stream().wait_stream(self.side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            total = self.model.decoded_loss(*static)
            # (a parameter the loss does not reach gets zeros, where eager would leave its .grad None)
            torch._foreach_copy_(self.grads, torch.autograd.grad(total, self.params, materialize_grads=True))
        self.captures += 1
        return graph, *static, total.detach()
