"""Elementwise chains fused on the GPU.

An RMSNorm, a rotary embedding or the clamped SwiGLU is a chain of a dozen small elementwise
kernels, forward and backward; at gpt-oss's sizes the step spends more time launching them than
computing. `compilable` gives such a function a twin through torch.compile (one fused kernel each
way, and only the inputs kept for the backward), which runs when the caller passes `compiled=True`
(the gate's `FastPaths.compiled`, on a CUDA input); otherwise the plain function runs as written,
and the GPU tests compare the two.
"""
from __future__ import annotations

import functools

import torch


def compilable(fn):
    compiled_fn = None

    @functools.wraps(fn)
    def run(x, *args, compiled: bool = False):
        nonlocal compiled_fn
        if not (compiled and x.is_cuda):
            return fn(x, *args)
        if compiled_fn is None:
            compiled_fn = torch.compile(fn, dynamic=True)  # one kernel for every length
        return compiled_fn(x, *args)

    return run
