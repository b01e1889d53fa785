"""How many CPUs this process may really use, and how many intra-op threads a decode session gets.

A container sees every core of its host in os.cpu_count(); what bounds it is its affinity mask
(cpuset) and its CFS quota (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`).
ONNX Runtime started with more threads than the quota allows spins them against the throttle,
and each decode step waits for its slowest thread.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
# Cores from which one is left to the replica's event loop (detokenizing and writing chunks to
# Redis) and the gateway: below this, every core decodes (bench/results/*-threads.md).
RELAY_CORE_FROM = 4


def affinity_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _dirs_up(mount: Path, group_path: str) -> list[Path]:
    """The cgroup's directory under `mount` and its parents up to the mount (a limit set on a
    parent applies to its children). A path not visible under the mount (a container whose
    cgroup namespace shows the host's path) falls back to the mount itself."""
    parts = [p for p in group_path.strip("/").split("/") if p]
    dirs = [mount.joinpath(*parts[:i]) for i in range(len(parts), 0, -1)]
    return [d for d in dirs if d.is_dir()] + [mount]


def _v2_quota(root: Path, group_path: str) -> float | None:
    best = None
    for d in _dirs_up(root, group_path):
        text = _read(d / "cpu.max")
        if not text:
            continue
        quota, _, period = text.partition(" ")
        if quota == "max" or not period:
            continue
        try:
            cpus = int(quota) / int(period)
        except (ValueError, ZeroDivisionError):
            continue
        best = cpus if best is None else min(best, cpus)
    return best


def _v1_quota(root: Path, group_path: str) -> float | None:
    mount = next((root / name for name in ("cpu,cpuacct", "cpu", "cpuacct,cpu") if (root / name).is_dir()), None)
    if mount is None:
        return None
    best = None
    for d in _dirs_up(mount, group_path):
        quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
        try:
            q, p = int(quota or "-1"), int(period or "0")
        except ValueError:
            continue
        if q <= 0 or p <= 0:
            continue
        best = q / p if best is None else min(best, q / p)
    return best


def quota_cpus(root: Path = CGROUP_ROOT, self_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """The CFS quota of this process's cgroup (and its parents) in CPUs, or None when unlimited
    or unknown."""
    text = _read(self_cgroup) or ""
    v2_path, v1_path = None, None
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            v2_path = path
        elif "cpu" in controllers.split(","):
            v1_path = path
    if v1_path is not None:
        found = _v1_quota(root, v1_path)
        if found is not None:
            return found
    if v2_path is not None or (root / "cpu.max").exists():
        return _v2_quota(root, v2_path or "/")
    return None


def usable_cpus(root: Path = CGROUP_ROOT, self_cgroup: Path = PROC_SELF_CGROUP, affinity: int | None = None) -> int:
    """CPUs this process may run on: its affinity mask, bounded by its cgroup's CPU quota
    (rounded up: a 1.5-CPU quota still runs two threads part of the time)."""
    cpus = affinity if affinity is not None else affinity_cpus()
    quota = quota_cpus(root, self_cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota - 1e-9)))
    return max(1, cpus)


def decode_threads(cpus: int | None = None) -> int:
    """Intra-op threads for a replica's decode session when `threads` is 0: every usable CPU,
    less one for the relay from RELAY_CORE_FROM CPUs on."""
    cpus = usable_cpus() if cpus is None else cpus
    return max(1, cpus - 1) if cpus >= RELAY_CORE_FROM else cpus
