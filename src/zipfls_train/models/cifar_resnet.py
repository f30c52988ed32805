"""Pre-activation ResNet-18 for 32 px inputs (He et al. 2016, "Identity Mappings"), as the paper's
released code (and CS-KD's, whose ``CIFAR_ResNet18`` it reuses) builds it: a 3x3 conv + BN + ReLU
stem, no max-pool, four stages of two pre-activation basic blocks (64, 128, 256, 512 channels at 32,
16, 8, 4 px) whose shortcuts carry the block's pre-activated input, and no BN + ReLU after the last
block: the classifier pools (and Zipf's dense votes classify) the last stage's output as it is, like
every auxiliary head's stage.
"""

from __future__ import annotations

from torch import Tensor, nn
import torch.nn.functional as F

from .wrapper import StagedBackbone, kaiming_init

NORMS = ("batch", "group")


def norm_layer(kind: str, channels: int) -> nn.Module:
    """BatchNorm (the paper) or GroupNorm (per-sample statistics: results independent of how a batch
    is split across processes, which DDP equivalence tests rely on)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    raise ValueError(f"model.options.norm must be one of {list(NORMS)}, got {kind!r}")


class PreActBasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str = "batch") -> None:
        super().__init__()
        self.bn1 = norm_layer(norm, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = norm_layer(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        # Both shortcuts carry the pre-activated input, the identity one included: the released
        # PreActBlock applies its (empty) shortcut to relu(bn1(x)), not to x as He et al. do.
        shortcut = self.shortcut(out) if self.shortcut is not None else out
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class CifarPreActResNet(StagedBackbone):
    def __init__(self, blocks_per_stage: tuple[int, ...] = (2, 2, 2, 2), width: int = 64, norm: str = "batch") -> None:
        super().__init__()
        widths = [width * 2**i for i in range(len(blocks_per_stage))]
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), norm_layer(norm, widths[0]), nn.ReLU())
        stages = []
        in_channels = widths[0]
        for index, (blocks, out_channels) in enumerate(zip(blocks_per_stage, widths)):
            stride = 1 if index == 0 else 2
            layers = []
            for block in range(blocks):
                layers.append(PreActBasicBlock(in_channels, out_channels, stride if block == 0 else 1, norm))
                in_channels = out_channels
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.final_norm = None
        self.stage_channels = widths
        kaiming_init(self)


def check_options(width: int = 64, norm: str = "batch") -> None:
    """ValueError naming ``model.options.<key>`` and what it must be (called before any work)."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"model.options.width must be an integer >= 1 (64 in the paper; 16 or 8 for quick CPU runs), got {width!r}")
    if norm not in NORMS:
        raise ValueError(f"model.options.norm must be one of {list(NORMS)}, got {norm!r}")


def cifar_resnet18(width: int = 64, norm: str = "batch") -> CifarPreActResNet:
    check_options(width, norm)
    return CifarPreActResNet((2, 2, 2, 2), width=width, norm=norm)


cifar_resnet18.check_options = check_options  # type: ignore[attr-defined]  # read by models.check_model_options
