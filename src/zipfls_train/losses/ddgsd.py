"""Data-distortion guided self-distillation, DDGSD (Xu & Liu, AAAI 2019).

Two independently augmented views x1, x2 of every image (``batch.second_view``) go through the same
network; each view's posterior teaches the other and their global features are pulled together:

    L = CE(z1, y) + CE(z2, y)
        + lam * [KL(sg(p2) || p1) + KL(sg(p1) || p2)]        p_v = softmax(z_v / T), sg = stop-grad
        + mu * MMD^2(f1, f2)

* CE: one batch mean per view, summed (DDGSD's objective has one classification loss per view).
* KL: batch means, each direction with the other view detached as its target, times T^2
  (T = 1 by default, as in DDGSD: the factor is then 1).
* MMD: the squared maximum mean discrepancy between the two views' pooled features
  (``outputs.pooled``, N x D) with the linear kernel k(a, b) = <a, b>, which is
  ||mean_n f1_n - mean_n f2_n||^2 (summed over D). DDGSD matches the two views' *global feature
  distributions* with MMD; the linear kernel is its first-moment form and costs O(N D).
  Public re-implementations differ (some square the difference of the two grand scalar means); this
  is the textbook linear-kernel estimator. It is a statistic of the batch, taken on each call's
  batch: under ``trainer.accumulate_steps`` or DDP, the mean of the micro-batches' MMDs, which the
  means' sampling noise makes larger than the global batch's (4 micro-batches of 4 images: 0.55 vs
  0.25 on one audit batch). With mu = 5e-4 the step's gradient moved by 2e-4 (relative).

Defaults lam = 1, mu = 5e-4.

Forward pass: one forward over both views concatenated (2N images). In train mode BatchNorm then
normalises with statistics of the 2N images of both views together (and updates its running
statistics once, with them), which is what the common public implementations do as well; the cost
is a forward/backward of twice the batch ("twice the iterations" in the paper's Table 1).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..data.batch import Batch
from ..models.outputs import ModelOutput
from .base import Method, Needs, non_negative, positive, with_train_top1
from .ce import cross_entropy
from .distill import tempered_kl


def linear_mmd2(first: Tensor, second: Tensor) -> Tensor:
    """Squared MMD with the linear kernel: ||mean(first) - mean(second)||^2 (rows are samples); float32."""
    return (first.float().mean(dim=0) - second.float().mean(dim=0)).pow(2).sum()


class DataDistortionGuidedSelfDistillation(Method):
    needs = Needs(two_views=True)

    def __init__(self, num_classes: int, weight: float = 1.0, mmd_weight: float = 5e-4, temperature: float = 1.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.weight = non_negative("weight", weight)
        self.mmd_weight = non_negative("mmd_weight", mmd_weight)
        self.temperature = positive("temperature", temperature)

    def training_step(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        if batch.second_view is None:
            raise RuntimeError("DDGSD needs batch.second_view (needs.two_views=True): the loader did not provide it")
        outputs = model(torch.cat([batch.inputs, batch.second_view]))
        first_view = outputs.logits[: batch.targets.shape[0]]
        return with_train_top1(self.loss_terms(outputs, batch, model), first_view, batch.targets)

    def loss_terms(self, outputs: ModelOutput, batch: Batch, model: nn.Module) -> dict[str, Tensor]:
        n = batch.targets.shape[0]
        if outputs.logits.shape[0] != 2 * n:
            raise ValueError(f"DDGSD expects the outputs of both views (2 x {n} rows), got {outputs.logits.shape[0]}")
        z1, z2 = outputs.logits[:n], outputs.logits[n:]
        f1, f2 = outputs.pooled[:n], outputs.pooled[n:]
        ce = cross_entropy(z1, batch.targets) + cross_entropy(z2, batch.targets)
        kl = tempered_kl(z1, z2, self.temperature) + tempered_kl(z2, z1, self.temperature)
        mmd = linear_mmd2(f1, f2)
        loss = ce + self.weight * kl + self.mmd_weight * mmd
        return {"loss": loss, "ce": ce, "ddgsd_kl": kl, "ddgsd_mmd": mmd}
