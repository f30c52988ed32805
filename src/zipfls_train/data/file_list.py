"""Image files and their labels, listed once per dataset (ImageNet, INAT21, image folders).

:class:`FileList` holds the paths as numpy arrays, not Python strings, so that DataLoader workers
forked from the main process share them instead of copying them page by page.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .images import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: str | os.PathLike) -> list[str]:
    """Sorted names of the image files directly in ``folder``. A link among them whose target is gone
    raises DatasetError naming it (torchvision's ImageFolder lists it and fails on it later; skipping
    it would drop the image without a word, and a run started without it would refuse to resume once
    the link resolves again, or the reverse, without naming it)."""
    names = []
    for entry in folder_entries(folder):
        if not is_image_file(entry.name):
            continue
        if entry.is_file():
            names.append(entry.name)
        else:
            refuse_dangling_link(entry)
    return sorted(names)


def class_folder_names(folder: str | os.PathLike) -> list[str]:
    """Sorted names of the folders (or links to folders) in ``folder``, as ImageFolder's classes. A
    link whose target is gone raises DatasetError naming it rather than a class disappearing."""
    names = []
    for entry in folder_entries(folder):
        if entry.is_dir():
            names.append(entry.name)
        else:
            refuse_dangling_link(entry)
    return sorted(names)


def refuse_dangling_link(entry: os.DirEntry) -> None:
    """DatasetError for a symbolic link whose target does not exist (an unmounted or moved store)."""
    if entry.is_symlink() and not os.path.exists(entry.path):
        raise DatasetError(
            f"{entry.path} is a link to {os.readlink(entry.path)}, which does not exist (a data store not "
            "mounted, or moved?): make the link resolve again (a new run may instead go without it: remove the link)"
        )


def is_hidden(name: str) -> bool:
    """Names starting with '.' are never images or classes, and are left out as ``ls`` leaves them
    out: macOS's AppleDouble files (``._n01440764_10026.JPEG``, metadata that a copy from a Mac
    leaves beside every image, which no decoder reads), ``.ipynb_checkpoints``, a filer's
    ``.snapshot`` folder. torchvision's ImageFolder takes them for images and classes."""
    return name.startswith(".")


def folder_entries(folder: str | os.PathLike) -> list[os.DirEntry]:
    """The entries of ``folder`` that are not hidden; a folder that cannot be read raises
    DatasetError naming it."""
    try:
        with os.scandir(folder) as entries:
            return [entry for entry in entries if not is_hidden(entry.name)]
    except OSError as error:
        raise unreadable_folder(error) from error


def unreadable_folder(error: OSError) -> DatasetError:
    return DatasetError(f"cannot read folder {error.filename}: {error.strerror or error} (the dataset's folders must be readable)")


@dataclass
class FileList:
    """Image files and their labels. Paths are stored as (folder index, file name) in numpy arrays:
    1.3 M Python strings would be copied page by page into every forked worker as their reference
    counts change; numpy arrays stay shared."""

    root: str
    folders: list[str]  # relative to root
    folder_index: np.ndarray  # int32, per sample
    names: np.ndarray  # bytes, per sample
    targets: np.ndarray  # int64, per sample, in [0, len(classes))
    classes: list[str]

    def __post_init__(self) -> None:
        n = len(self.names)
        if len(self.folder_index) != n or len(self.targets) != n:
            raise DatasetError(f"{n} files but {len(self.folder_index)} folders and {len(self.targets)} labels")
        if n and (int(self.targets.min()) < 0 or int(self.targets.max()) >= len(self.classes)):
            raise DatasetError(
                f"label out of range under {self.root}: labels span [{int(self.targets.min())}, "
                f"{int(self.targets.max())}] but there are {len(self.classes)} classes"
            )

    @classmethod
    def from_paths(cls, root: str, relative_paths: Sequence[str], targets: Sequence[int], classes: list[str]) -> "FileList":
        folders: dict[str, int] = {}
        folder_index = np.empty(len(relative_paths), dtype=np.int32)
        names = []
        for i, relative in enumerate(relative_paths):
            folder, _, name = relative.replace(os.sep, "/").rpartition("/")
            folder_index[i] = folders.setdefault(folder, len(folders))
            names.append(os.fsencode(name))  # a file name that is not UTF-8 gets its own bytes back
        return cls(
            root=str(root),
            folders=list(folders),
            folder_index=folder_index,
            names=np.array(names, dtype=np.bytes_) if names else np.array([], dtype="S1"),
            targets=np.asarray(targets, dtype=np.int64),
            classes=list(classes),
        )

    def __len__(self) -> int:
        return len(self.names)

    def path(self, index: int) -> str:
        return os.path.join(self.root, self.folders[self.folder_index[index]], os.fsdecode(self.names[index]))

    def take(self, index: np.ndarray, classes: list[str] | None = None) -> "FileList":
        return FileList(self.root, self.folders, self.folder_index[index], self.names[index], self.targets[index],
                        self.classes if classes is None else classes)

    def subset(self, num_classes: int | None, per_class: int | None, per_class_key: str = "dataset.train_per_class") -> "FileList":
        """The first ``num_classes`` classes (labels kept: they are 0..K-1) and the first ``per_class``
        files of each class, in list order (as :func:`images.take_subset`). ``None`` keeps all.
        ``per_class_key`` names the config key ``per_class`` came from, for the error message."""
        if num_classes is None and per_class is None:
            return self
        keep = len(self.classes) if num_classes is None else int(num_classes)
        if not 2 <= keep <= len(self.classes):
            raise DatasetError(f"dataset.num_classes_subset must be in [2, {len(self.classes)}], got {num_classes}")
        mask = self.targets < keep
        if per_class is not None:
            if int(per_class) < 1:
                raise DatasetError(f"{per_class_key} (files per class) must be null (all) or an integer >= 1, got {per_class}")
            order = np.argsort(self.targets, kind="stable")
            sorted_targets = self.targets[order]
            rank_sorted = np.arange(len(order)) - np.searchsorted(sorted_targets, sorted_targets, side="left")
            rank = np.empty_like(rank_sorted)
            rank[order] = rank_sorted
            mask &= rank < int(per_class)
        return self.take(np.nonzero(mask)[0], self.classes[:keep])
