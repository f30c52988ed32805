"""Loader for datasets that fit in memory (CIFAR-100, TinyImageNet at 32 px): the whole set is one
uint8 tensor on the training device; batches are indexed and augmented there (no workers).

Order and augmentation are pure functions of (seed, epoch): at the start of an epoch the sample
order and every augmentation parameter of the epoch are drawn at once (a few dozen kernels per
epoch rather than per step), and each step slices them. So a run resumed at any step sees exactly
the batches it would have seen (no sampler state to save), and under DDP each rank takes its slice
of the same global batch, with the same parameters a single process would use.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from .augment import Normalizer, ViewParams, apply_params, draw_params, resize_uint8, uniform
from .batch import Batch
from .bundle import LoaderOptions
from .class_pairs import SameClassPartners
from .images import ImageTensors
from .seeds import mix_seed


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
            self._partners = SameClassPartners(data.targets.to(storage), len(data.classes))

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
        generator = torch.Generator().manual_seed(mix_seed(self.options.seed, epoch))
        return torch.randperm(self.num_samples, generator=generator).to(self.images.device, non_blocking=True)

    # --- batches ---------------------------------------------------------------------------
    def _prepare(self, pixels: Tensor) -> Tensor:
        out = self.normalize(pixels).to(self.options.device, non_blocking=True)
        # Augmentation may leave any memory layout; pin the one the model runs in.
        layout = torch.channels_last if self.options.channels_last else torch.contiguous_format
        return out.contiguous(memory_format=layout)

    def _view(self, index: Tensor, params: ViewParams | None) -> Tensor:
        pixels = self.images[index]
        if params is None:
            return self._prepare(pixels)
        return self._prepare(apply_params(pixels, self.image_size, params))

    def _epoch_params(self, epoch: int, slots: int) -> dict[str, ViewParams | Tensor]:
        """Every random parameter of an epoch's ``slots`` global sample slots, drawn at once."""
        generator = torch.Generator(device=self.images.device)
        generator.manual_seed(mix_seed(self.options.seed, epoch, 1))
        device, (height, width) = self.images.device, self.images.shape[-2:]

        def view() -> ViewParams:
            return draw_params(self.augment, slots, height, width, self.image_size, generator, device)

        params: dict[str, ViewParams | Tensor] = {"view": view()}
        if self.options.two_views:
            params["second_view"] = view()
        if self.options.pairs:
            params["pair_uniform"] = uniform(generator, device, slots)
            params["pair_view"] = view()
        return params

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        indices = self._indices(epoch)
        if not self.train:
            for step in range(start_step, len(self)):
                index = indices[step * self.batch_size : (step + 1) * self.batch_size]
                yield Batch(self._view(index, None), self.targets[index].to(self.options.device), index.to(self.options.device))
            return
        accumulate = self.options.accumulate_steps
        params = self._epoch_params(epoch, len(self) // accumulate * self.global_batch)
        for micro_step in range(start_step, len(self)):
            # Parameters belong to global sample slots, so neither the number of processes nor
            # gradient accumulation changes how an image is augmented.
            step, part = divmod(micro_step, accumulate)
            mine = self._my_rows(part)
            rows = slice(step * self.global_batch + mine.start, step * self.global_batch + mine.stop)
            index = indices[rows]
            targets = self.targets[index]
            batch = Batch(
                inputs=self._view(index, params["view"].rows(rows)),
                targets=targets.to(self.options.device, non_blocking=True),
                indices=index.to(self.options.device, non_blocking=True),
            )
            if self.options.two_views:
                batch.second_view = self._view(index, params["second_view"].rows(rows))
            if self.options.pairs:
                pair = self._partners.draw(index, targets, params["pair_uniform"][rows])
                batch.pair_inputs = self._view(pair, params["pair_view"].rows(rows))
            yield batch
