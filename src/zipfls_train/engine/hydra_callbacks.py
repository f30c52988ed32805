"""Hydra callbacks (``configs/hydra/default.yaml`` lists them)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, ClassVar

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError


class CheckOutputFolder(Callback):
    """Creates the run (or sweep) folder before Hydra does, so that a folder that cannot be created
    (a read-only place, a path through a file, a typo'd mount) is one line naming the key and the
    reason instead of Hydra's mkdir traceback. Creating it first changes nothing: Hydra would create
    the same folder a moment later, and train.py removes a run folder a refused run left empty.

    Sweeps that would quietly train fewer runs than they name are refused first (check_sweep_keys).

    The error exits (SystemExit) rather than raising: Hydra turns a callback's exception into a
    warning and goes on to its own mkdir."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        make_output_folder(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_sweep_keys(config)
        make_output_folder(config, "hydra.sweep.dir")


# Left out of run-folder names but sweepable all the same: each experiment's runs go to their own
# outputs/multirun/<experiment_name>/ (so a sweep dir not named by ${experiment_name}, or one
# experiment_name for all, is refused: refuse_swept_sweeps). Hydra refuses hydra.sweep.dir=a,b.
SWEEPABLE_UNNAMED_KEYS = ("experiment", "hydra.sweep.dir")


def check_sweep_keys(config: DictConfig) -> None:
    """Refuses (``error: ...``, exit 1) a sweep over a key in override_dirname's exclude_keys: its
    jobs would get one run folder, and all but the first would find that run finished and train
    nothing. Swept keys are those of the command line and of hydra.sweeper.params, merged as Hydra's
    basic sweeper does (a command-line key replaces the same key of the params)."""
    parse = OverridesParser.create().parse_overrides
    params = config.hydra.sweeper.get("params") or {}
    swept: dict[str, tuple[Override, str]] = {}  # key -> (override, where it was given)
    for override in parse([f"{key}={value}" for key, value in params.items()]):
        swept[override.get_key_element()] = (override, " (hydra.sweeper.params)")
    for override in parse(list(config.hydra.overrides.task)):
        swept[override.get_key_element()] = (override, "")
    unnamed = set(config.hydra.job.config.override_dirname.exclude_keys) - set(SWEEPABLE_UNNAMED_KEYS)
    for override, source in swept.values():
        if not override.is_sweep_override():
            continue
        if override.key_or_group in unnamed:
            print(f"error: the sweep {override.input_line}{source} would train only its first value: "
                  f"{override.key_or_group} is left out of run-folder names (hydra.job.config.override_dirname."
                  f"exclude_keys), so its jobs would share one folder. Run one sweep per value, each with its "
                  f"own tag=... or experiment_name=...", file=sys.stderr)  # fmt: skip
            raise SystemExit(1)
        if override.key_or_group == "experiment":
            refuse_swept_sweeps(override, config)
            refuse_experiments_sharing_a_folder(override, config, set(swept))


def refuse_experiments_sharing_a_folder(override: Override, config: DictConfig, given: set[str]) -> None:
    """``experiment=a,b`` keeps each experiment's runs apart only by its sweep folder,
    outputs/multirun/${experiment_name}: the runs' subfolders are named after the other overrides,
    the same for every experiment. A sweep dir without ${experiment_name}, or one experiment_name
    given for all, would put runs of different experiments in one folder (the first trains, the others
    find it finished or another config). Refused (exit 1)."""
    sweep_dir = str(OmegaConf.to_container(config.hydra.sweep, resolve=False).get("dir", ""))
    if "${experiment_name}" in sweep_dir and "experiment_name" not in given:
        return
    why = "experiment_name is given once for all" if "experiment_name" in given else f"hydra.sweep.dir={sweep_dir} does not contain ${{experiment_name}}"
    print(f"error: the sweep {override.input_line} would put every experiment's runs in one sweep folder ({why}), "
          "where runs with the same other overrides share a run folder. Run one sweep per experiment, or keep "
          "${experiment_name} in hydra.sweep.dir", file=sys.stderr)  # fmt: skip
    raise SystemExit(1)


def refuse_swept_sweeps(override: Override, config: DictConfig) -> None:
    """``experiment=a,b`` where an experiment is itself a sweep (its hydra.sweeper.params: a paper
    table's methods and seeds): Hydra reads a sweep's params before it sweeps the experiment, so each
    such experiment would train one run with the defaults, without a word. Refused (exit 1)."""
    folders = [Path(source.path) / "experiment" for source in config.hydra.runtime.config_sources if source.schema == "file"]
    names = sorted({path.stem for folder in folders if folder.is_dir() for path in folder.glob("*.yaml")})
    value = override.value()
    chosen = value.filter(names) if hasattr(value, "filter") else list(override.sweep_string_iterator())  # glob(...) or a list
    sweeps = [name for name in chosen for folder in folders
              if (folder / f"{name}.yaml").is_file() and OmegaConf.select(OmegaConf.load(folder / f"{name}.yaml"), "hydra.sweeper.params")]  # fmt: skip
    if sweeps:
        print(f"error: the sweep {override.input_line} includes experiments that are sweeps themselves ({', '.join(sweeps)}): "
              "Hydra does not sweep a swept experiment's own hydra.sweeper.params, so each would train a single run "
              f"with the defaults. Run each as its own sweep: python train.py -m experiment={sweeps[0]} ...",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(1)


# Folders make_output_folder created in this process, deepest first: a run refused before it wrote
# anything removes those it left empty (train.py), not only its own (outputs/<experiment>/ too).
CREATED_FOLDERS: list[Path] = []


def make_output_folder(config: DictConfig, key: str) -> Path:
    """Creates the folder ``key`` names; if it cannot be, prints why (``error: ...``) and exits 1."""
    # The folder's interpolations read hydra:runtime.* (the chosen loss config): Hydra's own run_job
    # sets the same config the same way before it resolves the folder.
    HydraConfig.instance().set_config(config)
    try:
        folder = Path(str(OmegaConf.select(config, key)))
    except InterpolationToMissingValueError as error:  # e.g. ${model.name} of model=timm, left to the command line
        missing = re.search(r"Missing mandatory value: ([\w.]+)", str(error))
        what = missing.group(1) if missing else "a value of the config"
        print(f"error: {what} must be given (its config file leaves it to you: ???); the run folder {key} is named "
              f"after it", file=sys.stderr)  # fmt: skip
        raise SystemExit(1) from None
    try:
        missing = [path for path in [folder, *folder.parents] if not path.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        CREATED_FOLDERS.extend(missing)
    except OSError as error:
        where = f" ({error.filename})" if error.filename and str(error.filename) != str(folder) else ""
        print(f"error: {key}={str(folder)!r} cannot be created: {error.strerror or error}{where}. Give a writable "
              f"folder with {key}=...", file=sys.stderr)  # fmt: skip
        raise SystemExit(1) from None
    return folder


SAME_AS_BEFORE = "the same error as the previous failed run"


class FailedRuns(Callback):
    """Runs of a sweep that stopped on a user error, named again when the sweep ends (each printed its
    ``error: ...`` line as it happened), and the sweep's exit status 1.

    For sweeps whose runs share this process (Hydra's basic launcher): train.py records a failed run
    here and returns, so the sweep goes on and Hydra prints none of its own lines (a raised
    exception would add "Error executing job with overrides: <the first failed run's>" and a
    pointer to HYDRA_FULL_ERROR for a stack trace that says nothing more). Runs in other processes
    (submitit) raise instead, which Hydra reports."""

    runs: ClassVar[list[str]] = []  # "<run folder>: <message>", in order
    last_message: ClassVar[str | None] = None

    @classmethod
    def add(cls, run_dir: object, message: str) -> str:
        """Records a failed run; returns its message, or, where the run before failed with the same
        one (a table's 40 runs without their data), a short line that says so."""
        said = SAME_AS_BEFORE if message == cls.last_message else message
        cls.runs.append(f"{run_dir}: {said}")
        cls.last_message = message
        return said

    @classmethod
    def listing(cls, heading: str) -> str:
        """``heading``, then one line per failed run."""
        return "\n".join([heading, *cls.runs])

    @classmethod
    def list_earlier(cls) -> None:
        """For a sweep that stops early, which skips the closing list: the runs that failed so far."""
        if cls.runs:
            print(cls.listing(f"[zipfls-train] earlier in this sweep {len(cls.runs)} run(s) failed:"), file=sys.stderr)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.runs:
            print(self.listing(f"[zipfls-train] {len(self.runs)} run(s) of the sweep failed:"), file=sys.stderr)
            raise SystemExit(1)  # not an exception: Hydra would turn that into a warning
