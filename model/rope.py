"""Rotary position embeddings (RoPE) with the scalings LLaMA-family checkpoints use.

Notation: T = sequence length, hd = head dim. Angles are computed in float32 from integer
positions, as transformers does, so our decoder matches the reference to rounding.
"""

from __future__ import annotations

import math

import torch

from model.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """(hd/2,) float32 inverse frequencies, with linear or llama3 scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        return _llama3_scaling(inv_freq, scaling)
    return inv_freq


def _llama3_scaling(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_angles(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (..., T, hd) for integer `positions` of shape (..., T)."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)  # (..., T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hd); cos/sin (T, hd) or (B, 1, T, hd) broadcastable."""
    return x * cos + rotate_half(x) * sin


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """In-place `apply_rope` for a tensor the caller owns (the gathered memory keys): two fused
    multiply-adds per half instead of the temporaries of `rotate_half`. cos/sin as `rope_angles`
    returns them (both halves equal)."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., :half], x[..., half:]
    first = x1.clone()
    x1.mul_(c).addcmul_(x2, s, value=-1)
    x2.mul_(c).addcmul_(first, s)
    return x
