"""Rotary cos/sin caches, computed in float32 exactly as transformers' Llama 4 rotary embedding
(default or llama3 inverse frequencies; attention factor 1)."""

from __future__ import annotations

import math

import numpy as np


def inverse_frequencies(rope: dict, head_dim: int) -> np.ndarray:
    base = np.float32(rope["rope_theta"])
    exponents = (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim))
    inv_freq = (np.float32(1.0) / np.power(base, exponents, dtype=np.float32)).astype(np.float32)
    if rope["rope_type"] != "llama3":
        return inv_freq
    factor = np.float32(rope["factor"])
    low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_context = float(rope["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    # Scout's high_freq_factor equals its low_freq_factor: no band is smoothed (as in transformers,
    # the division's inf/nan only reach entries the `medium` mask leaves out)
    with np.errstate(divide="ignore", invalid="ignore"):
        smooth = ((np.float32(old_context) / wavelen - np.float32(low)) / np.float32(high - low)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def cos_sin_caches(rope: dict, head_dim: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """[length, head_dim / 2] caches for GroupQueryAttention's rotary (position p, pair i)."""
    inv_freq = inverse_frequencies(rope, head_dim)
    freqs = np.arange(length, dtype=np.int64).astype(np.float32)[:, None] * inv_freq[None, :]
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)
