"""Model builders. Every model comes out of :func:`build_model` wrapped in :class:`ClassifierWrapper`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from .cifar_densenet import cifar_densenet121
from .cifar_resnet import cifar_resnet18
from .outputs import ModelOutput
from .wrapper import ClassifierWrapper, count_parameters, unwrap

# name -> builder of a backbone (see wrapper.py for the backbone contract). Builders take keyword
# options from the model config (e.g. ``width``).
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "cifar_resnet18": cifar_resnet18,
    "cifar_densenet121": cifar_densenet121,
}


def register_backbone(name: str, builder: Callable[..., nn.Module]) -> None:
    BACKBONES[name] = builder


def _ensure_imagenet_models_registered() -> None:
    # ImageNet-scale models live in their own module (timm import is slow); imported on demand.
    try:
        from . import imagenet  # noqa: F401
    except ImportError as error:  # pragma: no cover - only when the module itself is broken
        if "zipfls_train.models.imagenet" not in str(error):
            raise


def build_model(
    name: str,
    num_classes: int,
    aux_stages: Sequence[str] = (),
    aux_head: str = "linear",
    **options: Any,
) -> ClassifierWrapper:
    """Build ``name`` from scratch, wrapped. ``aux_stages`` adds auxiliary heads (training only)."""
    if name not in BACKBONES:
        _ensure_imagenet_models_registered()
    if name not in BACKBONES:
        raise KeyError(f"unknown model {name!r}; expected one of {sorted(BACKBONES)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    backbone = BACKBONES[name](**options)
    return ClassifierWrapper(backbone, num_classes, aux_stages=aux_stages, aux_head=aux_head)


__all__ = ["BACKBONES", "ClassifierWrapper", "ModelOutput", "build_model", "count_parameters", "register_backbone", "unwrap"]
