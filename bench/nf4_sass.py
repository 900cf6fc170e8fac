"""Static SASS counts of the NF4 kernels' main loop for sm_90, without a GPU (issue 17's analysis).

Compiles a kernel variant with model/fast/targets.py (the JIT's specialisation, gpt-oss-20b's sizes),
disassembles its cubin with the cuobjdump in Triton's wheel, finds the main loop (the backward branch
whose body holds the HGMMAs) and counts its instructions by kind, per warp and loop iteration. Also
reports ptxas's registers, spills and any wgmma-serialisation notice (C7515), and where the
WARPGROUP.DEPBAR waits sit.

    python3 bench/nf4_sass.py [--dump DIR]     # the two training kernels, and the forward at two other tiles

Nothing here is a speed: these are instruction counts of the compiled code.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model.fast import targets  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")

# opcode (without modifiers) -> reported group
GROUPS = {
    "HGMMA": "HGMMA", "WARPGROUP.ARRIVE": "WARPGROUP.ARRIVE", "WARPGROUP.DEPBAR": "WARPGROUP.DEPBAR",
    "LDS": "LDS", "LDSM": "LDSM", "STS": "STS", "STSM": "STS",
    "SHFL": "SHFL", "LDG": "LDG", "LDGSTS": "LDGSTS", "UTMALDG": "TMA", "UBLKCP": "TMA", "SYNCS": "SYNCS",
    "LDGDEPBAR": "LDGDEPBAR", "DEPBAR": "DEPBAR",
    "F2F": "F2F", "F2FP": "F2FP", "I2F": "I2F", "F2I": "F2I",
    "FMUL": "FMUL", "FFMA": "FFMA", "FADD": "FADD", "FSEL": "FSEL",
    "PRMT": "PRMT", "LOP3": "LOP3", "SHF": "SHF", "LEA": "LEA", "IMAD": "IMAD", "IADD3": "IADD3",
    "VIADD": "VIADD", "ISETP": "ISETP", "SEL": "SEL", "MOV": "MOV",
    "BAR": "BAR.SYNC", "MEMBAR": "MEMBAR", "FENCE": "FENCE", "BRA": "BRA", "NOP": "NOP",
}
# the pipe each group issues to, for the static bound: Hopper SMSP: 32 FP32 lanes, 16 INT32 lanes
FP32 = {"FMUL", "FFMA", "FADD", "FSEL"}
INT = {"PRMT", "LOP3", "SHF", "LEA", "IMAD", "IADD3", "VIADD", "ISETP", "SEL", "SGXT", "IABS", "PLOP3"}
CONV = {"F2F", "F2FP", "I2F", "F2I"}


def sass_of(compiled) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        return subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout


def parse(sass: str):
    """[(address, predicate, opcode with modifiers, operands)] in program order."""
    out = []
    for line in sass.splitlines():
        m = LINE.search(line)
        if m:
            out.append((int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4).strip()))
    return out


def main_loop(instrs):
    """The instructions of the innermost loop that holds HGMMAs: from a backward branch's target to it."""
    best = None
    for i, (addr, pred, op, args) in enumerate(instrs):
        if op.startswith("BRA") and args.startswith("0x"):
            target = int(args.split()[0], 16)
            if target < addr:
                body = [x for x in instrs if target <= x[0] <= addr]
                if any(x[2].startswith("HGMMA") for x in body) and (best is None or len(body) < len(best)):
                    best = body
    return best or []


def group(op: str) -> str:
    if op in GROUPS:
        return GROUPS[op]
    head = op.split(".")[0]
    two = ".".join(op.split(".")[:2])
    return GROUPS.get(two, GROUPS.get(head, head))


def counts(body) -> dict:
    c = collections.Counter()
    shapes = collections.Counter()
    for _, pred, op, args in body:
        if pred == "@!PT":          # never executed (ptxas's padding for shared-memory ordering)
            c["never-executed (@!PT)"] += 1
            continue
        g = group(op)
        c[g] += 1
        if g == "HGMMA":
            shape = op.split(".")[1]
            ss = args.split(",")[1].strip().startswith("gdesc")
            shapes[shape + (" SS" if ss else " RS")] += 1
            m, n, k = (int(v) for v in shape.split("x"))
            c["HGMMA smem operand bytes/warpgroup"] += (m * k * 2 if ss else 0) + n * k * 2
        if g == "LDGSTS":
            c["LDGSTS bytes/thread"] += {"128": 16, "64": 8}.get(op.split(".")[-1], 4)
        if g in ("LDS", "STS", "LDSM"):
            c[f"{g} bytes/thread"] += {"64": 8, "128": 16, "U16": 2, "U8": 1}.get(op.split(".")[-1], 4) if g != "LDSM" \
                else 16 if op.endswith(".4") else 8 if op.endswith(".2") else 4
    c["total (executed)"] = sum(v for k, v in c.items() if not k.startswith("never") and "bytes" not in k)
    c["HGMMA shapes"] = dict(shapes)
    return dict(c)


def waits(body) -> list[str]:
    """The order of dequantisation work, HGMMAs and waits in the loop, condensed: each run of one kind once."""
    seq = []
    for _, pred, op, args in body:
        if pred == "@!PT":
            continue
        g = group(op)
        if g == "HGMMA":
            k = "HGMMA" + (" (gsb0)" if "gsb0" in args else "")
        elif g == "WARPGROUP.DEPBAR":
            k = "WAIT " + args
        elif g in ("BAR.SYNC", "WARPGROUP.ARRIVE", "DEPBAR", "LDGDEPBAR"):
            k = g + (" " + args if g == "DEPBAR" else "")
        elif g in ("LDS", "STS", "LDSM"):
            k = g
        elif g in FP32 | CONV:
            k = "fp/cvt"
        elif g == "LDGSTS":
            k = "LDGSTS"
        else:
            continue
        if seq and seq[-1][0] == k:
            seq[-1][1] += 1
        else:
            seq.append([k, 1])
    return [f"{k} x{n}" if n > 1 else k for k, n in seq]


def bound(c: dict, warps: int, mma_fma: int) -> dict:
    """Static cycles per CTA iteration. Issue: one instruction per clock per SM sub-partition (SMSP),
    the CTA's warps spread over the 4 SMSPs. Pipes per SMSP: FP32 32 lanes (1 warp instruction / clk),
    INT32 16 lanes (1 / 2 clk), conversions assumed on a 16-lane pipe (1 / 2 clk). Shared memory:
    128 B/clk per SM (LDS/STS bytes of all warps; wgmma's own operand reads counted separately).
    Tensor cores: 2048 dense bf16 FMA / clk / SM."""
    per_smsp = warps / 4
    issue = c["total (executed)"] * per_smsp
    fp = sum(c.get(g, 0) for g in FP32) * per_smsp
    integer = 2 * sum(c.get(g, 0) for g in INT) * per_smsp
    conv = 2 * sum(c.get(g, 0) for g in CONV) * per_smsp
    threads = 32 * warps
    smem = (c.get("LDS bytes/thread", 0) + c.get("STS bytes/thread", 0) + c.get("LDSM bytes/thread", 0)) * threads / 128
    fill = c.get("LDGSTS bytes/thread", 0) * threads / 128
    wgmma = c.get("HGMMA smem operand bytes/warpgroup", 0) * (warps // 4) / 128
    return {"issue_clk_per_smsp": issue, "fp32_pipe_clk": fp, "int_pipe_clk": integer, "conv_pipe_clk": conv,
            "lds_sts_smem_clk": round(smem), "ldgsts_fill_smem_clk": round(fill), "wgmma_operand_smem_clk": round(wgmma),
            "smem_total_clk": round(smem + fill + wgmma), "tensor_clk": mma_fma // 2048}


def analyse(name, kernel, constexprs, tiles, mma_shape, dump=None) -> dict:
    compiled = targets.compile_for((9, 0), kernel, constexprs, tiles)
    sass = sass_of(compiled)
    if dump:
        os.makedirs(dump, exist_ok=True)
        stem = os.path.join(dump, name.replace(" ", "_").replace("/", "_"))
        for key in ("ttgir", "ptx"):
            with open(f"{stem}.{key}", "w") as f:
                f.write(compiled.asm[key])
        with open(stem + ".sass", "w") as f:
            f.write(sass)
    body = main_loop(parse(sass))
    c = counts(body)
    bm, bn, bk = mma_shape
    usage = targets.ptxas_usage(compiled, (9, 0))
    return {"name": name, "tiles": tiles, "usage": usage, "ptxas_notes": usage.pop("notes"),
            "loop_instructions": len(body), "counts": c,
            "order": waits(body), "bound": bound(c, tiles["num_warps"], bm * bn * bk)}


def kernels():
    """(name, kernel, constexprs, tiles, MMA shape per loop iteration (M, N, K)) to analyse."""
    from model.fast import nf4_gemm
    t, tt = nf4_gemm.TILES, nf4_gemm.TILES_T
    swiglu = {"GATHER": True, "HAS_BIAS": True, "STORE_Y": True, "SWIGLU": True}   # the expert layer's gate_up
    big = {**t, "BM": 256, "num_warps": 8}
    return [("fwd current", nf4_gemm._grouped_mm_kernel, swiglu, t, (t["BM"], t["BN"], t["BK"])),
            ("dx current", nf4_gemm._grouped_mm_t_kernel, {"GATHER": False}, tt, (tt["BM"], tt["BK"], tt["BN"])),
            ("fwd current BM256 8w", nf4_gemm._grouped_mm_kernel, swiglu, big, (256, 128, 64)),
            ("fwd current 4 stages", nf4_gemm._grouped_mm_kernel, swiglu, {**t, "num_stages": 4}, (128, 128, 64))]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dump", default=None, help="folder for each kernel's TTGIR, PTX and SASS")
    p.add_argument("--only", default=None, help="substring of the names to analyse")
    args = p.parse_args()
    for name, kernel, constexprs, tiles, shape in kernels():
        if args.only and args.only not in name:
            continue
        print(json.dumps(analyse(name, kernel, constexprs, tiles, shape, args.dump)), flush=True)


if __name__ == "__main__":
    main()
