"""The shared build store: one directory per build, addressed by build id, with manifest.json.

Layout under the store root:
    builds/<build_id>/manifest.json   + the build's files (model.onnx, genai_config.json, ...)
    .staging/<build_id>-<nonce>/      builds being published (never read by serving)
    .locks/<build_id>.lock            pins: a process serving a build holds a shared flock on it

`open_store` picks the backend from the store setting: a directory (this module) or
`s3://bucket/prefix` (shared.store_s3: content-addressed blobs in object storage, a bounded
local cache under this same layout).

Publishing is atomic: files are written aside in .staging, hashed into the manifest, verified,
then renamed into builds/ in one step, so a reader sees a whole build or none.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from shared.errors import NotFound, shown

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 1 << 20
_BUILD_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class StoreError(RuntimeError):
    """The store holds something that is not a whole, valid build."""


def sha256_file(source: Path | BinaryIO, stop: threading.Event | None = None) -> str | None:
    """The hex sha256 of a file (a path, or a file open for reading); None if `stop` was set meanwhile."""
    if not isinstance(source, (str, os.PathLike)):
        return _sha256_stream(source, stop)
    with open(source, "rb") as f:
        return _sha256_stream(f, stop)


def _sha256_stream(f: BinaryIO, stop: threading.Event | None) -> str | None:
    h = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        if stop is not None and stop.is_set():
            return None
        h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    size: int


@dataclass
class Manifest:
    build_id: str
    model_name: str
    source_path: str
    source_sha256: str
    recipe: str
    recipe_details: dict[str, Any]
    target_pool: str
    execution_provider: str
    context_length: int
    max_batch: int
    tool_versions: dict[str, str]
    files: list[FileEntry] = field(default_factory=list)
    created_at: float = 0.0
    architecture: str = ""
    parameters: int = 0
    quality: dict[str, Any] = field(default_factory=dict)  # the quality gate's report
    profile: dict[str, Any] = field(default_factory=dict)  # ONNX Runtime profile summary
    tenants: list[str] = field(default_factory=list)  # who built it (an identical rebuild adds its tenant)
    manifest_version: int = MANIFEST_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        data = json.loads(text)
        data["files"] = [FileEntry(**f) for f in data.get("files", [])]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


class BuildPins:
    """Which builds are in use: a process pins a build with a shared flock on its lock file
    (counted per process); eviction and gc take an exclusive one or leave the build alone.
    A flock dies with its process, so a crashed replica pins nothing."""

    def __init__(self, directory: Path):
        self.dir = directory
        self._held: dict[str, tuple[int, int]] = {}  # build id -> (fd holding LOCK_SH, count)
        self._mutex = threading.Lock()

    def _open(self, build_id: str) -> int:
        self.dir.mkdir(parents=True, exist_ok=True)
        return os.open(self.dir / f"{build_id}.lock", os.O_RDWR | os.O_CREAT, 0o644)

    def pin(self, build_id: str) -> None:
        with self._mutex:
            fd, count = self._held.get(build_id, (-1, 0))
            if fd < 0:
                fd = self._open(build_id)
                fcntl.flock(fd, fcntl.LOCK_SH)
            self._held[build_id] = (fd, count + 1)

    def unpin(self, build_id: str) -> None:
        with self._mutex:
            fd, count = self._held.get(build_id, (-1, 0))
            if count > 1:
                self._held[build_id] = (fd, count - 1)
            elif fd >= 0:
                del self._held[build_id]
                os.close(fd)

    @contextlib.contextmanager
    def exclusive(self, build_id: str) -> Iterator[bool]:
        """Yields True while no process (this one included) pins the build, holding it unpinnable."""
        fd = self._open(build_id)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def pinned(self, build_id: str) -> bool:
        with self.exclusive(build_id) as free:
            return not free


class BuildStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.builds = self.root / "builds"
        self.staging_root = self.root / ".staging"
        self.pins = BuildPins(self.root / ".locks")

    def describe(self) -> str:
        return str(self.root)

    def ensure(self) -> "BuildStore":
        self.builds.mkdir(parents=True, exist_ok=True)
        self.staging_root.mkdir(parents=True, exist_ok=True)
        return self

    def path(self, build_id: str) -> Path:
        if not _BUILD_ID.fullmatch(build_id or ""):
            raise NotFound(f"build {shown(build_id)} not found")
        return self.builds / build_id

    def exists(self, build_id: str) -> bool:
        return (self.path(build_id) / MANIFEST).is_file()

    def manifest(self, build_id: str) -> Manifest:
        path = self.path(build_id) / MANIFEST
        if not path.is_file():
            raise NotFound(f"build {shown(build_id)} not found")
        return Manifest.from_json(path.read_text())

    def list(self) -> Iterator[Manifest]:
        if not self.builds.is_dir():
            return
        for d in sorted(self.builds.iterdir()):
            if (d / MANIFEST).is_file():
                yield Manifest.from_json((d / MANIFEST).read_text())

    def new_staging(self, build_id: str) -> Path:
        self.ensure()
        path = self.staging_root / f"{build_id}-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        return path

    def publish(self, staging: Path, manifest: Manifest, stop: threading.Event | None = None) -> Manifest:
        """Hash the staged files into the manifest, verify, and move the build into place.

        If the same build id was published meanwhile, the staged copy is dropped and the
        existing build is returned (builds with one id are identical by construction).
        `stop` set before the move: StoreError, nothing published.
        """
        staging = Path(staging)
        self.seal(staging, manifest, stop)
        final = self.path(manifest.build_id)
        if stop is not None and stop.is_set():
            raise StoreError("publishing stopped")
        try:
            os.rename(staging, final)
        except OSError:
            if self.exists(manifest.build_id):
                shutil.rmtree(staging, ignore_errors=True)
                return self.manifest(manifest.build_id)
            raise
        return manifest

    def seal(self, staging: Path, manifest: Manifest, stop: threading.Event | None = None) -> None:
        """Hash the staged files into `manifest` and write it into the staging directory."""
        entries = []
        for f in sorted(p for p in staging.rglob("*") if p.is_file() and p.name != MANIFEST):
            digest = sha256_file(f, stop)
            if digest is None:
                raise StoreError("publishing stopped")
            entries.append(FileEntry(str(f.relative_to(staging)), digest, f.stat().st_size))
        if not entries:
            raise StoreError(f"nothing to publish in {staging}")
        manifest.files = entries
        manifest.created_at = manifest.created_at or time.time()
        tmp = staging / (MANIFEST + ".tmp")
        tmp.write_text(manifest.to_json())
        os.replace(tmp, staging / MANIFEST)
        self.verify_dir(staging, manifest, full=False)

    def verify(self, build_id: str, *, full: bool = True) -> Manifest:
        manifest = self.manifest(build_id)
        self.verify_dir(self.path(build_id), manifest, full=full)
        return manifest

    @staticmethod
    def verify_dir(directory: Path, manifest: Manifest, *, full: bool) -> None:
        for entry in manifest.files:
            path = directory / entry.path
            if not path.is_file():
                raise StoreError(f"build {manifest.build_id}: {entry.path} is missing")
            if path.stat().st_size != entry.size:
                raise StoreError(f"build {manifest.build_id}: {entry.path} has the wrong size")
            if full and sha256_file(path) != entry.sha256:
                raise StoreError(f"build {manifest.build_id}: {entry.path} does not match its sha256")

    def update_manifest(self, manifest: Manifest) -> None:
        """Rewrite a published build's manifest (records made after publishing, e.g. a forced
        publish); the files and their hashes do not change."""
        current = self.manifest(manifest.build_id)
        if current.files != manifest.files:
            raise StoreError(f"build {manifest.build_id}: a manifest update may not change the files")
        path = self.path(manifest.build_id) / MANIFEST
        tmp = path.with_suffix(".tmp")
        tmp.write_text(manifest.to_json())
        os.replace(tmp, path)

    def discard_staging(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def pin(self, build_id: str) -> None:
        """Mark a build in use by this process until `unpin` (a replica pins what it serves)."""
        self.pins.pin(build_id)

    def unpin(self, build_id: str) -> None:
        self.pins.unpin(build_id)

    def delete(self, build_id: str) -> bool:
        """Remove a build (gc). False, and nothing removed, while a process pins it."""
        with self.pins.exclusive(build_id) as free:
            if not free:
                return False
            path = self.path(build_id)
            if not path.is_dir():
                return True
            gone = self.new_staging(f"gc-{build_id}")
            os.rename(path, gone / build_id)
            shutil.rmtree(gone, ignore_errors=True)
            return True

    def sweep_blobs(self, known: list[Manifest], grace_s: float, dry_run: bool = False,
                    removed: frozenset[str] = frozenset()) -> tuple[int, int]:
        """Delete stored data no remaining build uses: (objects, bytes). A directory store keeps
        each build's files inside its directory, so there is nothing apart to sweep."""
        return 0, 0


def open_store(settings: Any) -> BuildStore:
    """The build store the `store` setting names: a directory, or s3://bucket/prefix (its
    settings: store_cache_dir, store_cache_gib, store_multipart_mb, store_lease_s)."""
    spec = str(settings.store)
    if spec.startswith("s3://"):
        from shared.store_s3 import S3BuildStore

        return S3BuildStore(spec, cache_dir=getattr(settings, "store_cache_dir", ""),
                            cache_bytes=int(getattr(settings, "store_cache_gib", 50.0) * (1 << 30)),
                            multipart_bytes=int(getattr(settings, "store_multipart_mb", 64)) << 20,
                            lease_s=float(getattr(settings, "store_lease_s", 60.0)))
    return BuildStore(spec)
