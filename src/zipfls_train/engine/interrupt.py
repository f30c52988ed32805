"""Stopping a run on Ctrl-C (SIGINT) or SIGTERM (a cluster's preemption, ``kill``) without losing the
steps since the last checkpoint: the signal only asks the training loop to stop, and the loop saves
``last.pt`` at the next step boundary, so rerunning the command resumes there exactly.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

import torch

from .distributed import all_reduce_sum

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(RuntimeError):
    """The run stopped on a signal after saving its checkpoint (the message says where)."""


class StopRequests:
    """While entered (in the main thread), SIGINT and SIGTERM set :attr:`signal_name` instead of
    ending the process. A second signal of the same kind acts as it would without this (Ctrl-C
    twice stops at once), since the first restores the previous handler."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

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
        self.signal_name = signal.Signals(number).name
        signal.signal(number, self._previous.pop(number, signal.SIG_DFL))
        print(
            f"[zipfls-train] {self.signal_name}: stopping after this step and saving a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def agreed(self, device: torch.device, distributed: bool) -> bool:
        """Whether to stop here. Under DDP every rank must stop at the same step (a rank that stopped
        alone would leave the others waiting in a collective), so the ranks sum their requests: one
        small all-reduce, made only where the caller already synchronises."""
        if not distributed:
            return self.signal_name is not None
        votes = torch.tensor([0.0 if self.signal_name is None else 1.0], device=device)
        return bool(all_reduce_sum(votes).item() > 0)
