"""The NF4 and MXFP4 kernels compiled for every GPU generation they may run on, without a GPU.

Triton compiles for any NVIDIA target on the CPU (its wheel ships ptxas). Each kernel variant that
model/fast/nf4_gemm.py and mxfp4_gemm.py launch (and on sm_90/sm_100 dense_gemm.py's dequantisations and epilogue),
with the tiles `tiles_for` picks for the generation and specialised
as the JIT specialises gpt-oss's real arguments, must compile, fit the generation's shared memory
and (off the H100's tuned tiles) spill nothing. Compiling all of them takes a minute or two on two
cores; each is compiled once per session (and Triton keeps them in its on-disk cache).
"""
import functools

import pytest
import torch
import triton  # noqa: F401  (a test requirement: without it these tests must fail, not vanish)
from triton._C.libtriton import native_specialize_impl
from triton.backends.nvidia.compiler import CUDABackend

from model.fast import dense_gemm, mxfp4_gemm, nf4_gemm, targets

GENERATIONS = [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]
SPILLS_ALLOWED = {((10, 0), "mxfp4 y=x@W gather has_bias has_add swiglu"): 8}   # bytes, (generation, launch)


@functools.lru_cache(maxsize=None)
def compiled(capability, index):
    """The index-th launch of this generation, compiled, and its ptxas usage (once per session)."""
    name, kernel, constexprs, tiles = targets.launches(capability)[index]
    kernel_binary = targets.compile_for(capability, kernel, constexprs, tiles)
    return name, tiles, targets.ptxas_usage(kernel_binary, capability)


@pytest.mark.parametrize("sizes", [{"K": 2880, "N": 5760, "num_experts": 32, "rows": 8192, "inter": 2880,  # 20b gate_up
                                    "n_blocks": 32 * 2880 * 5760 // 64, "tokens": 2048, "H": 2880},
                                   {"K": 2880, "N": 2880, "num_experts": 128, "rows": 1000, "inter": 2880,  # 120b down
                                    "n_blocks": 128 * 2880 * 2880 // 64, "tokens": 250, "H": 2880}])
def test_the_compiled_signature_is_the_jits_specialisation(sizes):
    """What the targets compile is what the JIT builds at run time from real arguments: Triton's own
    specialisation of each argument (torch tensors from the allocator, gpt-oss's sizes, the floats)."""
    real = {"alpha": 1.702, "limit": 7.0, **sizes}
    dtypes = {"*bf16": torch.bfloat16, "*u8": torch.uint8, "*fp32": torch.float32, "*i32": torch.int32,
              "*i64": torch.int64}
    for _, kernel, constexprs, tiles in targets.launches((9, 0)):     # every variant of every kernel
        block = {k: v for k, v in tiles.items() if k not in targets.LAUNCH_OPTIONS}
        src = targets.source(kernel, {**constexprs, **block}, sizes)
        for i, name in enumerate(kernel.arg_names):
            if src.signature[name] == "constexpr":
                assert name in constexprs or name in block or name in sizes, name
                continue
            if name in targets.POINTERS:
                arg = torch.empty(64, dtype=dtypes[targets.POINTERS[name]])
            else:
                arg = real[name]
            kind, spec = native_specialize_impl(CUDABackend, arg, False, True, True)
            assert src.signature[name] == kind, (name, kind)
            assert src.attrs.get((i,), []) == (CUDABackend.parse_attr(spec) if spec else []), (name, spec)


def test_tiles_hold_whole_blocks_of_64_on_every_generation():
    for capability in GENERATIONS + [(7, 5), (11, 0), (12, 1)]:
        tiles, tiles_t = nf4_gemm.tiles_for(capability)
        assert tiles["BN"] % nf4_gemm.BLOCKSIZE == 0 and tiles_t["BN"] % nf4_gemm.BLOCKSIZE == 0
        tiles, tiles_t = mxfp4_gemm.tiles_for(capability)      # MXFP4's blocks of 32 lie along `in`: BK
        assert tiles["BK"] % mxfp4_gemm.BLOCK == 0 and tiles_t["BK"] % mxfp4_gemm.BLOCK == 0
    assert nf4_gemm.tiles_for((9, 0)) == (nf4_gemm.TILES, nf4_gemm.TILES_T)   # the H100's, as tuned


@pytest.mark.slow
@pytest.mark.parametrize("capability", GENERATIONS, ids=[f"sm_{a}{b}" for a, b in GENERATIONS])
def test_every_launch_compiles_and_fits_the_generation(capability):
    limit = targets.SHARED_MEMORY[capability]
    launches = targets.launches(capability)
    dense = 1 + len(dense_gemm.EPILOGUE_VARIANTS) if capability[0] in (9, 10) else 0   # sm_90/100's dense path
    assert len(launches) == sum(len(m.FORWARD_VARIANTS) + len(m.TRANSPOSED_VARIANTS) for m in (nf4_gemm, mxfp4_gemm)) \
        + 3 + len(nf4_gemm.SUM_ROWS_VARIANTS) + dense
    for index in range(len(launches)):
        name, tiles, usage = compiled(capability, index)
        # every product's tile lives in shared memory; the rows' sums hold no tile and need none
        assert usage["shared"] <= limit and (usage["shared"] > 0 or name.startswith("sum rows")), \
            (name, tiles, usage, limit)
        assert usage["registers"] <= 255, (name, usage)
        if capability[0] != 9 or not name.startswith(("y=", "dx=")):
            # The H100's NF4 tiles were tuned with the few bytes some variants spill there; elsewhere,
            # and for MXFP4 everywhere, tiles_for picks tiles that spill nothing, but for one launch on
            # sm_100 (not timed: no such GPU here) that Triton 3.9 spills 8 bytes of (3.8: none)
            allowed = SPILLS_ALLOWED.get((capability, name), 0)
            assert usage["spill_stores"] <= allowed and usage["spill_loads"] <= allowed, (name, tiles, usage)
