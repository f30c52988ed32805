"""Model builders. Every model comes out of :func:`build_model` wrapped in :class:`ClassifierWrapper`."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .cifar_densenet import cifar_densenet121
from .cifar_resnet import cifar_resnet18
from .outputs import ModelOutput
from .wrapper import ClassifierWrapper, count_parameters, stage_index, unwrap

# model.name=timm.<architecture>: any other timm model, with timm's own defaults (configs/model/timm.yaml).
TIMM_PREFIX = "timm."

# name -> builder of a backbone (see wrapper.py for the backbone contract). Builders take keyword
# options from the model config (e.g. ``width``). A builder may carry a ``check_options(**options)``
# attribute that checks the options' values without building anything (see check_model_options).
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


def find_backbone(name: str) -> Callable[..., nn.Module] | None:
    """The builder registered as ``name`` (importing the ImageNet models on first need; registering a
    ``timm.<architecture>`` that timm has), or None."""
    if name not in BACKBONES:
        _ensure_imagenet_models_registered()
        if name not in BACKBONES and name.startswith(TIMM_PREFIX):
            from .imagenet import register_timm_model

            register_timm_model(name)
    return BACKBONES.get(name)


def takes_any_option(name: str) -> bool:
    """Whether ``name``'s builder passes any keyword on (the timm models: ``model.options`` are
    timm.create_model's keyword arguments) rather than taking a fixed set of options."""
    parameters = inspect.signature(find_backbone(name)).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def check_model_options(name: str, options: Mapping[str, Any]) -> None:
    """ValueError naming ``model.options.<key>`` and what is allowed, before anything is built.
    Builders with a fixed set of options reject any other key; the builder's own
    ``check_options(**options)``, where it has one, checks the values (cifar_resnet18's width and
    norm; the timm models: a build on the meta device)."""
    builder = find_backbone(name)
    if not takes_any_option(name):
        allowed = list(inspect.signature(builder).parameters)
        unknown = [key for key in options if key not in allowed]
        if unknown:
            raise ValueError(
                f"model.options.{unknown[0]} is not an option of model={name}; its options are "
                f"{allowed if allowed else 'none (model.options must be empty)'}"
            )
    check_options = getattr(builder, "check_options", None)
    if check_options is not None:
        check_options(**options)


def build_model(
    name: str,
    num_classes: int,
    aux_stages: Sequence[str] = (),
    aux_head: str = "linear",
    **options: Any,
) -> ClassifierWrapper:
    """Build ``name`` from scratch, wrapped. ``aux_stages`` adds auxiliary heads (training only)."""
    builder = find_backbone(name)
    if builder is None:
        raise KeyError(f"unknown model {name!r}; expected one of {sorted(BACKBONES)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    backbone = builder(**options)
    return ClassifierWrapper(backbone, num_classes, aux_stages=aux_stages, aux_head=aux_head)


def stage_positions(name: str, stages: Sequence[str], **options: Any) -> tuple[dict[str, int], int]:
    """The 0-based position of each of ``stages`` in model ``name``'s backbone, and its number of
    stages (the backbone is built on the meta device: no memory, no arithmetic); KeyError naming an
    unknown stage and the stages the model has."""
    with torch.device("meta"):
        count = len(find_backbone(name)(**options).stage_channels)
    return {stage: stage_index(stage, count) for stage in stages}, count


def check_trains_on(
    name: str,
    num_classes: int,
    image_size: int,
    batch: int,
    feature_stages: Sequence[str] = (),
    aux_stages: Sequence[str] = (),
    aux_head: str = "linear",
    **options: Any,
) -> dict[str, tuple[int, int]]:
    """Raises ValueError when ``name`` cannot train on batches of ``batch`` images of ``image_size``
    px: a pooling window larger than a late stage's map, or BatchNorm over a single value per
    channel (one image per process on a 1 x 1 map). A training-mode forward on the meta device
    computes shapes only (no memory, no arithmetic), so this costs a fraction of a second. Returns
    the (H, W) of the ``feature_stages`` maps ({} where an operation has no meta kernel)."""
    with torch.device("meta"):
        model = build_model(name, num_classes, aux_stages=aux_stages, aux_head=aux_head, **options)
    inputs = torch.empty(batch, 3, image_size, image_size, device="meta")
    try:
        outputs = model.train()(inputs, features=tuple(feature_stages), aux=bool(aux_stages))
    except NotImplementedError:
        return {}  # an operation without a meta kernel: nothing can be said here, the first step will tell
    except (RuntimeError, ValueError) as error:
        raise ValueError(str(error).splitlines()[0]) from error
    return {stage: tuple(feature_map.shape[-2:]) for stage, feature_map in outputs.features.items()}


__all__ = ["BACKBONES", "TIMM_PREFIX", "ClassifierWrapper", "ModelOutput", "build_model", "check_model_options", "check_trains_on",
           "count_parameters", "find_backbone", "register_backbone", "stage_positions", "takes_any_option", "unwrap"]
