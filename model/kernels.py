"""Elementwise chains fused on the GPU.

An RMSNorm, a rotary embedding or the clamped SwiGLU is a chain of a dozen small elementwise
kernels, forward and backward; at gpt-oss's sizes the step spends more time launching them than
computing. `cuda_compiled` hands such a function to torch.compile when its input is on CUDA (one
fused kernel each way, and only the inputs kept for the backward); on the CPU the plain function
runs as written, and the tests compare the two on the GPU (bench/check_cuda.py).
"""
from __future__ import annotations

import functools

import torch


def cuda_compiled(fn):
    compiled = None

    @functools.wraps(fn)
    def run(x, *args):
        nonlocal compiled
        if not x.is_cuda:
            return fn(x, *args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)  # one kernel for every length
        return compiled(x, *args)

    return run
