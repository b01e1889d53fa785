"""Helpers for the iteration engine tests: builds made on the spot, onnxruntime-genai's greedy
tokens as the reference, and a scheduler driven round by round with scripted arrivals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from serving_service.iteration.model import DecoderModel
from serving_service.iteration.scheduler import IterationScheduler


def genai_build(checkpoint: Path, out: Path, recipe: str) -> Path:
    """The GenAI builder's cpu build of `checkpoint` with `recipe`'s arguments, as the compiler runs it."""
    from compiler_service import recipes

    args = recipes.builder_args(recipes.get(recipe, "cpu"), "cpu", 4)
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out),
                    "-c", str(out.parent / f"cache-{recipe}"), *args], check=True, capture_output=True,
                   env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    return out


def genai_greedy(build: Path, prompt: list[int], new: int) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(build))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)][len(prompt):]


def prompts(vocab: int, lengths: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1] + [int(t) for t in rng.integers(4, vocab, n - 1)] for n in lengths]


class Conn(list):
    """Stands in for the decode worker's pipe: keeps what the scheduler sends, tagged with the round."""

    round = 0

    def send(self, msg: tuple) -> None:
        self.append((self.round, msg))


def scheduler(build: Path, max_rows: int = 4, prefill_chunk: int = 256, eos=(2,), start_len: int = 1024,
              kv_budget_tokens: int = 0, prefix_cache_bytes: int = 0) -> tuple[IterationScheduler, Conn]:
    """`kv_budget_tokens`: the KV budget, in tokens of this build (0: none)."""
    conn = Conn()
    budget = kv_budget_tokens * kv_bytes_per_token(build)
    sched = IterationScheduler(DecoderModel(build, None, 1, max_rows, start_len=start_len, kv_budget_bytes=budget),
                               conn, frozenset(eos), prefill_chunk, prefix_cache_bytes=prefix_cache_bytes)
    sched.warm()
    return sched, conn


def kv_bytes_per_token(build: Path) -> int:
    """As the replica counts it (float32 keys and values of every layer on CPU)."""
    import json

    from serving_service.engine import kv_bytes_per_token as per_token

    return per_token(json.loads((build / "genai_config.json").read_text())["model"], None)


def start(rid: str, prompt: list[int], new: int, **sampling) -> tuple:
    options = {"max_length": len(prompt) + new, "do_sample": bool(sampling), **sampling}
    return ("start", rid, prompt, options, len(prompt) + new)


def drive(sched: IterationScheduler, conn: Conn, arrivals: dict[int, list[tuple]], max_rounds: int = 10_000) -> None:
    """Run rounds until idle; `arrivals[n]` are the messages handled before round n."""
    n = 0
    while (sched.busy() or any(k >= n for k in arrivals)) and n < max_rounds:
        conn.round = n
        for msg in arrivals.get(n, []):
            sched.handle(msg)
        if sched.waiting:
            sched.admit()
        sched.round()
        n += 1


def tokens_by_row(conn: Conn) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for _, msg in conn:
        if msg[0] == "prefix":
            continue
        assert msg[0] == "step", msg
        for rid, token in msg[1]:
            out.setdefault(rid, []).append(token)
    return out


def rounds_of(conn: Conn, rid: str) -> list[int]:
    """The rounds in which `rid` got a token."""
    return [n for n, msg in conn if msg[0] == "step" for r, _ in msg[1] if r == rid]
