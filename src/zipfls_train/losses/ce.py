"""Plain cross-entropy: the "Vanilla" row of every table."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batch import Batch
from ..models.outputs import ModelOutput
from .base import Method, check_targets


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Batch-mean cross-entropy, computed in float32 whatever the logits' precision."""
    check_targets(targets, logits, "logits")
    return F.cross_entropy(logits.float(), targets)


class CrossEntropy(Method):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def loss_terms(self, outputs: ModelOutput, batch: Batch, model: nn.Module) -> dict[str, Tensor]:
        ce = cross_entropy(outputs.logits, batch.targets)
        return {"loss": ce, "ce": ce}
