"""KV buffers the engine owns: per layer, keys and values of every row slot.

Each buffer is [max_rows, kv_heads, max_len, head_dim]. GroupQueryAttention runs in its
shared-buffer mode: past and present are bound to the same memory, and each row's length comes
from its attention mask (seqlens_k = mask sum - 1), so rows of different lengths share a step and
a step writes each row's new keys at that row's own position. A slot is row-major, so slots
[lo, lo + n) are one [n, kv_heads, max_len, head_dim] tensor at an offset.

GroupQueryAttention writes a slot's whole buffer the first time it prefills into it, so a slot's
memory is committed at its full length. max_len therefore starts small and grows (the rows' keys
copied into longer buffers) only when a row needs more, up to the context length, and goes back to
its start size when no row is left.

The memory committed on CPU is (slots touched) x max_len: the buffers are zero pages until written,
a growth copies only the slots in use, and the lowest free slot is taken first, so with at most n
rows at a time since the last growth only slots [0, n) were ever written. On a GPU the buffers are
allocated whole: every slot counts. `budget_tokens` bounds that (admission checks it before a row
takes a slot; growth never exceeds it).
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

    @property
    def token_bytes(self) -> int:
        """Bytes of one token in one slot over every layer (keys and values), per dtype byte."""
        return 2 * self.layers * self.kv_heads * self.head_dim

    def rows(self, n: int) -> list[int]:
        return [n, self.kv_heads, self.max_len, self.head_dim]


class KVBuffers:
    def __init__(self, shape: KVShape, dtype: type, device: str = "cpu", device_id: int = 0,
                 budget_bytes: int | None = None):
        self.dtype, self.device, self.device_id = np.dtype(dtype), device, device_id
        self.bytes_per_token = shape.token_bytes * self.dtype.itemsize
        # tokens (over all slots) the buffers may commit; None: no bound
        self.budget_tokens = None if not budget_bytes else budget_bytes // self.bytes_per_token
        if self.budget_tokens is not None:
            committed = shape.max_rows * shape.max_len
            if committed > self.budget_tokens:
                raise ValueError(
                    f"the KV budget ({budget_bytes / 2**20:.1f} MiB, {self.budget_tokens} tokens at "
                    f"{self.bytes_per_token} bytes each) cannot hold {shape.max_rows} slots of {shape.max_len} "
                    f"tokens ({committed * self.bytes_per_token / 2**20:.1f} MiB): raise kv_budget_mb or lower slots")
        self.start_len = shape.max_len
        self.free = list(range(shape.max_rows))  # free slots; the lowest is taken first
        self.generation = 0  # bumped whenever the buffers move (bindings must be made again)
        self._allocate(shape, None)

    def _allocate(self, shape: KVShape, old: list | None) -> None:
        full = [shape.max_rows, shape.kv_heads, shape.max_len, shape.head_dim]
        keep, ptrs = [], []
        for i in range(2 * shape.layers):
            host = np.zeros(full, self.dtype)
            if old is not None:  # a longer buffer: every slot in use keeps the tokens it holds
                prev = old[i] if self.device == "cpu" else old[i].numpy()
                n = min(prev.shape[2], shape.max_len)
                for slot in self.taken():
                    host[slot, :, :n] = prev[slot, :, :n]
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

    def taken(self) -> list[int]:
        return sorted(set(range(self.shape.max_rows)) - set(self.free))

    def committed_slots(self, rows: int) -> int:
        """Slots whose whole buffer counts against the budget while `rows` rows run."""
        return self.shape.max_rows if self.device != "cpu" else rows

    def length_for(self, tokens: int, rows: int | None = None) -> int:
        """The slot length fit(tokens, rows) leaves: the current one, doubled until it holds
        `tokens`, but no more than the budget allows `rows` slots (still at least `tokens`)."""
        length = self.shape.max_len
        while length < tokens:
            length *= 2
        length = min(length, self.shape.limit)
        if self.budget_tokens is not None and rows is not None:
            length = max(min(length, self.budget_tokens // max(1, self.committed_slots(rows))),
                         tokens, self.shape.max_len)
        return length

    def fits_budget(self, tokens: int, rows: int) -> bool:
        """Whether `rows` rows, one of them needing `tokens`, fit the budget."""
        if self.budget_tokens is None:
            return True
        return self.committed_slots(rows) * self.length_for(tokens, rows) <= self.budget_tokens

    def fit(self, tokens: int, rows: int | None = None) -> bool:
        """Make every slot hold at least `tokens`, keeping what the slots in use hold. False when
        that is beyond the limit, or beyond the budget with `rows` rows."""
        if tokens > self.shape.limit:
            return False
        if rows is not None and not self.fits_budget(tokens, rows):
            return False
        if tokens > self.shape.max_len:
            self._allocate(replace(self.shape, max_len=self.length_for(tokens, rows)), self._keep)
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
