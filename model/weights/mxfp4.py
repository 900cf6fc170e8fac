"""MXFP4, the format of the hub's gpt-oss expert weights: 4-bit e2m1 codes in blocks of 32 sharing
a power-of-two scale."""
from __future__ import annotations

import torch

# e2m1: codes 0-7 are these values, codes 8-15 the same negated (the top bit is the sign)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype=torch.bfloat16,
                     rows_per_chunk: int = 1 << 14) -> torch.Tensor:
    """blocks uint8 (..., n_blocks, 16), scales uint8 (..., n_blocks) -> (..., n_blocks * 32).

    Each byte holds two codes, the low nibble first; a block's values are multiplied by
    2^(scale - 127). Works a chunk of rows at a time so the float32 intermediate stays small.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    lead, n_blocks = blocks.shape[:-2], blocks.shape[-2]
    blocks = blocks.reshape(-1, n_blocks, 16)
    scales = scales.reshape(-1, n_blocks)
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    out = torch.empty(blocks.shape[0], n_blocks * 32, dtype=dtype, device=blocks.device)
    for start in range(0, blocks.shape[0], rows_per_chunk):
        b = blocks[start:start + rows_per_chunk]
        codes = torch.stack((b & 0x0F, b >> 4), dim=-1).reshape(*b.shape[:-1], 32)  # low nibble first
        exp = scales[start:start + rows_per_chunk].to(torch.int32) - 127
        vals = torch.ldexp(lut[codes.long()], exp.unsqueeze(-1).to(torch.float32))
        out[start:start + rows_per_chunk] = vals.reshape(b.shape[0], -1).to(dtype)
    return out.reshape(*lead, n_blocks * 32)
