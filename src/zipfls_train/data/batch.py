"""The batch that travels from a loader to a method: already on the training device."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Batch:
    """inputs:   N x 3 x H x W, float, normalised, on the device, channels_last when
                 ``trainer.channels_last`` (the default) asks for it, on every device.
    targets:     N, int64 class indices.
    indices:     N, int64 dataset indices (PS-KD's per-sample memory), always present.
    pair_inputs: N x 3 x H x W, another image of the same class per sample (CS-KD), when asked.
    second_view: N x 3 x H x W, a second augmentation of the same images (DDGSD), when asked.
    """

    inputs: Tensor
    targets: Tensor
    indices: Tensor
    pair_inputs: Tensor | None = None
    second_view: Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.targets.shape[0])
