"""Run-folder names for sweeps: Hydra's override_dirname made safe for a file system."""

from __future__ import annotations

import hashlib

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


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("safe_dirname"):
        OmegaConf.register_new_resolver("safe_dirname", safe_dirname)
