"""The replica's engine: the builds it has loaded, its slots, and token streaming.

Each request decodes in its own worker thread (ONNX Runtime releases the GIL), handing tokens
to the event loop as they are produced. A request keeps the build it started on: a hot swap
replaces the name's entry for later requests only, and the old build is freed when its last
stream ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import onnxruntime_genai as og

from shared.errors import InvalidArgument, NotFound, ResourceExhausted
from shared.generation import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, Chunk, GenRequest, validate
from shared.pools import POOLS
from shared.store import BuildStore, Manifest
from serving_service.text import IncrementalDetokenizer, PromptTokenizer, StopMatcher

log = logging.getLogger("llamaship.serving.engine")
MAX_TOKENS_PER_CHUNK = 64


@dataclass
class LoadedBuild:
    name: str
    manifest: Manifest
    model: og.Model
    tokenizer: PromptTokenizer
    eos_ids: frozenset[int]
    vocab_size: int
    load_seconds: float = 0.0
    active: int = 0

    @property
    def build_id(self) -> str:
        return self.manifest.build_id

    @property
    def context_length(self) -> int:
        return self.manifest.context_length


def load_build(store: BuildStore, name: str, build_id: str, pool: str, threads: int = 0) -> LoadedBuild:
    """Verify a build from the store and load it into ONNX Runtime GenAI (blocking)."""
    t0 = time.perf_counter()
    manifest = store.verify(build_id, full=True)
    if manifest.target_pool != pool:
        raise InvalidArgument(f"build {build_id} targets pool {manifest.target_pool}, not {pool}")
    path = store.path(build_id)
    config = og.Config(str(path))
    provider = POOLS[pool].genai_provider
    config.clear_providers()
    if provider:
        config.append_provider(provider)
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    genai = json.loads((path / "genai_config.json").read_text())["model"]
    eos = genai.get("eos_token_id", [])
    eos_ids = frozenset(eos if isinstance(eos, list) else [eos])
    loaded = LoadedBuild(name, manifest, model, PromptTokenizer(path), eos_ids, int(genai["vocab_size"]))
    warm(loaded)
    loaded.load_seconds = time.perf_counter() - t0
    return loaded


def warm(loaded: LoadedBuild) -> None:
    """Run one short generation so the first real request does not pay for lazy set-up."""
    ids = loaded.tokenizer.encode("warm up")
    params = og.GeneratorParams(loaded.model)
    params.set_search_options(max_length=min(len(ids) + 2, loaded.context_length), do_sample=False)
    gen = og.Generator(loaded.model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()


def _search_options(loaded: LoadedBuild, req: GenRequest, max_length: int) -> dict:
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


def _decode_thread(
    loaded: LoadedBuild,
    req: GenRequest,
    prompt_ids: list[int],
    loop: asyncio.AbstractEventLoop,
    out: asyncio.Queue,
    stop_flag: threading.Event,
) -> None:
    """Produce ("token", id) items, then ("done", None) or ("error", exc), onto `out`."""
    put = lambda item: loop.call_soon_threadsafe(out.put_nowait, item)  # noqa: E731
    try:
        max_length = min(len(prompt_ids) + req.max_tokens, loaded.context_length)
        params = og.GeneratorParams(loaded.model)
        params.set_search_options(**_search_options(loaded, req, max_length))
        gen = og.Generator(loaded.model, params)
        gen.append_tokens(prompt_ids)
        while not gen.is_done() and not stop_flag.is_set():
            gen.generate_next_token()
            put(("token", int(gen.get_next_tokens()[0])))
        put(("done", None))
    except BaseException as exc:  # noqa: BLE001 - handed to the event loop
        put(("error", exc))


@dataclass
class Engine:
    store: BuildStore
    pool: str
    slots: int
    threads: int = 0
    builds: dict[str, LoadedBuild] = field(default_factory=dict)
    active: int = 0

    def __post_init__(self) -> None:
        self._load_lock = asyncio.Lock()

    def served(self) -> dict[str, str]:
        return {name: b.build_id for name, b in self.builds.items()}

    async def load(self, name: str, build_id: str) -> LoadedBuild | None:
        """Load and warm `build_id` off the event loop, then swap it in under `name`.
        Returns None when that build is already served under that name."""
        async with self._load_lock:
            current = self.builds.get(name)
            if current is not None and current.build_id == build_id:
                return None
            loaded = await asyncio.to_thread(load_build, self.store, name, build_id, self.pool, self.threads)
            self.builds[name] = loaded
            log.info(
                "serving %s = build %s (%s, loaded and warmed in %.2fs)%s",
                name, build_id, loaded.manifest.recipe, loaded.load_seconds,
                f", replacing {current.build_id}" if current else "",
            )
            return loaded

    def resolve(self, name: str) -> LoadedBuild:
        loaded = self.builds.get(name)
        if loaded is None:
            raise NotFound(f"model {name!r} is not loaded on this {self.pool} replica")
        return loaded

    def has_free_slot(self) -> bool:
        return self.active < self.slots

    async def stream(self, req: GenRequest) -> AsyncIterator[Chunk]:
        """Validate, tokenize and decode `req`, yielding token chunks and a final "end" chunk.

        Closing the iterator (client gone, cancel) stops the decode thread within one token.
        """
        loaded = self.resolve(req.model)
        validate(req, loaded.context_length)
        prompt_ids = loaded.tokenizer.encode(req.prompt)
        if len(prompt_ids) >= loaded.context_length:
            raise InvalidArgument(
                f"prompt: {len(prompt_ids)} tokens does not fit the build's context length {loaded.context_length}"
            )
        if self.active >= self.slots:
            raise ResourceExhausted(f"replica is running {self.active}/{self.slots} requests", retry_after_s=0.5)
        self.active += 1
        loaded.active += 1
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop_flag = threading.Event()
        thread = threading.Thread(
            target=_decode_thread, args=(loaded, req, prompt_ids, loop, queue, stop_flag), daemon=True,
            name=f"decode-{req.request_id}",
        )
        detok = IncrementalDetokenizer(loaded.tokenizer, prompt_ids)
        stops = StopMatcher(req.stop)
        produced = 0
        finish = FINISH_LENGTH
        try:
            thread.start()
            done = False
            while not done:
                # Take every token already decoded, so a slow reader gets them in one chunk.
                items = [await queue.get()]
                while not queue.empty() and len(items) < MAX_TOKENS_PER_CHUNK:
                    items.append(queue.get_nowait())
                text, ids = "", []
                for kind, value in items:
                    if kind == "error":
                        raise value
                    if kind == "done":
                        done = True
                        break
                    produced += 1
                    ids.append(value)
                    if value in loaded.eos_ids:
                        finish, done = FINISH_EOS, True
                        break
                    delta, stopped = stops.push(detok.push(value))
                    text += delta
                    if stopped:
                        finish, done = FINISH_STOP, True
                        break
                if ids:
                    yield Chunk("tokens", text=text, token_ids=ids, build_id=loaded.build_id)
            tail = stops.flush() if finish != FINISH_STOP else ""
            yield Chunk(
                "end", text=tail, finish_reason=finish, prompt_tokens=len(prompt_ids),
                completion_tokens=produced, build_id=loaded.build_id,
            )
        finally:
            stop_flag.set()
            self.active -= 1
            loaded.active -= 1
