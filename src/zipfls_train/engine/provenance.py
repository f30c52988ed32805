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

ENVIRONMENT_FILE = "environment.jsonl"
PACKAGES = ("torch", "torchvision", "timm", "numpy", "hydra-core", "omegaconf", "pillow", "triton")
LISTED_CHANGES = 20  # uncommitted paths named in a record (the count is whole)
# The checkout the package runs from, in the project's src layout (src/zipfls_train/engine/ here).
PROJECT_ROOT = Path(__file__).resolve().parents[3]


def record_attempt(run_dir: Path, device: torch.device, processes: int, from_step: int, resumed: bool) -> None:
    """Write this attempt's line: the file's only line on a fresh start, one more on a resume."""
    path = run_dir / ENVIRONMENT_FILE
    earlier = path.read_text() if resumed and path.is_file() else ""
    if earlier and not earlier.endswith("\n"):  # (a line cut short by a kill stays, on a line of its own)
        earlier += "\n"
    line = json.dumps(attempt_record(device, processes, from_step), sort_keys=True)
    write_text_atomically(path, earlier + line + "\n")


def attempt_record(device: torch.device, processes: int, from_step: int) -> dict[str, Any]:
    return {
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "from_step": from_step,
        "command": [sys.executable, *sys.argv],
        "cwd": os.getcwd(),
        "code": code_version(),
        "python": platform.python_version(),
        "packages": {name: _installed_version(name) for name in PACKAGES},
        "device": describe_device(device),
        "processes": processes,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "host": platform.node(),
        "os": platform.platform(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def code_version(root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """zipfls-train's installed version, and where the package runs from a git checkout of the
    project (``root``: pyproject.toml beside src/zipfls_train), its commit, whether anything there
    differs from it (``dirty``: modified, staged or new files that git does not ignore; a user's new
    method module is one), the first paths that do, and a SHA-256 of ``git diff HEAD`` (equal
    digests: the same changes to tracked files). The git fields are None elsewhere (an installed
    wheel, a checkout of some other project around the environment) or without git."""
    version = _installed_version("zipfls-train")
    is_checkout = (root / "pyproject.toml").is_file() and (root / "src" / "zipfls_train").resolve() == Path(__file__).resolve().parents[1]
    commit = _git(root, "rev-parse", "HEAD") if is_checkout else None
    if commit is None:
        return {"version": version, "git_commit": None, "dirty": None, "changed": None, "diff_sha256": None}
    status = (_git(root, "status", "--porcelain", "--untracked-files=normal") or "").splitlines()
    diff = _git(root, "diff", "HEAD", "--binary", text=False)
    return {
        "version": version,
        "git_commit": commit.strip(),
        "dirty": bool(status),
        "changed": [entry[3:] for entry in status[:LISTED_CHANGES]] + ([f"... {len(status)} in all"] if len(status) > LISTED_CHANGES else []),
        "diff_sha256": hashlib.sha256(diff).hexdigest() if diff else None,
    }


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


def _git(root: Path, *arguments: str, text: bool = True) -> Any:
    """git's output in ``root``, or None when git is missing, refuses (not a checkout, a checkout
    owned by another user) or hangs."""
    try:
        result = subprocess.run(["git", "-C", str(root), *arguments], capture_output=True, text=text, timeout=10,
                                env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None
