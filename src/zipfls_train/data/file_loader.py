"""Loader for datasets of image files (ImageNet, INAT21): decode + augment in DataLoader workers,
normalise on the training device.

Same protocol as :class:`TensorLoader`: ``len(loader)`` batches per epoch for this rank and
``loader.epoch(epoch, start_step)`` yields :class:`Batch` objects on ``options.device``.

* Order: a permutation drawn from (seed, epoch), cut into ``world_size`` disjoint strided shards
  (train: drop the remainder so every rank has the same number of full batches); evaluation uses
  contiguous, unpadded shards so every image is scored exactly once across ranks.
* Augmentation of sample ``i`` in epoch ``e`` is seeded by (seed, e, i, view), so it does not depend
  on which worker decodes it, and ``epoch(e, start_step=k)`` yields exactly the batches k, k+1, ...
  of an uninterrupted epoch without opening the images of the skipped batches.
* Workers return uint8 ``H x W x 3`` crops (4x less to pin and copy than float); on the device the
  batch becomes ``N x 3 x H x W`` by a permute, which *is* the channels_last layout, then it is
  normalised there. On CUDA the copy and normalisation run on a side stream one batch ahead
  (timm's PrefetchLoader idea), so they overlap the previous step's compute.
* DataLoader: ``num_workers`` from the options, pinned memory on CUDA, persistent workers (forked
  once, reused every epoch: the batch list is swapped underneath them), ``prefetch_factor`` batches
  in flight per worker.
* A file that cannot be decoded raises :class:`DatasetError` naming it; DataLoader re-raises a
  worker's exception in the main process with the same type and the original message.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .augment import normalize
from .batch import Batch
from .images import DatasetError
from .tensor_loader import LoaderOptions, _mix
from .transforms import EvalTransform, TrainTransform, eval_resize_size

TRAIN_AUGMENTS = ("random_resized_crop", "none")
TEST_TRANSFORMS = ("resize_center_crop",)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Views of one sample get different augmentation seeds.
VIEW_MAIN, VIEW_SECOND, VIEW_PAIR = 0, 1, 2


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: str) -> list[str]:
    """Sorted names of the image files directly in ``folder``."""
    with os.scandir(folder) as entries:
        return sorted(entry.name for entry in entries if entry.is_file() and is_image_file(entry.name))


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
            names.append(name.encode())
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
        return os.path.join(self.root, self.folders[self.folder_index[index]], self.names[index].decode())

    def take(self, index: np.ndarray, classes: list[str] | None = None) -> "FileList":
        return FileList(self.root, self.folders, self.folder_index[index], self.names[index], self.targets[index],
                        self.classes if classes is None else classes)

    def subset(self, num_classes: int | None, per_class: int | None) -> "FileList":
        """The first ``num_classes`` classes (labels kept: they are 0..K-1) and the first ``per_class``
        files of each class, in list order (as :func:`images.take_subset`). ``None`` keeps all."""
        if num_classes is None and per_class is None:
            return self
        keep = len(self.classes) if num_classes is None else int(num_classes)
        if not 2 <= keep <= len(self.classes):
            raise DatasetError(f"dataset.num_classes_subset must be in [2, {len(self.classes)}], got {num_classes}")
        mask = self.targets < keep
        if per_class is not None:
            if int(per_class) < 1:
                raise DatasetError(f"per-class subset must be >= 1, got {per_class}")
            order = np.argsort(self.targets, kind="stable")
            sorted_targets = self.targets[order]
            rank_sorted = np.arange(len(order)) - np.searchsorted(sorted_targets, sorted_targets, side="left")
            rank = np.empty_like(rank_sorted)
            rank[order] = rank_sorted
            mask &= rank < int(per_class)
        return self.take(np.nonzero(mask)[0], self.classes[:keep])


# Key of one sample in a batch plan: (dataset index, index of its CS-KD pair or -1, epoch).
SampleKey = tuple[int, int, int]


class _FileDataset(Dataset):
    """Decodes one sample (and its extra views) per key; runs in the workers."""

    def __init__(self, files: FileList, transform: Callable[..., np.ndarray], train: bool, seed: int,
                 two_views: bool, pairs: bool) -> None:
        self.files = files
        self.transform = transform
        self.train = train
        self.seed = seed
        self.two_views = two_views
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.files)

    def _view(self, index: int, rng_key: tuple[int, ...]) -> np.ndarray:
        rng = random.Random(_mix(self.seed, *rng_key)) if self.train else None
        return self.transform(self.files.path(index), rng)

    def __getitem__(self, key: SampleKey) -> tuple[Any, ...]:
        index, pair, epoch = key
        item: list[Any] = [self._view(index, (epoch, index, VIEW_MAIN)), int(self.files.targets[index]), index]
        if self.two_views:
            item.append(self._view(index, (epoch, index, VIEW_SECOND)))
        if self.pairs:
            item.append(self._view(pair, (epoch, index, VIEW_PAIR)))
            item.append(int(self.files.targets[pair]))
        return tuple(item)


def _collate(items: list[tuple[Any, ...]], two_views: bool, pairs: bool) -> dict[str, Tensor]:
    columns = list(zip(*items))
    out = {
        "images": torch.from_numpy(np.stack(columns[0])),
        "targets": torch.tensor(columns[1], dtype=torch.int64),
        "indices": torch.tensor(columns[2], dtype=torch.int64),
    }
    at = 3
    if two_views:
        out["second_view"] = torch.from_numpy(np.stack(columns[at]))
        at += 1
    if pairs:
        out["pair_inputs"] = torch.from_numpy(np.stack(columns[at]))
        out["pair_targets"] = torch.tensor(columns[at + 1], dtype=torch.int64)
    return out


class _Collate:
    """Picklable collate function (workers may be spawned)."""

    def __init__(self, two_views: bool, pairs: bool) -> None:
        self.two_views, self.pairs = two_views, pairs

    def __call__(self, items: list[tuple[Any, ...]]) -> dict[str, Tensor]:
        return _collate(items, self.two_views, self.pairs)


class _BatchPlan:
    """The batch sampler: the current epoch's batches of keys, swapped by ``FileLoader.epoch``
    (persistent workers keep running; only the main process iterates this)."""

    def __init__(self) -> None:
        self.indices = np.empty(0, dtype=np.int64)
        self.pairs: np.ndarray | None = None
        self.epoch = 0
        self.batch_size = 1
        self.first_step = 0
        self.num_batches = 0

    def __len__(self) -> int:
        return max(0, self.num_batches - self.first_step)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for step in range(self.first_step, self.num_batches):
            chunk = slice(step * self.batch_size, (step + 1) * self.batch_size)
            index = self.indices[chunk].tolist()
            pair = self.pairs[chunk].tolist() if self.pairs is not None else [-1] * len(index)
            yield [(i, p, self.epoch) for i, p in zip(index, pair)]


class FileLoader:
    """Iterate ``loader.epoch(epoch, start_step)`` to get :class:`Batch` objects on the device."""

    def __init__(
        self,
        files: FileList,
        options: LoaderOptions,
        *,
        train: bool,
        transform: Callable[..., np.ndarray],
        mean: Sequence[float],
        std: Sequence[float],
        prefetch_factor: int = 4,
    ) -> None:
        if len(files) == 0:
            raise DatasetError(f"no images under {files.root} for the {'train' if train else 'val'} split")
        self.files = files
        self.options = options
        self.train = train
        self.mean, self.std = list(mean), list(std)
        self.batch_size = options.batch_size if train else options.eval_batch_size
        self.num_samples = len(files)
        self.two_views = train and options.two_views
        self.pairs = train and options.pairs
        self.dataset = _FileDataset(files, transform, train, options.seed, self.two_views, self.pairs)
        self.prefetch_factor = prefetch_factor
        self._plan = _BatchPlan()
        self._loader: DataLoader | None = None
        if self.pairs:
            targets = torch.from_numpy(files.targets)
            counts = torch.bincount(targets, minlength=len(files.classes))
            self._by_class = torch.argsort(targets, stable=True)
            self._class_count = counts
            self._class_start = torch.cumsum(counts, 0) - counts

    # --- sharding (as TensorLoader) ---------------------------------------------------------
    def _shard_size(self) -> int:
        world, rank = self.options.world_size, self.options.rank
        if self.train:
            return self.num_samples // world
        return (rank + 1) * self.num_samples // world - rank * self.num_samples // world

    def __len__(self) -> int:
        shard = self._shard_size()
        if self.train:
            return shard // self.batch_size
        return (shard + self.batch_size - 1) // self.batch_size

    def shard_indices(self, epoch: int) -> tuple[np.ndarray, np.ndarray | None]:
        """This rank's dataset indices for ``epoch`` in batch order (and their CS-KD pairs)."""
        world, rank = self.options.world_size, self.options.rank
        if not self.train:
            start = rank * self.num_samples // world
            return np.arange(start, start + self._shard_size(), dtype=np.int64), None
        generator = torch.Generator().manual_seed(_mix(self.options.seed, epoch))
        order = torch.randperm(self.num_samples, generator=generator)
        pairs = None
        if self.pairs:
            # Another sample of the same class per position, uniformly (possibly itself, as CS-KD's
            # PairBatchSampler), drawn for the global order so it does not depend on world_size.
            u = torch.rand(self.num_samples, generator=torch.Generator().manual_seed(_mix(self.options.seed, epoch, 1)))
            targets = torch.from_numpy(self.files.targets)[order]
            count = self._class_count[targets]
            offset = (u * count).long().clamp_max_(count - 1)
            pairs = self._by_class[self._class_start[targets] + offset]
        usable = (self.num_samples // world) * world
        shard = order[:usable][rank::world].numpy()
        return shard, (pairs[:usable][rank::world].numpy() if pairs is not None else None)

    # --- the DataLoader ---------------------------------------------------------------------
    def _dataloader(self) -> DataLoader:
        if self._loader is None:
            workers = max(0, int(self.options.num_workers))
            self._loader = DataLoader(
                self.dataset,
                batch_sampler=self._plan,
                num_workers=workers,
                collate_fn=_Collate(self.two_views, self.pairs),
                pin_memory=self.options.device.type == "cuda",
                persistent_workers=workers > 0,
                prefetch_factor=self.prefetch_factor if workers > 0 else None,
            )
        return self._loader

    def _to_device(self, pixels: Tensor) -> Tensor:
        """uint8 N x H x W x 3 (host) -> normalised float N x 3 x H x W on the device."""
        on_device = pixels.to(self.options.device, non_blocking=True).permute(0, 3, 1, 2)
        out = normalize(on_device, self.mean, self.std)
        memory_format = torch.channels_last if self.options.channels_last else torch.contiguous_format
        return out.contiguous(memory_format=memory_format)

    def _batch(self, raw: dict[str, Tensor]) -> Batch:
        device = self.options.device
        batch = Batch(
            inputs=self._to_device(raw["images"]),
            targets=raw["targets"].to(device, non_blocking=True),
            indices=raw["indices"].to(device, non_blocking=True),
        )
        if "second_view" in raw:
            batch.second_view = self._to_device(raw["second_view"])
        if "pair_inputs" in raw:
            batch.pair_inputs = self._to_device(raw["pair_inputs"])
            batch.pair_targets = raw["pair_targets"].to(device, non_blocking=True)
        return batch

    def raw_batches(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, Tensor]]:
        """The host-side batches (uint8 N x H x W x 3 images, labels, indices) of ``epoch`` from
        ``start_step``: what the workers deliver, before the device copy."""
        indices, pairs = self.shard_indices(epoch)
        plan = self._plan
        plan.indices, plan.pairs, plan.epoch = indices, pairs, epoch
        plan.batch_size, plan.num_batches, plan.first_step = self.batch_size, len(self), min(start_step, len(self))
        return iter(self._dataloader())

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        raw = self.raw_batches(epoch, start_step)
        if self.options.device.type != "cuda":
            for item in raw:
                yield self._batch(item)
            return
        yield from self._prefetched(raw)

    def _prefetched(self, raw: Iterator[dict[str, Tensor]]) -> Iterator[Batch]:
        """Copy + normalise batch k+1 on a side stream while the caller computes on batch k."""
        stream = torch.cuda.Stream(device=self.options.device)
        pending: Batch | None = None
        for item in raw:
            with torch.cuda.stream(stream):
                upcoming = self._batch(item)
            if pending is not None:
                yield pending
            torch.cuda.current_stream(self.options.device).wait_stream(stream)
            for tensor in (upcoming.inputs, upcoming.targets, upcoming.indices, upcoming.second_view,
                           upcoming.pair_inputs, upcoming.pair_targets):
                if tensor is not None:
                    # Memory allocated on the side stream is used on the main stream from here on.
                    tensor.record_stream(torch.cuda.current_stream(self.options.device))
            pending = upcoming
        if pending is not None:
            yield pending


# --- building a dataset's loaders from its config ------------------------------------------------

def build_transforms(cfg: Mapping[str, Any], draft: bool = True) -> tuple[Callable[..., np.ndarray], Callable[..., np.ndarray]]:
    """(train transform, eval transform) of a file dataset config (``image_size``, ``train_augment``,
    ``test_transform``); the eval transform resizes to image_size * 256 / 224 and center-crops."""
    size = int(cfg["image_size"])
    augment = str(cfg.get("train_augment", "random_resized_crop"))
    test = str(cfg.get("test_transform", "resize_center_crop"))
    if augment not in TRAIN_AUGMENTS:
        raise DatasetError(f"dataset.train_augment must be one of {list(TRAIN_AUGMENTS)} for {cfg['name']}, got {augment!r}")
    if test not in TEST_TRANSFORMS:
        raise DatasetError(f"dataset.test_transform must be one of {list(TEST_TRANSFORMS)} for {cfg['name']}, got {test!r}")
    evaluate = EvalTransform(size, eval_resize_size(size), draft=draft)
    train = TrainTransform(size, draft=draft) if augment == "random_resized_crop" else evaluate
    return train, evaluate


def build_file_bundle(cfg: Mapping[str, Any], options: LoaderOptions, train_files: FileList, val_files: FileList):  # noqa: ANN201
    """Subsets, class-count check and the two loaders: the common tail of every file dataset builder."""
    from .builders import DataBundle  # builders imports this module's users lazily; avoid a cycle

    train_files = train_files.subset(cfg.get("num_classes_subset"), cfg.get("train_per_class"))
    val_files = val_files.subset(cfg.get("num_classes_subset"), cfg.get("val_per_class"))
    expected = cfg.get("num_classes_subset") or cfg["num_classes"]
    if len(train_files.classes) != int(expected):
        raise DatasetError(
            f"dataset.num_classes is {cfg['num_classes']} but the {cfg['name']} files under {cfg['root']} hold "
            f"{len(train_files.classes)} classes (subset: {cfg.get('num_classes_subset')})"
        )
    train_transform, eval_transform = build_transforms(cfg, draft=bool(cfg.get("decode_draft", True)))
    common = dict(mean=list(cfg["mean"]), std=list(cfg["std"]))
    return DataBundle(
        train=FileLoader(train_files, options, train=True, transform=train_transform, **common),
        val=FileLoader(val_files, options, train=False, transform=eval_transform, **common),
        num_classes=len(train_files.classes),
        train_size=len(train_files),
        val_size=len(val_files),
        classes=train_files.classes,
    )
