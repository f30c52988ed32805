"""Shared fixtures: tiny datasets written in the real on-disk layouts, config composition, and
short real training runs."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# The Ctrl-C tests act as a terminal's user: they need SIGINT to interrupt, as it does in a shell's
# foreground. A suite started in the background (`pytest &` in a script, nohup) inherits SIGINT
# ignored; Python then installs no KeyboardInterrupt handler, nor do the runs it starts, and a run
# rightly keeps ignoring it. Take the foreground's handler back (children get the default again).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
# ZIPFLS_SHARED_DATA points elsewhere (e.g. a copy carried to a GPU machine).
SHARED_DATA = Path(os.environ.get("ZIPFLS_SHARED_DATA", REPO / ".." / "shared" / "data")).resolve()


# The first bytes of an AppleDouble file (the '._' file macOS writes beside each file it copies to
# a disk or share that has no place for its metadata): a magic number, no image.
APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(60)


def shared_data() -> Path:
    """../shared/data; under CI it must exist (a test needing it fails rather than skips)."""
    if SHARED_DATA.is_dir():
        return SHARED_DATA
    if os.environ.get("CI") == "true":
        raise FileNotFoundError(f"CI=true but the shared data folder {SHARED_DATA} is missing")
    pytest.skip(f"{SHARED_DATA} not present (outside CI)")


@contextlib.contextmanager
def captured_whole_in_cuda_graphs(what: str) -> Iterator[None]:
    """Asserts that every graph compiled inside was captured whole in CUDA graphs. Inductor runs a
    graph it cannot capture without CUDA graphs (``cudagraph_skips``), or splits it around the
    operations it cannot capture and runs those from the host every step
    (``cudagraph_partitions``), silently but for a log line."""
    from torch._dynamo.utils import counters

    def counts() -> tuple[int, int]:
        return int(counters["inductor"]["cudagraph_skips"]), int(counters["inductor"]["cudagraph_partitions"])

    skips, partitions = counts()
    yield
    skips_after, partitions_after = counts()
    assert skips_after == skips, f"{what}: a compiled graph was left out of CUDA graphs"
    assert partitions_after == partitions, f"{what}: a compiled graph was split for CUDA graphs"


def class_pattern_images(label: int, count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """count x size x size x 3 uint8 images whose colour and stripe orientation depend on the label,
    plus noise: learnable, so a short training run must beat chance."""
    base = np.zeros((size, size, 3), dtype=np.float32)
    hue = np.array([(label * 67) % 256, (label * 131) % 256, (label * 29) % 256], dtype=np.float32)
    coords = np.arange(size, dtype=np.float32)
    stripes = np.sin(coords[:, None] * (1 + label % 3) * 0.6 + coords[None, :] * (label % 2) * 0.6)
    base += hue * 0.6 + 80 * stripes[:, :, None]
    noise = rng.normal(0, 25, size=(count, size, size, 3))
    return np.clip(base[None] + noise, 0, 255).astype(np.uint8)


def write_tinyimagenet_tree(root: Path, wnids: Sequence[str], train_per_class: int, val_per_class: int, size: int = 64, seed: int = 0) -> Path:
    """A tiny-imagenet-200/ tree in the official layout (JPEG files, val_annotations.txt)."""
    rng = np.random.default_rng(seed)
    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    # The official wnids.txt is not sorted: write it shuffled to make sure readers sort.
    (base / "wnids.txt").write_text("\n".join(list(wnids)[::-1]) + "\n")
    (base / "words.txt").write_text("".join(f"{w}\tclass {w}\n" for w in wnids))
    annotations = []
    val_index = 0
    for wnid in wnids:
        label = sorted(wnids).index(wnid)
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for k, pixels in enumerate(class_pattern_images(label, train_per_class, size, rng)):
            Image.fromarray(pixels).save(folder / f"{wnid}_{k}.JPEG", quality=95)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for pixels in class_pattern_images(label, val_per_class, size, rng):
            name = f"val_{val_index}.JPEG"
            Image.fromarray(pixels).save(base / "val" / "images" / name, quality=95)
            annotations.append(f"{name}\t{wnid}\t0\t0\t{size - 1}\t{size - 1}\n")
            val_index += 1
    (base / "val" / "val_annotations.txt").write_text("".join(annotations))
    return root


def write_tinyimagenet_pack(root: Path, num_classes: int, train_per_class: int, val_per_class: int, size: int = 32, seed: int = 0) -> Path:
    """The compact pack layout of ../shared/data/tinyimagenet-32 (one JPEG grid per class and split)."""
    rng = np.random.default_rng(seed)
    base = root / "tinyimagenet-32"
    base.mkdir(parents=True)
    wnids = [f"n{10000000 + i:08d}" for i in range(num_classes)]
    counts = {}
    for label, wnid in enumerate(wnids):
        for split, count, per_row in (("train", train_per_class, 25), ("val", val_per_class, 10)):
            tiles = class_pattern_images(label, count, size, rng)
            rows = -(-count // per_row)
            grid = np.zeros((rows * size, per_row * size, 3), dtype=np.uint8)
            for i, tile in enumerate(tiles):
                r, c = divmod(i, per_row)
                grid[r * size : (r + 1) * size, c * size : (c + 1) * size] = tile
            Image.fromarray(grid).save(base / f"{split}_{wnid}.jpg", quality=95)
            counts[f"{split}_{wnid}"] = count
    (base / "meta.json").write_text(json.dumps({"size": size, "quality": 95, "wnids": wnids, "counts": counts}))
    return root


def write_cifar100(root: Path, train_per_class: int, test_per_class: int, num_classes: int = 100, bytes_keys: bool = True, seed: int = 0) -> Path:
    """cifar-100-python/{train,test,meta} pickles in the official format."""
    rng = np.random.default_rng(seed)
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        images, labels = [], []
        for label in range(num_classes):
            pixels = class_pattern_images(label, per_class, 32, rng)
            images.append(pixels.transpose(0, 3, 1, 2).reshape(per_class, -1))
            labels += [label] * per_class
        record = {key("data"): np.concatenate(images), key("fine_labels"): labels, key("coarse_labels"): [0] * len(labels)}
        with (base / split).open("wb") as handle:
            pickle.dump(record, handle)
    names = [f"class_{i}" for i in range(num_classes)]
    with (base / "meta").open("wb") as handle:
        pickle.dump({key("fine_label_names"): [n.encode() if bytes_keys else n for n in names]}, handle)
    return root


@pytest.fixture(scope="session")
def tiny_pack_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10-class pack: 40 train and 10 val images per class."""
    return write_tinyimagenet_pack(tmp_path_factory.mktemp("pack"), num_classes=10, train_per_class=40, val_per_class=10)


@pytest.fixture(scope="session")
def official_subset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """../shared/data/tiny-imagenet-200-subset.tar.gz extracted (the real official format)."""
    archive = shared_data() / "tiny-imagenet-200-subset.tar.gz"
    target = tmp_path_factory.mktemp("official")
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    return target


def compose(overrides: Sequence[str] = ()):
    """The composed (unresolved) training config, as train.py would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides), return_hydra_config=False)


TINY_RUN = [
    "dataset=tinyimagenet",
    "dataset.format=pack",
    "dataset.num_classes=10",
    "model=cifar_resnet18",
    "model.options.width=8",
    "trainer.device=cpu",
    "trainer.batch_size=16",
    "trainer.eval_batch_size=64",
    "trainer.progress_bar=false",
    "trainer.log_every=1",
]


@pytest.fixture
def run_tiny(tiny_pack_root: Path, tmp_path: Path) -> Callable[..., tuple[dict, Path]]:
    """Train on the tiny pack in-process: run_tiny("loss=zipf", "trainer.epochs=2") -> (summary, run_dir)."""
    from zipfls_train.engine.run import run_training

    def run(*overrides: str, run_dir: Path | None = None) -> tuple[dict, Path]:
        cfg = compose([*TINY_RUN, f"dataset.root={tiny_pack_root}", "trainer.epochs=1", *overrides])
        target = run_dir or tmp_path / "run"
        return run_training(cfg, target), target

    return run
