"""Offloaded checkpoints: each block's saved input kept in pinned host memory, not on the GPU.

Gradient checkpointing keeps one tensor per block, its input (tokens x hidden, bf16): at 131,072
tokens that is 0.7 GiB a block, 17 GiB for gpt-oss-20b's 24. With offloading, each block's input is
copied to pinned host memory on a side CUDA stream while the block's forward runs, and its GPU copy
is freed; in the backward, as a block's recomputation starts, the input of the block before it is
copied back on the side stream, so the copy overlaps that block's backward. The last block's input
is copied back as soon as the forward ends (the loss runs meanwhile). On the GPU at most a few
blocks' inputs exist at once.

The values are copied, never changed, so the gradients are bit-identical to those without
offloading. On the CPU (the tests) the "host" copy is a plain copy made at once, so the same logic
runs without streams.

    offload = Offload(x.device)
    x = checkpoint(offload.run, block, offload.keep(x), ...)   # per block, in order
    offload.forward_done()                                      # after the last block
"""
from __future__ import annotations

import torch


def to_host(x: torch.Tensor, stream) -> torch.Tensor:
    """A host copy of x: pinned, written on `stream` after what the current stream has queued (CUDA);
    a plain copy at once without a stream (the CPU)."""
    if stream is None:
        return x.detach().clone()
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    stream.wait_stream(torch.cuda.current_stream(x.device))     # x is ready
    with torch.cuda.stream(stream):
        host.copy_(x.detach(), non_blocking=True)
    x.record_stream(stream)   # x's memory is not reused before the copy has read it
    return host


def to_device(host: torch.Tensor, device, stream):
    """(a copy of `host` on `device`, an event the current stream waits for before reading it)."""
    if stream is None:
        return host.clone(), None
    current = torch.cuda.current_stream(device)
    out = torch.empty(host.shape, dtype=host.dtype, device=device)   # from the current stream's memory
    stream.wait_stream(current)   # that memory may still be in use by what the current stream has queued
    with torch.cuda.stream(stream):
        out.copy_(host, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    out.record_stream(stream)
    return out, done


class Offloaded:
    """One block's input: handed out as is to the block's forward, then only on the host until fetched."""

    def __init__(self, x: torch.Tensor, stream, previous: "Offloaded | None"):
        self.device, self.requires_grad, self.stream, self.previous = x.device, x.requires_grad, stream, previous
        self.host = to_host(x, stream)
        self.gpu, self.ready = x, None           # the forward's own tensor, until the forward takes it
        self.forward_taken = False

    def fetch(self):
        """Start copying the input back to the device (if not already there)."""
        if self.gpu is None:
            self.gpu, self.ready = to_device(self.host, self.device, self.stream)

    def get(self) -> torch.Tensor:
        """The block's input: the forward's own tensor the first time; in each recomputation a copy back
        from the host (a leaf, as the recomputation wants), and the previous block's fetch started."""
        if not self.forward_taken:
            self.forward_taken = True
            x, self.gpu = self.gpu, None
            return x
        self.fetch()
        if self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
        x, self.gpu, self.ready = self.gpu, None, None
        if self.previous is not None:
            self.previous.fetch()        # overlaps this block's backward
        return x.detach().requires_grad_(self.requires_grad)


class Offload:
    """The blocks' inputs of one forward, kept on the host in order (one per checkpointed block)."""

    def __init__(self, device):
        device = torch.device(device)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.kept: list[Offloaded] = []

    def keep(self, x: torch.Tensor) -> Offloaded:
        self.kept.append(Offloaded(x, self.stream, self.kept[-1] if self.kept else None))
        return self.kept[-1]

    @staticmethod
    def run(block, held: Offloaded, *args):
        """A checkpointed block whose input comes from `held`."""
        return block(held.get(), *args)

    def forward_done(self):
        """The last block's recomputation comes first in the backward: its input starts back now."""
        if self.kept:
            self.kept[-1].fetch()
