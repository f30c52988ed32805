"""Teacher-free KD with a manually designed teacher, "Tf-KD_reg" (Yuan et al., CVPR 2020).

    L = (1 - a) CE(z, y) + a * m * KL(softmax(q / T) || softmax(z))

q is the virtual teacher's probability vector: ``correct_prob`` (0.99) on y and
(1 - correct_prob) / (C - 1) on every other class. That *probability* vector is divided by T and
softmaxed (so at T = 20 the target is nearly uniform with a small peak on y); the student's logits
get no temperature.

Reduction (what the released code does, kept as the default): ``nn.KLDivLoss()`` with its default
``reduction='mean'``, i.e. the summed KL divided by N * C, not by N. The multiplier m exists to undo
that (m = 100 with C = 100 makes it the per-sample KL). ``reduction='batchmean'`` divides by N only
(the mathematically correct batch mean); with it m = 1 is the natural choice. No T^2 factor: the
student is not tempered, so there is no 1/T^2 gradient scale to undo.

Defaults that depend on the model (the paper's code, ``method_configs.py``): T = 20 and m = 100 for
CIFAR ResNet-18; T = 40, m = 1 for DenseNet-121; T = 20, m = 1 for ResNet-50. ``configs/loss/tfkd.yaml``
reads them from an optional ``tfkd`` block of the model config and falls back to T = 20, m = 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batch import Batch
from ..models.outputs import ModelOutput
from .base import Method, as_number, check_targets, fraction, one_of, positive
from .ce import cross_entropy

REDUCTIONS = ("mean", "batchmean")


def virtual_teacher(targets: Tensor, num_classes: int, correct_prob: float, temperature: float) -> Tensor:
    """softmax(q / T) with q = correct_prob on the target, (1 - correct_prob) / (C - 1) elsewhere."""
    q = torch.full((targets.shape[0], num_classes), (1.0 - correct_prob) / (num_classes - 1), device=targets.device)
    q.scatter_(1, targets.unsqueeze(1), correct_prob)
    return F.softmax(q / temperature, dim=1)


def tfkd_regularizer(logits: Tensor, targets: Tensor, correct_prob: float, temperature: float, reduction: str) -> Tensor:
    """KL(softmax(q / T) || softmax(z)), reduced over N * C ('mean') or N ('batchmean'); float32."""
    check_targets(targets, logits, "logits")
    one_of("reduction", reduction, REDUCTIONS)  # (any other word was taken for 'batchmean')
    log_p = F.log_softmax(logits.float(), dim=1)
    teacher = virtual_teacher(targets, logits.shape[1], correct_prob, temperature)
    kl = (teacher * (teacher.log() - log_p)).sum()
    divisor = logits.shape[0] * logits.shape[1] if reduction == "mean" else logits.shape[0]
    return kl / divisor


class TeacherFreeKD(Method):
    def __init__(
        self,
        num_classes: int,
        alpha: float = 0.1,
        temperature: float = 20.0,
        multiplier: float = 1.0,
        correct_prob: float = 0.99,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        correct_prob = as_number("correct_prob", correct_prob, "in (0, 1)")
        if not 0.0 < correct_prob < 1.0:
            raise ValueError(f"loss.correct_prob must be in (0, 1), got {correct_prob}")
        # At or below 1/C the virtual teacher's correct class is no more likely than each other
        # class, (1 - correct_prob) / (C - 1): it teaches the wrong classes.
        if correct_prob <= 1.0 / num_classes:
            raise ValueError(
                f"loss.correct_prob must be > 1/{num_classes} (1 / the number of classes), so that the virtual "
                f"teacher's correct class is more likely than each other class; got {correct_prob}"
            )
        self.num_classes = num_classes
        self.alpha = fraction("alpha", alpha)
        self.temperature = positive("temperature", temperature)
        self.multiplier = positive("multiplier", multiplier)
        self.correct_prob = correct_prob
        self.reduction = one_of("reduction", reduction, REDUCTIONS)

    def loss_terms(self, outputs: ModelOutput, batch: Batch, model: nn.Module) -> dict[str, Tensor]:
        ce = cross_entropy(outputs.logits, batch.targets)
        reg = tfkd_regularizer(outputs.logits, batch.targets, self.correct_prob, self.temperature, self.reduction)
        loss = (1.0 - self.alpha) * ce + self.alpha * self.multiplier * reg
        return {"loss": loss, "ce": ce, "tfkd_kl": reg}
