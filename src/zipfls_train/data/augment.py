"""Batched augmentation of uint8 image tensors on their own device (GPU or CPU).

Small-resolution datasets live in memory as uint8; every batch is augmented here in a handful of
kernels, with no DataLoader workers and no host round trip. Randomness comes from
:class:`RandomDraws`: numbers are drawn for the whole *global* batch from a generator seeded by
(seed, epoch, step) and each rank keeps its own rows, so a batch is reproduced exactly on resume and
the augmentation of an image does not depend on how many processes share the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

TRAIN_AUGMENTS = ("crop_pad", "random_resized_crop", "none")


class RandomDraws:
    """Uniform draws for ``total`` samples of which this process keeps ``rows``."""

    def __init__(self, generator: torch.Generator, total: int | None = None, rows: slice | None = None) -> None:
        self.generator = generator
        self.total = total
        self.rows = rows

    def uniform(self, n: int, *trailing: int, device: torch.device) -> Tensor:
        total = self.total if self.total is not None else n
        draws = torch.rand((total, *trailing), generator=self.generator, device=device)
        out = draws[self.rows] if self.rows is not None else draws
        if out.shape[0] != n:
            raise ValueError(f"RandomDraws keeps {out.shape[0]} rows but the batch has {n} images")
        return out


def _as_draws(randomness: RandomDraws | torch.Generator) -> RandomDraws:
    return randomness if isinstance(randomness, RandomDraws) else RandomDraws(randomness)


def random_crop_with_padding(images: Tensor, size: int, padding: int, randomness: RandomDraws | torch.Generator) -> Tensor:
    """torchvision RandomCrop(size, padding) with zero padding, one offset per image."""
    n = images.shape[0]
    padded = F.pad(images, (padding, padding, padding, padding))
    max_offset = padded.shape[-1] - size
    offsets = (_as_draws(randomness).uniform(n, 2, device=images.device) * (max_offset + 1)).long().clamp_(max=max_offset)
    span = torch.arange(size, device=images.device)
    rows = (offsets[:, 0:1] + span)[:, :, None]  # N x size x 1
    cols = (offsets[:, 1:2] + span)[:, None, :]  # N x 1 x size
    batch = torch.arange(n, device=images.device)[:, None, None]
    # Advanced indexing gathers N x size x size x C in one kernel.
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def random_resized_crop_boxes(
    n: int,
    height: int,
    width: int,
    randomness: RandomDraws | torch.Generator,
    device: torch.device,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> Tensor:
    """Boxes (x1, y1, x2, y2) drawn as torchvision's RandomResizedCrop draws them: up to ``attempts``
    (area, log-ratio) tries per image, the first that fits wins, else the central crop of clamped ratio.
    Vectorised over images and attempts."""
    draws = _as_draws(randomness)
    area = height * width
    target_area = area * (scale[0] + (scale[1] - scale[0]) * draws.uniform(n, attempts, device=device))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * draws.uniform(n, attempts, device=device))
    w = torch.sqrt(target_area * aspect).round()
    h = torch.sqrt(target_area / aspect).round()
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    # First fitting attempt per image (argmax of a boolean picks the first True).
    first = torch.argmax(fits.int(), dim=1, keepdim=True)
    any_fit = fits.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    u = draws.uniform(n, 2, device=device)
    x1 = torch.floor(u[:, 0] * (width - w + 1))
    y1 = torch.floor(u[:, 1] * (height - h + 1))
    # Fallback: central crop with the ratio clamped into range (torchvision's behaviour).
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    # Python scalars, not a new device tensor: no host-to-device copy in the step.
    x1 = torch.where(any_fit, x1, float((width - fw) // 2))
    y1 = torch.where(any_fit, y1, float((height - fh) // 2))
    w = torch.where(any_fit, w, float(fw))
    h = torch.where(any_fit, h, float(fh))
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)


def crop_and_resize(images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Crop every image to its box and resize to size x size (bilinear, averaging several samples per
    output pixel when shrinking, like antialiased resizing). images float N x C x H x W."""
    n = images.shape[0]
    rois = torch.cat([torch.arange(n, device=images.device, dtype=boxes.dtype)[:, None], boxes], dim=1)
    # sampling_ratio: enough points per output bin to average the covered source pixels.
    sampling = max(2, int(math.ceil(float(images.shape[-1]) / size)))
    return roi_align(images, rois.to(images.dtype), output_size=size, spatial_scale=1.0, sampling_ratio=sampling, aligned=True)


def random_flip(images: Tensor, randomness: RandomDraws | torch.Generator) -> Tensor:
    flip = _as_draws(randomness).uniform(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


class Normalizer:
    """(x / 255 - mean) / std for uint8 or 0..255 float images, as one fused multiply-add with
    constants made once per device (no host-to-device copy per batch)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = list(mean), list(std)
        self._constants: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __call__(self, images: Tensor) -> Tensor:
        if images.device not in self._constants:
            std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
            mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
            self._constants[images.device] = ((1.0 / std).to(images.device), (-mean / std).to(images.device))
        scale, shift = self._constants[images.device]
        return torch.addcmul(shift, images.float(), scale)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 or 0..255 float -> (x / 255 - mean) / std, float32."""
    return Normalizer(mean, std)(images)


def resize_uint8(images: Tensor, size: int) -> Tensor:
    """Antialiased bilinear resize (torchvision Resize on tensors), kept uint8."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def augment_train(images: Tensor, kind: str, size: int, randomness: RandomDraws | torch.Generator) -> Tensor:
    """uint8 N x 3 x H x W -> float N x 3 x size x size in 0..255, augmented per ``kind`` + flip."""
    randomness = _as_draws(randomness)
    if kind == "crop_pad":
        out = random_crop_with_padding(images, size, padding=4, randomness=randomness).float()
    elif kind == "random_resized_crop":
        boxes = random_resized_crop_boxes(images.shape[0], images.shape[-2], images.shape[-1], randomness, images.device)
        out = crop_and_resize(images.float(), boxes, size)
    elif kind == "none":
        out = resize_uint8(images, size).float()
    else:
        raise ValueError(f"dataset.train_augment must be one of {TRAIN_AUGMENTS}, got {kind!r}")
    return random_flip(out, randomness)
