"""The signals that ask a run to stop (Ctrl-C's SIGINT, a cluster's or ``kill``'s SIGTERM), and
starting child processes that must not die of them: a terminal or a cluster sends them to the whole
process group, and the training process alone decides what to do (save, then stop its children)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ignore_stop_signals() -> dict[int, object]:
    """SIGINT and SIGTERM ignored from now on in this process (main thread only); the handlers they
    had, by signal number."""
    return {number: signal.signal(number, signal.SIG_IGN) for number in STOP_SIGNALS}


@contextlib.contextmanager
def stop_signals_ignored() -> Iterator[None]:
    """SIGINT and SIGTERM ignored in this process meanwhile, and so in the processes it starts: an
    ignored signal stays ignored across exec, and Python's start-up keeps it so. A child started by
    spawn or forkserver (macOS's default, and Python 3.14's on Linux) spends seconds importing torch
    before its own code can ignore them; a signal then would kill it. (Only the main thread can set
    handlers: elsewhere this changes nothing.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = ignore_stop_signals()
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
