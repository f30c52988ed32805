"""DenseNet-BC-121 for 32 px inputs (Huang et al. 2017; the CIFAR variant used by CS-KD and Zipf's LS).

Growth 32, blocks (6, 12, 24, 16), bottleneck 4*growth, compression 0.5, a 3x3 stem of 2*growth
channels and no max-pool: stage maps are 16, 8, 4, 4 px for 32 px inputs. The final map is
BN + ReLU of the last dense block, which is what gets pooled. As in the paper's released
``CIFAR_DenseNet121``, an auxiliary linear head (Zipf's Dense2) has its own BN + ReLU before pooling
and classifying an intermediate stage (``aux_heads_normalise``), whose output is an un-normalised
transition convolution.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from .wrapper import StagedBackbone, kaiming_init


class DenseLayer(nn.Module):
    def __init__(self, in_channels: int, growth: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], dim=1)


class Transition(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class CifarDenseNet(StagedBackbone):
    aux_heads_normalise = True
    def __init__(
        self, block_sizes: tuple[int, ...] = (6, 12, 24, 16), growth: int = 32, reduction: float = 0.5
    ) -> None:
        super().__init__()
        channels = 2 * growth
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        stages = []
        self.stage_channels: list[int] = []
        for index, size in enumerate(block_sizes):
            layers: list[nn.Module] = []
            for _ in range(size):
                layers.append(DenseLayer(channels, growth))
                channels += growth
            if index < len(block_sizes) - 1:
                out_channels = int(channels * reduction)
                layers.append(Transition(channels, out_channels))
                channels = out_channels
            stages.append(nn.Sequential(*layers))
            self.stage_channels.append(channels)
        self.stages = nn.ModuleList(stages)
        self.final_norm = nn.BatchNorm2d(channels)
        kaiming_init(self)


def cifar_densenet121() -> CifarDenseNet:
    return CifarDenseNet((6, 12, 24, 16), growth=32)
