"""Auxiliary classifier heads beyond the wrapper's linear one.

``BottleneckAuxHead`` is the shallow classifier of "Be Your Own Teacher" (BYOT, Zhang et al., ICCV
2019; the authors' ``branchBottleNeck``): a bottleneck that brings an intermediate stage to the final
stage's width and resolution -- 1x1 conv to out/4 channels, a k x k conv with stride k (k = the
resolution ratio to the final stage), 1x1 conv to ``out_channels``, each followed by BN + ReLU --
then global average pooling and a linear classifier. The pooled bottleneck output is the head's
*feature* (BYOT's ``middle<i>_fea``), which BYOT pulls towards the final stage's pooled features with
an L2 term, so its width must equal the final stage's width.

Heads are ordinary modules of the ``ClassifierWrapper`` (``aux_heads``), so they are in the model's
parameters (optimiser, DDP) and its checkpoints (``best.pt`` too); the eval forward never calls
them, so they do not change what is evaluated. A model built without them loads such a checkpoint
by leaving their entries out (BAN's teacher does); ``without_aux_heads()`` drops them from a model
for export (the trainer does not call it).

Factory (``byot_bottleneck_head(in_channels, num_classes, stage_index, final_channels)``,
``AUX_HEADS["byot_bottleneck"]``): the wrapper gives the final stage's width; the resolution ratio
comes from the standard four-stage layout in which every stage after the first halves the
resolution (CIFAR/torchvision ResNets and ResNeXts, torchvision DenseNet-121 and MobileNetV2's
stages): ``k = 2^(3 - i)`` for the 0-based stage i. These are exactly BYOT's heads for ResNet-18/50
(k = 8, 4, 2). CIFAR DenseNet-121's last stage keeps its input's resolution (16, 8, 4, 4 px at
32 px), so there its heads end at 2 x 2 instead of 4 x 4; only pooled features are compared, so
nothing else changes.
"""

from __future__ import annotations

from torch import Tensor, nn

STANDARD_NUM_STAGES = 4


class BottleneckAuxHead(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_classes: int, downsample: int) -> None:
        super().__init__()
        if out_channels < 4:
            raise ValueError(f"BottleneckAuxHead needs out_channels >= 4, got {out_channels}")
        if downsample < 1:
            raise ValueError(f"BottleneckAuxHead needs downsample >= 1, got {downsample}")
        middle = out_channels // 4
        # Convolutions carry no bias: each is followed by BatchNorm, which absorbs it (the authors'
        # code keeps nn.Conv2d's default bias; it has no effect on what the head computes).
        self.bottleneck = nn.Sequential(
            nn.Conv2d(in_channels, middle, 1, bias=False),
            nn.BatchNorm2d(middle),
            nn.ReLU(inplace=True),
            nn.Conv2d(middle, middle, downsample, stride=downsample, bias=False),
            nn.BatchNorm2d(middle),
            nn.ReLU(inplace=True),
            nn.Conv2d(middle, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(out_channels, num_classes)
        self.feature_channels = out_channels
        for module in self.bottleneck:
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, feature_map: Tensor) -> Tensor:
        """N x out_channels: the pooled bottleneck output (BYOT's feature for the L2 term)."""
        return self.bottleneck(feature_map).mean(dim=(2, 3))

    def forward(self, feature_map: Tensor) -> Tensor:
        """N x C logits (what the wrapper's ``aux=True`` path puts in ``aux_logits``)."""
        return self.fc(self.forward_features(feature_map))


def byot_bottleneck_head(
    in_channels: int, num_classes: int, stage_index: int, final_channels: int, *, num_stages: int = STANDARD_NUM_STAGES
) -> BottleneckAuxHead:
    """BYOT's head for the 0-based ``stage_index`` of a ``num_stages``-stage backbone whose final
    stage is ``final_channels`` wide (see the module docstring for the resolution rule)."""
    steps = num_stages - 1 - stage_index
    if steps < 0:
        raise ValueError(f"stage_index {stage_index} is beyond a {num_stages}-stage backbone")
    return BottleneckAuxHead(in_channels, final_channels, num_classes, downsample=2**steps)


__all__ = ["BottleneckAuxHead", "byot_bottleneck_head"]
