"""Read run folders and reduce them to table cells (mean ± std over seeds).

A run folder is any folder holding ``config.yaml`` (the resolved config the trainer writes) next to
``metrics.jsonl`` (one JSON object per completed epoch). ``metrics.jsonl`` is the source of truth:
``summary.json`` is ignored, and a run with fewer epochs than ``trainer.epochs`` is incomplete.

    runs = load_runs(["outputs/multirun/table2_tinyimagenet_resnet18"])
    for key, cell_runs in group_cells(runs).items():
        print(key.method, summarise(cell_runs).best_mean)

No torch import here: the table CLI must start fast and run anywhere the files are.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..engine.run_folder import EARLIER_ATTEMPT_PREFIX, MetricsFileError, parse_metrics
from ..flat_config import flatten
from ..loss_options import IMPLEMENTATION_OPTIONS

# Reference values of options a config may predate (configs/loss/zipf.yaml's defaults): filled in
# when a zipf run's config lacks them, so such runs still match the paper's cells.
OPTION_DEFAULTS: dict[str, dict[str, Any]] = {
    "zipf": {"rank_by": "dense", "stages": ("final",), "distribution": "zipf"},
}
# Loss options that name files (a BAN teacher checkpoint, ...) differ per seed and say nothing about
# the method's setting, so they never split cells.
_PATH_LIKE_WORDS = ("path", "ckpt", "checkpoint", "teacher", "dir", "file")
# Dataset keys that change what is trained on; they are part of a cell's recipe (format: which copy
# of a dataset that has several, e.g. TinyImageNet's 64 px tree or 32 px pack; the augmentation and
# the test transform: runs that differ there never average into one cell; num_classes: the dataset's
# classes, another folder of images read under the dataset's name).
_RECIPE_DATASET_KEYS = ("image_size", "num_classes", "num_classes_subset", "train_per_class", "val_per_class", "format",
                        "train_augment", "test_transform")
# Trainer keys that change what is trained: the global batch and a cap on an epoch's steps (an epoch
# of 1 step is not an epoch of the recipe).
_RECIPE_TRAINER_KEYS = ("batch_size", "max_steps_per_epoch")

Hashable = Any  # a value made hashable by _freeze (tuples instead of lists)


class RunFolderError(ValueError):
    """A folder, config or metrics file that cannot be read as runs; the message names it."""


@dataclass(frozen=True)
class CellKey:
    """What makes runs comparable: everything but the seed."""

    dataset: str
    model: str
    method: str
    # Loss options other than the name, sorted (key, value) pairs; lists become tuples.
    options: tuple[tuple[str, Hashable], ...] = ()
    # Planned epochs, dataset subset/resolution keys and model options ("model.<key>"), sorted pairs.
    recipe: tuple[tuple[str, Hashable], ...] = ()

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)

    @property
    def planned_epochs(self) -> int:
        return int(dict(self.recipe)["epochs"])


@dataclass(frozen=True)
class Run:
    """One run folder, read."""

    path: Path
    seed: int
    experiment_name: str
    key: CellKey
    epochs_done: int
    best_top1: float | None  # max val_top1 over the completed epochs
    best_epoch: int | None
    last_top1: float | None  # val_top1 of the last completed epoch
    epoch_times_s: tuple[float, ...] = ()  # steady ones: see _steady_epoch_times
    peak_gpu_mem_mb: float | None = None  # max over epochs; None on CPU
    peak_cpu_mem_mb: float | None = None
    setups: tuple[str, ...] = ()  # what trained it, one label per distinct attempt setup (environment.jsonl)

    @property
    def planned_epochs(self) -> int:
        return self.key.planned_epochs

    @property
    def complete(self) -> bool:
        return self.epochs_done >= self.planned_epochs


@dataclass(frozen=True)
class CellSummary:
    """The statistics of one cell. Stats use the complete runs; only when none is complete do they use
    the incomplete ones (then ``from_incomplete`` is set and the table says so)."""

    key: CellKey
    counted: tuple[Run, ...]  # the runs the statistics are over (one per seed)
    incomplete: tuple[Run, ...]  # incomplete runs of this cell (counted only if none is complete)
    duplicates: tuple[Run, ...]  # further runs of an already counted seed, ignored
    best_mean: float | None
    best_std: float | None  # sample std (ddof=1); None with fewer than two seeds
    last_mean: float | None
    from_incomplete: bool = False
    seeds: tuple[int, ...] = field(default=())

    @property
    def n_seeds(self) -> int:
        return len(self.counted)


# ---------------------------------------------------------------- reading


def find_run_dirs(folder: Path) -> list[Path]:
    """Folders under ``folder`` (itself included) holding config.yaml next to metrics.jsonl, except
    the results of an attempt a run started over from (``<run>/earlier_attempt_<k>/``)."""
    candidates = [folder / "metrics.jsonl", *folder.rglob("metrics.jsonl")]
    found = {
        p.parent.resolve() for p in candidates
        if p.is_file() and (p.parent / "config.yaml").is_file() and not p.parent.name.startswith(EARLIER_ATTEMPT_PREFIX)
    }  # fmt: skip
    return sorted(found)


def _freeze(value: Any) -> Hashable:
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _is_path_like(name: str, value: Any) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _PATH_LIKE_WORDS) or (isinstance(value, str) and "/" in value)


def _require(config: Mapping[str, Any], dotted: str, source: Path) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise RunFolderError(f"{source}: missing key {dotted!r} (expected the trainer's resolved config)")
        node = node[part]
    return node


def cell_key_from_config(config: Mapping[str, Any], source: Path, scored_in: str | None = None,
                         initial_weights: str | None = None) -> CellKey:  # fmt: skip
    """The cell a run belongs to, from its resolved config; ``scored_in``: what its val was scored
    in as its metrics record it (:func:`scored_in`), else as its config says; ``initial_weights``:
    the weights it started from as its environment.jsonl records them (:func:`initial_weights_cell`),
    else as its config names them."""
    dataset = _require(config, "dataset.name", source)
    model = _require(config, "model.name", source)
    loss = _require(config, "loss", source)
    method = _require(config, "loss.name", source)
    # The method's options tell cells apart; its name, checkpoint paths and the implementation
    # choices (loss.kernel: the same numbers either way) do not.
    chosen = {k: v for k, v in loss.items() if k != "name" and k not in IMPLEMENTATION_OPTIONS}
    options = {k: v for k, v in flatten(chosen).items() if not _is_path_like(k, v)}
    for name, default in OPTION_DEFAULTS.get(method, {}).items():
        options.setdefault(name, default)
    recipe: dict[str, Any] = {"epochs": int(_require(config, "trainer.epochs", source))}
    for name in _RECIPE_TRAINER_KEYS:
        recipe[name] = config["trainer"].get(name)
    recipe["eval_precision"] = scored_in or _eval_precision(config["trainer"])
    for name in _RECIPE_DATASET_KEYS:
        recipe[name] = config["dataset"].get(name)
    # Model options (e.g. a narrower CIFAR ResNet) change the model, and the optimiser and schedule
    # (lr, weight decay, milestones) the training: runs that differ never mix.
    for name, value in flatten(config["model"].get("options") or {}).items():
        recipe[f"model.{name}"] = value
    # Weights trained elsewhere (the paper trains from scratch): never averaged with runs from scratch.
    # (A run without its record, its environment.jsonl gone: the value as written, the same cell.)
    written = config["model"].get("init_from")
    recipe["init_from"] = initial_weights or (None if written is None else str(written))
    for group in ("optim", "sched"):
        for name, value in flatten(config.get(group) or {}).items():
            if value is not None:  # null is a key's default (optim.backbone_lr_factor), as is its absence in older runs
                recipe[f"{group}.{name}"] = value
    return CellKey(
        dataset=str(dataset),
        model=str(model),
        method=str(method),
        options=tuple(sorted((k, _freeze(v)) for k, v in options.items())),
        recipe=tuple(sorted((k, _freeze(v)) for k, v in recipe.items())),
    )


def initial_weights_cell(records: Sequence[Mapping[str, Any]]) -> str | None:
    """What a run's fresh start recorded as its initial weights' cell (``initial_weights.cell`` in
    environment.jsonl: the weights' sha256, or the setting of the run they come from; the path, which
    differs per seed and per machine, does not count), or None."""
    for record in records:
        initial = record.get("initial_weights")
        if isinstance(initial, Mapping) and isinstance(initial.get("cell"), str):
            return initial["cell"]
    return None


def _eval_precision(trainer: Mapping[str, Any]) -> str:
    """What val was scored in, from the config alone (a run without epoch records): "train"
    (trainer.eval_precision=train, the training precision's autocast: a bf16 forward moves top-1 by
    0.1-2 points from the fp32 score, so such runs never average with fp32-scored ones) or "fp32"."""
    scored_as_trained = trainer.get("eval_precision", "fp32") == "train" and trainer.get("precision") != "fp32"
    return "train" if scored_as_trained else "fp32"


def scored_in(records: Sequence[Mapping[str, Any]]) -> str | None:
    """What a run's val was scored in, from its epoch records: "train" when any epoch was scored in
    a precision other than fp32, else "fp32"; None without records. An epoch recorded before
    ``eval_precision`` existed was scored in its training ``precision`` (bf16 where trainer.precision=auto
    chose it); one recorded before either existed, in fp32."""
    if not records:
        return None
    precisions = {record.get("eval_precision") or record.get("precision") or "fp32" for record in records}
    return "fp32" if precisions <= {"fp32"} else "train"


def read_epoch_records(path: Path) -> list[dict[str, Any]]:
    """Epoch records of metrics.jsonl, one per epoch (a re-logged epoch keeps its last record).

    A malformed last line is a write cut short by a kill and is dropped; a malformed line before
    the last is corruption and raises.
    """
    try:
        records = parse_metrics(path)
    except MetricsFileError as error:
        raise RunFolderError(str(error)) from error
    by_epoch = {record["epoch"]: record for record in records}
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def _finite(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def read_run(run_dir: Path) -> Run:
    """One run folder -> :class:`Run`."""
    config_path = run_dir / "config.yaml"
    try:
        config = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as error:
        raise RunFolderError(f"{config_path}: not valid YAML ({error})") from error
    if not isinstance(config, Mapping):
        raise RunFolderError(f"{config_path}: expected a mapping (the resolved config)")
    records = read_epoch_records(run_dir / "metrics.jsonl")
    attempts = read_environment(run_dir)
    key = cell_key_from_config(config, config_path, scored_in(records), initial_weights_cell(attempts or []))
    scored = [(int(r["epoch"]), top1) for r in records if (top1 := _finite(r.get("val_top1"))) is not None]
    best_epoch, best_top1 = max(scored, key=lambda pair: (pair[1], -pair[0])) if scored else (None, None)
    gpu = [m for r in records if (m := _finite(r.get("peak_gpu_mem_mb"))) is not None]
    cpu = [m for r in records if (m := _finite(r.get("peak_cpu_mem_mb"))) is not None]
    return Run(
        path=run_dir,
        seed=int(_require(config, "seed", config_path)),
        experiment_name=str(config.get("experiment_name", "")),
        key=key,
        epochs_done=int(records[-1]["epoch"]) if records else 0,
        best_top1=best_top1,
        best_epoch=best_epoch,
        last_top1=_finite(records[-1].get("val_top1")) if records else None,
        epoch_times_s=_steady_epoch_times(records),
        peak_gpu_mem_mb=max(gpu) if gpu else None,
        peak_cpu_mem_mb=max(cpu) if cpu else None,
        setups=setups_of(attempts),
    )


NOT_RECORDED = "not recorded"  # a run from before environment.jsonl, or one whose file is gone


def read_environment(run_dir: Path) -> list[dict[str, Any]] | None:
    """The attempts' records of a run's environment.jsonl (None without the file). A line that is not
    a JSON object (a write cut short by a kill) is passed over."""
    try:
        lines = (run_dir / "environment.jsonl").read_bytes().decode(errors="replace").splitlines()
    except OSError:
        return None
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_setups(run_dir: Path) -> tuple[str, ...]:
    """:func:`setups_of` the run folder's environment.jsonl."""
    return setups_of(read_environment(run_dir))


def setups_of(records: list[dict[str, Any]] | None) -> tuple[str, ...]:
    """The distinct setups of a run's attempts (:func:`setup_label`), in the order they first
    trained; NOT_RECORDED for attempts before the first recorded one (a run begun before
    environment.jsonl existed: its first line starts past step 0) and for a run without the file."""
    if not records:
        return (NOT_RECORDED,)
    earlier = [NOT_RECORDED] if _field(records[0], "from_step", int, 0) > 0 else []
    return tuple(dict.fromkeys([*earlier, *map(setup_label, records)]))


def setup_label(record: Mapping[str, Any]) -> str:
    """'code 1a2b3c4d5e (+ uncommitted changes 9f8e7d6c) · torch 2.14.1 · cuda: NVIDIA H200 x4': the
    code (its git commit, else zipfls-train's version), torch and the device (x processes). A field
    of another type than the trainer writes reads as unknown ('?')."""
    code = _field(record, "code", dict, {})
    commit = _field(code, "git_commit", str, None)
    if commit:
        text = f"code {commit[:10]}"
        if code.get("dirty") is True:
            digest = _field(code, "diff_sha256", str, None)
            text += f" (+ uncommitted changes {digest[:8]})" if digest else " (+ uncommitted changes)"
        elif code.get("dirty") is None:
            text += " (uncommitted changes unknown)"
    else:
        text = f"zipfls-train {_field(code, 'version', str, '?')} (no git commit)"
    torch_version = _field(_field(record, "packages", dict, {}), "torch", str, "?")
    processes = _field(record, "processes", int, 1)
    device = _field(record, "device", str, "?") + (f" x{processes}" if processes > 1 else "")
    return f"{text} · torch {torch_version} · {device}"


def _field(record: Mapping[str, Any], name: str, kind: type, default: Any) -> Any:
    value = record.get(name)
    return value if isinstance(value, kind) and not isinstance(value, bool) else default


def _steady_epoch_times(records: Sequence[Mapping[str, Any]]) -> tuple[float, ...]:
    """The timed epochs' ``epoch_time_s``, less those holding a process's first step (``first_step_s``:
    loader start-up, compilation, tuning; epoch 1 and a resumed run's first epoch) when there are others."""
    timed = [(t, "first_step_s" in r) for r in records if (t := _finite(r.get("epoch_time_s"))) is not None]
    steady = tuple(t for t, warm_up in timed if not warm_up)
    return steady or tuple(t for t, _ in timed)


def load_runs(folders: Iterable[str | Path]) -> list[Run]:
    """Every run under the given folders (searched recursively), each folder read once.

    Raises :class:`RunFolderError` naming the folder when it does not exist or holds no run.
    """
    runs: dict[Path, Run] = {}
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise RunFolderError(f"{folder}: no such folder")
        run_dirs = find_run_dirs(folder)
        if not run_dirs:
            raise RunFolderError(
                f"{folder}: no runs found (looked recursively for a folder holding config.yaml next to "
                "metrics.jsonl, as the trainer writes them: outputs/<experiment>/<run>/ or "
                "outputs/multirun/<experiment>/<overrides>/)"
            )
        for run_dir in run_dirs:
            if run_dir not in runs:
                runs[run_dir] = read_run(run_dir)
    return list(runs.values())


# ---------------------------------------------------------------- grouping and statistics


def _sort_key(key: CellKey) -> str:
    return repr((key.dataset, key.model, key.method, key.options, key.recipe))


def group_cells(runs: Iterable[Run]) -> dict[CellKey, list[Run]]:
    """Runs by cell (every config difference but the seed), in a deterministic order."""
    cells: dict[CellKey, list[Run]] = {}
    for run in sorted(runs, key=lambda r: (_sort_key(r.key), r.seed, str(r.path))):
        cells.setdefault(run.key, []).append(run)
    return dict(sorted(cells.items(), key=lambda item: _sort_key(item[0])))


def _one_per_seed(runs: Sequence[Run]) -> tuple[list[Run], list[Run]]:
    """Keep, per seed, the run with the most completed epochs (then the first path); the rest are duplicates."""
    chosen: dict[int, Run] = {}
    duplicates: list[Run] = []
    for run in sorted(runs, key=lambda r: (r.seed, -r.epochs_done, str(r.path))):
        if run.seed in chosen:
            duplicates.append(run)
        else:
            chosen[run.seed] = run
    return list(chosen.values()), duplicates


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; None for fewer than two values)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarise(runs: Sequence[Run]) -> CellSummary:
    """Mean ± std of best-epoch top-1 and mean last-epoch top-1 over the seeds of one cell."""
    if not runs:
        raise ValueError("summarise() needs at least one run")
    keys = {run.key for run in runs}
    if len(keys) != 1:
        raise ValueError(f"runs of different cells given to summarise(): {sorted(map(_sort_key, keys))}")
    per_seed, duplicates = _one_per_seed(runs)
    complete = [run for run in per_seed if run.complete]
    incomplete = [run for run in per_seed if not run.complete]
    from_incomplete = not complete
    counted = complete or [run for run in incomplete if run.best_top1 is not None]
    best_mean, best_std = mean_std([run.best_top1 for run in counted if run.best_top1 is not None])
    last_mean, _ = mean_std([run.last_top1 for run in counted if run.last_top1 is not None])
    return CellSummary(
        key=runs[0].key,
        counted=tuple(counted),
        incomplete=tuple(incomplete),
        duplicates=tuple(duplicates),
        best_mean=best_mean,
        best_std=best_std,
        last_mean=last_mean,
        from_incomplete=from_incomplete,
        seeds=tuple(run.seed for run in counted),
    )


def summarise_all(runs: Iterable[Run]) -> list[CellSummary]:
    """One summary per table cell of ``runs``."""
    return [summarise(cell_runs) for cell_runs in group_cells(runs).values()]
