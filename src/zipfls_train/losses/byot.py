"""Be Your Own Teacher, BYOT (Zhang et al., ICCV 2019): the deepest classifier teaches shallow ones.

    L = (1 - a) sum_{i=1..4} CE(q_i, y)
        + a sum_{i<4} T^2 KL(softmax(q_4 / T) || softmax(q_i / T))
        + b sum_{i<4} ||F_i - F_4||^2

q_4: the model's logits; q_1..q_3: logits of auxiliary heads after stages 1-3
(``models/aux_heads.py``: BYOT's bottleneck -> global pool -> linear). Definitions, following the
authors' ``train.py``:

* F_4 = ``outputs.pooled``: the globally average-pooled final map, the classifier's input
  (BYOT's ``final_fea``); F_i = the head's pooled bottleneck output (``middle<i>_fea``), which the
  bottleneck brings to the final width. Both are non-negative (post-ReLU), so the authors' mask
  ``(F_i > 0) | (F_4 > 0)`` only drops zero differences and is omitted.
* Targets are constants: q_4 and F_4 are detached in the KD and L2 terms (the deepest classifier is
  taught by the labels only).
* Reductions: CE and KL are batch means, the KL times T^2 (the authors compute the soft
  cross-entropy -mean_n sum_c softmax(q_4/T) log softmax(q_i/T); it differs from the KL by the
  teacher's entropy, a constant, so the gradients are identical; we report the KL, which is 0 when
  the two agree). The L2 term is *summed* over the batch and the feature dimension, as the authors'
  ``feature_loss_function`` does: b = 1e-6 is tuned for that sum. The batch is the global one
  (``global_batch_size``, trainer.batch_size; the authors' DataParallel step sees it whole): the
  trainer averages the loss over micro-batches (``trainer.accumulate_steps``) and DDP over ranks,
  which suits batch means, so a micro-batch's sum is scaled by global batch / its rows, and the
  step's gradient is that of the sum over the global batch however it is split.

Defaults a = 0.1, T = 3, b = 1e-6 (the authors' ``--alpha``, ``--temperature``, ``--beta``).

How the heads run: this method's ``training_step`` asks the model for the stage maps
(``model(x, features=("stage1", "stage2", "stage3"))``) and applies ``unwrap(model).aux_heads[s]``
to them itself (``forward_features`` then ``fc``), because ``ModelOutput`` has no slot for the
heads' features and the L2 term needs them. The heads are parameters of the wrapped model; under DDP
their gradients are still all-reduced (DDP's reducer hooks every parameter's gradient accumulator,
wherever the parameter is used, and each head is used exactly once per step). If ``ModelOutput``
gains ``aux_features``, the heads can move into the wrapper's forward (``aux=True``) unchanged.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..data.batch import Batch
from ..models.outputs import ModelOutput
from ..models.wrapper import unwrap
from .base import Method, Needs, fraction, non_negative, positive, with_train_top1
from .ce import cross_entropy
from .distill import tempered_kl

AUX_STAGES = ("stage1", "stage2", "stage3")


def feature_l2(features: Tensor, target: Tensor) -> Tensor:
    """sum over batch and features of (F_i - F_4)^2, F_4 detached; float32."""
    return (features.float() - target.detach().float()).pow(2).sum()


class BeYourOwnTeacher(Method):
    needs = Needs(feature_stages=AUX_STAGES, aux_stages=AUX_STAGES, aux_head="byot_bottleneck")

    def __init__(self, num_classes: int, alpha: float = 0.1, temperature: float = 3.0, feature_weight: float = 1e-6,
                 global_batch_size: int | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        # None (the method used on its own): each call's batch is the whole batch.
        self.global_batch_size = global_batch_size
        self.alpha = fraction("alpha", alpha)
        self.temperature = positive("temperature", temperature)
        self.feature_weight = non_negative("feature_weight", feature_weight)

    def training_step(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        outputs = model(batch.inputs, features=AUX_STAGES)
        return with_train_top1(self.loss_terms(outputs, batch, model), outputs.logits, batch.targets)

    def loss_terms(self, outputs: ModelOutput, batch: Batch, model: nn.Module) -> dict[str, Tensor]:
        heads = unwrap(model).aux_heads
        final_features = outputs.pooled
        ce = cross_entropy(outputs.logits, batch.targets)
        terms: dict[str, Tensor] = {"ce": ce}
        ce_total, kd_total, l2_total = ce, 0.0, 0.0
        for name in AUX_STAGES:
            if name not in heads:
                raise RuntimeError(
                    f"BYOT needs an auxiliary head on {name}; the model has heads on {list(heads)} "
                    "(build it with aux_stages=needs.aux_stages, aux_head=needs.aux_head)"
                )
            head = heads[name]
            features = head.forward_features(outputs.features[name])
            logits = head.fc(features)
            ce_i = cross_entropy(logits, batch.targets)
            kd_i = tempered_kl(logits, outputs.logits, self.temperature)
            l2_i = feature_l2(features, final_features)
            terms[f"ce_{name}"] = ce_i
            ce_total = ce_total + ce_i
            kd_total = kd_total + kd_i
            l2_total = l2_total + l2_i
        if self.global_batch_size is not None:  # this micro-batch's share of the global batch's sum
            l2_total = l2_total * (self.global_batch_size / outputs.logits.shape[0])
        loss = (1.0 - self.alpha) * ce_total + self.alpha * kd_total + self.feature_weight * l2_total
        return {"loss": loss, **terms, "byot_kl": kd_total, "byot_feature_l2": l2_total}
