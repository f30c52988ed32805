"""ImageNet-1k (ILSVRC2012) reader: class folders of JPEG files, decoded by :class:`FileLoader`.

Layouts (``dataset.root``):

* prepared: ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` (what torchvision's ImageFolder and
  most training codes expect; the val images sorted into class folders);
* raw val: ``train/<wnid>/*.JPEG`` and the official flat ``val/ILSVRC2012_val_<k>.JPEG`` with a
  ground-truth file, looked up in this order: ``dataset.val_labels`` (a path), then
  ``LOC_val_solution.csv`` in ``<root>``, ``<root>/val`` or three levels up (Kaggle's
  ``imagenet-object-localization-challenge``: header ``ImageId,PredictionString``, rows
  ``ILSVRC2012_val_00008726,n02119789 255 142 454 329 ...``; the first token is the class), then
  ``val_labels.txt`` in ``<root>`` or ``<root>/val`` (two whitespace-separated columns per line,
  ``ILSVRC2012_val_00000001.JPEG n01751748``; the extension is optional). The devkit's
  ``ILSVRC2012_validation_ground_truth.txt`` (ILSVRC ids, needs ``meta.mat``) is not read: convert
  it with torchvision's ``ImageNet`` class or use one of the above.
* Kaggle's download as extracted: ``<root>/ILSVRC/Data/CLS-LOC/{train,val}`` and
  ``<root>/LOC_val_solution.csv`` is found when ``root`` is its top folder.

Class index = position of the wnid in sorted order (ImageFolder's order), 1000 classes.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .bundle import DataBundle, LoaderOptions
from .file_bundle import build_file_bundle
from .file_list import FileList, folder_entries, is_image_file, list_images
from .image_folder import read_class_folders, read_classes
from .images import DatasetError, missing_dataset_error

KAGGLE_SUBDIR = Path("ILSVRC") / "Data" / "CLS-LOC"
LOC_SOLUTION = "LOC_val_solution.csv"
TWO_COLUMN_LABELS = "val_labels.txt"

LAYOUT = f"""  <root>/train/<wnid>/*.JPEG   (1000 class folders, e.g. train/n01440764/n01440764_10026.JPEG)
  <root>/val/<wnid>/*.JPEG     (val images sorted into the same class folders)
or the raw val folder:
  <root>/val/ILSVRC2012_val_<k>.JPEG  plus a ground-truth file: {LOC_SOLUTION} (Kaggle: ImageId,PredictionString)
  in <root>, <root>/val or Kaggle's top folder, or {TWO_COLUMN_LABELS} ("<file> <wnid>" per line), or dataset.val_labels=<path>
or Kaggle's extracted download: <root>/{KAGGLE_SUBDIR}/{{train,val}} and <root>/{LOC_SOLUTION}"""
HOW_TO_GET = (
    "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from https://image-net.org/download-images "
    "(extract each per-class tar of the train archive into train/<wnid>/), or Kaggle's "
    "imagenet-object-localization-challenge (kaggle competitions download -c imagenet-object-localization-challenge)"
)


def find_base(root: Path) -> Path:
    """The folder holding train/ and val/: root itself or Kaggle's ILSVRC/Data/CLS-LOC under it."""
    for base in (root, root / KAGGLE_SUBDIR):
        if (base / "train").is_dir() and (base / "val").is_dir():
            return base
    raise missing_dataset_error("ImageNet", root, LAYOUT, HOW_TO_GET)


def find_ground_truth(root: Path, base: Path, configured: str | None) -> Path:
    if configured:
        path = Path(configured)
        if not path.is_file():
            raise DatasetError(f"dataset.val_labels={configured!r} is not a file")
        return path
    candidates = [
        base / LOC_SOLUTION, base / "val" / LOC_SOLUTION, root / LOC_SOLUTION,
        base.parent.parent.parent / LOC_SOLUTION,  # Kaggle: root/ILSVRC/Data/CLS-LOC -> root
        base / TWO_COLUMN_LABELS, base / "val" / TWO_COLUMN_LABELS,
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise missing_dataset_error(f"ImageNet val ground truth (flat {base / 'val'})", root, LAYOUT, HOW_TO_GET)


def solution_rows(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """(line number, image id, PredictionString's tokens: "<wnid> <x0> <y0> <x1> <y1>" repeated) of
    each row of Kaggle's LOC_val_solution.csv (its boxes are read by ``analysis/small_objects``)."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise DatasetError(f"{path}: expected a header 'ImageId,PredictionString', got {reader.fieldnames}")
        for line_number, row in enumerate(reader, 2):
            tokens = (row["PredictionString"] or "").split()
            if not tokens:
                raise DatasetError(f"{path}: line {line_number} has an empty PredictionString")
            yield line_number, row["ImageId"], tokens


def read_ground_truth(path: Path) -> dict[str, str]:
    """Image name without extension -> wnid, from Kaggle's csv or a two-column text file."""
    labels: dict[str, str] = {}
    if path.suffix.lower() == ".csv":
        return {Path(image).stem: tokens[0] for _, image, tokens in solution_rows(path)}
    for line_number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        tokens = line.split()
        if len(tokens) != 2:
            raise DatasetError(f"{path}: line {line_number} should be '<file> <wnid>', got {line!r}")
        labels[Path(tokens[0]).stem] = tokens[1]
    return labels


def read_flat_val(root: Path, base: Path, wnids: list[str], configured: str | None) -> FileList:
    """The official flat val folder labelled by a ground-truth file; ordered by file name."""
    truth_path = find_ground_truth(root, base, configured)
    truth = read_ground_truth(truth_path)
    index_of = {wnid: i for i, wnid in enumerate(wnids)}
    names = list_images(str(base / "val"))
    if not names:
        raise missing_dataset_error("ImageNet val images", root, LAYOUT, HOW_TO_GET)
    unlabelled = [name for name in names if Path(name).stem not in truth]
    if unlabelled:
        raise DatasetError(f"{truth_path} has no label for {len(unlabelled)} image(s) in {base / 'val'}, e.g. {unlabelled[:3]}")
    stems = {Path(name).stem for name in names}
    missing = sorted(stem for stem in truth if stem not in stems)
    if missing:
        raise DatasetError(
            f"{truth_path} lists {len(missing)} image(s) missing from {base / 'val'}, e.g. {missing[:3]} "
            "(incomplete extraction?)"
        )
    targets = []
    for name in names:
        wnid = truth[Path(name).stem]
        if wnid not in index_of:
            raise DatasetError(f"{truth_path}: {name} is labelled {wnid!r}, which has no folder in {base / 'train'}")
        targets.append(index_of[wnid])
    return FileList.from_paths(str(base), [f"val/{name}" for name in names], targets, wnids)


def find_format(base: Path, requested: str) -> str:
    """``folders`` or ``flat``: what ``format`` (auto: class folders in val/ if any, else flat +
    ground truth | folders | flat) resolves to for ``base/val``."""
    if requested not in ("auto", "folders", "flat"):
        raise DatasetError(f"dataset.format must be auto, folders or flat for imagenet, got {requested!r}")
    if requested != "auto":
        return requested
    for entry in folder_entries(base / "val"):
        if entry.is_dir():
            return "folders"
        if entry.is_file() and is_image_file(entry.name):
            return "flat"
    return "folders"


def read_imagenet(root: Path, requested_format: str = "auto", val_labels: str | None = None) -> tuple[FileList, FileList]:
    """(train, val) file lists, each ordered by class then file name (flat val: by file name)."""
    base = find_base(root)
    wnids = read_classes(base)
    train = read_class_folders(base, "train", wnids)
    if find_format(base, requested_format) == "flat":
        val = read_flat_val(root, base, wnids, val_labels)
    else:
        val = read_class_folders(base, "val", wnids)
        if len(val) == 0:
            raise missing_dataset_error("ImageNet val images", root, LAYOUT, HOW_TO_GET)
    return train, val


def resolved_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config values this dataset resolves from what it finds (format=auto), without reading images."""
    return {"format": find_format(find_base(Path(cfg["root"])), str(cfg.get("format", "auto")))}


def build_imagenet(cfg: Mapping[str, Any], options: LoaderOptions) -> DataBundle:
    resolved = resolved_options(cfg)
    train, val = read_imagenet(Path(cfg["root"]), resolved["format"], cfg.get("val_labels"))
    return build_file_bundle(cfg, options, train, val, resolved=resolved)
