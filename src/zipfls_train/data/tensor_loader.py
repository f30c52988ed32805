"""Loader for datasets that fit in memory (CIFAR-100, TinyImageNet at 32 px): the whole set is one
uint8 tensor on the training device; batches are indexed and augmented there (no workers).

Order and augmentation are pure functions of (seed, epoch, step, rank), so a run resumed at any
step sees exactly the batches it would have seen (no sampler state to save).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .augment import augment_train, normalize, resize_uint8
from .batch import Batch
from .images import ImageTensors


@dataclass(frozen=True)
class LoaderOptions:
    """How loaders are built for one process of a run."""

    batch_size: int
    eval_batch_size: int
    device: torch.device
    seed: int
    rank: int = 0
    world_size: int = 1
    pairs: bool = False
    two_views: bool = False
    channels_last: bool = False
    data_device: torch.device | None = None  # where in-memory data lives; None = the training device
    num_workers: int = 4


def _mix(*values: int) -> int:
    """A deterministic 63-bit seed from several integers (splitmix-style)."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value + 0x9E3779B97F4A7C15 + (state << 6) + (state >> 2))) & 0x7FFFFFFFFFFFFFFF
    return state


class TensorLoader:
    """Iterate ``loader.epoch(epoch, start_step)`` to get :class:`Batch` objects on the device."""

    def __init__(
        self,
        data: ImageTensors,
        options: LoaderOptions,
        *,
        train: bool,
        augment: str,
        image_size: int,
        mean: list[float],
        std: list[float],
    ) -> None:
        self.options = options
        self.train = train
        self.augment = augment
        self.image_size = image_size
        self.mean, self.std = list(mean), list(std)
        storage = options.data_device or options.device
        # Test images are resized once, at load time (test transform "resize to image_size").
        images = data.images if train else resize_uint8(data.images, image_size)
        self.images = images.to(storage)
        self.targets = data.targets.to(storage)
        self.num_samples = len(data)
        self.batch_size = options.batch_size if train else options.eval_batch_size
        if train and options.pairs:
            self._prepare_class_index(data.targets.to(storage), len(data.classes))

    # --- sharding --------------------------------------------------------------------------
    def _shard_size(self) -> int:
        world, rank = self.options.world_size, self.options.rank
        if self.train:
            return self.num_samples // world
        # Contiguous, unpadded shards for evaluation: every sample is counted exactly once.
        return (rank + 1) * self.num_samples // world - rank * self.num_samples // world

    def __len__(self) -> int:
        shard = self._shard_size()
        if self.train:
            return shard // self.batch_size
        return (shard + self.batch_size - 1) // self.batch_size

    def _indices(self, epoch: int) -> Tensor:
        world, rank = self.options.world_size, self.options.rank
        if not self.train:
            start = rank * self.num_samples // world
            return torch.arange(start, start + self._shard_size(), device=self.images.device)
        generator = torch.Generator().manual_seed(_mix(self.options.seed, epoch))
        order = torch.randperm(self.num_samples, generator=generator)
        usable = (self.num_samples // world) * world
        return order[:usable][rank::world].to(self.images.device, non_blocking=True)

    # --- pairs (CS-KD) ---------------------------------------------------------------------
    def _prepare_class_index(self, targets: Tensor, num_classes: int) -> None:
        self._by_class = torch.argsort(targets, stable=True)
        counts = torch.bincount(targets, minlength=num_classes)
        self._class_count = counts
        self._class_start = torch.cumsum(counts, 0) - counts

    def _pair_indices(self, targets: Tensor, generator: torch.Generator) -> Tensor:
        """Another sample of the same class for each target, uniformly (it may be the sample itself,
        as in CS-KD's PairBatchSampler)."""
        u = torch.rand(targets.shape, generator=generator, device=targets.device)
        offset = (u * self._class_count[targets]).long().clamp_max_(self._class_count[targets] - 1)
        return self._by_class[self._class_start[targets] + offset]

    # --- batches ---------------------------------------------------------------------------
    def _prepare(self, pixels: Tensor) -> Tensor:
        out = normalize(pixels, self.mean, self.std).to(self.options.device, non_blocking=True)
        # Augmentation may leave any memory layout; pin the one the model runs in.
        layout = torch.channels_last if self.options.channels_last else torch.contiguous_format
        return out.contiguous(memory_format=layout)

    def _view(self, index: Tensor, generator: torch.Generator | None) -> Tensor:
        pixels = self.images[index]
        if generator is None:
            return self._prepare(pixels)
        return self._prepare(augment_train(pixels, self.augment, self.image_size, generator))

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        indices = self._indices(epoch)
        for step in range(start_step, len(self)):
            index = indices[step * self.batch_size : (step + 1) * self.batch_size]
            targets = self.targets[index]
            if not self.train:
                yield Batch(self._view(index, None), targets.to(self.options.device), index.to(self.options.device))
                continue
            generator = torch.Generator(device=self.images.device)
            generator.manual_seed(_mix(self.options.seed, epoch, step, self.options.rank))
            batch = Batch(
                inputs=self._view(index, generator),
                targets=targets.to(self.options.device, non_blocking=True),
                indices=index.to(self.options.device, non_blocking=True),
            )
            if self.options.two_views:
                batch.second_view = self._view(index, generator)
            if self.options.pairs:
                pair = self._pair_indices(targets, generator)
                batch.pair_inputs = self._view(pair, generator)
                batch.pair_targets = self.targets[pair].to(self.options.device, non_blocking=True)
            yield batch
