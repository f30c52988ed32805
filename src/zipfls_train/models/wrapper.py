"""The single wrapper every model goes through, before DDP: logits + dense maps + auxiliary heads.

A *backbone* is any ``nn.Module`` with

* ``stage_channels: list[int]``: channels of each stage's output, the last being the map that is pooled;
* ``forward_stages(x) -> list[Tensor]``: every stage's output in order (one ordinary forward pass,
  so asking for dense maps costs nothing extra).

The wrapper owns global average pooling and the classifier, so the classifier that produces the
training logits is the same one that can be applied densely (Zipf's dense votes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .aux_heads import byot_bottleneck_head
from .outputs import ModelOutput


class LinearAuxHead(nn.Module):
    """Global average pool + linear classifier on an intermediate stage."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, feature_map: Tensor) -> Tensor:
        return self.fc(feature_map.mean(dim=(2, 3)))


AuxHeadFactory = Callable[[int, int, int], nn.Module]  # (in_channels, num_classes, stage_index)

AUX_HEADS: dict[str, AuxHeadFactory] = {
    "linear": lambda in_channels, num_classes, stage_index: LinearAuxHead(in_channels, num_classes),
    "byot_bottleneck": byot_bottleneck_head,
}


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
        self.aux_heads = nn.ModuleDict()
        for name in aux_stages:
            index = self.stage_index(name)
            self.aux_heads[name] = AUX_HEADS[aux_head](channels[index], num_classes, index)

    def stage_index(self, name: str) -> int:
        """Position of a stage: ``final``, ``penultimate`` or ``stage<i>`` (1-based)."""
        count = len(self.stage_names)
        if name == "final":
            return count - 1
        if name == "penultimate":
            return count - 2
        if name in self.stage_names:
            return self.stage_names.index(name)
        raise KeyError(
            f"unknown feature stage {name!r}; expected 'final', 'penultimate' or one of {self.stage_names}"
        )

    def stage_channels(self, name: str) -> int:
        return int(self.backbone.stage_channels[self.stage_index(name)])

    def forward(self, x: Tensor, features: Sequence[str] = (), aux: bool = False) -> ModelOutput:
        maps = self.backbone.forward_stages(x)
        pooled = maps[-1].mean(dim=(2, 3))
        logits = self.classifier(pooled)
        dense = {name: maps[self.stage_index(name)] for name in features}
        aux_logits = (
            {name: head(maps[self.stage_index(name)]) for name, head in self.aux_heads.items()} if aux else {}
        )
        return ModelOutput(logits=logits, pooled=pooled, features=dense, aux_logits=aux_logits)

    def without_aux_heads(self) -> "ClassifierWrapper":
        """The evaluated model: auxiliary heads are training-only and are dropped here."""
        self.aux_heads = nn.ModuleDict()
        return self


class StagedBackbone(nn.Module):
    """Backbone contract for models written here: ``stem`` then ``stages`` in order, with
    ``final_norm`` + ReLU closing the last stage (pre-activation designs end un-normalised)."""

    stem: nn.Module
    stages: nn.ModuleList
    final_norm: nn.Module

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        maps = []
        out = self.stem(x)
        for index, stage in enumerate(self.stages):
            out = stage(out)
            if index == len(self.stages) - 1:
                out = torch.relu(self.final_norm(out))
            maps.append(out)
        return maps


def kaiming_init(module: nn.Module) -> None:
    """MSRA initialisation (He et al. 2015) of convolutions, as in the paper's recipe; linear layers keep
    PyTorch's default (as torchvision's ResNets do)."""
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
