"""One child process per loaded build runs its ONNX Runtime GenAI decode loop.

onnxruntime-genai 0.18 holds the GIL for the whole of `generate_next_token`, so decoding in a
thread of the serving process stalls its event loop (token relaying, Redis, gRPC) for a full
decode step at a time. In a child process the event loop never waits on the model, and a crash
of the runtime takes down the child, not the replica.

With the "genai" engine the child batches by cohort (serving_service.cohorts): sequences that
arrive together start a cohort, one static-batch generator; running cohorts decode one step each
in turn, so new sequences join between steps. With the "iteration" engine
(serving_service.iteration) it drives the decoder model itself: one running batch that sequences
join and leave between any two steps.

Messages, parent -> child: ("start", rid, prompt_ids, search_options, reserved_tokens),
("cancel", rid), ("stop",). child -> parent: ("ready",) | ("failed", reason), then
("step", [(rid, token), ...], [finished rid, ...]), ("error", rid, reason) and, from the iteration
engine's prefix cache, ("prefix", {counter: total}) whenever its totals change.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing as mp
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from shared.errors import Unavailable
from serving_service import constraints, metrics
from serving_service.cohorts import CohortPlan, Waiting, padded_prompts, plan_cohorts
from serving_service.graph_facts import pads_rows_safely

log = logging.getLogger("llamaship.serving.decode")
_CTX = mp.get_context("spawn")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, so a container's limit counts)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _load_model(build_dir: str, provider: str | None, threads: int):
    import onnxruntime_genai as og

    config = og.Config(build_dir)
    config.clear_providers()
    if provider:
        config.append_provider(provider)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads or usable_cores()}}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=4, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens([1, 2])
    while not gen.is_done():  # warm: the first request must not pay for lazy set-up
        gen.generate_next_token()
    return og, model


@dataclass
class _Row:
    rid: str
    max_new: int
    produced: int = 0
    done: bool = False


@dataclass
class _Cohort:
    gen: Any
    rows: list[_Row] = field(default_factory=list)

    def live(self) -> bool:
        return any(not r.done for r in self.rows)


class _Scheduler:
    """The child's loop state: waiting sequences, running cohorts, and one decode round."""

    def __init__(self, og, model, conn: Connection, genai: dict, max_rows: int):
        self.og, self.model, self.conn = og, model, conn
        eos = genai.get("eos_token_id", [])
        self.eos = frozenset(eos if isinstance(eos, list) else [eos])
        pad = genai.get("pad_token_id")
        self.pad = pad if isinstance(pad, int) else None
        self.context_length = int(genai["context_length"])
        self.max_rows = max_rows if self.pad is not None else 1
        self.equal_lengths = False  # only prompts of one length share a cohort (graph_facts)
        self.waiting: list[Waiting] = []
        self.cohorts: list[_Cohort] = []
        self.rows: dict[str, _Row] = {}

    def busy(self) -> bool:
        return bool(self.waiting or self.cohorts)

    def handle(self, msg: tuple) -> bool:
        if msg[0] == "stop":
            return False
        if msg[0] == "cancel":
            rid = msg[1]
            waiting = [w for w in self.waiting if w.rid == rid]
            row = self.rows.get(rid)
            if waiting:
                self.waiting.remove(waiting[0])
            elif row is not None and not row.done:
                row.done = True  # its cohort goes on for the others; this row's output is dropped
            else:
                return True
            self.rows.pop(rid, None)
            self.conn.send(("step", [], [rid]))
        elif msg[0] == "start":
            _, rid, prompt_ids, options, reserved = msg
            options = dict(options)
            max_new = int(options.pop("max_length")) - len(prompt_ids)
            self.waiting.append(Waiting(rid, list(prompt_ids), max_new, options, int(reserved)))
        return True

    def admit(self) -> None:
        """Start a cohort for the sequences that arrived since the last round."""
        plans = plan_cohorts(self.waiting, self.max_rows, self.pad, self.context_length, self.equal_lengths)
        self.waiting = []
        for plan in plans:
            self._start(plan)

    def _start(self, plan: CohortPlan) -> None:
        og = self.og
        try:
            params = og.GeneratorParams(self.model)
            params.set_search_options(**plan.rows[0].options, max_length=plan.max_length, batch_size=len(plan.rows))
            if plan.rows[0].guidance:  # a constrained row decodes alone (cohorts)
                params.set_guidance("json_schema", plan.rows[0].guidance["schema"])
            gen = og.Generator(self.model, params)
            if len(plan.rows) == 1:
                gen.append_tokens(plan.rows[0].prompt_ids)
            else:
                import numpy as np

                gen.append_tokens(np.asarray(padded_prompts(plan, self.pad), dtype=np.int32))
        except Exception as exc:  # noqa: BLE001 - reported to each request
            for w in plan.rows:
                self.conn.send(("error", w.rid, f"{type(exc).__name__}: {exc}"))
            return
        cohort = _Cohort(gen, [_Row(w.rid, w.max_new) for w in plan.rows])
        for row in cohort.rows:
            self.rows[row.rid] = row
        self.cohorts.append(cohort)

    def round(self) -> None:
        """One decode step of every running cohort."""
        for cohort in list(self.cohorts):
            if not cohort.live():  # every row was cancelled
                self._drop(cohort)
                continue
            tokens: list[tuple[str, int]] = []
            finished: list[str] = []
            try:
                cohort.gen.generate_next_token()
                ids = cohort.gen.get_next_tokens()
                ended = cohort.gen.is_done()
            except Exception as exc:  # noqa: BLE001 - reported to each request
                self._drop(cohort)
                for row in cohort.rows:
                    if not row.done:
                        self.conn.send(("error", row.rid, f"{type(exc).__name__}: {exc}"))
                continue
            for row, token in zip(cohort.rows, ids):
                if row.done:
                    continue
                token = int(token)
                tokens.append((row.rid, token))
                row.produced += 1
                if token in self.eos or row.produced >= row.max_new or ended:
                    row.done = True
                    finished.append(row.rid)
            self.conn.send(("step", tokens, finished))
            if not cohort.live():
                self._drop(cohort)

    def _drop(self, cohort: _Cohort) -> None:
        self.cohorts.remove(cohort)
        for row in cohort.rows:
            if self.rows.get(row.rid) is row:
                del self.rows[row.rid]


def _iteration_scheduler(build_dir: str, provider: str | None, threads: int, max_rows: int, conn: Connection,
                         genai: dict, kv_budget_bytes: int = 0, prefix_cache_bytes: int = 0):
    from serving_service.iteration.model import DecoderModel
    from serving_service.iteration.scheduler import IterationScheduler

    # the prefix cache's share comes out of the KV budget
    slots_budget = max(1, kv_budget_bytes - prefix_cache_bytes) if kv_budget_bytes else 0
    model = DecoderModel(build_dir, provider, threads or usable_cores(), max_rows, kv_budget_bytes=slots_budget)
    eos = genai.get("eos_token_id", [])
    sched = IterationScheduler(model, conn, frozenset(eos if isinstance(eos, list) else [eos]),
                               prefix_cache_bytes=prefix_cache_bytes)
    sched.warm()  # the first request must not pay for lazy set-up
    if Path(build_dir, "tokenizer.json").exists():
        constraints.prewarm(str(Path(build_dir, "tokenizer.json")), int(genai["vocab_size"]), sched.eos)
    return sched


def resolve_engine(engine: str, provider: str | None) -> str:
    """serving_engine "auto": the iteration engine on CPU, where it measures better (README, "The
    decode engine"); onnxruntime-genai on a GPU provider, where it has not been measured yet."""
    if engine == "auto":
        return "genai" if provider else "iteration"
    return engine


def worker_main(build_dir: str, provider: str | None, threads: int, max_rows: int, conn: Connection,
                engine: str = "genai", kv_budget_bytes: int = 0, prefix_cache_bytes: int = 0) -> None:
    engine = resolve_engine(engine, provider)
    try:
        with open(f"{build_dir}/genai_config.json") as f:
            genai = json.load(f)["model"]
        if engine == "iteration":
            sched = _iteration_scheduler(build_dir, provider, threads, max_rows, conn, genai, kv_budget_bytes,
                                         prefix_cache_bytes)
        else:
            og, model = _load_model(build_dir, provider, threads)
            sched = _Scheduler(og, model, conn, genai, max_rows)
            sched.equal_lengths = not pads_rows_safely(build_dir, provider)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready",))
    try:
        while True:
            if not sched.busy() and not sched.handle(conn.recv()):
                return
            while conn.poll(0):
                if not sched.handle(conn.recv()):
                    return
            if sched.waiting:
                sched.admit()
            sched.round()
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return


class DecodeWorkerError(Unavailable):
    """The decode process failed or went away: a replica-side failure the client may retry."""


class DecodeWorker:
    """The parent's handle on one child: submit sequences, receive their tokens on asyncio queues."""

    def __init__(self, build_id: str, proc, conn: Connection, pool: str = "cpu"):
        self.build_id = build_id
        self.pool = pool
        self.step_rows: Counter[int] = Counter()  # decode steps by how many sequences they advanced
        self.proc = proc
        self.conn = conn
        self.streams: dict[str, asyncio.Queue] = {}
        self.prefix_stats: dict[str, int] = {}  # the prefix cache's totals (iteration engine)
        self.closed = False

    @classmethod
    async def start(cls, build_id: str, build_dir: str, provider: str | None, threads: int, max_rows: int = 1,
                    pool: str = "cpu", timeout_s: float = 300.0, engine: str = "genai",
                    kv_budget_bytes: int = 0, prefix_cache_bytes: int = 0) -> "DecodeWorker":
        """`kv_budget_bytes` bounds the KV memory the iteration engine commits (0: no bound);
        `prefix_cache_bytes` of it hold its prefix cache (0: no cache)."""
        parent, child = _CTX.Pipe()
        proc = _CTX.Process(target=worker_main, args=(build_dir, provider, threads, max_rows, child, engine,
                                                      kv_budget_bytes, prefix_cache_bytes), daemon=True,
                            name=f"decode-{build_id}")
        proc.start()
        child.close()

        def wait_ready() -> tuple:
            if not parent.poll(timeout_s):
                raise DecodeWorkerError(f"decode worker for {build_id} did not load within {timeout_s:.0f}s")
            return parent.recv()

        try:
            msg = await asyncio.to_thread(wait_ready)
        except (EOFError, DecodeWorkerError) as exc:
            parent.close()
            proc.kill()
            await asyncio.to_thread(proc.join)
            raise DecodeWorkerError(f"decode worker for build {build_id} failed to start: {exc or 'it exited'}") from None
        if msg[0] != "ready":
            parent.close()
            await asyncio.to_thread(proc.join, 5)
            raise DecodeWorkerError(f"cannot load build {build_id}: {msg[1]}")
        worker = cls(build_id, proc, parent, pool)
        asyncio.get_running_loop().add_reader(parent.fileno(), worker._on_readable)
        return worker

    def _on_readable(self) -> None:
        try:
            while self.conn.poll():
                msg = self.conn.recv()
                if msg[0] == "step":
                    if msg[1]:
                        self.step_rows[len(msg[1])] += 1
                        metrics.BATCH_ROWS.labels(self.pool).observe(len(msg[1]))
                    for rid, token in msg[1]:
                        if (queue := self.streams.get(rid)) is not None:
                            queue.put_nowait(("token", token))
                    for rid in msg[2]:
                        if (queue := self.streams.get(rid)) is not None:
                            queue.put_nowait(("done", None))
                elif msg[0] == "prefix":
                    metrics.prefix_cache(self.pool, self.build_id, self.prefix_stats, msg[1])
                    self.prefix_stats = msg[1]
                elif (queue := self.streams.get(msg[1])) is not None:
                    queue.put_nowait(("error", DecodeWorkerError(f"decode failed on build {self.build_id}: {msg[2]}")))
        except (EOFError, OSError):
            self._lost()

    def _lost(self) -> None:
        if self.closed:
            return
        log.error("decode worker for build %s exited (code %s)", self.build_id, self.proc.exitcode)
        self.close()
        for queue in self.streams.values():
            queue.put_nowait(("error", DecodeWorkerError(f"the decode worker for build {self.build_id} exited")))

    def submit(self, rid: str, prompt_ids: list[int], options: dict, reserved_tokens: int = 0) -> asyncio.Queue:
        if self.closed:
            raise DecodeWorkerError(f"the decode worker for build {self.build_id} is closed")
        queue: asyncio.Queue = asyncio.Queue()
        self.streams[rid] = queue
        self.conn.send(("start", rid, prompt_ids, options, reserved_tokens))
        return queue

    def release(self, rid: str, finished: bool) -> None:
        """Forget a sequence; one that did not finish is cancelled in the child (idempotent)."""
        self.streams.pop(rid, None)
        if not finished and not self.closed:
            try:
                self.conn.send(("cancel", rid))
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        metrics.forget_prefix_cache(self.pool, self.build_id)
        try:
            asyncio.get_running_loop().remove_reader(self.conn.fileno())
        except (RuntimeError, ValueError, OSError):
            pass
        try:
            self.conn.send(("stop",))
        except (OSError, ValueError):
            pass
        self.conn.close()
        threading.Thread(target=self._reap, daemon=True, name=f"reap-{self.build_id}").start()

    def _reap(self) -> None:
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
