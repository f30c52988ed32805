#!/usr/bin/env python
"""How many operations a training step dispatches, per part, counted at PyTorch's dispatcher.

At the paper's batch of 128 on 32 px images a GPU step is bound by launching kernels, so the number
of operations a loss or the loader issues, not its arithmetic, is what it costs there. Two parts:

Loader: one training batch of the in-memory loader (crop_pad = the CIFAR recipe, random_resized_crop
= the TinyImageNet one), on 32 px uint8 images, after the epoch's first batch.

Loss: for one
``method.loss_terms`` + ``backward`` on a fixed model output (the network's own forward/backward are
the same for every method), every ATen operation dispatched, split into those that launch a kernel
on a GPU and those that only make views or allocate (no launch, but still CPU time). It runs on the
CPU with the GPU's memory layout (channels_last), so it needs no GPU. The fused Zipf kernel is a
Triton launch, not an ATen operation: it is counted as one launch (its launch is replaced by a
marker, so the values are meaningless here; only the counts are reported).

    python scripts/count_step_ops.py [--classes 200] [--batch 8] [--verbose]
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from zipfls_train.data import ImageTensors, LoaderOptions, TensorLoader
from zipfls_train.data.batch import Batch
from zipfls_train.losses import build_method, zipf_fused
from zipfls_train.models import ModelOutput, build_model

# Operations that only alias, reshape or allocate: no kernel launch on a GPU.
NO_LAUNCH = {
    "view", "_unsafe_view", "reshape", "permute", "t", "transpose", "select", "slice", "unbind", "detach",
    "expand", "as_strided", "alias", "empty", "empty_like", "new_empty", "unsqueeze", "squeeze", "lift_fresh",
    "promote_types",  # a dtype computation on the host
}
ZIPF = {"weight": 1.0, "alpha": 1.0, "distribution": "zipf", "rank_by": "dense", "stages": ["final"],
        "upsample": "bilinear", "aux_weight": 0.5}
METHODS = {
    "ce": {"name": "ce"},
    "ls": {"name": "ls", "epsilon": 0.1},
    "zipf, kernel=torch (reference path)": {"name": "zipf", **ZIPF, "kernel": "torch"},
    "zipf, kernel=triton (fused, CUDA's auto)": {"name": "zipf", **ZIPF, "kernel": "triton"},
}


class OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


ACTIVE_LOGS: list[OpLog] = []


class TritonLaunchMarker:
    """Stands in for ``_zipf_kernel[grid](...)``: records one launch, computes nothing."""

    def __getitem__(self, grid):  # noqa: ANN001, ANN204
        return lambda *args, **kwargs: ACTIVE_LOGS[-1].names.append("triton:_zipf_kernel")


def count(config: dict, model: torch.nn.Module, output: ModelOutput, batch: Batch, num_classes: int) -> tuple[list[str], list[str]]:
    method = build_method(config, num_classes)
    # Count the steady state: the fused path's one-off first-call comparison with the reference
    # functions counts as done (the marker computes nothing it could pass).
    zipf_fused._kernel_state[str(output.logits.device)] = "checked"
    logits = output.logits.detach().requires_grad_()
    fresh = ModelOutput(logits=logits, pooled=output.pooled, features=output.features, aux_logits={})
    log = OpLog()
    ACTIVE_LOGS.append(log)
    with log:
        terms = method.loss_terms(fresh, batch, model)
        forward = len(log.names)
        terms["loss"].backward()
    ACTIVE_LOGS.pop()
    return log.names[:forward], log.names[forward:]


def summary(names: list[str]) -> str:
    launches = [n for n in names if n not in NO_LAUNCH]
    return f"{len(launches):3d} launches ({len(names) - len(launches):2d} views/allocations)"


def loader_ops(augment: str, batch: int) -> list[str]:
    images = torch.randint(0, 256, (4 * batch, 3, 32, 32), dtype=torch.uint8)
    data = ImageTensors(images, torch.arange(4 * batch) % 10, [str(c) for c in range(10)])
    options = LoaderOptions(batch_size=batch, eval_batch_size=batch, device=torch.device("cpu"), seed=0, channels_last=True)
    loader = TensorLoader(data, options, train=True, augment=augment, image_size=32, mean=[0.5] * 3, std=[0.5] * 3)
    batches = loader.epoch(0)
    next(batches)  # the epoch's first batch also draws the epoch's parameters
    log = OpLog()
    with log:
        next(batches)
    return log.names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--verbose", action="store_true", help="list every operation")
    args = parser.parse_args()
    os.environ["TRITON_INTERPRET"] = "1"  # lets the fused path pass its device check on the CPU
    zipf_fused._zipf_kernel = TritonLaunchMarker()

    torch.manual_seed(0)
    model = build_model("cifar_resnet18", args.classes, width=8).to(memory_format=torch.channels_last)
    inputs = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    batch = Batch(inputs=inputs, targets=torch.randint(0, args.classes, (args.batch,)), indices=torch.arange(args.batch))
    with torch.no_grad():
        output = model(inputs, features=("final",))
    print(f"# in-memory loader, one training batch of {args.batch} (32 px, channels_last)")
    for augment in ("crop_pad", "random_resized_crop"):
        names = loader_ops(augment, args.batch)
        print(f"loader, {augment:<34} {summary(names)}")
        if args.verbose:
            print("    ", " ".join(names))
    print(f"# loss_terms + backward on a fixed cifar_resnet18 output, {args.classes} classes, channels_last; "
          "the backward includes the seed gradient (ones_like)")
    for name, config in METHODS.items():
        forward, backward = count(config, model, output, batch, args.classes)
        print(f"{name:<42} forward {summary(forward)}  backward {summary(backward)}")
        if args.verbose:
            print("    forward: ", " ".join(forward), "\n    backward:", " ".join(backward))
    print("(a launch costs ~5-25 us of CPU time in eager PyTorch; a view or allocation a few us)")


if __name__ == "__main__":
    main()
