"""Prefix routing: requests whose prompts share a long prefix prefer one replica of their pool, the
one whose prefix cache then holds that prefix's KV.

The gateway hashes the first `chars` characters of the prompt (a chat: its roles and contents in
order) and picks, among the pool's live replicas serving the model, the one with the highest
rendezvous weight hash(prefix, replica). Every gateway picks the same replica for the same prefix
without talking to the others, and a replica joining or leaving moves only the prefixes it wins
or held. The preference is a hint: the replica's pick script leaves such a request to its
preferred replica only for a short grace, and only while that replica has free slots.
"""

from __future__ import annotations

import hashlib
import time
from typing import Awaitable, Callable, Sequence

from shared.catalog import ReplicaHeartbeat
from shared.generation import GenRequest

LIVE_CACHE_S = 1.0  # how long the pool's live replicas, as read, are used for routing


def prefix_text(req: GenRequest, chars: int) -> str | None:
    """The prompt's first `chars` characters, or None when routing is off or the prompt is shorter."""
    if chars <= 0:
        return None
    text = req.prompt or "".join(f"{m.get('role', '')}\n{m.get('content', '')}\n" for m in req.messages)
    return text[:chars] if len(text) >= chars else None


def _weight(prefix_digest: bytes, replica_id: str) -> bytes:
    return hashlib.blake2b(replica_id.encode(), key=prefix_digest, digest_size=8).digest()


def rendezvous(key: str, replica_ids: Sequence[str]) -> str:
    """The replica with the highest weight for `key` ("" when there is none)."""
    if not replica_ids:
        return ""
    digest = hashlib.blake2b(key.encode(), digest_size=32).digest()
    return max(replica_ids, key=lambda rid: (_weight(digest, rid), rid))


class PrefixRouter:
    """Chooses the preferred replica of a request; reads the live replicas at most once a second."""

    def __init__(self, chars: int, live: Callable[[], Awaitable[list[ReplicaHeartbeat]]]):
        self.chars = chars
        self._live = live
        self._cache: tuple[float, list[ReplicaHeartbeat]] = (float("-inf"), [])

    async def preferred(self, req: GenRequest, pool: str) -> str:
        text = prefix_text(req, self.chars)
        if text is None:
            return ""
        at, replicas = self._cache
        if time.monotonic() - at > LIVE_CACHE_S:
            replicas = await self._live()
            self._cache = (time.monotonic(), replicas)
        serving = [hb.replica_id for hb in replicas if hb.pool == pool and req.model in hb.builds]
        if len(serving) < 2:
            return ""  # one replica (or none) takes it anyway
        return rendezvous(f"{req.model}\n{text}", serving)
