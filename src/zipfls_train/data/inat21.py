"""iNaturalist 2021 (INAT21) reader: the paper trains on ``train_mini`` (500,000 images, 10,000
species, 50 per class) and evaluates on ``val`` (100,000 images, 10 per class).

Layout (``dataset.root``), as the official archives extract (train_mini.tar.gz -> ``train_mini/``,
val.tar.gz -> ``val/``, train_mini.json.tar.gz -> ``train_mini.json``, val.json.tar.gz ->
``val.json``):

  <root>/train_mini/00000_Animalia_Annelida_Clitellata_Haplotaxida_Lumbricidae_Lumbricus_terrestris/<uuid>.jpg
  <root>/val/00000_Animalia_.../<uuid>.jpg
  <root>/train_mini.json, <root>/val.json  (COCO style: images [{id, file_name}], annotations
      [{image_id, category_id}], categories [{id, name, image_dir_name, ...}]; file_name is
      relative to <root>, e.g. "train_mini/00000_.../<uuid>.jpg")

``dataset.train_split`` picks ``train_mini`` (the paper's) or ``train`` (the full 2.7 M images).
Labels come from the json (``category_id``); class index = position of the category id in sorted
order, which for the 2021 release is the id itself (0..9999) and also the number that prefixes each
class folder. Without the json files (``format: auto`` falls back when neither is there: one alone
is refused; ``format: folders`` forces it), labels are read from the folder-name prefixes the same
way, so both sources agree.
(torchvision's ``INaturalist`` wants the archives renamed to ``2021_train_mini/`` and ignores the
json, so it is not used.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .bundle import DataBundle, LoaderOptions
from .file_bundle import build_file_bundle
from .file_list import IMAGE_EXTENSIONS, FileList, folder_entries, list_images, refuse_dangling_link
from .images import DatasetError, missing_dataset_error

TRAIN_SPLITS = ("train_mini", "train")
FOLDER_PATTERN = re.compile(r"^(\d+)_")
BASE_URL = "https://ml-inat-competition-datasets.s3.amazonaws.com/2021"

LAYOUT = """  <root>/train_mini/<NNNNN>_<kingdom>_..._<species>/<uuid>.jpg   (10,000 class folders)
  <root>/val/<NNNNN>_<kingdom>_..._<species>/<uuid>.jpg
  <root>/train_mini.json and <root>/val.json (COCO-style labels; optional, both or neither: without
  them the folder-name prefix NNNNN is the label)"""
HOW_TO_GET = (
    f"download {BASE_URL}/train_mini.tar.gz, {BASE_URL}/val.tar.gz, {BASE_URL}/train_mini.json.tar.gz and "
    f"{BASE_URL}/val.json.tar.gz (https://github.com/visipedia/inat_comp/tree/master/2021) and extract them in the root folder"
)


def _category_name(category: Mapping[str, Any]) -> str:
    return str(category.get("image_dir_name") or f"{int(category['id']):05d}_{category.get('name', '')}")


def read_json_split(root: Path, split: str, reference: FileList | None = None, reference_ids: list[int] | None = None) -> tuple[FileList, list[int]]:
    """A split from ``<root>/<split>.json``. The classes are the json's own categories (sorted by id),
    or those of ``reference`` (the train split, whose category ids are ``reference_ids``).
    Returns the files and the category ids."""
    path = root / f"{split}.json"
    try:
        record = json.loads(path.read_text())
        images = {int(image["id"]): str(image["file_name"]) for image in record["images"]}
        annotations = [(int(a["image_id"]), int(a["category_id"])) for a in record["annotations"]]
        categories = sorted(record["categories"], key=lambda c: int(c["id"]))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DatasetError(f"cannot read INAT21 labels {path}: {error!r} (expected COCO-style images/annotations/categories)") from error
    ids = [int(c["id"]) for c in categories] if reference_ids is None else reference_ids
    label_of = {category_id: i for i, category_id in enumerate(ids)}
    rows = []
    for image_id, category_id in annotations:
        if category_id not in label_of:
            raise DatasetError(f"{path}: image {image_id} has category_id {category_id}, not among the {len(ids)} categories")
        if image_id not in images:
            raise DatasetError(f"{path}: an annotation names image_id {image_id}, which is not in 'images'")
        rows.append((label_of[category_id], images[image_id]))
    if not rows:
        raise DatasetError(f"{path} has no annotated images")
    rows.sort()
    folders = {file_name.rpartition("/")[0] for _, file_name in rows}
    absent = sorted(folder for folder in folders if not (root / folder).is_dir())
    if absent:
        raise missing_dataset_error(f"INAT21 {split} images (named in {path.name}, e.g. {absent[0]})", root, LAYOUT, HOW_TO_GET)
    names = [_category_name(c) for c in categories] if reference is None else reference.classes
    return FileList.from_paths(str(root), [f for _, f in rows], [label for label, _ in rows], names), ids


def _class_folders(folder: Path) -> dict[int, str]:
    found: dict[int, str] = {}
    for entry in folder_entries(folder):
        match = FOLDER_PATTERN.match(entry.name)
        if match and not entry.is_dir():
            refuse_dangling_link(entry)
        if entry.is_dir() and match:
            number = int(match.group(1))
            if number in found:
                raise DatasetError(f"{folder}: two class folders share the number {number}: {found[number]}, {entry.name}")
            found[number] = entry.name
    return found


def read_folder_split(root: Path, split: str, reference: FileList | None = None, reference_ids: list[int] | None = None) -> tuple[FileList, list[int]]:
    """A split from its class folders ``NNNNN_...``: label = rank of NNNNN among its own folders, or
    among ``reference_ids`` (the train split's, whose classes ``reference`` names)."""
    folder = root / split
    found = _class_folders(folder)
    if not found:
        raise missing_dataset_error(f"INAT21 {split} class folders", root, LAYOUT, HOW_TO_GET)
    ids = sorted(found) if reference_ids is None else reference_ids
    label_of = {number: i for i, number in enumerate(ids)}
    unknown = sorted(set(found) - set(label_of))
    if unknown:
        raise DatasetError(f"{folder} has class folders numbered {unknown[:5]} that the train split does not have")
    paths, targets = [], []
    for number in sorted(found):
        names = list_images(str(folder / found[number]))
        if not names and reference is None:  # the train split's (as ImageNet's: val may lack a class)
            raise DatasetError(f"empty class folder {folder / found[number]}: expected image files ({', '.join(IMAGE_EXTENSIONS)})")
        paths += [f"{split}/{found[number]}/{name}" for name in names]
        targets += [label_of[number]] * len(names)
    names = [found[i] for i in ids] if reference is None else reference.classes
    return FileList.from_paths(str(root), paths, targets, names), ids


def find_format(root: Path, train_split: str, requested: str) -> str:
    """``json`` or ``folders``: where the labels come from, as ``format`` (auto | json | folders)
    resolves under ``root``."""
    if train_split not in TRAIN_SPLITS:
        raise DatasetError(f"dataset.train_split must be one of {list(TRAIN_SPLITS)}, got {train_split!r}")
    if requested not in ("auto", "json", "folders"):
        raise DatasetError(f"dataset.format must be auto, json or folders for inat21, got {requested!r}")
    if requested != "auto":
        return requested
    train_json, val_json = root / f"{train_split}.json", root / "val.json"
    if train_json.is_file() != val_json.is_file():
        found, absent = (train_json, val_json) if train_json.is_file() else (val_json, train_json)
        raise DatasetError(
            f"{found} is there but {absent} is not: labels from the json files need both (extract "
            f"{BASE_URL}/{absent.name}.tar.gz in {root}), or set dataset.format=folders to read the labels "
            "from the class folders' numbers"
        )
    return "json" if train_json.is_file() else "folders"


def read_inat21(root: Path, train_split: str = "train_mini", requested_format: str = "auto") -> tuple[FileList, FileList]:
    if find_format(root, train_split, requested_format) == "json":
        if not ((root / f"{train_split}.json").is_file() and (root / "val.json").is_file()):
            raise missing_dataset_error(f"INAT21 {train_split}.json / val.json", root, LAYOUT, HOW_TO_GET)
        train, ids = read_json_split(root, train_split)
        val, _ = read_json_split(root, "val", train, ids)
        return train, val
    if not ((root / train_split).is_dir() and (root / "val").is_dir()):
        raise missing_dataset_error("INAT21", root, LAYOUT, HOW_TO_GET)
    train, ids = read_folder_split(root, train_split)
    val, _ = read_folder_split(root, "val", train, ids)
    return train, val


def resolved_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config values this dataset resolves from what it finds (format=auto), without reading images."""
    return {"format": find_format(Path(cfg["root"]), str(cfg.get("train_split", "train_mini")), str(cfg.get("format", "auto")))}


def build_inat21(cfg: Mapping[str, Any], options: LoaderOptions) -> DataBundle:
    resolved = resolved_options(cfg)
    train, val = read_inat21(Path(cfg["root"]), str(cfg.get("train_split", "train_mini")), resolved["format"])
    return build_file_bundle(cfg, options, train, val, resolved=resolved)
