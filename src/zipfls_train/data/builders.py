"""From a dataset config to train/val loaders. ``dataset.name`` picks a reader in ``IN_MEMORY_READERS``
or a builder in ``FILE_DATASETS``.

In-memory datasets (CIFAR-100, TinyImageNet) share one builder: a reader turns the official files
into :class:`ImageTensors`; subsets are taken; :class:`TensorLoader` does the rest. File-based
datasets (ImageNet, INAT21) register their own builder returning the same :class:`DataBundle`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .augment import IN_MEMORY_TRAIN_AUGMENTS
from .batch import Batch
from .bundle import DataBundle, LoaderOptions
from .cifar100 import read_cifar100
from .images import DatasetError, ImageTensors, check_class_count, take_subset
from .tensor_loader import TensorLoader
from .tinyimagenet import find_format, read_tinyimagenet


Reader = Callable[[Mapping[str, Any], str], ImageTensors]  # (dataset config, "train"|"val") -> images

IN_MEMORY_READERS: dict[str, Reader] = {
    "tinyimagenet": lambda cfg, split: read_tinyimagenet(Path(cfg["root"]), split, cfg.get("format", "auto")),
    "cifar100": lambda cfg, split: read_cifar100(Path(cfg["root"]), split, bool(cfg.get("download", False))),
}

# Builders of file-based datasets: "module:function" taking (dataset config, LoaderOptions).
FILE_DATASETS: dict[str, str] = {
    "imagenet": "zipfls_train.data.imagenet:build_imagenet",
    "imagefolder": "zipfls_train.data.image_folder:build_image_folder",
    "inat21": "zipfls_train.data.inat21:build_inat21",
    "synthetic": "zipfls_train.data.synthetic:build_synthetic",
}


# Config values a dataset resolves from what it finds (dataset config -> {key: value}), recorded in
# the run's config in place of the requested ones: TinyImageNet's format=auto is the tree or the pack,
# two different inputs (64 px originals, 32 px JPEG tiles) that results must not mix.
IN_MEMORY_RESOLVED: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "tinyimagenet": lambda cfg: {"format": find_format(Path(cfg["root"]), str(cfg.get("format", "auto")))},
}
# The same for file datasets ("module:function" taking the dataset config), which their builders use:
# a rerun of a finished run is told from these without reading any image (engine/resume.py).
FILE_RESOLVED: dict[str, str] = {
    "imagenet": "zipfls_train.data.imagenet:resolved_options",
    "inat21": "zipfls_train.data.inat21:resolved_options",
}


def resolved_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The values ``build_data`` would record in place of ``cfg``'s (dataset.format=auto: the format
    found), from what the root holds, without reading images; {} for a dataset that resolves none.
    Raises DatasetError where the data is missing."""
    cfg = _with_home_expanded(cfg)
    name = cfg.get("name")
    if name in IN_MEMORY_RESOLVED:
        return IN_MEMORY_RESOLVED[name](cfg)
    if name in FILE_RESOLVED:
        return _imported(FILE_RESOLVED[name])(cfg)
    return {}


def _with_home_expanded(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(cfg.get("root"), str):  # ~/data: zsh (macOS's shell) leaves ~ after '=' to us
        return {**cfg, "root": os.path.expanduser(cfg["root"])}
    return cfg


def _imported(target: str) -> Callable[..., Any]:
    module_name, function_name = target.split(":")
    return getattr(importlib.import_module(module_name), function_name)


def read_in_memory(cfg: Mapping[str, Any], split: str) -> ImageTensors:
    data = IN_MEMORY_READERS[cfg["name"]](cfg, split)
    if split == "train":  # the whole dataset's classes, before the subset takes the first K
        check_class_count(cfg, len(data.classes))
    key = "train_per_class" if split == "train" else "val_per_class"
    return take_subset(data, cfg.get("num_classes_subset"), cfg.get(key), per_class_key=f"dataset.{key}")


# What an in-memory dataset's val images get: resized to dataset.image_size (TinyImageNet's 64 px
# at 32), or "none", kept as stored (CIFAR's 32 px at 32).
IN_MEMORY_TEST_TRANSFORMS = ("none", "resize")


def build_in_memory(cfg: Mapping[str, Any], options: LoaderOptions) -> DataBundle:
    train_augment = str(cfg["train_augment"])
    if train_augment not in IN_MEMORY_TRAIN_AUGMENTS:  # before any file is read (else found at the first batch)
        raise DatasetError(
            f"dataset.train_augment must be one of {list(IN_MEMORY_TRAIN_AUGMENTS)} for {cfg['name']}, got {train_augment!r}"
        )
    test_transform = str(cfg.get("test_transform", "resize"))
    if test_transform not in IN_MEMORY_TEST_TRANSFORMS:  # checked before any file is read
        raise DatasetError(
            f"dataset.test_transform must be one of {list(IN_MEMORY_TEST_TRANSFORMS)} for {cfg['name']} "
            f"(its val images are held in memory), got {test_transform!r}"
        )
    resolved = IN_MEMORY_RESOLVED.get(cfg["name"], lambda _: {})(cfg)
    cfg = {**cfg, **resolved}
    train = read_in_memory(cfg, "train")
    val = read_in_memory(cfg, "val")
    stored = tuple(val.images.shape[-2:])
    if test_transform == "none" and stored != (int(cfg["image_size"]),) * 2:
        raise DatasetError(
            f"dataset.test_transform=none keeps {cfg['name']}'s val images as stored, {stored[0]}x{stored[1]} px, "
            f"but dataset.image_size={cfg['image_size']}: set dataset.test_transform=resize to evaluate at image_size"
        )
    common = dict(image_size=int(cfg["image_size"]), mean=list(cfg["mean"]), std=list(cfg["std"]))
    return DataBundle(
        train=TensorLoader(train, options, train=True, augment=train_augment, **common),
        val=TensorLoader(val, options, train=False, augment="none", **common),
        num_classes=len(train.classes),
        train_size=len(train),
        val_size=len(val),
        classes=train.classes,
        resolved=resolved,
    )


def build_data(cfg: Mapping[str, Any], options: LoaderOptions) -> DataBundle:
    name = cfg.get("name")
    cfg = _with_home_expanded(cfg)
    if name in IN_MEMORY_READERS:
        return build_in_memory(cfg, options)
    if name in FILE_DATASETS:
        return _imported(FILE_DATASETS[name])(cfg, options)
    raise DatasetError(
        f"unknown dataset.name {name!r}; expected one of {sorted([*IN_MEMORY_READERS, *FILE_DATASETS])} (a new "
        "dataset registers its reader in IN_MEMORY_READERS or its builder in FILE_DATASETS, data/builders.py)"
    )


__all__ = ["Batch", "DataBundle", "DatasetError", "LoaderOptions", "build_data", "resolved_options"]
