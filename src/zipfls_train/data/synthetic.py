"""``dataset=synthetic``: random tensors already on the device, for benchmarks and smoke runs that
must measure the training step without any data cost (the upper bound a real loader is compared to)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

import torch

from .batch import Batch
from .bundle import DataBundle, LoaderOptions, configured_num_classes
from .class_pairs import SameClassPartners
from .images import DatasetError


class SyntheticLoader:
    """``steps`` batches per epoch, all the same pre-made images (no per-step data work at all), each
    step with its own sample indices (a PS-KD memory row per sample of the epoch, as a real epoch).

    One set of images for the whole run, drawn from the seed alike on every rank, each rank taking
    its own part, as a real loader shards its data: in training a batch of ``batch_size`` per
    process (the ranks' batches together are the global batch), in evaluation ``eval_batch_size``
    images in all, split into contiguous shards, so that every val image is scored exactly once."""

    def __init__(self, options: LoaderOptions, *, image_size: int, num_classes: int, steps: int, train: bool) -> None:
        rank, world = options.rank, options.world_size
        total = options.batch_size * world if train else options.eval_batch_size
        generator = torch.Generator().manual_seed(options.seed)
        inputs = torch.randn(total, 3, image_size, image_size, generator=generator)
        targets = torch.randint(0, num_classes, (total,), generator=generator)
        start, stop = rank * total // world, (rank + 1) * total // world
        self.steps = steps if stop > start else 0  # a val shard can be empty with more ranks than images
        layout = torch.channels_last if options.channels_last else torch.contiguous_format
        self.step_indices = torch.arange(total * max(steps, 1), device=options.device).view(-1, total)[:, start:stop]
        self.batch = Batch(
            inputs=inputs[start:stop].to(options.device).contiguous(memory_format=layout),
            targets=targets[start:stop].to(options.device),
            indices=self.step_indices[0],
        )
        if options.pairs:  # another image of the same class (itself where its class has no other), as CS-KD's loaders give
            partners = SameClassPartners(targets, num_classes).draw(torch.arange(total), targets, torch.rand(total, generator=generator))
            self.batch.pair_inputs = inputs[partners][start:stop].to(options.device).contiguous(memory_format=layout)
        if options.two_views:
            self.batch.second_view = self.batch.inputs.flip(-1)
        self.num_samples = total * steps if train else total  # over all ranks

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        for step in range(start_step, self.steps):
            yield replace(self.batch, indices=self.step_indices[step])


def build_synthetic(cfg: Mapping[str, Any], options: LoaderOptions) -> DataBundle:
    # num_classes_subset as the file datasets read it: the first K classes (the method is built for K).
    size, classes = int(cfg["image_size"]), int(configured_num_classes(cfg))
    steps = cfg["steps_per_epoch"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DatasetError(f"dataset.steps_per_epoch must be an integer >= 1 (batches per synthetic epoch), got {steps!r}")
    train = SyntheticLoader(options, image_size=size, num_classes=classes, steps=steps, train=True)
    val = SyntheticLoader(options, image_size=size, num_classes=classes, steps=1, train=False)
    return DataBundle(train=train, val=val, num_classes=classes, train_size=train.num_samples,
                      val_size=val.num_samples, classes=[str(c) for c in range(classes)])
