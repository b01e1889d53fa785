"""The replica's engine: the builds it has loaded, its slots, and token streaming.

Each loaded build decodes in its own child process (serving_service.decode_worker), which
hands tokens to the event loop as they are produced. A request keeps the build it started on: a
hot swap replaces the name's entry for later requests only, and the old build's process stops
when its last stream ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from shared.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from shared.request_protocol import cost_tokens
from shared.generation import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, Chunk, GenRequest, validate
from shared.pools import POOLS
from shared.store import BuildStore, Manifest
from serving_service.decode_worker import DecodeWorker, resolve_engine, usable_cores
from serving_service.chat_template import ChatTemplate, render_for
from serving_service.constraints import guidance_options
from serving_service.text import IncrementalDetokenizer, PromptTokenizer, StopMatcher
from shared import json_output

log = logging.getLogger("llamaship.serving.engine")
MAX_TOKENS_PER_CHUNK = 64


@dataclass
class LoadedBuild:
    name: str
    manifest: Manifest
    worker: DecodeWorker
    tokenizer: PromptTokenizer
    eos_ids: frozenset[int]
    vocab_size: int
    kv_bytes_per_token: int = 0
    load_seconds: float = 0.0
    active: int = 0
    retired: bool = False  # replaced by a newer build: closes once its last stream ends
    unpin: Callable[[], None] = lambda: None  # the store keeps a served build's files (cache, gc)
    chat_template: ChatTemplate | None = None  # renders messages; None: the build has none
    build_dir: str = ""

    @property
    def build_id(self) -> str:
        return self.manifest.build_id

    @property
    def context_length(self) -> int:
        return self.manifest.context_length

    def close_if_idle(self) -> None:
        if self.retired and self.active == 0:
            self.worker.close()
            self.release()

    def release(self) -> None:
        self.unpin()
        self.unpin = lambda: None  # once


async def load_build(store: BuildStore, name: str, build_id: str, pool: str, threads: int = 0,
                     max_rows: int = 1, serving_engine: str = "genai", kv_budget_bytes: int = 0,
                     prefix_cache_bytes: int = 0) -> LoadedBuild:
    """Verify a build from the store and start (load and warm) its decode worker."""
    t0 = time.perf_counter()
    await asyncio.to_thread(store.pin, build_id)
    try:
        return await _load_pinned(store, name, build_id, pool, threads, max_rows, t0, serving_engine, kv_budget_bytes,
                                  prefix_cache_bytes)
    except BaseException:
        store.unpin(build_id)
        raise


async def _load_pinned(store: BuildStore, name: str, build_id: str, pool: str, threads: int, max_rows: int,
                       t0: float, serving_engine: str = "genai", kv_budget_bytes: int = 0,
                       prefix_cache_bytes: int = 0) -> LoadedBuild:
    manifest = await asyncio.to_thread(store.verify, build_id, full=True)
    if manifest.target_pool != pool:
        raise InvalidArgument(f"build {build_id} targets pool {manifest.target_pool}, not {pool}")
    path = store.path(build_id)
    genai = json.loads((path / "genai_config.json").read_text())["model"]
    eos = genai.get("eos_token_id", [])
    tokenizer = await asyncio.to_thread(PromptTokenizer, path)
    # a cohort holds at most the build's max batch (the compile request's limit) and the slots
    worker = await DecodeWorker.start(build_id, str(path), POOLS[pool].genai_provider, threads,
                                      max(1, min(max_rows, manifest.max_batch or 1)), pool,
                                      engine=serving_engine, kv_budget_bytes=kv_budget_bytes,
                                      prefix_cache_bytes=prefix_cache_bytes)
    loaded = LoadedBuild(name, manifest, worker, tokenizer, frozenset(eos if isinstance(eos, list) else [eos]),
                         int(genai["vocab_size"]), kv_bytes_per_token(genai, POOLS[pool].genai_provider),
                         unpin=lambda: store.unpin(build_id))
    loaded.chat_template, loaded.build_dir = await asyncio.to_thread(ChatTemplate.load, path), str(path)
    loaded.load_seconds = time.perf_counter() - t0
    return loaded


def kv_bytes_per_token(genai_model: dict, provider: str | None) -> int:
    """KV-cache bytes one token holds: keys and values of every layer (float32 on CPU, float16 on GPU)."""
    d = genai_model["decoder"]
    dtype_bytes = 2 if provider else 4
    return 2 * int(d["num_hidden_layers"]) * int(d["num_key_value_heads"]) * int(d["head_size"]) * dtype_bytes


def _search_options(loaded: LoadedBuild, req: GenRequest, max_length: int) -> dict:
    options = _sampling_options(loaded, req, max_length)
    schema = json_output.schema_text(req.response_format, req.json_schema)
    if schema is not None:  # structured output: a token mask in the decode worker
        options["guidance"] = guidance_options(schema, f"{loaded.build_dir}/tokenizer.json", loaded.vocab_size,
                                               loaded.eos_ids)
    return options


def _sampling_options(loaded: LoadedBuild, req: GenRequest, max_length: int) -> dict:
    if req.greedy:
        return {"max_length": max_length, "do_sample": False}
    return {
        "max_length": max_length,
        "do_sample": True,
        "temperature": req.temperature,
        "top_p": req.top_p,
        # top_k 0 means "no limit"; the build's genai_config default (50) must not apply.
        "top_k": req.top_k or loaded.vocab_size,
        "random_seed": req.seed if req.seed is not None else random.getrandbits(31),
    }


@dataclass
class Engine:
    store: BuildStore
    pool: str
    slots: int
    threads: int = 0
    kv_budget_bytes: int = 1 << 62
    serving_engine: str = "genai"
    prefix_cache_mb: int = 0  # the iteration engine's prefix cache, within the KV budget
    builds: dict[str, LoadedBuild] = field(default_factory=dict)
    active: int = 0

    def __post_init__(self) -> None:
        self._load_lock = asyncio.Lock()
        self._reloading: set[str] = set()

    def kv_bytes_per_token(self) -> dict[str, int]:
        return {name: b.kv_bytes_per_token for name, b in self.builds.items()}

    @property
    def iteration(self) -> bool:
        return resolve_engine(self.serving_engine, POOLS[self.pool].genai_provider) == "iteration"

    @property
    def prefix_cache_bytes(self) -> int:
        """The prefix cache's share of the KV budget: prefix_cache_mb, at most a quarter of it."""
        return min(self.prefix_cache_mb << 20, self.kv_budget_bytes // 4) if self.iteration else 0

    def free_kv_bytes(self, held: list[int]) -> int:
        """The most KV bytes the next request may need and still be taken, while running requests
        hold `held`. genai: what their reservations leave. iteration: its buffers commit every
        running slot at the longest row's length (iteration/kv.py), so n + 1 rows fit while none
        needs more than budget / (n + 1); that is also the bound its admission applies."""
        if not self.iteration:
            return self.kv_budget_bytes - sum(held)
        share = (self.kv_budget_bytes - self.prefix_cache_bytes) // (len(held) + 1)
        return share if max(held, default=0) <= share else 0

    def kv_reservation(self, req: GenRequest) -> int:
        """KV bytes a queued request may need at most: its decode buffer is sized to the prompt
        plus max_tokens, capped by the context length (the queue entry's worst case)."""
        loaded = self.builds.get(req.model)
        if loaded is None:
            return 0
        return cost_tokens(req.text_for_cost, req.max_tokens, loaded.context_length) * loaded.kv_bytes_per_token

    def served(self) -> dict[str, str]:
        return {name: b.build_id for name, b in self.builds.items()}

    async def load(self, name: str, build_id: str) -> LoadedBuild | None:
        """Load and warm `build_id` off the event loop, then swap it in under `name`.
        Returns None when that build is already served under that name."""
        async with self._load_lock:
            current = self.builds.get(name)
            if current is not None and current.build_id == build_id and not current.worker.closed:
                return None
            loaded = await load_build(self.store, name, build_id, self.pool, self.threads, self.slots,
                                      self.serving_engine, self.kv_budget_bytes, self.prefix_cache_bytes)
            self.builds[name] = loaded
            if current is not None:
                current.retired = True
                current.close_if_idle()
            log.info(
                "serving %s = build %s (%s, %d intra-op threads, loaded and warmed in %.2fs)%s",
                name, build_id, loaded.manifest.recipe, self.threads or usable_cores(), loaded.load_seconds,
                f", replacing {current.build_id}" if current else "",
            )
            return loaded

    async def unload(self, name: str) -> bool:
        """Stop serving `name` (its model was deleted); streams already running finish on it."""
        async with self._load_lock:
            current = self.builds.pop(name, None)
            if current is None:
                return False
            current.retired = True
            current.close_if_idle()
            log.info("stopped serving %s (build %s): the model was deleted", name, current.build_id)
            return True

    def resolve(self, name: str) -> LoadedBuild:
        loaded = self.builds.get(name)
        if loaded is None:
            raise NotFound(f"model {name!r} is not loaded on this {self.pool} replica")
        if loaded.worker.closed:  # its decode process died: start a new one for later requests
            if name not in self._reloading:
                self._reloading.add(name)
                asyncio.get_running_loop().create_task(self._reload(name, loaded.build_id))
            raise Unavailable(f"the decode worker for {name} stopped and is being restarted; retry shortly")
        return loaded

    async def _reload(self, name: str, build_id: str) -> None:
        try:
            await self.load(name, build_id)
        except Exception:  # noqa: BLE001 - the next request tries again
            log.exception("restarting the decode worker of %s failed", name)
        finally:
            self._reloading.discard(name)

    async def stream(self, req: GenRequest, replay: list[int] | tuple = (), build_id: str = "") -> AsyncIterator[Chunk]:
        """Validate, tokenize and decode `req`, yielding token chunks and a final "end" chunk.

        `replay` continues a request another replica started: its tokens are decoded again
        (same build, same seed), checked one by one and not sent again, so the caller's stream
        goes on exactly where it stopped. Closing the iterator (client gone, cancel) stops the
        sequence within one decode step.
        """
        loaded = self.resolve(req.model)
        if build_id and loaded.build_id != build_id:
            raise Unavailable(
                f"the request started on build {build_id}, which this replica no longer serves; it may be retried"
            )
        validate(req, loaded.context_length)
        if req.top_k > loaded.vocab_size:
            raise InvalidArgument(f"top_k: {req.top_k} is larger than the model's vocabulary ({loaded.vocab_size} tokens)")
        # messages: the chat template's text holds its own BOS, so no special tokens are added
        prompt = await asyncio.to_thread(render_for, loaded.chat_template, req.messages, req.model) \
            if req.messages else req.prompt
        what = "messages (rendered with the chat template)" if req.messages else "prompt"
        if loaded.tokenizer.too_long(prompt, loaded.context_length):
            raise InvalidArgument(f"{what}: {len(prompt)} characters cannot fit the build's context length "
                                  f"{loaded.context_length} tokens")
        # Tokenizing a long prompt takes long enough to stall every other stream on this replica.
        prompt_ids = await asyncio.to_thread(loaded.tokenizer.encode, prompt, not req.messages)
        if len(prompt_ids) >= loaded.context_length:
            raise InvalidArgument(
                f"{what}: {len(prompt_ids)} tokens does not fit the build's context length {loaded.context_length}"
            )
        if self.active >= self.slots:
            raise ResourceExhausted(f"replica is running {self.active}/{self.slots} requests", retry_after_s=0.5)
        max_length = min(len(prompt_ids) + req.max_tokens, loaded.context_length)
        detok = IncrementalDetokenizer(loaded.tokenizer, prompt_ids)
        stops = StopMatcher(req.stop)
        produced = 0
        finish = FINISH_LENGTH
        worker_finished = False  # the worker said done/error: nothing left to cancel there
        self.active += 1
        loaded.active += 1
        try:
            queue = loaded.worker.submit(req.request_id, prompt_ids, _search_options(loaded, req, max_length),
                                         cost_tokens(req.text_for_cost, req.max_tokens, loaded.context_length))
            while True:
                # Take every token already decoded, so a slow reader gets them in one chunk.
                items = [await queue.get()]
                while not queue.empty() and len(items) < MAX_TOKENS_PER_CHUNK:
                    items.append(queue.get_nowait())
                text, ids, last = "", [], False
                for kind, value in items:
                    if kind == "error":
                        worker_finished = True
                        raise value
                    if kind == "done":
                        worker_finished = last = True
                        break
                    produced += 1
                    if produced <= len(replay):
                        if value != replay[produced - 1]:
                            raise Unavailable("the stream cannot be continued exactly on this replica; it may be retried")
                    else:
                        ids.append(value)
                    if value in loaded.eos_ids:
                        finish, last = FINISH_EOS, True
                        break
                    delta, stopped = stops.push(detok.push(value))
                    if produced > len(replay):  # replayed text was sent by the replica that stopped
                        text += delta
                    if stopped:
                        finish, last = FINISH_STOP, True
                        break
                if ids:
                    yield Chunk("tokens", text=text, token_ids=ids, build_id=loaded.build_id)
                if last:
                    break
            tail = stops.flush() if finish != FINISH_STOP else ""
            yield Chunk(
                "end", text=tail, finish_reason=finish, prompt_tokens=len(prompt_ids),
                completion_tokens=produced, build_id=loaded.build_id,
            )
        finally:
            loaded.worker.release(req.request_id, finished=worker_finished)
            self.active -= 1
            loaded.active -= 1
            loaded.close_if_idle()

    def close(self) -> None:
        for loaded in self.builds.values():
            loaded.worker.close()
            loaded.release()
