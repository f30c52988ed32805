"""The cores a run may use: CPU affinity and the cgroup CPU limit (containers, Kubernetes, systemd),
read from /proc-style files laid out as the kernel writes them; and the torch threads a run takes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from zipfls_train.engine import cpu_cores
from zipfls_train.engine.cpu_cores import cgroup_cpu_limit, cpu_threads_for_a_run, usable_cpu_cores


def _proc(tmp_path: Path, memberships: list[str], mounts: list[str]) -> Path:
    proc = tmp_path / "proc_self"
    proc.mkdir()
    (proc / "cgroup").write_text("".join(line + "\n" for line in memberships))
    (proc / "mountinfo").write_text("".join(line + "\n" for line in mounts))
    return proc


def _write(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text + "\n")


def test_cgroup_v2_takes_the_smallest_limit_of_the_cgroup_and_its_parents(tmp_path):
    """A Kubernetes pod's limit of 2.5 CPUs sits on the pod's cgroup, above the container's own
    (unlimited) one; the kubepods slice above has none either."""
    root = tmp_path / "cgroup2"
    _write(root / "kubepods" / "pod1" / "ctr", cpu__max="max 100000")
    _write(root / "kubepods" / "pod1", cpu__max="250000 100000")
    _write(root / "kubepods", cpu__max="max 100000")
    _write(root / "other", cpu__max="50000 100000")  # a sibling's limit is not this process's
    proc = _proc(tmp_path, ["0::/kubepods/pod1/ctr"],
                 [f"35 24 0:30 / {root} rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate"])  # fmt: skip
    assert cgroup_cpu_limit(proc) == pytest.approx(2.5)


def test_cgroup_v2_under_a_cgroup_namespace_reads_the_container_s_limit_at_the_mount(tmp_path):
    """``docker run --cpus=4`` with a private cgroup namespace: the process sees its cgroup as "/",
    and the limit is in the mount's own cpu.max."""
    root = tmp_path / "cgroup2"
    _write(root, cpu__max="400000 100000")
    proc = _proc(tmp_path, ["0::/"], [f"1 0 0:30 / {root} rw - cgroup2 cgroup2 rw"])
    assert cgroup_cpu_limit(proc) == pytest.approx(4.0)


def test_cgroup_v1_in_a_container_whose_mount_starts_at_its_own_cgroup(tmp_path):
    """Docker on cgroup v1 without a namespace: /proc/self/cgroup names the host's path
    (/docker/<id>), and the container's mount of the cpu hierarchy starts there (mountinfo's root)."""
    cpu = tmp_path / "cpu,cpuacct"
    _write(cpu, cpu__cfs_quota_us="150000", cpu__cfs_period_us="100000")
    proc = _proc(tmp_path, ["12:memory:/docker/abc", "4:cpu,cpuacct:/docker/abc", "2:cpuset:/docker/abc"],
                 [f"40 31 0:31 /docker/abc {tmp_path / 'memory'} rw - cgroup cgroup rw,memory",
                  f"41 31 0:32 /docker/abc {cpu} rw,nosuid - cgroup cgroup rw,cpu,cpuacct"])  # fmt: skip
    assert cgroup_cpu_limit(proc) == pytest.approx(1.5)


def test_mountinfo_s_escapes_other_mounts_and_bind_mounts_of_a_subtree(tmp_path):
    """The kernel writes a space in a mount point as \\040 and leaves other bytes raw (a USB stick's
    Latin-1 name is no UTF-8); a bind mount of another subtree of the hierarchy, listed first, is
    not where this process's cgroup is."""
    root = tmp_path / "cgroup two"
    _write(root / "job", cpu__max="150000 100000")
    _write(tmp_path / "other", cpu__max="max 100000")
    escaped = str(root).replace(" ", "\\040")
    proc = tmp_path / "proc_self"
    proc.mkdir()
    (proc / "cgroup").write_text("0::/job\n")
    (proc / "mountinfo").write_bytes(b"".join([
        b"20 1 8:1 / /media/caf\xe9 rw - vfat /dev/sdb1 rw\n",
        f"30 1 0:30 /elsewhere {tmp_path / 'other'} rw - cgroup2 cgroup2 rw\n".encode(),
        f"31 1 0:30 / {escaped} rw - cgroup2 cgroup2 rw\n".encode(),
    ]))  # fmt: skip
    assert cgroup_cpu_limit(proc) == pytest.approx(1.5)
    _write(root / "job", cpu__max="150000 0")  # (no kernel writes a period of 0)
    assert cgroup_cpu_limit(proc) is None


def test_no_limit_anywhere_is_none(tmp_path):
    """This development container's layout: cgroup v1 controllers (quota -1) beside a v2 mount
    without cpu.max (no controllers enabled there)."""
    _write(tmp_path / "cpu", cpu__cfs_quota_us="-1", cpu__cfs_period_us="100000")
    _write(tmp_path / "unified", cgroup__procs="1")
    proc = _proc(tmp_path, ["4:memory:/x", "2:cpuacct:/", "1:cpu:/", "0::/"],
                 [f"32 31 0:29 / {tmp_path / 'cpu'} rw,relatime - cgroup cgroup rw,cpu",
                  f"39 31 0:36 / {tmp_path / 'unified'} rw,relatime - cgroup2 cgroup2 rw"])  # fmt: skip
    assert cgroup_cpu_limit(proc) is None
    _write(tmp_path / "unified", cpu__max="max 100000")
    assert cgroup_cpu_limit(proc) is None
    assert cgroup_cpu_limit(tmp_path / "no_proc_here") is None  # not Linux
    (proc / "cgroup").write_text("garbage\n0::/\n")
    assert cgroup_cpu_limit(proc) is None  # (a line it cannot read is passed over)


@pytest.mark.parametrize(("affinity", "limit", "cores"), [(16, "250000 100000", 3), (2, "400000 100000", 2),
                                                          (8, "50000 100000", 1), (8, "max 100000", 8)])  # fmt: skip
def test_usable_cores_are_the_affinity_capped_by_the_limit_rounded_up(affinity, limit, cores, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
    _write(tmp_path / "cg", cpu__max=limit)
    proc = _proc(tmp_path, ["0::/"], [f"1 0 0:30 / {tmp_path / 'cg'} rw - cgroup2 cgroup2 rw"])
    assert usable_cpu_cores(proc) == cores


@pytest.mark.parametrize(
    ("device", "processes", "omp", "threads_during"),
    [
        ("cpu", 2, None, 4),  # 8 usable cores shared by 2 ranks
        ("cpu", 16, None, 1),  # at least one each
        ("cpu", 1, None, 3),  # one process: torch's own count (3 here) when the cores allow it
        ("cpu", 2, "1", 3),  # OMP_NUM_THREADS decides
        ("cuda", 2, None, 3),  # GPU ranks keep theirs
    ],
)
def test_a_run_s_cpu_threads_and_the_caller_s_back_afterwards(device, processes, omp, threads_during, monkeypatch):
    monkeypatch.setattr(cpu_cores, "usable_cpu_cores", lambda: 8)
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        with cpu_threads_for_a_run(torch.device(device), processes):
            assert torch.get_num_threads() == threads_during
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_one_cpu_process_keeps_within_a_cgroup_limit_below_torch_s_count(monkeypatch):
    """``docker run --cpus=2`` on a bigger host: torch's default counts the host's cores."""
    monkeypatch.setattr(cpu_cores, "usable_cpu_cores", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(6)
        with cpu_threads_for_a_run(torch.device("cpu"), 1):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 6
    finally:
        torch.set_num_threads(before)


def test_a_cpu_run_trains_within_the_limit_and_gives_the_threads_back(tiny_pack_root, tmp_path, monkeypatch):
    """What run_training does with it: the trainer runs with the usable cores' threads, the caller
    (a notebook) has its own back afterwards."""
    from conftest import TINY_RUN, compose
    from zipfls_train.engine import run as run_module

    class ThreadCountingTrainer:
        def __init__(self, cfg, ctx, run_dir):  # noqa: ANN001
            pass

        def fit(self) -> dict:
            return {"threads": torch.get_num_threads()}

    monkeypatch.setattr(run_module, "Trainer", ThreadCountingTrainer)
    monkeypatch.setattr(cpu_cores, "usable_cpu_cores", lambda: 1)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert run_module.run_training(compose([*TINY_RUN, "trainer.device=cpu"]), tmp_path) == {"threads": 1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
