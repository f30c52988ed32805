"""TinyImageNet readers: the official ``tiny-imagenet-200/`` tree and the compact 32 px pack.

Class index = position of the wnid in *sorted* order (torchvision ImageFolder's order, and the
pack's), not the order of ``wnids.txt``, so both formats give identical labels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .file_list import is_hidden
from .images import DatasetError, ImageTensors, missing_dataset_error, unreadable_image

TREE_DIR = "tiny-imagenet-200"
PACK_DIR = "tinyimagenet-32"
OFFICIAL_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
OFFICIAL_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"

TREE_LAYOUT = f"""  <root>/{TREE_DIR}/wnids.txt
  <root>/{TREE_DIR}/train/<wnid>/images/<wnid>_<k>.JPEG
  <root>/{TREE_DIR}/val/images/val_<k>.JPEG  and  <root>/{TREE_DIR}/val/val_annotations.txt
or the 32 px pack:
  <root>/{PACK_DIR}/meta.json, train_<wnid>.jpg, val_<wnid>.jpg"""
HOW_TO_GET = (
    f"download {OFFICIAL_URL} and unzip it into the root folder (or run `make demo`, which downloads "
    "it when the internet is reachable); the 32 px pack ships in ../shared/data: dataset.root=../shared/data "
    "(for make demo: make demo DATA=../shared/data)"
)


def find_format(root: Path, requested: str) -> str:
    """``tree`` or ``pack``: what ``requested`` (auto|tree|pack) resolves to under ``root``."""
    has_tree = (root / TREE_DIR / "wnids.txt").is_file()
    has_pack = (root / PACK_DIR / "meta.json").is_file()
    if requested == "tree" and has_tree or requested == "auto" and has_tree:
        return "tree"
    if requested in ("pack", "auto") and has_pack:
        return "pack"
    if requested not in ("auto", "tree", "pack"):
        raise DatasetError(f"dataset.format must be auto, tree or pack, got {requested!r}")
    if requested == "tree" and has_pack:
        raise DatasetError(
            f"dataset.format=tree (the paper's recipe crops the 64 px originals), but {root} holds only the "
            f"32 px pack ({PACK_DIR}/): put the official {TREE_DIR}/ there ({OFFICIAL_URL}), or set "
            "dataset.format=pack to train on the pack (the results table labels such runs)"
        )
    raise missing_dataset_error("TinyImageNet", root, TREE_LAYOUT, HOW_TO_GET)


def _load_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as error:  # (FileNotFoundError too: called missing)
        raise unreadable_image(str(path), error) from error


def read_val_annotations(path: Path) -> list[tuple[int, str, str, list[str]]]:
    """(line number, file name, wnid, the box's fields) of each row of the official
    val_annotations.txt: ``<file>\t<wnid>\t<x0>\t<y0>\t<x1>\t<y1>`` (the box read by
    ``analysis/small_objects``)."""
    rows = []
    for line_number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0].strip() or not fields[1].strip():
            raise DatasetError(
                f"{path}: line {line_number} should be tab-separated fields <file> <wnid> <x0> <y0> <x1> <y1> "
                f"(as in the official tiny-imagenet-200.zip), got {line!r}"
            )
        rows.append((line_number, fields[0].strip(), fields[1].strip(), fields[2:]))
    return rows


def read_tree(root: Path, split: str) -> ImageTensors:
    """Decode the official tree's ``train`` or ``val`` split into memory (64 x 64 uint8)."""
    base = root / TREE_DIR
    wnids = sorted(line.strip() for line in (base / "wnids.txt").read_text().splitlines() if line.strip())
    index_of = {wnid: i for i, wnid in enumerate(wnids)}
    files: list[Path] = []
    labels: list[int] = []
    if split == "train":
        for wnid in wnids:
            folder = base / "train" / wnid / "images"
            found = sorted((p for p in folder.glob("*.JPEG") if not is_hidden(p.name)), key=lambda p: trailing_number(p.stem))
            if not found:
                raise DatasetError(f"empty or missing class folder {folder} (class {wnid} from wnids.txt)")
            files += found
            labels += [index_of[wnid]] * len(found)
    elif split == "val":
        annotations = base / "val" / "val_annotations.txt"
        if not annotations.is_file():
            raise missing_dataset_error("TinyImageNet val annotations", root, TREE_LAYOUT, HOW_TO_GET)
        rows = read_val_annotations(annotations)
        rows.sort(key=lambda row: trailing_number(Path(row[1]).stem))
        for line_number, name, wnid, _ in rows:
            if wnid not in index_of:
                raise DatasetError(f"{annotations}: line {line_number} names wnid {wnid!r}, not in wnids.txt")
            files.append(base / "val" / "images" / name)
            labels.append(index_of[wnid])
    else:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    pixels = np.stack([_load_rgb(path) for path in files])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    return ImageTensors(images, torch.tensor(labels, dtype=torch.int64), wnids)


def trailing_number(stem: str) -> int:
    """The number a file name ends with (``val_12`` -> 12; 0 for none): the official files' order."""
    digits = stem.rsplit("_", 1)[-1]
    return int(digits) if digits.isdigit() else 0


def read_pack(root: Path, split: str) -> ImageTensors:
    """Decode the 32 px pack: one JPEG grid of tiles per class and split (see ../shared/data/README.md)."""
    base = root / PACK_DIR
    meta_path = base / "meta.json"
    expected = 'expected {"size": <px>, "wnids": [...], "counts": {"train_<wnid>": N, "val_<wnid>": N, ...}}'
    try:
        meta = json.loads(meta_path.read_text())
        size = int(meta["size"])
        wnids = list(meta["wnids"])
        counts = {f"{split}_{wnid}": int(meta["counts"][f"{split}_{wnid}"]) for wnid in wnids}
    except json.JSONDecodeError as error:
        raise DatasetError(f"{meta_path} is not valid JSON ({error}); {expected}; restore it from the pack") from error
    except (KeyError, TypeError, ValueError) as error:
        raise DatasetError(f"{meta_path} lacks or mistypes an entry ({type(error).__name__}: {error}); {expected}") from error
    tiles_per_row = {"train": 25, "val": 10}[split]
    chunks, labels = [], []
    for label, wnid in enumerate(wnids):
        key = f"{split}_{wnid}"
        count = counts[key]
        grid = _load_rgb(base / f"{key}.jpg")
        rows = grid.shape[0] // size
        if rows * tiles_per_row < count or grid.shape[1] != tiles_per_row * size:
            raise DatasetError(f"{base / (key + '.jpg')}: grid {grid.shape[:2]} cannot hold {count} tiles of {size} px")
        # (rows*size, W*size, 3) -> (rows, W, size, size, 3) -> tiles in row-major order.
        tiles = grid.reshape(rows, size, tiles_per_row, size, 3).transpose(0, 2, 1, 3, 4).reshape(-1, size, size, 3)
        chunks.append(tiles[:count])
        labels += [label] * count
    images = torch.from_numpy(np.concatenate(chunks)).permute(0, 3, 1, 2).contiguous()
    return ImageTensors(images, torch.tensor(labels, dtype=torch.int64), wnids)


def read_tinyimagenet(root: Path, split: str, requested_format: str = "auto") -> ImageTensors:
    fmt = find_format(root, requested_format)
    return read_tree(root, split) if fmt == "tree" else read_pack(root, split)


def download_tinyimagenet(root: Path) -> None:
    """Download + md5 check + extract the official zip (torchvision's helper shows a progress bar)."""
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(OFFICIAL_URL, download_root=str(root), md5=OFFICIAL_MD5)
