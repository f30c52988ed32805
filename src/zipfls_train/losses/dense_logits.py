"""A classifier applied to every pixel of a feature map, in chunks of samples.

Shared by the reference votes (``zipf.dense_votes``) and the fused kernel (``zipf_fused``), which
then take the arg-max class of every (optionally upsampled) pixel.
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


def classifier_for_map(feature_map: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The classifier in the dtype the dense logits are computed in. Under autocast the parameters
    go in as they are (autocast casts them, reusing the copies it made for the forward pass's
    classifier); outside autocast they are cast to the map's dtype (a no-op for float32)."""
    if torch.is_autocast_enabled(feature_map.device.type) or weight.dtype == feature_map.dtype:
        return weight, bias
    return weight.to(feature_map.dtype), (bias.to(feature_map.dtype) if bias is not None else None)


def pixel_logit_chunks(feature_map: Tensor, weight: Tensor, bias: Tensor | None, pixels_per_sample: int) -> Iterator[tuple[int, Tensor]]:
    """``(first sample, logits m x (H*W) x C)`` for consecutive chunks of the N x D x H x W map, each
    at most :data:`MAX_DENSE_LOGITS` elements once the caller has ``pixels_per_sample`` per sample
    (H*W, or 4 H*W after a x2 upsample). Pixels in row-major (h, w) order."""
    n, d, h, w = feature_map.shape
    num_classes = weight.shape[0]
    per_chunk = max(1, MAX_DENSE_LOGITS // max(1, num_classes * pixels_per_sample))
    for start in range(0, n, per_chunk):
        chunk = feature_map if per_chunk >= n else feature_map[start : start + per_chunk]
        m = chunk.shape[0]
        # (m*H*W) x D rows: a free view of a channels_last map (the GPU default here), one copy of an
        # NCHW chunk; one matmul then classifies every pixel (faster on CPU than a batched W @ F).
        logits = F.linear(chunk.permute(0, 2, 3, 1).reshape(m * h * w, d), weight, bias)
        yield start, logits.view(m, h * w, num_classes)
