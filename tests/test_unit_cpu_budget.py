"""shared.cpu_budget on fake cgroup trees: v2 cpu.max, v1 cfs quota/period, nesting, no limit."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared import cpu_budget as cb


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture()
def v2(tmp_path):
    root = tmp_path / "cgroup"
    self_cgroup = tmp_path / "self_cgroup"
    _write(self_cgroup, "0::/kubepods/pod1/ctr\n")
    return root, self_cgroup


def test_v2_quota_of_the_process_cgroup(v2):
    root, self_cgroup = v2
    _write(root / "kubepods/pod1/ctr/cpu.max", "250000 100000\n")
    assert cb.quota_cpus(root, self_cgroup) == 2.5
    assert cb.usable_cpus(root, self_cgroup, affinity=16) == 3  # rounded up
    assert cb.usable_cpus(root, self_cgroup, affinity=2) == 2  # the affinity mask is the tighter bound


def test_v2_a_parent_limit_bounds_its_children(v2):
    root, self_cgroup = v2
    _write(root / "kubepods/pod1/ctr/cpu.max", "max 100000\n")
    _write(root / "kubepods/pod1/cpu.max", "200000 100000\n")
    _write(root / "kubepods/cpu.max", "800000 100000\n")
    assert cb.quota_cpus(root, self_cgroup) == 2.0
    assert cb.usable_cpus(root, self_cgroup, affinity=8) == 2


def test_v2_unlimited(v2):
    root, self_cgroup = v2
    _write(root / "kubepods/pod1/ctr/cpu.max", "max 100000\n")
    assert cb.quota_cpus(root, self_cgroup) is None
    assert cb.usable_cpus(root, self_cgroup, affinity=8) == 8


def test_v2_namespaced_container_reads_the_mount_root(tmp_path):
    root, self_cgroup = tmp_path / "cgroup", tmp_path / "self_cgroup"
    _write(self_cgroup, "0::/\n")
    _write(root / "cpu.max", "100000 100000\n")
    assert cb.usable_cpus(root, self_cgroup, affinity=64) == 1


def test_v2_host_path_not_visible_falls_back_to_the_mount(tmp_path):
    root, self_cgroup = tmp_path / "cgroup", tmp_path / "self_cgroup"
    _write(self_cgroup, "0::/system.slice/docker-abc.scope\n")
    _write(root / "cpu.max", "150000 100000\n")
    assert cb.quota_cpus(root, self_cgroup) == 1.5
    assert cb.usable_cpus(root, self_cgroup, affinity=4) == 2


def test_small_quota_still_gives_one_cpu(v2):
    root, self_cgroup = v2
    _write(root / "kubepods/pod1/ctr/cpu.max", "20000 100000\n")
    assert cb.usable_cpus(root, self_cgroup, affinity=4) == 1


@pytest.mark.parametrize("mount", ["cpu,cpuacct", "cpu"])
def test_v1_cfs_quota(tmp_path, mount):
    root, self_cgroup = tmp_path / "cgroup", tmp_path / "self_cgroup"
    _write(self_cgroup, "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    _write(root / mount / "docker/abc/cpu.cfs_quota_us", "300000\n")
    _write(root / mount / "docker/abc/cpu.cfs_period_us", "100000\n")
    assert cb.quota_cpus(root, self_cgroup) == 3.0
    assert cb.usable_cpus(root, self_cgroup, affinity=32) == 3


def test_v1_unlimited_quota(tmp_path):
    root, self_cgroup = tmp_path / "cgroup", tmp_path / "self_cgroup"
    _write(self_cgroup, "1:cpu:/\n")
    _write(root / "cpu/cpu.cfs_quota_us", "-1\n")
    _write(root / "cpu/cpu.cfs_period_us", "100000\n")
    assert cb.quota_cpus(root, self_cgroup) is None
    assert cb.usable_cpus(root, self_cgroup, affinity=6) == 6


def test_no_cgroup_files_means_the_affinity_mask(tmp_path):
    assert cb.quota_cpus(tmp_path / "none", tmp_path / "missing") is None
    assert cb.usable_cpus(tmp_path / "none", tmp_path / "missing", affinity=3) == 3


def test_garbage_is_ignored(v2):
    root, self_cgroup = v2
    _write(root / "kubepods/pod1/ctr/cpu.max", "lots 0\n")
    assert cb.quota_cpus(root, self_cgroup) is None


@pytest.mark.parametrize("cpus, threads", [(1, 1), (2, 2), (3, 3), (4, 3), (8, 7), (64, 63)])
def test_decode_threads_leave_a_core_to_the_relay_from_four(cpus, threads):
    assert cb.decode_threads(cpus) == threads
