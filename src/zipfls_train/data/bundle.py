"""What every dataset builder takes and returns: :class:`LoaderOptions` in, a :class:`DataBundle` of
two :class:`Loader` objects out (``builders.build_in_memory`` and ``file_bundle.build_file_bundle``
make them; a new dataset's builder returns one through the latter)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .batch import Batch


def configured_num_classes(dataset: Any) -> Any:
    """The class count a run's dataset config asks for (``dataset.num_classes_subset`` where set,
    else ``dataset.num_classes``; None where a config, an old checkpoint's say, has neither): what
    a method is built for before the data is read. The data read must have as many
    (``DataBundle.num_classes``, checked at set-up)."""
    return dataset.get("num_classes_subset") or dataset.get("num_classes")


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


class Loader(Protocol):
    def __len__(self) -> int: ...

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]: ...


@dataclass
class DataBundle:
    train: Loader
    val: Loader
    num_classes: int
    train_size: int
    val_size: int
    classes: list[str]
    # Config values resolved from what was found (dataset.<key>: value), e.g. TinyImageNet's format.
    resolved: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """What tells this data from other data, wherever it is stored: a run folder's name leaves out
        dataset.root (a copy elsewhere is the same data), so a resumed or rerun run compares this."""
        return {
            "num_classes": self.num_classes,
            # os.fsencode: a class folder's name may not be UTF-8 (its bytes come back as they are).
            "classes_sha1": hashlib.sha1(os.fsencode("\n".join(map(str, self.classes)))).hexdigest()[:12],
            "train_size": self.train_size,
            "val_size": self.val_size,
        }
