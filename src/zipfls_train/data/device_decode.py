"""``dataset.decode=device``: the file loader's workers only read each JPEG's bytes and draw its crop
(:func:`read_device_job`); the training device decodes the batch (nvjpeg through torchvision's
``decode_jpeg`` on CUDA) and crops, resizes and flips there (:func:`decode_on_device`). For GPU hosts
with few CPU cores per GPU (3.8x the training throughput of the CPU-decode path in the benchmark).

Files nvjpeg may not take (PNG, CMYK or progressive JPEG, a truncated file) are transformed by the
worker on the CPU instead, and a batch the device fails to decode is decoded image by image, on the
device or else with PIL; a file neither can decode raises :class:`DatasetError` naming it.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .transforms import EvalTransform, TrainTransform, read_for_device_decode, transform_region


@dataclass
class DeviceJob:
    """One image for device decoding: its JPEG bytes and crop plan, or (files nvjpeg may not take)
    pixels already transformed by the worker."""

    path: str
    data: np.ndarray | None
    box: tuple[float, float, float, float]
    flip: bool
    pixels: np.ndarray | None


def read_device_job(path: str, transform: TrainTransform | EvalTransform, rng: random.Random | None) -> DeviceJob:
    """What a worker does for one image under decode=device (no decoding, but for files nvjpeg may not take)."""
    data, plan, pixels = read_for_device_decode(path, transform, rng)
    return DeviceJob(path, data, plan[0], plan[1], pixels)


def stack_device_jobs(jobs: Sequence[DeviceJob]) -> dict[str, Any]:
    """A batch's jobs as one collated item: all the JPEG bytes in one buffer and the pixels of the
    images decoded on the CPU in another, with the offsets, paths and crop plans. One shared-memory
    segment per buffer and batch, not one per image: each segment holds a file descriptor in the
    worker until the main process has taken it, and with a tensor per image a batch of 256 such
    files nears a common limit of 1,024 open files, where DataLoader hangs rather than fails."""
    sizes = [0 if job.data is None else len(job.data) for job in jobs]
    data = np.concatenate([job.data for job in jobs if job.data is not None] or [np.empty(0, np.uint8)])
    on_cpu = [job.pixels for job in jobs if job.pixels is not None]
    return {
        "paths": [job.path for job in jobs],
        "bytes": torch.from_numpy(data),
        "offsets": np.cumsum([0, *sizes]).tolist(),
        "boxes": [job.box for job in jobs],
        "flips": [job.flip for job in jobs],
        "cpu_decoded": [job.pixels is not None for job in jobs],
        "cpu_pixels": torch.from_numpy(np.stack(on_cpu)) if on_cpu else None,
    }


def _pixels_per_image(job: dict[str, Any]) -> list[Tensor | None]:
    """The CPU-decoded images of a batch (uint8 size x size x 3), by position; None for JPEG bytes."""
    stacked = iter(job["cpu_pixels"] if job["cpu_pixels"] is not None else ())
    return [next(stacked) if on_cpu else None for on_cpu in job["cpu_decoded"]]


def decode_on_device(job: dict[str, Any], device: torch.device, transform: TrainTransform | EvalTransform) -> Tensor:
    """Batched JPEG decode on the device (nvjpeg on CUDA), then per image: crop the planned
    region and resize it with torchvision's tensor ``Resize`` (antialiased bilinear), flip.
    Float N x 3 x S x S in 0..255."""
    size = int(transform.size)
    count = len(job["paths"])
    offsets = job["offsets"]
    job["pixels"] = _pixels_per_image(job)
    job["data"] = [job["bytes"][offsets[i] : offsets[i + 1]] if job["pixels"][i] is None else None for i in range(count)]
    out = torch.empty((count, 3, size, size), dtype=torch.float32, device=device)
    jpegs = [i for i in range(count) if job["data"][i] is not None]
    decoded: dict[int, Tensor] = {}
    if jpegs:
        try:
            decoded = dict(zip(jpegs, _decode_jpeg([job["data"][i] for i in jpegs], device)))
        except RuntimeError:
            decoded = _decode_one_by_one(job, jpegs, device, transform)
    for i in range(count):
        if i not in decoded:
            pixels = job["pixels"][i]
            out[i] = pixels.to(device, non_blocking=True).permute(2, 0, 1)
            continue
        resized = _crop_resize(decoded[i], job["boxes"][i], size, transform.crops_first)
        out[i] = resized.flip(-1) if job["flips"][i] else resized
    return out.clamp_(0, 255)


def _decode_one_by_one(job: dict[str, Any], jpegs: list[int], device: torch.device,
                       transform: TrainTransform | EvalTransform) -> dict[int, Tensor]:
    """After a failed batched decode: each image alone on the device, else on the CPU with PIL;
    a file neither can decode raises DatasetError naming it."""
    decoded: dict[int, Tensor] = {}
    for i in jpegs:
        try:
            decoded[i] = _decode_jpeg(job["data"][i], device)
        except RuntimeError:
            pixels = transform_region(job["paths"][i], transform, job["boxes"][i], job["flips"][i])
            job["pixels"][i] = torch.from_numpy(pixels.copy())
    return decoded


def _decode_jpeg(data: Tensor | list[Tensor], device: torch.device) -> Tensor | list[Tensor]:
    """torchvision's ``decode_jpeg`` to RGB on ``device`` (nvjpeg on CUDA; one image or a batch)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its image io for TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _crop_resize(image: Tensor, box: tuple[float, float, float, float], size: int, crop_first: bool) -> Tensor:
    """uint8 3 x H x W -> float 3 x size x size of the region ``box`` (source pixels). A training
    crop (``crop_first``: RandomResizedCrop's whole-pixel box) is cropped then resized; an eval box
    (the center crop of the resized image) is the crop of the resized whole image, as Resize +
    CenterCrop compute it, even where the box happens to fall on whole pixels."""
    left, top, right, bottom = box
    if crop_first:
        region = image[:, int(top):int(bottom), int(left):int(right)].unsqueeze(0).float()
        return F.interpolate(region, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    scale_x, scale_y = size / (right - left), size / (bottom - top)
    height, width = image.shape[-2:]
    full = (int(round(height * scale_y)), int(round(width * scale_x)))
    x0, y0 = int(round(left * scale_x)), int(round(top * scale_y))
    resized = F.interpolate(image.unsqueeze(0).float(), size=full, mode="bilinear", antialias=True, align_corners=False)[0]
    return resized[:, y0 : y0 + size, x0 : x0 + size]
