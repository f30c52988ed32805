"""Entry point after Hydra: one process, N spawned ranks, or ranks started by torchrun.

Hydra composes the config once, in the parent process; ranks get the resolved config and the run
folder, so multirun and DDP never fight over output folders.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import multiprocessing.connection
import os
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf
from torch.multiprocessing.spawn import ProcessException, ProcessExitedException

from ..errors import user_errors
from ..stop_signals import release_stop_signals, stop_signals_held
from .checkpoint import resume_note
from .config_checks import validate_config
from .cpu_cores import cpu_threads_for_a_run
from .distributed import barrier, init_distributed, launched_by_torchrun, processes_on_this_node, shutdown
from .environment_variables import variables_set
from .interrupt import StopRequests, TrainingInterrupted
from .out_of_memory import out_of_memory_of_a_run
from .resume import finished_as_recorded, report_finished
from .trainer import Trainer


class RankKilled(RuntimeError):
    """A spawned rank was killed by a signal from outside the run (the kernel's out-of-memory
    killer, a job scheduler, ``kill``); the message names the rank, the signal and what is saved."""


def _rank_killed(failure: ProcessExitedException, run_dir: Path) -> RankKilled:
    return RankKilled(
        f"rank {failure.error_index} (pid {failure.error_pid}) was killed by {failure.signal_name} from outside the run "
        f"(out of memory, say: check the kernel log); the other ranks were stopped; {resume_note(run_dir)}"
    )


@contextlib.contextmanager
def _rendezvous_store(world_size: int) -> Iterator[int]:
    """The port of a TCP store this process hosts for the ranks it spawns, which reach it over
    loopback and join the process group through it (each a client, rank 0 included; the store
    listens on every interface, as rank 0's own store did before). The port is held from the
    moment the kernel picks it until the ranks are done: a free port looked up, released and bound
    again by rank 0 seconds later, once it had started, could be taken in between by another program
    (another run of a sweep starting on the same node), and rank 0 then failed with "address
    already in use"."""
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
    try:
        yield store.port
    finally:
        del store


@contextlib.contextmanager
def _torch_state_of_a_run() -> Iterator[None]:
    """What a run needs of this process's torch state, and the caller's state back when it returns.
    A notebook may have switched gradients off (the run failed as if its loss had no gradient) or
    made float64 the default dtype (the run trained in float64, recorded as fp32); and the flags a
    run sets for the whole process (deterministic algorithms, cuDNN autotuning) were left set."""
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark, dtype = torch.backends.cudnn.benchmark, torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        torch.set_default_dtype(dtype)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.backends.cudnn.benchmark = benchmark


def _worker(local_rank: int, container: dict[str, Any], run_dir: str, world_size: int, base_rank: int,
            store_port: int | None = None) -> dict[str, Any]:  # fmt: skip
    cfg = OmegaConf.create(container)
    rank = base_rank + local_rank
    callers_group = dist.is_available() and dist.is_initialized()  # a process group the caller made stays theirs
    ctx = init_distributed(str(cfg.trainer.device), rank, world_size, local_rank, store_port)
    processes_on_the_node = processes_on_this_node(world_size)
    try:
        with _torch_state_of_a_run(), cpu_threads_for_a_run(ctx.device, processes_on_the_node):
            try:
                trainer = Trainer(cfg, ctx, Path(run_dir))
                summary = trainer.fit()
            except RuntimeError as error:  # from setting the run up to its last evaluation
                translated = out_of_memory_of_a_run(error, cfg, world_size, processes_on_the_node, Path(run_dir))
                if translated is None:
                    raise
                raise translated from error
        # Release the DDP model (its reducer holds the process group) and let every rank finish
        # before any tears the group down: otherwise gloo can abort at exit ("terminate called
        # without an active exception"). Not on errors, where the other ranks may never arrive.
        del trainer
        gc.collect()
        barrier()
        return summary
    finally:
        if not callers_group:
            shutdown()


def _spawned_worker(local_rank: int, container: dict[str, Any], run_dir: str, world_size: int, store_port: int, errors: Any,
                    stopped: Any) -> None:  # fmt: skip
    """A spawned rank: a user error is also sent to the parent as (rank, type, message), which raises
    it as such instead of torch's ProcessRaisedException with the rank's whole traceback.

    Ctrl-C or SIGTERM while the rank starts ends it quietly; the parent, which gets every signal,
    says so. The rank was started with both held back (Python's start-up, imports included, would
    print a KeyboardInterrupt traceback), takes them here (one held back since then arrives now),
    and ends at once if the parent was asked to stop meanwhile (``stopped``); from its training
    loop on, they ask it to save and stop."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        release_stop_signals()
        if stopped.is_set():
            raise KeyboardInterrupt
        _worker(local_rank, container, run_dir, world_size, 0, store_port)
    except user_errors() as error:
        errors.put((local_rank, type(error), str(error)))
        raise
    except KeyboardInterrupt:
        raise SystemExit(1) from None


def _join_ranks(ranks: Any, errors: Any) -> None:
    """Wait for the spawned ranks. When one stops on a user error, the others are killed at once:
    they cannot go on (their next collective waits for it forever) and have nothing to save. torch's
    own clean-up sends them SIGTERM, which a rank takes for a user's request to save and stop (it
    says so, wrongly) before torch kills it 30 s later. Any other failure is left to torch's join,
    which reports the failed rank's traceback."""
    waiting = {process.sentinel: process for process in ranks.processes}
    while waiting:
        for sentinel in multiprocessing.connection.wait(list(waiting)):
            process = waiting.pop(sentinel)
            process.join()
            if process.exitcode != 0:
                if not errors.empty():
                    for other in ranks.processes:
                        if other.is_alive():
                            other.kill()
                waiting.clear()
                break
    while not ranks.join():
        pass


def _rank_user_error(errors: Any) -> BaseException | None:
    """The user error of the lowest rank that reported one (ranks often fail alike: one message)."""
    reported = []
    while not errors.empty():
        reported.append(errors.get())
    if not reported:
        return None
    _, kind, message = min(reported, key=lambda item: item[0])
    return kind(message)  # every user error is built from its message alone


def _record_torchrun_processes(container: dict[str, Any], rank: int) -> None:
    """Under torchrun the processes per node are its --nproc-per-node, whatever trainer.devices says:
    the run's config records those, and a trainer.devices that asked for another number is warned
    about (it used to be ignored without a word and recorded as if it had been used)."""
    per_node = processes_on_this_node(int(os.environ["WORLD_SIZE"]))
    asked = container["trainer"]["devices"]
    if asked not in (1, per_node) and rank == 0:
        warnings.warn(
            f"trainer.devices={asked} is not used under torchrun, which started {per_node} process(es) per node "
            "(--nproc-per-node); the run's config records those", UserWarning, stacklevel=2,
        )  # fmt: skip
    container["trainer"]["devices"] = per_node


def run_training(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """Train one run in ``run_dir``; returns the summary (rank 0 / single process)."""
    validate_config(cfg)
    # A rerun finished run needs no data, model or ranks. (Under torchrun every rank checks the folder
    # in the trainer, together: ranks that disagreed here would wait for each other forever.)
    if not launched_by_torchrun() and (summary := finished_as_recorded(cfg, run_dir)) is not None:
        report_finished(summary, run_dir)
        return summary
    container = OmegaConf.to_container(cfg, resolve=True)
    if launched_by_torchrun():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        _record_torchrun_processes(container, rank)
        return _worker(int(os.environ["LOCAL_RANK"]), container, str(run_dir), world, rank - int(os.environ["LOCAL_RANK"]))
    devices = int(cfg.trainer.devices)
    if devices == 1:
        return _worker(0, container, str(run_dir), 1, 0)
    # The ranks are this machine's own processes: loopback, whatever MASTER_ADDR the shell carries
    # (a cluster's address there would make them wait for a peer that never comes). (The variables
    # name the store for whatever else in the ranks reads them.)
    with _rendezvous_store(devices) as port, variables_set(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)):
        _spawn_ranks(container, run_dir, devices, port)
    # What one process returns: the summary rank 0 wrote (a spawned rank's return value is lost).
    return json.loads((run_dir / "summary.json").read_text())


def _spawn_ranks(container: dict[str, Any], run_dir: Path, devices: int, store_port: int) -> None:
    # After one rank fails, torch logs a warning for each sibling it stops: noise beside the error.
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    level = spawn_log.level
    spawn_log.setLevel(logging.ERROR)
    # Ctrl-C or SIGTERM goes on to the ranks, which save and stop at the same step. The parent listens
    # from before they start (a signal then ended it with a KeyboardInterrupt traceback), and ranks
    # still starting learn of it from `stopped`.
    context = mp.get_context("spawn")
    stopped, errors = context.Event(), context.SimpleQueue()
    stops = StopRequests(announce=False, on_request=stopped.set)
    try:
        with stops:
            with stop_signals_held("spawn"):  # (while the ranks start; a signal meanwhile reaches `stops` after)
                ranks = mp.start_processes(_spawned_worker, args=(container, str(run_dir), devices, store_port, errors, stopped),
                                           nprocs=devices, join=False, start_method="spawn")  # fmt: skip
                stops.forward_to += [process.pid for process in ranks.processes]
                # Held back in this thread, a signal can still reach `stops` through another one,
                # before forward_to named the ranks: they are told now.
                requested_while_starting = stops.signal_name
            if requested_while_starting is not None:
                stops.forward(signal.Signals[requested_while_starting])
            _join_ranks(ranks, errors)
    except ProcessException as failure:
        error = _rank_user_error(errors)
        if error is None and stops.signal_name is not None:  # stopped while setting up, or at once on a second signal
            error = TrainingInterrupted(f"interrupted ({stops.signal_name}) before the ranks saved a checkpoint; {resume_note(run_dir)}")
        if error is None and isinstance(failure, ProcessExitedException) and failure.signal_name:
            error = _rank_killed(failure, run_dir)
        if error is None:
            raise
        raise error from failure  # the rank's traceback stays in __cause__ (train.py prints the message only)
    finally:
        spawn_log.setLevel(level)
