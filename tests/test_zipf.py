"""Zipf's label smoothing (losses/zipf.py) against independently computed values.

Expected numbers come from SPEC.md's worked example, from hand calculation (written out beside each
literal), or from plain-Python float64 references written from the equations (loops over samples and
classes), never from the code under test.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from zipfls_train.data.batch import Batch
from zipfls_train.losses import build_method
from zipfls_train.losses import dense_logits as dense_logits_module
from zipfls_train.losses import zipf as zipf_module
from zipfls_train.losses.zipf import (
    DISTRIBUTIONS,
    ZipfLabelSmoothing,
    dense_votes,
    nontarget_kl,
    vote_counts,
    zipf_soft_labels,
)
from zipfls_train.models import build_model

# --------------------------------------------------------------------------------------------------
# Independent float64 references, straight from SPEC.md section 1 (plain Python, no torch ops).


def reference_ranks(scores: list[float]) -> list[int]:
    # rank_c = 1 + #{k : score_k > score_c}, over all classes, target included.
    return [1 + sum(1 for other in scores if other > score) for score in scores]


def reference_soft_label(scores: list[float], target: int, alpha: float = 1.0) -> list[float]:
    ranks = reference_ranks(scores)
    normaliser = sum(ranks[k] ** -alpha for k in range(len(scores)) if k != target)
    return [0.0 if c == target else ranks[c] ** -alpha / normaliser for c in range(len(scores))]


def reference_kl(logits: list[float], target: int, soft: list[float]) -> float:
    exps = [math.exp(z) for c, z in enumerate(logits) if c != target]
    denominator = sum(exps)
    total = 0.0
    for c, z in enumerate(logits):
        if c == target or soft[c] == 0.0:
            continue
        q = math.exp(z) / denominator
        total += soft[c] * (math.log(soft[c]) - math.log(q))
    return total


def reference_dense_votes(feature_map: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> list[list[int]]:
    # One pixel at a time: logits_c = sum_d W[c, d] F[d, h, w] + b[c]; vote = first arg-max.
    fm, w, b = feature_map.double().tolist(), weight.double().tolist(), bias.double().tolist()
    votes = []
    for sample in fm:
        depth, height, width = len(sample), len(sample[0]), len(sample[0][0])
        row = []
        for h in range(height):
            for x in range(width):
                pixel = [sample[d][h][x] for d in range(depth)]
                logits = [sum(wc[d] * pixel[d] for d in range(depth)) + bc for wc, bc in zip(w, b)]
                row.append(max(range(len(logits)), key=lambda c: (logits[c], -c)))
        votes.append(row)
    return votes


def votes_tensor(histogram: dict[int, int]) -> torch.Tensor:
    return torch.tensor([[cls for cls, count in histogram.items() for _ in range(count)]])


# --------------------------------------------------------------------------------------------------
# Soft labels: hand-computed cases.


def test_worked_example_from_spec() -> None:
    counts = vote_counts(votes_tensor({9: 12, 3: 4}), 10)
    soft = zipf_soft_labels(counts, torch.tensor([9]))
    # ranks: 9 -> 1, 3 -> 2, others -> 3; P_3 = 0.5 / (0.5 + 8/3), others (1/3) / (0.5 + 8/3).
    expected = [0.105263] * 10
    expected[3], expected[9] = 0.157895, 0.0
    assert soft.dtype == torch.float32
    assert soft[0].tolist() == pytest.approx(expected, abs=5e-7)


def test_all_votes_on_target_gives_uniform_non_target_label() -> None:
    counts = vote_counts(votes_tensor({4: 64}), 7)
    soft = zipf_soft_labels(counts, torch.tensor([4]))[0].tolist()
    assert soft == pytest.approx([1 / 6] * 4 + [0.0] + [1 / 6] * 2, abs=1e-7)


def test_target_without_votes() -> None:
    # C = 5, y = 0, votes {1: 3, 2: 1}: ranks 1 -> 1, 2 -> 2, {0, 3, 4} -> 3.
    # Non-target weights 1, 1/2, 1/3, 1/3 (sum 13/6): P = 6/13, 3/13, 2/13, 2/13.
    counts = vote_counts(votes_tensor({1: 3, 2: 1}), 5)
    soft = zipf_soft_labels(counts, torch.tensor([0]))[0].tolist()
    assert soft == pytest.approx([0.0, 0.461538, 0.230769, 0.153846, 0.153846], abs=5e-7)


def test_ties_share_the_smallest_rank() -> None:
    # Scores 5, 5, 3, 3, 1 with y = 4: ranks 1, 1, 3, 3, 5 (not 1, 2, 3, 4 / not renumbered).
    # Weights 1, 1, 1/3, 1/3 (sum 8/3): P = 3/8, 3/8, 1/8, 1/8, 0.
    expected = [0.375, 0.375, 0.125, 0.125, 0.0]
    for scores in (torch.tensor([[5, 5, 3, 3, 1]]), torch.tensor([[5.0, 5.0, 3.0, 3.0, 1.0]])):
        assert zipf_soft_labels(scores, torch.tensor([4]))[0].tolist() == pytest.approx(expected, abs=1e-7)
    # The target tied with another class: scores 2, 2, 0, y = 0 -> ranks 1, 1, 3; P = 3/4, 1/4.
    soft = zipf_soft_labels(torch.tensor([[2.0, 2.0, 0.0]]), torch.tensor([0]))[0].tolist()
    assert soft == pytest.approx([0.0, 0.75, 0.25], abs=1e-7)


def test_float64_scores_are_ranked_in_float64() -> None:
    # 1 and 1 + 1e-12 are one float32 value: ranked in float32 they would tie (ranks 1, 1, 3).
    scores = torch.tensor([[1.0 + 1e-12, 1.0, 0.5]], dtype=torch.float64)
    soft = zipf_soft_labels(scores, torch.tensor([2]))[0].tolist()
    # ranks 1, 2, 3 with y = 2: weights 1, 1/2 (sum 3/2) -> P = 2/3, 1/3, 0.
    assert soft == pytest.approx([2 / 3, 1 / 3, 0.0], abs=1e-7)


@pytest.mark.parametrize(
    ("alpha", "p3", "p_other"),
    [
        # ranks as in the worked example; alpha 2: 1/4 / (1/4 + 8/9) and 1/9 / (1/4 + 8/9).
        (2.0, 0.219512, 0.097561),
        # alpha 0.5: 2^-0.5 / (2^-0.5 + 8 * 3^-0.5) and 3^-0.5 / (same).
        (0.5, 0.132767, 0.108404),
    ],
)
def test_alpha_by_hand(alpha: float, p3: float, p_other: float) -> None:
    counts = vote_counts(votes_tensor({9: 12, 3: 4}), 10)
    soft = zipf_soft_labels(counts, torch.tensor([9]), alpha=alpha)[0].tolist()
    expected = [p_other] * 10
    expected[3], expected[9] = p3, 0.0
    assert soft == pytest.approx(expected, abs=5e-7)


def test_linear_decay_by_hand() -> None:
    # Worked-example ranks 1 (target), 2, 3 x 8 with C = 10: w = C + 1 - rank = 9 and 8 x 8 (sum 73).
    counts = vote_counts(votes_tensor({9: 12, 3: 4}), 10)
    soft = zipf_soft_labels(counts, torch.tensor([9]), distribution="linear_decay")[0].tolist()
    expected = [8 / 73] * 10
    expected[3], expected[9] = 9 / 73, 0.0
    assert soft == pytest.approx(expected, abs=1e-7)


def test_random_distributions_are_the_documented_draws() -> None:
    # random_uniform: w = U; random_pareto: w = (1 - U)^(-1/alpha) - 1 (Lomax), U from torch.rand with
    # the same generator state; both normalised over the non-targets, unsorted (independent of ranks).
    scores = torch.randint(0, 5, (3, 8))
    targets = torch.tensor([0, 3, 7])
    for distribution, alpha in (("random_uniform", 1.0), ("random_pareto", 1.0), ("random_pareto", 2.5)):
        soft = zipf_soft_labels(scores, targets, alpha, distribution, generator=torch.Generator().manual_seed(3))
        uniform = torch.rand(3, 8, generator=torch.Generator().manual_seed(3)).double().tolist()
        for row, target, u_row in zip(soft.tolist(), targets.tolist(), uniform):
            if distribution == "random_uniform":
                weights = u_row
            else:
                weights = [(1.0 - u) ** (-1.0 / alpha) - 1.0 for u in u_row]
            normaliser = sum(w for c, w in enumerate(weights) if c != target)
            expected = [0.0 if c == target else w / normaliser for c, w in enumerate(weights)]
            assert row == pytest.approx(expected, abs=1e-6)


def test_random_distributions_draw_fresh_weights() -> None:
    scores = torch.zeros(4, 50)
    targets = torch.zeros(4, dtype=torch.long)
    for distribution in ("random_uniform", "random_pareto"):
        first = zipf_soft_labels(scores, targets, distribution=distribution)
        second = zipf_soft_labels(scores, targets, distribution=distribution)
        assert not torch.equal(first, second)
        assert not torch.equal(first[0], first[1])


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_every_distribution_is_a_non_target_distribution(distribution: str) -> None:
    scores = torch.randint(0, 6, (16, 40))
    targets = torch.randint(0, 40, (16,))
    soft = zipf_soft_labels(scores, targets, alpha=1.0, distribution=distribution)
    assert soft.shape == (16, 40) and torch.isfinite(soft).all() and (soft >= 0).all()
    assert soft.gather(1, targets[:, None]).abs().max() == 0
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(16), atol=1e-6, rtol=0)


def test_random_pareto_with_heavy_tail_stays_finite() -> None:
    """alpha 0.05: (1 - U)^-20 - 1 spans hundreds of orders of magnitude (float32 overflows): the
    labels are finite and still the documented draw, computed here in float64 from the same U."""
    soft = zipf_soft_labels(torch.zeros(64, 1000), torch.zeros(64, dtype=torch.long), 0.05, "random_pareto",
                            generator=torch.Generator().manual_seed(5))  # fmt: skip
    assert torch.isfinite(soft).all()
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(64), atol=1e-5, rtol=0)
    uniform = torch.rand(64, 1000, generator=torch.Generator().manual_seed(5)).double()
    log_weights = torch.log(torch.expm1(-torch.log1p(-uniform) / 0.05))  # log((1 - U)^(-1/alpha) - 1)
    log_weights[:, 0] = -math.inf  # the target
    torch.testing.assert_close(soft.double(), torch.softmax(log_weights, dim=1), atol=1e-6, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# Against the float64 loop reference.


@pytest.mark.parametrize(("n", "c", "votes_per_sample"), [(5, 3, 8), (8, 10, 64), (6, 100, 64), (3, 1000, 49)])
def test_vectorised_matches_loop_reference_on_votes(n: int, c: int, votes_per_sample: int) -> None:
    rng = random.Random(n * 1000 + c)
    votes = [[min(c - 1, int(rng.expovariate(0.3))) for _ in range(votes_per_sample)] for _ in range(n)]
    targets = [rng.randrange(c) for _ in range(n)]
    logits = [[rng.gauss(0.0, 3.0) for _ in range(c)] for _ in range(n)]
    counts_loop = [[row.count(k) for k in range(c)] for row in votes]
    counts = vote_counts(torch.tensor(votes), c)
    assert counts.tolist() == counts_loop

    soft = zipf_soft_labels(counts, torch.tensor(targets))
    expected_soft = [reference_soft_label(row, t) for row, t in zip(counts_loop, targets)]
    torch.testing.assert_close(soft.double(), torch.tensor(expected_soft, dtype=torch.float64), atol=1e-6, rtol=1e-5)

    loss = nontarget_kl(torch.tensor(logits), torch.tensor(targets), soft)
    expected_loss = sum(reference_kl(z, t, p) for z, t, p in zip(logits, targets, expected_soft)) / n
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(("n", "c", "alpha"), [(4, 7, 1.0), (8, 50, 0.7), (2, 1000, 1.3)])
def test_vectorised_matches_loop_reference_on_logits(n: int, c: int, alpha: float) -> None:
    rng = random.Random(c)
    # Rounded logits: many exact ties, which the rank rule must resolve to the smallest rank.
    scores = [[round(rng.gauss(0.0, 2.0), 1) for _ in range(c)] for _ in range(n)]
    targets = [rng.randrange(c) for _ in range(n)]
    soft = zipf_soft_labels(torch.tensor(scores), torch.tensor(targets), alpha=alpha)
    expected = [reference_soft_label(row, t, alpha) for row, t in zip(scores, targets)]
    torch.testing.assert_close(soft.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=1e-5)


def test_ranks_at_inat_scale_are_cheap() -> None:
    # N = 256, C = 10,000 (INAT21): an O(N C^2) comparison would need 25.6e9 operations.
    scores = torch.randint(0, 50, (256, 10_000), generator=torch.Generator().manual_seed(0))
    ranks = zipf_module.min_ranks(scores)
    row = scores[0].tolist()
    sample = random.Random(0).sample(range(10_000), 20)
    assert [ranks[0, c].item() for c in sample] == [1 + sum(1 for s in row if s > row[c]) for c in sample]


def test_soft_labels_and_kl_at_inat_scale_match_the_loop_reference() -> None:
    """Whole rows at C = 10,000 (INAT21), 49 votes per sample as a 7x7 map casts: soft labels and the
    KL of several samples against the plain-Python reference (ranks by counting, O(C^2) per row)."""
    rng = random.Random(7)
    n, c = 3, 10_000
    votes = [[rng.randrange(40) * 250 + rng.randrange(3) for _ in range(49)] for _ in range(n)]
    targets = [votes[0][0], 17, votes[2][5]]  # voted targets, and one without votes
    logits = [[rng.gauss(0.0, 2.0) for _ in range(c)] for _ in range(n)]
    counts = vote_counts(torch.tensor(votes), c)
    soft = zipf_soft_labels(counts, torch.tensor(targets))
    for i in range(n):
        histogram = [0] * c
        for vote in votes[i]:
            histogram[vote] += 1
        # Ranks by counting distinct greater counts (the vote counts take few values).
        greater = {count: sum(1 for other in histogram if other > count) for count in set(histogram)}
        ranks = [1 + greater[count] for count in histogram]
        normaliser = sum(1.0 / ranks[k] for k in range(c) if k != targets[i])
        expected = [0.0 if k == targets[i] else 1.0 / ranks[k] / normaliser for k in range(c)]
        # rtol: float32 sums of 10,000 terms in the CPU's order (AVX2's is 1.8e-5 off; a rank off by
        # one moves a value by >= 2%, the ranks here being below 50).
        torch.testing.assert_close(soft[i].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-9, rtol=1e-4)
        loss = nontarget_kl(torch.tensor([logits[i]]), torch.tensor([targets[i]]), soft[i : i + 1])
        assert loss.item() == pytest.approx(reference_kl(logits[i], targets[i], expected), rel=1e-4)  # (float32, as above)


# --------------------------------------------------------------------------------------------------
# The loss: eq. 6 gradient, C = 2, low precision.


def test_gradient_is_paper_eq6() -> None:
    torch.manual_seed(0)
    n, c = 6, 12
    logits = (3 * torch.randn(n, c, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, c, (n,))
    soft = zipf_soft_labels(torch.randint(0, 5, (n, c)), targets).double()
    nontarget_kl(logits, targets, soft).backward()
    for i in range(n):
        z, y = logits[i].tolist(), targets[i].item()
        denominator = sum(math.exp(v) for k, v in enumerate(z) if k != y)
        for k in range(c):
            expected = 0.0 if k == y else (math.exp(z[k]) / denominator - soft[i, k].item()) / n
            assert logits.grad[i, k].item() == pytest.approx(expected, abs=1e-7)
        assert logits.grad[i, y].item() == 0.0  # exactly


def test_two_classes_give_zero_zipf_loss() -> None:
    logits = torch.randn(5, 2, requires_grad=True)
    targets = torch.tensor([0, 1, 1, 0, 1])
    soft = zipf_soft_labels(torch.randint(0, 9, (5, 2)), targets)
    loss = nontarget_kl(logits, targets, soft)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad.abs().max().item() == 0.0


def test_float64_logits_give_the_float64_value() -> None:
    # The target's mask value must stay finite in the computation dtype (NaN before the fix: the
    # float64 minimum overflowed to -inf in float32 and 0 * -inf is NaN).
    torch.manual_seed(2)
    logits = (3 * torch.randn(6, 12, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, 12, (6,))
    soft = zipf_soft_labels(torch.randint(0, 5, (6, 12)), targets)
    loss = nontarget_kl(logits, targets, soft)
    assert loss.dtype == torch.float64
    rows, labels = logits.detach().tolist(), soft.double().tolist()
    expected = sum(reference_kl(z, t, p) for z, t, p in zip(rows, targets.tolist(), labels)) / 6
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_zero_soft_label_entries_contribute_nothing() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, -50.0]], requires_grad=True)
    soft = torch.tensor([[0.0, 1.0, 0.0, 0.0]])  # target 0; P = 0 on classes 2 and 3
    loss = nontarget_kl(logits, torch.tensor([0]), soft)
    # KL = 1 * (log 1 - log Q_1), Q_1 = e^2 / (e^2 + e^3 + e^-50)
    expected = -(2.0 - math.log(math.exp(2) + math.exp(3) + math.exp(-50)))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_a_masked_class_with_zero_soft_label_contributes_nothing() -> None:
    """A caller masking a class with a -inf logit, and giving it P = 0: its term is 0 (it was 0 * -inf = NaN)."""
    logits = torch.tensor([[2.0, 0.5, -1.0, float("-inf")]], requires_grad=True)
    loss = nontarget_kl(logits, torch.tensor([0]), torch.tensor([[0.0, 0.6, 0.4, 0.0]]))
    # Q over the non-target classes 1, 2 (class 3's probability is 0): e^0.5 and e^-1 over their sum.
    log_norm = math.log(math.exp(0.5) + math.exp(-1.0))
    expected = 0.6 * (math.log(0.6) - (0.5 - log_norm)) + 0.4 * (math.log(0.4) - (-1.0 - log_norm))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    q1 = math.exp(0.5 - log_norm)
    assert logits.grad.tolist()[0] == pytest.approx([0.0, q1 - 0.6, (1 - q1) - 0.4, 0.0], abs=1e-6)


@pytest.mark.parametrize(
    "call",
    [
        lambda z, y, p, counts: zipf_soft_labels(counts, y[:-1]),  # one label short: scatter took it
        lambda z, y, p, counts: nontarget_kl(z, y[:-1], p),
        lambda z, y, p, counts: zipf_soft_labels(counts, y.float() + 0.7),  # was truncated to the class below
        lambda z, y, p, counts: nontarget_kl(z, y.int(), p),  # cross_entropy (the fused kernel's check) takes no int32
        lambda z, y, p, counts: nontarget_kl(z, y.to("meta"), p),  # gave uninitialised memory
        lambda z, y, p, counts: nontarget_kl(z, y, p.t()),
        lambda z, y, p, counts: nontarget_kl(z, y, p[:, :1]),  # N x 1 would broadcast
        lambda z, y, p, counts: nontarget_kl(z[:0], y[:0], p[:0]),  # the mean of no rows
    ],
    ids=["short-targets-labels", "short-targets-kl", "float-targets", "int32-targets", "targets-elsewhere", "soft-labels-transposed", "soft-labels-one-column", "empty"],
)
def test_inputs_that_do_not_fit_are_refused_by_name(call) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    z, y, counts = torch.randn(6, 5), torch.randint(0, 5, (6,)), torch.randint(0, 5, (6, 5))
    p = zipf_soft_labels(counts, y)
    with pytest.raises(ValueError, match=r"targets|soft_labels|logits"):
        call(z, y, p, counts)


def test_dense_votes_of_an_empty_batch_are_empty() -> None:
    votes = dense_votes(torch.zeros(0, 8, 4, 4), torch.randn(10, 8), torch.randn(10), upsample="bilinear")
    assert votes.shape == (0, 64) and votes.dtype == torch.long


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_are_accepted(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    logits32 = 4 * torch.randn(8, 30)
    logits = logits32.to(dtype).requires_grad_()
    targets = torch.randint(0, 30, (8,))
    soft = zipf_soft_labels(logits.detach(), targets)
    loss = nontarget_kl(logits, targets, soft)
    assert loss.dtype == torch.float32  # computed in float32
    rows = logits.detach().double().tolist()
    soft_ref = [reference_soft_label(r, t) for r, t in zip(rows, targets.tolist())]
    expected = sum(reference_kl(z, t, p) for z, t, p in zip(rows, targets.tolist(), soft_ref)) / 8
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert logits.grad.dtype == dtype
    # eq. 6 on the low-precision values themselves: (Q_c - P_c) / N off the target, exactly 0 on it
    # (the gradient is rounded to the logits' dtype: compared to its rounding)
    expected_grad = torch.zeros(8, 30, dtype=torch.float64)
    for i, (z, y) in enumerate(zip(rows, targets.tolist())):
        denominator = sum(math.exp(v) for k, v in enumerate(z) if k != y)
        for k in range(30):
            if k != y:
                expected_grad[i, k] = (math.exp(z[k]) / denominator - soft_ref[i][k]) / 8
    resolution = 2**-10 if dtype == torch.float16 else 2**-7
    torch.testing.assert_close(logits.grad.double(), expected_grad, rtol=resolution, atol=1e-6)
    assert (logits.grad[torch.arange(8), targets] == 0).all()


# --------------------------------------------------------------------------------------------------
# Dense votes.


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("upsample", [None, "none", "bilinear"])
def test_dense_votes_match_per_pixel_loop(upsample: str | None, channels_last: bool) -> None:
    torch.manual_seed(2)
    feature_map = torch.relu(torch.randn(3, 6, 4, 3))
    weight, bias = torch.randn(9, 6), torch.randn(9)
    if channels_last:
        feature_map = feature_map.contiguous(memory_format=torch.channels_last)
    votes = dense_votes(feature_map, weight, bias, upsample=upsample)
    reference_map = feature_map
    if upsample == "bilinear":
        reference_map = F.interpolate(feature_map, scale_factor=2, mode="bilinear", align_corners=False)
        assert votes.shape == (3, 8 * 6)
    else:
        assert votes.shape == (3, 4 * 3)
    assert votes.dtype == torch.int64
    assert votes.tolist() == reference_dense_votes(reference_map, weight, bias)


def test_dense_votes_in_chunks_match_per_pixel_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    feature_map, weight, bias = torch.randn(5, 4, 3, 3), torch.randn(7, 4), torch.randn(7)
    monkeypatch.setattr(dense_logits_module, "MAX_DENSE_LOGITS", 2 * 7 * 9)  # two samples per chunk
    for fm in (feature_map, feature_map.contiguous(memory_format=torch.channels_last)):
        assert dense_votes(fm, weight, bias).tolist() == reference_dense_votes(feature_map, weight, bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_votes_accept_low_precision_maps(dtype: torch.dtype) -> None:
    torch.manual_seed(4)
    # Well-separated winners so that the low-precision arg-max is unambiguous.
    weight = torch.eye(5, 8) * 4
    feature_map = torch.rand(2, 8, 4, 4)
    votes = dense_votes(feature_map.to(dtype), weight, torch.zeros(5), upsample="bilinear")
    assert votes.shape == (2, 64)
    upsampled = F.interpolate(feature_map.to(dtype).double(), scale_factor=2, mode="bilinear", align_corners=False)
    assert votes.tolist() == reference_dense_votes(upsampled, weight, torch.zeros(5))


@pytest.mark.parametrize(("device", "under_autocast"), [("cpu", False), ("cpu", True), pytest.param("cuda", True, marks=pytest.mark.cuda)])
def test_votes_of_a_bf16_map_are_not_decided_by_rounding_its_logits(device: str, under_autocast: bool) -> None:
    # Autocast multiplies 16-bit features by the 16-bit classifier. Rounding the dense logits to
    # bfloat16 as well would tie the two best classes of many pixels (asserted below), each tie
    # going to the lower class index; the votes must be the exact arg-max of those 16-bit inputs
    # (CUDA: a bf16 x bf16 -> float32 matmul; CPU: float32 products of the 16-bit values).
    generator = torch.Generator().manual_seed(11)
    feature_map = torch.randn(4, 256, 7, 7, generator=generator).relu().bfloat16()
    weight = torch.randn(2000, 256, generator=generator) * 0.05
    bias = torch.randn(2000, generator=generator) * 0.01
    exact = torch.einsum("ndhw,cd->nhwc", feature_map.double(), weight.bfloat16().double()) + bias.double()
    best_two = exact.flatten(1, 2).topk(2, dim=-1)
    rounded_best_two = best_two.values.bfloat16()
    assert (rounded_best_two[..., 0] == rounded_best_two[..., 1]).double().mean() > 0.02
    clear = best_two.values[..., 0] - best_two.values[..., 1] > 1e-5  # far above float32 rounding
    assert clear.double().mean() > 0.99
    on_device = feature_map.to(device).contiguous(memory_format=torch.channels_last)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=under_autocast):
        votes = dense_votes(on_device, weight.to(device), bias.to(device)).cpu()
    assert torch.equal(votes[clear], best_two.indices[..., 0][clear])


def test_dense_logits_average_to_the_global_logits() -> None:
    # GAP and FC are linear, so the classifier applied to the mean of the final map equals the
    # model's logits, and the mean over pixels of the dense (1x1-conv) logits equals them too.
    torch.manual_seed(5)
    model = build_model("cifar_resnet18", num_classes=10, width=8).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 32, 32), features=("final",))
    final = out.features["final"]
    assert final.shape == (3, 64, 4, 4)
    fc = model.classifier
    torch.testing.assert_close(fc(final.mean(dim=(2, 3))), out.logits, atol=1e-5, rtol=1e-5)
    dense = torch.einsum("ndhw,cd->nchw", final, fc.weight) + fc.bias[None, :, None, None]
    torch.testing.assert_close(dense.mean(dim=(2, 3)), out.logits, atol=1e-5, rtol=1e-5)
    votes = dense_votes(final, fc.weight, fc.bias)
    assert votes.tolist() == dense.flatten(2).argmax(dim=1).tolist()


# --------------------------------------------------------------------------------------------------
# No host synchronisation.


def test_functions_never_sync_with_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(6)
    feature_map = torch.randn(4, 16, 4, 4)
    weight, bias = torch.randn(20, 16), torch.randn(20)
    logits = torch.randn(4, 20, requires_grad=True)
    targets = torch.randint(0, 20, (4,))
    model = build_model("cifar_resnet18", num_classes=20, width=8, aux_stages=("penultimate",))
    method = ZipfLabelSmoothing(20, weight=0.5, stages=("final", "penultimate"))
    batch = Batch(inputs=torch.randn(4, 3, 32, 32), targets=targets, indices=torch.arange(4))

    def forbidden(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("host synchronisation")

    # Copies to the host that bypass the dispatcher...
    for name in ("item", "cpu", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    # ...and the operators that wait for the device on CUDA, seen at the dispatcher.
    with NoHostSync():
        votes = dense_votes(feature_map, weight, bias, upsample="bilinear")
        for distribution in DISTRIBUTIONS:
            soft = zipf_soft_labels(vote_counts(votes, 20), targets, distribution=distribution)
        nontarget_kl(logits, targets, soft).backward()
        terms = method.training_step(model, batch)
        terms["loss"].backward()
    monkeypatch.undo()
    assert torch.isfinite(terms["loss"]).item()


class NoHostSync(TorchDispatchMode):
    """Fails on the operators that make the host wait for a CUDA device: reading a value
    (``_local_scalar_dense``: item, bool, int), data-dependent shapes (nonzero, masked_select,
    boolean-mask indexing, unique, bincount, repeat_interleave by a tensor) and comparisons returning
    a Python bool (equal, is_nonzero)."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique_dim", "_unique", "_unique2", "unique_consecutive",
               "bincount", "repeat_interleave", "equal", "is_nonzero"}  # fmt: skip

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = func.overloadpacket.__name__
        boolean_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in (args[1] if len(args) > 1 else ()) or ()
        )
        if name in self.SYNCING or boolean_index:
            raise AssertionError(f"host synchronisation: aten.{name}")
        return func(*args, **(kwargs or {}))


def test_the_sync_detector_catches_boolean_masks_and_value_reads() -> None:
    values = torch.arange(6.0)
    for syncing in (lambda: values[values > 2], lambda: bool(values.sum() > 0), lambda: values.nonzero()):
        with pytest.raises(AssertionError, match="host synchronisation"), NoHostSync():
            syncing()
    with NoHostSync():  # device-side selection is fine
        torch.where(values > 2, values, 0.0)


# --------------------------------------------------------------------------------------------------
# The method, end to end.


def tiny_batch(num_classes: int = 10, n: int = 6) -> Batch:
    generator = torch.Generator().manual_seed(7)
    return Batch(
        inputs=torch.randn(n, 3, 32, 32, generator=generator),
        targets=torch.randint(0, num_classes, (n,), generator=generator),
        indices=torch.arange(n),
    )


def reference_zipf_term(out, model, targets: torch.Tensor, upsample: str | None) -> tuple[float, list[int]]:  # noqa: ANN001
    """The Zipf term of SPEC section 1 from a model output: every voting stage's map (x2 bilinear,
    align_corners=False, in float64, when asked) classified pixel by pixel (the final map by the
    classifier, the penultimate by its auxiliary head's fc, each rounded to the map's dtype), the
    votes of all stages pooled, soft labels and the KL of the logits. Returns (KL, votes per sample)."""
    stages = {"final": model.classifier}
    if "penultimate" in out.features:
        stages["penultimate"] = model.aux_heads["penultimate"].fc
    votes = [[] for _ in range(len(targets))]
    for stage, classifier in stages.items():
        feature_map = out.features[stage]
        weight, bias = classifier.weight.to(feature_map.dtype), classifier.bias.to(feature_map.dtype)
        feature_map = feature_map.double()
        if upsample == "bilinear":
            feature_map = F.interpolate(feature_map, scale_factor=2, mode="bilinear", align_corners=False)
        for row, stage_votes in zip(votes, reference_dense_votes(feature_map, weight, bias)):
            row.extend(stage_votes)
    num_classes = out.logits.shape[1]
    counts = [[row.count(k) for k in range(num_classes)] for row in votes]
    soft = [reference_soft_label(row, t) for row, t in zip(counts, targets.tolist())]
    logits = out.logits.double().tolist()
    kl = sum(reference_kl(z, t, p) for z, t, p in zip(logits, targets.tolist(), soft)) / len(targets)
    return kl, [len(row) for row in votes]


def test_method_end_to_end_dense_final() -> None:
    torch.manual_seed(8)
    method = build_method({"name": "zipf", "weight": 0.3, "upsample": "bilinear", "aux_weight": 0.1}, 10)
    assert isinstance(method, ZipfLabelSmoothing)
    assert method.needs.feature_stages == ("final",) and method.needs.aux_stages == ()
    model = build_model("cifar_resnet18", num_classes=10, width=8, aux_stages=method.needs.aux_stages)
    batch = tiny_batch()
    terms = method.training_step(model, batch)
    assert set(terms) == {"loss", "ce", "zipf", "top1"}  # top1: the batch's training accuracy
    assert all(t.dim() == 0 for t in terms.values())
    torch.testing.assert_close(terms["loss"], terms["ce"] + 0.3 * terms["zipf"])
    assert terms["zipf"].item() > 0
    terms["loss"].backward()
    assert model.classifier.weight.grad is not None and torch.isfinite(model.classifier.weight.grad).all()
    assert model.backbone.stem[0].weight.grad is not None

    # The zipf term is the KL to the soft label built from the 64 votes of the upsampled final map.
    with torch.no_grad():
        out = model(batch.inputs, features=("final",))
        votes = dense_votes(out.features["final"], model.classifier.weight, model.classifier.bias, "bilinear")
        assert votes.shape == (6, 64)
        counts = vote_counts(votes, 10).tolist()
        soft = [reference_soft_label(row, t) for row, t in zip(counts, batch.targets.tolist())]
        expected = sum(reference_kl(z, t, p) for z, t, p in zip(out.logits.double().tolist(), batch.targets.tolist(), soft)) / 6
    assert terms["zipf"].item() == pytest.approx(expected, rel=1e-4)


def test_method_under_bf16_autocast() -> None:
    # The trainer runs training_step under autocast: the dense classification then multiplies in
    # bfloat16 and the KL is still computed in float32.
    torch.manual_seed(10)
    method = ZipfLabelSmoothing(10, weight=0.5, stages=("final", "penultimate"), aux_weight=0.1)
    model = build_model("cifar_resnet18", num_classes=10, width=8, aux_stages=method.needs.aux_stages)
    batch = tiny_batch()
    # The reference reads the step's own forward: a second forward may take other bf16 kernels (on
    # CPUs without native bf16, oneDNN's differ with and without gradients) and cast other votes.
    forwards = []
    hook = model.register_forward_hook(lambda module, args, output: forwards.append(output))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = method.training_step(model, batch)
    hook.remove()
    (out,) = forwards
    assert set(out.features) == {"final", "penultimate"} and "penultimate" in out.aux_logits
    assert out.features["final"].dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 and torch.isfinite(t) for t in terms.values())
    torch.testing.assert_close(terms["loss"], terms["ce"] + 0.5 * terms["zipf"] + 0.1 * terms["aux_ce"])
    # The Zipf term itself: votes of the bf16 maps, KL of the bf16 logits, both in float64 here.
    expected, votes_per_sample = reference_zipf_term(out, model, batch.targets, method.upsample)
    assert votes_per_sample == [64 + 256] * 6  # the default upsample: bilinear x2
    assert terms["zipf"].item() == pytest.approx(expected, rel=1e-4)
    terms["loss"].backward()
    assert torch.isfinite(model.classifier.weight.grad).all()


def test_method_dense2_upsampled_pools_320_votes_per_sample() -> None:
    """The TinyImageNet Dense2 recipe (Table 5, Table 6's Zipf row): both maps upsampled x2 before
    voting, 8x8 + 16x16 = 320 votes per sample at 32 px, pooled into one soft label."""
    torch.manual_seed(12)
    method = ZipfLabelSmoothing(10, weight=1.0, stages=["final", "penultimate"], upsample="bilinear", aux_weight=0.5)
    model = build_model("cifar_resnet18", num_classes=10, width=8, aux_stages=method.needs.aux_stages)
    batch = tiny_batch()
    terms = method.training_step(model, batch)
    with torch.no_grad():
        out = model(batch.inputs, features=("final", "penultimate"), aux=True)
    expected, votes_per_sample = reference_zipf_term(out, model, batch.targets, "bilinear")
    assert votes_per_sample == [64 + 256] * 6
    assert method.votes(out, model).shape == (6, 320)
    assert terms["zipf"].item() == pytest.approx(expected, rel=1e-4)


def test_method_rank_by_logits() -> None:
    method = ZipfLabelSmoothing(10, weight=1.0, rank_by="logits")
    assert method.needs.feature_stages == () and method.needs.aux_stages == ()
    model = build_model("cifar_resnet18", num_classes=10, width=8)
    batch = tiny_batch()
    terms = method.training_step(model, batch)
    torch.testing.assert_close(terms["loss"], terms["ce"] + terms["zipf"])
    with torch.no_grad():
        logits = model(batch.inputs).logits.double().tolist()
    soft = [reference_soft_label(z, t) for z, t in zip(logits, batch.targets.tolist())]
    expected = sum(reference_kl(z, t, p) for z, t, p in zip(logits, batch.targets.tolist(), soft)) / 6
    assert terms["zipf"].item() == pytest.approx(expected, rel=1e-4)
    terms["loss"].backward()


def test_method_dense2_with_auxiliary_head() -> None:
    torch.manual_seed(9)
    method = ZipfLabelSmoothing(10, weight=0.5, stages=["final", "penultimate"], upsample="none", aux_weight=0.25)
    assert method.needs.feature_stages == ("final", "penultimate")
    assert method.needs.aux_stages == ("penultimate",)
    model = build_model("cifar_resnet18", num_classes=10, width=8, aux_stages=method.needs.aux_stages)
    batch = tiny_batch()
    terms = method.training_step(model, batch)
    assert set(terms) == {"loss", "ce", "zipf", "aux_ce", "top1"}
    torch.testing.assert_close(terms["loss"], terms["ce"] + 0.5 * terms["zipf"] + 0.25 * terms["aux_ce"])
    terms["loss"].backward()
    head = model.aux_heads["penultimate"].fc
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0

    # Votes: 4x4 final map through the classifier + 8x8 penultimate map through the aux head's fc.
    with torch.no_grad():
        out = model(batch.inputs, features=("final", "penultimate"), aux=True)
        final = reference_dense_votes(out.features["final"], model.classifier.weight, model.classifier.bias)
        penultimate = reference_dense_votes(out.features["penultimate"], head.weight, head.bias)
        assert len(final[0]) == 16 and len(penultimate[0]) == 64
        counts = [[(f + p).count(k) for k in range(10)] for f, p in zip(final, penultimate)]
        assert method.scores(out, model).tolist() == counts
        aux_ce = F.cross_entropy(out.aux_logits["penultimate"], batch.targets)
    torch.testing.assert_close(terms["aux_ce"], aux_ce)


def test_method_needs_the_auxiliary_head() -> None:
    method = ZipfLabelSmoothing(10, stages=("final", "penultimate"))
    model = build_model("cifar_resnet18", num_classes=10, width=8)  # built without aux_stages
    with pytest.raises(KeyError, match="penultimate"):
        method.training_step(model, tiny_batch())


def test_method_with_two_classes_has_zero_zipf_term() -> None:
    method = ZipfLabelSmoothing(2, weight=1.0)
    model = build_model("cifar_resnet18", num_classes=2, width=8)
    batch = tiny_batch(num_classes=2)
    terms = method.training_step(model, batch)
    assert terms["zipf"].item() == 0.0
    torch.testing.assert_close(terms["loss"], terms["ce"])


def test_config_keys_are_the_constructor_arguments() -> None:
    import inspect
    from pathlib import Path

    import yaml

    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "loss" / "zipf.yaml").read_text())
    parameters = set(inspect.signature(ZipfLabelSmoothing.__init__).parameters) - {"self", "num_classes"}
    assert set(config) - {"name"} == parameters
    assert config["name"] == "zipf"
    assert config["weight"] == "${dataset.zipf.weight}"
    assert config["upsample"] == "${dataset.zipf.upsample}"
    assert config["aux_weight"] == "${dataset.zipf.aux_weight}"
    assert (config["stages"], config["rank_by"], config["distribution"], config["alpha"]) == (["final"], "dense", "zipf", 1.0)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("weight", -0.1),
        ("weight", "0.1"),
        ("weight", float("nan")),
        ("alpha", 0.0),
        ("alpha", -1.0),
        ("distribution", "gaussian"),
        ("rank_by", "votes"),
        ("stages", "final"),
        ("stages", []),
        ("stages", ["penultimate"]),
        ("stages", ["final", "layer3"]),
        ("stages", ["final", "final"]),
        ("upsample", "nearest"),
        ("upsample", "Bilinear"),
        ("aux_weight", -1.0),
    ],
)
def test_bad_options_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"loss.{key}"):
        ZipfLabelSmoothing(10, **{key: value})


def test_logit_ranking_rejects_voting_stages() -> None:
    with pytest.raises(ValueError, match="loss.stages"):
        ZipfLabelSmoothing(10, rank_by="logits", stages=("final", "penultimate"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_step_on_cuda_makes_no_host_sync() -> None:
    device = torch.device("cuda")
    method = ZipfLabelSmoothing(100, weight=0.1, stages=("final", "penultimate"))
    model = build_model("cifar_resnet18", num_classes=100, width=16, aux_stages=method.needs.aux_stages).to(device)
    model = model.to(memory_format=torch.channels_last)
    batch = Batch(
        inputs=torch.randn(32, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last),
        targets=torch.randint(0, 100, (32,), device=device),
        indices=torch.arange(32, device=device),
    )
    method.training_step(model, batch)["loss"].backward()  # warm-up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            terms = method.training_step(model, batch)
        terms["loss"].backward()
        for distribution in DISTRIBUTIONS:
            zipf_soft_labels(torch.randn(256, 10_000, device=device), batch.targets.repeat(8), distribution=distribution)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(terms["loss"]).item()
