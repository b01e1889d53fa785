"""Checkpoint checks before any heavy work, and the content hash that identifies a source."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from shared.errors import shown
from shared.store import sha256_file

LLAMA4_ARCHITECTURES = ("Llama4ForCausalLM", "Llama4ForConditionalGeneration")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", *LLAMA4_ARCHITECTURES)
TOKENIZER_FILES = ("tokenizer.json",)
MAX_CONFIG_BYTES = 1 << 20  # config.json
MAX_HEADER_BYTES = 16 << 20  # a safetensors JSON header (a 405B model's shard needs well under 1 MiB)


class CheckpointError(ValueError):
    """The directory is not a checkpoint the compiler can take; the message says why."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    architecture: str
    config: dict
    weight_files: tuple[Path, ...]
    parameters: int  # of the model that is compiled (a Llama 4 checkpoint's text tower)
    text_config: dict | None = None  # the compiled text model's config (Llama 4: text_config, if nested)

    @property
    def is_llama4(self) -> bool:
        return self.architecture in LLAMA4_ARCHITECTURES

    @property
    def text(self) -> dict:
        return self.config if self.text_config is None else self.text_config

    @property
    def num_layers(self) -> int:
        return int(self.text.get("num_hidden_layers", 0))

    @property
    def vocab_size(self) -> int:
        return int(self.text.get("vocab_size", 32000))

    @property
    def max_position_embeddings(self) -> int:
        """As config.json states it; the build's context is what the request asks for within it."""
        return int(self.text.get("max_position_embeddings", 0))


def open_regular(path: Path):
    """Open a file for reading only if it is a regular file (a FIFO, device or socket would block
    or never end); symlinks are followed. Raises CheckpointError otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        raise CheckpointError(f"{path.name} cannot be read") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{path.name} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _json(data: bytes, what: str):
    try:
        return json.loads(data)
    except RecursionError:
        raise CheckpointError(f"{what} nests too deeply to be a checkpoint's JSON") from None
    except ValueError as exc:
        raise CheckpointError(f"{what} is not valid JSON: {str(exc)[:120]}") from None


def read_config(path: Path) -> dict:
    with open_regular(path) as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise CheckpointError(f"config.json is larger than {MAX_CONFIG_BYTES >> 10} KiB; not a model config")
    config = _json(data, "config.json")
    if not isinstance(config, dict):
        raise CheckpointError("config.json is not a JSON object")
    return config


def safetensors_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header, checked against the file's size, and the offset where its
    tensor data starts. Bounded: a header over MAX_HEADER_BYTES is refused before it is read."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"corrupt safetensors file {path.name}: shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or 8 + n > size:
            raise CheckpointError(f"corrupt safetensors file {path.name}: header length {n} does not fit a {size}-byte file")
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"safetensors file {path.name}: header of {n} bytes is over the "
                                  f"{MAX_HEADER_BYTES >> 20} MiB limit")
        header = _json(f.read(n), f"corrupt safetensors file {path.name}: header")
    if not isinstance(header, dict):
        raise CheckpointError(f"corrupt safetensors file {path.name}: header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            stop = int(stop)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"corrupt safetensors file {path.name}: tensor {name} has no data offsets") from None
        end = max(end, stop)
    if 8 + n + end != size:
        raise CheckpointError(
            f"corrupt safetensors file {path.name}: tensors need {8 + n + end} bytes but the file has {size} (truncated?)"
        )
    return header, 8 + n


def inspect(path: str | Path, allow_pickle: bool = False, label: str = "") -> Checkpoint:
    """Check that `path` is a Hugging Face Llama checkpoint the builder can take. Pickle weights
    (.bin/.pt) count only with `allow_pickle`: unpickling can run code from the file. Messages
    name the checkpoint as `label` (what the user gave), never by its path on the compiler."""
    p = Path(path)
    label = label or shown(str(path))
    if not p.exists():
        raise CheckpointError(f"checkpoint path {label} does not exist (it must be visible to the compiler)")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint path {label} is not a directory")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{label} is not a Hugging Face checkpoint: it has no config.json")
    config = read_config(cfg_path)
    archs = config.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else ""
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"architecture {shown(arch) if arch else '(none in config.json)'} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    weights = tuple(sorted(p.glob("*.safetensors")))
    pickles = tuple(sorted([*p.glob("*.bin"), *p.glob("*.pt")]))
    if not weights and not (pickles and allow_pickle):
        if pickles:
            raise CheckpointError(f"{label} has only pickle weights (.bin/.pt); Llamaship accepts safetensors unless the "
                                  "request sets allow_pickle (loading pickles can run code from the file)")
        raise CheckpointError(f"{label} has no *.safetensors weights")
    missing = [f for f in TOKENIZER_FILES if not (p / f).is_file()]
    if missing:
        raise CheckpointError(f"{label} has no {', '.join(missing)} (the serving replicas tokenize with it)")
    if arch in LLAMA4_ARCHITECTURES and not weights:
        raise CheckpointError(f"{label} has no *.safetensors weights (Llama 4 builds read safetensors only)")
    if not weights:  # pickles, allowed: their shapes cannot be read without unpickling
        return Checkpoint(p.resolve(), arch, config, pickles, 0)
    params = 0
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, str] = {}
    for w in weights:
        for name, info in safetensors_header(w)[0].items():
            if name != "__metadata__":
                try:
                    shapes[name] = [int(d) for d in info.get("shape", [])]
                    dtypes[name] = str(info.get("dtype", ""))
                except (AttributeError, TypeError, ValueError):
                    raise CheckpointError(f"corrupt safetensors file {w.name}: tensor {shown(name)} has a bad shape") from None
                n = 1
                for d in shapes[name]:
                    n *= d
                params += n
    if arch in LLAMA4_ARCHITECTURES:
        from compiler_service import llama4_checkpoint  # it imports this module

        try:
            l4 = llama4_checkpoint.inspect(config, shapes, dtypes)
        except CheckpointError as exc:
            raise CheckpointError(f"{arch} checkpoint {label}: {exc}") from None
        return Checkpoint(p.resolve(), arch, config, weights, l4.parameters, l4.text_config)
    check_config_matches_weights(config, shapes)
    return Checkpoint(p.resolve(), arch, config, weights, params)


@dataclass(frozen=True)
class LlamaDims:
    """The shape of a Llama model, as its config.json states it."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int

    @classmethod
    def of(cls, config: dict) -> "LlamaDims":
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            return cls(hidden=hidden, layers=int(config["num_hidden_layers"]), heads=heads,
                       kv_heads=int(config.get("num_key_value_heads") or heads),
                       head_dim=int(config.get("head_dim") or hidden // heads), vocab=int(config["vocab_size"]),
                       intermediate=int(config["intermediate_size"]))
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            raise CheckpointError(f"config.json lacks or mangles a Llama field ({exc})") from None


def check_config_matches_weights(config: dict, shapes: dict[str, list[int]]) -> None:
    """config.json must describe the tensors the weights hold (a mismatch would make the builder
    fail late or, worse, build a wrong graph)."""
    d = LlamaDims.of(config)
    layers = d.layers
    prefix = "model." if any(k.startswith("model.") for k in shapes) else ""
    expected = {
        f"{prefix}embed_tokens.weight": [d.vocab, d.hidden],
        f"{prefix}layers.0.self_attn.q_proj.weight": [d.heads * d.head_dim, d.hidden],
        f"{prefix}layers.0.self_attn.k_proj.weight": [d.kv_heads * d.head_dim, d.hidden],
        f"{prefix}layers.0.mlp.gate_proj.weight": [d.intermediate, d.hidden],
    }
    for name, want in expected.items():
        got = shapes.get(name)
        if got is None:
            raise CheckpointError(f"the weights have no {name}: not a Llama checkpoint, or a config for another model")
        if got != want:
            raise CheckpointError(f"config.json and the weights disagree: {name} is {got}, the config implies {want}")
    found = {int(k.split(".")[len(prefix.split(".")) ]) for k in shapes if k.startswith(f"{prefix}layers.")}
    if found != set(range(layers)):
        raise CheckpointError(f"config.json and the weights disagree: num_hidden_layers is {layers}, "
                              f"the weights hold {len(found)} layers")


def content_hash(path: Path, progress: Callable[[float], None] | None = None,
                 stop: threading.Event | None = None) -> str:
    """sha256 over every visible regular file's relative path and sha256, in sorted order (an
    upload's eval_prompts.jsonl is not part of the model and does not count). `stop` set: it
    raises CheckpointError between chunks."""
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.relative_to(path) != Path("eval_prompts.jsonl")
                   and not any(part.startswith(".") for part in f.relative_to(path).parts))
    total = sum(f.stat().st_size for f in files) or 1
    done = 0
    h = hashlib.sha256()
    for f in files:
        with open_regular(f) as handle:
            digest = sha256_file(handle, stop=stop)
        if digest is None:
            raise CheckpointError("hashing stopped")
        h.update(str(f.relative_to(path)).encode() + b"\0" + digest.encode() + b"\n")
        done += f.stat().st_size
        if progress:
            progress(done / total)
    return h.hexdigest()
