"""A sweep's runs in parallel on one machine (``hydra/launcher=parallel``): each run in a process of
its own, on its share of the GPUs and CPU cores, at most as many at once as there are places.

Places: each GPU holds ``runs_per_gpu`` runs at once (an eager 32 px step at batch 128 is bound by
kernel launches, so one run leaves its GPU partly idle); a run of ``trainer.devices=k`` takes
a place on k GPUs. Without GPUs, ``cpu_runs`` runs at once. Each place has its own slice of the CPU
cores the sweep may use, set as the run's CPU affinity: the run's torch threads and
``trainer.num_workers=auto`` count those (engine/cpu_cores.py), so runs do not fight over cores.

The scheduling here knows nothing of Hydra: the launcher (hydra_plugins/zipfls_train_launcher)
hands it jobs and a function that starts one.
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..stop_signals import stop_signals_held
from .config_checks import ConfigError
from .cpu_cores import usable_cpu_cores
from .environment_variables import variables_set
from .interrupt import StopRequests


@dataclass(frozen=True)
class Place:
    """Room for one run: a GPU (its CUDA_VISIBLE_DEVICES entry; None for a CPU place) and the CPU
    cores that go with it."""

    gpu: str | None
    cores: tuple[int, ...]


def split_cores(cores: Sequence[int], parts: int) -> list[tuple[int, ...]]:
    """``cores`` in ``parts`` consecutive slices whose sizes differ by at most one; with fewer cores
    than parts, the parts share them round-robin (one core each). No cores (no affinity to set, as
    on macOS): empty slices."""
    cores = list(cores)
    if not cores:
        return [() for _ in range(parts)]
    if len(cores) < parts:
        return [(cores[part % len(cores)],) for part in range(parts)]
    size, extra = divmod(len(cores), parts)
    slices, start = [], 0
    for part in range(parts):
        end = start + size + (1 if part < extra else 0)
        slices.append(tuple(cores[start:end]))
        start = end
    return slices


def sweep_cores() -> list[int]:
    """The cores this process may run on (its affinity), as many as its cgroup's CPU limit allows."""
    if not hasattr(os, "sched_getaffinity"):
        return []
    return sorted(os.sched_getaffinity(0))[: usable_cpu_cores()]


def visible_gpus(requested: Any) -> list[str]:
    """hydra.launcher.gpus: ``auto`` (those this process sees: CUDA_VISIBLE_DEVICES's entries when it
    is set, else every GPU torch counts) or a list of GPU indices or UUIDs -> CUDA_VISIBLE_DEVICES
    entries."""
    if requested == "auto":
        if "CUDA_VISIBLE_DEVICES" in os.environ:
            return [entry.strip() for entry in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if entry.strip()]
        import torch

        return [str(index) for index in range(torch.cuda.device_count())]
    if not isinstance(requested, (list, tuple)) or not all(isinstance(gpu, (int, str)) and not isinstance(gpu, bool) for gpu in requested):
        raise ConfigError(f"hydra.launcher.gpus must be auto or a list of GPUs (indices or UUIDs, e.g. [0,1]), got {requested!r}")
    gpus = [str(gpu).strip() for gpu in requested]
    if len(set(gpus)) != len(gpus):
        raise ConfigError(f"hydra.launcher.gpus names a GPU twice: {requested!r}")
    seen = visible_gpus("auto")
    # (a GPU's UUID cannot be checked without NVML: CUDA itself refuses one that does not exist)
    unseen = [gpu for gpu in gpus if gpu not in seen and not gpu.startswith(("GPU-", "MIG-"))]
    if unseen:  # (its runs would otherwise train on the CPU, trainer.device=auto finding no GPU)
        raise ConfigError(f"hydra.launcher.gpus={requested!r}: {', '.join(unseen)} is not a GPU this process sees "
                          f"({', '.join(seen) or 'none'}: CUDA_VISIBLE_DEVICES, else torch's count)")  # fmt: skip
    return gpus


class Places:
    """The places of the machine, taken by runs as they start and given back as they end.

    With ``gpus``: ``per_gpu`` places on each; a run takes places on the least busy GPUs (its first
    runs spread over all of them). Without: ``per_gpu`` CPU places. Each place has its own slice of
    ``cores``."""

    def __init__(self, gpus: Sequence[str], per_gpu: int, cores: Sequence[int]) -> None:
        slots = [gpu for _ in range(per_gpu) for gpu in gpus] if gpus else [None] * per_gpu
        self.gpus, self.per_gpu = list(gpus), per_gpu
        self.free = [Place(gpu, part) for gpu, part in zip(slots, split_cores(cores, len(slots)), strict=True)]

    def take(self, gpus_needed: int) -> list[Place] | None:
        """Places for a run of ``gpus_needed`` GPUs (0: a CPU run, one place), or None while there
        are not enough free ones."""
        if not self.gpus:
            return [self.free.pop(0)] if self.free else None
        busy = {gpu: self.per_gpu - sum(place.gpu == gpu for place in self.free) for gpu in self.gpus}
        taken: list[Place] = []
        for gpu in sorted(self.gpus, key=lambda name: busy[name]):  # (stable: GPU order among equals)
            place = next((place for place in self.free if place.gpu == gpu), None)
            if place is not None and len(taken) < gpus_needed:
                taken.append(place)
        if len(taken) < gpus_needed:
            return None
        for place in taken:
            self.free.remove(place)
        return taken

    def give_back(self, places: Sequence[Place]) -> None:
        self.free.extend(places)


@dataclass
class Job:
    """One run of the sweep: ``gpus`` it needs (0 on the CPU), what ``start`` needs to start it
    (``payload``), the jobs (their indices) that must have ended well before it starts (``after``:
    BAN's generation k distils from the best checkpoint of k-1, a sibling run), and, once ended, its
    ``outcome`` (what its process sent back, or None) and ``exitcode``; or ``blocked_by``, the job
    that ended badly before it could start."""

    index: int
    gpus: int
    payload: Any
    after: tuple[int, ...] = ()
    outcome: Any = None
    exitcode: int | None = None
    blocked_by: Job | None = None
    places: list[Place] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        return self.exitcode is not None or self.blocked_by is not None


def environment_for(places: Sequence[Place]) -> dict[str, str]:
    """The variables a run's process starts with: the GPUs of its places (none for a CPU run: a CPU
    run in a GPU sweep must not take a GPU by trainer.device=auto)."""
    return {"CUDA_VISIBLE_DEVICES": ",".join(place.gpu for place in places if place.gpu is not None)}


# start(job) -> (the process, the parent's end of a pipe the process sends its outcome through)
Starter = Callable[[Job], tuple[multiprocessing.process.BaseProcess, multiprocessing.connection.Connection]]


def run_jobs(jobs: Sequence[Job], places: Places, start: Starter, on_start: Callable[[Job], None] = lambda job: None,
             on_end: Callable[[Job], None] = lambda job: None,
             ended_well: Callable[[Job], bool] = lambda job: job.exitcode == 0) -> str | None:  # fmt: skip
    """Runs ``jobs`` in order, each as soon as places for it are free and the jobs it comes ``after``
    have ended (a job after one that did not end well is not started: ``blocked_by``); returns when
    every started one has ended. Ctrl-C or SIGTERM goes on to the running runs (which save and stop),
    and no other starts: returns the signal's name then (None when all ran). Every job needs places
    that exist (the caller checks)."""
    runner = _Runner(jobs, places, start, on_start, on_end, ended_well)
    with runner.stops, runner.children_waited_for():
        while runner.waiting or runner.running:
            progressed = runner.start_what_can_start()
            if not runner.running:
                if progressed and runner.waiting and runner.stops.signal_name is None:
                    continue  # (a job blocked just now decides those after it: look again)
                break  # (all done, stopped, or what waits can never start: it comes after itself)
            runner.collect()
    return runner.stops.signal_name


class _Runner:
    """run_jobs' state: the jobs waiting, the processes running (by sentinel) with the pipes their
    outcomes come through, and the stop requests (Ctrl-C, SIGTERM) that go on to them."""

    def __init__(self, jobs: Sequence[Job], places: Places, start: Starter, on_start: Callable[[Job], None],
                 on_end: Callable[[Job], None], ended_well: Callable[[Job], bool]) -> None:  # fmt: skip
        self.by_index = {job.index: job for job in jobs}
        self.waiting = list(jobs)
        self.running: dict[Any, tuple[Job, multiprocessing.process.BaseProcess, multiprocessing.connection.Connection]] = {}
        self.places, self.start, self.on_start, self.on_end, self.ended_well = places, start, on_start, on_end, ended_well
        self.stops = StopRequests(announcement="the running runs save a checkpoint (those that trained) and stop, no other "
                                               "starts (send it again to stop them at once)")  # fmt: skip

    def start_what_can_start(self) -> bool:
        """Starts (or, after a job that ended badly, blocks) the waiting jobs that can, in order;
        whether any was."""
        progressed = False
        for job in list(self.waiting):
            if self.stops.signal_name is not None:
                break
            before = [self.by_index[index] for index in job.after if index in self.by_index]
            if not all(other.ended for other in before):
                continue
            job.blocked_by = next((other for other in before if not self.ended_well(other)), None)
            if job.blocked_by is None and not self._started(job):
                break  # (no places: a later job does not overtake it)
            self.waiting.remove(job)
            if job.blocked_by is not None:
                self.on_end(job)
            progressed = True
        return progressed

    def _started(self, job: Job) -> bool:
        taken = self.places.take(job.gpus)
        if taken is None:
            return False
        job.places = taken
        # Signals held while the process starts (it inherits the hold, and takes them once its
        # handlers are set); one that came meanwhile reaches it after it is named here.
        with stop_signals_held("spawn"), variables_set(**environment_for(taken)):
            process, connection = self.start(job)
            self.stops.forward_to.append(process.pid)
        if self.stops.signal_name is not None:  # (it may have come through another thread already)
            self.stops.forward(signal.Signals[self.stops.signal_name])  # (twice within 1 s is one request)
        self.running[process.sentinel] = (job, process, connection)
        self.on_start(job)
        return True

    def collect(self) -> None:
        """Waits until a process ends, reading outcomes as they come: a process that sends more than
        a pipe holds only ends once its outcome has been read."""
        pipes = {connection: job for job, _, connection in self.running.values() if not connection.closed}
        # (with a timeout: a signal that another thread of this process took runs its Python handler,
        # which passes it on, only once this thread runs Python code again; a wait without one could
        # hold it back until a run ended)
        for ready in multiprocessing.connection.wait([*self.running, *pipes], timeout=0.5):
            if ready in pipes:  # (its process's end, earlier in this list, may have read it already)
                _read_outcome(pipes[ready], ready)
                continue
            job, process, connection = self.running.pop(ready)
            process.join()
            _read_outcome(job, connection)
            job.exitcode = process.exitcode
            self.stops.forward_to.remove(process.pid)
            self.places.give_back(job.places)
            self.on_end(job)

    @contextlib.contextmanager
    def children_waited_for(self) -> Iterator[None]:
        """A second Ctrl-C (KeyboardInterrupt here) also reached the running runs, which stop at
        once: wait for them to end before it goes on (a third one stops the waiting)."""
        try:
            yield
        except KeyboardInterrupt:
            for _, process, _ in self.running.values():
                process.join()
            raise


def _read_outcome(job: Job, connection: multiprocessing.connection.Connection) -> None:
    """The job's outcome from its pipe, read once (then closed): what its process sent, or None
    where it ended without sending (killed, or exited on a signal's request)."""
    if connection.closed:
        return
    try:
        job.outcome = connection.recv() if connection.poll() else None
    except EOFError:
        job.outcome = None
    connection.close()
