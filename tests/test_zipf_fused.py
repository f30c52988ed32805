"""The fused Zipf kernel (losses/zipf_fused.py) against float64 references written from SPEC.md.

The kernel is Triton. Without a GPU it runs in Triton's interpreter, which has to be on before
Triton builds any kernel, so the interpreted cases run in one child process
(tests/run_fused_kernel.py) that reads the inputs written here and writes back the kernel's loss
and gradient. Every expectation is computed here: soft labels by hand where the case is small, else
by plain-Python ranks and weights, the KL by ``reference_kl`` and the gradient by paper eq. 6,
``(Q_c - P_c) / N`` off the target and exactly 0 on it.
"""

from __future__ import annotations

import math
import os
import random
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from test_zipf import reference_dense_votes, reference_kl, reference_ranks
from zipfls_train.data.batch import Batch
from zipfls_train.losses import dense_logits, zipf_fused
from zipfls_train.losses import zipf as zipf_module
from zipfls_train.losses.zipf import ZipfLabelSmoothing, dense_votes, nontarget_kl, vote_counts, zipf_soft_labels
from zipfls_train.losses.zipf_fused import MAX_FUSED_VOTES, DenseMap, fused_ce_zipf, fused_zipf_kl

REPO = Path(__file__).resolve().parents[1]


def triton_or_fail() -> None:
    """Triton comes with torch's Linux wheels; elsewhere these tests cannot run (CI must have it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("Triton is not installed (it ships with torch's Linux wheels)")


# --------------------------------------------------------------------------------------------------
# Independent references (plain Python, float64).


def reference_weights(scores: list[int], distribution: str, alpha: float) -> list[float]:
    ranks, num_classes = reference_ranks(scores), len(scores)
    if distribution == "zipf":
        return [r ** -alpha for r in ranks]
    if distribution == "constant":
        return [1.0] * num_classes
    return [float(num_classes + 1 - r) for r in ranks]  # linear_decay


def reference_label(counts: list[int], target: int, distribution: str, alpha: float) -> list[float]:
    weights = reference_weights(counts, distribution, alpha)
    normaliser = sum(w for c, w in enumerate(weights) if c != target)
    return [0.0 if c == target else w / normaliser for c, w in enumerate(weights)]


def reference_gradient(logits: list[float], target: int, soft: list[float], batch: int) -> list[float]:
    """d KL / d logits of the batch mean: paper eq. 6."""
    denominator = sum(math.exp(z) for c, z in enumerate(logits) if c != target)
    return [0.0 if c == target else (math.exp(z) / denominator - soft[c]) / batch for c, z in enumerate(logits)]


def reference_ce(logits: list[float], target: int) -> float:
    return math.log(sum(math.exp(z) for z in logits)) - logits[target]


def reference_ce_gradient(logits: list[float], target: int, batch: int) -> list[float]:
    denominator = sum(math.exp(z) for z in logits)
    return [(math.exp(z) / denominator - (1.0 if c == target else 0.0)) / batch for c, z in enumerate(logits)]


def histogram(votes: list[int], num_classes: int) -> list[int]:
    counts = [0] * num_classes
    for v in votes:
        counts[v] += 1
    return counts


# --------------------------------------------------------------------------------------------------
# The cases: hand-computed soft labels first, then random ones.


def votes_from(histogram_: dict[int, int]) -> list[int]:
    return [cls for cls, count in histogram_.items() for _ in range(count)]


# name -> (num_classes, target, votes, distribution, alpha, soft label by hand or None)
HAND_CASES = {
    # SPEC worked example: ranks 9 -> 1, 3 -> 2, others -> 3; P_3 = 0.5 / (0.5 + 8/3), others 1/3 / (same).
    "worked_example": (10, 9, votes_from({9: 12, 3: 4}), "zipf", 1.0, [2 / 19] * 3 + [3 / 19] + [2 / 19] * 5 + [0.0]),
    # All votes on the target: every non-target class ties at rank 2, so P is uniform (1/6).
    "all_votes_on_target": (7, 4, votes_from({4: 64}), "zipf", 1.0, [1 / 6] * 4 + [0.0] + [1 / 6] * 2),
    # y = 0 unvoted, votes {1: 3, 2: 1}: ranks 1, 2, then 3 for {0, 3, 4}; weights 1, 1/2, 1/3, 1/3 (sum 13/6).
    "target_without_votes": (5, 0, votes_from({1: 3, 2: 1}), "zipf", 1.0, [0.0, 6 / 13, 3 / 13, 2 / 13, 2 / 13]),
    # Counts 5, 5, 3, 3, 1 with y = 4: ranks 1, 1, 3, 3, 5; weights 1, 1, 1/3, 1/3 (sum 8/3).
    "ties": (5, 4, votes_from({0: 5, 1: 5, 2: 3, 3: 3, 4: 1}), "zipf", 1.0, [3 / 8, 3 / 8, 1 / 8, 1 / 8, 0.0]),
    # Two classes: P is all on the other class and Q too, so the loss and its gradient are 0.
    "two_classes": (2, 1, votes_from({0: 30, 1: 34}), "zipf", 1.0, [1.0, 0.0]),
    # Worked-example ranks, alpha 2: 1/4 / (1/4 + 8/9) and 1/9 / (same) = 9/41 and 4/41.
    "alpha_2": (10, 9, votes_from({9: 12, 3: 4}), "zipf", 2.0, [4 / 41] * 3 + [9 / 41] + [4 / 41] * 5 + [0.0]),
    # Linear decay, worked-example ranks: w = 11 - rank = 9 for class 3, 8 for the other 8 (sum 73).
    "linear_decay": (10, 9, votes_from({9: 12, 3: 4}), "linear_decay", 1.0, [8 / 73] * 3 + [9 / 73] + [8 / 73] * 5 + [0.0]),
    # Constant: uniform over the 9 non-target classes whatever the votes.
    "constant": (10, 2, votes_from({9: 12, 3: 4}), "constant", 1.0, [1 / 9] * 2 + [0.0] + [1 / 9] * 7),
    # Every class voted (so no unvoted class; linear decay would give an unvoted class weight 0):
    # counts 20, 20, 12, 8, 4 with y = 0 -> ranks 1, 1, 3, 4, 5 -> w 5, 5, 3, 2, 1; non-target sum 11.
    "every_class_voted": (5, 0, votes_from({0: 20, 1: 20, 2: 12, 3: 8, 4: 4}), "linear_decay", 1.0, [0.0, 5 / 11, 3 / 11, 2 / 11, 1 / 11]),
}


def random_votes(rng: random.Random, num_classes: int, num_votes: int) -> list[int]:
    """Votes concentrated on a few classes, as a trained network casts them, in shuffled order."""
    favourites = rng.sample(range(num_classes), min(num_classes, rng.randint(1, 6)))
    return [rng.choice(favourites) if rng.random() < 0.8 else rng.randrange(num_classes) for _ in range(num_votes)]


# name -> (batch, num_classes, votes per sample, distribution, alpha, logits dtype, row stride)
RANDOM_CASES = {
    "c10_v64": (4, 10, 64, "zipf", 1.0, torch.float32, 10),
    "c100_v64_alpha_half": (4, 100, 64, "zipf", 0.5, torch.float32, 100),
    "c200_v49_constant": (3, 200, 49, "constant", 1.0, torch.float32, 200),
    "c200_v1": (3, 200, 1, "zipf", 1.0, torch.float32, 200),
    "c300_v7_linear": (3, 300, 7, "linear_decay", 1.0, torch.float32, 300),
    "c1100_v128_two_blocks": (2, 1100, 128, "zipf", 2.0, torch.float32, 1100),
    # More votes than one V x V tile: ranked in chunks (Dense2 at 32 px casts 64 + 256 = 320).
    "c200_v320_dense2": (3, 200, 320, "zipf", 1.0, torch.float32, 200),
    "c50_v196_linear": (3, 50, 196, "linear_decay", 1.0, torch.float32, 50),  # a partial last chunk
    "c10_v320_every_class": (3, 10, 320, "zipf", 0.5, torch.float32, 10),  # every class voted, many ties
    "c1100_v512_most_votes": (2, 1100, MAX_FUSED_VOTES, "zipf", 1.0, torch.bfloat16, 1100),
    "c2100_v49_three_blocks": (2, 2100, 49, "zipf", 1.0, torch.float32, 2100),
    "c200_v64_wide_rows": (3, 200, 64, "zipf", 1.0, torch.float32, 256),
    "c300_v64_bfloat16": (4, 300, 64, "zipf", 1.0, torch.bfloat16, 300),
    "c100_v64_float16": (4, 100, 64, "linear_decay", 1.0, torch.float16, 100),
}


# name -> (batch, num_classes, votes per sample, shift): float32 logits 3 * randn + shift. The loss
# and its gradient do not change with a shift of every logit; the references take the logits less
# the shift (exact in float64), so a kernel that sums or exponentiates the logits as they are, not
# relative to their maximum, loses the digits the shift takes (a float32 ulp is 6e-5 at 1e3, 1e-3 at
# 1e4), where the reference functions (log_softmax) keep them.
SHIFTED_CASES = {
    "c200_v64_shift_1e3": (3, 200, 64, 1e3),
    "c100_v64_shift_minus_1e4": (3, 100, 64, -1e4),
}


# name -> (num_classes, votes per sample, per row: the target logit less the row's largest other
# logit). float32 logits 3 * randn, each row's target logit then set so. The cross-entropy's
# logsumexp over all classes joins the target logit and the non-target logsumexp: each must be taken
# relative to the larger of the two, else exp(200) overflows float32, whichever is the larger (target
# far above the rest: a confident network; far below: a confidently wrong one).
TARGET_OUTLIER_CASES = {
    "c50_v64_target_far_above_and_below": (50, 64, (200.0, -200.0, 0.0)),
}


# name -> (batch, channels, map height, map width, num_classes, upsample, max dense logits or None):
# the kernel casts the votes from the map (classifier over every pixel, bilinear x2 when upsample).
DENSE_CASES = {
    "dense_4x4_up_c10": (3, 8, 4, 4, 10, True, None),  # CIFAR/TinyImageNet: 4x4 -> 64 votes
    "dense_7x7_c150": (2, 6, 7, 7, 150, False, None),  # ImageNet: 49 votes; classes over 5 tiles
    "dense_3x5_up_c40": (2, 5, 3, 5, 40, True, None),  # not square: rows and columns not swapped
    "dense_2x2_up_c3": (2, 4, 2, 2, 3, True, None),  # edge clamping everywhere
    "dense_4x4_up_chunked": (5, 8, 4, 4, 12, True, 2 * 12 * 64),  # two samples per dense chunk
    "dense_7x7_up_c30": (2, 6, 7, 7, 30, True, None),  # 196 votes: more than the kernel casts, torch does
}


def build_cases() -> dict[str, dict]:
    rng = random.Random(0)
    generator = torch.Generator().manual_seed(0)
    cases = {}
    for name, (num_classes, target, votes, distribution, alpha, _) in HAND_CASES.items():
        logits = 2 * torch.randn(3, num_classes, generator=generator)
        cases[name] = {
            "logits": logits, "num_classes": num_classes, "targets": torch.full((3,), target),
            "votes": torch.tensor([votes] * 3), "distribution": distribution, "alpha": alpha,
        }
    for name, (batch, num_classes, num_votes, distribution, alpha, dtype, row_stride) in RANDOM_CASES.items():
        cases[name] = {
            "logits": (3 * torch.randn(batch, row_stride, generator=generator)).to(dtype),
            "num_classes": num_classes,
            "targets": torch.tensor([rng.randrange(num_classes) for _ in range(batch)]),
            "votes": torch.tensor([random_votes(rng, num_classes, num_votes) for _ in range(batch)]),
            "distribution": distribution, "alpha": alpha,
        }
    for name, (batch, channels, height, width, num_classes, upsample, max_dense) in DENSE_CASES.items():
        dense = {
            "feature_map": torch.randn(batch, channels, height, width, generator=generator),
            "weight": torch.randn(num_classes, channels, generator=generator),
            "bias": torch.randn(num_classes, generator=generator),
            "upsample": upsample,
        }
        if max_dense is not None:
            dense["max_dense_logits"] = max_dense
        cases[name] = {
            "logits": 3 * torch.randn(batch, num_classes, generator=generator), "num_classes": num_classes,
            "targets": torch.tensor([rng.randrange(num_classes) for _ in range(batch)]),
            "votes": None, "dense": dense, "distribution": "zipf", "alpha": 1.0,
        }
    for name, (batch, num_classes, num_votes, shift) in SHIFTED_CASES.items():
        cases[name] = {
            "logits": 3 * torch.randn(batch, num_classes, generator=generator) + shift, "shift": shift,
            "num_classes": num_classes,
            "targets": torch.tensor([rng.randrange(num_classes) for _ in range(batch)]),
            "votes": torch.tensor([random_votes(rng, num_classes, num_votes) for _ in range(batch)]),
            "distribution": "zipf", "alpha": 1.0,
        }
    for name, (num_classes, num_votes, offsets) in TARGET_OUTLIER_CASES.items():
        logits = 3 * torch.randn(len(offsets), num_classes, generator=generator)
        targets = torch.tensor([rng.randrange(num_classes) for _ in offsets])
        for row, (target, offset) in enumerate(zip(targets.tolist(), offsets)):
            others = torch.cat([logits[row, :target], logits[row, target + 1 :]])
            logits[row, target] = others.max() + offset
        cases[name] = {
            "logits": logits, "num_classes": num_classes, "targets": targets,
            "votes": torch.tensor([random_votes(rng, num_classes, num_votes) for _ in offsets]),
            "distribution": "zipf", "alpha": 1.0,
        }
    return cases


def reference_votes(case: dict) -> list[list[int]]:
    """The case's votes, or for a dense case the per-pixel float64 loop's (after a bilinear x2
    upsample of the map when asked: classifying upsampled features, the SPEC's order)."""
    if "dense" not in case:
        return case["votes"].tolist()
    dense = case["dense"]
    feature_map = dense["feature_map"]
    if dense["upsample"]:
        feature_map = torch.nn.functional.interpolate(feature_map.double(), scale_factor=2, mode="bilinear", align_corners=False)
    return reference_dense_votes(feature_map, dense["weight"], dense["bias"])


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    triton_or_fail()
    folder = tmp_path_factory.mktemp("fused")
    cases = build_cases()
    torch.save(cases, folder / "cases.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "run_fused_kernel.py"), str(folder / "cases.pt"), str(folder / "results.pt")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return cases, torch.load(folder / "results.pt")


COMBINED_WEIGHT = 0.7  # as tests/run_fused_kernel.py


def expected_for(case: dict) -> dict:
    """Batch-mean KL and CE and their logits gradients (rows), from the references, in float64."""
    num_classes = case["num_classes"]
    # The values the kernel saw (bf16 already rounded), less the case's shift (which changes nothing).
    logits = (case["logits"][:, :num_classes].double() - case.get("shift", 0.0)).tolist()
    batch = len(logits)
    expected = {"kl": 0.0, "ce": 0.0, "kl_grad": [], "ce_grad": []}
    for row, target, votes in zip(logits, case["targets"].tolist(), reference_votes(case)):
        soft = reference_label(histogram(votes, num_classes), target, case["distribution"], case["alpha"])
        expected["kl"] += reference_kl(row, target, soft) / batch
        expected["ce"] += reference_ce(row, target) / batch
        expected["kl_grad"].append(reference_gradient(row, target, soft, batch))
        expected["ce_grad"].append(reference_ce_gradient(row, target, batch))
    return {key: torch.tensor(value, dtype=torch.float64) if key.endswith("grad") else value for key, value in expected.items()}


@pytest.mark.parametrize("name", list(HAND_CASES))
def test_hand_soft_labels_are_what_the_references_use(name: str) -> None:
    """Guards the references themselves: the plain-Python ranks and weights reproduce every
    hand-derived soft label above (so the random cases rest on checked ground)."""
    num_classes, target, votes, distribution, alpha, by_hand = HAND_CASES[name]
    soft = reference_label(histogram(votes, num_classes), target, distribution, alpha)
    assert soft == pytest.approx(by_hand, abs=1e-12)


def assert_gradient(result: dict, expected: torch.Tensor, case: dict) -> None:
    assert result["grad_dtype"] == str(case["logits"].dtype)  # the gradient comes back in the logits' dtype
    # float32 gradients to float32 rounding; half/bfloat16 ones to their own rounding (8 / 11 bits).
    rtol = 1e-5 if case["logits"].dtype == torch.float32 else 8e-3
    torch.testing.assert_close(result["grad"].double(), expected, rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("name", [*HAND_CASES, *RANDOM_CASES, *SHIFTED_CASES, *TARGET_OUTLIER_CASES, *DENSE_CASES])
def test_kl_kernel_matches_the_references(interpreted: tuple[dict, dict], name: str) -> None:
    cases, results = interpreted
    case, result, expected = cases[name], results[name]["kl"], expected_for(cases[name])
    assert result["loss"] == pytest.approx(expected["kl"], rel=1e-5, abs=1e-6)
    assert_gradient(result, expected["kl_grad"], case)
    targets = case["targets"]
    assert result["grad"][torch.arange(len(targets)), targets].abs().max().item() == 0.0  # exactly 0 at the target
    if name == "two_classes":
        assert result["loss"] == 0.0 and result["grad"].abs().max().item() == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("name", [*HAND_CASES, *RANDOM_CASES, *SHIFTED_CASES, *TARGET_OUTLIER_CASES, *DENSE_CASES])
def test_ce_plus_zipf_kernel_matches_the_references(interpreted: tuple[dict, dict], name: str) -> None:
    cases, results = interpreted
    case, result, expected = cases[name], results[name]["combined"], expected_for(cases[name])
    assert result["ce"] == pytest.approx(expected["ce"], rel=1e-5, abs=1e-6)
    assert result["kl"] == pytest.approx(expected["kl"], rel=1e-5, abs=1e-6)
    assert result["loss"] == pytest.approx(expected["ce"] + COMBINED_WEIGHT * expected["kl"], rel=1e-5, abs=1e-6)
    assert result["terms_require_grad"] is False  # the terms are reported values; the loss carries the gradient
    assert_gradient(result, expected["ce_grad"] + COMBINED_WEIGHT * expected["kl_grad"], case)


@pytest.mark.parametrize(("recipe", "path"), [("method", "triton"), ("method", "compiled"), ("dense2", "triton")])
def test_method_step_with_the_kernel_equals_the_reference_path(interpreted: tuple[dict, dict], recipe: str, path: str) -> None:
    """A whole training step (dense votes of a real CIFAR ResNet-18, CE + 0.7 x Zipf; Dense2: the
    final and penultimate maps, 320 votes per sample, and the auxiliary head's CE): the kernel, eager
    and inside torch.compile's graph (fullgraph, Inductor), and the reference functions, themselves
    checked against the float64 references in test_zipf.py, give the same loss terms and parameter
    gradients; the kernel ran once per step (so the compiled step did use it)."""
    _, results = interpreted
    fused, reference = results[recipe][path], results[recipe]["torch"]
    assert fused["kernel_launches"] == 1 and reference["kernel_launches"] == 0
    assert fused["terms"] == pytest.approx(reference["terms"], rel=1e-5)
    assert fused["terms"]["zipf"] > 0
    assert fused["grads"].keys() == reference["grads"].keys()
    for name, grad in reference["grads"].items():
        torch.testing.assert_close(fused["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_kernel_checked_itself_and_the_custom_op_passes_opcheck(interpreted: tuple[dict, dict]) -> None:
    _, results = interpreted
    # The first call ran the kernel twice (the float32 comparison, then the step) and it passed.
    assert results["first_call"] == {"kernel_launches": 2, "kernel_state": {"cpu": "checked"}}
    assert results["opcheck"] == {"worked_example": "ok", "dense_4x4_up_c10": "ok"}


# --------------------------------------------------------------------------------------------------
# The upstream gradient. Training never differentiates the loss alone: GradScaler multiplies it by
# its scale (fp16), gradient accumulation divides it by the number of steps. The kernel's backward
# must multiply its saved gradient by what arrives, on the eager path (the autograd.Function) and
# on the compiled path (the custom op's registered autograd, which eager calls of the op use too).

UPSTREAM_SCALE = 2.5

UPSTREAM_CHILD = r"""
import sys
import torch
from zipfls_train.losses import zipf_fused
from zipfls_train.losses.zipf_fused import DenseMap, fused_ce_zipf, fused_zipf_kl

cases = torch.load(sys.argv[1])
zipf_fused._kernel_state["cpu"] = "checked"  # the kernel itself, not the first call's comparison
scale, weight, out = float(sys.argv[3]), float(sys.argv[4]), {}
for name, case in cases.items():
    votes = case["votes"]
    if "dense" in case:
        d = case["dense"]
        votes = DenseMap(d["feature_map"], d["weight"], d["bias"], d["upsample"])
    args = (case["targets"], votes)
    grads = {}
    for path in ("eager_kl", "eager_combined", "custom_op"):
        logits = case["logits"].clone().requires_grad_()
        if path == "eager_kl":
            loss = fused_zipf_kl(logits, *args, case["alpha"], case["distribution"])
        elif path == "eager_combined":
            loss, _, _ = fused_ce_zipf(logits, *args, weight, case["alpha"], case["distribution"])
        else:  # the op torch.compile's graph calls; its autograd is _op_backward
            source = zipf_fused._vote_source(votes)
            totals, _ = torch.ops.zipfls_train.ce_zipf(logits, case["targets"], *source, case["alpha"], case["distribution"], weight, True, False)
            loss = totals[0]
        (scale * loss).backward()
        grads[path] = logits.grad.clone()
    out[name] = grads
torch.save(out, sys.argv[2])
"""


def test_kernel_backward_multiplies_by_the_upstream_gradient(tmp_path: Path) -> None:
    """``(2.5 * loss).backward()`` through the kernel (Triton's interpreter) gives 2.5 x the float64
    gradient of paper eq. 6 (plus CE's ``(softmax - onehot) / N``): on the eager autograd.Function
    (the KL alone and CE + 0.7 KL) and on the custom op torch.compile calls. A backward returning
    the saved gradient unscaled gave exactly 1/2.5 of it and passed every unit-gradient test."""
    triton_or_fail()
    cases = {name: case for name, case in build_cases().items() if name in ("worked_example", "c100_v64_alpha_half", "dense_4x4_up_c10")}
    torch.save(cases, tmp_path / "cases.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", UPSTREAM_CHILD, str(tmp_path / "cases.pt"), str(tmp_path / "grads.pt"), str(UPSTREAM_SCALE), str(COMBINED_WEIGHT)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = torch.load(tmp_path / "grads.pt")
    for name, case in cases.items():
        expected = expected_for(case)
        combined = expected["ce_grad"] + COMBINED_WEIGHT * expected["kl_grad"]
        for path, reference in (("eager_kl", expected["kl_grad"]), ("eager_combined", combined), ("custom_op", combined)):
            torch.testing.assert_close(results[name][path].double(), UPSTREAM_SCALE * reference, rtol=1e-5, atol=1e-7, msg=f"{name}, {path}")


# --------------------------------------------------------------------------------------------------
# The real compiler, without a GPU: Triton builds the kernel for a given GPU architecture on the CPU
# (ptxas ships with it), which catches what the interpreter lets through (types, layouts) and
# shows the register use.


@pytest.mark.parametrize(
    ("capability", "block_v", "block_c", "num_warps"),
    [(90, 64, 256, 4), (90, 64, 256, 16), (90, 128, 1024, 8), (80, 16, 16, 4), (90, 512, 256, 8), (80, 256, 1024, 8)],
)
def test_kernel_compiles_for_gpus_without_spilling(capability: int, block_v: int, block_c: int, num_warps: int, tmp_path: Path) -> None:
    triton_or_fail()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def signature(votes_from: int) -> dict:  # votes_ptr: class indices, or bf16 dense logits
        return {
            "logits_ptr": "*bf16", "logits_row_stride": "i32", "targets_ptr": "*i64", "votes_ptr": "*i64" if votes_from == 0 else "*bf16",
            "votes_row_stride": "i32", "grad_ptr": "*bf16", "rows_ptr": "*fp32", "batch": "i32", "num_classes": "i32",
            "num_votes": "i32", "map_height": "i32", "map_width": "i32", "alpha": "fp32", "weight": "fp32",
            "DISTRIBUTION": "constexpr", "WITH_CE": "constexpr", "VOTES_FROM": "constexpr",
            "BLOCK_V": "constexpr", "BLOCK_C": "constexpr", "BLOCK_CV": "constexpr", "BLOCK_T": "constexpr",
        }
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    variants = [(d, True, 2) for d in range(3)] + [(0, False, 0), (0, True, 0), (0, True, 1)]
    if block_v > zipf_fused.MAX_CAST_VOTES:  # beyond it the votes are given (torch casts them)
        variants = [(d, with_ce, 0) for d, with_ce in [(0, True), (1, True), (2, True), (0, False)]]
    for distribution, with_ce, votes_from in variants:
        constants = {"DISTRIBUTION": distribution, "WITH_CE": with_ce, "VOTES_FROM": votes_from,
                     "BLOCK_V": block_v, "BLOCK_C": block_c, "BLOCK_CV": zipf_fused.LaunchConfig().vote_class_block(block_v),
                     "BLOCK_T": zipf_fused._RANK_CHUNK}
        source = ASTSource(fn=zipf_fused._zipf_kernel, signature=signature(votes_from), constexprs=constants)
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps})
        cubin = tmp_path / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(tool), "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
        assert "LOCAL:0" in usage and "STACK:0" in usage, (constants, usage)  # no register spills (to local memory or the stack)


# --------------------------------------------------------------------------------------------------
# Launch configs: how the kernel is launched (warps, vote tile), for scripts/bench_zipf_kernel.py.


class RecordedLaunch:
    """Stands in for the Triton kernel: ``kernel[grid](...)`` records the launch's keyword arguments."""

    def __init__(self) -> None:
        self.launches: list[dict] = []

    def __getitem__(self, grid: tuple):  # noqa: ANN204
        return lambda *args, **kwargs: self.launches.append({"grid": grid, **kwargs})


@pytest.mark.parametrize(
    ("config", "num_votes", "warps", "vote_classes"),
    [
        (None, 64, 4, 16),  # the default: 1,024-element vote tile over 64 lanes, 4 warps up to 64 votes
        (None, 128, 8, 16),  # 8 warps beyond 64 votes; the tile floor of 16 classes
        (None, 16, 4, 64),
        ((16, 4096), 64, 16, 64),
        ((8, 2048), 64, 8, 32),
        ((8, None), 49, 8, 16),  # given votes (BLOCK_V 64): only the warps change
    ],
)
def test_a_launch_config_sets_the_kernels_warps_and_vote_tile(monkeypatch: pytest.MonkeyPatch, config: tuple | None, num_votes: int,
                                                              warps: int, vote_classes: int) -> None:
    triton_or_fail()
    recorded = RecordedLaunch()
    monkeypatch.setattr(zipf_fused, "_zipf_kernel", recorded)
    logits, targets = torch.randn(3, 200), torch.tensor([0, 5, 7])
    votes = torch.randint(200, (3, num_votes))
    options = (votes, zipf_fused._GIVEN_VOTES, 1, 1, 1.0, "zipf", 1.0, True)
    if config is None:
        zipf_fused._run_kernel(logits, targets, *options)
    else:
        warps_set, tile = config
        with zipf_fused.launched_with(zipf_fused.LaunchConfig(warps_set, *([tile] if tile else []))):
            zipf_fused._run_kernel(logits, targets, *options)
    (launch,) = recorded.launches
    assert (launch["grid"], launch["num_warps"], launch["BLOCK_CV"]) == ((3,), warps, vote_classes)


def test_by_default_the_kernel_casting_votes_runs_16_warps_and_with_given_votes_4(monkeypatch: pytest.MonkeyPatch) -> None:
    # 16 warps halved the kernel's time where it casts the votes (the 32 px recipe) on an H200; with
    # given votes (224 px) 4 and 8 were within 5%, 16 slower (experiments/gpu_h200_2026-11-29.md).
    triton_or_fail()
    recorded = RecordedLaunch()
    monkeypatch.setattr(zipf_fused, "_zipf_kernel", recorded)
    logits, targets = torch.randn(3, 200), torch.tensor([0, 5, 7])
    dense = torch.randn(3, 16, 200)  # a 4 x 4 map's dense logits: 64 votes once upsampled
    zipf_fused._run_kernel(logits, targets, dense, zipf_fused._UPSAMPLED_DENSE_LOGITS, 4, 4, 1.0, "zipf", 1.0, True)
    zipf_fused._run_kernel(logits, targets, torch.randint(200, (3, 49)), zipf_fused._GIVEN_VOTES, 1, 1, 1.0, "zipf", 1.0, True)
    assert [(launch["num_warps"], launch["BLOCK_V"]) for launch in recorded.launches] == [(16, 64), (4, 64)]


def test_launched_with_restores_the_default_after_its_block_even_on_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    triton_or_fail()
    recorded = RecordedLaunch()
    monkeypatch.setattr(zipf_fused, "_zipf_kernel", recorded)
    options = (torch.zeros(2, 64, dtype=torch.long), zipf_fused._GIVEN_VOTES, 1, 1, 1.0, "zipf", 1.0, True)
    with pytest.raises(KeyError), zipf_fused.launched_with(zipf_fused.LaunchConfig(16, 4096)):
        raise KeyError("inside the block")
    zipf_fused._run_kernel(torch.randn(2, 10), torch.tensor([1, 2]), *options)
    assert (recorded.launches[0]["num_warps"], recorded.launches[0]["BLOCK_CV"]) == (4, 16)


@pytest.mark.parametrize(
    ("grad_scale", "totals_scale", "grad_size", "only_bf16", "message"),
    [
        (1.0, 1.0, 1.0, False, ""),
        (1 + 1e-6, 1.0, 100.0, False, ""),  # within float32's 1e-5 of the largest gradient, however large
        (1 + 1e-3, 1.0, 100.0, False, "differs from the default in float32: loss terms by 0.00e+00, gradient by 1.00e-03 (relative)"),
        (1.0, 1 + 1e-3, 1.0, False, "differs from the default in float32: loss terms by 1.00e-03, gradient by 0.00e+00 (relative)"),
        (float("nan"), 1.0, 1.0, False, "differs from the default in float32: loss terms by 0.00e+00, gradient by nan (relative)"),
        (1.05, 1.0, 1.0, True, "differs from the default in bfloat16: loss terms by 0.00e+00, gradient by 5.00e-02 (relative)"),
    ],
)
def test_the_benchmarks_check_names_a_launch_config_that_computes_otherwise(
    monkeypatch: pytest.MonkeyPatch, grad_scale: float, totals_scale: float, grad_size: float, only_bf16: bool, message: str
) -> None:
    """bench_zipf_kernel.check_config against a stand-in kernel whose non-default launches scale the
    gradient or the loss terms (in bf16 only, where ``only_bf16``)."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import bench_zipf_kernel

    def stand_in(logits, targets, *options):  # noqa: ANN001, ANN202
        off = zipf_fused._launch_config != zipf_fused.LaunchConfig() and (logits.dtype == torch.bfloat16 or not only_bf16)
        totals = torch.ones(3, device=logits.device) * (totals_scale if off else 1.0)
        return totals, torch.full(logits.shape, grad_size * (grad_scale if off else 1.0), dtype=torch.float32)

    monkeypatch.setattr(zipf_fused, "_run_kernel", stand_in)
    problem = bench_zipf_kernel.check_config(bench_zipf_kernel.CASES[1], zipf_fused.LaunchConfig(16, 4096), torch.device("cpu"), 2)
    assert problem == message


def test_the_benchmark_refuses_a_batch_for_its_step_part() -> None:
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_zipf_kernel.py"), "--device", "cpu", "--batch", "4"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--batch needs --kernel-only" in done.stderr, done.stderr


def test_every_benchmarked_launch_config_computes_what_the_default_does(tmp_path: Path) -> None:
    """scripts/bench_zipf_kernel.py --quick in Triton's interpreter: it checks each candidate
    config's loss and gradient against the default config's before timing it (32 px cases: the
    vote tile changes the kernel's loop over the classes) and exits with the difference otherwise."""
    triton_or_fail()
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_zipf_kernel.py"), "--device", "cpu", "--quick"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    timed = set(re.findall(r"^kernel (\S+) +(warps \d+, tile \d+) +[\d.]+ us", done.stdout, flags=re.M))
    for case in ("32px_c100", "32px_c200"):
        assert {(case, "warps 4, tile 1024"), (case, "warps 8, tile 2048"), (case, "warps 16, tile 4096")} <= timed, done.stdout


# --------------------------------------------------------------------------------------------------
# Choosing the path (in this process: no interpreter, no GPU).


def tiny_outputs_and_model(num_classes: int = 10) -> tuple:
    from zipfls_train.models import build_model

    torch.manual_seed(0)
    model = build_model("cifar_resnet18", num_classes=num_classes, width=8)
    batch = Batch(inputs=torch.randn(4, 3, 32, 32), targets=torch.tensor([0, 1, 2, 3]), indices=torch.arange(4))
    return model, batch


def test_auto_uses_the_reference_path_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the fused kernel must not run on the CPU under kernel=auto")

    monkeypatch.setattr(zipf_module, "fused_ce_zipf", fail)
    model, batch = tiny_outputs_and_model()
    terms = ZipfLabelSmoothing(10, kernel="auto").training_step(model, batch)
    assert torch.isfinite(terms["zipf"]).item() and terms["zipf"].item() > 0


def test_forced_kernel_off_the_gpu_names_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    triton_or_fail()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model, batch = tiny_outputs_and_model()
    with pytest.raises(RuntimeError, match=r"loss.kernel=triton, but the logits are on cpu.*TRITON_INTERPRET"):
        ZipfLabelSmoothing(10, kernel="triton").training_step(model, batch)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fused_zipf_kl(torch.randn(2, 5), torch.tensor([0, 1]), torch.tensor([[1, 2], [3, 4]]))


def test_too_many_votes_for_the_kernel_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    triton_or_fail()
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # get past the device check; the vote check must stop it
    votes = torch.zeros(2, MAX_FUSED_VOTES + 1, dtype=torch.long)
    with pytest.raises(RuntimeError, match=f"{MAX_FUSED_VOTES + 1} votes, more than the kernel's {MAX_FUSED_VOTES}"):
        fused_zipf_kl(torch.randn(2, 5), torch.tensor([0, 1]), votes)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kernel": "cuda"}, r"loss.kernel must be one of \['auto', 'torch', 'triton'\], got 'cuda'"),
        ({"kernel": "triton", "distribution": "random_uniform"}, "loss.kernel=triton computes rank_by=dense"),
        ({"kernel": "triton", "rank_by": "logits"}, "loss.kernel=triton computes rank_by=dense"),
    ],
)
def test_bad_kernel_choices_name_the_key(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ZipfLabelSmoothing(10, **options)


@pytest.mark.parametrize("name", [*HAND_CASES, *RANDOM_CASES, *SHIFTED_CASES, *TARGET_OUTLIER_CASES, *DENSE_CASES])
def test_kernel_stand_in_matches_the_references(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``zipf_fused._reference``, what the first call compares the kernel with and what replaces a
    kernel that failed, computes the kernel's outputs: [loss, ce, kl] and the gradient (written out
    from eq. 6, not by autograd), from the votes or from the dense logits the kernel would read."""
    case = build_cases()[name]
    votes = case["votes"]
    if "dense" in case:
        dense = case["dense"]
        monkeypatch.setattr(dense_logits, "MAX_DENSE_LOGITS", dense.get("max_dense_logits", dense_logits.MAX_DENSE_LOGITS))
        votes = DenseMap(dense["feature_map"], dense["weight"], dense["bias"], dense["upsample"])
    logits = case["logits"][:, : case["num_classes"]]
    options = (*zipf_fused._vote_source(votes), case["alpha"], case["distribution"], COMBINED_WEIGHT, True)
    totals, grad = zipf_fused._reference(logits, case["targets"], *options)
    expected = expected_for(case)
    assert totals.tolist() == pytest.approx([expected["ce"] + COMBINED_WEIGHT * expected["kl"], expected["ce"], expected["kl"]], rel=1e-5, abs=1e-6)
    assert grad.dtype == logits.dtype
    rtol = 1e-5 if logits.dtype == torch.float32 else 8e-3
    torch.testing.assert_close(grad.double(), expected["ce_grad"] + COMBINED_WEIGHT * expected["kl_grad"], rtol=rtol, atol=1e-7)


@pytest.fixture
def kernel_as_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The path choice of a GPU on the CPU: auto and triton take the fused path, torch the reference
    functions, the device check passes (the interpreter flag; the tests replace the kernel launch
    itself) and no device has been checked."""
    triton_or_fail()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(zipf_fused, "_kernel_state", {})
    monkeypatch.setattr(ZipfLabelSmoothing, "_kernel_applies", lambda self, outputs: self.kernel != "torch")


def test_a_kernel_that_fails_to_build_falls_back_once_with_a_warning(kernel_as_on_a_gpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def broken(*args):  # noqa: ANN002, ANN202
        calls.append(1)
        raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(zipf_fused, "_run_kernel", broken)
    method = ZipfLabelSmoothing(10, kernel="auto")
    model, batch = tiny_outputs_and_model()
    with pytest.warns(RuntimeWarning, match="PTX assembly failed.*loss.kernel=torch"):
        first = method.training_step(model, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second attempt, no second warning
        second = method.training_step(model, batch)
    assert calls == [1]
    reference = ZipfLabelSmoothing(10, kernel="torch").training_step(model, batch)
    assert first["loss"].item() == pytest.approx(reference["loss"].item(), rel=1e-6)
    assert second["zipf"].item() == pytest.approx(reference["zipf"].item(), rel=1e-6)
    # The stand-in's gradient is the reference path's.
    first["loss"].backward()
    stand_in_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference["loss"].backward()
    for stand_in, expected in zip(stand_in_grads, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(stand_in, expected, rtol=1e-4, atol=1e-6)


def test_a_kernel_that_computes_wrong_numbers_is_caught_on_its_first_call(kernel_as_on_a_gpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that builds but miscomputes (here: the KL's gradient dropped) is compared with the
    reference functions on its first call: auto warns with the numbers and uses the reference,
    triton raises."""

    def ce_gradient_only(logits, targets, *options):  # noqa: ANN001, ANN002, ANN202
        totals, _ = zipf_fused._reference(logits, targets, *options)
        ce_grad = (torch.softmax(logits.float(), dim=1) - torch.nn.functional.one_hot(targets, logits.shape[1])) / len(targets)
        return totals, ce_grad.to(logits.dtype)  # right values, wrong gradient

    monkeypatch.setattr(zipf_fused, "_run_kernel", ce_gradient_only)
    model, batch = tiny_outputs_and_model()
    with pytest.raises(RuntimeError, match="disagrees with the reference functions on its first call"):
        ZipfLabelSmoothing(10, kernel="triton").training_step(model, batch)
    assert zipf_fused._kernel_state == {}  # not marked: the next call checks again
    with pytest.warns(RuntimeWarning, match="disagrees with the reference functions on its first call.*gradient difference"):
        ZipfLabelSmoothing(10, kernel="auto").training_step(model, batch)
    assert zipf_fused._kernel_state == {"cpu": "failed"}
    # A later run asking for the kernel itself (loss.kernel=triton in the same sweep process) is
    # refused again, not handed the reference functions in its place.
    with pytest.raises(RuntimeError, match="disagrees with the reference functions on its first call"):
        ZipfLabelSmoothing(10, kernel="triton").training_step(model, batch)


def test_near_tie_samples_are_those_with_a_pixel_whose_two_best_classes_almost_tie() -> None:
    # 4 samples of 2 x 2 dense logits over 3 classes, every pixel alike: class 1 vs class 2 tie
    # exactly (sample 1), differ by 5e-6 (sample 3: within the tolerance) or by 1e-3 (sample 2).
    dense = torch.zeros(4, 4, 3)
    dense[0, :, 0] = 5.0
    dense[1, :, 1], dense[1, :, 2] = 1.0, 1.0
    dense[2, :, 1], dense[2, :, 2] = 1.001, 1.0
    dense[3, :, 1], dense[3, :, 2] = 1.000005, 1.0
    assert zipf_fused._near_tie_samples(dense, 2, 2).tolist() == [False, True, False, True]


@pytest.mark.parametrize(("perturbed_sample", "passes"), [(1, True), (0, False)])
def test_the_first_call_check_leaves_out_only_samples_whose_votes_may_flip(monkeypatch: pytest.MonkeyPatch, perturbed_sample: int, passes: bool) -> None:
    """A kernel that disagrees on a sample with a near-tie pixel (its own upsampling may flip that
    vote) passes the check; the same disagreement on any other sample does not."""
    generator = torch.Generator().manual_seed(3)
    dense = torch.randn(3, 4, 6, generator=generator)
    dense[1, 2, 4] = dense[1, 2].max() + 1.0
    dense[1, 2, 5] = dense[1, 2, 4]  # sample 1: one map pixel (so the upsampled ones there) ties exactly
    logits, targets = torch.randn(3, 6, generator=generator), torch.tensor([0, 1, 2])
    options = (dense, zipf_fused._UPSAMPLED_DENSE_LOGITS, 2, 2, 1.0, "zipf", 0.5, True)

    def disagreeing_on_one_sample(*args):  # noqa: ANN002, ANN202
        totals, grad = zipf_fused._reference(*args)
        grad = grad.clone()
        grad[perturbed_sample] += 0.01
        return totals * 1.01, grad

    monkeypatch.setattr(zipf_fused, "_run_kernel", disagreeing_on_one_sample)
    if passes:
        zipf_fused._check_against_reference(logits, targets, *options)
    else:
        with pytest.raises(RuntimeError, match="disagrees with the reference"):
            zipf_fused._check_against_reference(logits, targets, *options)


def test_a_kernel_that_worked_and_then_fails_raises(kernel_as_on_a_gpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback is for a kernel that cannot be built here; once it has run, a failure (out of
    memory, say) is reported like any other, not hidden behind a switch of path."""
    calls = []

    def works_twice(*args):  # noqa: ANN002, ANN202
        calls.append(1)
        if len(calls) > 2:  # the first call runs it twice: the float32 check, then the step
            raise RuntimeError("CUDA out of memory")
        return zipf_fused._reference(*args)

    monkeypatch.setattr(zipf_fused, "_run_kernel", works_twice)
    method = ZipfLabelSmoothing(10, kernel="auto")
    model, batch = tiny_outputs_and_model()
    method.training_step(model, batch)
    assert zipf_fused._kernel_state == {"cpu": "checked"}
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        method.training_step(model, batch)


# --------------------------------------------------------------------------------------------------
# On a GPU (scripts/gpu_check.sh): the compiled kernel against the reference functions.


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("batch", "num_classes", "num_votes", "distribution", "dtype"),
    [
        (128, 100, 64, "zipf", torch.float32),
        (128, 200, 64, "zipf", torch.bfloat16),
        (64, 1000, 49, "linear_decay", torch.float32),
        (256, 10_000, 49, "zipf", torch.bfloat16),
        (32, 50, MAX_FUSED_VOTES, "constant", torch.float16),
        (128, 200, 320, "zipf", torch.bfloat16),  # Dense2 at 32 px: ranked in chunks
    ],
)
def test_kernel_on_cuda_matches_the_reference_functions(batch: int, num_classes: int, num_votes: int, distribution: str, dtype: torch.dtype) -> None:
    device = torch.device("cuda")
    generator = torch.Generator(device="cpu").manual_seed(0)
    logits = (3 * torch.randn(batch, num_classes, generator=generator)).to(device=device, dtype=dtype)
    targets = torch.randint(0, num_classes, (batch,), generator=generator).to(device)
    votes = torch.randint(0, min(num_classes, 20), (batch, num_votes), generator=generator).to(device)
    fused_logits = logits.clone().requires_grad_()
    fused = fused_zipf_kl(fused_logits, targets, votes, 1.0, distribution)
    fused.backward()
    reference_logits = logits.double().requires_grad_()
    soft = zipf_soft_labels(vote_counts(votes, num_classes), targets, 1.0, distribution).double()
    reference = nontarget_kl(reference_logits, targets, soft)
    reference.backward()
    torch.testing.assert_close(fused.double(), reference, rtol=1e-5, atol=1e-6)
    rtol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(fused_logits.grad.double(), reference_logits.grad, rtol=rtol, atol=1e-7)
    # CE + 0.7 KL in one kernel against F.cross_entropy + 0.7 x the reference KL (float64).
    fused_logits.grad, reference_logits.grad = None, None
    loss, ce, kl = fused_ce_zipf(fused_logits, targets, votes, 0.7, 1.0, distribution)
    loss.backward()
    reference_ce = torch.nn.functional.cross_entropy(reference_logits, targets)
    (reference_ce + 0.7 * nontarget_kl(reference_logits, targets, soft)).backward()
    torch.testing.assert_close(ce.double(), reference_ce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl.double(), reference.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_logits.grad.double(), reference_logits.grad, rtol=rtol, atol=1e-7)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_kernel_casting_the_votes_on_cuda_matches_the_reference_path(precision: str) -> None:
    """The 32 px recipe on a GPU: the kernel upsamples the dense logits of a 4x4 map and takes the
    votes itself; the reference path does it with F.interpolate + argmax + the reference functions."""
    device = torch.device("cuda")
    generator = torch.Generator(device="cpu").manual_seed(1)
    feature_map = torch.randn(128, 512, 4, 4, generator=generator).to(device).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(200, 512, generator=generator).to(device) / 20, torch.randn(200, generator=generator).to(device)
    logits = (3 * torch.randn(128, 200, generator=generator)).to(device)
    targets = torch.randint(0, 200, (128,), generator=generator).to(device)
    if precision == "bf16":  # the map a bf16 autocast forward produces
        feature_map = feature_map.bfloat16()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        fused_logits = logits.clone().requires_grad_()
        loss, ce, kl = fused_ce_zipf(fused_logits, targets, DenseMap(feature_map, weight, bias, upsample=True), 0.7)
        votes = dense_votes(feature_map, weight, bias, "bilinear")
    loss.backward()
    reference_logits = logits.double().requires_grad_()
    soft = zipf_soft_labels(vote_counts(votes, 200), targets).double()
    reference = torch.nn.functional.cross_entropy(reference_logits, targets) + 0.7 * nontarget_kl(reference_logits, targets, soft)
    reference.backward()
    # Either way both paths vote on the same float32 dense logits (a bf16 map's too: pixel_logits),
    # so they agree to float32 rounding.
    torch.testing.assert_close(loss.double(), reference.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_logits.grad.double(), reference_logits.grad, rtol=1e-5, atol=1e-7)
