"""A classifier applied to every pixel of a feature map, in chunks of samples.

Shared by the reference votes (``zipf.dense_votes``) and the fused kernel (``zipf_fused``), which
take the arg-max class of every (optionally upsampled) pixel.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

# Upper bound on the elements of one chunk of dense logits (rows x classes). Dense classification
# of a 2048 x 7 x 7 map into 10,000 classes at batch 256 would otherwise materialise 125M logits
# (500 MB in float32) only to take their arg-max; chunking over samples bounds that temporary
# without changing the arithmetic. CIFAR-sized problems (64 votes x 100-200 classes x 128) fit in
# one chunk, so they pay no loop overhead.
MAX_DENSE_LOGITS = 1 << 24


def votes_per_sample(feature_map: Tensor, upsample: bool) -> int:
    """Pixels, hence votes, per sample of an N x D x H x W map: H*W, or 4 H*W after a x2 upsample."""
    height, width = feature_map.shape[-2:]
    return height * width * (4 if upsample else 1)


def logits_dtype(features_dtype: torch.dtype) -> torch.dtype:
    """Dense logits are float32 or wider (see :func:`pixel_logits`)."""
    return torch.promote_types(features_dtype, torch.float32)


def pixel_logits(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``rows @ weight.T + bias`` for pixels x D ``rows``, in :func:`logits_dtype`. The classifier is
    rounded to the rows' dtype (as autocast rounds it for the forward pass). bfloat16/float16 rows
    are multiplied as they are, but the logits stay in the float32 they are accumulated in: rounded
    to bfloat16's 8 bits, a pixel's two best classes often come out equal (5% of pixels at 10,000
    classes, random weights; experiments/vote_precision.md), and the arg-max would give every such
    tie to the lower class index. Autocast is off here so that it cannot round them back.
    ``weight`` comes in the rows' dtype and ``bias`` in :func:`logits_dtype` (pixel_logit_chunks
    casts them once for all chunks)."""
    with torch.autocast(rows.device.type, enabled=False):
        if rows.dtype not in (torch.float16, torch.bfloat16):
            return F.linear(rows, weight, bias)
        if rows.is_cuda:
            logits = torch.mm(rows, weight.t(), out_dtype=torch.float32)
        else:  # no mixed-dtype matmul on the CPU; products of two 16-bit floats are exact in float32
            logits = rows.float() @ weight.float().t()
        return logits if bias is None else logits.add_(bias)


def samples_per_chunk(num_classes: int, pixels_per_sample: int) -> int:
    """Samples whose dense logits (pixels x classes each) fit :data:`MAX_DENSE_LOGITS` (at least 1)."""
    return max(1, MAX_DENSE_LOGITS // max(1, num_classes * pixels_per_sample))


def pixel_logit_chunks(feature_map: Tensor, weight: Tensor, bias: Tensor | None, pixels_per_sample: int) -> Iterator[tuple[int, Tensor]]:
    """``(first sample, logits m x (H*W) x C)`` for consecutive chunks of the N x D x H x W map, each
    at most :data:`MAX_DENSE_LOGITS` elements once the caller has ``pixels_per_sample`` per sample
    (H*W, or 4 H*W after a x2 upsample). Pixels in row-major (h, w) order."""
    n, d, h, w = feature_map.shape
    num_classes = weight.shape[0]
    per_chunk = samples_per_chunk(num_classes, pixels_per_sample)
    # The classifier in the dtypes pixel_logits uses, cast once rather than per chunk.
    weight = weight.to(feature_map.dtype)
    bias = None if bias is None else bias.to(logits_dtype(feature_map.dtype))
    for start in range(0, n, per_chunk):
        chunk = feature_map if per_chunk >= n else feature_map[start : start + per_chunk]
        m = chunk.shape[0]
        # (m*H*W) x D rows: a free view of a channels_last map (the GPU default here), one copy of an
        # NCHW chunk; one matmul then classifies every pixel (faster on CPU than a batched W @ F).
        logits = pixel_logits(chunk.permute(0, 2, 3, 1).reshape(m * h * w, d), weight, bias)
        yield start, logits.view(m, h * w, num_classes)


def pixel_argmax(logits: Tensor, height: int, width: int, upsample: bool) -> Tensor:
    """Votes of a chunk of dense logits (m x (H*W) x C, pixels in row-major order): the arg-max class
    of every pixel, after a bilinear x2 upsample (``align_corners=False``) of the C logit maps when
    ``upsample`` -> LongTensor m x (H'*W'). Ties go to the lowest class, as ``argmax``."""
    if not upsample:
        return logits.argmax(dim=2)
    return upsampled_maps(logits, height, width).argmax(dim=1).flatten(1)


def upsampled_maps(logits: Tensor, height: int, width: int) -> Tensor:
    """Dense logits m x (H*W) x C -> the C logit maps after a bilinear x2 upsample
    (``align_corners=False``), m x C x 2H x 2W. Taken as a channels_last m x C x H x W map, so that a
    reduction over classes reads a contiguous dim."""
    maps = logits.view(-1, height, width, logits.shape[-1]).permute(0, 3, 1, 2)
    return F.interpolate(maps, scale_factor=2, mode="bilinear", align_corners=False)


def dense_argmax(feature_map: Tensor, weight: Tensor, bias: Tensor | None, upsample: bool) -> Tensor:
    """Arg-max class of ``weight @ f + bias`` for every pixel ``f`` of ``feature_map`` (N x D x H x W),
    after a bilinear x2 upsample of the map when ``upsample`` -> LongTensor N x (H'*W'), pixels in
    row-major (h, w) order.

    Upsampling is done on the *logits*: classify the H x W pixels, then bilinearly upsample the C
    logit maps. Both steps are linear and bilinear weights sum to 1, so this equals classifying the
    upsampled features (bias included) up to float rounding, with 4x fewer multiply-adds and no
    upsampled D-channel copy of the features.
    """
    _, _, h, w = feature_map.shape
    pixels = votes_per_sample(feature_map, upsample)
    votes = [pixel_argmax(logits, h, w, upsample) for _, logits in pixel_logit_chunks(feature_map, weight, bias, pixels)]
    if not votes:  # an empty batch: no chunk
        return torch.empty(0, pixels, dtype=torch.long, device=feature_map.device)
    return votes[0] if len(votes) == 1 else torch.cat(votes)
