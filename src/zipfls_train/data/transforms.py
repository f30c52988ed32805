"""Per-image transforms of the 224 px recipe (paper sec. 4.1: 224 px inputs, random cropping and
flipping), run in DataLoader workers.

Each transform opens a file, decodes it with PIL and returns an ``H x W x 3`` uint8 array of the
final size (normalisation happens later, on the training device):

* train: ``RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3))`` + horizontal flip (p = 0.5),
  with torchvision's sampling of the crop box;
* test:  ``Resize(round(size * 256 / 224))`` of the shorter side + ``CenterCrop(size)``
  (256 / 224 at the recipe's 224 px), with torchvision's rounding of sizes and offsets.

Reduced-size JPEG decoding (``Image.draft``): libjpeg can decode at 1/2, 1/4 or 1/8 scale in the DCT
domain, which is much cheaper than decoding at full size and then shrinking. We ask for the
smallest scale at which the region we need still has at least as many pixels as the output on each
side (the crop box for training; the resized image for testing), so the final antialiased resize
still *shrinks* (or keeps) the image and the result differs from full-size decoding only by the
(small) difference between DCT-domain and bilinear downscaling, never by upsampling. At the
recipe's 224 px this rarely triggers on ImageNet (typical images are ~500 x 375: a crop must be at
least 448 px on both sides), but it does for large photographs and for reduced ``image_size`` runs.
Pass ``draft=False`` to disable it.

Randomness comes from an explicit ``random.Random`` so an image's augmentation is a pure function of
the seed the loader derives from (run seed, epoch, sample index, view): independent of the worker
that happens to decode it, and exactly reproducible on resume.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from PIL import Image

from .images import DatasetError, unreadable_image

# Errors PIL raises on unreadable, truncated or malformed files.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def eval_resize_size(image_size: int) -> int:
    """Shorter side before the center crop: 256 for 224 (the recipe's ratio)."""
    return int(round(image_size * 256 / 224))


def random_resized_crop_box(
    width: int,
    height: int,
    rng: random.Random,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(left, top, w, h) as torchvision's ``RandomResizedCrop.get_params`` draws it: up to 10 tries of
    (area, log-ratio), else the central crop with the ratio clamped into range."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _open(path: str) -> Image.Image:
    try:
        return Image.open(path)
    except DECODE_ERRORS as error:
        raise unreadable_image(path, error) from error


def _draft(image: Image.Image, reduction: float) -> float:
    """Ask libjpeg for a reduced decode of at most ``reduction`` (>= 1) on each side; returns the
    scale actually applied (1, 2, 4 or 8; 1 for non-JPEG files)."""
    if reduction < 2:
        return 1.0
    width, height = image.size
    request = (max(1, math.ceil(width / reduction)), max(1, math.ceil(height / reduction)))
    result = image.draft("RGB", request)
    if result is None:  # not a JPEG (e.g. the PNG files named .JPEG in ImageNet's train set)
        return 1.0
    return width / result[1][2]


# A crop plan: the source region (left, top, right, bottom), in source pixels (fractional allowed), that
# becomes the size x size output, and whether to mirror it.
CropPlan = tuple[tuple[float, float, float, float], bool]


@dataclass(frozen=True)
class TrainTransform:
    """RandomResizedCrop(size) + horizontal flip, on a file; returns size x size x 3 uint8."""

    size: int
    draft: bool = True
    # torchvision's RandomResizedCrop crops (an integer box) and then resizes the crop: the filter
    # never reads past the box.
    crops_first: ClassVar[bool] = True

    def plan(self, width: int, height: int, rng: random.Random | None) -> CropPlan:
        assert rng is not None, "the train transform needs a seeded random.Random"
        left, top, w, h = random_resized_crop_box(width, height, rng)
        return (left, top, left + w, top + h), rng.random() < 0.5

    def __call__(self, path: str, rng: random.Random | None) -> np.ndarray:
        return apply_plan(path, self, rng)


@dataclass(frozen=True)
class EvalTransform:
    """Resize the shorter side to ``resize_size`` + center crop ``size``; returns size x size x 3 uint8.

    Without ``draft``, exactly torchvision's ``Resize`` + ``CenterCrop`` on the PIL image: the whole
    image resized, then cropped (what evaluation uses). :meth:`plan` gives the source region the crop
    keeps, for the paths that resize that region alone (reduced-size decoding, decoding on the
    device): PIL's resize of a region differs from the crop of the whole resize by 1/255 on some
    pixels."""

    size: int
    resize_size: int
    draft: bool = True
    # Resize + CenterCrop resizes the whole image, then crops: the crop's border pixels see their
    # neighbours. The region paths (plan's callers) resize the region with a box, whose filter reads
    # past it as the whole resize does, to 1/255 of its pixels.
    crops_first: ClassVar[bool] = False

    def resized(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(resized width, height, crop left, crop top): torchvision's Resize(int), the shorter side
        becoming resize_size and the longer truncated, and its CenterCrop offsets."""
        if width <= height:
            new_w, new_h = self.resize_size, int(self.resize_size * height / width)
        else:
            new_w, new_h = int(self.resize_size * width / height), self.resize_size
        if new_w < self.size or new_h < self.size:
            raise DatasetError(f"test resize {self.resize_size} is smaller than the crop {self.size}")
        return new_w, new_h, int(round((new_w - self.size) / 2.0)), int(round((new_h - self.size) / 2.0))

    def plan(self, width: int, height: int, rng: random.Random | None = None) -> CropPlan:
        new_w, new_h, crop_left, crop_top = self.resized(width, height)
        # The crop, in resized pixels, mapped back to source pixels.
        sx, sy = width / new_w, height / new_h
        return (crop_left * sx, crop_top * sy, (crop_left + self.size) * sx, (crop_top + self.size) * sy), False

    def __call__(self, path: str, rng: random.Random | None = None) -> np.ndarray:
        if self.draft:
            return apply_plan(path, self, rng)
        with _open(path) as image:
            new_w, new_h, left, top = self.resized(*image.size)
            try:
                rgb = image.convert("RGB")  # also decodes; grayscale, CMYK and palette images become RGB
                resized = rgb.resize((new_w, new_h), Image.Resampling.BILINEAR)
                return np.asarray(resized.crop((left, top, left + self.size, top + self.size)))
            except DECODE_ERRORS as error:
                raise unreadable_image(path, error) from error


def apply_plan(path: str, transform: TrainTransform | EvalTransform, rng: random.Random | None) -> np.ndarray:
    """Decode ``path`` (at reduced size when ``transform.draft``) and resize its planned region to the output."""
    size = transform.size
    with _open(path) as image:
        (left, top, right, bottom), flip = transform.plan(*image.size, rng)
        # The region may shrink by up to min(w, h) / size before it is smaller than the output.
        scale = _draft(image, min(right - left, bottom - top) / size) if transform.draft else 1.0
        box = (left / scale, top / scale, right / scale, bottom / scale)
        return _resize_region(image, path, size, box, flip, crop_first=transform.crops_first and scale == 1.0)


def _resize_region(image: Image.Image, path: str, size: int, box: tuple[float, float, float, float], flip: bool,
                   crop_first: bool = False) -> np.ndarray:  # fmt: skip
    try:
        rgb = image.convert("RGB")  # also decodes; grayscale, CMYK and palette images become RGB
        if crop_first:
            out = rgb.crop(tuple(round(v) for v in box)).resize((size, size), Image.Resampling.BILINEAR)
        else:
            out = rgb.resize((size, size), Image.Resampling.BILINEAR, box=box)
        if flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(out)
    except DECODE_ERRORS as error:
        raise unreadable_image(path, error) from error


def transform_region(path: str, transform: TrainTransform | EvalTransform, box: tuple[float, float, float, float], flip: bool) -> np.ndarray:
    """A planned crop on the CPU: decode ``path`` with PIL, resize ``box`` to the transform's size,
    mirror if ``flip`` (for images the device cannot decode). A file PIL cannot decode raises DatasetError."""
    with _open(path) as image:
        return _resize_region(image, path, transform.size, box, flip, crop_first=transform.crops_first)


def read_for_device_decode(path: str, transform: TrainTransform | EvalTransform, rng: random.Random | None) -> tuple[np.ndarray | None, CropPlan, np.ndarray | None]:
    """For decoding on the training device (nvjpeg): the file's bytes and its crop plan. Files that
    nvjpeg may not take (not a baseline RGB/grayscale JPEG: PNG, CMYK, progressive, or RGB stored
    without YCbCr conversion, which only an Adobe marker says) are transformed here on the CPU
    instead: returns (bytes or None, plan, pixels or None)."""
    with _open(path) as image:
        plan = transform.plan(*image.size, rng)
        if not _plain_jpeg(image):
            return None, plan, _resize_region(image, path, transform.size, *plan, crop_first=transform.crops_first)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise unreadable_image(path, error) from error
    if not _has_end_marker(data):
        # nvjpeg decodes a truncated file without an error (grey where data is missing); PIL raises.
        return None, plan, transform_region(path, transform, *plan)
    return data, plan, None


def _plain_jpeg(image: Image.Image) -> bool:
    """A baseline JPEG in YCbCr or grayscale. Adobe's APP14 transform 0 on 3 channels means the
    samples are RGB as stored (Pillow's keep_rgb=True writes such files): libjpeg and PIL honour
    the marker; whether nvjpeg does is not verified, so those take the CPU path."""
    rgb_stored = image.info.get("adobe_transform") == 0 and image.mode == "RGB"
    return image.format == "JPEG" and image.mode in ("RGB", "L") and not image.info.get("progressive") and not rgb_stored


def _has_end_marker(data: np.ndarray, tail: int = 1024) -> bool:
    """A complete JPEG ends with the EOI marker FF D9 (some files carry a few bytes after it)."""
    end = data[-tail:]
    return bool(np.any((end[:-1] == 0xFF) & (end[1:] == 0xD9)))

