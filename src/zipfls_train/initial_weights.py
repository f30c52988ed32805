"""``model.init_from``: a run that starts from trained weights rather than from scratch.

The paper trains every model from scratch (``model.init_from: null``, the default). A researcher
fine-tuning on a dataset of their own starts from weights trained elsewhere, from one of three sources:

* a zipfls-train run folder (its ``checkpoints/best.pt``) or checkpoint file, or a zipfls-train
  model's ``state_dict()`` saved with ``torch.save``: the backbone must all be there (the same
  ``model.name`` and shape-changing options); the classifier and the auxiliary heads are taken for
  the same classes (the same class count, and the same ``dataset.name`` where the checkpoint
  records its own) and stay as initialised otherwise;
* a weights file published for the network (``.pth``, ``.pt``, ``.bin``, ``.safetensors``:
  torchvision's or timm's ImageNet weights, or a timm training checkpoint), for the timm-built models
  (``resnet50``, ``densenet121``, ..., ``timm.<architecture>``): the backbone's weights, with
  timm's conversion of the family's older names (torchvision's DenseNet files) applied; the
  file's classifier is left out, the run's own is trained from its initialisation. The prefixes
  DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) add to names are removed;
* ``timm`` or ``timm:<tag>``: timm's published weights for the architecture (its default tag, or
  e.g. ``timm:tv_in1k`` for torchvision's), which timm downloads from Hugging Face or reads from its
  cache (``HF_HUB_OFFLINE=1`` to use the cache only).

Whatever the source, every backbone weight must come from it: a file of another architecture is
refused with the names that do not fit, never loaded in part. The trainer applies the weights when a
run starts fresh, not when it resumes (the checkpoint then holds the weights, and the source may be
gone), on every process alike.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .engine.checkpoint import CheckpointError, read_torch_file
from .trained import AUX_HEADS_PREFIX, checkpoint_path

TIMM_SOURCE = "timm"
# Entries under which training scripts store a network's weights in a checkpoint (timm's train.py,
# DeiT and others), looked for in this order: EMA weights first, as timm reads them.
_WEIGHT_ENTRIES = ("state_dict_ema", "model_ema", "state_dict", "model")
_LISTED = 5  # names shown per kind of mismatch
# BatchNorm's step counter (read only with momentum=None): files saved before torch 0.4.1 lack it,
# torchvision's published DenseNet weights among them; a network keeps its own.
OPTIONAL_SUFFIX = "num_batches_tracked"
PUBLISHED_HINT = (
    "They are another architecture's (or of other model.options), or named as another library names them "
    "(torchvision's MobileNetV2, say, which timm names otherwise: timm's own weights fit, model.init_from=timm)"
)


class InitialWeightsError(ValueError):
    """``model.init_from`` cannot be applied; the message names the source and what does not fit."""


@dataclass
class InitialWeights:
    """What a run started from, for its console line and its environment.jsonl record."""

    source: str  # model.init_from as given
    loaded: list[str] = field(default_factory=list)  # parts taken from the source: backbone, classifier, aux_heads.<stage>
    kept: list[str] = field(default_factory=list)  # parts left as initialised, each with why
    resolved: str | None = None  # the file read (or timm's model.tag)
    sha256: str | None = None  # of that file
    # What the tables key a cell on: the same weights, or runs of the same setting, whatever the path
    # (timm's model.tag; a file's name and sha256; a run's dataset, model, loss and epochs).
    cell: str | None = None

    def describe(self) -> str:
        text = f"weights from {self.resolved or self.source}: {', '.join(self.loaded)}"
        return text + (f"; as initialised: {'; '.join(self.kept)}" if self.kept else "")

    def record(self) -> dict[str, Any]:
        return {"from": self.source, "file": self.resolved, "sha256": self.sha256, "loaded": self.loaded, "as_initialised": self.kept,
                "cell": self.cell}  # fmt: skip


def check_source(source: object, model_name: str) -> None:
    """What can be checked before anything is built or read: the value's type, and for ``timm[:tag]``
    that the model is timm-built and the tag exists. (Whether a path exists is checked when a run
    starts fresh: a resumed run does not read it.)"""
    if source is None:
        return
    if not isinstance(source, str) or not source.strip():
        raise InitialWeightsError(
            f"model.init_from must be null (from scratch), a run folder, a checkpoint or weights file, or timm[:tag]; got {source!r}"
        )
    if is_timm_source(source):
        timm_name, tag = timm_architecture(model_name), source.partition(":")[2]
        import timm

        published = timm.list_pretrained(f"{timm_name}.*")
        wanted = f"{timm_name}.{tag}" if tag else timm_name
        found = wanted in published if tag else bool(published)
        if not found:
            tags = [name.partition(".")[2] for name in published]
            raise InitialWeightsError(
                f"model.init_from={source}: timm publishes no weights {wanted!r} for model={model_name}"
                + (f"; its tags: {', '.join(tags)} (model.init_from=timm:<tag>)" if tags else " (none at all for this architecture)")
            )


def is_timm_source(source: str) -> bool:
    return source == TIMM_SOURCE or source.startswith(f"{TIMM_SOURCE}:")


def timm_architecture(model_name: str) -> str:
    """timm's name for ``model_name``'s network; InitialWeightsError for a model timm does not build."""
    from .models import TIMM_PREFIX

    if model_name.startswith(TIMM_PREFIX):
        return model_name.removeprefix(TIMM_PREFIX)
    from .models.imagenet import ARCHITECTURES

    if model_name in ARCHITECTURES:
        return ARCHITECTURES[model_name][0]
    raise InitialWeightsError(
        f"model.init_from: model={model_name} is not built by timm, so it has no published weights; start it from a "
        "zipfls-train run of the same model (model.init_from=<run folder or checkpoint>)"
    )


def apply_initial_weights(model: nn.Module, source: str, model_name: str, dataset_name: str | None = None) -> InitialWeights:
    """Loads ``source``'s weights into ``model`` (a :class:`~zipfls_train.models.ClassifierWrapper`,
    on any device) in place and says what it took. A run's classifier and auxiliary heads are taken
    only for the same classes: the same class count, and the same dataset (``dataset_name``, this
    run's) where the source names its own. InitialWeightsError when the source is missing,
    unreadable, or does not fit."""
    check_source(source, model_name)
    if is_timm_source(source):
        return _from_timm(model, source, model_name)
    try:
        path = checkpoint_path(source)  # (a run folder's best.pt)
        if not path.is_file():
            raise InitialWeightsError(f"model.init_from={source}: no such file or folder (expected a run folder, a checkpoint or a weights file)")
        content = _read(path)
    except CheckpointError as error:
        raise InitialWeightsError(f"model.init_from={source}: {error}") from error
    result = InitialWeights(source, resolved=str(path), sha256=_sha256(path))
    result.cell = f"{path.name} sha256:{result.sha256[:12]}"
    if _is_zipfls_checkpoint(content):
        _from_run(model, content, model_name, dataset_name, result)
        return result
    weights = _network_weights(content, path)
    if _is_wrapper_state(weights):  # a zipfls-train model's own state_dict (load_trained_model(...).state_dict())
        _load_wrapper(model, weights, model_name, None, dataset_name, result)
    else:
        _load_published(model, weights, result, model_name)
    return result


# --- the three sources ------------------------------------------------------------------------------
def _from_run(model: nn.Module, checkpoint: Mapping[str, Any], model_name: str, dataset_name: str | None,
              result: InitialWeights) -> None:  # fmt: skip
    """A zipfls-train checkpoint, of a run of the same model."""
    config = checkpoint["config"]
    trained_as = str(config["model"].get("name"))
    if trained_as != model_name:
        raise InitialWeightsError(f"model.init_from={result.source}: that run trained model={trained_as}, this one is model={model_name}")
    dataset = config.get("dataset") if isinstance(config.get("dataset"), Mapping) else {}
    loss = config.get("loss") if isinstance(config.get("loss"), Mapping) else {}
    trainer = config.get("trainer") if isinstance(config.get("trainer"), Mapping) else {}
    result.cell = (f"a zipfls-train run ({dataset.get('name')}, model={model_name}, loss={loss.get('name')}, "
                   f"{trainer.get('epochs')} epochs)")  # fmt: skip
    source_dataset = None if dataset.get("name") is None else str(dataset["name"])
    _load_wrapper(model, checkpoint["model"], model_name, source_dataset, dataset_name, result)


def _load_wrapper(model: nn.Module, weights: Mapping[str, Tensor], model_name: str, source_dataset: str | None,
                  dataset_name: str | None, result: InitialWeights) -> None:  # fmt: skip
    """A zipfls-train model's weights: the backbone whole, the classifier and each auxiliary head
    where they fit (the same shapes; the same dataset, where both are known)."""
    own = model.state_dict()
    backbone = {key: value for key, value in own.items() if key.startswith("backbone.")}
    _require_all(backbone, weights, result.source, f"this run's model={model_name}",
                 "That run's model had other model.options (its config.yaml has them), or its checkpoint is not of this version")
    taken = {key: weights[key] for key in backbone if key in weights}  # (but optional keys it lacks)
    result.loaded.append("backbone")
    other_classes = source_dataset is not None and dataset_name is not None and source_dataset != dataset_name
    for part, keys in _head_parts(own).items():
        if other_classes:
            result.kept.append(f"{part} (the checkpoint's is for {source_dataset}'s classes, this run trains on {dataset_name})")
        elif all(key in weights and weights[key].shape == own[key].shape for key in keys):
            taken.update({key: weights[key] for key in keys})
            result.loaded.append(part)
        else:
            result.kept.append(f"{part} ({_why_not(part, keys, own, weights)})")
    model.load_state_dict(taken, strict=False)


def _from_timm(model: nn.Module, source: str, model_name: str) -> InitialWeights:
    """timm's published weights, fetched by timm (Hugging Face, or its cache) into a model of its own."""
    import timm

    backbone = model.backbone
    tag = source.partition(":")[2]
    name = f"{backbone.timm_name}.{tag}" if tag else backbone.timm_name
    try:
        # The whole network, classifier included: timm then loads the weights strictly.
        published = timm.create_model(name, pretrained=True, **backbone.timm_kwargs)
    except Exception as error:  # hub, network and cache errors come in many types; all mean the same here
        raise InitialWeightsError(
            f"model.init_from={source}: timm could not fetch its weights {name!r} ({type(error).__name__}: {error}). "
            "Without internet: download the weights file elsewhere (e.g. the model.safetensors of "
            f"https://huggingface.co/timm/{published_name(name)}) and give its path, model.init_from=/path/to/model.safetensors"
        ) from error
    resolved = f"timm {published.pretrained_cfg.get('architecture')}.{published.pretrained_cfg.get('tag')}"
    result = InitialWeights(source, resolved=resolved, cell=resolved)
    _load_published(model, published.state_dict(), result, model_name, published.pretrained_cfg.get("classifier"))
    return result


def published_name(name: str) -> str:
    """``resnet50`` -> ``resnet50.a1_in1k`` (timm's default tag), ``resnet50.tv_in1k`` as it is."""
    import timm

    if "." in name:
        return name
    tagged = timm.list_pretrained(f"{name}.*")
    return tagged[0] if tagged else name


def _load_published(model: nn.Module, weights: Mapping[str, Tensor], result: InitialWeights, model_name: str,
                    classifier: str | tuple[str, ...] | None = None) -> None:  # fmt: skip
    """A network's weights as timm names them into the timm network inside ``model``'s backbone; its
    classifier (``classifier``: its names, else timm's for the network) left out."""
    if not hasattr(model.backbone, "timm_name"):
        timm_architecture(model_name)  # raises: not a timm-built model
    network = model.backbone.model
    weights = _timm_names(dict(weights), network)
    classifier = classifier or network.pretrained_cfg.get("classifier")
    for name in (classifier,) if isinstance(classifier, str) else classifier or ():
        for suffix in (".weight", ".bias"):
            weights.pop(name + suffix, None)
    own = network.state_dict()
    _require_all(own, weights, result.source, f"timm's {model.backbone.timm_name} (model={model_name})", PUBLISHED_HINT, unexpected=True)
    network.load_state_dict(weights, strict=False)  # (_require_all checked every key but OPTIONAL_SUFFIX ones)
    result.loaded.append("backbone")
    result.kept.append("classifier (the source's is for its own classes)")
    result.kept.extend(f"{part} (not in the source)" for part in _head_parts(model.state_dict()) if part != "classifier")


# --- reading and checking ---------------------------------------------------------------------------
def _read(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from error
    # timm's training checkpoints hold their command line as an argparse.Namespace (data, but not a
    # class torch.load admits by itself; timm's own loader admits it too).
    return read_torch_file(path, expected="a run's checkpoint or a network's weights saved with torch.save",
                           allowed=[argparse.Namespace], if_corrupt="download or copy the weights again")


def _is_zipfls_checkpoint(content: Any) -> bool:
    return (isinstance(content, Mapping) and isinstance(content.get("model"), Mapping)
            and isinstance(content.get("config"), Mapping) and isinstance(content["config"].get("model"), Mapping))  # fmt: skip


def _network_weights(content: Any, path: Path) -> dict[str, Tensor]:
    """The name -> tensor mapping of a weights file: the file itself, or its EMA / state_dict / model
    entry; the prefixes of DDP (``module.``) and torch.compile (``_orig_mod.``) removed."""
    if isinstance(content, Mapping):
        for entry in _WEIGHT_ENTRIES:
            if isinstance(content.get(entry), Mapping):
                content = content[entry]
                break
    expected = f"expected a network's weights (a mapping of parameter names to tensors, or a checkpoint holding one under {' / '.join(_WEIGHT_ENTRIES)})"
    if not isinstance(content, Mapping) or not content:
        raise InitialWeightsError(f"model.init_from={path}: {expected}; got {'an empty ' if isinstance(content, Mapping) else ''}{type(content).__name__}")
    for key, value in content.items():
        if not isinstance(value, Tensor):
            raise InitialWeightsError(f"model.init_from={path}: {expected}; its entry {key!r} is a {type(value).__name__}")
    return {_unprefixed(str(key)): value for key, value in content.items()}


def _unprefixed(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key.removeprefix(prefix)
    return key


def _is_wrapper_state(weights: Mapping[str, Tensor]) -> bool:
    return all(key.startswith(("backbone.", "classifier.", AUX_HEADS_PREFIX)) for key in weights) and any(key.startswith("backbone.") for key in weights)


def _timm_names(weights: dict[str, Tensor], network: nn.Module) -> dict[str, Tensor]:
    """timm's own conversion of a family's other checkpoint names, where it has one (its DenseNet
    reads torchvision's ``norm.1`` as ``norm1``; most families need none)."""
    import sys

    module = sys.modules.get(type(network).__module__)
    convert = getattr(module, "checkpoint_filter_fn", None) or getattr(module, "_filter_torchvision_pretrained", None)
    if convert is None:
        return weights
    try:
        converted = convert(weights, network)
    except TypeError:  # converters of one argument
        converted = convert(weights)
    return dict(converted)


def _require_all(own: Mapping[str, Tensor], weights: Mapping[str, Tensor], source: str, what: str, hint: str,
                 unexpected: bool = False) -> None:  # fmt: skip
    """InitialWeightsError unless ``weights`` has every key of ``own`` in its shape (and, with
    ``unexpected``, no other key); ``hint``: the likely causes, for the message."""
    missing = [key for key in own if key not in weights and not key.endswith(OPTIONAL_SUFFIX)]
    shapes = [f"{key} {tuple(weights[key].shape)} (needs {tuple(own[key].shape)})" for key in own
              if key in weights and weights[key].shape != own[key].shape]  # fmt: skip
    extra = [key for key in weights if key not in own] if unexpected else []
    if not (missing or shapes or extra):
        return
    problems = []
    for label, names in (("missing", missing), ("of another shape", shapes), ("not in the network", extra)):
        if names:
            listed = ", ".join(names[:_LISTED]) + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")
            problems.append(f"{len(names)} {label}: {listed}")
    raise InitialWeightsError(f"model.init_from={source}: its weights do not fit {what} ({'; '.join(problems)}). {hint}")


def _head_parts(state: Mapping[str, Tensor]) -> dict[str, list[str]]:
    """The wrapper's parts other than the backbone: ``classifier`` and ``aux_heads.<stage>``, with their keys."""
    parts: dict[str, list[str]] = {}
    for key in state:
        if key.startswith("backbone."):
            continue
        head = ".".join(key.split(".")[:2]) if key.startswith(AUX_HEADS_PREFIX) else key.split(".")[0]
        parts.setdefault(head, []).append(key)
    return parts


def _why_not(part: str, keys: list[str], own: Mapping[str, Tensor], weights: Mapping[str, Tensor]) -> str:
    if not any(key in weights for key in keys):
        return "not in the checkpoint"
    if part == "classifier":
        return f"the checkpoint's is for {weights['classifier.weight'].shape[0]} classes, this run has {own['classifier.weight'].shape[0]}"
    return "of another shape in the checkpoint"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["InitialWeights", "InitialWeightsError", "apply_initial_weights", "check_source"]
