"""KV of prompt prefixes, kept in blocks of BLOCK tokens so later prompts that start the same way
skip that part of their prefill.

A block's key hashes the whole token prefix up to its end (each key chains the previous one with
the block's tokens), so a block is only ever found behind the exact tokens it was computed from.
A lookup walks a prompt's keys from the start and stops at the first one missing; it never takes
the prompt's last token, which must be prefilled for its logits. Blocks are stored once a row's
prefill completes, copied out of its KV slot, and evicted least-recently-used first while their
bytes exceed the capacity. A hit touches its blocks from the last to the first, so a chain's head
outlives its tail and eviction never leaves a tail that can no longer be reached for long.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

BLOCK = 64


@dataclass
class PrefixStats:
    hits: int = 0  # lookups that found at least one block
    misses: int = 0  # lookups of prompts longer than a block that found none
    saved_tokens: int = 0  # prompt tokens not prefilled thanks to a hit
    evictions: int = 0
    blocks: int = 0
    bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Block:
    kv: list[np.ndarray]  # per layer and kind (key, value): [kv_heads, BLOCK, head_dim]
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = sum(a.nbytes for a in self.kv)


def block_keys(tokens: list[int], block: int = BLOCK, salt: bytes = b"") -> list[bytes]:
    """The keys of every whole block of `tokens`: key i hashes salt + tokens[: (i + 1) * block]."""
    keys, prev = [], salt
    for end in range(block, len(tokens) + 1, block):
        prev = hashlib.blake2b(prev + np.asarray(tokens[end - block:end], np.int64).tobytes(),
                               digest_size=16).digest()
        keys.append(prev)
    return keys


class PrefixCache:
    def __init__(self, capacity_bytes: int, block: int = BLOCK):
        self.capacity, self.block = capacity_bytes, block
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()  # least recently used first
        self.stats = PrefixStats()

    def lookup(self, prompt: list[int], salt: bytes = b"") -> list[np.ndarray]:
        """The cached KV of the longest cached prefix of `prompt` that leaves at least its last
        token to prefill: per layer and kind, [kv_heads, tokens, head_dim] (empty list: none)."""
        keys = block_keys(prompt[: len(prompt) - 1], self.block, salt)
        found: list[bytes] = []
        for key in keys:
            if key not in self._blocks:
                break
            found.append(key)
        if not found:
            if keys:
                self.stats.misses += 1
            return []
        for key in reversed(found):
            self._blocks.move_to_end(key)
        self.stats.hits += 1
        self.stats.saved_tokens += len(found) * self.block
        parts = [self._blocks[k].kv for k in found]
        return [np.concatenate([p[i] for p in parts], axis=1) for i in range(len(parts[0]))]

    def store(self, prompt: list[int], kv: list[np.ndarray], salt: bytes = b"") -> None:
        """Keep the whole blocks of `prompt`, whose KV `kv` holds (per layer and kind,
        [kv_heads, >= len(prompt), head_dim]); blocks already cached are only touched."""
        keys = block_keys(prompt, self.block, salt)
        for i in reversed(range(len(keys))):
            key = keys[i]
            if key in self._blocks:
                self._blocks.move_to_end(key)
                continue
            lo, hi = i * self.block, (i + 1) * self.block
            entry = _Block([np.array(a[:, lo:hi], copy=True) for a in kv])
            if entry.nbytes > self.capacity:
                return
            self._blocks[key] = entry
            self.stats.bytes += entry.nbytes
            self._evict()
        self.stats.blocks = len(self._blocks)

    def _evict(self) -> None:
        while self.stats.bytes > self.capacity:
            _, old = self._blocks.popitem(last=False)
            self.stats.bytes -= old.nbytes
            self.stats.evictions += 1
        self.stats.blocks = len(self._blocks)

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    def keys(self) -> list[bytes]:
        """Cached keys, least recently used first (tests read the order)."""
        return list(self._blocks)
