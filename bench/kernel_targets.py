"""Registers, spills and shared memory of every NF4 and MXFP4 kernel variant on every GPU generation (no GPU needed).

Compiles each variant that model/fast/nf4_gemm.py and mxfp4_gemm.py launch, with the tiles `tiles_for` picks for the
generation and gpt-oss's argument specialisation, for sm_80 ... sm_120 with the ptxas in Triton's
wheel, and prints one markdown table (`ptxas -v`'s registers per thread and spill bytes; the shared
memory Triton allots a block, against the generation's limit).
    python bench/kernel_targets.py
"""
import os
import sys

import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model.fast import targets  # noqa: E402


def main():
    print(f"Triton {triton.__version__}; gpt-oss sizes {targets.GPT_OSS_INTS}\n")
    print("| target | kernel variant | tiles BM×BN×BK, warps, stages | registers | spill stores / loads (B) "
          "| shared (B) | limit (B) |")
    print("|---|---|---|---|---|---|---|")
    for capability, limit in targets.SHARED_MEMORY.items():
        for name, kernel, constexprs, tiles in targets.launches(capability):
            usage = targets.ptxas_usage(targets.compile_for(capability, kernel, constexprs, tiles), capability)
            shape = f"{tiles['BM']}×{tiles['BN']}×{tiles['BK']}, {tiles['num_warps']}, {tiles['num_stages']}"
            print(f"| sm_{capability[0]}{capability[1]} | {name} | {shape} | {usage['registers']} "
                  f"| {usage['spill_stores']} / {usage['spill_loads']} | {usage['shared']:,} | {limit:,} |", flush=True)


if __name__ == "__main__":
    main()
