"""Random weights written straight into sharded safetensors files, one slice at a time: memory
stays bounded by a slice, whatever the checkpoint's size (a bench checkpoint of many GB).

Shards are named and indexed as Hugging Face does (model-0000i-of-0000n.safetensors and
model.safetensors.index.json). Norm weights are ones, biases zeros, everything else
normal(0, std), drawn from a generator seeded per tensor: the same inputs give the same bytes.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

SLICE_BYTES = 64 << 20
_DTYPES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}


def parse_size(text: str) -> int:
    """'5GB' → 5e9, '500MB' → 5e8 (decimal units, as transformers' max_shard_size)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB)?\s*", text.upper())
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(float(m.group(1)) * 1000 ** ("B KB MB GB TB".split().index(m.group(2) or "B")))


def _plan(shapes: dict[str, tuple[int, ...]], itemsize: int, max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = itemsize
        for d in shape:
            n *= d
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _slices(name: str, shape: tuple[int, ...], std: float, seed: int, dtype: str):
    """The tensor's bytes (row-major), in slices of at most SLICE_BYTES of float32."""
    import torch

    torch_dtype = getattr(torch, dtype)
    if name.endswith("norm.weight") or "layernorm" in name or name.endswith(".bias"):  # 1-D, small
        value = 1.0 if name.endswith("weight") else 0.0
        yield torch.full((_numel(shape),), value, dtype=torch_dtype).view(torch.uint8).numpy().tobytes()
        return
    gen = torch.Generator().manual_seed(seed)
    total, step = _numel(shape), max(1, SLICE_BYTES // 4)
    for start in range(0, total, step):
        t = (torch.randn(min(step, total - start), generator=gen) * std).to(torch_dtype)
        yield t.view(torch.uint8).numpy().tobytes()


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_random(out: Path, shapes: dict[str, tuple[int, ...]], *, dtype: str, std: float, seed: int,
                 max_shard_size: str) -> list[Path]:
    """Write every tensor of `shapes` (name → shape, in order) into shards under `out`."""
    code, itemsize = _DTYPES[dtype]
    shards = _plan(shapes, itemsize, parse_size(max_shard_size))
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    order = {name: i for i, name in enumerate(shapes)}
    for file_name, members in zip(names, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in members:
            size = _numel(shapes[name]) * itemsize
            header[name] = {"dtype": code, "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[name] = file_name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / file_name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name in members:
                for chunk in _slices(name, shapes[name], std, seed * 1_000_003 + order[name], dtype):
                    f.write(chunk)
        total += offset
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return [out / n for n in names]
