"""Run-folder names for sweeps: Hydra's override_dirname made safe for a file system."""

from __future__ import annotations

import hashlib
from pathlib import Path

MAX_NAME = 150


def safe_dirname(overrides: str) -> str:
    """``loss=ce,seed=0`` stays as it is; path separators become ``_`` (a path-valued override such as
    ``loss.teacher_checkpoint=/x/best.pt`` must not create nested folders); names longer than
    MAX_NAME characters keep their start and get a short hash of the whole, so they stay unique."""
    name = overrides.replace("/", "_").replace("\\", "_") or "default"
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha1(overrides.encode()).hexdigest()[:10]
    return f"{name[: MAX_NAME - 11]}-{digest}"


def previous_generation_checkpoint(sweep_dir: str, overrides: str, generation: int) -> str | None:
    """BAN in a sweep: the best.pt of generation k-1 in the sibling job that differs from this one only
    by ``loss.generation`` (the basic launcher runs jobs in order, so it has finished). None for
    generation 1, the born-again teacher."""
    generation = int(generation)
    if generation <= 1:
        return None
    items = overrides.split(",") if overrides else []
    key = "loss.generation="
    if not any(item.startswith(key) for item in items):
        raise ValueError(
            "experiment=ban_generations chains generations inside a sweep: run it with -m and sweep "
            f"loss.generation (e.g. loss.generation=1,2,3); this job's overrides are {overrides!r}"
        )
    previous = ",".join(f"{key}{generation - 1}" if item.startswith(key) else item for item in items)
    return str(Path(sweep_dir) / safe_dirname(previous) / "checkpoints" / "best.pt")


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("safe_dirname"):
        OmegaConf.register_new_resolver("safe_dirname", safe_dirname)
    if not OmegaConf.has_resolver("ban_teacher"):
        OmegaConf.register_new_resolver("ban_teacher", previous_generation_checkpoint)
