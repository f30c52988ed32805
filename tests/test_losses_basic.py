"""CE and label smoothing against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from zipfls_train.losses import build_method
from zipfls_train.losses.ce import cross_entropy
from zipfls_train.losses.ls import label_smoothing_loss, smoothed_targets


def test_cross_entropy_hand_value():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([0, 2])
    # sample 0: -log(e^2 / (e^2 + e + 1)); sample 1: log 3
    first = -(2.0 - math.log(math.exp(2) + math.exp(1) + 1))
    expected = (first + math.log(3)) / 2
    assert cross_entropy(logits, targets).item() == pytest.approx(expected, abs=1e-6)


def test_label_smoothing_targets_put_eps_over_c_minus_1_off_target():
    soft = smoothed_targets(torch.tensor([1]), num_classes=5, epsilon=0.1)
    assert soft.tolist()[0] == pytest.approx([0.025, 0.9, 0.025, 0.025, 0.025])


def test_label_smoothing_hand_value():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    eps = 0.2
    log_z = math.log(math.e + 1 + math.exp(-1))
    log_p = [1.0 - log_z, 0.0 - log_z, -1.0 - log_z]
    # target 0: 0.8 on class 0, 0.1 on each of the two others.
    expected = -(0.8 * log_p[0] + 0.1 * log_p[1] + 0.1 * log_p[2])
    assert label_smoothing_loss(logits, torch.tensor([0]), eps).item() == pytest.approx(expected, abs=1e-6)


def test_loss_ls_as_configured_is_spec_eps_over_c_minus_1_not_torchs_eps_over_c():
    """loss=ls as composed (epsilon 0.1), through the method the trainer builds, on a hand example:
    C = 4, logits [2, 0, 0, 0], target 0: 0.9 on class 0 and 0.1 / 3 on each other class."""
    from conftest import compose
    from zipfls_train.data.batch import Batch
    from zipfls_train.models.outputs import ModelOutput

    method = build_method(compose(["loss=ls"]).loss, 4)
    batch = Batch(inputs=torch.zeros(1, 3, 8, 8), targets=torch.tensor([0]), indices=torch.arange(1))
    loss = method.loss_terms(ModelOutput(logits=torch.tensor([[2.0, 0.0, 0.0, 0.0]])), batch, None)["loss"]
    log_z = math.log(math.exp(2) + 3)
    expected = -(0.9 * (2 - log_z) + 3 * (0.1 / 3) * (0 - log_z))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    torchs = -(0.925 * (2 - log_z) + 3 * 0.025 * (0 - log_z))  # torch's label_smoothing: eps / C everywhere
    assert abs(torchs - expected) > 1e-3


def test_low_precision_logits_are_computed_in_float32():
    generator = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(8, 10, generator=generator)).bfloat16()
    targets = torch.randint(0, 10, (8,), generator=generator)
    # Float64 from the equation, on the bf16 values themselves: -sum_c t_c log softmax(z)_c.
    z = logits.double()
    soft = torch.full((8, 10), 0.1 / 9, dtype=torch.float64).scatter_(1, targets[:, None], 0.9)
    expected = -(soft * (z - z.logsumexp(dim=1, keepdim=True))).sum(dim=1).mean()
    loss = label_smoothing_loss(logits, targets, 0.1)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)  # a bf16 log-softmax is off by ~1e-2


def test_unknown_loss_option_names_the_key_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"no option\(s\) \['epsilonn'\].*epsilon"):
        build_method({"name": "ls", "epsilonn": 0.1}, num_classes=10)


def test_unknown_loss_name_lists_the_choices():
    with pytest.raises(KeyError, match="unknown loss 'nope'.*zipf"):
        build_method({"name": "nope"}, num_classes=10)



# --- the public functions, called from user code -------------------------------------------------


@pytest.mark.parametrize("name", ["cross_entropy", "label_smoothing_loss", "tfkd_regularizer"])
@pytest.mark.parametrize(("targets", "message"), [
    (torch.tensor([1, 0, 2], dtype=torch.int32), r"targets must be int64 class indices \(torch.long\), got torch.int32"),
    (torch.tensor([1, 0, 2], dtype=torch.uint8), r"targets must be int64 class indices \(torch.long\), got torch.uint8"),
    (torch.tensor([1, 0]), r"targets must hold one class index per row of logits \(3\), got shape \(2,\)"),
])  # fmt: skip
def test_the_label_losses_name_a_wrong_target_tensor(name, targets, message):
    """Every public loss that takes class indices says what it expects (torch's own errors, or none:
    cross_entropy refused int32 with a kernel message, label smoothing took int32)."""
    from zipfls_train.losses.tfkd import tfkd_regularizer

    call = {"cross_entropy": lambda z, y: cross_entropy(z, y), "label_smoothing_loss": lambda z, y: label_smoothing_loss(z, y, 0.1),
            "tfkd_regularizer": lambda z, y: tfkd_regularizer(z, y, 0.99, 20.0, "mean")}[name]  # fmt: skip
    with pytest.raises(ValueError, match=message):
        call(torch.randn(3, 4), targets)


def test_tfkd_regularizer_refuses_a_reduction_it_does_not_know():
    from zipfls_train.losses.tfkd import tfkd_regularizer

    logits, targets = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"reduction must be one of \['mean', 'batchmean'\], got 'sum'"):
        tfkd_regularizer(logits, targets, 0.99, 20.0, "sum")  # was taken for 'batchmean'


def test_tempered_kl_refuses_a_teacher_of_another_shape():
    """A 1 x C teacher broadcast over the batch gave a number, not an error."""
    from zipfls_train.losses.distill import tempered_kl

    with pytest.raises(ValueError, match=r"one shape \(N x C\), got \(4, 5\) and \(1, 5\)"):
        tempered_kl(torch.randn(4, 5), torch.randn(1, 5), 4.0)
