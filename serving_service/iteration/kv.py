"""KV buffers the engine owns: per layer, keys and values of every row slot.

Each buffer is [max_rows, kv_heads, max_len, head_dim]. GroupQueryAttention runs in its
shared-buffer mode: past and present are bound to the same memory, and each row's length comes
from its attention mask (seqlens_k = mask sum - 1), so rows of different lengths share a step and
a step writes each row's new keys at that row's own position. A slot is row-major, so slots
[lo, lo + n) are one [n, kv_heads, max_len, head_dim] tensor at an offset.

On CPU the buffers are numpy arrays from calloc: pages are committed as rows write them, so a
row's memory stays within the tokens it holds. On CUDA they are ONNX Runtime device buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int
    max_len: int
    max_rows: int

    def rows(self, n: int) -> list[int]:
        return [n, self.kv_heads, self.max_len, self.head_dim]


class KVBuffers:
    def __init__(self, shape: KVShape, dtype: type, device: str = "cpu", device_id: int = 0):
        self.shape, self.dtype, self.device, self.device_id = shape, np.dtype(dtype), device, device_id
        full = [shape.max_rows, shape.kv_heads, shape.max_len, shape.head_dim]
        self.slot_bytes = shape.kv_heads * shape.max_len * shape.head_dim * self.dtype.itemsize
        self._keep: list = []  # what owns the memory
        self.ptrs: list[tuple[int, int]] = []  # per layer: (key, value) base addresses
        for _ in range(shape.layers):
            pair = []
            for _kind in ("key", "value"):
                if device == "cpu":
                    buf = np.zeros(full, self.dtype)
                    pair.append(buf.ctypes.data)
                else:
                    import onnxruntime as ort

                    buf = ort.OrtValue.ortvalue_from_shape_and_type(full, self.dtype.type, device, device_id)
                    pair.append(buf.data_ptr())
                self._keep.append(buf)
            self.ptrs.append((pair[0], pair[1]))
        self.free = list(range(shape.max_rows))  # free slots; the lowest is taken first

    def take(self) -> int | None:
        if not self.free:
            return None
        self.free.sort()
        return self.free.pop(0)

    def give_back(self, slot: int) -> None:
        if slot not in self.free:
            self.free.append(slot)

    def address(self, layer: int, kind: int, slot: int) -> int:
        """Address of `slot` in layer `layer`'s key (kind 0) or value (kind 1) buffer."""
        return self.ptrs[layer][kind] + slot * self.slot_bytes

    def array(self, layer: int, kind: int) -> np.ndarray:
        """The CPU buffer itself (tests read it)."""
        return self._keep[2 * layer + kind]
