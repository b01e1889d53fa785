"""KV buffers the engine owns: per layer, keys and values of every row slot.

Each buffer is [max_rows, kv_heads, max_len, head_dim]. GroupQueryAttention runs in its
shared-buffer mode: past and present are bound to the same memory, and each row's length comes
from its attention mask (seqlens_k = mask sum - 1), so rows of different lengths share a step and
a step writes each row's new keys at that row's own position. A slot is row-major, so slots
[lo, lo + n) are one [n, kv_heads, max_len, head_dim] tensor at an offset.

GroupQueryAttention writes a slot's whole buffer the first time it prefills into it, so a slot's
memory is committed at its full length. max_len therefore starts small and grows (every row's
keys copied into longer buffers) only when a row needs more, up to the context length, and goes
back to its start size when no row is left.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

START_LEN = 1024


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int
    max_len: int  # tokens one slot holds now
    max_rows: int
    limit: int  # the most max_len may grow to (the context length)

    def rows(self, n: int) -> list[int]:
        return [n, self.kv_heads, self.max_len, self.head_dim]


class KVBuffers:
    def __init__(self, shape: KVShape, dtype: type, device: str = "cpu", device_id: int = 0):
        self.dtype, self.device, self.device_id = np.dtype(dtype), device, device_id
        self.start_len = shape.max_len
        self.free = list(range(shape.max_rows))  # free slots; the lowest is taken first
        self.generation = 0  # bumped whenever the buffers move (bindings must be made again)
        self._allocate(shape, None)

    def _allocate(self, shape: KVShape, old: list | None) -> None:
        full = [shape.max_rows, shape.kv_heads, shape.max_len, shape.head_dim]
        keep, ptrs = [], []
        for i in range(2 * shape.layers):
            host = np.zeros(full, self.dtype)
            if old is not None:  # a longer buffer: every slot keeps the tokens it holds
                prev = old[i] if self.device == "cpu" else old[i].numpy()
                n = min(prev.shape[2], shape.max_len)
                host[:, :, :n] = prev[:, :, :n]
            if self.device == "cpu":
                keep.append(host)
                ptrs.append(host.ctypes.data)
            else:
                import onnxruntime as ort

                buf = ort.OrtValue.ortvalue_from_numpy(host, self.device, self.device_id)
                keep.append(buf)
                ptrs.append(buf.data_ptr())
        self.shape, self._keep, self._ptrs = shape, keep, ptrs
        self.slot_bytes = shape.kv_heads * shape.max_len * shape.head_dim * self.dtype.itemsize
        self.generation += 1

    def length_for(self, tokens: int) -> int:
        """The slot length fit(tokens) leaves: the current one, doubled until it holds `tokens`."""
        length = self.shape.max_len
        while length < tokens:
            length *= 2
        return min(length, self.shape.limit)

    def fit(self, tokens: int) -> bool:
        """Make every slot hold at least `tokens`, keeping what they hold. False when that is
        beyond the limit."""
        if tokens > self.shape.limit:
            return False
        if tokens > self.shape.max_len:
            self._allocate(replace(self.shape, max_len=self.length_for(tokens)), self._keep)
        return True

    def reset(self) -> None:
        """Back to the start length; only while no slot is taken."""
        if self.shape.max_len != self.start_len and len(self.free) == self.shape.max_rows:
            self._allocate(replace(self.shape, max_len=self.start_len), None)

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
        return self._ptrs[2 * layer + kind] + slot * self.slot_bytes

    def array(self, layer: int, kind: int) -> np.ndarray:
        """A CPU buffer itself (tests read it)."""
        return self._keep[2 * layer + kind]
