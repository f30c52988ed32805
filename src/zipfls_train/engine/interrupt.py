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
from collections.abc import Sequence
from types import FrameType
from typing import Any

import torch

from .distributed import all_reduce_sum

SIGNALS = (signal.SIGINT, signal.SIGTERM)
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
    they do the stopping and saving, so a parent stays quiet."""

    def __init__(self, forward_to: Sequence[int] = ()) -> None:
        self.signal_name: str | None = None
        self.forward_to = list(forward_to)
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for number in SIGNALS:
                self._previous[number] = signal.signal(number, self._request)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _request(self, number: int, frame: FrameType | None) -> None:
        for pid in self.forward_to:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, number)
        if self.signal_name is not None:
            if time.monotonic() - self._first_at >= REPEAT_WINDOW_S:
                self._act_as_before(number, frame)
            return
        self.signal_name, self._first_at = signal.Signals(number).name, time.monotonic()
        if not self.forward_to:
            # os.write, not print: the signal may land while the progress bar writes to stderr, and
            # a print inside that write raises "reentrant call".
            os.write(2, f"[zipfls-train] {self.signal_name}: stopping after this step and saving a checkpoint "
                        "(send it again to stop at once)\n".encode())

    def _act_as_before(self, number: int, frame: FrameType | None) -> None:
        previous = self._previous.get(number, signal.SIG_DFL)
        if callable(previous):
            previous(number, frame)  # e.g. Python's SIGINT handler: KeyboardInterrupt
        elif previous == signal.SIG_DFL:
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)

    def agreed(self, device: torch.device, distributed: bool) -> bool:
        """Whether to stop here. Under DDP every rank must stop at the same step (a rank that stopped
        alone would leave the others waiting in a collective), so the ranks sum their requests: one
        small all-reduce, made only where the caller already synchronises."""
        if not distributed:
            return self.signal_name is not None
        votes = torch.tensor([0.0 if self.signal_name is None else 1.0], device=device)
        return bool(all_reduce_sum(votes).item() > 0)
