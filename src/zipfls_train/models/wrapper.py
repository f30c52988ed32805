"""The single wrapper every model goes through, before DDP: logits + dense maps + auxiliary heads.

A *backbone* is any ``nn.Module`` with

* ``stage_channels: list[int]``: channels of each stage's output, the last being the map that is pooled;
* ``forward_stages(x) -> list[Tensor]``: every stage's output in order (one ordinary forward pass,
  so asking for dense maps costs nothing extra).

The wrapper owns global average pooling and the classifier, so the classifier that produces the
training logits is the same one that can be applied densely (Zipf's dense votes).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .aux_heads import byot_bottleneck_head
from .outputs import ModelOutput


class LinearAuxHead(nn.Module):
    """Global average pool + linear classifier on an intermediate stage, optionally after the head's
    own BN + ReLU (``normalise``: what the released CIFAR DenseNet puts before each classifier, since
    its stage outputs are un-normalised convolutions). ``classifier_input`` is the map the ``fc``
    classifies once pooled; Zipf's Dense2 votes classify that same map pixel by pixel."""

    def __init__(self, in_channels: int, num_classes: int, normalise: bool = False) -> None:
        super().__init__()
        self.norm = nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU()) if normalise else nn.Identity()
        self.fc = nn.Linear(in_channels, num_classes)

    def classifier_input(self, feature_map: Tensor) -> Tensor:
        return self.norm(feature_map)

    def logits(self, classifier_input: Tensor) -> Tensor:
        return self.fc(classifier_input.mean(dim=(2, 3)))

    def forward(self, feature_map: Tensor) -> Tensor:
        return self.logits(self.classifier_input(feature_map))


# (in_channels, num_classes, stage_index, normalise, final_channels: the last stage's width)
AuxHeadFactory = Callable[[int, int, int, bool, int], nn.Module]

AUX_HEADS: dict[str, AuxHeadFactory] = {
    "linear": lambda in_channels, num_classes, stage_index, normalise, final_channels: LinearAuxHead(in_channels, num_classes, normalise),
    # BYOT's bottleneck ends in its own BN + ReLU whatever the stage output is, at the final stage's
    # width (its L2 term compares the two).
    "byot_bottleneck": lambda in_channels, num_classes, stage_index, normalise, final_channels: byot_bottleneck_head(
        in_channels, num_classes, stage_index, final_channels
    ),
}


# The names of a backbone's stages, whatever the model: ``final`` (the pooled map), ``penultimate``
# (the one before) or ``stage<i>`` (1-based). Which of them a given model has is stage_index's.
_STAGE_NAME = re.compile(r"final|penultimate|stage[1-9][0-9]*")


def is_stage_name(name: object) -> bool:
    """Whether ``name`` is a stage name in the grammar :func:`stage_index` reads (``final``,
    ``penultimate`` or ``stage<i>``, i >= 1), before any model says whether it has that stage."""
    return isinstance(name, str) and _STAGE_NAME.fullmatch(name) is not None


def stage_index(name: str, count: int) -> int:
    """0-based position of the stage ``name`` (``final``, ``penultimate`` or ``stage<i>``, 1-based)
    in a backbone of ``count`` stages; KeyError naming the stages it has."""
    stage_names = [f"stage{i + 1}" for i in range(count)]
    if name == "final":
        return count - 1
    if name == "penultimate":
        return count - 2
    if name in stage_names:
        return stage_names.index(name)
    raise KeyError(f"unknown feature stage {name!r}; expected 'final', 'penultimate' or one of {stage_names}")


class ClassifierWrapper(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        aux_stages: Sequence[str] = (),
        aux_head: str = "linear",
    ) -> None:
        super().__init__()
        if aux_head not in AUX_HEADS:
            raise ValueError(f"unknown aux head kind {aux_head!r}; expected one of {sorted(AUX_HEADS)}")
        self.backbone = backbone
        self.num_classes = num_classes
        channels = list(backbone.stage_channels)
        self.stage_names = [f"stage{i + 1}" for i in range(len(channels))]
        self.classifier = nn.Linear(channels[-1], num_classes)
        init_classifier = getattr(backbone, "init_classifier", None)
        if init_classifier is not None:  # the model's own classifier init (e.g. torchvision's MobileNetV2)
            init_classifier(self.classifier)
        # Dropout on the pooled features before the classifier, where a backbone asks for it
        # (torchvision's MobileNetV2: 0.2); training logits only, dense votes classify the map as is.
        dropout = float(getattr(backbone, "classifier_dropout", 0.0))
        self.classifier_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.aux_heads = nn.ModuleDict()
        # Backbones whose intermediate stage outputs are not normalised ask for BN + ReLU in the heads.
        normalise = bool(getattr(backbone, "aux_heads_normalise", False))
        for name in aux_stages:
            index = self.stage_index(name)
            self.aux_heads[name] = AUX_HEADS[aux_head](channels[index], num_classes, index, normalise, channels[-1])

    def stage_index(self, name: str) -> int:
        """Position of a stage: ``final``, ``penultimate`` or ``stage<i>`` (1-based)."""
        return stage_index(name, len(self.stage_names))

    def forward(self, x: Tensor, features: Sequence[str] = (), aux: bool = False) -> ModelOutput:
        """``features``: the dense maps to return. A stage with a linear auxiliary head returns what
        that head's classifier sees (its BN + ReLU applied, where it has one), computed once for both
        the map and the head's logits."""
        maps = self.backbone.forward_stages(x)
        pooled = maps[-1].mean(dim=(2, 3))
        logits = self.classifier(self.classifier_dropout(pooled))
        classified: dict[str, Tensor] = {}

        def classifier_input(name: str) -> Tensor:
            if name not in classified:
                stage_map = maps[self.stage_index(name)]
                head = self.aux_heads[name] if name in self.aux_heads else None
                classified[name] = head.classifier_input(stage_map) if isinstance(head, LinearAuxHead) else stage_map
            return classified[name]

        dense = {name: classifier_input(name) for name in features}
        aux_logits: dict[str, Tensor] = {}
        for name, head in (self.aux_heads.items() if aux else ()):
            aux_logits[name] = head.logits(classifier_input(name)) if isinstance(head, LinearAuxHead) else head(maps[self.stage_index(name)])
        return ModelOutput(logits=logits, pooled=pooled, features=dense, aux_logits=aux_logits)

    def without_aux_heads(self) -> "ClassifierWrapper":
        """This model without its training-only auxiliary heads (for export: the same logits, fewer
        parameters). The trainer keeps them, also in best.pt; the eval forward never calls them."""
        self.aux_heads = nn.ModuleDict()
        return self


class StagedBackbone(nn.Module):
    """Backbone contract for models written here: ``stem`` then ``stages`` in order, and, where the
    model has one, ``final_norm`` + ReLU closing the last stage (None: the last stage's output is
    pooled as it is)."""

    stem: nn.Module
    stages: nn.ModuleList
    final_norm: nn.Module | None

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        maps = []
        out = self.stem(x)
        for index, stage in enumerate(self.stages):
            out = stage(out)
            if index == len(self.stages) - 1 and self.final_norm is not None:
                out = torch.relu(self.final_norm(out))
            maps.append(out)
        return maps


def kaiming_init(module: nn.Module) -> None:
    """MSRA initialisation (He et al. 2015) of convolutions, as in the paper's recipe; linear layers keep
    PyTorch's default (as torchvision's ResNets do; a backbone's ``init_classifier`` may set the
    wrapper's classifier otherwise)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def unwrap(model: nn.Module) -> ClassifierWrapper:
    """The ClassifierWrapper inside DDP / torch.compile wrappers."""
    while not isinstance(model, ClassifierWrapper):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"{type(model).__name__} does not wrap a ClassifierWrapper")
        model = inner
    return model


@torch.no_grad()
def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
