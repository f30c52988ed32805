"""What produced a run, one JSON line per attempt in its folder's ``environment.jsonl``: the code
(zipfls-train's version, and where it runs from a git checkout its commit and uncommitted changes),
the packages, the machine, the command. A resumed run adds a line, so a run continued on another
machine, GPU or torch says so, from the step it continued at. A number in a table can then be traced
to the code and setup that trained it."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .checkpoint import write_text_atomically
from .cpu_cores import usable_cpu_cores

ENVIRONMENT_FILE = "environment.jsonl"
PACKAGES = ("torch", "torchvision", "timm", "numpy", "hydra-core", "omegaconf", "pillow", "triton")
LISTED_CHANGES = 20  # uncommitted paths named in a record (the count is whole)
# The checkout the package runs from, in the project's src layout (src/zipfls_train/engine/ here).
PROJECT_ROOT = Path(__file__).resolve().parents[3]


def record_attempt(run_dir: Path, device: torch.device, processes: int, from_step: int, resumed: bool,
                   extra: dict[str, Any] | None = None) -> None:  # fmt: skip
    """Write this attempt's line (with ``extra``'s entries): the file's only line on a fresh start,
    one more on a resume."""
    path = run_dir / ENVIRONMENT_FILE
    # (The file is replaced whole, never cut short; one edited by hand keeps its lines, on their own.)
    earlier = path.read_bytes().decode(errors="replace") if resumed and path.is_file() else ""
    if earlier and not earlier.endswith("\n"):
        earlier += "\n"
    line = json.dumps(attempt_record(device, processes, from_step) | (extra or {}), sort_keys=True)
    write_text_atomically(path, earlier + line + "\n")


def attempt_record(device: torch.device, processes: int, from_step: int) -> dict[str, Any]:
    return {
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "from_step": from_step,
        "command": [sys.executable, *sys.argv],
        "cwd": _cwd(),
        "code": code_version(),
        "python": platform.python_version(),
        # (torch as it names itself: its build's tag, e.g. +cu130, is not in the package metadata)
        "packages": {name: _installed_version(name) for name in PACKAGES} | {"torch": torch.__version__},
        "device": describe_device(device),
        "processes": processes,
        "cpu_cores": usable_cpu_cores(),  # (its affinity, capped by a cgroup CPU limit)
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "host": platform.node(),
        "os": platform.platform(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def code_version(root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """zipfls-train's installed version, and where the package runs from a git checkout of the
    project (``root``: pyproject.toml beside src/zipfls_train, the top of its own repository), its
    commit, whether anything there differs from it (``dirty``: modified, staged or new files that
    git does not ignore; a user's new method module is one), the first paths that do, and a SHA-256
    of the changes (``git diff HEAD`` and the new files' names and, up to a size, contents: equal
    digests, the same changes). The git fields are None elsewhere (an installed wheel; a copy of the
    project inside some other repository) or without git; ``dirty`` and what follows it are None
    when git could not say (it failed, or took over 10 s)."""
    unknown = {"version": _installed_version("zipfls-train"), "git_commit": None, "dirty": None, "changed": None, "diff_sha256": None}
    is_checkout = (root / "pyproject.toml").is_file() and (root / "src" / "zipfls_train").resolve() == Path(__file__).resolve().parents[1]
    top = _git(root, "rev-parse", "--show-toplevel") if is_checkout else None
    commit = _git(root, "rev-parse", "HEAD") if top is not None and Path(top.strip()).resolve() == root.resolve() else None
    if commit is None:
        return unknown
    status = _git(root, "status", "--porcelain", "-z", "--untracked-files=normal")  # (a new folder: one entry)
    diff = None if status is None else _git(root, "diff", "HEAD", "--binary", text=False)
    if status is None or diff is None:
        return {**unknown, "git_commit": commit.strip()}
    entries = _status_entries(status)
    changed = [path for _, path in entries]
    new_files = sorted(path for code, path in entries if code == "??")
    digest = _changes_digest(root, diff, new_files) if diff or new_files else None
    listed = changed[:LISTED_CHANGES] + ([f"... {len(changed)} in all"] if len(changed) > LISTED_CHANGES else [])
    return {**unknown, "git_commit": commit.strip(), "dirty": bool(changed), "changed": listed, "diff_sha256": digest}


def _status_entries(status: str) -> list[tuple[str, str]]:
    """(XY code, path) of ``git status --porcelain -z``: "XY path\\0" each, a rename's or copy's
    source path following as a field of its own."""
    fields, entries = iter(status.split("\0")), []
    for field in fields:
        if len(field) > 3:
            entries.append((field[:2], field[3:]))
            if set(field[:2]) & {"R", "C"}:  # (staged or, with intent-to-add, in the worktree)
                next(fields, None)
    return entries


# New files' contents enter the digest up to this size each, for this many of them; the rest, and
# new folders (git lists a folder it tracks nothing in as one entry), by name only.
NEW_FILE_BYTES = 1 << 20
NEW_FILES_READ = 100


def _changes_digest(root: Path, diff: bytes, new_files: list[str]) -> str:
    digest = hashlib.sha256(diff)
    for index, name in enumerate(new_files):
        digest.update(b"\0new file\0" + os.fsencode(name) + b"\0")
        path = root / name
        if index < NEW_FILES_READ and path.is_file() and not path.is_symlink():
            try:
                with open(path, "rb") as stream:
                    digest.update(stream.read(NEW_FILE_BYTES))
            except OSError:
                digest.update(b"(unreadable)")
    return digest.hexdigest()


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"{device.type}: {_cpu_model() or platform.processor() or platform.machine()}"


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:  # (the folder was deleted under the process)
        return None


def _git(root: Path, *arguments: str, text: bool = True) -> Any:
    """git's output in ``root`` (text: as the file system names files, undecodable bytes kept as
    surrogates), or None when git is missing, refuses (not a checkout, a checkout owned by another
    user) or hangs."""
    try:
        result = subprocess.run(["git", "-C", str(root), "-c", "core.quotePath=true", *arguments], capture_output=True,
                                timeout=10, env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return os.fsdecode(result.stdout) if text else result.stdout
