"""ImageNet and INAT21 readers in their real layouts (real JPEG photographs from ../shared/data), the
worker-based FileLoader (labels, transforms, sharding, exact resume, errors) and two-step training
runs of every model x dataset pair of Table 4."""

from __future__ import annotations

import csv
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import APPLEDOUBLE, compose, shared_data
from zipfls_train.data import DatasetError, LoaderOptions, build_data
from zipfls_train.data.file_list import FileList
from zipfls_train.data.file_bundle import build_transforms
from zipfls_train.data.file_loader import FileLoader
from zipfls_train.data.imagenet import read_imagenet
from zipfls_train.data.inat21 import read_inat21
from zipfls_train.data.transforms import EvalTransform, TrainTransform, eval_resize_size

GRAYSCALE_WNIDS = {"n02096051", "n02676566", "n02692877", "n02749479"}
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def samples() -> list[tuple[str, Path]]:
    """(wnid, file) of the 24 real ImageNet JPEGs, one per class, sorted by wnid."""
    files = sorted((shared_data() / "imagenet-samples").glob("*.JPEG"))
    assert len(files) == 24
    return [(f.name.split("_", 1)[0], f) for f in files]


def write_imagenet(root: Path, val: str = "folders", train_copies: int = 2) -> Path:
    """ImageNet layout: train/<wnid>/<wnid>_<k>.JPEG; val either in class folders or flat
    (ILSVRC2012_val_<k>.JPEG, numbered in a shuffled class order, plus its ground truth)."""
    items = samples()
    for wnid, source in items:
        (root / "train" / wnid).mkdir(parents=True)
        for k in range(train_copies):
            shutil.copyfile(source, root / "train" / wnid / f"{wnid}_{k}.JPEG")
    (root / "val").mkdir()
    shuffled = random.Random(0).sample(items, len(items))
    for number, (wnid, source) in enumerate(shuffled, 1):
        name = f"ILSVRC2012_val_{number:08d}.JPEG"
        if val == "folders":
            (root / "val" / wnid).mkdir()
            shutil.copyfile(source, root / "val" / wnid / name)
        else:
            shutil.copyfile(source, root / "val" / name)
    return root


def flat_val_truth(root: Path) -> dict[str, str]:
    """What write_imagenet(val="flat") put in val/: file -> wnid."""
    shuffled = random.Random(0).sample(samples(), 24)
    return {f"ILSVRC2012_val_{n:08d}.JPEG": wnid for n, (wnid, _) in enumerate(shuffled, 1)}


def write_loc_solution(path: Path, truth: dict[str, str]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ImageId", "PredictionString"])
        for name, wnid in truth.items():
            writer.writerow([Path(name).stem, f"{wnid} 10 20 100 200 {wnid} 5 5 50 50"])


INAT_CLASSES = [
    (0, "Lumbricus terrestris", "00000_Animalia_Annelida_Clitellata_Haplotaxida_Lumbricidae_Lumbricus_terrestris"),
    (1, "Eisenia fetida", "00001_Animalia_Annelida_Clitellata_Haplotaxida_Lumbricidae_Eisenia_fetida"),
    (2, "Hirudo medicinalis", "00002_Animalia_Annelida_Clitellata_Hirudinida_Hirudinidae_Hirudo_medicinalis"),
    (3, "Quercus robur", "00003_Plantae_Tracheophyta_Magnoliopsida_Fagales_Fagaceae_Quercus_robur"),
]


def write_inat21(root: Path, train_per_class: int = 3, val_per_class: int = 2, json_files: bool = True) -> Path:
    """INAT21 as the official archives extract: train_mini/ and val/ class folders of <uuid>.jpg
    (real photographs, shrunk to <= 160 px like iNat's own downscaled release) + COCO-style json."""
    rng = random.Random(1)
    photos = [path for _, path in samples()]
    records: dict[str, dict] = {}
    image_id = 1000
    for split, per_class in (("train_mini", train_per_class), ("val", val_per_class)):
        images, annotations = [], []
        for category_id, _, folder in INAT_CLASSES:
            (root / split / folder).mkdir(parents=True)
            for _ in range(per_class):
                name = f"{rng.getrandbits(128):032x}.jpg"
                with Image.open(rng.choice(photos)) as photo:
                    photo.thumbnail((160, 160))
                    photo.save(root / split / folder / name, quality=90)
                images.append({"id": image_id, "width": 160, "height": 120, "file_name": f"{split}/{folder}/{name}"})
                annotations.append({"id": image_id, "image_id": image_id, "category_id": category_id})
                image_id += 1
        order = rng.sample(range(len(images)), len(images))  # the json is not sorted by class
        records[split] = {
            "info": {"year": 2021},
            "images": [images[i] for i in order],
            "annotations": [annotations[i] for i in order],
            "categories": [{"id": c, "name": n, "image_dir_name": d, "supercategory": "x"} for c, n, d in INAT_CLASSES],
        }
    if json_files:
        for split, record in records.items():
            (root / f"{split}.json").write_text(json.dumps(record))
    return root


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_imagenet(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="module")
def inat_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_inat21(tmp_path_factory.mktemp("inat21"))


def options(**overrides) -> LoaderOptions:  # noqa: ANN003
    values = dict(batch_size=4, eval_batch_size=5, device=torch.device("cpu"), seed=0, num_workers=0)
    values.update(overrides)
    return LoaderOptions(**values)


def dataset_cfg(name: str, root: Path, **overrides) -> dict:  # noqa: ANN003
    cfg = dict(name=name, root=str(root), format="auto", num_classes=24 if name == "imagenet" else 4,
               image_size=32, train_augment="random_resized_crop", test_transform="resize_center_crop",
               mean=MEAN, std=STD, num_classes_subset=None, train_per_class=None, val_per_class=None)
    cfg.update(overrides)
    return cfg


def pixels(inputs: torch.Tensor) -> torch.Tensor:
    """Normalised batch -> 0..255 pixels."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255
    return inputs * std + mean


# --- ImageNet --------------------------------------------------------------------------------

def test_imagenet_prepared_layout_labels_and_counts(imagenet_root: Path) -> None:
    train, val = read_imagenet(imagenet_root)
    wnids = [wnid for wnid, _ in samples()]
    assert train.classes == wnids == sorted(wnids)
    assert len(train) == 48 and len(val) == 24
    for files in (train, val):
        for i in range(len(files)):
            wnid = Path(files.path(i)).parent.name
            assert files.targets[i] == wnids.index(wnid)
    assert np.bincount(train.targets, minlength=24).tolist() == [2] * 24


def test_imagenet_batches_are_rgb_normalised_and_labelled(imagenet_root: Path) -> None:
    bundle = build_data(dataset_cfg("imagenet", imagenet_root), options())
    assert (bundle.num_classes, bundle.train_size, bundle.val_size) == (24, 48, 24)
    assert len(bundle.train) == 12 and len(bundle.val) == 5
    val = list(bundle.val.epoch(0))
    inputs = torch.cat([b.inputs for b in val])
    targets = torch.cat([b.targets for b in val])
    assert inputs.shape == (24, 3, 32, 32) and inputs.dtype == torch.float32
    assert torch.equal(targets, torch.arange(24))  # val files are sorted by class, one per class
    assert torch.equal(torch.cat([b.indices for b in val]), torch.arange(24))
    values = pixels(inputs)
    assert float(values.min()) > -0.5 and float(values.max()) < 255.5
    wnids = bundle.classes
    # The 4 grayscale (mode L) JPEGs come out as 3 equal channels; colour photographs do not.
    equal = [bool(torch.allclose(values[i, 0], values[i, 1], atol=0.05) and torch.allclose(values[i, 1], values[i, 2], atol=0.05))
             for i in range(24)]
    assert all(equal[wnids.index(wnid)] for wnid in GRAYSCALE_WNIDS)
    assert sum(equal) <= len(GRAYSCALE_WNIDS) + 1  # (+ the hook: an RGB file of a gray photograph)
    train = next(bundle.train.epoch(0))
    assert train.inputs.shape == (4, 3, 32, 32)
    assert torch.equal(train.targets, torch.from_numpy(bundle.train.files.targets)[train.indices])


def test_eval_transform_matches_torchvision_resize_and_center_crop() -> None:
    from torchvision import transforms

    for size in (224, 64):
        reference = transforms.Compose([transforms.Resize(eval_resize_size(size)), transforms.CenterCrop(size)])
        exact = EvalTransform(size, eval_resize_size(size), draft=False)
        drafted = EvalTransform(size, eval_resize_size(size), draft=True)
        for _, path in samples():
            with Image.open(path) as image:
                expected = np.asarray(reference(image.convert("RGB"))).astype(np.float64)
            # Pixel for pixel (the photographs include margins whose half rounds up, 500 x 330 and
            # 413 x 580 at 224 px, 350 x 156 at 64 px). Resizing only the kept region, as before,
            # was 1/255 off on up to 17.5% of a photograph's pixels.
            assert np.array_equal(exact(str(path)), expected), path
            # Reduced-size JPEG decoding changes pixels by ~1% at most (see transforms.py).
            assert np.abs(drafted(str(path)) - expected).mean() < 3.0



@pytest.mark.parametrize(
    ("width", "height"),
    # Resized margins (resized side - 224) of every remainder mod 4: torchvision's offset
    # int(round(margin / 2)) rounds half to even, so 117 -> 58 but 119 -> 60 (not 119 // 2 = 59).
    [(343, 256), (341, 256), (342, 256), (340, 256), (256, 343), (256, 341), (686, 512), (512, 686), (500, 375), (413, 580), (700, 467), (500, 330)],
)
def test_eval_crop_box_is_torchvisions_resize_then_center_crop(width, height) -> None:
    """The planned source box is exactly the region torchvision's Resize(256) + CenterCrop(224)
    keeps: the resized size from torchvision's own Resize of a blank image, the crop offsets from
    its own center_crop of a coordinate image, both mapped back to source pixels."""
    from torchvision.transforms import functional as TF

    resized_w, resized_h = TF.resize(Image.new("L", (width, height)), 256).size
    columns = torch.arange(resized_w).expand(resized_h, resized_w)
    rows = torch.arange(resized_h)[:, None].expand(resized_h, resized_w)
    crop = TF.center_crop(torch.stack([columns, rows]), [224, 224])
    left, top = crop[0, 0, 0].item(), crop[1, 0, 0].item()
    assert (crop[0, 0, -1].item(), crop[1, -1, 0].item()) == (left + 223, top + 223)
    sx, sy = width / resized_w, height / resized_h
    box, flip = EvalTransform(224, eval_resize_size(224)).plan(width, height)
    assert box == pytest.approx((left * sx, top * sy, (left + 224) * sx, (top + 224) * sy), rel=1e-12) and not flip

def test_evaluation_decodes_at_full_size_even_with_decode_draft() -> None:
    # The reported accuracy must come from the recipe's exact test transform: a large photograph
    # (702 x 1094) evaluated at 224 px equals torchvision's Resize(256) + CenterCrop(224) to rounding.
    from torchvision import transforms

    train, evaluate = build_transforms(dataset_cfg("imagenet", Path("."), image_size=224, decode_draft=True), draft=True)
    assert train.draft and not evaluate.draft
    path = samples()[17][1]
    with Image.open(path) as image:
        expected = np.asarray(transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])(image.convert("RGB")))
    assert np.abs(evaluate(str(path)).astype(np.int64) - expected).max() <= 1


def test_train_crops_are_torchvisions_resized_crop_to_rounding() -> None:
    # RandomResizedCrop crops, then resizes the crop (the filter never reads outside the box).
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    transform = TrainTransform(224, draft=False)
    for seed, (_, path) in enumerate(samples()[::4]):
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        (left, top, right, bottom), flip = transform.plan(*rgb.size, random.Random(seed))
        expected = TF.resized_crop(rgb, top, left, bottom - top, right - left, [224, 224], InterpolationMode.BILINEAR, antialias=True)
        expected = np.asarray(TF.hflip(expected) if flip else expected).astype(np.int64)
        assert np.abs(transform(str(path), random.Random(seed)).astype(np.int64) - expected).max() <= 1, path


def test_train_crop_plans_follow_torchvisions_distribution() -> None:
    """The boxes and flips the file loader draws, against torchvision's RandomResizedCrop.get_params
    on the same 500 x 375 image (4000 draws each): area and aspect-ratio quantiles agree to
    sampling noise, the smallest area reaches the 0.08 bound, and half the views are flipped."""
    import torch
    from torchvision.transforms import RandomResizedCrop

    transform, rng = TrainTransform(224, draft=False), random.Random(0)
    plans = [transform.plan(500, 375, rng) for _ in range(4000)]
    boxes = torch.tensor([box for box, _ in plans], dtype=torch.float64)
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 500).all() and (boxes[:, 3] <= 375).all()
    torch.manual_seed(0)
    image = torch.zeros(3, 375, 500)
    reference = torch.tensor([RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))[2:] for _ in range(4000)], dtype=torch.float64)
    levels = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    area, reference_area = width * height / (500 * 375), reference[:, 0] * reference[:, 1] / (500 * 375)
    torch.testing.assert_close(area.quantile(levels), reference_area.quantile(levels), atol=0.03, rtol=0)
    ratio, reference_ratio = (width / height).log(), (reference[:, 1] / reference[:, 0]).log()
    torch.testing.assert_close(ratio.quantile(levels), reference_ratio.quantile(levels), atol=0.04, rtol=0)
    assert area.min() < 0.085
    flips = sum(flip for _, flip in plans)
    assert 1850 < flips < 2150  # 2000 +- 4.7 standard deviations



class _LargestDraws(random.Random):
    """Every uniform draw at its upper bound: the whole area at ratio 4/3, a box wider or taller than
    the images below (36 x 27 for a 10 x 100 image), so all 10 tries fail. No offset may be drawn."""

    def uniform(self, a: float, b: float) -> float:
        return b

    def randint(self, a: int, b: int) -> int:
        raise AssertionError("a try fitted: the fallback was not reached")


@pytest.mark.parametrize(("width", "height"), [(10, 100), (100, 10), (12, 100), (100, 12), (10, 11)], ids=["tall", "wide", "tall_even", "wide_even", "in_range"])
def test_train_crop_fallback_is_torchvisions_central_crop(width, height) -> None:
    """After 10 failed tries, the central crop with the aspect ratio clamped into 3/4..4/3, as
    torchvision's RandomResizedCrop.get_params falls back (its own function, at a scale no try fits,
    so it is deterministic): 10 wide x round(10 / (3/4)) = 13 high, centred, of a 10 x 100 image;
    round(10 x 4/3) = 13 wide x 10 high of a 100 x 10 one; the whole image when its ratio is in range."""
    from zipfls_train.data.transforms import random_resized_crop_box
    from torchvision.transforms import RandomResizedCrop

    i, j, h, w = RandomResizedCrop.get_params(torch.zeros(3, height, width), (1.5, 2.0), (3 / 4, 4 / 3))
    expected = {(10, 100): (0, 43, 10, 13), (100, 10): (43, 0, 13, 10), (12, 100): (0, 42, 12, 16), (100, 12): (42, 0, 16, 12), (10, 11): (0, 0, 10, 11)}
    assert (j, i, w, h) == expected[(width, height)]  # the fallback's rule, by hand
    assert random_resized_crop_box(width, height, _LargestDraws()) == (j, i, w, h)
    box, _ = TrainTransform(224, draft=False).plan(width, height, _LargestDraws())
    assert box == (j, i, j + w, i + h)

def test_train_transform_is_seeded_and_close_without_draft() -> None:
    path = str(samples()[17][1])  # n03759954 microphone, 702 x 1094: drafting applies at 64 px
    crop = TrainTransform(64)
    assert crop(path, random.Random(3)).shape == (64, 64, 3)
    assert np.array_equal(crop(path, random.Random(3)), crop(path, random.Random(3)))
    assert not np.array_equal(crop(path, random.Random(3)), crop(path, random.Random(4)))
    full = TrainTransform(64, draft=False)(path, random.Random(3))
    assert np.abs(crop(path, random.Random(3)).astype(float) - full).mean() < 4.0


def test_imagenet_flat_val_with_kaggle_loc_solution(tmp_path: Path) -> None:
    root = write_imagenet(tmp_path / "raw", val="flat")
    truth = flat_val_truth(root)
    write_loc_solution(root / "LOC_val_solution.csv", truth)
    train, val = read_imagenet(root)
    assert len(val) == 24
    for i in range(len(val)):
        assert train.classes[val.targets[i]] == truth[Path(val.path(i)).name]
    # The same through a two-column "file wnid" text file given explicitly.
    (root / "LOC_val_solution.csv").unlink()
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{name} {wnid}\n" for name, wnid in truth.items()))
    _, val_txt = read_imagenet(root, val_labels=str(labels))
    assert np.array_equal(val_txt.targets, val.targets)
    # No ground truth at all: the error names the layout that was expected.
    with pytest.raises(DatasetError, match="LOC_val_solution.csv"):
        read_imagenet(root)
    # A ground truth that misses an image on disk.
    write_loc_solution(root / "val" / "LOC_val_solution.csv", dict(list(truth.items())[1:]))
    with pytest.raises(DatasetError, match="no label for 1 image"):
        read_imagenet(root)


def test_imagenet_kaggle_download_layout_is_found(tmp_path: Path) -> None:
    base = tmp_path / "kaggle" / "ILSVRC" / "Data" / "CLS-LOC"
    base.mkdir(parents=True)
    write_imagenet(base, val="flat", train_copies=1)
    write_loc_solution(tmp_path / "kaggle" / "LOC_val_solution.csv", flat_val_truth(base))
    train, val = read_imagenet(tmp_path / "kaggle")
    assert (len(train), len(val), len(train.classes)) == (24, 24, 24)


def test_val_class_folders_are_labelled_by_the_train_classes_when_some_are_missing(tmp_path: Path) -> None:
    # train/ has three classes, val/ only the first and the third: val's labels are the classes'
    # positions among train's sorted folders (0 and 2), as ImageFolder on train gives them.
    for split, wnids in (("train", ["n03", "n01", "n02"]), ("val", ["n03", "n01"])):
        for wnid in wnids:
            (tmp_path / split / wnid).mkdir(parents=True)
            (tmp_path / split / wnid / f"{split}_{wnid}.JPEG").write_bytes(b"")
    train, val = read_imagenet(tmp_path, "folders")
    assert train.classes == val.classes == ["n01", "n02", "n03"]
    assert train.targets.tolist() == [0, 1, 2]
    assert val.targets.tolist() == [0, 2]


def test_the_format_auto_finds_is_resolved(imagenet_root: Path, inat_root: Path, tmp_path: Path) -> None:
    """What build_data records, and what resolved_options (a finished run's rerun check, which reads
    no image) says it would record: the same."""
    from zipfls_train.data import resolved_options

    def resolved(cfg: dict) -> dict:
        found = build_data(cfg, options()).resolved
        assert resolved_options(cfg) == found
        return found

    assert resolved(dataset_cfg("imagenet", imagenet_root)) == {"format": "folders"}
    flat = write_imagenet(tmp_path / "flat", val="flat", train_copies=1)
    write_loc_solution(flat / "LOC_val_solution.csv", flat_val_truth(flat))
    assert resolved(dataset_cfg("imagenet", flat)) == {"format": "flat"}
    kaggle = tmp_path / "kaggle"  # the Kaggle download: the tree under ILSVRC/Data/CLS-LOC
    write_imagenet(kaggle / "ILSVRC" / "Data" / "CLS-LOC", val="flat", train_copies=1)
    write_loc_solution(kaggle / "LOC_val_solution.csv", flat_val_truth(kaggle / "ILSVRC" / "Data" / "CLS-LOC"))
    assert resolved(dataset_cfg("imagenet", kaggle)) == {"format": "flat"}
    assert resolved(dataset_cfg("inat21", inat_root)) == {"format": "json"}
    no_json = tmp_path / "inat_folders"
    shutil.copytree(inat_root, no_json, ignore=shutil.ignore_patterns("*.json"))
    assert resolved(dataset_cfg("inat21", no_json)) == {"format": "folders"}


def test_a_file_dataset_run_records_the_format_found_and_resumes_one_that_recorded_auto(
    imagenet_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zipfls_train.engine.checkpoint import load_checkpoint
    from zipfls_train.engine.run import run_training
    from zipfls_train.engine.trainer import Trainer

    class Stop(Exception):
        pass

    save = Trainer.save

    def stop_after_epoch_1(self, name="last.pt", **options) -> None:  # noqa: ANN001
        save(self, name, **options)
        if self.progress.epoch == 1 and self.progress.step_in_epoch == 0:
            raise Stop

    overrides = ["dataset=imagenet", f"dataset.root={imagenet_root}", "dataset.num_classes=24", "dataset.format=auto",
                 "model=cifar_resnet18", "model.options.width=8", "loss=ce", *TWO_STEPS,
                 "trainer.epochs=2", "trainer.max_steps_per_epoch=1"]  # fmt: skip
    run = tmp_path / "run"
    monkeypatch.setattr(Trainer, "save", stop_after_epoch_1)
    with pytest.raises(Stop):
        run_training(compose(overrides), run)
    monkeypatch.setattr(Trainer, "save", save)
    assert "format: folders" in (run / "config.yaml").read_text()
    checkpoint = run / "checkpoints" / "last.pt"
    state = load_checkpoint(checkpoint)
    assert state["config"]["dataset"]["format"] == "folders"
    state["config"]["dataset"]["format"] = "auto"  # as runs recorded it before the format was resolved
    torch.save(state, checkpoint)
    assert run_training(compose(overrides), run)["status"] == "finished"
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_missing_datasets_name_the_path_and_expected_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"(?s)ImageNet not found under dataset.root=.*empty.*train/<wnid>/\*\.JPEG"):
        build_data(dataset_cfg("imagenet", tmp_path / "empty"), options())
    with pytest.raises(DatasetError, match=r"(?s)INAT21 not found under dataset.root=.*nothing.*train_mini/<NNNNN>"):
        build_data(dataset_cfg("inat21", tmp_path / "nothing"), options())


def test_class_count_mismatch_is_reported(imagenet_root: Path) -> None:
    with pytest.raises(DatasetError, match="dataset.num_classes is 1000 but .* hold 24 classes: set dataset.num_classes=24 for this folder"):
        build_data(dataset_cfg("imagenet", imagenet_root, num_classes=1000), options())


def test_subsets_and_image_size(imagenet_root: Path) -> None:
    cfg = dataset_cfg("imagenet", imagenet_root, num_classes_subset=5, train_per_class=1, val_per_class=1, image_size=48)
    bundle = build_data(cfg, options(batch_size=2))
    assert (bundle.num_classes, bundle.train_size, bundle.val_size) == (5, 5, 5)
    assert bundle.classes == [wnid for wnid, _ in samples()[:5]]
    batch = next(bundle.val.epoch(0))
    assert batch.inputs.shape == (5, 3, 48, 48)
    assert eval_resize_size(48) == 55 and eval_resize_size(224) == 256


# --- errors from workers -------------------------------------------------------------------------

@pytest.mark.parametrize("workers,decode", [(0, "cpu"), (2, "cpu"), (0, "device")])
def test_corrupt_image_raises_dataset_error_naming_the_file(tmp_path: Path, workers: int, decode: str) -> None:
    root = tmp_path / "corrupt"
    for wnid, source in samples()[:2]:
        (root / "train" / wnid).mkdir(parents=True)
        (root / "val" / wnid).mkdir(parents=True)
        shutil.copyfile(source, root / "train" / wnid / "good.JPEG")
        shutil.copyfile(source, root / "val" / wnid / "good.JPEG")
    truncated = samples()[0][1].read_bytes()[:3000]
    (root / "train" / samples()[1][0] / "truncated_file.JPEG").write_bytes(truncated)
    (root / "val" / samples()[0][0] / "not_an_image.JPEG").write_bytes(b"this is not a JPEG")
    bundle = build_data(dataset_cfg("imagenet", root, num_classes=2, decode=decode), options(batch_size=3, num_workers=workers))
    with pytest.raises(DatasetError, match="truncated_file.JPEG"):
        list(bundle.train.epoch(0))
    # The error ended the epoch and stopped the workers at once (none left for a garbage collector to
    # shut down later, possibly from inside another loader's forked workers).
    assert bundle.train._loader is None or bundle.train._loader._iterator is None
    with pytest.raises(DatasetError, match="not_an_image.JPEG"):
        list(bundle.val.epoch(0))


def test_an_unreadable_image_is_to_be_replaced_not_deleted(tmp_path: Path) -> None:
    # Deleting the file changes the data's image count, which a run started on it refuses to resume.
    root = tmp_path / "data"
    for wnid, source in samples()[:2]:
        for split in ("train", "val"):
            (root / split / wnid).mkdir(parents=True)
            shutil.copyfile(source, root / split / wnid / "good.JPEG")
    broken = root / "train" / samples()[0][0] / "broken.JPEG"
    broken.write_bytes(b"this is not a JPEG")
    bundle = build_data(dataset_cfg("imagenet", root, num_classes=2), options(batch_size=3))
    with pytest.raises(DatasetError) as error:
        list(bundle.train.epoch(0))
    message = str(error.value)
    assert message.startswith(f"cannot decode image {broken}: ") and "\n" not in message
    assert "replace the file with a readable image rather than delete it" in message
    assert "trainer.resume=never" in message
    broken.unlink()  # gone after the files were listed
    with pytest.raises(DatasetError) as error:
        list(bundle.train.epoch(0))
    message = str(error.value)
    assert message.startswith(f"image file missing: {broken}; put a readable image back there") and "\n" not in message
    assert "trainer.resume=never" in message


def test_device_decode_gives_the_cpu_decode_pixels(imagenet_root: Path) -> None:
    """decode=device (torchvision.io.decode_jpeg: nvjpeg on CUDA, libjpeg here) crops and resizes
    with torch's antialiased bilinear: within ~1/255 of the PIL path, same crops, flips and labels."""
    scale = torch.tensor(STD).view(1, 3, 1, 1) * 255
    for split in ("train", "val"):
        batches = {}
        for decode in ("cpu", "device"):
            cfg = dataset_cfg("imagenet", imagenet_root, num_classes_subset=6, image_size=96, decode=decode, decode_draft=False)
            bundle = build_data(cfg, options(batch_size=6, eval_batch_size=6))
            batches[decode] = next(getattr(bundle, split).epoch(0))
        cpu, device = batches["cpu"], batches["device"]
        assert torch.equal(cpu.indices, device.indices) and torch.equal(cpu.targets, device.targets)
        per_image = ((cpu.inputs - device.inputs) * scale).abs().mean(dim=(1, 2, 3))
        assert float(per_image.max()) < 2.0, (split, per_image)


def test_device_decode_keeps_each_cpu_decoded_image_in_its_place_and_shares_one_segment_per_batch(tmp_path: Path) -> None:
    """Progressive JPEGs and PNGs are decoded by the workers under decode=device. Their pixels now
    travel as one stacked tensor per batch: a tensor per image held a file descriptor each in the
    worker until the main process took it, and a DataLoader whose workers reach the open-file limit
    hangs (seen: two workers at ulimit -n 256 with 256 tensors a batch, stopped at 255 open files)."""
    from zipfls_train.data.device_decode import read_device_job, stack_device_jobs

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("a", "b"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for kind, save_options in (("plain.jpg", {}), ("progressive.jpg", {"progressive": True}), ("image.png", {})):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / kind, quality=95, **save_options)
    scale = torch.tensor(STD).view(1, 3, 1, 1) * 255
    batches = {}
    for decode in ("cpu", "device"):
        cfg = dataset_cfg("imagefolder", tmp_path, num_classes=2, image_size=32, decode=decode, decode_draft=False)
        bundle = build_data(cfg, options(eval_batch_size=6, num_workers=1))
        batches[decode] = next(bundle.val.epoch(0))
        bundle.val.close()
        bundle.train.close()
    cpu, device = batches["cpu"], batches["device"]
    assert torch.equal(cpu.targets, device.targets)
    per_image = ((cpu.inputs - device.inputs) * scale).abs().mean(dim=(1, 2, 3))
    assert float(per_image.max()) < 2.0, per_image
    transform = EvalTransform(32, eval_resize_size(32), draft=False)
    jobs = [read_device_job(str(path), transform, None) for path in sorted((tmp_path / "val").rglob("*.*"))]
    assert sum(job.pixels is not None for job in jobs) == 4  # the progressive JPEGs and the PNGs
    item = stack_device_jobs(jobs)
    assert [type(value).__name__ for value in item.values()].count("Tensor") == 2  # the bytes and the CPU pixels
    assert tuple(item["cpu_pixels"].shape) == (4, 32, 32, 3)


def test_jpegs_that_nvjpeg_may_not_take_are_decoded_on_the_cpu(tmp_path: Path) -> None:
    """decode=device hands nvjpeg the bytes of baseline YCbCr or grayscale JPEGs only. A JPEG of RGB
    samples stored as they are (Adobe marker, transform 0: Pillow's keep_rgb=True), a progressive
    one and a PNG are cropped and resized on the CPU: their pixels come back, not their bytes, and
    are the colour written (read as YCbCr, (200, 30, 40) would turn into something else)."""
    from zipfls_train.data.transforms import read_for_device_decode

    colour = (200, 30, 40)
    image = Image.new("RGB", (48, 40), colour)
    files = {"plain.jpg": {}, "rgb_stored.jpg": {"keep_rgb": True}, "progressive.jpg": {"progressive": True}, "image.png": {}}
    for name, options in files.items():
        image.save(tmp_path / name, quality=95, **options)
    # The premise: an APP14 "Adobe" segment whose last byte, the transform, is 0 (Pillow < 10.2 drops
    # keep_rgb without a word and writes a plain YCbCr JPEG).
    rgb_stored = (tmp_path / "rgb_stored.jpg").read_bytes()
    adobe = rgb_stored.find(b"Adobe")  # after the marker FF EE and the segment length
    assert adobe > 0 and rgb_stored[adobe - 4:adobe - 2] == b"\xff\xee" and rgb_stored[adobe + 11] == 0, "this Pillow did not write an RGB-stored JPEG (keep_rgb needs Pillow >= 10.2)"
    transform = EvalTransform(32, eval_resize_size(32), draft=False)
    for name in files:
        data, _, pixels = read_for_device_decode(str(tmp_path / name), transform, None)
        if name == "plain.jpg":
            assert data is not None and pixels is None
            continue
        assert data is None and pixels is not None, name
        assert pixels.shape == (32, 32, 3) and np.abs(pixels.astype(int) - colour).max() <= 3, name


# --- INAT21 ----------------------------------------------------------------------------------------

def test_inat21_labels_come_from_the_json(inat_root: Path) -> None:
    train, val = read_inat21(inat_root)
    assert train.classes == [folder for _, _, folder in INAT_CLASSES]
    assert (len(train), len(val)) == (12, 8)
    records = {split: json.loads((inat_root / f"{split}.json").read_text()) for split in ("train_mini", "val")}
    for files, split in ((train, "train_mini"), (val, "val")):
        file_of = {image["id"]: image["file_name"] for image in records[split]["images"]}
        expected = {file_of[a["image_id"]]: a["category_id"] for a in records[split]["annotations"]}
        got = {str(Path(files.path(i)).relative_to(inat_root)): int(files.targets[i]) for i in range(len(files))}
        assert got == expected


def test_inat21_folder_fallback_agrees_with_the_json(inat_root: Path, tmp_path: Path) -> None:
    no_json = tmp_path / "inat_folders"
    shutil.copytree(inat_root, no_json, ignore=shutil.ignore_patterns("*.json"))
    by_json = read_inat21(inat_root)
    by_folders = read_inat21(no_json)
    forced = read_inat21(inat_root, requested_format="folders")
    for (a_train, a_val), (b_train, b_val) in ((by_json, by_folders), (by_json, forced)):
        for a, b in ((a_train, b_train), (a_val, b_val)):
            label_a = {Path(a.path(i)).name: int(a.targets[i]) for i in range(len(a))}
            label_b = {Path(b.path(i)).name: int(b.targets[i]) for i in range(len(b))}
            assert label_a == label_b
    with pytest.raises(DatasetError, match="train.json"):
        read_inat21(inat_root, train_split="train", requested_format="json")


@pytest.mark.parametrize("kept", ["train_mini.json", "val.json"])
def test_inat21_with_one_of_its_two_json_files_names_the_missing_one(kept: str, inat_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "inat"
    shutil.copytree(inat_root, root, ignore=shutil.ignore_patterns("*.json"))
    shutil.copyfile(inat_root / kept, root / kept)
    missing = root / ({"train_mini.json", "val.json"} - {kept}).pop()
    with pytest.raises(DatasetError, match=f"^{re.escape(str(root / kept))} is there but {re.escape(str(missing))} is not: .*dataset.format=folders"):
        read_inat21(root)
    assert [len(files) for files in read_inat21(root, requested_format="folders")] == [12, 8]


def test_inat21_folders_refuse_an_empty_train_class_folder(inat_root: Path, tmp_path: Path) -> None:
    # As ImageNet and image folders: training without the class's images would go unnoticed.
    root = tmp_path / "inat"
    shutil.copytree(inat_root, root, ignore=shutil.ignore_patterns("*.json"))
    empty = root / "train_mini" / INAT_CLASSES[1][2]
    for image in empty.iterdir():
        image.unlink()
    with pytest.raises(DatasetError, match=f"^empty class folder {re.escape(str(empty))}: expected image files"):
        read_inat21(root)


def test_inat21_unreadable_class_folder_is_named(inat_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = inat_root / "val" / INAT_CLASSES[2][2]
    deny_reading(monkeypatch, folder)
    with pytest.raises(DatasetError, match=f"^cannot read folder {re.escape(str(folder))}: Permission denied"):
        read_inat21(inat_root, requested_format="folders")


def test_inat21_bundle_batches(inat_root: Path) -> None:
    bundle = build_data(dataset_cfg("inat21", inat_root, image_size=40), options(batch_size=4, eval_batch_size=8))
    assert (bundle.num_classes, bundle.train_size, bundle.val_size) == (4, 12, 8)
    batch = next(bundle.val.epoch(0))
    assert batch.inputs.shape == (8, 3, 40, 40)
    assert batch.targets.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


# --- the loader: sharding, determinism, resume, extra views ------------------------------------

class CountingTransform:
    def __init__(self, inner: Callable) -> None:
        self.inner, self.calls = inner, 0
        self.size = inner.size  # the output size: lets worker loaders use their shared ring
        self.crops_first = inner.crops_first  # how the device-decode path cuts the planned box

    def __call__(self, path: str, rng: random.Random | None = None) -> np.ndarray:
        self.calls += 1
        return self.inner(path, rng)


def imagenet_files(root: Path, split: str = "train", subset: int | None = None) -> FileList:
    files = read_imagenet(root)[0 if split == "train" else 1]
    return files.subset(subset, None)


def make_loader(files: FileList, train: bool, size: int = 24, **option_overrides) -> FileLoader:  # noqa: ANN003
    transform = TrainTransform(size) if train else EvalTransform(size, eval_resize_size(size))
    return FileLoader(files, options(**option_overrides), train=train, transform=CountingTransform(transform), mean=MEAN, std=STD)


def test_val_shards_cover_every_sample_exactly_once(imagenet_root: Path) -> None:
    files = imagenet_files(imagenet_root, "val", subset=23)  # odd: shards of 11 and 12, no padding
    seen = []
    for rank in (0, 1):
        loader = make_loader(files, train=False, rank=rank, world_size=2, eval_batch_size=5)
        batches = list(loader.epoch(0))
        assert len(batches) == len(loader)
        seen += torch.cat([b.indices for b in batches]).tolist()
    assert sorted(seen) == list(range(23))


def test_train_shards_are_disjoint_and_equal(imagenet_root: Path) -> None:
    files = imagenet_files(imagenet_root)
    shards = []
    for rank in (0, 1):
        loader = make_loader(files, train=True, rank=rank, world_size=2, batch_size=5)
        indices, _ = loader.shard_indices(epoch=3)
        assert len(loader) == 4  # 24 per rank, drop_last
        shards.append(set(indices.tolist()))
        assert len(indices) == 24
    assert not shards[0] & shards[1]
    first_batch = next(make_loader(files, train=True, rank=1, world_size=2, batch_size=5).epoch(3))
    assert set(first_batch.indices.tolist()) <= shards[1]


def test_mid_epoch_resume_gives_identical_batches_without_decoding_skipped_ones(imagenet_root: Path) -> None:
    files = imagenet_files(imagenet_root, subset=8)  # 16 images, 4 batches of 4
    straight = list(make_loader(files, train=True).epoch(1))
    resumed_loader = make_loader(files, train=True)
    resumed = list(resumed_loader.epoch(1, start_step=2))
    assert len(straight) == 4 and len(resumed) == 2
    assert resumed_loader.dataset.transform.calls == 2 * 4
    for a, b in zip(straight[2:], resumed):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.targets, b.targets)
        assert torch.equal(a.inputs, b.inputs)
    other_epoch = list(make_loader(files, train=True).epoch(2))
    assert not torch.equal(torch.cat([b.indices for b in straight]), torch.cat([b.indices for b in other_epoch]))


def test_train_length_counts_whole_optimiser_steps_as_the_in_memory_loader(imagenet_root: Path) -> None:
    # 16 images, micro-batches of 4: 4 micro-batches alone, 2 steps of 2; 3 micro-batches per step
    # leave one incomplete step out (3, not 4), as TensorLoader does; 16 x 2 is not a whole step.
    files = imagenet_files(imagenet_root, subset=8)
    assert [len(make_loader(files, train=True, accumulate_steps=k)) for k in (1, 2, 3, 5)] == [4, 4, 3, 0]
    assert len(list(make_loader(files, train=True, accumulate_steps=3).epoch(0))) == 3


@pytest.mark.parametrize("workers", [0, 2])
def test_an_older_epochs_batches_stop_once_another_epoch_starts(imagenet_root: Path, workers: int) -> None:
    loader = make_loader(imagenet_files(imagenet_root, subset=8), train=True, num_workers=workers)
    old = loader.epoch(0)
    next(old)
    new = list(loader.epoch(1))  # the new epoch gets every one of its batches
    assert len(new) == 4
    reference = list(make_loader(imagenet_files(imagenet_root, subset=8), train=True, num_workers=workers).epoch(1))
    assert all(torch.equal(a.indices, b.indices) for a, b in zip(new, reference))
    with pytest.raises(RuntimeError, match="requested after the loader started another epoch"):
        next(old)
    loader.close()


def test_worker_count_does_not_change_the_batches(imagenet_root: Path) -> None:
    """Workers decode into a ring of 2 x 2 + 2 = 6 shared buffers: 8 batches per epoch, two epochs
    and three views per sample reuse every slot several times."""
    files = imagenet_files(imagenet_root, subset=8)
    views = dict(pairs=True, two_views=True, batch_size=2)
    in_process = make_loader(files, train=True, num_workers=0, **views)
    with_workers = make_loader(files, train=True, num_workers=2, **views)
    for epoch in (0, 1):
        a_batches, b_batches = list(in_process.epoch(epoch)), list(with_workers.epoch(epoch))
        assert len(a_batches) == len(b_batches) == 8
        for a, b in zip(a_batches, b_batches):
            assert torch.equal(a.indices, b.indices)
            for view in ("inputs", "second_view", "pair_inputs"):
                assert torch.equal(getattr(a, view), getattr(b, view)), view
    assert with_workers._ring is not None and len(with_workers._ring) == 6


def test_pairs_and_second_view(imagenet_root: Path) -> None:
    files = imagenet_files(imagenet_root, subset=6)
    loader = make_loader(files, train=True, pairs=True, two_views=True, batch_size=6)
    batch = next(loader.epoch(0))
    assert batch.second_view.shape == batch.inputs.shape == batch.pair_inputs.shape
    assert not torch.equal(batch.second_view, batch.inputs)  # an independent augmentation
    for epoch in range(3):  # CS-KD partners: same class, another image (SPEC.md)
        order, pairs = loader.shard_indices(epoch)
        assert (files.targets[pairs] == files.targets[order]).all() and (pairs != order).all()
    val_batch = next(make_loader(files, train=False, pairs=True, two_views=True).epoch(0))
    assert val_batch.second_view is None and val_batch.pair_inputs is None


def test_channels_last_layout(imagenet_root: Path) -> None:
    files = imagenet_files(imagenet_root, "val", subset=2)
    batch = next(make_loader(files, train=False, channels_last=True).epoch(0))
    assert batch.inputs.is_contiguous(memory_format=torch.channels_last)
    batch = next(make_loader(files, train=False, channels_last=False).epoch(0))
    assert batch.inputs.is_contiguous()


# --- Table 4: every model x dataset composes and trains two steps --------------------------------

TABLE4_MODELS = ["resnet18", "resnet50", "resnet101", "resnext50_32x4d", "resnext101_32x8d", "densenet121", "mobilenetv2"]
TWO_STEPS = [
    "trainer.device=cpu", "trainer.epochs=1", "trainer.max_steps_per_epoch=2", "trainer.batch_size=2",
    "trainer.eval_batch_size=4", "trainer.progress_bar=false", "trainer.num_workers=0", "trainer.log_every=1",
    "dataset.val_per_class=1", "dataset.image_size=64", "trainer.zipf_fit_at_end=false",
    # 64 px: the final map is 2 x 2, so BatchNorm there normalises 8 values per channel. At 32 px (a
    # 1 x 1 map, 2 values) its gradient is degenerate: lr 0.1 sent the bottleneck ResNets to inf within
    # two steps, and even lr 0.001 MobileNetV2's weights (which the finite-weights check now stops at).
    "optim.lr=0.001",
]


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread():
    """Tiny tensors gain nothing from intra-op threads, and OpenMP threads on a busy (or
    xdist-shared) 2-core machine can make a step 20x slower; restored after this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("model", TABLE4_MODELS)
@pytest.mark.parametrize("dataset", ["imagenet", "inat21"])
def test_table4_pair_trains_two_steps(dataset: str, model: str, imagenet_root: Path, inat_root: Path, tmp_path: Path) -> None:
    from zipfls_train.engine.run import run_training

    data = (
        [f"dataset.root={imagenet_root}", "dataset.num_classes=24", "dataset.num_classes_subset=3"]
        if dataset == "imagenet"
        else [f"dataset.root={inat_root}", "dataset.num_classes=4"]
    )
    cfg = compose([f"dataset={dataset}", f"model={model}", "loss=zipf", *TWO_STEPS, *data])
    assert cfg.dataset.zipf.upsample == "none"
    summary = run_training(cfg, tmp_path / "run")
    assert summary["status"] == "finished" and summary["epochs"] == 1
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(metrics[-1]["train_loss"])


def test_recipe_experiment_sets_the_224px_schedule() -> None:
    cfg = compose(["dataset=inat21", "model=resnet50", "loss=zipf", "experiment=recipe_imagenet"])
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, list(cfg.sched.milestones)) == (100, 256, [0.3, 0.6, 0.9])
    assert (cfg.dataset.image_size, cfg.dataset.num_classes, cfg.loss.weight) == (224, 10000, 1.0)
    assert compose(["dataset=imagenet"]).dataset.zipf.weight == 0.1


def test_device_eval_crop_on_whole_pixels_is_still_resize_then_center_crop() -> None:
    # 512 x 512 at 224 px: Resize(256) halves it and CenterCrop keeps source pixels 32..480, a box
    # on whole pixels; the crop's border pixels must still see their neighbours, as torchvision's do.
    from zipfls_train.data.device_decode import _crop_resize

    image = torch.randint(0, 256, (3, 512, 512), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    box, flip = EvalTransform(224, eval_resize_size(224)).plan(512, 512)
    assert box == (32.0, 32.0, 480.0, 480.0) and not flip
    resized = torch.nn.functional.interpolate(image[None].float(), size=(256, 256), mode="bilinear", antialias=True, align_corners=False)[0]
    expected = resized[:, 16:240, 16:240]
    torch.testing.assert_close(_crop_resize(image, box, 224, crop_first=False), expected, rtol=0, atol=1e-3)


# --- page-locking the ring for the GPU ----------------------------------------------------------

class FakeCudart:
    """Stands in for torch.cuda.cudart() on a machine without a driver: cudaHostRegister answers ``error``."""

    def __init__(self, error: int) -> None:
        self.error, self.registered = error, []

    def cudaHostRegister(self, pointer: int, size: int, flags: int) -> int:  # noqa: N802 - CUDA's name
        self.registered.append((pointer, size, flags))
        return self.error


def test_page_lock_clears_a_refusal_so_the_next_kernel_launch_does_not_report_it(monkeypatch) -> None:
    from zipfls_train.data import page_lock as page_lock_module

    cleared = []
    monkeypatch.setattr(page_lock_module, "clear_last_cuda_error", lambda: cleared.append(True))
    buffer = torch.empty(2, 3, 5, dtype=torch.uint8)
    refusing = FakeCudart(801)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: refusing)
    assert page_lock_module.page_lock(buffer) == 801
    assert refusing.registered == [(buffer.data_ptr(), 30, 0)] and cleared == [True]
    accepting = FakeCudart(0)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: accepting)
    assert page_lock_module.page_lock(torch.empty(4, dtype=torch.float32)) == 0
    assert accepting.registered[0][1] == 16 and cleared == [True]  # bytes, not elements; nothing to clear


def test_loader_warns_once_and_copies_synchronously_when_page_locking_is_refused(imagenet_root: Path, monkeypatch) -> None:
    import zipfls_train.data.file_loader as file_loader

    loader = make_loader(imagenet_files(imagenet_root, subset=8), train=True, size=8)
    loader._make_ring(workers=1)  # on the CPU: buffers made, not locked
    attempts = []
    monkeypatch.setattr(file_loader, "page_lock", lambda buffer: attempts.append(buffer) or 801)
    with pytest.warns(UserWarning, match=r"cudaHostRegister refused .*operation not supported \(801\).*synchronous"):
        loader._page_lock_ring()
    assert len(attempts) == 1 and loader._registered == []
    monkeypatch.setattr(file_loader, "page_lock", lambda buffer: 0)
    loader._page_lock_ring()
    assert loader._registered == [buffer.data_ptr() for buffers in loader._ring for buffer in buffers.values()]


def signal_loader_workers(trainer, sig: int) -> None:  # noqa: ANN001
    """Send ``sig`` to the training loader's own worker processes. Not to every live child of this
    process: a child left by an earlier test can be reaped elsewhere while multiprocessing still
    lists it, and os.kill on its pid then fails (seen once in CI)."""
    import os

    workers = trainer.data.train._loader._iterator._workers
    assert workers and all(worker.is_alive() for worker in workers)
    for worker in workers:
        os.kill(worker.pid, sig)


def test_a_loader_worker_killed_from_outside_is_one_line_naming_memory_and_the_checkpoint(imagenet_root: Path, tmp_path: Path,
                                                                                          monkeypatch) -> None:  # fmt: skip
    """The kernel's out-of-memory killer takes a DataLoader worker (SIGKILL) in epoch 2: torch's
    RuntimeError, raised wherever the main process is (a backward pass included), becomes a user
    error that names the likely cause and the checkpoint of epoch 1, which is left as it was."""
    import signal
    import time

    from zipfls_train.data.file_loader import LoaderWorkerKilled
    from zipfls_train.engine.checkpoint import load_checkpoint
    from zipfls_train.engine.run import run_training
    from zipfls_train.engine.trainer import Trainer

    original = Trainer.train_step

    def train_step(self, batches):  # noqa: ANN001, ANN202
        if self.progress.global_step == 4:  # the second step of epoch 2
            signal_loader_workers(self, signal.SIGKILL)
            time.sleep(1)  # (torch's SIGCHLD handler raises here, or the next fetch does)
        return original(self, batches)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    cfg = compose(["dataset=imagenet", "model=resnet18", "loss=ce", *TWO_STEPS, "trainer.epochs=2", "trainer.max_steps_per_epoch=3",
                   "trainer.num_workers=1", f"dataset.root={imagenet_root}", "dataset.num_classes=24", "dataset.num_classes_subset=12"])
    with pytest.raises(LoaderWorkerKilled) as error:
        run_training(cfg, tmp_path / "run")
    message = str(error.value)
    assert re.match(r"a data-loading worker \(pid \d+\) (was killed by SIGKILL from outside the run|ended unexpectedly): out of memory", message)
    assert "trainer.num_workers=N" in message and message.endswith(f"its last checkpoint, {tmp_path / 'run/checkpoints/last.pt'}, is where the same command resumes")
    assert "\n" not in message
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["progress"]["epoch"] == 1


def test_every_way_torch_reports_a_dead_worker_gets_its_own_line(monkeypatch) -> None:
    """torch's words (torch/utils/data/dataloader.py and the C++ SIGCHLD handler's strings)."""
    import signal

    from zipfls_train.data import file_loader

    def killed(message: str) -> str:
        return str(file_loader.loader_worker_killed(RuntimeError(message), 8, "saved"))

    assert killed("DataLoader worker (pid 7) is killed by signal: Bus error. ").startswith(
        "a data-loading worker (pid 7) died of SIGBUS: shared memory (/dev/shm) ran out")
    assert killed("DataLoader worker (pid 7) is killed by signal: Segmentation fault. ") == "a data-loading worker (pid 7) died of SIGSEGV; saved"
    assert killed("DataLoader worker (pid 7) exited unexpectedly with exit code 3. Details are lost due to multiprocessing. "
                  "Rerunning with num_workers=0 may give better error trace.") == (
        "a data-loading worker (pid 7) exited with code 3 (trainer.num_workers=0 runs the loading in the training process, "
        "where its error shows); saved")  # fmt: skip
    assert killed("DataLoader worker (pid(s) 12, 13) exited unexpectedly").startswith(
        "data-loading workers (pids 12, 13) ended unexpectedly: out of memory, most often")
    assert file_loader.loader_worker_killed(RuntimeError("CUDA error: device-side assert triggered"), 8, "saved") is None
    # Windows lists CTRL_C_EVENT (0) among its signals, which strsignal refuses: the names are still made.
    real = signal.strsignal
    monkeypatch.setattr(signal, "strsignal", lambda sig: real(sig) if sig != signal.SIGINT else (_ for _ in ()).throw(ValueError(sig)))
    names = file_loader._signal_names()
    assert names["Killed"] == "SIGKILL" and "SIGINT" not in names.values()


def test_sigterm_to_the_process_group_stops_a_run_with_loader_workers_at_a_saved_step(imagenet_root: Path, tmp_path: Path, monkeypatch) -> None:
    """A cluster's SIGTERM reaches the DataLoader workers too. They leave it to the training process,
    which saves at the next step and stops them (a worker killed by it would fail the run with
    DataLoader's "worker exited unexpectedly" at the next batch it owed). Here the workers get the
    signal during step 1 and must still deliver steps 2-4; the trainer gets it during step 4."""
    import signal

    from zipfls_train.engine.checkpoint import load_checkpoint
    from zipfls_train.engine.interrupt import TrainingInterrupted
    from zipfls_train.engine.run import run_training
    from zipfls_train.engine.trainer import Trainer

    original = Trainer.train_step

    def train_step(self, batches):  # noqa: ANN001, ANN202
        terms = original(self, batches)
        if self.progress.global_step == 0:
            signal_loader_workers(self, signal.SIGTERM)
        if self.progress.global_step == 3:
            signal.raise_signal(signal.SIGTERM)  # (this thread: handled before the step ends)
        return terms

    monkeypatch.setattr(Trainer, "train_step", train_step)
    cfg = compose(["dataset=imagenet", "model=resnet18", "loss=ce", *TWO_STEPS, "trainer.max_steps_per_epoch=12",
                   "trainer.num_workers=1", f"dataset.root={imagenet_root}", "dataset.num_classes=24", "dataset.num_classes_subset=12"])
    with pytest.raises(TrainingInterrupted, match=r"interrupted \(SIGTERM\) in epoch 1/1, after step 4/12; saved"):
        run_training(cfg, tmp_path / "run")
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["progress"]["step_in_epoch"] == 4


# --- dataset=imagefolder: your own images ----------------------------------------------------------

def write_image_folder(root: Path) -> Path:
    """3 classes (deliberately not in sorted order on disk), PNG and JPEG mixed; 4 train / 2 val each."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for label in ("fox", "cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for k in range(count):
                pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / (f"{k}.png" if k % 2 else f"{k}.jpg"))
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "val" / "dog" / "more").mkdir()  # ImageFolder reads subfolders of a class folder too
    Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)).save(root / "val" / "dog" / "more" / "9.png")
    return root


def test_imagefolder_reads_class_folders_in_sorted_order_and_trains(tmp_path: Path) -> None:
    from zipfls_train.data.image_folder import read_image_folder
    from zipfls_train.engine.run import run_training

    root = write_image_folder(tmp_path / "images")
    train, val = read_image_folder(root)
    assert train.classes == ["cat", "dog", "fox"]
    assert (len(train), len(val)) == (12, 7)
    assert np.bincount(train.targets).tolist() == [4, 4, 4] and np.bincount(val.targets).tolist() == [2, 3, 2]
    assert val.path(3).endswith("val/dog/1.png") and val.path(4).endswith("val/dog/more/9.png")
    cfg = compose(["dataset=imagefolder", f"dataset.root={root}", "dataset.num_classes=3", "model=cifar_resnet18",
                   "model.options.width=8", "dataset.image_size=32", "dataset.zipf.upsample=bilinear", "loss=zipf",
                   *[o for o in TWO_STEPS if not o.startswith("dataset.")], "trainer.batch_size=4"])
    summary = run_training(cfg, tmp_path / "run")
    assert summary["status"] == "finished"
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(record["train_zipf"])


def test_imagefolder_errors_name_the_layout_and_the_count(tmp_path: Path) -> None:
    from zipfls_train.data.image_folder import read_image_folder
    from zipfls_train.engine.config_checks import ConfigError, validate_config
    from zipfls_train.engine.run import run_training

    with pytest.raises(DatasetError, match=r"(?s)An image-folder dataset not found under dataset.root=.*<root>/train/<class>/<image>"):
        read_image_folder(tmp_path / "nothing")
    with pytest.raises(ConfigError, match=r"^dataset.num_classes must be given .*dataset.num_classes=<an integer >= 2>"):
        validate_config(compose(["dataset=imagefolder", "loss=ce"]))
    root = write_image_folder(tmp_path / "images")
    cfg = compose(["dataset=imagefolder", f"dataset.root={root}", "dataset.num_classes=5", "loss=ce", *TWO_STEPS])
    with pytest.raises(DatasetError, match=r"dataset.num_classes is 5 but the imagefolder files under .* hold 3 classes: set dataset.num_classes=3"):
        run_training(cfg, tmp_path / "run")


def test_imagefolder_follows_symlinked_subfolders_as_imagefolder_does_and_refuses_a_loop(tmp_path: Path) -> None:
    """Data trees on shared machines are often links: a class's symlinked subfolder was skipped
    (os.walk does not follow links unless told), so its images silently went missing; torchvision's
    ImageFolder counts them. A link back up the tree is a loop, refused by name."""
    from torchvision.datasets import ImageFolder

    from zipfls_train.data.image_folder import read_image_folder

    root = write_image_folder(tmp_path / "images")
    extra = tmp_path / "elsewhere"
    extra.mkdir()
    for k in range(3):
        Image.fromarray(np.full((40, 48, 3), k * 60, dtype=np.uint8)).save(extra / f"linked{k}.png")
    (root / "train" / "cat" / "more").symlink_to(extra, target_is_directory=True)
    train, _ = read_image_folder(root)
    reference = ImageFolder(str(root / "train"))
    assert len(train) == len(reference) == 15  # 4 + 3 linked cat images, 4 dog, 4 fox
    assert np.bincount(train.targets).tolist() == np.bincount(reference.targets).tolist() == [7, 4, 4]
    (root / "train" / "dog" / "loop").symlink_to(root / "train" / "dog", target_is_directory=True)
    with pytest.raises(DatasetError, match=r"train/dog/loop is a link to a folder already read under .*train/dog \(a loop\)"):
        read_image_folder(root)


def test_a_link_whose_target_is_gone_is_named_not_silently_dropped(tmp_path: Path) -> None:
    """Data trees linked file by file or class by class into a store: a link whose target is gone (a
    store not mounted, a file moved) was skipped without a word (an image, or a whole val class, fewer;
    a resume then refused as 'other data' without naming it). torchvision's ImageFolder lists such a
    file and fails on it later; here it is refused by name when the files are listed. A dangling link
    that is not an image (an editor's lock file) is ignored like any other non-image file."""
    from torchvision.datasets import ImageFolder

    from zipfls_train.data.image_folder import read_image_folder

    root = write_image_folder(tmp_path / "images")
    store = tmp_path / "store"
    store.mkdir()
    Image.new("RGB", (40, 48), (1, 2, 3)).save(store / "here.jpg")
    (root / "train" / "cat" / "linked.jpg").symlink_to(store / "here.jpg")
    (root / "train" / "cat" / ".#notes.txt").symlink_to(store / "user@host.123")  # emacs lock file
    train, _ = read_image_folder(root)
    assert len(train) == len(ImageFolder(str(root / "train"))) == 13  # a live link is an image as any other
    gone = root / "train" / "cat" / "gone.JPEG"
    gone.symlink_to(store / "moved.JPEG")
    assert len(ImageFolder(str(root / "train"))) == 14  # torchvision lists it (and fails on it at load)
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(gone))} is a link to {re.escape(str(store / 'moved.JPEG'))}, which does not exist"):
        read_image_folder(root)
    gone.unlink()
    (store / "fox_val").mkdir()
    Image.new("RGB", (40, 48)).save(store / "fox_val" / "0.png")
    shutil.rmtree(root / "val" / "fox")
    (root / "val" / "fox").symlink_to(store / "fox_val", target_is_directory=True)
    assert len(read_image_folder(root)[1]) == 6  # cat 2, dog 3, the linked fox folder 1
    shutil.rmtree(store / "fox_val")  # the val class folder's target is gone: the class is not silently left out
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(root / 'val' / 'fox'))} is a link to .*fox_val, which does not exist"):
        read_image_folder(root)


def test_hidden_files_and_folders_are_neither_images_nor_classes(tmp_path: Path) -> None:
    """A tree copied from a Mac holds '._<name>' beside every image; Jupyter leaves
    .ipynb_checkpoints, a filer shows .snapshot. torchvision's ImageFolder takes them for classes and
    images (and fails when it decodes one); here they are left out, as ls leaves them out."""
    from torchvision.datasets import ImageFolder

    from zipfls_train.data.image_folder import read_image_folder

    root = write_image_folder(tmp_path / "images")
    expected_train = [read_image_folder(root)[0].path(i) for i in range(12)]
    for image in list((root / "train").rglob("*.*g")):
        (image.parent / f"._{image.name}").write_bytes(APPLEDOUBLE)
    (root / "train" / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (40, 48)).save(root / "train" / ".ipynb_checkpoints" / "0.png")
    (root / "train" / "dog" / ".thumbnails").mkdir()  # a hidden subfolder of a class folder
    Image.new("RGB", (8, 8)).save(root / "train" / "dog" / ".thumbnails" / "0.png")
    (root / "val" / ".snapshot" / "cat").mkdir(parents=True)
    Image.new("RGB", (40, 48)).save(root / "val" / ".snapshot" / "cat" / "0.png")
    reference = ImageFolder(str(root / "train"))
    assert reference.classes == [".ipynb_checkpoints", "cat", "dog", "fox"] and len(reference) == 26
    train, val = read_image_folder(root)
    assert train.classes == ["cat", "dog", "fox"]
    assert [train.path(i) for i in range(len(train))] == expected_train
    assert len(val) == 7  # 2 per class and dog's more/9.png; nothing from .snapshot
    for files in (train, val):
        for i in range(len(files)):
            with Image.open(files.path(i)) as image:
                image.load()


def test_imagenet_flat_val_ignores_hidden_entries(tmp_path: Path) -> None:
    """A flat val/ with AppleDouble files and a hidden folder is still flat (format=auto decided
    'folders' when scandir met the folder first) and every labelled image is read, with no
    'no label for ._ILSVRC2012_val_...' error."""
    from zipfls_train.data.imagenet import find_format

    root = write_imagenet(tmp_path / "imagenet", val="flat", train_copies=1)
    truth = flat_val_truth(root)
    write_loc_solution(root / "LOC_val_solution.csv", truth)
    (root / "val" / ".ipynb_checkpoints").mkdir()
    for name in truth:
        (root / "val" / f"._{name}").write_bytes(APPLEDOUBLE)
    (root / "train" / ".snapshot").mkdir()
    assert find_format(root, "auto") == "flat"
    train, val = read_imagenet(root)
    assert len(train.classes) == 24 and ".snapshot" not in train.classes
    assert sorted(Path(val.path(i)).name for i in range(len(val))) == sorted(truth)


def test_inat21_and_flat_imagenet_val_name_a_link_whose_target_is_gone(inat_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "inat"
    shutil.copytree(inat_root, root)
    for name in ("train_mini.json", "val.json"):
        (root / name).unlink()
    folder = root / "val" / INAT_CLASSES[1][2]
    (folder / "0123abcd.jpg").symlink_to(tmp_path / "nowhere.jpg")
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(folder / '0123abcd.jpg'))} is a link to .*nowhere.jpg, which does not exist"):
        read_inat21(root)
    flat = write_imagenet(tmp_path / "imagenet", val="flat", train_copies=1)
    truth = flat_val_truth(flat)
    first = sorted(truth)[0]
    (flat / "val" / first).unlink()
    (flat / "val" / first).symlink_to(tmp_path / "nowhere.JPEG")
    write_loc_solution(flat / "LOC_val_solution.csv", truth)
    with pytest.raises(DatasetError, match=rf"{re.escape(str(flat / 'val' / first))} is a link to .*nowhere.JPEG, which does not exist"):
        read_imagenet(flat)


def test_a_dataset_root_under_the_home_folder_may_be_written_with_a_tilde(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dataset.root=~/data: bash expands ~ only at the start of a word, zsh (macOS's shell) not after
    '=', and a YAML file never: the path is the home folder's, not a folder named ~ in the cwd."""
    write_image_folder(tmp_path / "home" / "images")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    bundle = build_data(dataset_cfg("imagefolder", "~/images", num_classes=3), options(batch_size=2, eval_batch_size=2))
    assert (bundle.num_classes, bundle.train_size) == (3, 12)


def test_file_and_class_folder_names_that_are_not_utf8_are_read(tmp_path: Path) -> None:
    import hashlib

    (_, photo), (_, other) = samples()[:2]
    root = tmp_path / "data"
    for split in ("train", "val"):
        latin1 = os.fsencode(root / split) + b"/caf\xe9"  # Latin-1 "cafe" with an acute e: not UTF-8
        os.makedirs(latin1)
        shutil.copyfile(photo, latin1 + b"/\xe9t\xe9.JPEG")
        (root / split / "plain").mkdir()
        shutil.copyfile(other, root / split / "plain" / "b.JPEG")
    bundle = build_data(dataset_cfg("imagefolder", root, num_classes=2), options(batch_size=2, eval_batch_size=2))
    assert bundle.classes == [os.fsdecode(b"caf\xe9"), "plain"]
    assert bundle.identity()["classes_sha1"] == hashlib.sha1(b"caf\xe9\nplain").hexdigest()[:12]
    batch = next(bundle.val.epoch(0))
    assert batch.targets.tolist() == [0, 1]
    expected = EvalTransform(32, eval_resize_size(32), draft=False)(str(photo))
    got = pixels(batch.inputs[:1])[0].permute(1, 2, 0).numpy()
    assert np.abs(got - expected).max() < 0.01
    assert next(bundle.train.epoch(0)).inputs.shape == (2, 3, 32, 32)


def deny_reading(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """``folder`` cannot be listed, as a folder without read permission for this user (chmod does
    not stop root, who runs the tests in CI containers)."""
    scandir = os.scandir

    def denying(path=".") -> object:  # noqa: ANN001
        if os.fspath(path) == os.fspath(folder):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denying)


@pytest.mark.parametrize("split", ["train", "val"])
def test_an_unreadable_class_folder_is_named_not_taken_for_empty_or_skipped(split: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from zipfls_train.data.image_folder import read_image_folder

    root = write_image_folder(tmp_path / "images")
    assert [len(files) for files in read_image_folder(root)] == [12, 7]
    deny_reading(monkeypatch, root / split / "dog")
    with pytest.raises(DatasetError, match=f"^cannot read folder {re.escape(str(root / split / 'dog'))}: Permission denied"):
        read_image_folder(root)
    monkeypatch.undo()
    deny_reading(monkeypatch, root / "val" / "dog" / "more")  # a subfolder of a class folder
    with pytest.raises(DatasetError, match=f"^cannot read folder {re.escape(str(root / 'val' / 'dog' / 'more'))}: Permission denied"):
        read_image_folder(root)


def test_a_corrupt_image_on_one_ddp_rank_ends_the_run_with_its_message_alone(tmp_path: Path) -> None:
    """One rank fails on a corrupt image while the other trains on: the other is stopped at once,
    without taking torch's clean-up SIGTERM for a user's stop request ("stopping after this step
    and saving a checkpoint", which would not happen)."""
    import subprocess
    import sys

    from conftest import REPO

    root = write_image_folder(tmp_path / "images")
    (root / "train" / "dog" / "2.jpg").write_bytes(b"not a jpeg at all")
    args = ["dataset=imagefolder", f"dataset.root={root}", "dataset.num_classes=3", "model=cifar_resnet18",
            "model.options.width=8", "model.options.norm=group", "loss=ce", "trainer.devices=2", "trainer.batch_size=4",
            *[o for o in TWO_STEPS if o not in ("trainer.batch_size=2", "trainer.max_steps_per_epoch=2")],
            f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    done = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot decode image" in errors[0] and "dog/2.jpg" in errors[0], done.stderr[-3000:]
    assert "SIGTERM" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]


class StuckTransform(CountingTransform):
    """After the first batch, every image read hangs (a dead network filesystem, say)."""

    def __call__(self, path: str, rng: random.Random | None = None) -> np.ndarray:
        self.calls += 1
        if self.calls > 4:
            time.sleep(600)
        return self.inner(path, rng)


def test_close_ends_a_worker_stuck_in_a_read_although_workers_ignore_sigterm(imagenet_root: Path) -> None:
    files = imagenet_files(imagenet_root, subset=8)
    loader = FileLoader(files, options(num_workers=1), train=True, transform=StuckTransform(TrainTransform(24)), mean=MEAN, std=STD)
    next(loader.epoch(0))  # the worker delivered batch 1 and now hangs on batch 2
    workers = list(loader._loader._iterator._workers)
    started = time.monotonic()
    loader.close()
    assert time.monotonic() - started < 20  # torch's 5 s join, then our SIGKILL
    assert not any(worker.is_alive() for worker in workers)


def test_shared_memory_too_small_for_the_batch_buffers_is_said_before_training(imagenet_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A container's /dev/shm (64 MB by default under Docker) cannot hold the workers' batch buffers:
    torch's "unable to allocate shared memory" came as a traceback, and for the val loader only at
    the first evaluation, an epoch into training. The buffers are now made with the loader, and the
    error names what they need and the keys that size them. (By hand, under a 16 MB tmpfs on
    /dev/shm: the same message, before the first step.)"""
    def no_room(self):  # noqa: ANN001, ANN202
        raise RuntimeError("unable to allocate shared memory(shm) for file </torch_1_2_3>: No space left on device (28)")

    files = imagenet_files(imagenet_root, "val")
    monkeypatch.setattr(torch.Tensor, "share_memory_", no_room)
    FileLoader(files, options(num_workers=0), train=False, transform=EvalTransform(224, 256), mean=MEAN, std=STD)  # no buffers
    with pytest.raises(DatasetError) as refused:
        FileLoader(files, options(num_workers=2, eval_batch_size=512), train=False, transform=EvalTransform(224, 256), mean=MEAN, std=STD)
    # 2 workers x 2 + 2 = 6 batches, each no larger than the val set's own images.
    images = len(files)
    assert images < 512
    message = str(refused.value)
    assert message.startswith(f"the val loader's batch buffers need {6 * images * 224 * 224 * 3 / 2**20:.0f} MiB of shared memory "
                              f"(6 batches in flight, trainer.num_workers=2 x 2 + 2, of {images} x 224 x 224 x 3 bytes) and /dev/shm has ")
    assert message.endswith("or lower trainer.num_workers or trainer.eval_batch_size")


# The first batch of a loader whose workers each get SIGINT the moment they are started, in a fresh
# process (argv: ImageNet root, start method): it prints the batch's shape.
SIGNAL_AT_WORKER_START = """
import multiprocessing, os, signal, sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from zipfls_train.data import LoaderOptions
from zipfls_train.data.file_loader import FileLoader
from zipfls_train.data.imagenet import read_imagenet
from zipfls_train.data.transforms import TrainTransform

original_iter = DataLoader.__iter__


def iter_then_signal_the_workers(self):
    iterator = original_iter(self)
    for worker in iterator._workers:
        os.kill(worker.pid, signal.SIGINT)
    return iterator


if __name__ == "__main__":
    multiprocessing.set_start_method(sys.argv[2], force=True)
    DataLoader.__iter__ = iter_then_signal_the_workers
    files = read_imagenet(Path(sys.argv[1]))[0].subset(8, None)
    options = LoaderOptions(batch_size=4, eval_batch_size=5, device=torch.device("cpu"), seed=0, num_workers=1)
    loader = FileLoader(files, options, train=True, transform=TrainTransform(24), mean=[0.5] * 3, std=[0.25] * 3)
    try:
        print(tuple(next(loader.epoch(0)).inputs.shape))
    finally:
        loader.close()
"""


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_a_signal_while_spawned_workers_start_does_not_kill_them(imagenet_root: Path, start_method: str) -> None:
    """macOS starts DataLoader workers by spawn (and Python 3.14's Linux by forkserver): a worker
    spends seconds starting Python and importing torch before its own code ignores Ctrl-C and
    SIGTERM. A signal to the process group then (Ctrl-C at the start of an epoch or evaluation)
    killed it, and the run with it ("DataLoader worker exited unexpectedly"), instead of letting
    the training process save and stop. In a fresh process: the first such start also starts
    Python's resource tracker, which unblocked the signals the workers were to inherit held back
    (this test passed only after another test had started the tracker)."""
    result = subprocess.run([sys.executable, "-c", SIGNAL_AT_WORKER_START, str(imagenet_root), start_method],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["(4, 3, 24, 24)"]


@pytest.mark.parametrize("workers", [0, 1])
def test_loading_epochs_leaves_torch_s_global_random_state_alone(imagenet_root: Path, workers: int) -> None:
    """A DataLoader iterator without a generator of its own draws its workers' base seed from the
    global RNG, which Zipf's random distributions and dropout draw from: a run's results then
    depended on trainer.num_workers (a draw per epoch without workers, one per loader with
    persistent workers) and a resumed run differed from an uninterrupted one."""
    files = imagenet_files(imagenet_root, subset=8)
    loader = make_loader(files, train=True, num_workers=workers)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    try:
        for epoch in range(2):
            assert len(list(loader.epoch(epoch))) == len(loader)
    finally:
        loader.close()
    assert torch.equal(torch.get_rng_state(), before)
