"""The gateway's generation core, shared by its gRPC and HTTP fronts: admit a caller's request,
queue it, relay its chunks (with the relay metrics), resume a stream, cancel, list models.

Nothing here knows about gRPC or HTTP: a front turns its wire format into a GenRequest and a
Caller, and the (cursor, Chunk) pairs it gets back into its own answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

import redis.asyncio as aioredis

from gateway import metrics
from gateway.admission import Admission, ModelView, check_request_id, check_resume, visible_models
from gateway.gen_queue import GenerationQueue
from shared import catalog
from shared import redis_keys as keys
from shared.errors import NotFound, from_code_name, shown
from shared.generation import Chunk, GenRequest
from shared.model_registry import ModelRegistry
from shared.prompt_samples import PromptSampler
from shared.tenancy import Caller

log = logging.getLogger("llamaship.gateway")


class GenerationCore:
    def __init__(self, r: aioredis.Redis, queue: GenerationQueue):
        self.r = r
        self.queue = queue
        self.registry = ModelRegistry(r)
        self.admission = Admission(r, self.registry)
        self.sampler = PromptSampler(r)
        self._background: set[asyncio.Task] = set()

    async def generate(self, req: GenRequest, caller: Caller, time_remaining: float | None
                       ) -> AsyncIterator[tuple[str, Chunk]]:
        """Admit and queue `req` for `caller`, then yield (cursor, chunk) for each chunk with
        text or tokens and for the end chunk; an error chunk is raised as its LlamashipError.
        Closing the iterator early (the client went away) cancels the request."""
        alias = await self.admission.admit(req, caller, time_remaining)
        entry = await self.queue.enqueue(req, alias.pool, alias.context_length)
        metrics.REQUESTS.labels(alias.pool, req.priority).inc()
        if req.prompt:
            self._sample(req.model, req.prompt)
        async for out in self._relay(req.request_id, caller.tenant, alias.pool, entry, "0-0"):
            yield out

    async def resume(self, rid: str, cursor: str, caller: Caller) -> AsyncIterator[tuple[str, Chunk]]:
        """Continue the stream of a request `caller` started, after `cursor`."""
        check_resume(rid, cursor)
        entry = await self.queue.find(rid, caller.tenant)
        if entry is None:
            raise NotFound(f"no stream of request {shown(rid)} to resume: unknown, finished, or stopped unrelayed")
        log.info("resuming the stream after %s", cursor)
        async for out in self._relay(rid, caller.tenant, keys.gen_stream_pool(entry.stream), entry, cursor):
            yield out

    async def cancel(self, rid: str, caller: Caller) -> bool:
        """Stop a request `caller` has in flight; False when it has none of that id."""
        return bool(await self.queue.cancel(check_request_id(rid), caller.tenant))

    async def models(self, caller: Caller) -> list[ModelView]:
        aliases, access, replicas = await asyncio.gather(
            catalog.list_aliases(self.r), self.registry.all_access(), catalog.live_replicas(self.r))
        return visible_models(aliases, access, replicas, caller)

    async def _relay(self, rid: str, tenant: str, pool: str, entry, after: str) -> AsyncIterator[tuple[str, Chunk]]:
        t0 = time.perf_counter()
        finished = False
        first = True
        last_at = t0
        try:
            async for cursor, chunk in self.queue.responses(rid, tenant, pool, entry, after):
                if chunk.kind == "error":
                    finished = True
                    raise from_code_name(chunk.error_code, chunk.error_message)
                now = time.perf_counter()
                if first:
                    metrics.TTFT.labels(pool).observe(now - t0)
                    first = False
                elif chunk.token_ids:
                    per_token = (now - last_at) / len(chunk.token_ids)
                    for _ in chunk.token_ids:
                        metrics.INTER_TOKEN.labels(pool).observe(per_token)
                last_at = now
                if chunk.kind == "end":
                    finished = True
                    metrics.TOKENS.labels(pool).inc(chunk.completion_tokens)
                if chunk.text or chunk.token_ids or chunk.kind == "end":
                    yield cursor, chunk
        except (asyncio.CancelledError, GeneratorExit):
            log.info("client went away; cancelling the request")
            raise
        finally:
            if not finished:
                await asyncio.shield(self.queue.abandon(rid, tenant, entry))
            depth = await asyncio.shield(self.queue.depth(pool))
            for priority, n in depth.items():
                metrics.QUEUE_DEPTH.labels(pool, priority).set(n)

    def _sample(self, model: str, prompt: str) -> None:
        """Offer the prompt to the model's sample (if it opted in), off the request's path."""
        async def offer() -> None:
            try:
                await self.sampler.offer(model, prompt, time.monotonic())
            except Exception as exc:  # noqa: BLE001 - sampling must never fail a request; the prompt is not logged
                log.warning("prompt sampling failed: %s", type(exc).__name__)

        task = asyncio.get_running_loop().create_task(offer())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
