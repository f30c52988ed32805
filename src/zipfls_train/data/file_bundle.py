"""The common tail of every file dataset's builder (``FILE_DATASETS`` in builders.py): a builder lists
its train and val files (a :class:`FileList` each) and hands them to :func:`build_file_bundle`, which
takes the subsets, checks the class count, builds the transforms from the config and returns the two
:class:`FileLoader` s in a :class:`DataBundle`. ``image_folder.py`` is the shortest builder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .bundle import DataBundle, LoaderOptions
from .file_list import FileList
from .file_loader import FileLoader
from .images import DatasetError, check_class_count
from .transforms import EvalTransform, TrainTransform, eval_resize_size

# dataset.train_augment / dataset.test_transform of the file datasets (the in-memory datasets':
# augment.IN_MEMORY_TRAIN_AUGMENTS, builders.IN_MEMORY_TEST_TRANSFORMS).
FILE_TRAIN_AUGMENTS = ("random_resized_crop", "none")
FILE_TEST_TRANSFORMS = ("resize_center_crop",)


def build_transforms(cfg: Mapping[str, Any], draft: bool = True) -> tuple[Callable[..., np.ndarray], Callable[..., np.ndarray]]:
    """(train transform, eval transform) of a file dataset config (``image_size``, ``train_augment``,
    ``test_transform``); the eval transform resizes to image_size * 256 / 224 and center-crops.
    ``draft`` (reduced-size JPEG decoding) applies to training crops only: evaluation decodes at full
    size, so reported accuracies come from exactly the recipe's test transform."""
    size = int(cfg["image_size"])
    augment = str(cfg.get("train_augment", "random_resized_crop"))
    test = str(cfg.get("test_transform", "resize_center_crop"))
    if augment not in FILE_TRAIN_AUGMENTS:
        raise DatasetError(f"dataset.train_augment must be one of {list(FILE_TRAIN_AUGMENTS)} for {cfg['name']}, got {augment!r}")
    if test not in FILE_TEST_TRANSFORMS:
        raise DatasetError(f"dataset.test_transform must be one of {list(FILE_TEST_TRANSFORMS)} for {cfg['name']}, got {test!r}")
    evaluate = EvalTransform(size, eval_resize_size(size), draft=False)
    train = TrainTransform(size, draft=draft) if augment == "random_resized_crop" else evaluate
    return train, evaluate


def build_file_bundle(cfg: Mapping[str, Any], options: LoaderOptions, train_files: FileList, val_files: FileList,
                      resolved: dict[str, Any] | None = None) -> DataBundle:
    """Subsets, class-count check and the two loaders: the common tail of every file dataset builder.
    ``resolved``: the config values the builder resolved from what it found (``DataBundle.resolved``)."""
    check_class_count(cfg, len(train_files.classes))  # the whole dataset's, before the subset
    train_files = train_files.subset(cfg.get("num_classes_subset"), cfg.get("train_per_class"), "dataset.train_per_class")
    val_files = val_files.subset(cfg.get("num_classes_subset"), cfg.get("val_per_class"), "dataset.val_per_class")
    train_transform, eval_transform = build_transforms(cfg, draft=bool(cfg.get("decode_draft", True)))
    common = dict(mean=list(cfg["mean"]), std=list(cfg["std"]), decode=str(cfg.get("decode", "cpu")))
    return DataBundle(
        train=FileLoader(train_files, options, train=True, transform=train_transform, **common),
        val=FileLoader(val_files, options, train=False, transform=eval_transform, **common),
        num_classes=len(train_files.classes),
        train_size=len(train_files),
        val_size=len(val_files),
        classes=train_files.classes,
        resolved=dict(resolved or {}),
    )
