"""Optimiser and learning-rate schedule from the ``optim`` and ``sched`` config groups."""

from __future__ import annotations

import math

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .config_checks import ConfigError

# The only optimiser and schedule the paper uses (configs/optim/, configs/sched/).
OPTIMIZERS = ("sgd",)
SCHEDULES = ("multistep",)


def check_optimizer_name(name: object) -> None:
    """ConfigError naming optim.name and the allowed values."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"optim.name must be one of {list(OPTIMIZERS)} (the paper's SGD with momentum; configs/optim/sgd.yaml), got {name!r}")


def check_schedule_name(name: object) -> None:
    """ConfigError naming sched.name and the allowed values."""
    if name not in SCHEDULES:
        raise ConfigError(f"sched.name must be one of {list(SCHEDULES)} (step decay at sched.milestones; configs/sched/multistep.yaml), got {name!r}")


def check_names(optim_name: object, sched_name: object) -> None:
    """Both names, before the run starts (engine/config_checks); the builders below check their own
    again, for a caller that builds them directly from Python."""
    check_optimizer_name(optim_name)
    check_schedule_name(sched_name)


def freeze_backbone_at_factor_zero(model: nn.Module, backbone_lr_factor: float | None) -> None:
    """``optim.backbone_lr_factor=0``: the backbone's weights never move (lr 0), so their gradients
    are not computed either: the backward pass stops at the classifier and the heads, skipping the
    backbone's, most of a step (experiments/finetune_speed.md). Its BatchNorm statistics still
    follow the new data (the layers stay in training mode). Called before DDP wraps the model,
    whose all-reduce then leaves the backbone out."""
    if backbone_lr_factor is not None and float(backbone_lr_factor) == 0:
        model.backbone.requires_grad_(False)


def parameter_groups(model: nn.Module, others: Iterable[nn.Parameter], backbone_lr_factor: float | None) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` (a ClassifierWrapper) and ``others`` (a method's own) as
    optimiser groups: one, or with ``backbone_lr_factor`` the heads and ``others`` first (group 0,
    the lr the logs show) and then the backbone, at ``lr_factor`` times the lr. The backbone's group
    holds all its parameters, those :func:`freeze_backbone_at_factor_zero` froze too (SGD passes
    over a parameter without a gradient): the optimiser's state has one layout at every factor, and
    a checkpoint written before factor 0 froze the backbone resumes."""
    trainable = [p for p in [*model.parameters(), *others] if p.requires_grad]
    if backbone_lr_factor is None:
        return [{"params": trainable}]
    backbone = list(model.backbone.parameters())
    in_backbone = {id(p) for p in backbone}
    return [{"params": [p for p in trainable if id(p) not in in_backbone]}, {"params": backbone, "lr_factor": float(backbone_lr_factor)}]


def build_optimizer(cfg: Mapping[str, Any], parameters: Iterable[nn.Parameter] | list[dict[str, Any]], global_batch: int,
                    device: torch.device) -> torch.optim.Optimizer:  # fmt: skip
    """SGD at ``cfg``'s settings over ``parameters``, or over the groups of :func:`parameter_groups`
    (each at lr x its ``lr_factor``)."""
    check_optimizer_name(cfg["name"])
    lr = float(cfg["lr"])
    if cfg.get("base_batch_size"):
        lr *= global_batch / float(cfg["base_batch_size"])  # linear scaling rule
    groups = list(parameters)
    if groups and isinstance(groups[0], dict):
        groups = [{**group, "lr": lr * group.get("lr_factor", 1.0)} for group in groups]
    # fused SGD on CUDA: one kernel for the whole update instead of several per tensor.
    kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(
        groups,
        lr=lr,
        momentum=float(cfg["momentum"]),
        weight_decay=float(cfg["weight_decay"]),
        nesterov=bool(cfg.get("nesterov", False)),
        **kind,
    )


def milestone_epochs(milestones: Sequence[float], epochs: int) -> list[int]:
    """Milestones given as fractions of the run (all values < 1, e.g. 0.5, 0.75) or as epoch numbers
    (integers >= 1, e.g. 100, 150)."""
    values = [float(m) for m in milestones]
    if all(0 < m < 1 for m in values):
        # Round half up, and never to epoch 0: a milestone decays the lr *after* some training.
        return [max(1, math.floor(m * epochs + 0.5)) for m in values]
    if all(m >= 1 and m == int(m) for m in values):
        return [int(m) for m in values]
    raise ValueError(f"sched.milestones must be all fractions in (0, 1) or all epoch numbers >= 1, got {list(milestones)}")


def build_scheduler(cfg: Mapping[str, Any], optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per training step (also one whose update fp16's GradScaler skipped); the factor
    depends on the epoch, so it equals the recipe's
    per-epoch MultiStepLR, plus an optional linear warm-up over the first ``warmup_epochs``."""
    check_schedule_name(cfg["name"])
    milestones = milestone_epochs(cfg["milestones"], epochs)
    gamma = float(cfg["gamma"])
    steps_per_epoch = max(1, steps_per_epoch)
    # Rounded up: a fraction of a step still warms up (0.5 epoch of 3 steps is 2 steps, not 1, which
    # would be no warm-up at all); round() first so that 0.3 x 10 = 3.0000000000000004 is 3.
    warmup_steps = math.ceil(round(float(cfg.get("warmup_epochs", 0)) * steps_per_epoch, 6))

    def factor(step: int) -> float:
        epoch = step // steps_per_epoch
        decay = gamma ** sum(epoch >= m for m in milestones)
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        return decay * warm

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
