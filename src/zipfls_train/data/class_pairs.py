"""CS-KD's partners: for each training sample, another sample of the same class.

CS-KD's loss pairs each sample with "another sample of the same class"; the paper's released sampler
never pairs a sample with itself (alinlab's original CS-KD sampler may, with probability 1 / class size: 2% of the
pairs on INAT21's train_mini). A class holding a single sample pairs it with itself, as nothing else
exists. Everything stays on the tensors' device (no host sync when the data lives on the GPU).
"""

from __future__ import annotations

import torch
from torch import Tensor


class SameClassPartners:
    """Uniform draw of a partner among the other samples of each sample's class."""

    def __init__(self, targets: Tensor, num_classes: int) -> None:
        self.by_class = torch.argsort(targets, stable=True)  # dataset indices, grouped by class
        self.count = torch.bincount(targets, minlength=num_classes)
        self.start = torch.cumsum(self.count, 0) - self.count  # where each class begins in by_class
        self.position = torch.empty_like(self.by_class)  # where each dataset index sits in by_class
        self.position[self.by_class] = torch.arange(len(targets), device=targets.device)

    def draw(self, indices: Tensor, targets: Tensor, uniform: Tensor) -> Tensor:
        """Partners of the samples ``indices`` (classes ``targets``), from one U[0, 1) draw each."""
        count = self.count[targets]
        own = self.position[indices] - self.start[targets]  # the sample's own slot in its class
        others = (count - 1).clamp_min(1)
        offset = (uniform * others).long().clamp_max_(others - 1)  # a slot among the other count - 1
        offset = offset + ((offset >= own) & (count > 1)).long()  # step over the sample's own slot
        return self.by_class[self.start[targets] + offset]
