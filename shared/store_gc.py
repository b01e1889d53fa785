"""Build garbage collection (`llamaship builds gc`): remove builds no alias references, keeping the
newest `keep_last` per model and anything younger than `grace_s`, then the blobs nothing uses.

Safe while a replica is loading a build, whichever store:
- a replica pins what it serves (shared.store.BuildPins, a flock): gc skips a pinned build;
- with S3, a replica writes a lease (leases/<build_id>/<holder>) *before* it reads the manifest,
  and gc lists leases before it deletes a manifest and again after: a loader whose lease came
  first keeps its build; one whose lease came after the manifest's deletion cannot read the
  manifest and fails with NotFound, never with half a build. Blobs of every leased build (from
  the manifests gc read first) and blobs named by publishers' leases are kept.
- blobs newer than grace_s are kept (a compiler uploads blobs before its manifest exists), and
  so are builds published within grace_s (their alias is set just after).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from shared.store import BuildStore, Manifest


@dataclass
class GcReport:
    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    in_use: list[str] = field(default_factory=list)  # unreferenced, but leased or pinned: left alone
    blobs_removed: int = 0
    blob_bytes_freed: int = 0


def choose(manifests: list[Manifest], referenced: set[str], keep_last: int, grace_s: float,
           now: float | None = None) -> tuple[list[str], list[str]]:
    """(kept, to remove): kept are referenced by an alias, among the newest keep_last of their
    model, or created within grace_s."""
    now = time.time() if now is None else now
    per_model: dict[str, list[Manifest]] = defaultdict(list)
    for m in manifests:
        per_model[m.model_name].append(m)
    kept: set[str] = set(referenced)
    for builds in per_model.values():
        builds.sort(key=lambda m: m.created_at, reverse=True)
        kept.update(m.build_id for m in builds[:max(keep_last, 0)])
    kept.update(m.build_id for m in manifests if now - m.created_at < grace_s)
    ids = sorted(m.build_id for m in manifests)
    return [b for b in ids if b in kept], [b for b in ids if b not in kept]


def collect(store: BuildStore, referenced: set[str], keep_last: int = 3, grace_s: float = 3600.0,
            dry_run: bool = False) -> GcReport:
    manifests = list(store.list())
    kept, doomed = choose(manifests, referenced, keep_last, grace_s)
    report = GcReport(kept=kept)
    for build_id in doomed:
        if dry_run:
            report.removed.append(build_id)
        elif store.delete(build_id):
            report.removed.append(build_id)
        else:
            report.in_use.append(build_id)
    report.blobs_removed, report.blob_bytes_freed = store.sweep_blobs(manifests, grace_s, dry_run,
                                                                      frozenset(report.removed))
    return report
