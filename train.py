"""Train one run (or a sweep with -m). All logic lives in zipfls_train; this file only hands the
composed config to it.

    python train.py dataset=tinyimagenet model=cifar_resnet18 loss=zipf dataset.root=../shared/data
    python train.py -m loss=ce,ls,zipf seed=0,1,2,3,4 dataset.root=../shared/data
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig

from zipfls_train.engine.hydra_callbacks import CREATED_FOLDERS, FailedRuns
from zipfls_train.engine.naming import register_resolvers

register_resolvers()  # before Hydra composes: the sweep subdir uses ${safe_dirname:...}


def _compose(overrides: list[str]) -> DictConfig:
    """The config of this command line with other overrides (hydra's compose, inside the app)."""
    from hydra.core.global_hydra import GlobalHydra

    name = HydraConfig.get().job.config_name
    if GlobalHydra.instance().is_initialized():
        return hydra.compose(config_name=name, overrides=overrides)
    # A launcher that runs the job in a process of its own, without Hydra's global state.
    with hydra.initialize_config_dir(config_dir=str(Path(__file__).resolve().parent / "configs"), version_base="1.3"):
        return hydra.compose(config_name=name, overrides=overrides)


class SweepRunFailed(CompactHydraException):
    """A run of a sweep, in a process of its own (e.g. submitit's), stopped on a user error (its
    message was printed as it happened). Hydra records it, runs the sweep's other runs, then prints
    the first failed run's exception and exits with status 1; a SystemExit instead would end the
    whole sweep at the first failed run. (Runs of the basic and parallel launchers are reported by
    FailedRuns.)"""


# Said under torchrun by a node's first rank to lose another rank, on a node where no rank said an error.
LOST_A_PEER = ("[zipfls-train] stopped: another rank's process ended (the output of its node, and torchrun's "
               "failure report there, say why)")


def _launcher_is(*names: str) -> bool:
    """The sweep's launcher is one of these classes."""
    return str(HydraConfig.get().launcher.get("_target_", "")).endswith(tuple(f".{name}" for name in names))


def _launcher_lists_failed_runs() -> bool:
    """The sweep's launcher gathers failed runs in FailedRuns: Hydra's basic launcher, which runs them
    one after another in this process, and hydra/launcher=parallel, whose run processes send theirs
    to it."""
    return _launcher_is("BasicLauncher", "ParallelLauncher")


def _remove_if_empty(folder: Path) -> None:
    """Hydra creates the run folder before the app runs: a run refused before writing anything must
    not leave an empty folder behind, nor the empty parents this process created for it
    (outputs/<experiment>/); a folder with anything in it is never touched."""
    for candidate in [folder, *(path for path in CREATED_FOLDERS if path != folder)]:  # deepest first
        try:
            if candidate.is_dir() and not any(candidate.iterdir()):
                candidate.rmdir()
        except OSError:
            pass


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        return _train(cfg, run_dir)
    except KeyboardInterrupt as interrupt:  # Ctrl-C while the run sets up (training itself stops at a step), or twice
        _remove_if_empty(run_dir)
        _stopped_at_once(interrupt, "nothing since the last checkpoint is saved" if run_dir.exists() else "nothing was written")


def _stopped_at_once(interrupt: KeyboardInterrupt, said: str) -> None:
    """Ctrl-C (or the parallel launcher's SIGTERM, TerminateRequested) outside a training step: one line, exit 130."""
    print(f"[zipfls-train] stopped at once ({getattr(interrupt, 'signal_name', 'SIGINT')}): {said}", file=sys.stderr)
    sys.exit(130)


def _train(cfg: DictConfig, run_dir: Path) -> float | None:
    from zipfls_train.engine.config_checks import check_added_keys
    from zipfls_train.engine.distributed import launched_by_torchrun, lost_a_peer
    from zipfls_train.engine.torchrun_reports import first_on_its_node_to_lose_a_peer, first_on_its_node_to_say, tell_torchrun
    from zipfls_train.engine.interrupt import TrainingInterrupted
    from zipfls_train.engine.run import run_training
    from zipfls_train.errors import user_errors

    import warnings

    from zipfls_train.errors import format_warning

    warnings.formatwarning = format_warning  # this package's warnings as "warning: ..." lines
    try:
        check_added_keys(list(HydraConfig.get().overrides.task), _compose)
        summary = run_training(cfg, run_dir)
    except user_errors() as error:
        _remove_if_empty(run_dir)
        in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
        if in_sweep and not isinstance(error, TrainingInterrupted) and _launcher_lists_failed_runs():
            # The sweep goes on with its other runs; this one is named again at the end, exit status 1.
            print(f"error: {FailedRuns.add(run_dir, str(error))}", file=sys.stderr)
            return None
        if first_on_its_node_to_say(str(error)):  # (under torchrun a node's ranks often raise the same error: one line)
            print(f"error: {error}", file=sys.stderr)
            tell_torchrun(error)
        if in_sweep and not isinstance(error, TrainingInterrupted):
            raise SweepRunFailed(f"{run_dir}: {error}") from None  # a run in a process of its own: Hydra reports it
        if in_sweep and not _launcher_is("ParallelLauncher"):  # (whose own process says what the sweep does)
            # Ctrl-C or SIGTERM (a preempted job) stops the sweep, not only its current run: SystemExit
            # passes through Hydra's launcher, which would otherwise start the next run.
            print("[zipfls-train] the sweep stops here, before its later runs; rerun the same command to go on "
                  "(finished runs are skipped, this one resumes)", file=sys.stderr)  # fmt: skip
            FailedRuns.list_earlier()  # (the sweep's closing report of them is skipped by this exit)
        sys.exit(1)
    except RuntimeError as error:
        if launched_by_torchrun() and lost_a_peer(error):  # another rank stopped first: its process says why
            if first_on_its_node_to_lose_a_peer():
                print(LOST_A_PEER, file=sys.stderr)
            sys.exit(1)
        raise
    # Returned for Hydra sweepers that optimise a metric.
    return None if summary is None else summary.get("best_val_top1")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as interrupt:  # Ctrl-C before a run started (Hydra composing a sweep's configs)
        _stopped_at_once(interrupt, "nothing was written")
