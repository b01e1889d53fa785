"""One child process per loaded build runs its ONNX Runtime GenAI decode loop.

onnxruntime-genai 0.18 holds the GIL for the whole of `generate_next_token`, so decoding in a
thread of the serving process stalls its event loop (token relaying, Redis, gRPC) for a full
decode step at a time. In a child process the event loop never waits on the model. The child
interleaves the steps of its running sequences and reports each token over a pipe; a crash of
the runtime takes down the child, not the replica.

Messages, parent → child: ("start", rid, prompt_ids, search_options), ("cancel", rid), ("stop",)
child → parent: ("ready",) | ("failed", reason), then ("tok", rid, id), ("done", rid),
("error", rid, reason).
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing as mp
import threading
from multiprocessing.connection import Connection
from typing import Any

from shared.errors import Unavailable

log = logging.getLogger("llamaship.serving.decode")
_CTX = mp.get_context("spawn")


def _load_model(build_dir: str, provider: str | None, threads: int):
    import onnxruntime_genai as og

    config = og.Config(build_dir)
    config.clear_providers()
    if provider:
        config.append_provider(provider)
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=4, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens([1, 2])
    while not gen.is_done():  # warm: the first request must not pay for lazy set-up
        gen.generate_next_token()
    return og, model


def worker_main(build_dir: str, provider: str | None, threads: int, conn: Connection) -> None:
    try:
        og, model = _load_model(build_dir, provider, threads)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready",))
    active: dict[str, Any] = {}

    def handle(msg: tuple) -> bool:
        if msg[0] == "stop":
            return False
        if msg[0] == "cancel":
            if active.pop(msg[1], None) is not None:
                conn.send(("done", msg[1]))
        elif msg[0] == "start":
            _, rid, prompt_ids, options = msg
            try:
                params = og.GeneratorParams(model)
                params.set_search_options(**options)
                gen = og.Generator(model, params)
                gen.append_tokens(prompt_ids)
                active[rid] = gen
            except Exception as exc:  # noqa: BLE001 - reported to the request
                conn.send(("error", rid, f"{type(exc).__name__}: {exc}"))
        return True

    try:
        while True:
            if not active and not handle(conn.recv()):
                return
            while conn.poll(0):
                if not handle(conn.recv()):
                    return
            for rid, gen in list(active.items()):
                try:
                    if not gen.is_done():
                        gen.generate_next_token()
                        conn.send(("tok", rid, int(gen.get_next_tokens()[0])))
                    if gen.is_done():
                        del active[rid]
                        conn.send(("done", rid))
                except Exception as exc:  # noqa: BLE001 - reported to the request
                    active.pop(rid, None)
                    conn.send(("error", rid, f"{type(exc).__name__}: {exc}"))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return


class DecodeWorkerError(Unavailable):
    """The decode process failed or went away: a replica-side failure the client may retry."""


class DecodeWorker:
    """The parent's handle on one child: submit sequences, receive their tokens on asyncio queues."""

    def __init__(self, build_id: str, proc, conn: Connection):
        self.build_id = build_id
        self.proc = proc
        self.conn = conn
        self.streams: dict[str, asyncio.Queue] = {}
        self.closed = False

    @classmethod
    async def start(cls, build_id: str, build_dir: str, provider: str | None, threads: int,
                    timeout_s: float = 300.0) -> "DecodeWorker":
        parent, child = _CTX.Pipe()
        proc = _CTX.Process(target=worker_main, args=(build_dir, provider, threads, child), daemon=True,
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
        worker = cls(build_id, proc, parent)
        asyncio.get_running_loop().add_reader(parent.fileno(), worker._on_readable)
        return worker

    def _on_readable(self) -> None:
        try:
            while self.conn.poll():
                msg = self.conn.recv()
                queue = self.streams.get(msg[1])
                if queue is None:
                    continue
                if msg[0] == "tok":
                    queue.put_nowait(("token", msg[2]))
                elif msg[0] == "done":
                    queue.put_nowait(("done", None))
                else:
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

    def submit(self, rid: str, prompt_ids: list[int], options: dict) -> asyncio.Queue:
        if self.closed:
            raise DecodeWorkerError(f"the decode worker for build {self.build_id} is closed")
        queue: asyncio.Queue = asyncio.Queue()
        self.streams[rid] = queue
        self.conn.send(("start", rid, prompt_ids, options))
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
