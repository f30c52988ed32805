"""A trained run read back for analysis: its model (from a checkpoint) and its val loader (from the
config stored in the checkpoint), and what the figure commands (``zipf_fit``, ``top_predictions``,
``feature_space``, ``small_objects``) do with runs alike."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


class AnalysisError(ValueError):
    """Runs, files or options that cannot make a figure or a measurement; the message says which."""


@dataclass
class LoadedRun:
    model: nn.Module  # on the device asked for, without its training-only auxiliary heads unless asked
    val: Any  # the run's val loader, built on this machine (loader.epoch(0) yields its batches)
    cfg: Any  # the run's config (a DictConfig), as its checkpoint stored it
    checkpoint: Path  # the file read
    classes: list[str]  # the class ids, by label (wnids for the ImageNet family)


def add_run_arguments(parser, runs_help: str) -> None:  # noqa: ANN001 - an ArgumentParser
    """The runs (one or more) and the options every multi-run figure command takes."""
    parser.add_argument("runs", type=Path, nargs="+", help=f"run folders (their checkpoints/last.pt) or checkpoint files{runs_help}")
    parser.add_argument("--data-root", default=None, help="override dataset.root stored in the checkpoints' configs")
    parser.add_argument("--device", default="auto")


def load_runs(args, aux_heads: bool = False) -> tuple[torch.device, list[LoadedRun]]:  # noqa: ANN001 - parsed arguments
    """The device asked for and the runs of ``add_run_arguments``' options, read onto it; an error
    for runs whose classes differ (they cannot be compared image by image), before any is evaluated."""
    from ..engine.distributed import resolve_device

    device = resolve_device(args.device)
    runs = [load_run(path, args.data_root, device, aux_heads=aux_heads) for path in args.runs]
    for path, run in zip(args.runs[1:], runs[1:]):
        if run.classes != runs[0].classes:
            raise AnalysisError(f"{path} classifies other classes than {args.runs[0]} ({len(run.classes)} vs "
                                f"{len(runs[0].classes)}, or others of the same count): the runs must be of one dataset")  # fmt: skip
    return device, runs


def check_same_val_set(paths: Sequence[Path], targets: Sequence[Tensor]) -> None:
    """Runs compared image by image must have read the same val images: the same labels in order."""
    for path, found in zip(paths[1:], targets[1:]):
        if not torch.equal(found, targets[0]):
            raise AnalysisError(f"{path} was not evaluated on the val images of {paths[0]} ({found.numel()} vs "
                                f"{targets[0].numel()} images, or other labels): the runs must be of one dataset")  # fmt: skip


def run_title(path: Path, run: LoadedRun) -> str:
    """A run's name in a figure: its method, and its folder's name (which tells variants apart); for
    a checkpoint file, its run folder's name and the file's."""
    name = path.name
    if path.is_file() and path.parent.name == "checkpoints":
        name = f"{path.parent.parent.name}/{path.name}"
    return f"{run.cfg.loss.name} ({name})"


@torch.no_grad()
def forward_eval(model: nn.Module, inputs: Tensor, features: Sequence[str] = ()) -> Any:
    """``model``'s output on ``inputs`` in eval mode and float32, whatever autocast is on outside;
    ``features``: the dense maps to return too."""
    model.eval()
    with torch.autocast(inputs.device.type, enabled=False):
        # (no features argument when none is asked for: the trainer's compiled model is called so)
        return model(inputs, features=tuple(features)) if features else model(inputs)


def evaluated(model: nn.Module, loader, features: Sequence[str] = ()) -> Iterator[tuple[Any, Any]]:  # noqa: ANN001
    """``(batch, forward_eval's output)`` for each batch of ``loader``'s epoch."""
    for batch in loader.epoch(0):
        yield batch, forward_eval(model, batch.inputs, features)


def load_run(path: Path, data_root: str | None, device: torch.device, default_checkpoint: str = "last.pt",
             aux_heads: bool = False) -> LoadedRun:  # fmt: skip
    """A run folder (its ``checkpoints/<default_checkpoint>``) or a checkpoint file. ``data_root``
    replaces the stored ``dataset.root`` (the run may have trained on another machine, or from
    another folder: a relative root is relative to where it was started). ``aux_heads``: keep the
    training-only auxiliary heads (Dense2's penultimate voter)."""
    from omegaconf import OmegaConf

    from ..data import DatasetError, LoaderOptions, build_data
    from ..engine.checkpoint import CheckpointError, load_checkpoint
    from ..engine.config_checks import loader_workers
    from ..trained import model_from_checkpoint

    if not path.exists():
        raise CheckpointError(f"{path} does not exist: expected a run folder (holding checkpoints/{default_checkpoint}) or a checkpoint file")
    checkpoint_path = path / "checkpoints" / default_checkpoint if path.is_dir() else path
    if path.is_dir() and not checkpoint_path.exists():
        runs = sorted(found.parent.parent for found in path.glob(f"*/checkpoints/{default_checkpoint}"))
        if runs:
            names = ", ".join(run.name for run in runs[:3]) + (f" ... ({len(runs)} runs)" if len(runs) > 3 else "")
            raise CheckpointError(f"{path} is a folder of runs (a sweep's, say), not one run: pass one of them ({names})")
    state = load_checkpoint(checkpoint_path, map_location="cpu")
    cfg = OmegaConf.create(state["config"])
    if data_root is not None:
        cfg.dataset.root = data_root
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    # Loader workers for this machine (the run's own setting was for the machine it trained on).
    options = LoaderOptions(batch_size=int(cfg.trainer.batch_size), eval_batch_size=int(cfg.trainer.eval_batch_size),
                            device=device, seed=int(cfg.seed), num_workers=loader_workers("auto"))
    try:
        data = build_data(dataset, options)
    except DatasetError as error:
        if data_root is not None:
            raise
        raise DatasetError(
            f"{error}\nThe dataset.root above is the one stored in {checkpoint_path} (a relative path is relative to the "
            "folder the run was started from): pass --data-root <dataset folder> to read the dataset from another place"
        ) from error
    model = model_from_checkpoint(state, aux_heads=aux_heads)
    return LoadedRun(model.to(device), data.val, cfg, checkpoint_path, list(data.classes))


def inputs_at(loader, positions: Sequence[int]) -> Tensor:  # noqa: ANN001
    """The ``loader``'s inputs (normalised, on its device) at ``positions`` (ascending, in the order
    of ``loader.epoch(0)``), stacked; the loader is read only as far as the last of them."""
    wanted, found, start = list(positions), [], 0
    for batch in loader.epoch(0):
        found += [batch.inputs[p - start] for p in wanted if start <= p < start + batch.size]
        start += batch.size
        if len(found) == len(wanted):
            break
    if len(found) != len(wanted):
        raise IndexError(f"positions {wanted} reach past the loader's {start} images")
    return torch.stack(found)


def as_shown(loader, inputs: Tensor) -> list[Tensor]:  # noqa: ANN001
    """``loader``'s normalised ``inputs`` as images to show: H x W x 3 floats in [0, 1], on the CPU."""
    mean = torch.tensor(loader.normalize.mean).view(3, 1, 1)
    std = torch.tensor(loader.normalize.std).view(3, 1, 1)
    return [(image.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0) for image in inputs]


def same_inputs(runs: Sequence[LoadedRun]) -> bool:
    """Whether the runs' val loaders give the same inputs (their dataset configs agree but for where
    the files are), so that one read of the chosen images serves every model."""
    from omegaconf import OmegaConf

    def dataset(run: LoadedRun) -> dict:
        config = OmegaConf.to_container(run.cfg.dataset, resolve=True)
        config.pop("root", None)
        return config

    return all(dataset(run) == dataset(runs[0]) for run in runs[1:])
