"""Reads safetensors checkpoints one tensor at a time (numpy only, nothing else held), and
checks each tensor's shape against what the config implies."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compiler_service.checkpoint import CheckpointError, open_regular, safetensors_header

ROW_BLOCK_BYTES = 64 << 20  # how much of a large tensor (embeddings, lm_head) is read at once
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


class Weights:
    """Index of every tensor in a checkpoint directory's *.safetensors files."""

    def __init__(self, directory: Path, prefix: str = ""):
        self.prefix = prefix
        self._entries: dict[str, _Entry] = {}
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError("no *.safetensors weight files in the checkpoint")
        for path in files:
            header, base = safetensors_header(path)
            size = path.stat().st_size
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                try:
                    start, end = (int(v) for v in info["data_offsets"])
                    entry = _Entry(path, str(info["dtype"]), tuple(int(d) for d in info["shape"]), base + start, base + end)
                except (KeyError, TypeError, ValueError):
                    raise CheckpointError(f"corrupt safetensors file {path.name}: bad entry for {name[:80]}") from None
                if entry.dtype not in _DTYPES:
                    raise CheckpointError(f"tensor {name[:80]}: dtype {entry.dtype[:10]} is not supported")
                count = int(np.prod(entry.shape, dtype=np.int64))
                if entry.end > size or entry.end - entry.start != count * np.dtype(_DTYPES[entry.dtype]).itemsize:
                    raise CheckpointError(f"corrupt safetensors file {path.name}: {name[:80]} does not fit its bytes")
                self._entries[name] = entry

    def has(self, name: str) -> bool:
        return self.prefix + name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(self.prefix + name)
        if entry is None:
            raise CheckpointError(f"missing tensor {self.prefix + name}")
        return entry

    def check(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Every expected tensor is present with its shape (headers only, nothing read)."""
        for name, shape in expected.items():
            self._checked(name, shape)

    def _checked(self, name: str, shape: tuple[int, ...]) -> _Entry:
        entry = self._entry(name)
        if entry.shape != tuple(shape):
            raise CheckpointError(f"tensor {self.prefix + name} has shape {list(entry.shape)}, expected {list(shape)}")
        return entry

    def read(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor as float32, after checking its shape is `shape`."""
        entry = self._checked(name, shape)
        return self._load(entry, name, 0, int(np.prod(shape, dtype=np.int64))).reshape(shape)

    def read_slice(self, name: str, shape: tuple[int, ...], index: int) -> np.ndarray:
        """`tensor[index]` as float32 (e.g. one expert), reading only its bytes."""
        return self.read_rows(name, shape, index, index + 1)[0]

    def read_rows(self, name: str, shape: tuple[int, ...], start: int, stop: int) -> np.ndarray:
        """`tensor[start:stop]` as float32, reading only its bytes."""
        entry = self._checked(name, shape)
        inner = int(np.prod(shape[1:], dtype=np.int64))
        stop = min(stop, shape[0])
        return self._load(entry, name, start * inner, (stop - start) * inner).reshape((stop - start, *shape[1:]))

    def row_blocks(self, name: str, shape: tuple[int, ...]):
        """tensor[a:b] for consecutive blocks of about ROW_BLOCK_BYTES (as float32)."""
        step = max(1, ROW_BLOCK_BYTES // (4 * int(np.prod(shape[1:], dtype=np.int64))))
        for start in range(0, shape[0], step):
            yield self.read_rows(name, shape, start, start + step)

    def _load(self, entry: _Entry, name: str, first: int, count: int) -> np.ndarray:
        raw_dtype = np.dtype(_DTYPES[entry.dtype]).newbyteorder("<")
        with open_regular(entry.file) as f:
            f.seek(entry.start + first * raw_dtype.itemsize)
            data = np.fromfile(f, dtype=raw_dtype, count=count)
        if len(data) != count:
            raise CheckpointError(f"tensor {self.prefix + name}: file {entry.file.name} ends early")
        if entry.dtype == "BF16":
            data = (data.astype(np.uint32) << 16).view(np.float32)
        return data.astype(np.float32, copy=False)
