"""Label smoothing as in the paper (and Müller et al.): 1 - eps on the target, eps / (C - 1) on each
other class. Note: torch's ``label_smoothing=eps`` puts eps / C on *every* class, target included,
which is a different target; we do not use it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batch import Batch
from ..models.outputs import ModelOutput
from .base import Method, as_number, check_targets


def smoothed_targets(targets: Tensor, num_classes: int, epsilon: float) -> Tensor:
    off_target = epsilon / (num_classes - 1)
    soft = torch.full((targets.shape[0], num_classes), off_target, device=targets.device)
    return soft.scatter_(1, targets.unsqueeze(1), 1.0 - epsilon)


def label_smoothing_loss(logits: Tensor, targets: Tensor, epsilon: float) -> Tensor:
    """Batch mean of -sum_c q_c log p_c with q = smoothed_targets (float32)."""
    check_targets(targets, logits, "logits")
    log_probs = F.log_softmax(logits.float(), dim=1)
    soft = smoothed_targets(targets, logits.shape[1], epsilon)
    return -(soft * log_probs).sum(dim=1).mean()


class LabelSmoothing(Method):
    def __init__(self, num_classes: int, epsilon: float = 0.1) -> None:
        super().__init__()
        epsilon = as_number("epsilon", epsilon, "in [0, 1)")
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"loss.epsilon must be in [0, 1), got {epsilon}")
        self.num_classes = num_classes
        self.epsilon = epsilon

    def loss_terms(self, outputs: ModelOutput, batch: Batch, model: nn.Module) -> dict[str, Tensor]:
        loss = label_smoothing_loss(outputs.logits, batch.targets, self.epsilon)
        return {"loss": loss, "ls": loss}
