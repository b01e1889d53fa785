"""Keeps the replica's builds in step with the aliases: loads what aliases point to at start,
then follows the announce stream and hot-swaps each new build of this pool."""

from __future__ import annotations

import logging

import redis.asyncio as aioredis

from shared import catalog
from shared import redis_keys as keys
from serving_service import metrics
from serving_service.engine import Engine

log = logging.getLogger("llamaship.serving.builds")


class BuildWatcher:
    def __init__(self, r: aioredis.Redis, engine: Engine, on_change=None):
        self.r = r
        self.engine = engine
        self.on_change = on_change
        self.last_id = "0-0"
        self._followed = False

    async def load_current(self) -> None:
        """Load every alias of this pool; remember where the announce stream stood first so
        that nothing published meanwhile is missed."""
        last = await self.r.xrevrange(keys.ANNOUNCE, count=1)
        self.last_id = last[0][0] if last else "0-0"
        aliases = [a for a in await catalog.list_aliases(self.r) if a.pool == self.engine.pool]
        for alias in aliases:
            await self._load(alias.name, alias.build_id)
        for name in set(self.engine.builds) - {a.name for a in aliases}:
            await self._unload(name)  # deleted while this replica was not following

    async def follow(self) -> None:
        """Follow announcements; (re)started after a Redis outage, it first reloads what the
        aliases say, since announcements made meanwhile may be lost."""
        if self._followed:
            await self.load_current()
        self._followed = True
        while True:
            resp = await self.r.xread({keys.ANNOUNCE: self.last_id}, block=5000, count=32)
            for _stream, entries in resp or []:
                for entry_id, fields in entries:
                    self.last_id = entry_id
                    name = fields.get("name", "")
                    if fields.get("pool") != self.engine.pool and name not in self.engine.builds:
                        continue
                    # The alias may have moved again since this announcement: follow what it says now.
                    alias = await catalog.get_alias(self.r, name)
                    if alias is not None and alias.pool == self.engine.pool:
                        await self._load(alias.name, alias.build_id)
                    else:  # deleted, or moved to another pool
                        await self._unload(name)

    async def _unload(self, name: str) -> None:
        if await self.engine.unload(name) and self.on_change:
            await self.on_change()

    async def _load(self, name: str, build_id: str) -> None:
        try:
            loaded = await self.engine.load(name, build_id)
        except Exception:  # noqa: BLE001 - a bad build must not take the replica down
            log.exception("could not load build %s for %s; keeping what is served", build_id, name)
            return
        if loaded is not None:
            metrics.BUILD_LOAD.labels(self.engine.pool).observe(loaded.load_seconds)
            if self.on_change:
                await self.on_change()
