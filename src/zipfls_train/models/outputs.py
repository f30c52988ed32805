"""What every wrapped model returns: the one data type that travels from model to method."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class ModelOutput:
    """Output of :class:`zipfls_train.models.wrapper.ClassifierWrapper`.

    logits:     N x C, from the cheap global-average-pool -> classifier path.
    features:   dense maps N x D x H x W by stage name, only those requested. ``"final"`` is exactly
                the map that is pooled into ``logits`` (so ``classifier(mean_hw(final)) == logits``);
                ``"penultimate"`` is the output of the stage before it; ``"stage<i>"`` (1-based) names
                every stage of the backbone. A stage with a linear auxiliary head (Dense2's
                penultimate) returns the map that head's classifier sees: with BN + ReLU applied
                where the head has them (DenseNets, whose stage outputs are not normalised).
    pooled:     N x D, the globally pooled final map (the classifier's input).
    aux_logits: N x C by stage name, from auxiliary heads on those stages (training only).
    """

    logits: Tensor
    pooled: Tensor | None = None
    features: dict[str, Tensor] = field(default_factory=dict)
    aux_logits: dict[str, Tensor] = field(default_factory=dict)
