"""How many CPU cores this process may use: the fewest of its CPU affinity (taskset, a SLURM job's
--cpus-per-task, a container's --cpuset-cpus) and its cgroup's CPU limit (``docker run --cpus``, a
Kubernetes pod's CPU limit, systemd's CPUQuota), which the affinity does not show. Neither the
machine's core count nor torch's default thread count (one per core it may run on) knows of the
limit: in a container limited to 4 CPUs of a 64-core host, torch starts a thread per host core and
the kernel throttles them all to 4 CPUs' time (measured at a smaller scale:
experiments/cpu_threads.md)."""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch

PROC_SELF = Path("/proc/self")


def usable_cpu_cores(proc: Path = PROC_SELF) -> int:
    """min(affinity, the cgroup's limit rounded up), at least 1."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit(proc)
    return max(1, affinity if limit is None else min(affinity, math.ceil(limit)))


@contextlib.contextmanager
def cpu_threads_for_a_run(device: torch.device, processes_on_the_node: int) -> Iterator[None]:
    """torch's CPU threads while a run on ``device`` trains, as they were afterwards; as they are
    where OMP_NUM_THREADS says how many (torchrun sets 1). CPU ranks on one machine share the cores
    the job may use: each rank's default of one thread per core oversubscribes them, and OpenMP's
    spinning threads then slow every op many times over. One process on the CPU takes torch's
    default unless the cgroup allows fewer cores."""
    threads = torch.get_num_threads()
    share = max(1, usable_cpu_cores() // max(1, processes_on_the_node))
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ and (processes_on_the_node > 1 or share < threads):
        torch.set_num_threads(share)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cgroup_cpu_limit(proc: Path = PROC_SELF) -> float | None:
    """The CPU time per second this process's cgroup and its ancestors allow (``cpu.max`` of cgroup
    v2, ``cpu.cfs_quota_us``/``cpu.cfs_period_us`` of v1), the smallest of them; None without a
    limit or where there are no cgroups (not Linux). ``proc``: /proc/self (a folder of the same
    layout in tests)."""
    try:  # (bytes as the file system names them: a mount point need not be UTF-8)
        memberships = os.fsdecode((proc / "cgroup").read_bytes()).splitlines()
        mounts = os.fsdecode((proc / "mountinfo").read_bytes()).splitlines()
    except OSError:
        return None
    limits = []
    for line in memberships:  # "<id>:<controllers>:<path>"; v2's is "0::<path>"
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        version = 2 if controllers == "" else 1 if "cpu" in controllers.split(",") else None
        place = None if version is None else _mounted_folder(mounts, version, path)
        if place is not None:
            for folder in _up_to_mount(*place):
                limit = _limit_in(folder, version)
                if limit is not None:
                    limits.append(limit)
    return min(limits, default=None)


def _mounted_folder(mounts: list[str], version: int, cgroup_path: str) -> tuple[Path, Path] | None:
    """(the cgroup's folder, its hierarchy's mount point) where this process sees the hierarchy
    mounted. A mount's root is where in the hierarchy it starts: "/" on the host, the container's
    own cgroup in a container that sees only that (its path then starts with the root, or is "/"
    under a cgroup namespace, where no mount's root holds it: the mount itself is the cgroup). Of
    several mounts of the hierarchy (a bind mount of a subtree beside the whole), the one whose root
    holds the path most closely."""
    candidates = []
    for line in mounts:
        # "<id> <parent> <dev> <root> <mount point> <options> [optional fields] - <type> <source> <super options>"
        fields, _, filesystem = line.partition(" - ")
        fields, filesystem = fields.split(), filesystem.split()
        if len(fields) < 5 or not filesystem:
            continue
        if (version == 2 and filesystem[0] == "cgroup2") or (
            version == 1 and filesystem[0] == "cgroup" and "cpu" in filesystem[-1].split(",")
        ):
            root, mount_point = _unescaped(fields[3]), _unescaped(fields[4])
            inside = cgroup_path == root or cgroup_path.startswith(root.rstrip("/") + "/")
            candidates.append((len(root) if inside else -1, root, mount_point, inside))
    if not candidates:
        return None
    _, root, mount_point, inside = max(candidates, key=lambda candidate: candidate[0])
    relative = os.path.relpath(cgroup_path, root) if inside else "."
    return Path(os.path.normpath(os.path.join(mount_point, relative))), Path(os.path.normpath(mount_point))


def _unescaped(field: str) -> str:
    """A mountinfo path: the kernel writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def _up_to_mount(folder: Path, mount_point: Path) -> list[Path]:
    """``folder`` and its parents up to the mount point: a parent's limit holds for its children."""
    folders = [folder]
    while folder != mount_point and mount_point in folder.parents:
        folder = folder.parent
        folders.append(folder)
    return folders


def _limit_in(folder: Path, version: int) -> float | None:
    try:
        if version == 2:
            quota, period = (folder / "cpu.max").read_text().split()[:2]  # "max 100000" or "400000 100000"
            return None if quota == "max" else int(quota) / int(period)
        quota = int((folder / "cpu.cfs_quota_us").read_text())  # -1: none
        return None if quota < 0 else quota / int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError, ZeroDivisionError):
        return None
