"""Run-folder names for sweeps (Hydra's override_dirname made safe for a file system), and the path
of a BAN generation's teacher in its sweep (the ``ban_teacher`` resolver), which is one of them."""

from __future__ import annotations

import hashlib
from pathlib import Path

MAX_NAME = 150


def safe_dirname(overrides: str) -> str:
    """``loss=ce,seed=0`` stays as it is; path separators become ``_`` (a path-valued override such as
    ``loss.teacher_checkpoint=/x/best.pt`` must not create nested folders), and so do the other
    characters Windows refuses in names (``<>:|?*``; double quotes are dropped). A name longer than
    MAX_NAME characters drops the groups of dotted keys (``dataset.train_per_class=20`` ->
    ``train_per_class=20``), then, if it must, writes keys of several words as their initials
    (``tpc=20``: the same in every run of a sweep, whatever its values), then cuts the longest
    items to fit; it ends in ``__`` and a short hash of the whole overrides, so names stay unique.
    Short items such as the swept ``loss=ce`` and ``seed=0`` stay whole."""
    name = _path_safe(overrides) or "default"
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha1(overrides.encode()).hexdigest()[:10]
    short = _path_safe(",".join(_leaf_key(item) for item in overrides.split(",")))
    if len(short) > MAX_NAME - 12:
        short = ",".join(_fit([_path_safe(_initials_key(_leaf_key(item))) for item in overrides.split(",")], MAX_NAME - 12))
    return f"{short}__{digest}"


def _fit(items: list[str], budget: int) -> list[str]:
    """``items`` (joined by commas) within ``budget`` characters: the longest cut to the largest
    common length that fits (values that long are rare: a path, say), so short ones stay whole."""
    cap = max(len(item) for item in items)
    while cap > 1 and sum(min(len(item), cap) for item in items) + len(items) - 1 > budget:
        cap -= 1
    return [item[:cap] for item in items]


def _initials_key(item: str) -> str:
    key, separator, value = item.partition("=")
    words = [word for word in key.split("_") if word]
    return ("".join(word[0] for word in words) if len(words) > 1 else key) + separator + value


# A folder name holds none of these on Windows (NTFS, and SMB shares anywhere): the path separators,
# which would also nest folders, become "_"; so do the rest, but the double quotes of a value quoted
# for its spaces (tag="my run"), which are dropped.
WINDOWS_REFUSED = '<>:"|?*'
_NOT_IN_FOLDER_NAMES = str.maketrans({**{character: "_" for character in "/\\" + WINDOWS_REFUSED}, '"': None})


def _path_safe(text: str) -> str:
    return text.translate(_NOT_IN_FOLDER_NAMES)


def _leaf_key(item: str) -> str:
    key, separator, value = item.partition("=")
    return key.rsplit(".", 1)[-1] + separator + value if separator else item


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
