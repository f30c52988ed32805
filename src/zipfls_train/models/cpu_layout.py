"""A workaround for a oneDNN bug the channels_last layout meets on CPUs.

oneDNN's JIT 1x1 convolution computes the weight gradient of a strided 1x1 convolution on NHWC
(channels_last) input through a unit-stride copy of the input, and writes past that copy when the
input has fewer channels than its vector block (16 with AVX-512, 8 with AVX2): heap corruption,
then a segfault or glibc's "double free or corruption" (oneDNN issue #6035, open; torch 2.14.1 on
an AMD EPYC with AVX-512 crashed 2 of 2 times on a cifar_resnet18 of width 8 at 64 px, whose first
shortcut is a 1x1 stride-2 convolution from 8 channels). NCHW input takes another kernel.

Such a convolution appears only in narrow models (the shortcuts of a ResNet of width < 16; the
shipped widths start at 64), so those layers alone take their input in NCHW; the rest of the
model keeps channels_last. Both operands must be NCHW: a 1 x 1 weight in channels_last strides
(O, I, 1, 1) with strides (I, 1, I, I) is contiguous too, but torch reads those strides as
channels_last and takes the NHWC kernel. Their output is the same numbers either way.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# oneDNN's largest input-channel block on x86 (AVX-512: 16 floats); AVX2's (8) is within it.
IC_BLOCK = 16


def hits_the_strided_1x1_bug(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride != (1, 1)
            and module.in_channels < IC_BLOCK)  # fmt: skip


def _nchw_input(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return (args[0].contiguous(), *args[1:])


def avoid_the_strided_1x1_bug(model: nn.Module) -> None:
    """Every convolution :func:`hits_the_strided_1x1_bug` names of a model already in channels_last
    gets an NCHW weight and NCHW input."""
    for module in model.modules():
        if hits_the_strided_1x1_bug(module):
            module.weight.data = module.weight.data.clone(memory_format=torch.contiguous_format)
            module.register_forward_pre_hook(_nchw_input)
