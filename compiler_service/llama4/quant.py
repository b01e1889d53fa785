"""Symmetric round-to-nearest block quantization along K, in the packed layout MatMulNBits and
QMoE (weights_prepacked=0) read: [N, K / block, block * bits / 8] uint8, low nibble first,
with the default zero point 2^(bits-1)."""

from __future__ import annotations

import numpy as np

BLOCK = 32


def quantize(w: np.ndarray, bits: int, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """w [N, K] float32 (K a multiple of block) → (packed [N, K/block, block*bits/8] uint8, scales [N, K/block])."""
    n, k = w.shape
    if k % block:
        raise ValueError(f"K={k} is not a multiple of the block size {block}")
    blocks = w.reshape(n, k // block, block).astype(np.float32)
    top = (1 << (bits - 1)) - 1
    scales = (np.abs(blocks).max(axis=-1) / np.float32(top)).astype(np.float32)
    safe = np.where(scales == 0, np.float32(1), scales)
    q = np.clip(np.rint(blocks / safe[..., None]), -top - 1, top).astype(np.int16) + (1 << (bits - 1))
    q = q.astype(np.uint8)
    if bits == 4:
        q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    elif bits != 8:
        raise ValueError(f"{bits}-bit weights are not supported (only 4 and 8)")
    return q, scales


def dequantize(packed: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """The float32 [N, K] that `packed` and `scales` stand for (tests compare against it)."""
    if bits == 4:
        q = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.int16)
        q[..., 0::2], q[..., 1::2] = packed & 0x0F, packed >> 4
    else:
        q = packed.astype(np.int16)
    w = (q - (1 << (bits - 1))).astype(np.float32) * scales[..., None]
    return w.reshape(w.shape[0], -1)


def fake_quantize(w: np.ndarray, bits: int, block: int = BLOCK) -> np.ndarray:
    return dequantize(*quantize(w, bits, block), bits)
