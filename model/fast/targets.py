"""The NF4 and MXFP4 kernels compiled for a GPU generation on a machine without one (tests and bench only).

Triton compiles for any NVIDIA target without a device (its wheel ships ptxas), so the tiles that
`nf4_gemm.tiles_for` picks for each generation can be checked here: every kernel variant the code
launches, specialised on its arguments as the JIT specialises gpt-oss's real ones, must fit the
generation's shared memory, and how many registers it takes and spills is read from ptxas.
Used by tests/test_kernel_targets.py and bench/kernel_targets.py; nothing at run time imports it.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import dense_gemm, mxfp4_gemm, nf4_gemm

# Shared memory a block may use (the opt-in maximum, bytes), per compute capability: the data-center
# parts have more than the consumer ones, whose registers per thread also run out sooner.
SHARED_MEMORY = {(8, 0): 166_912, (8, 6): 101_376, (8, 9): 101_376, (9, 0): 232_448, (10, 0): 232_448,
                 (12, 0): 101_376}

# The arguments' types at run time (bf16 activations, NF4 codes as bytes, fp32 scales and code book;
# MXFP4 codes and scales as bytes, fp32 e2m1 values; bf16 routing weights, fp32 <g, h>) and gpt-oss's
# sizes: K = 2880 in, N = 5760 (gate_up) or 2880 (down) out, 32 or 128 experts; the MLP backward's
# rows (8,192: 2,048 tokens, top-4) and intermediate width; the rows' sums' tokens and width.
POINTERS = {"x_ptr": "*bf16", "dy_ptr": "*bf16", "src_ptr": "*i32", "packed_ptr": "*u8", "absmax_ptr": "*fp32",
            "absmax_offset_ptr": "*fp32", "code_ptr": "*fp32", "offsets_ptr": "*i32", "bias_ptr": "*bf16",
            "add_ptr": "*bf16", "y_ptr": "*bf16", "h_ptr": "*bf16", "dx_ptr": "*bf16", "blocks_ptr": "*u8",
            "scales_ptr": "*u8", "lut_ptr": "*fp32", "g_ptr": "*bf16", "w_ptr": "*bf16", "gh_ptr": "*fp32",
            "out_ptr": "*bf16", "rows_ptr": "*bf16", "inverse_ptr": "*i64", "qabsmax_ptr": "*u8",
            "absmax2_ptr": "*fp32", "code2_ptr": "*fp32"}
GPT_OSS_INTS = {"K": 2880, "N": 5760, "num_experts": 32, "rows": 8192, "inter": 2880,
                "n_blocks": 32 * 2880 * 5760 // 64, "tokens": 2048, "H": 2880}


def source(kernel, constexprs: dict, ints: dict = GPT_OSS_INTS) -> ASTSource:
    """The kernel as the JIT builds it for these arguments: every pointer 16-byte aligned (torch's
    allocations are), an int that is a multiple of 16 marked divisible by 16, an int equal to 1
    folded into a constant (Triton 3's specialisation), floats not specialised; a size the kernel
    declares a constexpr takes its value from `ints`."""
    signature, attrs, constexprs = {}, {}, dict(constexprs)
    for i, name in enumerate(kernel.arg_names):
        if kernel.params[i].is_constexpr and name in ints and name not in constexprs:
            constexprs[name] = ints[name]          # a size the kernel takes as a constexpr (its loop's bound)
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = POINTERS[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ints and ints[name] == 1:
            signature[name], constexprs[name] = "constexpr", 1
        elif name in ints:
            signature[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    return ASTSource(kernel, signature, constexprs, attrs)


LAUNCH_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")   # in a tiles dict: the launch's, not arguments


def compile_for(capability: tuple[int, int], kernel, constexprs: dict, tiles: dict, ints: dict = GPT_OSS_INTS):
    """triton.compile of one kernel variant with these tiles, for sm_{major}{minor}."""
    block = {k: v for k, v in tiles.items() if k not in LAUNCH_OPTIONS}
    options = {k: tiles[k] for k in LAUNCH_OPTIONS if k in tiles}   # else the JIT's defaults
    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    return triton.compile(source(kernel, {**constexprs, **block}, ints), target=target, options=options)


def launches(capability: tuple[int, int]) -> list[tuple[str, object, dict, dict]]:
    """(name, kernel, constexprs, tiles) of every variant nf4_gemm launches on this generation, then
    mxfp4_gemm's (named "mxfp4 ..."), then the expert MLP's backward, expert LoRA's SwiGLU of y, the
    sums of each token's rows (both take them) and NF4's one-kernel dequantisation (the attention's NF4
    weights'), then where torch._grouped_mm is one kernel (sm_90, sm_100) the dense path's
    (dense_gemm.py): MXFP4's dequantisation and the epilogue's variants."""
    out = []
    for module, prefix in ((nf4_gemm, ""), (mxfp4_gemm, "mxfp4 ")):
        tiles, tiles_t = module.tiles_for(capability)
        for constexprs in module.FORWARD_VARIANTS:
            name = prefix + "y=x@W" + "".join(f" {k.lower()}" for k, on in constexprs.items() if on)
            out.append((name, module._grouped_mm_kernel, constexprs, tiles))
        for constexprs in module.TRANSPOSED_VARIANTS:
            name = prefix + "dx=dy@W^T" + "".join(f" {k.lower()}" for k, on in constexprs.items() if on)
            out.append((name, module._grouped_mm_t_kernel, constexprs, tiles_t))
    out.append(("mlp backward", nf4_gemm._mlp_backward_kernel, {"AT_BOUND_PASSES": nf4_gemm.CLAMP_PASSES_AT_BOUND},
                nf4_gemm.MLP_BACKWARD_TILES))
    out.append(("swiglu of y (expert lora)", dense_gemm._epilogue_kernel, {**dense_gemm.SWIGLU_ONLY, "EP": 32},
                dense_gemm.EPILOGUE_TILES))
    for constexprs in nf4_gemm.SUM_ROWS_VARIANTS:
        name = "sum rows" + " weighted" * constexprs["WEIGHTED"]
        out.append((name, nf4_gemm._sum_rows_kernel, {**constexprs, "K": 4}, nf4_gemm.SUM_ROWS_TILES))
    out.append(("dequantize", nf4_gemm._dequantize_kernel, {"BLOCK2": 256, "PAIRS": True, "BF16": True},
                nf4_gemm.DEQUANTIZE_TILES))
    if capability[0] in (9, 10):
        out.append(("mxfp4 dequantize", mxfp4_gemm._dequantize_kernel, {}, mxfp4_gemm.DEQUANTIZE_TILES))
        for constexprs in dense_gemm.EPILOGUE_VARIANTS:
            name = "dense epilogue" + "".join(f" {k.lower()}" for k, on in constexprs.items() if on)
            out.append((name, dense_gemm._epilogue_kernel, {**constexprs, "EP": 32}, dense_gemm.EPILOGUE_TILES))
    return out


def ptxas_usage(compiled, capability: tuple[int, int]) -> dict:
    """Registers per thread, spill stores/loads (bytes) and stack frame from `ptxas -v` on the kernel's
    PTX (with the flags Triton passes), its performance notes (such as C7515, wgmma serialised), and the
    shared memory Triton allotted."""
    arch = capability[0] * 10 + capability[1]
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = os.path.join(bin_dir, "ptxas" if arch < 90 else "ptxas-blackwell")   # as Triton picks
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        suffix = "a" if arch >= 90 else ""
        log = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{arch}{suffix}", ptx,
                              "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True, check=True).stderr

    def number(pattern):
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0
    return {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"), "stack": number(r"(\d+) bytes stack frame"),
            "shared": compiled.metadata.shared,
            "notes": [line.split("info    : ")[-1] for line in log.splitlines() if "C75" in line]}
