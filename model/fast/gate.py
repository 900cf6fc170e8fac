"""The one place that decides which fast paths run on a device.

Each fast path has a plain twin that is always there and always correct; which one runs is decided
here, once per device, from what the device and the installed torch and Triton can do, and never by
`hasattr` or a dtype test further down. The model and train.py pass the decision (`FastPaths`) down
as an argument; `describe` gives the lines train.py prints at start.

    experts        NF4 Triton kernels (model/fast/nf4_gemm.py)   | dequantise, then one product
                   (MXFP4 experts: model/fast/mxfp4_gemm.py, under the same switch, `nf4_kernels`;
                   `describe(base)` names the kernels of the run's base)
    grouped_mm     torch._grouped_mm over expert-sorted rows     | a loop over experts (host counts)
    attention      flex attention (model/fast/flex.py)           | eager attention (score matrix)
    compiled       torch.compile'd elementwise chains, and the   | the same chains, op by op
                   rotary embedding's Triton kernel (rotary.py)
    cuda_graphs    each micro-batch replayed as a CUDA graph     | eager launches

`dense_experts` is not the device's to decide but memory's: the model sets it (GptOss.dense_experts,
where the experts' kernels and torch._grouped_mm both run) when the memory plan has room for a layer's
experts in bf16.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch

# What the NF4 and MXFP4 kernels need of Triton: tl.gather (Triton 3.2) for the 16-value code book.
MIN_TRITON = (3, 2)
# gpt-oss computes in bfloat16, which the tensor cores have from Ampere (sm_80) on.
MIN_CAPABILITY = (8, 0)


# The experts' kernels of each base (train.py's --base); the one switch, nf4_kernels, runs either.
EXPERT_KERNELS = {"nf4": "NF4 Triton kernels (model/fast/nf4_gemm.py)",
                  "mxfp4": "MXFP4 Triton kernels (model/fast/mxfp4_gemm.py)"}


@dataclass(frozen=True)
class FastPaths:
    """Which fast paths run (True) and, for each, the line that says why (printed at start)."""
    nf4_kernels: bool = False                   # the experts' Triton kernels, NF4 and MXFP4 alike
    grouped_mm: bool = False
    flex_attention: bool = False
    compiled: bool = False
    cuda_graphs: bool = False
    dense_experts: bool = False                 # the experts dequantised a layer at a time, then torch._grouped_mm
                                                # (model/fast/dense_gemm.py): a memory choice, GptOss.dense_experts
    capability: tuple[int, int] | None = None   # the CUDA device's (major, minor); None on the CPU
    why: tuple[tuple[str, str], ...] = ()       # (path, reason) in the order printed; where the experts'
                                                # kernels run, their reason says only where ("on sm_90")

    def describe(self, base: str = "nf4") -> str:
        """The lines train.py prints at start. The device's decision holds for either base; the experts'
        line names the kernels that run for this one (`base`: "nf4" or "mxfp4", train.py's --base)."""
        if base not in EXPERT_KERNELS:
            raise ValueError(f"base must be one of {', '.join(EXPERT_KERNELS)}, not {base!r}")
        lines = []
        for path, reason in self.why:
            if path == "experts" and self.nf4_kernels:
                reason = f"{EXPERT_KERNELS[base]} {reason}"
            lines.append(f"  {path:<12} {reason}")
        return "\n".join(lines)


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def _triton_problem() -> str | None:
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return "Triton is not installed (the CUDA build of torch ships it)"
    if _version(triton.__version__) < MIN_TRITON or not hasattr(tl, "gather"):
        return f"Triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))} (no tl.gather)"
    return None


def _flex_problem() -> str | None:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no flex attention"
    import inspect
    if "return_lse" not in inspect.signature(flex_attention).parameters:
        return f"torch {torch.__version__}'s flex attention cannot return the log-sum-exp the sinks need"
    return None


PLAIN = FastPaths(why=(("everything", "plain path: --kernels plain"),))


def cpu_paths() -> FastPaths:
    """On the CPU every path is plain, except the NF4 kernels under Triton's interpreter (the tests)."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1" and _triton_problem() is None
    return FastPaths(nf4_kernels=interpret, why=(
        ("experts", "in Triton's interpreter (TRITON_INTERPRET=1)" if interpret
         else "plain path: dequantise, then multiply (CPU)"),
        ("attention", "plain path: eager attention (CPU)"),
    ))


@functools.lru_cache(maxsize=None)
def _cuda_paths(index: int) -> FastPaths:
    cap = torch.cuda.get_device_capability(index)
    sm = f"sm_{cap[0]}{cap[1]}"
    if cap < MIN_CAPABILITY:
        return dataclasses.replace(PLAIN, capability=cap, why=(("everything", f"plain path: {sm} has no bf16"),))
    triton_problem = _triton_problem()
    flex_problem = _flex_problem()
    # torch._grouped_mm is one kernel on sm_90/sm_100; elsewhere torch loops over the groups, reading
    # the offsets back to the host: a sync per call, and illegal inside a CUDA graph capture.
    grouped = hasattr(torch, "_grouped_mm") and cap[0] in (9, 10)
    why = [
        ("experts", f"on {sm}" if triton_problem is None
         else f"plain path: dequantise, then multiply ({triton_problem})"),
        ("grouped_mm", f"torch._grouped_mm, one kernel per projection ({sm})" if grouped
         else f"plain path: a loop over experts (torch._grouped_mm is a single kernel on sm_90/sm_100 "
              f"only; this is {sm})"),
        ("attention", f"flex attention ({sm})" if flex_problem is None
         else f"plain path: eager attention ({flex_problem})"),
        ("compiled", "torch.compile'd elementwise chains" if triton_problem is None
         else f"plain path: elementwise ops one by one ({triton_problem})"),
        ("cuda_graphs", "each micro-batch replayed as a CUDA graph, where the model allows it"),
    ]
    return FastPaths(nf4_kernels=triton_problem is None, grouped_mm=grouped, flex_attention=flex_problem is None,
                     compiled=triton_problem is None, cuda_graphs=True, capability=cap, why=tuple(why))


def decide(device, kernels: str = "auto") -> FastPaths:
    """The fast paths for `device` ("auto": every one the device and the installed versions allow;
    "plain": none). The same answer every time for one device."""
    if kernels not in ("auto", "plain"):
        raise ValueError(f"kernels must be auto or plain, not {kernels!r}")
    device = torch.device(device)
    if kernels == "plain":
        cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        return dataclasses.replace(PLAIN, capability=cap)
    if device.type != "cuda":
        return cpu_paths()
    return _cuda_paths(device.index if device.index is not None else torch.cuda.current_device())


def dense_experts_problem(fast: FastPaths | None) -> str | None:
    """Why the experts' dense path (model/fast/dense_gemm.py) cannot run under `fast`, or None: its
    dequantisation is a Triton kernel, and its product must be torch._grouped_mm's single kernel.
    GptOss.fast grants `dense_experts` and memory_plan chooses it by this one test."""
    if fast is None or not fast.nf4_kernels:
        return "the experts' Triton kernels do not run here (its dequantisation is one)"
    if not fast.grouped_mm:
        return "torch._grouped_mm is a single kernel on sm_90/sm_100 only"
    return None


def bf16_problem(device) -> str | None:
    """Why gpt-oss cannot train on this GPU, or None: it computes in bfloat16 (sm_80 and newer)."""
    cap = torch.cuda.get_device_capability(device)
    if cap >= MIN_CAPABILITY:
        return None
    name = torch.cuda.get_device_name(device)
    return (f"{name} (sm_{cap[0]}{cap[1]}) has no bfloat16 tensor cores, and gpt-oss computes in bfloat16 "
            "(this program has no float16 path: gpt-oss was trained in bfloat16). Use an Ampere (sm_80) or newer GPU: A10/A100/L4/RTX 30xx "
            "and later")
