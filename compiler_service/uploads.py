"""Checkpoint uploads into the shared store: declared files, appended in order, verified by sha256.

Layout: <store>/uploads/<upload_id>/state.json (the declared files and what arrived) and
files/<path> (the bytes). A chunk is accepted only at the offset where its file stops, so a
client that lost its connection asks how much arrived (GetUpload) and goes on from there;
re-sent bytes are refused, never appended twice. When a file's last byte arrives its sha256 is
checked; a mismatch discards that file's bytes (to be sent again) and is reported.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from shared.errors import InvalidArgument, NotFound
from shared.store import sha256_file

MAX_FILES = 256
MAX_TOTAL_BYTES = 1 << 40
_SHA = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"up-[0-9a-f]{24}")


class UploadConflict(InvalidArgument):
    pass


@dataclass
class UploadedFile:
    path: str
    size: int
    sha256: str
    received: int = 0
    verified: bool = False


@dataclass
class UploadState:
    upload_id: str
    files: list[UploadedFile] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return all(f.verified for f in self.files)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def received_bytes(self) -> int:
        return sum(f.received for f in self.files)

    def file(self, path: str) -> UploadedFile:
        for f in self.files:
            if f.path == path:
                return f
        raise InvalidArgument(f"path: {path!r} was not declared in upload {self.upload_id}")


def _check_path(path: str) -> str:
    p = PurePosixPath(path)
    if not path or p.is_absolute() or ".." in p.parts or "\\" in path or path.startswith("."):
        raise InvalidArgument(f"files: {path!r} must be a relative path inside the checkpoint, without '..'")
    return str(p)


class UploadStore:
    def __init__(self, root: Path):
        self.root = Path(root) / "uploads"
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock(self, upload_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(upload_id, threading.Lock())

    def _dir(self, upload_id: str) -> Path:
        if not _ID.fullmatch(upload_id or ""):
            raise NotFound(f"no upload {upload_id!r}")
        return self.root / upload_id

    def create(self, files: list[tuple[str, int, str]]) -> UploadState:
        if not files:
            raise InvalidArgument("files: declare at least one file")
        if len(files) > MAX_FILES:
            raise InvalidArgument(f"files: at most {MAX_FILES}")
        seen, declared = set(), []
        for path, size, sha in files:
            path = _check_path(path)
            if path in seen:
                raise InvalidArgument(f"files: {path} is declared twice")
            seen.add(path)
            if size < 0:
                raise InvalidArgument(f"files: {path} has a negative size")
            if not _SHA.fullmatch(sha or ""):
                raise InvalidArgument(f"files: {path} needs its sha256 as 64 lowercase hex digits")
            declared.append(UploadedFile(path, int(size), sha))
        if sum(f.size for f in declared) > MAX_TOTAL_BYTES:
            raise InvalidArgument("files: the upload is larger than 1 TiB")
        state = UploadState(f"up-{secrets.token_hex(12)}", declared)
        d = self.root / state.upload_id
        (d / "files").mkdir(parents=True)
        for f in declared:
            target = d / "files" / f.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
            if f.size == 0:
                self._finish(state, f, target)
        self._save(state)
        return state

    def get(self, upload_id: str) -> UploadState:
        path = self._dir(upload_id) / "state.json"
        if not path.is_file():
            raise NotFound(f"no upload {upload_id!r}")
        data = json.loads(path.read_text())
        return UploadState(data["upload_id"], [UploadedFile(**f) for f in data["files"]])

    def append(self, upload_id: str, path: str, offset: int, data: bytes) -> UploadState:
        with self._lock(upload_id):
            state = self.get(upload_id)
            f = state.file(_check_path(path))
            if f.verified:
                raise UploadConflict(f"{f.path} is already complete and verified")
            if offset != f.received:
                raise UploadConflict(f"{f.path}: chunk at offset {offset}, but {f.received} bytes arrived so far; "
                                     "send from there (GetUpload)")
            if f.received + len(data) > f.size:
                raise InvalidArgument(f"{f.path}: more bytes than its declared size {f.size}")
            target = self._dir(upload_id) / "files" / f.path
            with open(target, "r+b") as out:
                out.seek(offset)
                out.write(data)
                out.truncate()
                out.flush()
                os.fsync(out.fileno())
            f.received += len(data)
            if f.received == f.size:
                self._finish(state, f, target)
            self._save(state)
            return state

    def _finish(self, state: UploadState, f: UploadedFile, target: Path) -> None:
        digest = sha256_file(target)
        if digest != f.sha256:
            f.received = 0
            target.write_bytes(b"")
            self._save(state)
            raise InvalidArgument(f"{f.path}: sha256 of the received bytes is {digest}, not the declared "
                                  f"{f.sha256}; its bytes were discarded, send the file again")
        f.verified = True

    def _save(self, state: UploadState) -> None:
        path = self.root / state.upload_id / "state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(state)))
        os.replace(tmp, path)

    def checkpoint_dir(self, upload_id: str) -> Path:
        """The directory of a complete upload, for the compiler to read."""
        state = self.get(upload_id)
        if not state.complete:
            missing = [f"{f.path} ({f.received}/{f.size} bytes)" for f in state.files if not f.verified]
            raise InvalidArgument(f"upload_id: upload {upload_id} is incomplete: {', '.join(missing[:5])}")
        return self._dir(upload_id) / "files"

    def delete(self, upload_id: str) -> None:
        shutil.rmtree(self._dir(upload_id), ignore_errors=True)
