"""Checkpoint uploads into the shared store: declared files, appended in order, verified by sha256.

Layout: <store>/uploads/<upload_id>/state.json (the owner tenant, the declared files, what
arrived, when it expires) and files/<path> (the bytes; a file and its folders exist once its
first bytes arrive). A chunk is accepted only at the offset where its file stops, so a client
that lost its connection asks how much arrived (GetUpload) and goes on from there; re-sent bytes
are refused, never appended twice. When a file's last byte arrives its sha256 is checked; a
mismatch discards that file's bytes (to be sent again) and is reported.

Only the tenant that created an upload (or an admin) sees or uses it; to anyone else it does not
exist. Each tenant has a quota of declared bytes and of uploads held at once; an upload is
deleted `expiry_s` after it was created, finished or not (`sweep`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import threading
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from shared import config
from shared.errors import InvalidArgument, NotFound, ResourceExhausted, shown
from shared.store import sha256_file
from shared.tenancy import Caller
from shared.wire import WireError, from_dict

MAX_FILES = 256
MAX_PATH_CHARS = 1024
MAX_COMPONENT_CHARS = 255
MAX_STATE_BYTES = 1 << 20
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
_SHA = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"up-[0-9a-f]{24}")
GIB = 1 << 30


def _default(name: str):
    return config.SETTINGS[name].default


class UploadConflict(InvalidArgument):
    """A chunk that does not continue its file where it stops (re-sent, or out of order)."""


@dataclass(frozen=True)
class UploadLimits:
    quota_bytes: int = int(_default("upload_quota_gib") * GIB)
    max_active: int = _default("upload_max_active")
    expiry_s: float = _default("upload_expiry_s")
    min_free_bytes: int = int(_default("upload_min_free_gib") * GIB)

    @classmethod
    def of(cls, settings) -> "UploadLimits":
        return cls(int(settings.upload_quota_gib * GIB), settings.upload_max_active, settings.upload_expiry_s,
                   int(settings.upload_min_free_gib * GIB))


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
    tenant: str = ""
    created_at: float = 0.0
    expires_at: float = 0.0

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
        raise InvalidArgument(f"path: {shown(path)} was not declared in upload {self.upload_id}")


def check_path(path: str) -> str:
    """A declared file's path: relative, '/'-separated, no '..', no hidden or over-long parts,
    no control characters (NUL included). Returns its normal form."""
    if not path or len(path) > MAX_PATH_CHARS:
        raise InvalidArgument(f"files: a path must have 1-{MAX_PATH_CHARS} characters")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in path) or "\\" in path:
        raise InvalidArgument(f"files: {shown(path)} has control characters or backslashes")
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise InvalidArgument(f"files: {shown(path)} must be a relative path inside the checkpoint, without '..'")
    for part in p.parts:
        if part.startswith("."):
            raise InvalidArgument(f"files: {shown(path)} has a hidden (dot) name")
        if len(part.encode()) > MAX_COMPONENT_CHARS:
            raise InvalidArgument(f"files: {shown(path)} has a name over {MAX_COMPONENT_CHARS} bytes")
    return str(p)


def _check_declared(files: list[tuple[str, int, str]]) -> list[UploadedFile]:
    if not files:
        raise InvalidArgument("files: declare at least one file")
    if len(files) > MAX_FILES:
        raise InvalidArgument(f"files: at most {MAX_FILES}")
    declared: dict[str, UploadedFile] = {}
    for path, size, sha in files:
        path = check_path(path)
        if path in declared:
            raise InvalidArgument(f"files: {shown(path)} is declared twice")
        if size < 0:
            raise InvalidArgument(f"files: {shown(path)} has a negative size")
        if not _SHA.fullmatch(sha or ""):
            raise InvalidArgument(f"files: {shown(path)} needs its sha256 as 64 lowercase hex digits")
        declared[path] = UploadedFile(path, int(size), sha)
    folders = {str(parent) for p in declared for parent in PurePosixPath(p).parents if str(parent) != "."}
    clash = sorted(folders & set(declared))
    if clash:
        raise InvalidArgument(f"files: {shown(clash[0])} is declared as a file and as a folder")
    return list(declared.values())


class UploadStore:
    def __init__(self, root: Path, limits: UploadLimits | None = None):
        self.root = Path(root) / "uploads"
        self.limits = limits or UploadLimits()
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._create_lock = threading.Lock()

    def _lock(self, upload_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(upload_id, threading.Lock())

    def _dir(self, upload_id: str) -> Path:
        if not _ID.fullmatch(upload_id or ""):
            raise NotFound(f"no upload {shown(upload_id)}")
        return self.root / upload_id

    def _all(self) -> list[UploadState]:
        out = []
        if self.root.is_dir():
            for d in self.root.iterdir():
                if _ID.fullmatch(d.name):
                    try:
                        out.append(self._load(d.name))
                    except NotFound:
                        continue
        return out

    def create(self, files: list[tuple[str, int, str]], caller: Caller) -> UploadState:
        declared = _check_declared(files)
        total = sum(f.size for f in declared)
        if total > self.limits.quota_bytes:
            raise ResourceExhausted(f"files: {total} bytes declared; the upload quota is {self.limits.quota_bytes} bytes")
        with self._create_lock:
            mine = [s for s in self._all() if s.tenant == caller.tenant]
            if len(mine) >= self.limits.max_active:
                raise ResourceExhausted(f"tenant {caller.tenant!r} holds {len(mine)} uploads, the most allowed; "
                                        "wait for one to expire")
            held = sum(s.total_bytes for s in mine)
            if held + total > self.limits.quota_bytes:
                raise ResourceExhausted(f"tenant {caller.tenant!r} has {held} bytes in uploads; {total} more would "
                                        f"pass its quota of {self.limits.quota_bytes} bytes")
            self.root.mkdir(parents=True, exist_ok=True)
            pending = sum(s.total_bytes - s.received_bytes for s in self._all())
            free = shutil.disk_usage(self.root).free
            if free - pending - total < self.limits.min_free_bytes:
                raise ResourceExhausted("the compiler's store has too little free disk for this upload; retry later",
                                        retry_after_s=60.0)
            now = time.time()
            state = UploadState(f"up-{secrets.token_hex(12)}", declared, caller.tenant, now, now + self.limits.expiry_s)
            (self.root / state.upload_id / "files").mkdir(parents=True)
            for f in declared:
                if f.size == 0:
                    self._finish(state, f, None)
            self._materialize_if_complete(state)
            self._save(state)
        return state

    def _load(self, upload_id: str) -> UploadState:
        path = self._dir(upload_id) / "state.json"
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_STATE_BYTES)
            data = json.loads(raw)
            data["files"] = [from_dict(UploadedFile, f) for f in data.get("files", [])]
            return from_dict(UploadState, data)
        except (OSError, ValueError, TypeError, AttributeError, WireError):
            raise NotFound(f"no upload {shown(upload_id)}") from None

    def get(self, upload_id: str, caller: Caller) -> UploadState:
        """The upload, if it exists, has not expired, and `caller` may use it; else NOT_FOUND."""
        state = self._load(upload_id)
        if not caller.owns(state.tenant) or (state.expires_at and state.expires_at < time.time()):
            raise NotFound(f"no upload {shown(upload_id)}")
        return state

    def append(self, upload_id: str, path: str, offset: int, data: bytes, caller: Caller) -> UploadState:
        with self._lock(upload_id):
            state = self.get(upload_id, caller)
            f = state.file(check_path(path))
            if f.verified:
                raise UploadConflict(f"{f.path} is already complete and verified")
            if offset != f.received:
                raise UploadConflict(f"{f.path}: chunk at offset {offset}, but {f.received} bytes arrived so far; "
                                     "send from there (GetUpload)")
            if f.received + len(data) > f.size:
                raise InvalidArgument(f"{f.path}: more bytes than its declared size {f.size}")
            target = self._dir(upload_id) / "files" / f.path
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "r+b" if offset else "wb") as out:
                out.seek(offset)
                out.write(data)
                out.truncate()
                out.flush()
                os.fsync(out.fileno())
            f.received += len(data)
            if f.received == f.size:
                self._finish(state, f, target)
                self._materialize_if_complete(state)
            self._save(state)
            return state

    def _finish(self, state: UploadState, f: UploadedFile, target: Path | None) -> None:
        digest = sha256_file(target) if target is not None else EMPTY_SHA256
        if digest != f.sha256:
            f.received = 0
            if target is not None:
                target.unlink(missing_ok=True)
            self._save(state)
            raise InvalidArgument(f"{f.path}: sha256 of the received bytes is {digest}, not the declared "
                                  f"{f.sha256}; its bytes were discarded, send the file again")
        f.verified = True

    def _materialize_if_complete(self, state: UploadState) -> None:
        """Empty files get their (empty) file once the upload is complete."""
        if state.complete:
            for f in state.files:
                if f.size == 0:
                    target = self.root / state.upload_id / "files" / f.path
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.touch()

    def _save(self, state: UploadState) -> None:
        path = self.root / state.upload_id / "state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(state)))
        os.replace(tmp, path)

    def checkpoint_dir(self, upload_id: str, caller: Caller) -> Path:
        """The directory of a complete upload, for the compiler to read."""
        state = self.get(upload_id, caller)
        if not state.complete:
            missing = [f"{f.path} ({f.received}/{f.size} bytes)" for f in state.files if not f.verified]
            raise InvalidArgument(f"upload_id: upload {upload_id} is incomplete: {', '.join(missing[:5])}")
        return self._dir(upload_id) / "files"

    def snapshot(self, upload_id: str, caller: Caller, dest: Path) -> Path:
        """A private copy of a complete upload's files for one compile (hard links where the file
        system allows), so that the upload may expire while the compile runs."""
        src = self.checkpoint_dir(upload_id, caller)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(src, dest, copy_function=_link_or_copy)
        return dest

    def delete(self, upload_id: str) -> None:
        shutil.rmtree(self._dir(upload_id), ignore_errors=True)
        with self._guard:
            self._locks.pop(upload_id, None)

    def sweep(self, now: float | None = None) -> list[str]:
        """Delete expired uploads (and unreadable leftovers); returns their ids. Blocking: run in a thread."""
        now = time.time() if now is None else now
        gone = []
        if not self.root.is_dir():
            return gone
        for d in self.root.iterdir():
            if not _ID.fullmatch(d.name):
                continue
            try:
                expired = self._load(d.name).expires_at < now
            except NotFound:
                expired = d.stat().st_mtime + self.limits.expiry_s < now  # no readable state: a leftover
            if expired:
                with self._lock(d.name):
                    self.delete(d.name)
                gone.append(d.name)
        return gone


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
