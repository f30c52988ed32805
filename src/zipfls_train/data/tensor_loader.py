"""Loader for datasets that fit in memory (CIFAR-100, TinyImageNet at 32 px): the whole set is one
uint8 tensor on the training device; batches are indexed and augmented there (no workers).

Order and augmentation are pure functions of (seed, epoch, step): a run resumed at any step sees
exactly the batches it would have seen (no sampler state to save), and under DDP each rank takes its
slice of the same global batch, drawn with the same random numbers as a single process would use.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .augment import Normalizer, RandomDraws, augment_train, resize_uint8
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
    accumulate_steps: int = 1  # micro-batches per optimiser step (batch_size is one micro-batch)


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
        self.normalize = Normalizer(mean, std)
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
    @property
    def global_batch(self) -> int:
        """Images of one optimiser step: per-process batch x processes x accumulation micro-steps."""
        return self.batch_size * self.options.world_size * self.options.accumulate_steps

    def _my_rows(self, micro_step: int) -> slice:
        """This process's rows of the global batch at a micro-step (rank-major within a micro-step)."""
        part = micro_step * self.options.world_size + self.options.rank
        return slice(part * self.batch_size, (part + 1) * self.batch_size)

    def _val_shard(self) -> tuple[int, int]:
        # Contiguous, unpadded shards for evaluation: every sample is counted exactly once.
        world, rank = self.options.world_size, self.options.rank
        return rank * self.num_samples // world, (rank + 1) * self.num_samples // world

    def __len__(self) -> int:
        if self.train:  # micro-batches of this process; the last incomplete global batch is dropped
            return self.num_samples // self.global_batch * self.options.accumulate_steps
        start, stop = self._val_shard()
        return (stop - start + self.batch_size - 1) // self.batch_size

    def _indices(self, epoch: int) -> Tensor:
        if not self.train:
            return torch.arange(*self._val_shard(), device=self.images.device)
        generator = torch.Generator().manual_seed(_mix(self.options.seed, epoch))
        return torch.randperm(self.num_samples, generator=generator).to(self.images.device, non_blocking=True)

    # --- pairs (CS-KD) ---------------------------------------------------------------------
    def _prepare_class_index(self, targets: Tensor, num_classes: int) -> None:
        self._by_class = torch.argsort(targets, stable=True)
        counts = torch.bincount(targets, minlength=num_classes)
        self._class_count = counts
        self._class_start = torch.cumsum(counts, 0) - counts

    def _pair_indices(self, targets: Tensor, draws: RandomDraws) -> Tensor:
        """Another sample of the same class for each target, uniformly (it may be the sample itself,
        as in CS-KD's PairBatchSampler)."""
        u = draws.uniform(targets.shape[0], device=targets.device)
        offset = (u * self._class_count[targets]).long().clamp_max_(self._class_count[targets] - 1)
        return self._by_class[self._class_start[targets] + offset]

    # --- batches ---------------------------------------------------------------------------
    def _prepare(self, pixels: Tensor) -> Tensor:
        out = self.normalize(pixels).to(self.options.device, non_blocking=True)
        # Augmentation may leave any memory layout; pin the one the model runs in.
        layout = torch.channels_last if self.options.channels_last else torch.contiguous_format
        return out.contiguous(memory_format=layout)

    def _view(self, index: Tensor, draws: RandomDraws | None) -> Tensor:
        pixels = self.images[index]
        if draws is None:
            return self._prepare(pixels)
        return self._prepare(augment_train(pixels, self.augment, self.image_size, draws))

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        indices = self._indices(epoch)
        if not self.train:
            for step in range(start_step, len(self)):
                index = indices[step * self.batch_size : (step + 1) * self.batch_size]
                yield Batch(self._view(index, None), self.targets[index].to(self.options.device), index.to(self.options.device))
            return
        for micro_step in range(start_step, len(self)):
            # Draws are made for the whole optimiser step and sliced, so neither the number of
            # processes nor gradient accumulation changes how an image is augmented.
            step, part = divmod(micro_step, self.options.accumulate_steps)
            mine = self._my_rows(part)
            index = indices[step * self.global_batch : (step + 1) * self.global_batch][mine]
            targets = self.targets[index]
            generator = torch.Generator(device=self.images.device)
            generator.manual_seed(_mix(self.options.seed, epoch, step))
            draws = RandomDraws(generator, total=self.global_batch, rows=mine)
            batch = Batch(
                inputs=self._view(index, draws),
                targets=targets.to(self.options.device, non_blocking=True),
                indices=index.to(self.options.device, non_blocking=True),
            )
            if self.options.two_views:
                batch.second_view = self._view(index, draws)
            if self.options.pairs:
                pair = self._pair_indices(targets, draws)
                batch.pair_inputs = self._view(pair, draws)
                batch.pair_targets = self.targets[pair].to(self.options.device, non_blocking=True)
            yield batch
