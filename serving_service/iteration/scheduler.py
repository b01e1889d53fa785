"""The iteration loop: at every round, newcomers are prefilled (at most `prefill_chunk` prompt
tokens per round, so a long prompt never stalls the running rows for its whole prefill), then
every running row decodes one token in a single batched step. A row that finishes or is cancelled
leaves at once and its slot is free for the next newcomer.

The batched step runs slots [0, top), top being one past the highest running slot; newcomers take
the lowest free slot, so holes fill first. A slot in that range that is not running takes part as
a dummy row: a free slot with a one-token mask, a row still in prefill with a mask one past its
prefilled tokens, so the dummy key lands where its next chunk writes anyway.

Speaks the decode worker's protocol (serving_service.decode_worker): handle() takes the parent's
messages, round() sends ("step", [(rid, token), ...], [finished rid, ...]) and ("error", rid, why).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from serving_service.iteration.model import DecoderModel
from serving_service.iteration.prefix_cache import PrefixCache
from serving_service.iteration.sampler import Sampler

PREFILL_CHUNK = 256


@dataclass
class _Row:
    rid: str
    prompt: list[int]
    max_new: int
    sampler: Sampler
    slot: int = -1
    prefilled: int = 0  # prompt tokens in the KV
    produced: int = 0
    last: int = 0  # the token the next decode step feeds

    @property
    def running(self) -> bool:
        return self.produced > 0

    @property
    def length(self) -> int:
        """Tokens in the row's KV once its last token is fed."""
        return self.prefilled + self.produced


def _tenant_salt(rid: str) -> bytes:
    """Cached prefixes are the tenant's own: a hit (a faster first token) must not tell one tenant
    what another's prompts start with. The replica's ids are scoped ids, "<tenant part>:<id>"
    (shared.redis_keys.request_scope)."""
    tenant, scoped, _ = rid.partition(":")
    return tenant.encode() if scoped else b""


class IterationScheduler:
    def __init__(self, model: DecoderModel, conn: Any, eos: frozenset[int], prefill_chunk: int = PREFILL_CHUNK,
                 prefix_cache_bytes: int = 0):
        self.model, self.conn, self.eos = model, conn, eos
        self.prefill_chunk = max(1, prefill_chunk)
        self.waiting: list[_Row] = []
        self.rows: dict[str, _Row] = {}  # rows holding a slot, in arrival order
        # the cache copies KV in and out of the slots through host memory: CPU buffers only
        self.prefix = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes and model.kv.device == "cpu" else None
        self._prefix_sent: dict = {}

    def warm(self) -> None:
        """A prefill into every slot, then a decode step over all of them, so that no request pays
        for lazy set-up. GroupQueryAttention writes a slot's whole buffer on its first prefill, so
        this is also where the KV memory is committed: max_rows x max_len tokens (kv.py), which
        the model checked against the budget when it made the buffers."""
        rows = self.model.shape.max_rows
        for slot in range(rows):
            self.model.forward(slot, np.asarray([[1, 2]]), np.ones((1, 2), np.int64))
        self.model.forward(0, np.full((rows, 1), 3), np.ones((rows, 3), np.int64))

    def busy(self) -> bool:
        return bool(self.waiting or self.rows)

    def handle(self, msg: tuple) -> bool:
        if msg[0] == "stop":
            return False
        if msg[0] == "cancel":
            rid = msg[1]
            waiting = [w for w in self.waiting if w.rid == rid]
            if waiting:
                self.waiting.remove(waiting[0])
            elif rid in self.rows:
                self._leave(self.rows[rid])
            else:
                return True
            self.conn.send(("step", [], [rid]))
        elif msg[0] == "start":
            _, rid, prompt_ids, options, _reserved = msg  # admission bounds memory itself (admit)
            options = dict(options)
            max_new = int(options.pop("max_length")) - len(prompt_ids)
            try:
                sampler = Sampler(options)
            except Exception as exc:  # noqa: BLE001 - a grammar the build's tokenizer cannot take
                self.conn.send(("error", rid, f"{type(exc).__name__}: {exc}"))
                return True
            self.waiting.append(_Row(rid, list(prompt_ids), max_new, sampler))
        return True

    def admit(self) -> None:
        """Give waiting rows a slot, first come first served; the slots grow to hold the longest.

        The bound is the KV memory the buffers commit (kv.py): a row joins while (rows in use + 1)
        x the slot length it needs stays within the replica's KV budget, so short rows join beside
        a long one whenever the budget holds them all at the long one's length. A row that does not
        fit waits for rows to leave; one alone always starts (the replica refused any request
        larger than the whole budget)."""
        kv = self.model.kv
        while self.waiting and kv.free:
            row = self.waiting[0]
            need = len(row.prompt) + row.max_new
            if not row.prompt or row.max_new <= 0 or need > kv.shape.limit:
                self.waiting.pop(0)
                self.conn.send(("error", row.rid, f"a sequence of {len(row.prompt)} prompt tokens and {row.max_new} "
                                                  f"new ones does not fit {kv.shape.limit} tokens"))
                continue
            rows = len(self.rows) + 1
            fits = kv.fits_budget(need, rows)
            if self.rows and not fits:
                return
            kv.fit(need, rows if fits else None)
            self.waiting.pop(0)
            row.slot = kv.take()
            self.rows[row.rid] = row
            if self.prefix is not None:
                self._from_cache(row)

    def _from_cache(self, row: _Row) -> None:
        """Copy the cached KV of the row's longest cached prefix into its slot: its prefill
        starts after it."""
        cached = self.prefix.lookup(row.prompt, _tenant_salt(row.rid))
        if cached:
            n = cached[0].shape[1]
            for i, part in enumerate(cached):
                self.model.kv.array(i // 2, i % 2)[row.slot, :, :n] = part
            row.prefilled = n

    def _to_cache(self, row: _Row) -> None:
        kv = self.model.kv
        self.prefix.store(row.prompt, [kv.array(i // 2, i % 2)[row.slot] for i in range(2 * kv.shape.layers)],
                          _tenant_salt(row.rid))

    def round(self) -> None:
        tokens: list[tuple[str, int]] = []
        finished: list[str] = []
        self._prefill(tokens, finished)
        self._decode(tokens, finished)
        if tokens or finished:
            self.conn.send(("step", tokens, finished))
        if self.prefix is not None and self.prefix.stats.as_dict() != self._prefix_sent:
            self._prefix_sent = self.prefix.stats.as_dict()
            self.conn.send(("prefix", self._prefix_sent))
        if not self.rows and not self.waiting:
            self.model.kv.reset()

    def _prefill(self, tokens: list, finished: list) -> None:
        budget = self.prefill_chunk
        for row in [r for r in self.rows.values() if not r.running]:
            if budget <= 0:
                return
            n = min(budget, len(row.prompt) - row.prefilled)
            end = row.prefilled + n
            try:
                logits = self.model.forward(row.slot, np.asarray([row.prompt[row.prefilled:end]]),
                                            np.ones((1, end), np.int64))
            except Exception as exc:  # noqa: BLE001 - reported to the request
                self._fail([row], exc)
                continue
            row.prefilled, budget = end, budget - n
            if end == len(row.prompt):
                if self.prefix is not None:
                    self._to_cache(row)
                self._emit(row, row.sampler(logits[0, -1]), tokens, finished)

    def _decode(self, tokens: list, finished: list) -> None:
        running = [r for r in self.rows.values() if r.running]
        if not running:
            return
        top = max(r.slot for r in running) + 1
        by_slot = {r.slot: r for r in self.rows.values() if r.slot < top}
        lengths = [1] * top  # mask length per slot; free slots are one-token dummies
        ids = np.zeros((top, 1), np.int64)
        for slot, row in by_slot.items():
            if row.running:
                ids[slot, 0], lengths[slot] = row.last, row.length
            else:
                lengths[slot] = row.prefilled + 1
        mask = (np.arange(max(lengths))[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
        try:
            logits = self.model.forward(0, ids, mask)
        except Exception as exc:  # noqa: BLE001 - reported to each request of the step
            self._fail(running, exc)
            return
        for row in running:
            self._emit(row, row.sampler(logits[row.slot, -1]), tokens, finished)

    def _emit(self, row: _Row, token: int, tokens: list, finished: list) -> None:
        row.produced += 1
        row.last = token
        tokens.append((row.rid, token))
        if token in self.eos or row.produced >= row.max_new or row.length > self.model.shape.max_len:
            finished.append(row.rid)
            self._leave(row)

    def _leave(self, row: _Row) -> None:
        if self.rows.pop(row.rid, None) is row:
            self.model.kv.give_back(row.slot)

    def _fail(self, rows: list[_Row], exc: Exception) -> None:
        for row in rows:
            self._leave(row)
            self.conn.send(("error", row.rid, f"{type(exc).__name__}: {exc}"))
