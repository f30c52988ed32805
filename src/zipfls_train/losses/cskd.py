"""Class-wise self-knowledge distillation, CS-KD (Yun et al., CVPR 2020).

    L = CE(z_a, y) + lam * T^2 * KL(softmax(z_b / T) || softmax(z_a / T))

z_a: logits of the batch; z_b: logits of *another* sample of the same class (``batch.pair_inputs``,
drawn by the loader per sample and per DDP rank), computed under ``no_grad`` so it acts as a fixed
target. Reduction: the released code's ``KLDivLoss(reduction='sum') * T^2 / N`` -- the batch mean of
the per-sample KL, times T^2 (Hinton's scale correction for tempered softmaxes on both sides).

Forward passes: two, as in the released code (one with grad on the batch, one under ``no_grad`` on
the pairs); the model is in train mode for both, so BatchNorm running statistics are updated by both
passes while each pass normalises with its own batch statistics. We run the ``no_grad`` pair pass
first: then the last forward through a DDP-wrapped model before ``backward`` is the one with grad
(the order only changes the order of two running-stat momentum updates). CS-KD's own batches hold
N/2 samples + N/2 pairs; here the batch has N samples and N pairs (a pair per sample), so one step
costs two N-sample forwards: the "twice the iterations" cost the paper's Table 1 reports.

Defaults: T = 4, lam = 1; lam = 3 for ResNet-50 on ImageNet-scale data (the paper's code).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..data.batch import Batch
from ..models.outputs import ModelOutput
from .base import Method, Needs, non_negative, positive, with_train_top1
from .ce import cross_entropy
from .distill import tempered_kl


class ClassWiseSelfKD(Method):
    needs = Needs(pairs=True)

    def __init__(self, num_classes: int, temperature: float = 4.0, weight: float = 1.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.temperature = positive("temperature", temperature)
        self.weight = non_negative("weight", weight)

    def training_step(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        # The pair forward comes first, so the last forward through DDP before backward is the one
        # with gradients.
        pair_logits = self._pair_logits(model, batch)
        outputs = model(batch.inputs)
        return with_train_top1(self._terms(outputs.logits, pair_logits, batch.targets), outputs.logits, batch.targets)

    def loss_terms(self, outputs: ModelOutput, batch: Batch, model: nn.Module) -> dict[str, Tensor]:
        # Only reached if someone bypasses training_step: compute the pair logits here.
        return self._terms(outputs.logits, self._pair_logits(model, batch), batch.targets)

    @staticmethod
    def _pair_logits(model: nn.Module, batch: Batch) -> Tensor:
        if batch.pair_inputs is None:
            raise RuntimeError("CS-KD needs batch.pair_inputs (needs.pairs=True): the loader did not provide pairs")
        with torch.no_grad():
            return model(batch.pair_inputs).logits

    def _terms(self, logits: Tensor, pair_logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
        ce = cross_entropy(logits, targets)
        kd = tempered_kl(logits, pair_logits, self.temperature)
        return {"loss": ce + self.weight * kd, "ce": ce, "cskd_kl": kd}
