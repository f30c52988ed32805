"""Batched augmentation of uint8 image tensors on their own device (GPU or CPU).

Small-resolution datasets live in memory as uint8; every batch is augmented here in a handful of
kernels, with no DataLoader workers and no host round trip. The random parameters of an
augmentation (crop offsets or boxes, flips: :class:`ViewParams`) are drawn by :func:`draw_params`
and applied by :func:`apply_params`, so a loader can draw a whole epoch's parameters in one go (a
few dozen kernels per epoch instead of per step: at the paper's batch of 128 a GPU step is bound by
kernel launches) and slice them per step. Randomness comes from an explicit ``torch.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# dataset.train_augment of the in-memory datasets (data/builders.py checks it before any file is
# read; the file datasets have their own: file_bundle.FILE_TRAIN_AUGMENTS).
# Each with a horizontal flip but none (no augmentation at all, as a file dataset's none); flip: only it.
IN_MEMORY_TRAIN_AUGMENTS = ("crop_pad", "random_resized_crop", "flip", "none")


def uniform(generator: torch.Generator, device: torch.device, *shape: int) -> Tensor:
    """U[0, 1) draws of ``shape`` from ``generator`` (on ``device``, the generator's)."""
    return torch.rand(shape, generator=generator, device=device)


CROP_PADDING = 4  # RandomCrop(32, padding=4), the CIFAR recipe


def random_crop_offsets(n: int, padded_size: int, size: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """(row, column) offsets, N x 2 long, uniform in [0, padded_size - size]."""
    max_offset = padded_size - size
    return (uniform(generator, device, n, 2) * (max_offset + 1)).long().clamp_(max=max_offset)


def random_crop_with_padding(images: Tensor, size: int, padding: int, generator: torch.Generator) -> Tensor:
    """torchvision RandomCrop(size, padding) with zero padding, one offset per image."""
    offsets = random_crop_offsets(images.shape[0], images.shape[-1] + 2 * padding, size, generator, images.device)
    return crop_with_padding(images, size, padding, offsets)


def crop_with_padding(images: Tensor, size: int, padding: int, offsets: Tensor) -> Tensor:
    """Zero-pad by ``padding`` and crop size x size at each image's (row, column) ``offsets``."""
    n = images.shape[0]
    padded = F.pad(images, (padding, padding, padding, padding))
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
    generator: torch.Generator,
    device: torch.device,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> Tensor:
    """Boxes (x1, y1, x2, y2) drawn as torchvision's RandomResizedCrop draws them: up to ``attempts``
    (area, log-ratio) tries per image, the first that fits wins, else the central crop of clamped ratio.
    Vectorised over images and attempts."""
    area = height * width
    target_area = area * (scale[0] + (scale[1] - scale[0]) * uniform(generator, device, n, attempts))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * uniform(generator, device, n, attempts))
    w = torch.sqrt(target_area * aspect).round()
    h = torch.sqrt(target_area / aspect).round()
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    # First fitting attempt per image (argmax of a boolean picks the first True).
    first = torch.argmax(fits.int(), dim=1, keepdim=True)
    any_fit = fits.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    u = uniform(generator, device, n, 2)
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


def resize_weights(starts: Tensor, lengths: Tensor, in_size: int, out_size: int) -> Tensor:
    """Per span, the out_size x in_size matrix that resizes the span [start, start + length) of an
    in_size axis to out_size samples exactly as torch's antialiased bilinear interpolation
    (``F.interpolate(..., antialias=True)``, torchvision's ``Resize`` on tensors) resizes that span
    once cropped: sample i is centred at ``start + scale * (i + 0.5)`` (scale = length / out_size),
    source pixels are weighted by the triangle ``1 - |d|``, d their distance in units of
    ``max(scale, 1)`` (a wider triangle when shrinking: the antialiasing), zero outside the span, then
    normalised. ``starts``, ``lengths``: float tensors of one shape S -> S x out_size x in_size."""
    scale = lengths / out_size
    stretch = scale.clamp(min=1.0)
    centres = starts[..., None] + scale[..., None] * (torch.arange(out_size, device=starts.device) + 0.5)
    pixels = torch.arange(in_size, device=starts.device, dtype=starts.dtype) + 0.5  # pixel centres
    weights = (1.0 - ((pixels - centres[..., None]) / stretch[..., None, None]).abs()).clamp_(min=0.0)
    inside = (pixels >= starts[..., None, None]) & (pixels < (starts + lengths)[..., None, None])
    weights = weights * inside
    return weights / weights.sum(dim=-1, keepdim=True).clamp_(min=1e-12)


_RESIZE_TABLES: dict[tuple[int, int, torch.device], Tensor] = {}


def resize_table(in_size: int, out_size: int, device: torch.device) -> Tensor:
    """``table[length, start]``: :func:`resize_weights` of every integer span of an in_size axis,
    (in_size + 1) x in_size x out_size x in_size float32 (34 MB at 64 -> 32 px, 4 MB at 32 -> 32),
    built once per device, so a batch of crops takes its weights with one gather instead of ~20
    small kernels."""
    key = (in_size, out_size, torch.device(device))
    if key not in _RESIZE_TABLES:
        grid = torch.arange(in_size + 1, device=device, dtype=torch.float32)
        lengths = grid[:, None].expand(-1, in_size).clamp(min=1.0)  # length 0: never drawn
        starts = grid[None, :in_size].expand(in_size + 1, -1)
        _RESIZE_TABLES[key] = resize_weights(starts, lengths, in_size, out_size)
    return _RESIZE_TABLES[key]


def boxes_to_spans(boxes: Tensor) -> Tensor:
    """Boxes (x1, y1, x2, y2; integer pixel edges) -> spans N x 2 x 2 long: [:, 0] = (y1, x1) starts,
    [:, 1] = (height, width) lengths, rows axis first."""
    edges = boxes.round().long()
    starts = edges[:, [1, 0]]
    return torch.stack([starts, edges[:, [3, 2]] - starts], dim=1)


def crop_and_resize(images: Tensor, spans: Tensor, size: int) -> Tensor:
    """Crop every image to its span (:func:`boxes_to_spans`) and resize it to size x size with
    antialiased bilinear interpolation: torchvision's ``resized_crop`` on tensors, to float rounding,
    as one gather and two batched matmuls. images float N x C x H x W."""
    height, width = images.shape[-2:]
    table = resize_table(max(height, width), size, images.device)
    weights = table[spans[:, 1], spans[:, 0]]  # N x 2 (rows, columns) x size x max(H, W)
    rows, columns = weights[:, 0, :, :height], weights[:, 1, :, :width]
    return rows[:, None] @ images @ columns.transpose(1, 2)[:, None]


def random_flips(n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """Which images to mirror (N bool, each with probability 1/2)."""
    return uniform(generator, device, n) < 0.5


def flip_where(images: Tensor, flip: Tensor) -> Tensor:
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


@dataclass(frozen=True)
class ViewParams:
    """The random parameters of one augmented view of N images: ``crop`` is N x 2 long offsets
    (crop_pad), N x 2 x 2 long spans (random_resized_crop: :func:`boxes_to_spans`) or None (none);
    ``flip`` is N bool (None: none, no image mirrored)."""

    kind: str
    crop: Tensor | None
    flip: Tensor | None

    def rows(self, rows: slice) -> ViewParams:
        return ViewParams(self.kind, *(None if part is None else part[rows] for part in (self.crop, self.flip)))


def draw_params(kind: str, n: int, height: int, width: int, size: int, generator: torch.Generator, device: torch.device) -> ViewParams:
    """Parameters of ``kind`` (crop_pad | random_resized_crop | flip, each + horizontal flip; none:
    the image as stored, resized to size) for N images of height x width, to be output at size x size."""
    if kind == "crop_pad":
        crop = random_crop_offsets(n, width + 2 * CROP_PADDING, size, generator, device)
    elif kind == "random_resized_crop":
        crop = boxes_to_spans(random_resized_crop_boxes(n, height, width, generator, device))
    elif kind in ("flip", "none"):
        crop = None
    else:  # a direct caller's (TensorLoader(augment=...)); a run's config was checked in data/builders.py
        raise ValueError(f"augment must be one of {list(IN_MEMORY_TRAIN_AUGMENTS)} (dataset.train_augment of an in-memory dataset), got {kind!r}")
    return ViewParams(kind, crop, None if kind == "none" else random_flips(n, generator, device))


def apply_params(images: Tensor, size: int, params: ViewParams) -> Tensor:
    """uint8 N x 3 x H x W -> float N x 3 x size x size in 0..255: crop/resize, then flip."""
    if params.kind == "crop_pad":
        out = crop_with_padding(images, size, CROP_PADDING, params.crop).float()
    elif params.kind == "random_resized_crop":
        out = crop_and_resize(images.float(), params.crop, size)
    else:
        out = resize_uint8(images, size).float()
    return out if params.flip is None else flip_where(out, params.flip)

