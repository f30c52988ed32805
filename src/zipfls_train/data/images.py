"""In-memory image sets (small-resolution datasets): uint8 pixels + labels, and subsetting."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


class DatasetError(RuntimeError):
    """A dataset is missing, malformed or inconsistent; the message says what and where."""


def check_class_count(cfg: Mapping[str, Any], found: int) -> None:
    """The dataset's classes, as read before any ``num_classes_subset`` is taken, must be as many as
    ``dataset.num_classes`` declares (a subset is the first K of them: it does not replace it)."""
    if found == int(cfg["num_classes"]):
        return
    raise DatasetError(
        f"dataset.num_classes is {cfg['num_classes']} but the {cfg['name']} files under {cfg['root']} hold {found} "
        f"classes: set dataset.num_classes={found} for this folder (dataset.num_classes_subset=K trains on "
        "its first K classes)"
    )


@dataclass
class ImageTensors:
    """images: N x 3 x H x W uint8; targets: N int64 in [0, len(classes)); classes: class ids (wnids)."""

    images: Tensor
    targets: Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise DatasetError(f"expected N x 3 x H x W uint8 images, got {tuple(self.images.shape)} {self.images.dtype}")
        if self.targets.shape[0] != self.images.shape[0]:
            raise DatasetError(f"{self.images.shape[0]} images but {self.targets.shape[0]} labels")
        if self.targets.numel() and (int(self.targets.min()) < 0 or int(self.targets.max()) >= len(self.classes)):
            raise DatasetError(
                f"label out of range: labels span [{int(self.targets.min())}, {int(self.targets.max())}] "
                f"but there are {len(self.classes)} classes"
            )

    def __len__(self) -> int:
        return int(self.targets.shape[0])


def take_subset(data: ImageTensors, num_classes: int | None, per_class: int | None,
                per_class_key: str = "dataset.train_per_class") -> ImageTensors:  # fmt: skip
    """The first ``num_classes`` classes (labels kept, as they are 0..K-1) and the first ``per_class``
    images of each class, in dataset order. ``None`` keeps everything. ``per_class_key`` names the
    config key ``per_class`` came from, for the error message."""
    if num_classes is None and per_class is None:
        return data
    keep_classes = len(data.classes) if num_classes is None else int(num_classes)
    if not 2 <= keep_classes <= len(data.classes):
        raise DatasetError(f"dataset.num_classes_subset must be in [2, {len(data.classes)}], got {num_classes}")
    targets = data.targets
    in_classes = targets < keep_classes
    if per_class is not None:
        if per_class < 1:
            raise DatasetError(f"{per_class_key} (images per class) must be null (all) or an integer >= 1, got {per_class}")
        # Rank of each sample within its class, in dataset order.
        order = torch.argsort(targets, stable=True)
        sorted_targets = targets[order]
        first_of_class = torch.searchsorted(sorted_targets, sorted_targets, right=False)
        rank_sorted = torch.arange(len(targets)) - first_of_class
        rank = torch.empty_like(rank_sorted)
        rank[order] = rank_sorted
        in_classes &= rank < per_class
    index = torch.nonzero(in_classes).squeeze(1)
    return ImageTensors(data.images[index], targets[index], data.classes[:keep_classes])


def missing_dataset_error(name: str, root: Path, layout: str, how_to_get: str) -> DatasetError:
    """The expected layout, what ``root`` holds instead, and how to get the data."""
    return DatasetError(
        f"{name} not found under dataset.root={str(root)!r} (resolved: {root.resolve()}).\n"
        f"Expected layout:\n{layout}\nFound: {_what_root_holds(root, layout)}\nHow to get it: {how_to_get}"
    )


def _what_root_holds(root: Path, layout: str) -> str:
    """A line on ``root``: missing, empty, or its first entries; and, when ``root`` is itself one of
    the layout's top folders (``<root>/tiny-imagenet-200/...`` given .../tiny-imagenet-200), that the
    root is the folder above it."""
    if not root.is_dir():
        return "no such folder" if not root.exists() else "a file, not a folder"
    entries = sorted(f"{entry.name}/" if entry.is_dir() else entry.name for entry in root.iterdir())
    held = "an empty folder" if not entries else ", ".join(entries[:8]) + (f" ... ({len(entries)} entries)" if len(entries) > 8 else "")
    top_folders = set(re.findall(r"<root>/([^/<>\s]+)/", layout))
    if root.name in top_folders:
        held += f"; dataset.root is the folder that holds {root.name}/: dataset.root={root.parent}"
    return held


def unreadable_image(path: str, error: Exception) -> DatasetError:
    """The error for an image that is gone or cannot be decoded. Deleting the file is the obvious
    fix but changes the data (its image count), which a run started on it then refuses to resume."""
    keep = "a run resumes only on the data it started on, so removing an image means starting over (a new run folder, or trainer.resume=never)"
    if isinstance(error, FileNotFoundError):
        return DatasetError(f"image file missing: {path}; put a readable image back there: {keep}")
    return DatasetError(f"cannot decode image {path}: {error}; replace the file with a readable image rather than delete it: {keep}")
