"""A bounded local cache of builds fetched from a remote build store (shared.store_s3).

Layout under the cache root:
    blobs/sha256/<hex>            verified blobs (content-addressed, shared by builds)
    blobs/sha256/<hex>.partial    a download in progress: continued where it stopped (Range GET)
    builds/<build_id>/            a whole build: hard links to its blobs + manifest.json
    .locks/<build_id>.lock        pins (shared.store.BuildPins): evictions skip pinned builds
    .staging/                     build directories being assembled

A blob is renamed into place only once its sha256 matches the manifest; a build directory is
renamed into place only once all its blobs are there. The cache keeps at most `max_bytes` of
blobs: least recently used builds go first, never a pinned one (flocks die with their process,
so a crashed replica pins nothing).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import BinaryIO, Callable

from shared.store import MANIFEST, BuildPins, Manifest, StoreError

log = logging.getLogger("llamaship.store.cache")
_CHUNK = 1 << 20
RESUMES = 5  # a blob download is given up after this many broken connections without progress

# Reads `length` bytes of blob `sha256` from `offset` on (to its end when None) as a stream.
RangeReader = Callable[[str, int], BinaryIO]


class BlobCache:
    def __init__(self, root: str | Path, max_bytes: int, pins: BuildPins | None = None):
        self.root = Path(root).resolve()
        self.max_bytes = max_bytes
        self.blobs = self.root / "blobs" / "sha256"
        self.builds = self.root / "builds"
        self.staging = self.root / ".staging"
        self.pins = pins or BuildPins(self.root / ".locks")
        self._mutex = threading.Lock()
        self.downloaded_bytes = 0  # bytes received from the remote store (resumes count only the rest)

    def ensure(self) -> "BlobCache":
        for d in (self.blobs, self.builds, self.staging):
            d.mkdir(parents=True, exist_ok=True)
        return self

    # -- builds ----------------------------------------------------------------------------------

    def path(self, build_id: str) -> Path:
        return self.builds / build_id

    def has(self, build_id: str) -> bool:
        return (self.path(build_id) / MANIFEST).is_file()

    def materialize(self, manifest: Manifest, read: RangeReader) -> Path:
        """The build's local directory: blobs fetched (or found) and verified, linked into place.
        Makes room first (LRU); pins nothing: callers pin what they serve."""
        final = self.path(manifest.build_id)
        if self.has(manifest.build_id):
            os.utime(final)
            return final
        self.ensure()
        self.make_room(manifest.total_bytes, keep=manifest.build_id)
        tmp = self.staging / f"{manifest.build_id}-{uuid.uuid4().hex[:8]}"
        with open(self.root / ".evict.lock", "a+") as evicting:
            fcntl.flock(evicting, fcntl.LOCK_SH)  # no eviction between a blob's fetch and its link
            self._assemble(manifest, read, tmp, final)
        os.utime(final)
        return final

    def _assemble(self, manifest: Manifest, read: RangeReader, tmp: Path, final: Path) -> None:
        for entry in manifest.files:
            self.fetch_blob(entry.sha256, entry.size, read)
        try:
            for entry in manifest.files:
                target = tmp / entry.path
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(self.blobs / entry.sha256, target)
            (tmp / MANIFEST).write_text(manifest.to_json())
            try:
                os.rename(tmp, final)
            except OSError:
                if not self.has(manifest.build_id):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def fetch_blob(self, sha256: str, size: int, read: RangeReader) -> Path:
        """Download one blob unless present; a partial download is continued from its end.
        Refused (StoreError, nothing kept) when the bytes do not hash to `sha256`."""
        final = self.blobs / sha256
        if final.is_file() and final.stat().st_size == size:
            return final
        partial = self.blobs / (sha256 + ".partial")
        with open(self.blobs / (sha256 + ".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one download of a blob at a time (across processes)
            if final.is_file() and final.stat().st_size == size:
                return final
            for attempt in (0, 1):
                have = partial.stat().st_size if partial.exists() else 0
                if have > size:
                    partial.unlink()
                    have = 0
                if have < size:
                    self._download(partial, sha256, size, read)
                got_size = partial.stat().st_size
                if got_size == size and _sha256(partial) == sha256:
                    os.replace(partial, final)
                    return final
                partial.unlink(missing_ok=True)
                if attempt == 0 and have > 0:
                    log.warning("blob %s: resumed download does not match its sha256; fetching it whole", sha256[:12])
                    continue
                raise StoreError(f"blob {sha256[:12]}… from the store does not match its sha256 "
                                 f"({got_size} of {size} bytes): refused")
        raise AssertionError("unreachable")

    def _download(self, partial: Path, sha256: str, size: int, read: RangeReader) -> None:
        """Append the rest of the blob to `partial`; a broken connection is continued from where it
        stopped (a Range GET), up to RESUMES times in a row without progress."""
        failures = 0
        while (have := partial.stat().st_size if partial.exists() else 0) < size:
            try:  # one GET to the end of the blob; the caller checks what it gave
                with open(partial, "ab") as out:
                    stream = read(sha256, have)
                    try:
                        while chunk := stream.read(_CHUNK):
                            out.write(chunk)
                            with self._mutex:
                                self.downloaded_bytes += len(chunk)
                    finally:
                        stream.close()
                return
            except (StoreError, FileNotFoundError):
                raise
            except Exception as exc:  # noqa: BLE001 - network and server errors: continue the download
                failures = 0 if partial.stat().st_size > have else failures + 1
                if failures >= RESUMES:
                    raise StoreError(f"blob {sha256[:12]}…: download failed {RESUMES} times at byte {have} ({exc})") from None
                log.warning("blob %s: download broke at byte %d of %d (%s); resuming", sha256[:12],
                            partial.stat().st_size, size, exc)
                time.sleep(0.2 * failures)

    # -- pins and eviction -----------------------------------------------------------------------

    def used_bytes(self) -> int:
        if not self.blobs.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.blobs.iterdir() if not p.name.endswith(".lock"))

    def make_room(self, incoming: int, keep: str = "") -> list[str]:
        """Evict least recently used, unpinned builds until `incoming` more bytes fit. Returns the
        evicted build ids. A build larger than the whole cache is still let in (logged)."""
        evicted: list[str] = []
        with open(self.root / ".evict.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            used = self.used_bytes()
            if used + incoming <= self.max_bytes:
                return evicted
            builds = sorted((d for d in self.builds.iterdir() if d.name != keep), key=lambda d: d.stat().st_mtime)
            for d in builds:
                if used + incoming <= self.max_bytes:
                    break
                if not self._evict(d):
                    continue
                evicted.append(d.name)
                used = self.used_bytes()
            if used + incoming > self.max_bytes:
                log.warning("build cache %s: %d bytes in use + %d incoming exceed its %d-byte bound "
                            "(the rest is pinned)", self.root, used, incoming, self.max_bytes)
        return evicted

    def _evict(self, build_dir: Path) -> bool:
        with self.pins.exclusive(build_dir.name) as free:
            if not free:
                return False  # pinned: in use by a replica
            gone = self.staging / f"evict-{build_dir.name}-{uuid.uuid4().hex[:8]}"
            os.rename(build_dir, gone)
            shutil.rmtree(gone, ignore_errors=True)
        for blob in self.blobs.iterdir():  # blobs no build links to any more
            if len(blob.name) == 64 and blob.stat().st_nlink == 1:
                blob.unlink(missing_ok=True)
                # no download runs meanwhile (they hold .evict.lock shared): its lock file can go
                blob.with_name(blob.name + ".lock").unlink(missing_ok=True)
        log.info("build cache: evicted build %s", build_dir.name)
        return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
