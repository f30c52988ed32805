"""Stopping a run on Ctrl-C (SIGINT) or SIGTERM (a cluster's preemption, ``kill``) without losing the
steps since the last checkpoint: the signal only asks the training loop to stop, and the loop saves
``last.pt`` at the next step boundary, so rerunning the command resumes there exactly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import torch

from ..stop_signals import STOP_SIGNALS
from .distributed import all_reduce_sum

# A second signal within this many seconds of the first is the same request delivered twice.
REPEAT_WINDOW_S = 1.0


class TrainingInterrupted(RuntimeError):
    """The run stopped on a signal after saving its checkpoint (the message says where)."""


class StopRequests:
    """While entered (in the main thread), SIGINT and SIGTERM set :attr:`signal_name` instead of
    ending the process. The same signal again acts as it would without this (Ctrl-C twice stops at
    once), unless it comes within :data:`REPEAT_WINDOW_S`: then it is the same request delivered
    twice (to the whole process group by the terminal or the cluster, and forwarded by a parent).

    ``forward_to``: a parent's children (spawned DDP ranks), which get every signal it receives:
    they do the stopping and saving, so a parent stays quiet.
    ``announce``: say so on stderr (``announcement``). Under DDP only rank 0 does: every rank gets
    the signal, and one line says it for all (torchrun also stops the other ranks with SIGTERM when
    one fails: one misleading line is then followed by torchrun's report of the failure, not one per
    rank)."""

    def __init__(self, forward_to: Sequence[int] = (), announce: bool = True, on_request: Callable[[], None] | None = None,
                 announcement: str = "stopping after this step and saving a checkpoint (send it again to stop at once)") -> None:  # fmt: skip
        self.signal_name: str | None = None
        self.forward_to = list(forward_to)
        self.announce = announce and not self.forward_to
        self.announcement = announcement
        self.on_request = on_request  # called at the first request (e.g. to tell ranks still starting)
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._request)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def forward(self, number: int) -> None:
        """Send signal ``number`` on to the processes of :attr:`forward_to` (those already gone excepted)."""
        for pid in self.forward_to:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, number)

    def _request(self, number: int, frame: FrameType | None) -> None:
        self.forward(number)
        if self.signal_name is not None:
            if time.monotonic() - self._first_at >= REPEAT_WINDOW_S:
                self._act_as_before(number, frame)
            return
        self.signal_name, self._first_at = signal.Signals(number).name, time.monotonic()
        if self.on_request is not None:
            self.on_request()
        if self.announce:
            # os.write, not print: the signal may land while the progress bar writes to stderr, and
            # a print inside that write raises "reentrant call".
            os.write(2, f"[zipfls-train] {self.signal_name}: {self.announcement}\n".encode())

    def _act_as_before(self, number: int, frame: FrameType | None) -> None:
        previous = self._previous.get(number, signal.SIG_DFL)
        if callable(previous):
            previous(number, frame)  # e.g. Python's SIGINT handler: KeyboardInterrupt
        elif previous == signal.SIG_DFL:
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)


class StopVotes:
    """Where the training loop asks whether to stop for a :class:`StopRequests` signal.

    One process: the request is a Python flag, read at every step. Under DDP every rank must stop at
    the same step (a rank that stopped alone would leave the others waiting in a collective), so
    the ranks vote: one small all-reduce, read on the host, i.e. a synchronisation, and not worth
    making at every step. They vote at the log steps (which synchronise anyway) and, between them,
    every :attr:`every` steps, chosen so that a vote comes about every ``within_s`` seconds: a
    cluster's SIGTERM is followed by SIGKILL after a grace period (SLURM's default: 30 s), which a
    log interval of slow steps can exceed. Each vote also sums the ranks' mean step time since the
    previous vote, so every rank derives the same :attr:`every` from it."""

    # Steps before the first vote, which measures the step time (the log steps vote too).
    FIRST_EVERY = 10

    def __init__(self, requests: StopRequests, *, distributed: bool, device: torch.device, world_size: int,
                 log_every: int, within_s: float, clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.requests, self.distributed, self.device, self.world_size = requests, distributed, device, world_size
        self.log_every, self.within_s, self.clock = log_every, within_s, clock
        self.every = min(self.FIRST_EVERY, log_every)
        self._since_step, self._since_time = 0, clock()

    def restart_timing(self, global_step: int) -> None:
        """Time the steps from ``global_step`` on (called at an epoch's start: the evaluation before it
        is not step time, and after each vote)."""
        self._since_step, self._since_time = global_step, self.clock()

    def at_step(self, global_step: int, logged: bool) -> bool:
        """Whether to stop after step ``global_step`` (``logged``: it was a log step)."""
        if not self.distributed:
            return self.requests.signal_name is not None
        if not logged and global_step - self._since_step < self.every:
            return False
        return self._vote(global_step)

    def now(self) -> bool:
        """Whether to stop here, outside the step loop (an epoch boundary); no step time is measured."""
        if not self.distributed:
            return self.requests.signal_name is not None
        return self._vote(None)

    def _vote(self, global_step: int | None) -> bool:
        steps = 0 if global_step is None else global_step - self._since_step
        seconds_per_step = (self.clock() - self._since_time) / steps if steps > 0 else 0.0
        requested = 0.0 if self.requests.signal_name is None else 1.0
        requests, seconds_per_step_sum = all_reduce_sum(torch.tensor([requested, seconds_per_step], device=self.device)).tolist()
        if seconds_per_step_sum > 0:  # the same sum on every rank, so the same interval
            self.every = steps_between_votes(seconds_per_step_sum / self.world_size, self.within_s, self.log_every)
        if global_step is not None:
            self.restart_timing(global_step)
        return requests > 0


def steps_between_votes(seconds_per_step: float, within_s: float, log_every: int) -> int:
    """As many steps as take ``within_s`` seconds, at least 1 and at most ``log_every``."""
    return max(1, min(log_every, int(within_s / seconds_per_step)))
