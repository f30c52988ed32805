"""Your own images: any folder of class folders (torchvision's ImageFolder layout), ``dataset=imagefolder``.

    <root>/train/<class>/<image>    <root>/val/<class>/<image>

Images are any of ``file_list.IMAGE_EXTENSIONS`` (jpg, png, webp, ...), in the class folder or
its subfolders; names starting with '.' are left out (``file_list.is_hidden``). Class index = position of
the class folder's name in sorted order, as ImageFolder's. Decoded, augmented and loaded by
:class:`FileLoader` exactly as ImageNet is (ImageNet's prepared layout is this one); the class-folder
readers here serve both.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .bundle import DataBundle, LoaderOptions
from .file_bundle import build_file_bundle
from .file_list import IMAGE_EXTENSIONS, FileList, class_folder_names, is_hidden, list_images, unreadable_folder
from .images import DatasetError, missing_dataset_error

LAYOUT = """  <root>/train/<class>/<image>   (one folder per class, e.g. train/cat/0001.jpg)
  <root>/val/<class>/<image>     (the same class names; a class may have no val folder)"""
HOW_TO_GET = "sort your images into that layout; any of " + ", ".join(IMAGE_EXTENSIONS) + " files are read"


def read_classes(base: Path) -> list[str]:
    """The class folders of ``base/train``, sorted (ImageFolder's order)."""
    classes = class_folder_names(base / "train")
    if not classes:
        raise DatasetError(f"no class folders in {base / 'train'}; expected train/<class>/<image files>")
    return classes


def read_class_folders(base: Path, split: str, classes: list[str]) -> FileList:
    """``<split>/<class>/*`` for every class that has a folder there (train: every class)."""
    index_of = {name: i for i, name in enumerate(classes)}
    folder = base / split
    present = class_folder_names(folder)
    unknown = [name for name in present if name not in index_of]
    if unknown:
        raise DatasetError(f"{folder} has class folders not in train/: {unknown[:5]} ({len(unknown)} in all)")
    paths, targets = [], []
    for name in present:
        images = images_under(folder / name)
        if split == "train" and not images:
            raise DatasetError(f"empty class folder {folder / name}: expected image files ({', '.join(IMAGE_EXTENSIONS)})")
        paths += [f"{split}/{name}/{image}" for image in images]
        targets += [index_of[name]] * len(images)
    return FileList.from_paths(str(base), paths, targets, classes)


def images_under(folder: Path) -> list[str]:
    """Image files in ``folder`` and its subfolders (as ImageFolder finds them), as sorted paths
    relative to it."""
    found = []
    visited: set[str] = set()
    # os.walk skips a folder it cannot read unless told otherwise: a class would lose its images. It
    # follows symlinked subfolders, as ImageFolder does (data trees on shared machines are often
    # links), and a link back to a folder already walked is refused rather than walked forever.
    for directory, subfolders, _ in os.walk(folder, onerror=_raise_unreadable, followlinks=True):
        real = os.path.realpath(directory)
        if real in visited:
            raise DatasetError(f"{directory} is a link to a folder already read under {folder} (a loop): remove the link")
        visited.add(real)
        subfolders[:] = sorted(name for name in subfolders if not is_hidden(name))
        prefix = os.path.relpath(directory, folder)
        found += [name if prefix == "." else f"{prefix}/{name}" for name in list_images(directory)]
    return sorted(found)


def _raise_unreadable(error: OSError) -> None:
    raise unreadable_folder(error) from error


def read_image_folder(root: Path) -> tuple[FileList, FileList]:
    """(train, val) file lists, each ordered by class then file name."""
    if not ((root / "train").is_dir() and (root / "val").is_dir()):
        raise missing_dataset_error("An image-folder dataset", root, LAYOUT, HOW_TO_GET)
    classes = read_classes(root)
    train, val = read_class_folders(root, "train", classes), read_class_folders(root, "val", classes)
    if len(val) == 0:
        raise DatasetError(f"no images in the class folders of {root / 'val'}; expected val/<class>/<image files>")
    return train, val


def build_image_folder(cfg: Mapping[str, Any], options: LoaderOptions) -> DataBundle:
    train, val = read_image_folder(Path(cfg["root"]))
    return build_file_bundle(cfg, options, train, val)
