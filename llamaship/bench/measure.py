"""Measurements: memory bandwidth, PyTorch eager, direct onnxruntime-genai, the whole stack."""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Run:
    """One generation: time to first token and the arrival time of every token (seconds from the
    request's start, first token included).

    `chunk_tokens` is set where tokens arrive in chunks (the whole stack: the client only sees
    when a chunk arrives, so every token of a chunk carries the chunk's arrival time). Latency is
    then measured per chunk: the gap since the previous chunk divided by the tokens the chunk
    brought. Without it every token is its own chunk and this is the plain inter-token latency."""

    ttft_s: float
    token_times_s: list[float] = field(default_factory=list)
    chunk_tokens: list[int] | None = None  # tokens in each chunk, in order; None: one per token

    @classmethod
    def from_chunks(cls, chunks: list[tuple[float, int]]) -> "Run":
        """A run from (arrival time, tokens in the chunk) per chunk that carried tokens."""
        chunks = [(t, n) for t, n in chunks if n > 0]
        times = [t for t, n in chunks for _ in range(n)]
        return cls(times[0] if times else 0.0, times, [n for _, n in chunks])

    def chunks(self) -> list[tuple[float, int]]:
        """(arrival time, tokens) per chunk."""
        t = self.token_times_s
        if self.chunk_tokens is None:
            return [(x, 1) for x in t]
        out, end = [], 0
        for n in self.chunk_tokens:
            end += n
            out.append((t[end - 1], n))
        return out

    @property
    def chunk_gaps_s(self) -> list[float]:
        c = self.chunks()
        return [b[0] - a[0] for a, b in zip(c, c[1:])]

    @property
    def itl_s(self) -> list[float]:
        """One sample per chunk after the first: its gap ÷ its tokens (per token for runs without chunks)."""
        c = self.chunks()
        return [(b[0] - a[0]) / b[1] for a, b in zip(c, c[1:])]

    @property
    def decode_tps(self) -> float:
        """Tokens after the first chunk ÷ time from the first chunk to the last."""
        c = self.chunks()
        if len(c) < 2 or c[-1][0] <= c[0][0]:
            return 0.0
        return sum(n for _, n in c[1:]) / (c[-1][0] - c[0][0])


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(runs: list[Run]) -> dict:
    ttft = [r.ttft_s for r in runs]
    itl = [x for r in runs for x in r.itl_s]
    out = {
        "ttft_ms_p50": pct(ttft, 0.5) * 1e3,
        "ttft_ms_p99": pct(ttft, 0.99) * 1e3,
        "itl_ms_p50": pct(itl, 0.5) * 1e3,
        "itl_ms_p99": pct(itl, 0.99) * 1e3,
        "itl_ms_var": statistics.pvariance([x * 1e3 for x in itl]) if len(itl) > 1 else 0.0,
        "itl_basis": "chunk" if any(r.chunk_tokens is not None for r in runs) else "token",
        "decode_tps": statistics.median([r.decode_tps for r in runs]) if runs else 0.0,
        "samples": len(runs),
    }
    if out["itl_basis"] == "chunk":
        gaps = [x for r in runs for x in r.chunk_gaps_s]
        sizes = [n for r in runs for _, n in r.chunks()]
        out.update({"chunk_gap_ms_p50": pct(gaps, 0.5) * 1e3, "chunk_gap_ms_p99": pct(gaps, 0.99) * 1e3,
                    "tokens_per_chunk_mean": statistics.fmean(sizes) if sizes else float("nan")})
    return out


def memory_bandwidth_gbs(threads: int, gib: float = 1.0, reps: int = 5, device: str = "cpu") -> float:
    """Read bandwidth: the best of `reps` sums over a tensor much larger than any cache
    (on the GPU for device "cuda": its memory is what decode reads there)."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32, device=device)

        def once() -> None:
            x.sum()
            if device == "cuda":
                torch.cuda.synchronize()

        once()
        best = min(_timed(once) for _ in range(reps))
        return x.numel() * 4 / best / 1e9
    finally:
        torch.set_num_threads(prev)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def peak_rss_mb(pid: int, with_children: bool = False) -> float:
    """VmHWM (peak resident set) of a process in MB; with its live children (a replica's decode
    workers) added when asked."""
    def hwm(p: int) -> float:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    total = hwm(pid)
    if with_children:
        import psutil

        try:
            total += sum(hwm(c.pid) for c in psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            pass
    return total


class TreeRssSampler:
    """Peak resident memory of a process and all its descendants together, sampled from outside
    every `interval_s` while the `with` block runs (a compile: the service and the build children
    it starts). `result()`: peak and the value at the start (the idle service), in MB."""

    def __init__(self, pid: int, interval_s: float = 0.05):
        self.pid, self.interval_s = pid, interval_s
        self.samples = 0
        self.peak = self.start = float("nan")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> float:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return float("nan")
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total / 1e6

    def _loop(self) -> None:
        while not self._stop.is_set():
            v = self.sample()
            self.samples += 1
            if not v != v and not (self.peak >= v):
                self.peak = v
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "TreeRssSampler":
        self.start = self.sample()
        self.peak = self.start
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def result(self) -> dict:
        return {"peak": self.peak, "start": self.start, "samples": self.samples, "interval_s": self.interval_s}


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds each process, with its live children (a replica's decode
    workers), has used so far."""
    import psutil

    out = {}
    for name, pid in pids.items():
        try:
            proc = psutil.Process(pid)
            total = 0.0
            for p in [proc, *(c for c in proc.children(recursive=True) if name != "client (bench)")]:
                t = p.cpu_times()
                total += t.user + t.system
            out[name] = total
        except psutil.Error:
            out[name] = float("nan")
    return out


def cpu_ms_per_token(before: dict[str, float], after: dict[str, float], runs: list[Run]) -> dict[str, float]:
    """A CPU profile of a measurement: milliseconds of CPU each process spent per generated token."""
    tokens = sum(len(r.token_times_s) for r in runs) or 1
    return {name: (after[name] - before[name]) * 1e3 / tokens for name in before}


# -- onnxruntime-genai, called directly -------------------------------------------------------
class DirectOG:
    def __init__(self, build_dir: Path, threads: int):
        import json

        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(build_dir))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.model = og.Model(config)

    def run(self, prompt_ids: list[int], max_new: int) -> Run:
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt_ids) + max_new, do_sample=False)
        t0 = time.perf_counter()
        gen = og.Generator(self.model, params)
        gen.append_tokens(prompt_ids)
        times = []
        while not gen.is_done():
            gen.generate_next_token()
            times.append(time.perf_counter() - t0)
        return Run(times[0], times)


# -- PyTorch eager (transformers generate) ----------------------------------------------------
class TorchEager:
    """transformers `generate`; Llama 4 checkpoints (`llama4=True`) load as Llama4ForCausalLM
    through the quality gate's loader, which accepts published configs' quirks."""

    def __init__(self, checkpoint: Path, dtype: str, threads: int, device: str = "cpu", llama4: bool = False):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.device = device
        if llama4:
            from compiler_service.torch_reference import load_llama4_text

            self.model = load_llama4_text(Path(checkpoint), dtype).to(device).eval()
        else:
            self.model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype)).to(device).eval()

    def run(self, prompt_ids: list[int], max_new: int) -> Run:
        from transformers.generation.streamers import BaseStreamer

        times: list[float] = []
        torch, device = self.torch, self.device
        t0 = time.perf_counter()

        class Timing(BaseStreamer):
            first = True

            def put(self, value):  # the first call carries the prompt
                if self.first:
                    self.first = False
                    return
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)

            def end(self):
                pass

        with self.torch.no_grad():
            self.model.generate(self.torch.tensor([prompt_ids], device=self.device), max_new_tokens=max_new, min_new_tokens=max_new,
                                do_sample=False, streamer=Timing(), pad_token_id=0)
        return Run(times[0], times)


def bf16_supported() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# -- the whole stack ----------------------------------------------------------------------------
def stack_run(client, model: str, prompt: str, max_new: int) -> Run:
    """Timed per chunk as the client receives them (the stream carries no per-token times)."""
    chunks = []
    t0 = time.perf_counter()
    for chunk in client.stream(model, prompt, max_new):
        chunks.append((time.perf_counter() - t0, len(chunk.token_ids)))
    return Run.from_chunks(chunks)


def concurrent_tps(client_factory, model: str, prompt: str, max_new: int, concurrency: int, rounds: int = 1) -> dict:
    """Aggregate completion tokens/s with `concurrency` clients streaming at once."""
    tokens = [0] * concurrency
    ttft_ms: list[float] = []
    errors: list[str] = []

    def worker(i: int) -> None:
        c = client_factory()
        try:
            for _ in range(rounds):
                out = c.generate(model, prompt, max_new)
                tokens[i] += out.completion_tokens
                ttft_ms.append(out.time_to_first_token_s * 1000)
        except Exception as exc:  # noqa: BLE001 - reported
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "tokens": sum(tokens), "wall_s": wall,
            "aggregate_tps": sum(tokens) / wall if wall else 0.0, "errors": errors,
            "ttft_ms_p50": pct(ttft_ms, 0.5), "ttft_ms_p99": pct(ttft_ms, 0.99)}


# -- bytes each decoded token must read ---------------------------------------------------------
def onnx_weight_bytes(build_dir: Path) -> dict:
    """Bytes of initializers read per decode step: everything but the gathered embedding table
    and the rotary caches (read one row per step)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(build_dir / "model.onnx"), load_external_data=False)
    total = gathered = 0
    for init in model.graph.initializer:
        if uses_external_data(init):
            size = int(next((e.value for e in init.external_data if e.key == "length"), 0))
        else:
            size = len(init.raw_data) or onnx.numpy_helper.to_array(init).nbytes
        total += size
        if "embed_tokens" in init.name or init.name in ("cos_cache", "sin_cache"):
            gathered += size
    return {"total_bytes": total, "per_token_bytes": total - gathered}


def torch_weight_bytes(checkpoint: Path, dtype_bytes: int) -> int:
    import json
    import struct

    params = 0
    embed = 0
    for f in sorted(checkpoint.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for d in info["shape"]:
                count *= d
            params += count
            if "embed_tokens" in name:
                embed = count
    cfg = json.loads((checkpoint / "config.json").read_text())
    # tied: lm_head reads the embedding matrix once per token; untied: the gather reads one row
    read = params if cfg.get("tie_word_embeddings") else params - embed
    return read * dtype_bytes


def as_dict(obj) -> dict:
    return asdict(obj)


def threads_default() -> int:
    return max(1, min(os.cpu_count() or 1, 2))
