"""A trained run's model, for inference or fine-tuning.

    from zipfls_train import load_trained_model
    model = load_trained_model("outputs/demo/<run>")          # its checkpoints/best.pt, eval mode, CPU
    logits = model(images).logits                             # images: N x 3 x H x W, normalised

The model is the one the checkpoint's config names (``model.name``, ``model.options``), built for the
run's class count (``dataset.num_classes_subset`` where the run trained on a subset, else
``dataset.num_classes``), with the checkpoint's weights. Auxiliary heads (zipf_dense2, BYOT) are
training-only: their weights are dropped unless ``aux_heads=True``. Inputs are normalised as the run
normalised them: ``dataset.mean`` / ``dataset.std`` in the run's ``config.yaml`` (or the checkpoint's
``config``), at ``dataset.image_size`` px.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .data.bundle import configured_num_classes
from .engine.checkpoint import CheckpointError, load_checkpoint
from .models import ClassifierWrapper, build_model

AUX_HEADS_PREFIX = "aux_heads."  # the state-dict entries of ClassifierWrapper.aux_heads


def model_weights(state: Mapping[str, Tensor], aux_heads: bool = False) -> dict[str, Tensor]:
    """A checkpoint's ``model`` entries, those of the auxiliary heads left out unless ``aux_heads``
    (they never affect the logits: the eval forward does not call them)."""
    return {key: value for key, value in state.items() if aux_heads or not key.startswith(AUX_HEADS_PREFIX)}


def checkpoint_path(path: str | Path) -> Path:
    """``path`` itself for a file, ``<run>/checkpoints/best.pt`` for a run folder (``~`` expanded)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return path
    best = path / "checkpoints" / "best.pt"
    if not best.is_file():
        raise CheckpointError(
            f"{path} is a folder without checkpoints/best.pt: expected a run folder (best.pt is written after "
            "its first evaluated epoch) or a checkpoint file such as <run>/checkpoints/last.pt"
        )
    return best


def model_from_checkpoint(state: Mapping[str, Any], aux_heads: bool = False) -> ClassifierWrapper:
    """The model a loaded checkpoint (``load_checkpoint``'s dict) names, with its weights, on the CPU
    (in train mode, as built)."""
    config = state.get("config")
    if not isinstance(config, Mapping) or not isinstance(config.get("model"), Mapping):
        raise CheckpointError("the checkpoint has no config naming its model (it was not written by zipfls-train's trainer)")
    weights = model_weights(state["model"], aux_heads)
    dataset = config.get("dataset") if isinstance(config.get("dataset"), Mapping) else {}
    num_classes = configured_num_classes(dataset)
    if num_classes is None and "classifier.weight" in weights:  # a config without the class count
        num_classes = weights["classifier.weight"].shape[0]
    aux_stages, aux_head = (), "linear"
    if aux_heads and any(key.startswith(AUX_HEADS_PREFIX) for key in weights):
        from .losses import build_method  # the heads the run's loss trained with

        needs = build_method(dict(config["loss"]), int(num_classes)).needs
        aux_stages, aux_head = needs.aux_stages, needs.aux_head
    options = dict(config["model"].get("options") or {})
    model = build_model(str(config["model"]["name"]), int(num_classes), aux_stages=aux_stages, aux_head=aux_head, **options)
    model.load_state_dict(weights)
    return model


def load_trained_model(path: str | Path, device: str | torch.device = "cpu", *, aux_heads: bool = False) -> ClassifierWrapper:
    """The trained model of a run folder (its ``checkpoints/best.pt``) or of a checkpoint file
    (``best.pt`` or ``last.pt``), on ``device``, in eval mode. ``model(images).logits`` are its
    N x C logits; train mode (``model.train()``) for fine-tuning. ``aux_heads``: keep the auxiliary
    heads of a zipf_dense2 / BYOT run (dropped by default)."""
    state = load_checkpoint(checkpoint_path(path), map_location="cpu")
    return model_from_checkpoint(state, aux_heads=aux_heads).to(device).eval()
