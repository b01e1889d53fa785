"""The build store in S3-compatible object storage (`--store s3://bucket/prefix`).

Objects under the prefix:
    blobs/sha256/<hex>               a file's bytes, content-addressed: uploaded once (HEAD first)
    builds/<build_id>/manifest.json  the build: its files' paths, sizes and sha256s
    leases/<build_id>/<holder>       "in use, keep it": written by a replica fetching the build or a
                                     compiler publishing it, renewed every lease_s/3, deleted after

Publishing uploads every blob, then writes the manifest with a conditional put (If-None-Match: *).
That write is the publish: a build whose manifest exists is whole; a compiler killed before it
leaves only blobs, which gc removes once they are older than its grace period; of two compilers
publishing one build id the first manifest wins and the second gets it back.

The client comes from the standard AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION). Locally, the store keeps the directory layout of
shared.store under `store_cache_dir`: scratch (staging, uploads, .work) and a bounded cache of
fetched builds (shared.blob_cache).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from shared.blob_cache import BlobCache
from shared.errors import NotFound, shown
from shared.store import MANIFEST, BuildStore, Manifest, StoreError

log = logging.getLogger("llamaship.store.s3")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or "a/b/" (always ending in "/")

    @classmethod
    def parse(cls, url: str) -> "S3Location":
        """s3://bucket or s3://bucket/prefix/path; ValueError names what is wrong."""
        if not url.startswith("s3://"):
            raise ValueError("must start with s3://")
        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not _BUCKET.fullmatch(bucket):
            raise ValueError(f"{shown(bucket)} is not an S3 bucket name (3-63 of a-z 0-9 . -)")
        parts = [p for p in prefix.split("/") if p]
        if any(not _SEGMENT.fullmatch(p) or p in (".", "..") for p in parts):
            raise ValueError(f"prefix {shown(prefix)}: segments of A-Z a-z 0-9 . _ - only")
        return cls(bucket, "".join(p + "/" for p in parts))

    def key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)


def client():
    """An S3 client from the standard AWS environment (path-style addressing for a custom endpoint)."""
    import boto3
    from botocore.config import Config

    style = "path" if os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") else "auto"
    return boto3.client("s3", config=Config(retries={"max_attempts": 5, "mode": "standard"},
                                            s3={"addressing_style": style}))


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", "")) or str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def _missing(exc: Exception) -> bool:
    return _code(exc) in ("404", "NoSuchKey", "NotFound")


def default_cache_dir(location: S3Location) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llamaship" / "s3" / location.bucket / location.prefix


class S3BuildStore(BuildStore):
    def __init__(self, url: str, *, cache_dir: str | Path = "", cache_bytes: int = 50 << 30,
                 multipart_bytes: int = 64 << 20, lease_s: float = 60.0, s3: Any = None):
        from boto3.s3.transfer import TransferConfig

        self.url = url
        self.loc = S3Location.parse(url)
        super().__init__(cache_dir or default_cache_dir(self.loc))
        self.s3 = s3 or client()
        self.cache = BlobCache(self.root, cache_bytes, self.pins)
        self.transfer = TransferConfig(multipart_threshold=multipart_bytes, multipart_chunksize=multipart_bytes)
        self.lease_s = lease_s
        self.holder = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    def describe(self) -> str:
        return f"{self.url} (cache {self.root})"

    def ensure(self) -> "S3BuildStore":
        super().ensure()
        self.cache.ensure()
        try:
            self.s3.head_bucket(Bucket=self.loc.bucket)
        except Exception as exc:  # noqa: BLE001 - any failure here stops start-up with its reason
            raise StoreError(f"build store {self.url}: bucket not reachable ({exc})") from None
        return self

    # -- reading ---------------------------------------------------------------------------------

    def _manifest_key(self, build_id: str) -> str:
        BuildStore.path(self, build_id)  # validates the id
        return self.loc.key("builds", build_id, MANIFEST)

    def _blob_key(self, sha256: str) -> str:
        return self.loc.key("blobs", "sha256", sha256)

    def path(self, build_id: str) -> Path:
        """The build's local directory, fetched into the cache first if it is not there."""
        local = BuildStore.path(self, build_id)
        if not self.cache.has(build_id):
            self.fetch(build_id)
        return local

    def exists(self, build_id: str) -> bool:
        try:
            self.s3.head_object(Bucket=self.loc.bucket, Key=self._manifest_key(build_id))
            return True
        except Exception as exc:
            if _missing(exc):
                return False
            raise

    def _get_manifest(self, build_id: str) -> tuple[Manifest, str]:
        try:
            obj = self.s3.get_object(Bucket=self.loc.bucket, Key=self._manifest_key(build_id))
        except Exception as exc:
            if _missing(exc):
                raise NotFound(f"build {shown(build_id)} not found") from None
            raise
        return Manifest.from_json(obj["Body"].read().decode()), obj["ETag"]

    def manifest(self, build_id: str) -> Manifest:
        return self._get_manifest(build_id)[0]

    def _keys(self, prefix: str) -> Iterator[dict]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.loc.bucket, Prefix=prefix)
        for page in pages:
            yield from page.get("Contents", [])

    def list(self) -> Iterator[Manifest]:
        for obj in self._keys(self.loc.key("builds", "")):
            if obj["Key"].endswith("/" + MANIFEST):
                try:
                    yield self.manifest(obj["Key"].split("/")[-2])
                except NotFound:
                    continue  # removed meanwhile (gc)

    def _read_blob(self, sha256: str, offset: int) -> BinaryIO:
        extra = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            return self.s3.get_object(Bucket=self.loc.bucket, Key=self._blob_key(sha256), **extra)["Body"]
        except Exception as exc:
            if _missing(exc):
                raise StoreError(f"blob {sha256[:12]}… is missing from the store") from None
            raise

    def fetch(self, build_id: str) -> tuple[Manifest, Path]:
        """The build in the local cache, fetched if missing: every blob verified against the
        manifest's sha256 before it is renamed into place. A lease keeps gc off it meanwhile."""
        with self.lease(build_id):
            manifest = self.manifest(build_id)  # after the lease is written: see store_gc
            return manifest, self.cache.materialize(manifest, self._read_blob)

    def verify(self, build_id: str, *, full: bool = True) -> Manifest:
        manifest, path = self.fetch(build_id)
        self.verify_dir(path, manifest, full=full)
        return manifest

    # -- publishing ------------------------------------------------------------------------------

    def publish(self, staging: Path, manifest: Manifest, stop: threading.Event | None = None) -> Manifest:
        """Upload the staged build's blobs (each once), then publish its manifest with a
        conditional put. If the build id was published meanwhile, that build is returned."""
        staging = Path(staging)
        self.seal(staging, manifest, stop)
        blobs = {e.sha256: staging / e.path for e in manifest.files}
        with self.lease(manifest.build_id, sorted(blobs)):
            self._upload_missing(blobs, stop)
            if stop is not None and stop.is_set():
                raise StoreError("publishing stopped")
            try:
                self.s3.put_object(Bucket=self.loc.bucket, Key=self._manifest_key(manifest.build_id),
                                   Body=manifest.to_json().encode(), ContentType="application/json",
                                   IfNoneMatch="*")
            except Exception as exc:
                if _code(exc) not in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    raise
                log.info("build %s was published meanwhile; keeping that one", manifest.build_id)
                return self._published_meanwhile(manifest.build_id)
            # a gc that raced our HEADs may have removed a blob we found: put back what is missing
            self._upload_missing(blobs, None)
        return manifest

    def _published_meanwhile(self, build_id: str) -> Manifest:
        for _ in range(20):  # 409: a concurrent conditional write is still in flight
            try:
                return self.manifest(build_id)
            except NotFound:
                time.sleep(0.25)
        raise StoreError(f"build {build_id}: its manifest write conflicted, and no manifest appeared")

    def _upload_missing(self, blobs: dict[str, Path], stop: threading.Event | None) -> int:
        uploaded = 0
        for sha256, path in blobs.items():
            if stop is not None and stop.is_set():
                raise StoreError("publishing stopped")
            key = self._blob_key(sha256)
            try:
                self.s3.head_object(Bucket=self.loc.bucket, Key=key)
                continue
            except Exception as exc:
                if not _missing(exc):
                    raise
            self.s3.upload_file(str(path), self.loc.bucket, key, Config=self.transfer)
            uploaded += 1
        return uploaded

    def update_manifest(self, manifest: Manifest) -> None:
        """Rewrite a published build's manifest (the last writer wins, as in a directory store);
        If-Match: never recreate a manifest gc removed meanwhile."""
        for attempt in range(5):
            current, etag = self._get_manifest(manifest.build_id)
            if current.files != manifest.files:
                raise StoreError(f"build {manifest.build_id}: a manifest update may not change the files")
            try:
                self.s3.put_object(Bucket=self.loc.bucket, Key=self._manifest_key(manifest.build_id),
                                   Body=manifest.to_json().encode(), ContentType="application/json", IfMatch=etag)
                return
            except Exception as exc:
                if _code(exc) not in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409") or attempt == 4:
                    raise
                time.sleep(0.05 * (attempt + 1))  # rewritten meanwhile (or removed: the next read says so)

    # -- leases (what gc must keep) --------------------------------------------------------------

    @contextmanager
    def lease(self, build_id: str, blobs: list[str] | tuple[str, ...] = ()) -> Iterator[None]:
        """Hold a lease on a build (and on blobs not yet in any manifest) while the body runs."""
        key = self.loc.key("leases", build_id, f"{self.holder}-{uuid.uuid4().hex[:8]}")
        body = json.dumps({"build_id": build_id, "holder": self.holder, "blobs": list(blobs)}).encode()
        self.s3.put_object(Bucket=self.loc.bucket, Key=key, Body=body)
        done = threading.Event()

        def renew() -> None:
            while not done.wait(self.lease_s / 3):
                try:
                    self.s3.put_object(Bucket=self.loc.bucket, Key=key, Body=body)
                except Exception:  # noqa: BLE001 - the next round tries again
                    log.warning("renewing the store lease on %s failed", build_id, exc_info=True)

        renewer = threading.Thread(target=renew, name=f"lease-{build_id}", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            done.set()
            renewer.join()
            try:
                self.s3.delete_object(Bucket=self.loc.bucket, Key=key)
            except Exception:  # noqa: BLE001 - it expires after lease_s
                log.warning("dropping the store lease on %s failed", build_id, exc_info=True)

    def live_leases(self) -> dict[str, set[str]]:
        """Build id -> blobs its live leases name (renewed within lease_s). Expired ones are deleted."""
        live: dict[str, set[str]] = {}
        now = time.time()
        for obj in self._keys(self.loc.key("leases", "")):
            build_id = obj["Key"].split("/")[-2]
            if now - obj["LastModified"].timestamp() > self.lease_s:
                self.s3.delete_object(Bucket=self.loc.bucket, Key=obj["Key"])
                continue
            blobs = live.setdefault(build_id, set())
            try:
                body = self.s3.get_object(Bucket=self.loc.bucket, Key=obj["Key"])["Body"].read()
                blobs.update(json.loads(body).get("blobs", []))
            except Exception as exc:
                if not _missing(exc):
                    raise
        return live

    # -- gc (shared.store_gc decides what goes) --------------------------------------------------

    def delete(self, build_id: str) -> bool:
        """Remove a build's manifest (its blobs go in sweep_blobs). False while a lease or a local
        pin holds it."""
        if build_id in self.live_leases():
            return False
        with self.pins.exclusive(build_id) as free:
            if not free:
                return False
            self.s3.delete_object(Bucket=self.loc.bucket, Key=self._manifest_key(build_id))
        return True

    def sweep_blobs(self, known: list[Manifest], grace_s: float, dry_run: bool = False,
                    removed: frozenset[str] = frozenset()) -> tuple[int, int]:
        """Delete blobs no remaining manifest and no live lease names, older than grace_s.
        `known`: every manifest gc read before it deleted any, so a loader that leased a build
        gc just removed still keeps that build's blobs. A dry run counts `removed` as gone."""
        remaining = {m.build_id: m for m in self.list() if m.build_id not in removed}
        leases = self.live_leases()  # listed after the manifests were deleted: see store_gc
        by_id = {m.build_id: m for m in known} | remaining
        keep: set[str] = set()
        for build_id in set(remaining) | set(leases):
            if build_id in by_id:
                keep.update(e.sha256 for e in by_id[build_id].files)
            keep.update(leases.get(build_id, ()))
        now, count, freed = time.time(), 0, 0
        for obj in self._keys(self.loc.key("blobs", "sha256", "")):
            sha256 = obj["Key"].rsplit("/", 1)[-1]
            if sha256 in keep or now - obj["LastModified"].timestamp() < grace_s:
                continue
            if not dry_run:
                self.s3.delete_object(Bucket=self.loc.bucket, Key=obj["Key"])
            count, freed = count + 1, freed + int(obj["Size"])
        return count, freed
