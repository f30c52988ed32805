"""Whether a run folder's checkpoint (or finished summary) belongs to the command rerun on it.

Run folders are named deterministically, so rerunning a command resumes its run; these checks keep
a rerun with other settings or on other data from resuming, or being reported as, a run it is not.
Each refusal names what differs and how to get a folder of one's own, and changes nothing on disk."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..data import DatasetError, resolved_options
from ..flat_config import flatten
from ..loss_options import IMPLEMENTATION_OPTIONS
from .metrics import read_metrics

# Config keys that may differ between a checkpoint and the resuming command (they change how the run
# is executed, not what it computes; loss.kernel picks an implementation of the same numbers, and is
# absent from checkpoints written before it existed).
RESUME_TOLERATED = {
    "trainer.device", "trainer.devices", "trainer.progress_bar", "trainer.log_every", "trainer.num_workers",
    "trainer.checkpoint_every_steps", "trainer.resume", "trainer.compile", "trainer.data_on",
    "trainer.stop_check_s", "trainer.eval_batch_size", "trainer.zipf_fit_at_end", "dataset.root", "tag",
    # (what scores the trained weights, not what trains them; metrics.jsonl records it per epoch,
    # and checkpoints written before it existed evaluated in the training precision)
    "trainer.eval_precision",
    # (how each process splits its share of the same global batch, as trainer.devices is how the
    # processes split it: out of memory, a run resumes with more micro-batches)
    "trainer.accumulate_steps",
    *(f"loss.{option}" for option in IMPLEMENTATION_OPTIONS),
}
# Config values naming a file the run reads: spelled another way, the same file is the same run.
SAME_FILE_KEYS = ("loss.teacher_checkpoint", "model.init_from")
# Config values a run records as the dataset resolved them, which older runs recorded as requested.
RESOLVED_SINCE = ("dataset.format",)
# What a checkpoint to resume from holds (best.pt holds only the model).
RESUMABLE_KEYS = ("model", "optimizer", "scheduler", "scaler", "method", "progress", "running", "rng", "config")


class ResumeError(RuntimeError):
    """The run folder holds a checkpoint of a different configuration."""


def differing_keys(now: dict[str, Any], before: dict[str, Any]) -> list[str]:
    """The flat config keys whose values differ, but for RESUME_TOLERATED ones."""
    return sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k) and k not in RESUME_TOLERATED)


def check_same_config(cfg: DictConfig, saved: dict[str, Any], path: Path, trained_in: str | None = None,
                      training_in: str | None = None) -> None:  # fmt: skip
    """``saved`` (the config in ``path``) must equal the command's, but for RESUME_TOLERATED keys.
    ``trained_in``: the precision the checkpoint trained in; ``training_in``: the one the command's
    trainer.precision means on this machine."""
    now = flatten(OmegaConf.to_container(cfg, resolve=True))
    before = flatten(saved)
    # Recorded before the dataset resolved them (TinyImageNet before 2026-11-27, ImageNet and INAT21 until
    # then too): "auto" matches what it is now.
    before.update({key: now.get(key) for key in RESOLVED_SINCE if before.get(key) == "auto"})
    # trainer.precision=auto and the precision the run trained in, named, where both mean that one: the
    # same run (moved to a machine where auto means another precision, it keeps its own by naming it, as
    # warn_if_precision_changed advises). An explicit precision is not auto where auto means another.
    if (trained_in is not None and training_in == trained_in
            and {now.get("trainer.precision"), before.get("trainer.precision")} <= {"auto", trained_in}):
        before["trainer.precision"] = now.get("trainer.precision")
    # A file named by another path (relative or absolute, through a link): the same file, the same run.
    for key in SAME_FILE_KEYS:
        if now.get(key) != before.get(key) and _same_file(now.get(key), before.get(key)):
            before[key] = now.get(key)
    differing = differing_keys(now, before)
    if not differing:
        return
    details = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in differing[:8])
    if len(differing) > 8:
        details += f", and {len(differing) - 8} more"
    why = ""
    if "trainer.epochs" in differing:
        why = (f" A run is not extended in place: its lr schedule (warm-up, milestones) was laid out for "
               f"trainer.epochs={before.get('trainer.epochs')}, so a longer run is another run.")
    raise ResumeError(
        f"{path} was written by a different configuration ({details}).{why} Use another run folder "
        "(tag=..., hydra.run.dir=... or for a sweep hydra.sweep.dir=...), or trainer.resume=never to start over in this one."
    )


def check_same_data(saved: dict[str, Any] | None, now: dict[str, Any], root: object, path: Path) -> None:
    """The data found now (``now``, under dataset.root ``root``) must be the data the run trained on
    (``saved``, recorded in ``path``; None in files written before 2026-11-27): a run folder's name
    leaves out dataset.root, so another dataset under another root (an image folder, say) would
    otherwise resume this run, or be reported as this finished run."""
    if saved is None or saved == now:
        return

    def described(identity: dict[str, Any]) -> str:
        return (f"{identity.get('num_classes')} classes (names sha1 {identity.get('classes_sha1')}), "
                f"{identity.get('train_size')} train / {identity.get('val_size')} val images")  # fmt: skip

    raise ResumeError(
        f"{path} is a run on other data than dataset.root={root} holds: it trained on "
        f"{described(saved)}, this data has {described(now)}. Run folders are named without dataset.root: "
        "give this data a run folder of its own (tag=... or experiment_name=...), or trainer.resume=never "
        "to start over in this one."
    )


def refuse_to_overwrite_results(run_dir: Path) -> None:
    """No last.pt and no summary.json, yet the folder holds results beyond a first epoch: an
    unfinished run's checkpoint was deleted or lost. Starting over would truncate metrics.jsonl
    and overwrite best.pt. (A kill between the first epoch's metrics line and its checkpoint
    leaves one epoch line: that one is redone.)"""
    done = max((record["epoch"] for record in read_metrics(run_dir)), default=0)
    if done >= 2:
        raise ResumeError(
            f"{run_dir} holds the results of {done} epoch(s) but no checkpoints/last.pt "
            "to resume from; rerunning here would overwrite them. Put last.pt back, use another run "
            "folder (tag=..., hydra.run.dir=... or for a sweep hydra.sweep.dir=...), or trainer.resume=never to start over in this one."
        )


def warn_if_precision_changed(saved: str | None, current: str, requested: object, path: Path) -> None:
    """trainer.precision=auto (``requested``) resolves per machine (bf16 on GPUs and AMX CPUs, else
    fp32): a run resumed on another kind of machine continues in another precision. Allowed, as any
    change of where a run executes, but said. ``saved``: None in checkpoints before 2026-11-27."""
    if saved is not None and saved != current:
        warnings.warn(
            f"{path} trained in {saved} so far; trainer.precision={requested} is {current} on this "
            f"machine, so the run continues in {current} (trainer.precision={saved} keeps it in {saved})",
            UserWarning,
            stacklevel=2,
        )


def absolute_root(root: object) -> str | None:
    """dataset.root as the folder it names (~ expanded, relative to the current directory), as a
    finished run's summary records it; None for a dataset without one (synthetic)."""
    return str(Path(os.path.expanduser(root)).resolve()) if isinstance(root, str) else None


def finished_as_recorded(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """The summary of the finished run in ``run_dir`` when this command reruns it unchanged, told from
    the folder alone: its summary.json and config.yaml, without reading any data or building a model.
    A sweep rerun after a preemption skips its finished runs in milliseconds (each used to build its
    data and model first: ~12 s and 1.4 GB per TinyImageNet run on 2 CPU cores).

    Only with trainer.resume=auto and the dataset.root the run recorded (its summary names it since
    2026-11-28): the data there is then taken to be the data it trained on. The command's values that
    the dataset resolves from what it finds (dataset.format=auto) are resolved as the run would, from
    which files are there: TinyImageNet's tree added beside the pack a run trained on makes auto
    another run. Anything else (another root, another config, an unreadable or older summary, data
    gone) returns None, and the trainer decides as before, reading the data to compare it."""
    summary_path, config_path = run_dir / "summary.json", run_dir / "config.yaml"
    if str(cfg.trainer.resume) != "auto" or not (summary_path.is_file() and config_path.is_file()):
        return None
    try:
        summary = json.loads(summary_path.read_text())
        saved = OmegaConf.to_container(OmegaConf.load(config_path), resolve=False)
    except (OSError, ValueError, OmegaConfBaseException):
        return None
    if not isinstance(summary, dict) or summary.get("status") != "finished" or "dataset_root" not in summary:
        return None
    if summary["dataset_root"] != absolute_root(cfg.dataset.get("root")):
        return None
    try:
        resolved = resolved_options(OmegaConf.to_container(cfg.dataset, resolve=True))
    except DatasetError:
        return None
    now = flatten(OmegaConf.to_container(cfg, resolve=True))
    now.update({f"dataset.{key}": value for key, value in resolved.items()})  # as config.yaml records them
    return None if differing_keys(now, flatten(saved)) else summary


def report_finished(summary: dict[str, Any], run_dir: Path) -> None:
    print(
        f"[zipfls-train] run already finished ({summary.get('epochs')} epochs, best val top-1 "
        f"{_percent(summary.get('best_val_top1'))}): {run_dir}; trainer.resume=never trains it again",
        flush=True,
    )


def _percent(value: object) -> str:
    return f"{value:.2f}%" if isinstance(value, (int, float)) else "unknown"


def _same_file(a: object, b: object) -> bool:
    try:
        return isinstance(a, str) and isinstance(b, str) and os.path.samefile(os.path.expanduser(a), os.path.expanduser(b))
    except OSError:  # (one of them is not there)
        return False
