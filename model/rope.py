"""Rotary position embedding with YaRN frequency scaling, as gpt-oss uses it."""
from __future__ import annotations

import math

import torch

from .config import GptOssConfig
from .fast import rotary


def yarn_inv_freq(config: GptOssConfig) -> tuple[torch.Tensor, float]:
    """The rotary inverse frequencies (head_dim / 2,) and the attention factor that scales cos and sin."""
    dim, theta = config.head_dim, config.rope_theta
    rs = config.rope_scaling or {}
    # float32 throughout, as the reference computes it, so the angles agree to the last bit
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if rs.get("rope_type", "default") == "default":
        return 1.0 / pos_freqs, 1.0
    if rs["rope_type"] != "yarn":
        raise ValueError(f"rope type {rs['rope_type']!r} is not supported (gpt-oss uses yarn)")
    factor = rs["factor"]
    orig = rs["original_max_position_embeddings"]
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength makes `rotations` turns over the original context
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(rs.get("beta_fast", 32.0)), correction_dim(rs.get("beta_slow", 1.0))
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero, as the reference does
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # ramp 0: high-frequency dims keep their frequency; ramp 1: low-frequency dims are interpolated
    inv_freq = interpolated * ramp + extrapolated * (1 - ramp)
    attention_factor = rs.get("attention_factor") or 0.1 * math.log(factor) + 1.0
    return inv_freq, attention_factor


def rotary_cos_sin(config: GptOssConfig, positions: torch.Tensor, dtype: torch.dtype):
    """cos and sin, (len(positions), head_dim / 2), already multiplied by the attention factor."""
    inv_freq, factor = yarn_inv_freq(config)
    angles = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    return (angles.cos() * factor).to(dtype), (angles.sin() * factor).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, compiled: bool = False) -> torch.Tensor:
    """Rotate (batch, seq, heads, head_dim): first and second halves of the head form the pairs.

    cos and sin are (seq, head_dim/2), or (batch, seq, head_dim/2) for packed rows, whose positions
    restart at 0 with each document. `compiled` (the gate's FastPaths.compiled, on CUDA): one Triton
    kernel each way (model/fast/rotary.py), in float32 rounded once; otherwise `rotary_reference`.
    """
    if compiled and x.is_cuda:
        return rotary.apply_rotary(x, cos, sin)
    return rotary_reference(x, cos, sin)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary` op by op, in x's dtype."""
    a, b = x.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (..., seq, 1, head_dim/2) broadcasts over heads
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
