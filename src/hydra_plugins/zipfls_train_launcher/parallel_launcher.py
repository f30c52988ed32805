"""``hydra/launcher=parallel``: a sweep's runs at once on this machine, spread over its GPUs (and
CPU cores), each in a process of its own (zipfls_train.engine.parallel_run_process) with its
console output in ``<sweep dir>/logs/``. Where the runs go and when: zipfls_train.engine.parallel_runs;
this module is the Hydra side (it lives in Hydra's plugin package, where Hydra looks for launchers).

Every run that did not train to its end is named again when the sweep ends (FailedRuns, exit
status 1), as the basic launcher does for runs that fail on a user error."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from zipfls_train.engine.config_checks import ConfigError
from zipfls_train.engine.hydra_callbacks import FailedRuns
from zipfls_train.engine.parallel_run_process import hydra_singletons, run_one
from zipfls_train.engine.parallel_runs import Job, Places, run_jobs, sweep_cores, visible_gpus
from zipfls_train.engine.resume import finished_as_recorded


class Run:
    """What the launcher knows of one run (a Job's payload). (Not a dataclass: Hydra imports its
    plugins' modules without registering them in sys.modules, where dataclasses look; and so the
    run's process code lives in zipfls_train, where pickle finds it as itself.)"""

    def __init__(self, overrides: list[str], config: DictConfig, folder: Path, log: Path) -> None:
        self.overrides = overrides
        self.config = config  # the job's whole config, Hydra's part included
        self.folder, self.log = folder, log
        self.name = ""  # the overrides that set it apart from the sweep's other runs
        self.finished: dict[str, Any] | None = None  # its summary, where it finished before (a rerun)


class ParallelLauncher(Launcher):
    def __init__(self, gpus: Any = "auto", runs_per_gpu: Any = 1, cpu_runs: Any = 1) -> None:
        super().__init__()
        self.gpus, self.runs_per_gpu, self.cpu_runs = gpus, runs_per_gpu, cpu_runs  # (checked in launch: one error line)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        try:
            jobs, places = self._plan(job_overrides, initial_job_idx)
        except ConfigError as error:  # one line, as a run's user error (Hydra would print a traceback)
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            _say("SIGINT: stopped before any run started")
            sys.exit(130)
        to_run = [job for job in jobs if job.payload.finished is None]
        if not to_run:
            _say(f"all {len(jobs)} run(s) finished before: nothing to run")
            return [_job_return(job) for job in jobs]
        where = f"{len(places.gpus)} GPU(s), {self.runs_per_gpu} run(s) per GPU" if places.gpus else f"the CPU, {self.cpu_runs} run(s) at once"
        earlier = f" ({len(jobs) - len(to_run)} of {len(jobs)} finished before: skipped)" if len(to_run) < len(jobs) else ""
        _say(f"{len(to_run)} run(s) on {where}{earlier}; each run's console output goes to {self._log_folder()}/")
        try:
            stopped_by = run_jobs(to_run, places, self._start, on_start=lambda job: self._started(job, len(jobs)),
                                  on_end=lambda job: self._ended(job, len(jobs)), ended_well=_ended_well)  # fmt: skip
        except KeyboardInterrupt:  # Ctrl-C a second time: the runs stopped at once, as a single run does
            _say("SIGINT again: the runs stopped at once, without saving; a rerun of the same command resumes each from its "
                 "last checkpoint, if it had one")  # fmt: skip
            FailedRuns.list_earlier()
            sys.exit(130)
        if stopped_by is not None:
            self._stop_the_sweep(stopped_by, to_run)
        for job in to_run:  # stopped alone (a SIGTERM to its process), or never started
            if (job.outcome or {}).get("status") == "stopped" or not job.ended:
                FailedRuns.add(job.payload.folder, _what_is_left(job))
        if not _callback_lists_failed_runs(self.config):  # (another Hydra app: FailedRuns' closing list, here)
            FailedRuns().on_multirun_end(self.config)
        return [_job_return(job) for job in jobs]

    # --- the jobs -------------------------------------------------------------------------------

    def _plan(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> tuple[list[Job], Places]:
        """The sweep's jobs and the places they share; a ConfigError where they cannot run."""
        for key in ("runs_per_gpu", "cpu_runs"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"hydra.launcher.{key} must be an integer >= 1, got {value!r}")
        gpus = visible_gpus(OmegaConf.to_object(self.gpus) if OmegaConf.is_config(self.gpus) else self.gpus)
        jobs = [self._job(index, list(overrides), gpus) for index, overrides in enumerate(job_overrides, initial_job_idx)]
        places = Places(gpus, self.runs_per_gpu, sweep_cores()) if any(job.gpus for job in jobs) else Places([], self.cpu_runs, sweep_cores())
        self._check_places(jobs, places)
        _after_their_teachers(jobs)
        shared = set.intersection(*(set(job.payload.overrides) for job in jobs))
        for job in jobs:  # (the overrides that set it apart; a sweep of one run has none)
            job.payload.name = " ".join(item for item in filter_overrides(job.payload.overrides) if item not in shared) or "the sweep's run"
            job.payload.finished = _finished_before(job.payload)
        return jobs, places

    def _job(self, index: int, overrides: list[str], gpus: list[str]) -> Job:
        assert self.config is not None and self.hydra_context is not None
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config):
            config.hydra.job.id = index
            config.hydra.job.num = index
        device = str(OmegaConf.select(config, "trainer.device", default="auto"))  # (any Hydra app can use this launcher)
        if device == "cuda" and not gpus:
            raise ConfigError(f"{' '.join(overrides)}: trainer.device=cuda, but hydra.launcher.gpus={self.gpus!r} gives no GPU "
                              "(CUDA_VISIBLE_DEVICES or the GPUs torch sees)")  # fmt: skip
        devices = OmegaConf.select(config, "trainer.devices", default=1)
        gpus_needed = (devices if isinstance(devices, int) and devices >= 1 else 1) if device == "cuda" or (device == "auto" and gpus) else 0
        subdir = str(_resolved(config, "hydra.sweep.subdir"))
        run = Run(overrides, config, Path(str(config.hydra.sweep.dir)) / subdir, self._log_folder() / f"{subdir}.log")
        return Job(index, gpus_needed, payload=run)  # (a trainer.devices that is no count: the run refuses it)

    def _check_places(self, jobs: list[Job], places: Places) -> None:
        if places.gpus and any(job.gpus == 0 for job in jobs):
            raise ConfigError("hydra/launcher=parallel: this sweep has runs on the GPU and runs on the CPU (trainer.device); "
                              "run them as two sweeps")  # fmt: skip
        for job in jobs:
            if job.gpus > len(places.gpus) and places.gpus:
                raise ConfigError(f"{' '.join(job.payload.overrides)}: trainer.devices={job.gpus} needs {job.gpus} GPUs per "
                                  f"run; hydra.launcher.gpus gives {len(places.gpus)} ({','.join(places.gpus)})")  # fmt: skip

    def _log_folder(self) -> Path:
        assert self.config is not None
        return Path(str(self.config.hydra.sweep.dir)) / "logs"

    def _start(self, job: Job) -> tuple[multiprocessing.process.BaseProcess, Any]:
        assert self.task_function is not None
        context = multiprocessing.get_context("spawn")
        receive, send = context.Pipe(duplex=False)
        task = (self.task_function.__module__, self.task_function.__qualname__)
        cores = sorted({core for place in job.places for core in place.cores})
        process = context.Process(target=run_one, name=f"zipfls-train run {job.index}",
                                  args=(send, str(job.payload.log), cores, task, self.hydra_context, job.payload.config,
                                        hydra_singletons()))  # fmt: skip
        job.payload.log.parent.mkdir(parents=True, exist_ok=True)
        process.start()
        send.close()
        return process, receive

    # --- what the console shows -----------------------------------------------------------------

    def _started(self, job: Job, count: int) -> None:
        gpus = ",".join(place.gpu for place in job.places if place.gpu is not None)
        _say(f"started {job.index + 1}/{count} on {f'GPU {gpus}' if gpus else 'the CPU'}: {job.payload.name}")

    def _ended(self, job: Job, count: int) -> None:
        outcome, run = job.outcome or {}, f"{job.index + 1}/{count} {job.payload.name}"
        if job.blocked_by is not None:
            teacher = job.blocked_by.payload.folder
            self._failed(job, f"not started: it distils from run {job.blocked_by.index + 1}/{count} ({teacher}), which did not finish")
        elif outcome.get("status") == "completed" and outcome.get("user_error") is not None:  # (its log has it too)
            self._failed(job, outcome["user_error"])
        elif outcome.get("status") == "completed":
            best = outcome.get("value")  # (train.py returns the run's best val top-1)
            _say(f"finished {run}" + (f": best val top-1 {best:.2f}%" if isinstance(best, float) else ""))
        elif outcome.get("status") == "failed":
            self._failed(job, f"{outcome['error']} (traceback in {job.payload.log})")
        elif outcome.get("status") == "stopped":
            _say(f"stopped {run}: {_what_is_left(job)}")
        else:
            self._failed(job, f"{_how_it_ended(job)}; its log: {job.payload.log}")

    @staticmethod
    def _failed(job: Job, message: str) -> None:
        print(f"error: {job.payload.folder}: {FailedRuns.add(job.payload.folder, message)}", file=sys.stderr)

    def _stop_the_sweep(self, signal_name: str, jobs: list[Job]) -> None:
        not_started = sum(not job.ended for job in jobs)
        left = f" ({not_started} run(s) not started)" if not_started else ""
        _say(f"{signal_name}: the sweep stops here{left}; rerun the same command to go on (finished runs are skipped, stopped ones resume)")
        FailedRuns.list_earlier()
        sys.exit(1)


def _callback_lists_failed_runs(config: DictConfig) -> bool:
    """zipfls-train's FailedRuns is among the app's Hydra callbacks (configs/hydra/default.yaml)."""
    callbacks = OmegaConf.select(config, "hydra.callbacks", default=None) or {}
    return any(str(callback.get("_target_", "")).endswith(".FailedRuns") for callback in callbacks.values())


def _ended_well(job: Job) -> bool:
    """The run trained to its end (not stopped, failed or killed)."""
    outcome = job.outcome or {}
    return outcome.get("status") == "completed" and outcome.get("user_error") is None


def _job_return(job: Job) -> JobReturn:
    """What Hydra's sweeper takes from the job: its return value (train.py's best val top-1) where it
    ran to its end; a run that did not is named by FailedRuns at the sweep's end instead (an
    exception here would have Hydra end the sweep with the first one alone, FailedRuns' list unsaid)."""
    run = job.payload
    result = JobReturn(overrides=run.overrides, hydra_cfg=run.config, working_dir=os.getcwd(), task_name=run.config.hydra.job.name)
    result.status = JobStatus.COMPLETED
    if run.finished is not None:
        result.return_value = run.finished.get("best_val_top1")
    elif _ended_well(job):
        result.return_value = job.outcome.get("value")
    return result


def _what_is_left(job: Job) -> str:
    """What a run that stopped before its end left to resume from."""
    checkpoint = job.payload.folder / "checkpoints" / "last.pt"
    if not job.ended:
        return "not started"
    if checkpoint.is_file():
        return f"stopped; a rerun resumes it from {checkpoint}"
    return "stopped before its first checkpoint; a rerun starts it over"


def _how_it_ended(job: Job) -> str:
    code = job.exitcode
    if code is not None and code < 0:
        return f"its process was killed by {signal.Signals(-code).name}"
    return f"its process ended with exit status {code} without saying how"


def _say(line: str) -> None:
    print(f"[zipfls-train] {line}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _as_the_job(config: DictConfig) -> Iterator[None]:
    """Hydra's job values (override_dirname, ...) of ``config``'s job, as its run will resolve them."""
    hydra_config = HydraConfig.instance()
    before = hydra_config.cfg
    hydra_config.set_config(config)
    try:
        yield
    finally:
        hydra_config.cfg = before


def _resolved(config: DictConfig, key: str) -> Any:
    """``key`` of a job's config resolved as in its run; None where the config has no such key."""
    with _as_the_job(config):
        return OmegaConf.select(config, key, default=None)


def _finished_before(run: Run) -> dict[str, Any] | None:
    """The run's summary where it finished before and this sweep reruns it unchanged (no process to
    start: the run would only say so), as a single run tells (engine/resume.py)."""
    if "trainer" not in run.config:
        return None
    with _as_the_job(run.config):
        task_config = OmegaConf.masked_copy(run.config, [key for key in run.config if key != "hydra"])
        try:
            return finished_as_recorded(task_config, run.folder)
        except Exception:  # noqa: BLE001  (the run itself then decides, and says why)
            return None


def _after_their_teachers(jobs: list[Job]) -> None:
    """A run that distils from a checkpoint inside another run's folder of this sweep (BAN's
    generation k from k-1, ``loss.teacher_checkpoint``) starts once that run has ended well: at once,
    it would find no checkpoint, or the teacher's best epoch so far."""
    folders = {job.payload.folder.resolve(): job.index for job in jobs}
    for job in jobs:
        teacher = _resolved(job.payload.config, "loss.teacher_checkpoint")
        if teacher:
            parents = Path(str(teacher)).resolve().parents
            job.after = tuple(index for folder, index in folders.items() if folder in parents and index != job.index)
