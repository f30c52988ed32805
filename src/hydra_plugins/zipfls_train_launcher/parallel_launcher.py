"""``hydra/launcher=parallel``: a sweep's runs at once on this machine, spread over its GPUs (and
CPU cores), each in a process of its own with its console output in ``<sweep dir>/logs/``.
Where the runs go and when: zipfls_train.engine.parallel_runs; this module is the Hydra side (it
lives in Hydra's plugin package, where Hydra looks for launchers)."""

from __future__ import annotations

import importlib
import inspect
import multiprocessing
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.errors import CompactHydraException
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from zipfls_train.engine.config_checks import ConfigError
from zipfls_train.engine.hydra_callbacks import FailedRuns
from zipfls_train.engine.parallel_runs import Job, Places, run_jobs, sweep_cores, visible_gpus
from zipfls_train.stop_signals import release_stop_signals


class RunCrashed(CompactHydraException):
    """A run's process failed on something other than a user error (a bug: its traceback is in its
    log), or ended without saying how (killed)."""


class ParallelLauncher(Launcher):
    def __init__(self, gpus: Any = "auto", runs_per_gpu: int = 1, cpu_runs: int = 1) -> None:
        super().__init__()
        for key, value in (("runs_per_gpu", runs_per_gpu), ("cpu_runs", cpu_runs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"hydra.launcher.{key} must be an integer >= 1, got {value!r}")
        self.gpus, self.runs_per_gpu, self.cpu_runs = gpus, runs_per_gpu, cpu_runs
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        try:
            jobs, places = self._plan(job_overrides, initial_job_idx)
        except ConfigError as error:  # one line, as a run's user error (Hydra would print a traceback)
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)
        where = f"{len(places.gpus)} GPU(s), {self.runs_per_gpu} run(s) per GPU" if places.gpus else f"the CPU, {self.cpu_runs} run(s) at once"
        _say(f"{len(jobs)} run(s) on {where}; each run's console output goes to {self._log_folder()}/")
        stopped_by = run_jobs(jobs, places, self._start, on_start=lambda job: self._started(job, len(jobs)),
                              on_end=lambda job: self._ended(job, len(jobs)), ended_well=_ended_well)  # fmt: skip
        if stopped_by is not None:
            self._stop_the_sweep(stopped_by, jobs)
        return [self._job_return(job) for job in jobs]

    # --- the jobs -------------------------------------------------------------------------------

    def _plan(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> tuple[list[Job], Places]:
        """The sweep's jobs and the places they share; a ConfigError where they cannot run."""
        gpus = visible_gpus(OmegaConf.to_object(self.gpus) if OmegaConf.is_config(self.gpus) else self.gpus)
        jobs = [self._job(index, list(overrides), gpus) for index, overrides in enumerate(job_overrides, initial_job_idx)]
        places = Places(gpus, self.runs_per_gpu, sweep_cores()) if any(job.gpus for job in jobs) else Places([], self.cpu_runs, sweep_cores())
        self._check_places(jobs, places)
        _after_their_teachers(jobs)
        shared = set.intersection(*(set(job.payload["overrides"]) for job in jobs)) if len(jobs) > 1 else set()
        for job in jobs:  # the console names a run by what sets it apart
            job.payload["name"] = " ".join(item for item in filter_overrides(job.payload["overrides"]) if item not in shared) or "(no overrides)"
        return jobs, places

    def _job(self, index: int, overrides: list[str], gpus: list[str]) -> Job:
        assert self.config is not None and self.hydra_context is not None
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config):
            config.hydra.job.id = index
            config.hydra.job.num = index
        device = str(OmegaConf.select(config, "trainer.device", default="auto"))  # (any Hydra app can use this launcher)
        on_gpus = device == "cuda" or (device == "auto" and bool(gpus))
        if device == "cuda" and not gpus:
            raise ConfigError(f"{' '.join(overrides)}: trainer.device=cuda, but hydra.launcher.gpus={self.gpus!r} gives no GPU "
                              "(CUDA_VISIBLE_DEVICES or the GPUs torch sees)")  # fmt: skip
        run_dir, log = _run_folder(config), self._log_folder() / f"{_subdir(config)}.log"
        return Job(index, int(OmegaConf.select(config, "trainer.devices", default=1)) if on_gpus else 0, payload={"overrides": overrides, "config": config,
                   "run_dir": run_dir, "log": log})  # fmt: skip

    def _check_places(self, jobs: list[Job], places: Places) -> None:
        if places.gpus and any(job.gpus == 0 for job in jobs):
            raise ConfigError("hydra/launcher=parallel: this sweep has runs on the GPU and runs on the CPU (trainer.device); "
                              "run them as two sweeps")  # fmt: skip
        for job in jobs:
            if job.gpus > len(places.gpus) and places.gpus:
                raise ConfigError(f"{' '.join(job.payload['overrides'])}: trainer.devices={job.gpus} needs {job.gpus} GPUs per "
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
                                  args=(send, str(job.payload["log"]), cores, task, self.hydra_context, job.payload["config"],
                                        _hydra_singletons()))  # fmt: skip
        job.payload["log"].parent.mkdir(parents=True, exist_ok=True)
        process.start()
        send.close()
        return process, receive

    # --- what the console shows -----------------------------------------------------------------

    def _started(self, job: Job, count: int) -> None:
        gpus = ",".join(place.gpu for place in job.places if place.gpu is not None)
        where = f"GPU {gpus}" if gpus else "the CPU"
        _say(f"started {job.index + 1}/{count} on {where}: {job.payload['name']}")

    def _ended(self, job: Job, count: int) -> None:
        outcome, run = job.outcome or {}, f"{job.index + 1}/{count} {job.payload['name']}"
        if job.blocked_by is not None:
            message = f"not started: it distils from run {job.blocked_by.index + 1}/{count} ({job.blocked_by.payload['run_dir']}), which did not finish"
            print(f"error: {job.payload['run_dir']}: {FailedRuns.add(job.payload['run_dir'], message)}", file=sys.stderr)
        elif outcome.get("user_error") is not None:  # (its process printed it to its log)
            print(f"error: {job.payload['run_dir']}: {FailedRuns.add(job.payload['run_dir'], outcome['user_error'])}", file=sys.stderr)
        elif outcome.get("status") == "completed":
            best = outcome.get("value")  # (train.py returns the run's best val top-1)
            _say(f"finished {run}" + (f": best val top-1 {best:.2f}%" if isinstance(best, float) else ""))
        elif outcome.get("status") == "failed":
            print(f"error: run {run} failed: {outcome['error']} (traceback in {job.payload['log']})", file=sys.stderr)
        else:
            _say(f"stopped {run}: {_how_it_ended(job)}; its log: {job.payload['log']}")

    def _stop_the_sweep(self, signal_name: str, jobs: list[Job]) -> None:
        not_started = sum(not job.ended for job in jobs)
        _say(f"{signal_name}: the sweep stops here ({not_started} run(s) not started); rerun the same command to go on "
             "(finished runs are skipped, stopped ones resume)")  # fmt: skip
        if FailedRuns.runs:
            print(FailedRuns.listing(f"[zipfls-train] earlier in this sweep {len(FailedRuns.runs)} run(s) failed:"), file=sys.stderr)
        sys.exit(1)

    def _job_return(self, job: Job) -> JobReturn:
        config = job.payload["config"]
        result = JobReturn(overrides=job.payload["overrides"], hydra_cfg=config, working_dir=os.getcwd(), task_name=config.hydra.job.name)
        outcome = job.outcome or {}
        if outcome.get("status") == "completed" or job.blocked_by is not None:  # (FailedRuns names a blocked one)
            result.status, result.return_value = JobStatus.COMPLETED, outcome.get("value")
        elif outcome.get("status") == "failed":
            result.status = JobStatus.FAILED
            result.return_value = RunCrashed(f"{job.payload['run_dir']}: {outcome['error']} (traceback in {job.payload['log']})")
        else:
            result.status = JobStatus.FAILED
            result.return_value = RunCrashed(f"{job.payload['run_dir']}: {_how_it_ended(job)}; its log: {job.payload['log']}")
        return result


def _ended_well(job: Job) -> bool:
    """The run trained to its end (not stopped, failed or killed)."""
    outcome = job.outcome or {}
    return outcome.get("status") == "completed" and outcome.get("user_error") is None


def _say(line: str) -> None:
    print(f"[zipfls-train] {line}", file=sys.stderr, flush=True)


def _how_it_ended(job: Job) -> str:
    code = job.exitcode
    if code is not None and code < 0:
        return f"its process was killed by {signal.Signals(-code).name}"
    if code == 1:  # train.py's exit after a stop request: the run saved its checkpoint first
        return "asked to stop, it saved a checkpoint to resume from"
    if code == 130:
        return "asked to stop while it set up, it stopped at once"
    return f"its process ended with exit status {code}"


def _run_folder(config: DictConfig) -> Path:
    return Path(str(config.hydra.sweep.dir)) / _subdir(config)


def _subdir(config: DictConfig) -> str:
    """The run's subfolder of the sweep folder, as run_job will resolve it."""
    return str(_resolved(config, "hydra.sweep.subdir"))


def _resolved(config: DictConfig, key: str) -> Any:
    """``key`` of a job's config resolved as in its run (Hydra's job values, e.g. override_dirname,
    come from the HydraConfig of that job); None where the config has no such key."""
    hydra_config = HydraConfig.instance()
    before = hydra_config.cfg
    hydra_config.set_config(config)
    try:
        return OmegaConf.select(config, key, default=None)
    finally:
        hydra_config.cfg = before


def _after_their_teachers(jobs: list[Job]) -> None:
    """A run that distils from a checkpoint inside another run's folder of this sweep (BAN's
    generation k from k-1, ``loss.teacher_checkpoint``) starts once that run has ended well: at once,
    it would find no checkpoint, or the teacher's best epoch so far."""
    folders = {job.payload["run_dir"].resolve(): job.index for job in jobs}
    for job in jobs:
        teacher = _resolved(job.payload["config"], "loss.teacher_checkpoint")
        if teacher:
            job.after = tuple(index for folder, index in folders.items() if folder in Path(str(teacher)).resolve().parents)


# --- in the run's process -----------------------------------------------------------------------


def run_one(send: Any, log: str, cores: list[int], task: tuple[str, str], hydra_context: HydraContext, config: DictConfig,
            singletons: Any) -> None:  # fmt: skip
    """The run's process: its output to ``log``, its CPU affinity to ``cores``, then Hydra's run_job
    as the basic launcher calls it; sends {"status", "value" | "error", "user_error"} back. Started
    with SIGINT and SIGTERM held back (stop_signals_held), which it takes once its handlers are set."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _output_to(log)
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    release_stop_signals()
    setup_globals()
    Singleton._instances = singletons
    Plugins.instance()  # (found again here, as Singleton.set_state does)
    result = run_job(hydra_context=hydra_context, task_function=_task_function(*task), config=config,
                     job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")  # fmt: skip
    outcome: dict[str, Any] = {"user_error": FailedRuns.last_message}  # (train.py records a user error there)
    if result.status == JobStatus.COMPLETED:
        outcome.update(status="completed", value=result.return_value)
    else:
        error = result._return_value
        traceback.print_exception(error)
        outcome.update(status="failed", error=f"{type(error).__name__}: {error}")
    sys.stdout.flush()
    sys.stderr.flush()
    send.send(outcome)


def _hydra_singletons() -> dict[type, Any]:
    """Hydra's global state for a run's process, as Singleton.get_state gives it but for OmegaConf's
    resolvers, which pickle cannot send (Hydra's joblib launcher sends them with cloudpickle): the
    process registers its own as it imports the task's module (train.py) and calls setup_globals."""
    return Singleton.get_state()["instances"]


def _output_to(log: str) -> None:
    """stdout and stderr (the file descriptors, so torch's and the loader workers' output too) to
    the end of ``log``."""
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    for stream in (1, 2):
        os.dup2(descriptor, stream)
    os.close(descriptor)


def _task_function(module_name: str, qualname: str) -> TaskFunction:
    """The task function, found by name in this process: train.py's ``main`` is the module's
    ``main`` wrapped by ``hydra.main``, which pickle cannot send (the name leads to the wrapper)."""
    found: Any = sys.modules.get(module_name) or importlib.import_module(module_name)
    for part in qualname.split("."):
        found = getattr(found, part)
    return inspect.unwrap(found)
