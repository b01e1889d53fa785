"""Serving workloads: staggered (Poisson) arrivals and a shared-prefix workload through the stack,
and two direct reference lines, onnxruntime-genai's og.Engine and one static 16-row batch.

Every stack request goes through the gateway exactly as a user's does (one gRPC client per
in-flight request, as a client fleet would); the direct lines run in this process with the bench's
threads. Greedy everywhere, so every line decodes the same number of tokens.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from llamaship.bench.measure import Run, pct

TOP_CONCURRENCY = 16


@dataclass
class Arrivals:
    """Poisson arrivals: `n` requests at `rate` per second, each `prompt_tokens` long (distinct
    prompts) decoding `new_tokens`."""

    rate: float
    n: int
    seed: int = 0

    def offsets(self) -> list[float]:
        rng = random.Random(self.seed)
        t, out = 0.0, []
        for _ in range(self.n):
            out.append(t)
            t += rng.expovariate(self.rate)
        return out


def _stream(client, model: str, prompt: str, max_new: int, t_submit: float) -> tuple[Run, float]:
    chunks = []
    for chunk in client.stream(model, prompt, max_new):
        chunks.append((time.perf_counter() - t_submit, len(chunk.token_ids)))
    return Run.from_chunks(chunks), time.perf_counter()


def _summary(runs: list[Run], starts: list[float], ends: list[float], offsets: list[float]) -> dict:
    ttft = [r.ttft_s * 1e3 for r in runs]
    itl = [x * 1e3 for r in runs for x in r.itl_s]
    tokens = sum(len(r.token_times_s) for r in runs)
    wall = max(ends) - min(starts) if ends else 0.0
    busy = sum(e - s for s, e in zip(starts, ends))
    return {
        "requests": len(runs), "tokens": tokens, "wall_s": wall,
        "aggregate_tps": tokens / wall if wall else 0.0,
        "mean_concurrency": busy / wall if wall else 0.0,
        "ttft_ms_p50": pct(ttft, 0.5), "ttft_ms_p99": pct(ttft, 0.99),
        "itl_ms_p50": pct(itl, 0.5), "itl_ms_p99": pct(itl, 0.99),
        "itl_basis": "chunk",
        "offered_span_s": offsets[-1] if offsets else 0.0,
    }


def poisson_through_stack(client_factory, model: str, prompts: list[str], new_tokens: int, arrivals: Arrivals) -> dict:
    """Each request starts at its arrival time on its own thread and client; TTFT counts from
    its arrival. Returns the summary and each request's samples."""
    offsets = arrivals.offsets()
    clients = [client_factory() for _ in offsets]
    runs: list[Run | None] = [None] * len(offsets)
    starts, ends = [0.0] * len(offsets), [0.0] * len(offsets)
    errors: list[str] = []
    t0 = time.perf_counter() + 0.2

    def one(i: int) -> None:
        time.sleep(max(0.0, t0 + offsets[i] - time.perf_counter()))
        starts[i] = time.perf_counter()
        try:
            runs[i], ends[i] = _stream(clients[i], model, prompts[i % len(prompts)], new_tokens, starts[i])
        except Exception as exc:  # noqa: BLE001 - reported
            errors.append(f"{type(exc).__name__}: {exc}")
            ends[i] = time.perf_counter()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(offsets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in clients:
        c.close()
    ok = [i for i, r in enumerate(runs) if r is not None]
    out = _summary([runs[i] for i in ok], [starts[i] for i in ok], [ends[i] for i in ok], offsets)
    out.update({"rate_per_s": arrivals.rate, "errors": errors,
                "raw": [{"offset_s": offsets[i], **runs[i].__dict__} for i in ok]})
    return out


def shared_prefix_through_stack(client, model: str, systems: list[str], turns: list[str], new_tokens: int) -> dict:
    """TTFT of short user turns behind a long system prompt, one request at a time: "shared",
    every turn behind the same system prompt, sent once before to fill the replica's prefix
    cache; "distinct", each turn behind a system prompt of the same length not seen before
    (nothing to reuse: the TTFT without the cache)."""
    client.generate(model, systems[0] + turns[0], 2)  # fills the cache with systems[0]
    shared = [_stream(client, model, systems[0] + turn, new_tokens, time.perf_counter())[0] for turn in turns]
    distinct = [_stream(client, model, system + turn, new_tokens, time.perf_counter())[0]
                for system, turn in zip(systems[1:], turns)]
    s = [r.ttft_s * 1e3 for r in shared]
    d = [r.ttft_s * 1e3 for r in distinct]
    return {"shared_ttft_ms_p50": pct(s, 0.5), "distinct_ttft_ms_p50": pct(d, 0.5),
            "shared_ttft_ms_p99": pct(s, 0.99), "distinct_ttft_ms_p99": pct(d, 0.99),
            "ratio_p50": pct(s, 0.5) / pct(d, 0.5) if d else float("nan"), "requests": len(turns),
            "raw": {"shared_ttft_ms": s, "distinct_ttft_ms": d}}


# -- direct reference lines ------------------------------------------------------------------
def _og_model(build_dir: Path, threads: int, batch: int = 0):
    import onnxruntime_genai as og

    config = og.Config(str(build_dir))
    overlay: dict = {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}
    if batch:
        overlay["engine"] = {"static_batching": {"max_batch_size": batch}}
    config.overlay(json.dumps(overlay))
    return og, og.Model(config)


def static_batch(build_dir: Path, threads: int, prompt_ids: list[list[int]], new_tokens: int) -> dict:
    """One static batch of every prompt (equal lengths), run directly: the ceiling."""
    import numpy as np

    og, model = _og_model(build_dir, threads)
    rows = len(prompt_ids)

    def once() -> tuple[float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt_ids[0]) + new_tokens, do_sample=False, batch_size=rows)
        t0 = time.perf_counter()
        gen = og.Generator(model, params)
        gen.append_tokens(np.asarray(prompt_ids, np.int32))
        first = 0.0
        steps = 0
        while not gen.is_done():
            gen.generate_next_token()
            steps += 1
            if steps == 1:
                first = time.perf_counter() - t0
        return time.perf_counter() - t0, first

    once()
    wall, first = min(once() for _ in range(2))
    return {"rows": rows, "tokens": rows * new_tokens, "wall_s": wall, "aggregate_tps": rows * new_tokens / wall,
            "first_token_ms": first * 1e3}


def unloaded_step(build_dir: Path, threads: int, prompt: list[int]) -> dict:
    """One request alone, directly: its prefill (to the first token) and one decode step; the
    TTFT target under load is twice their sum."""
    from llamaship.bench.measure import DirectOG

    direct = DirectOG(build_dir, threads)
    direct.run(prompt, 2)
    runs = [direct.run(prompt, 2) for _ in range(5)]
    prefill = pct([r.ttft_s * 1e3 for r in runs], 0.5)
    step = pct([(r.token_times_s[1] - r.token_times_s[0]) * 1e3 for r in runs], 0.5)
    return {"prefill_ms": prefill, "decode_step_ms": step, "ttft_target_ms": 2 * (prefill + step)}


def og_engine(build_dir: Path, threads: int, prompt_ids: list[list[int]], new_tokens: int,
              arrivals: Arrivals | None) -> dict:
    """onnxruntime-genai's own scheduler, og.Engine, directly: requests begin their turns at their
    arrival times (all at once without `arrivals`). Its dynamic batching needs a paged-KV decoder,
    which GenAI-builder builds are not, so it runs in static-batching mode (max batch 16)."""
    import numpy as np

    og, model = _og_model(build_dir, threads, batch=TOP_CONCURRENCY)
    if not hasattr(og, "Engine"):
        return {"error": "this onnxruntime-genai has no og.Engine"}
    engine = og.Engine(model)
    buffer = engine.create_event_buffer(256)
    offsets = arrivals.offsets() if arrivals else [0.0] * len(prompt_ids)
    started: dict[int, float] = {}
    times: dict[int, list[float]] = {}
    requests = {}
    t0 = time.perf_counter()
    nxt = 0
    while nxt < len(offsets) or engine.has_pending_requests():
        now = time.perf_counter() - t0
        while nxt < len(offsets) and offsets[nxt] <= now:
            req = engine.create_request()
            opts = og.TurnOptions(req)
            opts.set_max_generated_tokens(new_tokens)
            opts.set_min_generated_tokens(new_tokens)
            opts.set_do_sample(False)
            req.begin_turn(np.asarray(prompt_ids[nxt % len(prompt_ids)], np.int32), opts)
            requests[id(req)] = (nxt, req)
            started[nxt] = time.perf_counter()
            times[nxt] = []
            nxt += 1
        if not engine.has_pending_requests():
            time.sleep(max(0.0, offsets[nxt] - (time.perf_counter() - t0)))
            continue
        for event in engine.run(buffer):
            i = requests[id(event.request)][0] if id(event.request) in requests else None
            if i is None:
                continue
            if int(event.flags) & int(og.EngineEventFlags.TOKEN):
                times[i].append(time.perf_counter() - started[i])
    ends = [started[i] + times[i][-1] for i in times if times[i]]
    runs = [Run(times[i][0], times[i]) for i in sorted(times) if times[i]]
    out = _summary(runs, [started[i] for i in sorted(times) if times[i]], ends, offsets)
    out["itl_basis"] = "token"
    out["mode"] = "static batching, max batch 16 (dynamic batching needs a paged-KV decoder)"
    return out


def arrival_rates(static_tps: float, new_tokens: int, fractions=(0.25, 0.5, 1.0)) -> list[float]:
    """Rates (requests/s) whose top keeps about TOP_CONCURRENCY requests in flight if the stack
    decoded as fast as one static batch of that many rows (Little's law)."""
    per_request_s = new_tokens * TOP_CONCURRENCY / static_tps
    top = TOP_CONCURRENCY / per_request_s
    return [top * f for f in fractions]


def windows(tokenizer, n_tokens: int, count: int, start: int = 0) -> list[str]:
    """`count` distinct texts of about `n_tokens` tokens each (BOS included), cut one after the
    other from the bench's source text starting at token `start`."""
    import sysconfig

    text = "\n".join((Path(sysconfig.get_paths()["stdlib"]) / f).read_text()
                     for f in ("argparse.py", "typing.py", "subprocess.py", "inspect.py"))
    ids = tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
    step = n_tokens - 1
    if start + count * step > len(ids):
        raise ValueError(f"the source text holds {len(ids)} tokens, fewer than {count} x {n_tokens} from {start}")
    return [tokenizer.decode(ids[start + i * step:start + (i + 1) * step]) for i in range(count)]


def measure(plan, client_factory, model: str, build_dir: Path, tokenizer, threads: int) -> dict:
    """Every serving workload and reference line for one build."""
    n, new = plan.serving_requests, plan.serving_new_tokens
    prompts = windows(tokenizer, plan.serving_prompt_tokens, n, start=0)
    ids = [tokenizer.encode(p) for p in prompts]
    length = min(len(i) for i in ids)
    ids = [i[:length] for i in ids]
    out: dict = {"prompt_tokens": length, "new_tokens": new, "requests_per_rate": n}
    out["static_batch_16"] = static_batch(build_dir, threads, ids[:TOP_CONCURRENCY], new)
    out["unloaded"] = unloaded_step(build_dir, threads, ids[0])
    rates = arrival_rates(out["static_batch_16"]["aggregate_tps"], new)
    out["poisson"] = [poisson_through_stack(client_factory, model, prompts, new, Arrivals(rate, n, seed=i))
                      for i, rate in enumerate(rates)]
    try:
        out["og_engine"] = og_engine(build_dir, threads, ids, new, Arrivals(rates[-1], n, seed=len(rates) - 1))
    except Exception as exc:  # noqa: BLE001 - the reference line is optional
        out["og_engine"] = {"error": f"{type(exc).__name__}: {exc}"}
    turns = plan.prefix_turns
    systems = windows(tokenizer, plan.prefix_tokens, turns + 1, start=n * plan.serving_prompt_tokens)
    user = windows(tokenizer, 16, turns, start=n * plan.serving_prompt_tokens + (turns + 1) * plan.prefix_tokens)
    client = client_factory()
    try:
        out["shared_prefix"] = shared_prefix_through_stack(client, model, [s + "\n" for s in systems],
                                                           [f"User: {u}\nAssistant:" for u in user], 8)
    finally:
        client.close()
    out["shared_prefix"]["system_tokens"] = plan.prefix_tokens
    return out
