"""CIFAR-100 reader for the official ``cifar-100-python/{train,test,meta}`` pickles.

We read the pickles ourselves (str or bytes keys both accepted) instead of through
torchvision's ``CIFAR100``, whose md5 check refuses re-created files; torchvision is used only to
download when the folder is missing and the internet is reachable.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .images import DatasetError, ImageTensors, missing_dataset_error

FOLDER = "cifar-100-python"
LAYOUT = f"  <root>/{FOLDER}/train, <root>/{FOLDER}/test, <root>/{FOLDER}/meta (the python pickles)"
HOW_TO_GET = (
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz, extracted into the root folder; "
    "with internet access and dataset.download=true it is downloaded automatically"
)


def _field(record: dict[Any, Any], key: str, path: Path) -> Any:
    for candidate in (key, key.encode()):
        if candidate in record:
            return record[candidate]
    raise DatasetError(f"{path}: pickle has no {key!r} entry (keys: {sorted(map(str, record))[:8]})")


def _unpickle(path: Path) -> dict[Any, Any]:
    try:
        with path.open("rb") as handle:
            return pickle.load(handle, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError) as error:
        raise DatasetError(f"cannot read CIFAR-100 pickle {path}: {error}") from error


def read_cifar100(root: Path, split: str, download: bool = False) -> ImageTensors:
    base = root / FOLDER
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    if not (base / "meta").is_file() and download:
        _download(root)
    file_name = "train" if split == "train" else "test"
    for name in (file_name, "meta"):
        if not (base / name).is_file():
            raise missing_dataset_error("CIFAR-100", root, LAYOUT, HOW_TO_GET)
    record = _unpickle(base / file_name)
    data = np.asarray(_field(record, "data", base / file_name), dtype=np.uint8)
    labels = np.asarray(_field(record, "fine_labels", base / file_name), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{base / file_name}: 'data' has shape {data.shape}, expected (N, 3072)")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in _field(_unpickle(base / "meta"), "fine_label_names", base / "meta")]
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return ImageTensors(images, torch.from_numpy(labels), names)


def _download(root: Path) -> None:
    from torchvision.datasets import CIFAR100

    try:
        CIFAR100(str(root), train=True, download=True)
    except Exception as error:  # noqa: BLE001 - any network failure becomes the layout message
        raise missing_dataset_error("CIFAR-100", root, LAYOUT, f"{HOW_TO_GET} (download failed: {error})") from error
