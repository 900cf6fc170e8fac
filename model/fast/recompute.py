"""Telling gradient checkpointing's recomputation of a block apart from its forward.

A recomputation keeps only the tensors the backward saved; whatever comes after the last of them in
the block is wasted work, which an NF4 expert layer skips (model/fast/nf4_layer.py).

Global state (a flag, not a cache), and why: checkpoint replays the block's own call, so no argument
can tell the recomputation apart; its context_fn, which takes none, is the hook torch gives. Per
thread, since the recomputation runs on autograd's thread.
"""
from __future__ import annotations

import contextlib
import threading


class _Recomputation(threading.local):
    active = False


_RECOMPUTATION = _Recomputation()


@contextlib.contextmanager
def recomputation():
    """Marks the recomputation of a block (in effect while it runs)."""
    before, _RECOMPUTATION.active = _RECOMPUTATION.active, True
    try:
        yield
    finally:
        _RECOMPUTATION.active = before


def in_recomputation() -> bool:
    return _RECOMPUTATION.active


def mark_recomputation():
    """checkpoint's context_fn: nothing around the forward, `recomputation` around the recomputation.

    An NF4 expert layer skips its tail there, which is sound because each checkpointed region is one
    block, and nothing in a block after its expert layer saves a tensor for the backward.
    """
    return contextlib.nullcontext(), recomputation()
