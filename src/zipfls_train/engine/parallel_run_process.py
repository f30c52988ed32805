"""The process of one run of a ``hydra/launcher=parallel`` sweep
(hydra_plugins/zipfls_train_launcher): started by spawn, it runs the
task (train.py's) through Hydra's run_job, as the basic launcher does in its own process, and sends
its outcome back through a pipe:

- ``{"status": "completed", "value": <the task's return>, "user_error": <message> | None}``
  (train.py records a run's user error in FailedRuns and returns: the sweep goes on);
- ``{"status": "failed", "error": "<type>: <message>"}`` (any other exception; its traceback goes
  to the run's log);
- ``{"status": "stopped"}``: Ctrl-C or SIGTERM, before the run trained (nothing saved) or after it
  saved its checkpoint (train.py exits then).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import inspect
import os
import signal
import sys
import traceback
from typing import Any

from hydra.core.plugins import Plugins
from hydra.core.singleton import Singleton
from hydra.core.utils import JobStatus, run_job, setup_globals
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

# An exception's message sent back is cut to this many characters (a load_state_dict error lists
# every key of a model; the whole of it is in the run's log).
MAX_MESSAGE = 2000


def run_one(send: Any, log: str, cores: list[int], task: tuple[str, str], hydra_context: HydraContext, config: DictConfig,
            singletons: dict[type, Any]) -> None:  # fmt: skip
    """The run's process: its output to ``log``, its CPU affinity to ``cores``, then the task; sends
    its outcome. Started with SIGINT and SIGTERM held back (stop_signals_held): it takes them once
    its handlers are set and torch is imported (a signal inside an import leaves the module half
    made), and a stop before the run trains ends it quietly."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _stop_requested)
    _output_to(log)
    _stop_when_the_sweep_process_dies()
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    importlib.import_module("zipfls_train.engine.run")  # (torch and the trainer, while the signals are held)
    from zipfls_train.engine.hydra_callbacks import FailedRuns
    from zipfls_train.stop_signals import release_stop_signals

    missing = _placed_on_gpus_cuda_lacks()
    if missing is not None:  # (trainer.device=auto would train on the CPU, the console saying "GPU")
        print(f"error: {missing}", file=sys.stderr)
        _send(send, {"status": "completed", "value": None, "user_error": missing})
        return
    try:
        release_stop_signals()
        setup_globals()
        Singleton._instances = singletons
        Plugins.instance()  # (found again here, as Singleton.set_state does)
        result = run_job(hydra_context=hydra_context, task_function=_task_function(*task), config=config,
                         job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")  # fmt: skip
    except (KeyboardInterrupt, SystemExit) as stop:  # (train.py exits after a stop request)
        _send(send, {"status": "stopped"})
        raise SystemExit(130 if isinstance(stop, KeyboardInterrupt) else stop.code) from None
    if result.status == JobStatus.COMPLETED:
        outcome = {"status": "completed", "value": result.return_value, "user_error": FailedRuns.last_message}
    else:
        error = result._return_value
        traceback.print_exception(error)
        outcome = {"status": "failed", "error": f"{type(error).__name__}: {error}"[:MAX_MESSAGE]}
    _send(send, outcome)


def _placed_on_gpus_cuda_lacks() -> str | None:
    """Where the launcher placed this run on GPUs (CUDA_VISIBLE_DEVICES) that CUDA does not find, so
    named (a UUID or an entry of the sweep's own CUDA_VISIBLE_DEVICES that no GPU has: the launcher
    checks indices only against torch's count)."""
    import torch

    placed = [gpu for gpu in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if gpu]
    found = torch.cuda.device_count() if placed else 0
    if found >= len(placed):
        return None
    return (f"the launcher placed this run on GPU {','.join(placed)}, but CUDA finds {found} of them: hydra.launcher.gpus or "
            "CUDA_VISIBLE_DEVICES names a GPU this machine does not have")  # fmt: skip


def _stop_requested(number: int, frame: Any) -> None:
    """SIGTERM before the run's trainer takes it over: stop, as Ctrl-C does."""
    from zipfls_train.stop_signals import TerminateRequested

    raise TerminateRequested


def _send(send: Any, outcome: dict[str, Any]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    with contextlib.suppress(BrokenPipeError):  # (the sweep's process is gone)
        send.send(outcome)


# The signal the kernel sends this process when the sweep's process dies (PR_SET_PDEATHSIG). Not
# SIGTERM itself: it comes once per thread of the sweep's process that the run is handed on to as
# those threads end (prctl(2): the "parent" is the thread that forked), so a killed sweep sent two
# or more SIGTERMs, and a second one a second later means "stop at once, unsaved" to the trainer.
SWEEP_DIED = getattr(signal, "SIGRTMIN", None)


def _stop_when_the_sweep_process_dies() -> None:
    """Linux: one SIGTERM to this process when the sweep's process dies (killed, say), so that the
    run saves a checkpoint and stops rather than train on unseen; where the sweep's process is
    already gone, the same now."""
    if SWEEP_DIED is None:  # (not Linux: no parent-death signal)
        return
    parent = os.getppid()
    told = []

    def sweep_died(number: int, frame: Any) -> None:
        if not told:  # (the first of its deliveries; the others are the same news)
            told.append(number)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(SWEEP_DIED, sweep_died)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, SWEEP_DIED)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        sweep_died(SWEEP_DIED, None)


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


def hydra_singletons() -> dict[type, Any]:
    """Hydra's global state for a run's process, as Singleton.get_state gives it but for OmegaConf's
    resolvers, which pickle cannot send (Hydra's joblib launcher sends them with cloudpickle): the
    process registers its own as it imports the task's module (train.py) and calls setup_globals."""
    return Singleton.get_state()["instances"]
