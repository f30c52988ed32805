"""Zipf's LS (votes, soft label, non-target KL and the cross-entropy) in one GPU kernel.

The reference path in ``zipf.py`` (vote histogram N x C, sort-based ranks, soft labels, masked
log-softmax, dot product, and their backward) is a few dozen small kernels. At the paper's batch of
128 on 32 px images a GPU training step is bound by kernel launches, so those launches, not their
arithmetic, are what Zipf's LS costs over cross-entropy. This module computes the same loss, and the
cross-entropy beside it, with one Triton program per sample, plus one multiply in the backward pass.
Given the classifier's dense logits over a map (:class:`DenseMap`), the kernel also upsamples them
and takes each pixel's arg-max (the votes) itself.

Why it can be one pass over each row: a sample casts only V votes (64 at 32 px, 49 at 224 px), so at
most V classes have a nonzero count and every other class shares one rank, ``1 + #voted classes``.
The ranks of the voted classes come from a V x V comparison of the votes themselves
(``count_i = #{j : v_j = v_i}``; ``rank_i = 1 + #{distinct classes with a larger count}``; given
votes are compared 16 at a time, so V can reach 512), never an N x C histogram or a sort. With ``P`` constant (``p_unvoted``) on the unvoted non-target classes:

    KL(P || Q) = sum_{c != y} P_c log P_c - sum_{c != y} P_c z_c + logsumexp_{c != y} z_c
    sum_{c != y} P_c z_c = p_unvoted * (sum_{c != y} z_c - sum_{voted c != y} z_c) + sum_{voted c != y} P_c z_c

so the row needs its non-target logsumexp and sum (one pass) and the logits of the voted classes
(V gathers); the cross-entropy adds the target logit. Every ``z`` here is taken less the row's
non-target maximum (the KL does not change with a shift of every logit): sums of the logits as they
are would lose the digits that logits of 1e3 and beyond take. The gradient of the batch mean,
``weight * (Q_c - P_c) / N`` for ``c != y`` and 0 at the target (paper eq. 6) plus the
cross-entropy's ``(softmax_c - [c = y]) / N``, is written in a second pass over the row and kept for
the backward pass.

Scope: ``rank_by=dense`` with ``distribution`` zipf, constant or linear_decay (functions of the rank)
and at most :data:`MAX_FUSED_VOTES` votes per sample (one or two stages at 32 px, one at 224 px; the
random distributions use the reference path). The method hands over the map itself for one
upsampled voting map (a :class:`DenseMap`): the kernel casts its votes where it has at most
:data:`MAX_CAST_VOTES` pixels (the 32 px recipe), torch casts them otherwise (:func:`_vote_source`);
for every other configuration (Dense2, the 224 px recipe's maps without upsampling) the method hands
over the votes torch cast. ``ZipfLabelSmoothing(kernel=...)`` chooses the path (its class docstring
lists the cases).

Eager calls go through an ``autograd.Function``; under ``torch.compile`` the same computation is the
custom op ``zipfls_train::ce_zipf``, which Inductor calls as it is (one launch, captured by CUDA
graphs). Either way the first call on a device compares the kernel with the reference functions
(:func:`_compute`). On the CPU the kernel runs only in Triton's interpreter (``TRITON_INTERPRET=1``),
which is how the tests check it, eager and compiled, against float64 references without a GPU.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import check_targets
from .dense_logits import dense_argmax, pixel_argmax, pixel_logit_chunks, samples_per_chunk, upsampled_maps, votes_per_sample

try:  # Triton ships with CUDA builds of PyTorch on Linux; elsewhere only the reference path exists.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

FUSED_DISTRIBUTIONS = ("zipf", "constant", "linear_decay")
_DISTRIBUTION_CODE = {name: code for code, name in enumerate(FUSED_DISTRIBUTIONS)}
# Votes per sample the kernel ranks (each program holds them in BLOCK_V lanes): given votes up to
# MAX_FUSED_VOTES (Dense2 at 32 px casts 320); votes it casts itself from dense logits up to
# MAX_CAST_VOTES, which it ranks in one V x V tile (beyond 128 it would spill registers); a larger
# map's votes are cast by torch and handed over.
MAX_FUSED_VOTES = 512
MAX_CAST_VOTES = 128
_MAX_CLASS_BLOCK = 1024  # classes per step of the row loops
# Votes compared with all of a sample's votes per step of the chunked ranking (V x 16 comparisons:
# on sm_90, 48 registers at 64 votes, 128 at 512; larger chunks only cost registers).
_RANK_CHUNK = 16


@dataclass(frozen=True)
class LaunchConfig:
    """How the kernel is launched, not what it computes: warps per program (one program per sample)
    and the pixels x classes tile of each step of its own vote casting (arg-max over dense logits).
    Every config gives the same votes, and the same loss and gradient up to the order of float sums.
    At the paper's batch a program runs alone on its SM, so its latency is the kernel's:
    ``scripts/bench_zipf_kernel.py`` times the candidates on a GPU."""

    # None: 16 where the kernel casts the votes itself (the 32 px recipe: on an H200 the kernel took
    # 14.0 us with 16 warps, 28.8 us with 4, at batch 128 and 200 classes; 10.6 vs 19.0 us at 100:
    # experiments/gpu_h200_2026-11-29.md); for given votes 4 up to 64 votes per sample (4 and 8
    # within 5% at 224 px), else 8.
    num_warps: int | None = None
    # Pixels x classes per step of the vote casting. No spills at 64 votes with 4 or 16 warps on
    # sm_90 (tests/test_zipf_fused.py); other tiles and warps take other register counts
    # (scripts/bench_zipf_kernel.py lists its candidates').
    vote_tile: int = 1024

    def warps(self, block_v: int, casts_votes: bool) -> int:
        if self.num_warps is not None:
            return self.num_warps
        return 16 if casts_votes else (4 if block_v <= 64 else 8)

    def vote_class_block(self, block_v: int) -> int:
        """Classes per step of the vote casting (BLOCK_CV)."""
        return max(16, self.vote_tile // block_v)


_launch_config = LaunchConfig()


@contextlib.contextmanager
def launched_with(config: LaunchConfig) -> Iterator[None]:
    """Launch the kernel with ``config`` inside the block (benchmarks: a CUDA graph captured
    inside keeps the launch it captured)."""
    global _launch_config
    previous, _launch_config = _launch_config, config
    try:
        yield
    finally:
        _launch_config = previous


def interpreting() -> bool:
    """Triton's CPU interpreter is on (kernels then run on CPU tensors, slowly, for testing)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(device: torch.device, num_votes: int) -> str | None:
    """Why the fused kernel cannot run for this call (None when it can)."""
    if triton is None:
        return "Triton is not installed (it ships with PyTorch's CUDA builds on Linux)"
    if device.type != "cuda" and not interpreting():
        return f"the logits are on {device.type}; the kernel needs CUDA (or TRITON_INTERPRET=1 on the CPU, for tests)"
    if num_votes > MAX_FUSED_VOTES:
        return f"a sample casts {num_votes} votes, more than the kernel's {MAX_FUSED_VOTES} (e.g. Dense2 on 224 px maps)"
    return None


if triton is not None:

    # (Comments, not docstrings, inside the kernels: Triton compiles their source.)
    @triton.jit
    def _rank_weight(rank, alpha, num_classes, DISTRIBUTION: tl.constexpr):
        # Unnormalised soft-label weight of a rank (float32): rank^-alpha | 1 | C + 1 - rank.
        rank = rank.to(tl.float32)
        if DISTRIBUTION == 0:
            weight = tl.exp(-alpha * tl.log(rank))
        elif DISTRIBUTION == 1:
            weight = rank * 0.0 + 1.0
        else:
            weight = num_classes + 1.0 - rank
        return weight

    @triton.jit
    def _dense_votes(
        dense_row, lanes, in_votes, num_classes, map_height, map_width,
        UPSAMPLE: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_CV: tl.constexpr,
    ):
        # Arg-max class of every output pixel of one sample's (H*W) x C dense logits, after a bilinear
        # x2 upsample (F.interpolate, align_corners=False: source y = max((y' + 0.5) / 2 - 0.5, 0),
        # the same weighted sum in the same order, rounded to the logits' dtype as its output is)
        # when UPSAMPLE. Ties go to the lowest class, as torch.argmax. -1 on padding lanes.
        if UPSAMPLE:
            out_width = 2 * map_width
            source_y = tl.maximum(((lanes // out_width).to(tl.float32) + 0.5) * 0.5 - 0.5, 0.0)
            source_x = tl.maximum(((lanes % out_width).to(tl.float32) + 0.5) * 0.5 - 0.5, 0.0)
            y0 = source_y.to(tl.int32)  # floor: the source is >= 0
            x0 = source_x.to(tl.int32)
            lambda_y = (source_y - y0.to(tl.float32))[:, None]
            lambda_x = (source_x - x0.to(tl.float32))[:, None]
            y1 = tl.where(y0 < map_height - 1, y0 + 1, y0)
            x1 = tl.where(x0 < map_width - 1, x0 + 1, x0)
            pixel_00 = (y0 * map_width + x0)[:, None]
            pixel_01 = (y0 * map_width + x1)[:, None]
            pixel_10 = (y1 * map_width + x0)[:, None]
            pixel_11 = (y1 * map_width + x1)[:, None]
        else:
            pixel_00 = lanes[:, None]
        best = tl.full([BLOCK_V], float("-inf"), tl.float32)
        best_class = tl.zeros([BLOCK_V], tl.int32)
        class_lanes = tl.arange(0, BLOCK_CV)
        for start in range(0, num_classes, BLOCK_CV):
            cols = (start + class_lanes)[None, :]
            load = in_votes[:, None] & (cols < num_classes)
            value = tl.load(dense_row + pixel_00 * num_classes + cols, mask=load, other=0.0).to(tl.float32)
            if UPSAMPLE:
                v01 = tl.load(dense_row + pixel_01 * num_classes + cols, mask=load, other=0.0).to(tl.float32)
                v10 = tl.load(dense_row + pixel_10 * num_classes + cols, mask=load, other=0.0).to(tl.float32)
                v11 = tl.load(dense_row + pixel_11 * num_classes + cols, mask=load, other=0.0).to(tl.float32)
                value = (1.0 - lambda_y) * ((1.0 - lambda_x) * value + lambda_x * v01) + lambda_y * (
                    (1.0 - lambda_x) * v10 + lambda_x * v11
                )
                value = value.to(dense_row.dtype.element_ty).to(tl.float32)
            value = tl.where(load, value, float("-inf"))
            chunk_best = tl.max(value, axis=1)
            chunk_class = tl.argmax(value, axis=1).to(tl.int32) + start
            better = chunk_best > best  # strictly: an earlier chunk keeps a tie (lowest class)
            best = tl.where(better, chunk_best, best)
            best_class = tl.where(better, chunk_class, best_class)
        return tl.where(in_votes, best_class, -1)

    @triton.jit
    def _ranks_in_one_tile(votes, lanes, in_votes):
        # Per lane: is it the first lane of its class (one lane per voted class), and the class's
        # rank, 1 + #{distinct classes with more votes}, from one V x V comparison of the votes.
        # Padding lanes (-1, outside in_votes) count for nothing.
        same = (votes[:, None] == votes[None, :]) & in_votes[:, None] & in_votes[None, :]
        count = tl.sum(same.to(tl.int32), axis=1)  # votes of lane i's class
        seen_before = tl.sum((same & (lanes[None, :] < lanes[:, None])).to(tl.int32), axis=1)
        first = in_votes & (seen_before == 0)
        rank = 1 + tl.sum(((count[None, :] > count[:, None]) & first[None, :]).to(tl.int32), axis=1)
        return first, rank

    @triton.jit
    def _ranks_by_chunks(votes, votes_row, lanes, in_votes, num_votes, BLOCK_T: tl.constexpr):
        # The same as _ranks_in_one_tile for votes in memory, comparing all V lanes with BLOCK_T
        # votes at a time (V x BLOCK_T, never V x V: a Dense2 sample casts 320). Two passes over
        # the chunks: each lane's count and whether it comes first; then the ranks, which need
        # every class's count: the chunk's own, recomputed against all V lanes.
        chunk = tl.arange(0, BLOCK_T)
        count = tl.zeros_like(lanes)
        seen_before = tl.zeros_like(lanes)
        for start in range(0, num_votes, BLOCK_T):
            other = start + chunk
            in_chunk = other < num_votes
            other_votes = tl.load(votes_row + other, mask=in_chunk, other=-1).to(tl.int32)
            same = (votes[:, None] == other_votes[None, :]) & in_votes[:, None] & in_chunk[None, :]
            count += tl.sum(same.to(tl.int32), axis=1)
            seen_before += tl.sum((same & (other[None, :] < lanes[:, None])).to(tl.int32), axis=1)
        first = in_votes & (seen_before == 0)
        rank = tl.full(lanes.shape, 1, tl.int32)
        for start in range(0, num_votes, BLOCK_T):
            other = start + chunk
            in_chunk = other < num_votes
            other_votes = tl.load(votes_row + other, mask=in_chunk, other=-1).to(tl.int32)
            same = (votes[:, None] == other_votes[None, :]) & in_votes[:, None] & in_chunk[None, :]
            other_count = tl.sum(same.to(tl.int32), axis=0)
            other_first = in_chunk & (tl.sum((same & (lanes[:, None] < other[None, :])).to(tl.int32), axis=0) == 0)
            rank += tl.sum(((other_count[None, :] > count[:, None]) & other_first[None, :]).to(tl.int32), axis=1)
        return first, rank

    @triton.jit
    def _zipf_kernel(
        logits_ptr, logits_row_stride, targets_ptr, votes_ptr, votes_row_stride, grad_ptr, rows_ptr,
        batch, num_classes, num_votes, map_height, map_width, alpha, weight,
        DISTRIBUTION: tl.constexpr, WITH_CE: tl.constexpr, VOTES_FROM: tl.constexpr,
        BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CV: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        # One sample per program. rows_ptr: 3 x batch, per sample / batch: [loss, ce, kl] with
        # loss = ce + weight * kl (ce = 0 without WITH_CE). grad_ptr: batch x C, d loss / d logits.
        # votes_ptr holds the votes, batch x V class indices (VOTES_FROM 0), or the dense logits,
        # batch x (H*W) x C, whose arg-max pixels vote as they are (1) or upsampled x2 (2).
        row = tl.program_id(0).to(tl.int64)
        inv_batch = 1.0 / batch
        target = tl.load(targets_ptr + row).to(tl.int32)
        logits_row = logits_ptr + row * logits_row_stride
        grad_row = grad_ptr + row * num_classes  # the gradient buffer is contiguous

        # Ranks of the voted classes from the votes alone (padding lanes hold -1, no class).
        lanes = tl.arange(0, BLOCK_V)
        in_votes = lanes < num_votes
        if VOTES_FROM == 0:
            votes_row = votes_ptr + row * votes_row_stride
            votes = tl.load(votes_row + lanes, mask=in_votes, other=-1).to(tl.int32)
            first, rank = _ranks_by_chunks(votes, votes_row, lanes, in_votes, num_votes, BLOCK_T)
        else:
            dense_row = votes_ptr + row * map_height * map_width * num_classes
            votes = _dense_votes(dense_row, lanes, in_votes, num_classes, map_height, map_width, VOTES_FROM == 2, BLOCK_V, BLOCK_CV)
            first, rank = _ranks_in_one_tile(votes, lanes, in_votes)
        voted_classes = tl.sum(first.to(tl.int32), axis=0)

        # Soft label: voted non-target classes from their lanes, every other non-target class alike.
        own = first & (votes != target)
        target_voted = tl.sum((first & (votes == target)).to(tl.int32), axis=0)
        unvoted = num_classes - voted_classes - (1 - target_voted)  # unvoted non-target classes
        weight_unvoted = _rank_weight(voted_classes + 1, alpha, num_classes, DISTRIBUTION)
        weight_voted = tl.where(own, _rank_weight(rank, alpha, num_classes, DISTRIBUTION), 0.0)
        normaliser = unvoted * weight_unvoted + tl.sum(weight_voted, axis=0)
        p_unvoted = weight_unvoted / normaliser
        p_voted = weight_voted / normaliser
        # (log of 1 where a term is absent: 0 * log 0 is 0 here, not NaN)
        p_log_p = tl.sum(p_voted * tl.log(tl.where(own, p_voted, 1.0)), axis=0)
        p_log_p += unvoted * p_unvoted * tl.log(tl.where(unvoted > 0, p_unvoted, 1.0))

        # Pass 1 over the logits: the non-target logsumexp and sum, each lane's relative to its own
        # running maximum (online), the row's then relative to the row's maximum m. The KL does not
        # change with a shift of every logit, and computed on z - m it keeps every digit that large
        # logits (1e3 and beyond) would take from sums of z itself.
        columns = tl.arange(0, BLOCK_C)
        lane_max = tl.full([BLOCK_C], float("-inf"), tl.float32)
        lane_sum = tl.zeros([BLOCK_C], tl.float32)  # sum of exp(z - lane_max)
        lane_total = tl.zeros([BLOCK_C], tl.float32)  # sum of z - lane_max
        lane_count = tl.zeros([BLOCK_C], tl.float32)
        for start in range(0, num_classes, BLOCK_C):
            cols = start + columns
            keep = (cols < num_classes) & (cols != target)
            z = tl.load(logits_row + cols, mask=keep, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(lane_max, z)
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # lanes with nothing kept yet
            rebase = tl.where(lane_count > 0, lane_max - shift, 0.0)  # (-inf - -inf is NaN)
            lane_sum = lane_sum * tl.exp(rebase) + tl.where(keep, tl.exp(z - shift), 0.0)
            lane_total += lane_count * rebase + tl.where(keep, z - shift, 0.0)
            lane_count += keep.to(tl.float32)
            lane_max = new_max
        row_max = tl.max(lane_max, axis=0)
        lane_to_row = tl.where(lane_count > 0, lane_max - row_max, 0.0)
        logsumexp_shifted = tl.log(tl.sum(lane_sum * tl.exp(lane_to_row), axis=0))  # of z - m, non-target
        total_shifted = tl.sum(lane_total + lane_count * lane_to_row, axis=0)  # sum of z - m, non-target

        z_voted_shifted = tl.where(own, tl.load(logits_row + votes, mask=own, other=0.0).to(tl.float32) - row_max, 0.0)
        p_dot_z_shifted = p_unvoted * (total_shifted - tl.sum(z_voted_shifted, axis=0)) + tl.sum(p_voted * z_voted_shifted, axis=0)
        kl = p_log_p - p_dot_z_shifted + logsumexp_shifted
        ce = kl * 0.0
        logsumexp_all_shifted = logsumexp_shifted
        if WITH_CE:  # cross-entropy over all classes: logsumexp of the non-target one and the target logit
            target_shifted = tl.load(logits_row + target).to(tl.float32) - row_max
            top = tl.maximum(logsumexp_shifted, target_shifted)
            logsumexp_all_shifted = top + tl.log(tl.exp(logsumexp_shifted - top) + tl.exp(target_shifted - top))
            ce = logsumexp_all_shifted - target_shifted
        tl.store(rows_ptr + row, (ce + weight * kl) * inv_batch)
        tl.store(rows_ptr + batch + row, ce * inv_batch)
        tl.store(rows_ptr + 2 * batch + row, kl * inv_batch)

        # Pass 2: the gradient of the batch mean, weight * (Q_c - P_c) / N off the target (paper
        # eq. 6) plus (softmax_c - [c = y]) / N with CE. Unvoted P first, then (after a barrier, so
        # that no thread's plain store lands after them) the voted classes' values.
        for start in range(0, num_classes, BLOCK_C):
            cols = start + columns
            inside = cols < num_classes
            z_shifted = tl.load(logits_row + cols, mask=inside, other=0.0).to(tl.float32) - row_max
            grad = tl.where(cols == target, 0.0, weight * (tl.exp(z_shifted - logsumexp_shifted) - p_unvoted))
            if WITH_CE:
                grad += tl.exp(z_shifted - logsumexp_all_shifted) - tl.where(cols == target, 1.0, 0.0)
            tl.store(grad_row + cols, (grad * inv_batch).to(grad_ptr.dtype.element_ty), mask=inside)
        tl.debug_barrier()
        grad_voted = weight * (tl.exp(z_voted_shifted - logsumexp_shifted) - p_voted)
        if WITH_CE:
            grad_voted += tl.exp(z_voted_shifted - logsumexp_all_shifted)  # never the target (own excludes it)
        tl.store(grad_row + votes, (grad_voted * inv_batch).to(grad_ptr.dtype.element_ty), mask=own)


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, value - 1).bit_length()


@dataclass(frozen=True)
class DenseMap:
    """Votes the kernel casts itself: the classifier (``weight`` C x D, ``bias`` C) applied to every
    pixel of ``feature_map`` (N x D x H x W; after a bilinear x2 upsample when ``upsample``), each
    pixel voting for its arg-max class, as :func:`zipf.dense_votes`. The dense logits are one matmul
    before the kernel; the kernel upsamples them and takes each pixel's arg-max, so neither the
    upsampled logits nor the votes are ever stored."""

    feature_map: Tensor
    weight: Tensor
    bias: Tensor | None
    upsample: bool


def _votes_per_sample(votes: Tensor | DenseMap) -> int:
    return votes_per_sample(votes.feature_map, votes.upsample) if isinstance(votes, DenseMap) else votes.shape[1]


# What the kernel's votes argument holds (its VOTES_FROM): class indices N x V, or dense logits
# N x (H*W) x C whose pixels vote for their arg-max class, as they are or after a bilinear x2 upsample.
_GIVEN_VOTES, _DENSE_LOGITS, _UPSAMPLED_DENSE_LOGITS = 0, 1, 2


def _vote_source(votes: Tensor | DenseMap) -> tuple[Tensor, int, int, int]:
    """``(tensor, VOTES_FROM, map height, map width)`` for the kernel. A map of more than
    :data:`MAX_CAST_VOTES` pixels (after upsampling), or whose dense logits would exceed
    :data:`dense_logits.MAX_DENSE_LOGITS`, is voted by torch, chunk by chunk, instead."""
    if isinstance(votes, Tensor):
        return votes, _GIVEN_VOTES, 1, 1
    feature_map, weight, bias, upsample = votes.feature_map, votes.weight, votes.bias, votes.upsample
    n, _, height, width = feature_map.shape
    pixels = votes_per_sample(feature_map, upsample)
    with torch.no_grad():  # votes are never differentiated
        if pixels > MAX_CAST_VOTES or samples_per_chunk(weight.shape[0], pixels) < n:
            return dense_argmax(feature_map, weight, bias, upsample), _GIVEN_VOTES, 1, 1
        _, dense = next(pixel_logit_chunks(feature_map, weight, bias, pixels))
    return dense, (_UPSAMPLED_DENSE_LOGITS if upsample else _DENSE_LOGITS), height, width


# The kernel, the reference and the check below take (logits, targets, *options), options being
# (votes, VOTES_FROM, map height, map width, alpha, distribution, weight, with_ce).


def _run_kernel(logits: Tensor, targets: Tensor, *options: object) -> tuple[Tensor, Tensor]:
    """One launch: ``(totals, grad)``, totals = [loss, ce, kl] (batch means, float32) and grad =
    d loss / d logits (N x C, the logits' dtype), then one sum."""
    votes, votes_from, map_height, map_width, alpha, distribution, weight, with_ce = options
    # The kernel reads logits rows of unit column stride (any row stride), the votes or dense logits
    # and the targets contiguous: copies only where a caller, or a compiled graph, lays them out else.
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    votes, targets = votes.contiguous(), targets.contiguous()
    n, num_classes = logits.shape
    num_votes = votes.shape[1] if votes_from == _GIVEN_VOTES else map_height * map_width * (4 if votes_from == _UPSAMPLED_DENSE_LOGITS else 1)
    grad = torch.empty((n, num_classes), dtype=logits.dtype, device=logits.device)
    rows = torch.empty((3, n), dtype=torch.float32, device=logits.device)
    block_v = max(16, _next_power_of_two(num_votes))
    _zipf_kernel[(n,)](
        logits, logits.stride(0), targets, votes, votes.stride(0), grad, rows,
        n, num_classes, num_votes, map_height, map_width, float(alpha), float(weight),
        DISTRIBUTION=_DISTRIBUTION_CODE[distribution],
        WITH_CE=bool(with_ce),
        VOTES_FROM=votes_from,
        BLOCK_V=block_v,
        BLOCK_C=min(_MAX_CLASS_BLOCK, max(16, _next_power_of_two(num_classes))),
        BLOCK_CV=_launch_config.vote_class_block(block_v),
        BLOCK_T=_RANK_CHUNK,
        num_warps=_launch_config.warps(block_v, casts_votes=votes_from != _GIVEN_VOTES),
    )
    return rows.sum(dim=1), grad


def _reference(logits: Tensor, targets: Tensor, *options: object) -> tuple[Tensor, Tensor]:
    """The kernel's ``(totals, grad)`` from the reference functions of ``zipf.py`` (float32), the
    gradient written out as paper eq. 6 plus the cross-entropy's (no autograd: this also runs inside
    the compiled graph's custom op, below autograd). Used by the first-call check and in place of a
    kernel that failed under ``loss.kernel=auto``."""
    from .zipf import nontarget_kl, vote_counts, zipf_soft_labels  # deferred: zipf.py imports this module

    votes, votes_from, map_height, map_width, alpha, distribution, weight, with_ce = options
    if votes_from != _GIVEN_VOTES:
        votes = pixel_argmax(votes, map_height, map_width, votes_from == _UPSAMPLED_DENSE_LOGITS)
    n, num_classes = logits.shape
    z = logits.float()
    soft = zipf_soft_labels(vote_counts(votes, num_classes), targets, alpha, distribution)
    kl = nontarget_kl(z, targets, soft)
    q = torch.softmax(z.scatter(1, targets.view(-1, 1), float("-inf")), dim=1)  # 0 at the target, as P
    grad = weight * (q - soft)
    ce = torch.zeros_like(kl)
    if with_ce:
        ce = F.cross_entropy(z, targets)
        grad += torch.softmax(z, dim=1) - F.one_hot(targets, num_classes)
    return torch.stack([ce + weight * kl, ce, kl]), (grad / n).to(logits.dtype)


# Per device: "checked" once the kernel matched the reference there, "failed" once it failed to
# build or disagreed under loss.kernel=auto (the reference then stands in for it under auto in this
# process). Per process, not per run: in a Hydra sweep (one process) the first run's configuration
# is the one checked.
_kernel_state: dict[str, str] = {}


def _compute(logits: Tensor, targets: Tensor, *options: object, fallback: bool) -> tuple[Tensor, Tensor]:
    """The kernel's ``(totals, grad)``. On its first call on a device the kernel is built and
    compared with :func:`_reference` in float32 (one host sync per process): a kernel that does not
    build, or builds and computes wrong numbers on some GPU, is caught before it trains. ``fallback``
    (``loss.kernel=auto``): then warn and use the reference from now on; else raise. A failure after
    a successful check is raised either way (out of memory, say, is not a reason to switch paths)."""
    device = str(logits.device)
    state = _kernel_state.get(device)
    if state == "failed":
        if fallback:
            return _reference(logits, targets, *options)
        state = None  # loss.kernel=triton (a later run of a sweep, say) asks for the kernel: check it again
    if state is None and not (logits.is_cuda and torch.cuda.is_current_stream_capturing()):  # no sync while capturing
        try:
            _check_against_reference(logits, targets, *options)
        except Exception as error:  # noqa: BLE001 - a kernel that does not build must not end the run
            if not fallback:
                raise
            _kernel_state[device] = "failed"
            warnings.warn(
                f"the fused Zipf kernel failed ({type(error).__name__}: {error}); using the reference "
                "path from now on (set loss.kernel=torch to skip the attempt)",
                RuntimeWarning,
                stacklevel=2,
            )
            return _reference(logits, targets, *options)
        _kernel_state[device] = "checked"
    return _run_kernel(logits, targets, *options)


def _check_against_reference(logits: Tensor, targets: Tensor, votes: Tensor, votes_from: int, *rest: object) -> None:
    """Kernel vs reference on float32 copies of the inputs, or a RuntimeError saying by how much.
    Where the kernel upsamples the dense logits itself, its multiply-adds run in another order than
    ``F.interpolate``'s, so a pixel whose two best classes are within a few float32 roundings may
    vote the other way (and move that sample's whole soft label): such samples are left out of the
    comparison (:func:`_near_tie_samples`), and the loss, which sums every sample, then too."""
    logits = logits.detach().float()
    votes = votes if votes_from == _GIVEN_VOTES else votes.float()
    kernel, kernel_grad = _run_kernel(logits, targets, votes, votes_from, *rest)
    reference, reference_grad = _reference(logits, targets, votes, votes_from, *rest)
    compared = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    if votes_from == _UPSAMPLED_DENSE_LOGITS:
        compared = ~_near_tie_samples(votes, *rest[:2])
    loss_gap = (kernel[0] - reference[0]).abs() / reference[0].abs().clamp_min(1e-6)
    loss_gap = torch.where(compared.all(), loss_gap, 0.0)
    grad_gap = ((kernel_grad - reference_grad).abs() * compared[:, None]).max() / reference_grad.abs().max().clamp_min(1e-12)
    kernel_loss, reference_loss, loss_gap, grad_gap = torch.stack([kernel[0], reference[0], loss_gap, grad_gap]).tolist()  # one sync
    if not (loss_gap <= 1e-4 and grad_gap <= 1e-4):  # (NaN fails too)
        raise RuntimeError(
            f"it disagrees with the reference functions on its first call (float32: loss {kernel_loss:.6g} vs "
            f"{reference_loss:.6g}; largest gradient difference {grad_gap:.3g} of the largest gradient)"
        )


def _near_tie_samples(dense: Tensor, map_height: int, map_width: int) -> Tensor:
    """Samples (bool N) of N x (H*W) x C dense logits with a pixel, after the bilinear x2 upsample,
    whose two best classes differ by at most 1e-5 of their size: far more than the float32 roundings
    by which two orders of the upsampling's multiply-adds can differ."""
    best_two = upsampled_maps(dense.float(), map_height, map_width).topk(2, dim=1).values
    near = best_two[:, 0] - best_two[:, 1] <= 1e-5 * best_two[:, 0].abs().clamp_min(1.0)
    return near.flatten(1).any(dim=1)


class _FusedZipf(torch.autograd.Function):
    """Eager path. Forward: :func:`_compute` (the kernel writes each sample's terms and the
    gradient); backward: one multiply. Outputs ``loss`` (differentiable) and ``terms`` = [ce, kl]
    (reported values only)."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, *options_and_fallback: object):  # noqa: ANN001, ANN205
        *options, fallback = options_and_fallback
        totals, grad = _compute(logits, targets, *options, fallback=fallback)
        ctx.save_for_backward(grad)
        ctx.set_materialize_grads(False)
        loss, terms = totals[0], totals[1:]
        ctx.mark_non_differentiable(terms)
        return loss, terms

    @staticmethod
    def backward(ctx, grad_loss: Tensor | None, grad_terms: Tensor | None):  # noqa: ANN001, ANN205
        (grad,) = ctx.saved_tensors
        return (None if grad_loss is None else grad * grad_loss), *([None] * 10)


# Compiled path: the same computation as a custom op, opaque to torch.compile (Inductor calls it as
# it is, so the step keeps one launch and CUDA graphs capture it). Eager calls skip it: the op's
# Python dispatch costs about 20 us more per call than the autograd.Function above.
@torch.library.custom_op("zipfls_train::ce_zipf", mutates_args=())
def _ce_zipf_op(
    logits: Tensor, targets: Tensor, votes: Tensor, votes_from: int, map_height: int, map_width: int,
    alpha: float, distribution: str, weight: float, with_ce: bool, fallback: bool,
) -> tuple[Tensor, Tensor]:
    totals, grad = _compute(logits, targets, votes, votes_from, map_height, map_width, alpha, distribution, weight, with_ce, fallback=fallback)
    return totals, grad


@_ce_zipf_op.register_fake
def _(logits: Tensor, targets: Tensor, *options: object) -> tuple[Tensor, Tensor]:
    return logits.new_empty((3,), dtype=torch.float32), logits.new_empty(logits.shape)


def _op_setup_context(ctx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:  # noqa: ANN001
    ctx.save_for_backward(output[1])


def _op_backward(ctx, grad_totals: Tensor, grad_grad: Tensor) -> tuple:  # noqa: ANN001
    (grad,) = ctx.saved_tensors
    return grad * grad_totals[0], *([None] * 10)  # only totals[0], the loss, is differentiated


_ce_zipf_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def _check_inputs(logits: Tensor, targets: Tensor, votes: Tensor | DenseMap, distribution: str) -> None:
    n = logits.shape[0] if logits.dim() == 2 else -1
    if isinstance(votes, DenseMap):
        fm, w = votes.feature_map, votes.weight
        votes_ok = fm.dim() == 4 and fm.shape[0] == n and w.dim() == 2 and tuple(w.shape) == (logits.shape[-1], fm.shape[1])
        shapes = f"feature map {tuple(fm.shape)} with classifier {tuple(w.shape)}"
    else:
        votes_ok = votes.dim() == 2 and votes.shape[0] == n
        shapes = f"votes {tuple(votes.shape)}"
    if logits.dim() != 2 or targets.shape != logits.shape[:1] or not votes_ok:
        raise ValueError(
            f"expected logits N x C, targets N and votes N x V (or an N x D x H x W map with a C x D "
            f"classifier); got logits {tuple(logits.shape)}, targets {tuple(targets.shape)}, {shapes}"
        )
    check_targets(targets, logits, "logits")  # dtype and device too: the kernel reads them as they are
    if distribution not in FUSED_DISTRIBUTIONS:
        raise ValueError(f"the fused kernel computes distribution {list(FUSED_DISTRIBUTIONS)}, got {distribution!r}")
    reason = unavailable_reason(logits.device, _votes_per_sample(votes))
    if reason is not None:
        raise RuntimeError(f"fused Zipf kernel unavailable: {reason}")


def _apply(logits: Tensor, targets: Tensor, votes: Tensor | DenseMap, alpha: float, distribution: str, weight: float, with_ce: bool, fallback: bool) -> tuple[Tensor, Tensor]:
    """``(loss, [ce, kl])``: only the loss is differentiable."""
    _check_inputs(logits, targets, votes, distribution)
    options = (*_vote_source(votes), float(alpha), distribution, float(weight), bool(with_ce))
    if torch.compiler.is_compiling():
        totals, _ = torch.ops.zipfls_train.ce_zipf(logits, targets, *options, bool(fallback))
        return totals[0], totals[1:].detach()
    return _FusedZipf.apply(logits, targets, *options, bool(fallback))


def fused_zipf_kl(
    logits: Tensor, targets: Tensor, votes: Tensor | DenseMap, alpha: float = 1.0, distribution: str = "zipf", *, fallback: bool = False
) -> Tensor:
    """Batch mean of ``KL(P || Q)``, as ``nontarget_kl(logits, targets, zipf_soft_labels(vote_counts(votes, C),
    targets, alpha, distribution))``, differentiable in ``logits``, in one kernel.

    ``logits`` N x C (any float dtype; computed in float32), ``targets`` N, ``votes`` N x V class
    indices or a :class:`DenseMap` to cast them from (V <= :data:`MAX_FUSED_VOTES`). Raises
    ``RuntimeError`` naming the reason when the kernel cannot run here (see :func:`unavailable_reason`).
    The first call on a device checks the kernel against the reference functions; ``fallback``: a
    kernel that fails to build or disagrees is replaced by them with a warning (else: raised).
    Works eagerly and inside ``torch.compile`` (as the custom op ``zipfls_train::ce_zipf``)."""
    loss, _ = _apply(logits, targets, votes, alpha, distribution, 1.0, with_ce=False, fallback=fallback)
    return loss


def fused_ce_zipf(
    logits: Tensor, targets: Tensor, votes: Tensor | DenseMap, weight: float, alpha: float = 1.0, distribution: str = "zipf",
    *, fallback: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Zipf's LS's whole objective in one kernel: ``(loss, ce, kl)`` with ``loss = ce + weight * kl``
    (``ce`` = ``F.cross_entropy(logits, targets)``, ``kl`` as :func:`fused_zipf_kl`). Only ``loss`` is
    differentiable; ``ce`` and ``kl`` are the values of its terms, for logging. With a
    :class:`DenseMap` the step then launches what cross-entropy alone launches, plus the classifier's
    matmul over the map's pixels: the kernel and a sum forward, one multiply backward. ``fallback``
    as in :func:`fused_zipf_kl`."""
    loss, terms = _apply(logits, targets, votes, alpha, distribution, weight, with_ce=True, fallback=fallback)
    ce, kl = terms.unbind()
    return loss, ce, kl


__all__ = ["FUSED_DISTRIBUTIONS", "MAX_CAST_VOTES", "MAX_FUSED_VOTES", "DenseMap", "fused_ce_zipf", "fused_zipf_kl", "interpreting", "unavailable_reason"]
