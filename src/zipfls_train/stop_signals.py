"""The signals that ask a run to stop (Ctrl-C's SIGINT, a cluster's or ``kill``'s SIGTERM), and
starting child processes that must not die of them: a terminal or a cluster sends them to the whole
process group, and the training process alone decides what to do (save, then stop its children)."""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TerminateRequested(KeyboardInterrupt):
    """SIGTERM where a process stops at once on it as on Ctrl-C (a run of the parallel launcher
    while it sets up): a KeyboardInterrupt that names its signal."""

    signal_name = "SIGTERM"


# POSIX signal masks; Windows has none (there, ignoring the signals meanwhile stands in).
_CAN_BLOCK = hasattr(signal, "pthread_sigmask")


def ignore_stop_signals() -> dict[int, object]:
    """SIGINT and SIGTERM ignored from now on in this process (main thread only); the handlers they
    had, by signal number."""
    return {number: signal.signal(number, signal.SIG_IGN) for number in STOP_SIGNALS}


@contextlib.contextmanager
def stop_signals_held(start_method: str | None = None) -> Iterator[None]:
    """While child processes start: SIGINT and SIGTERM held back (blocked) in this thread meanwhile,
    and so in the processes it starts, which inherit the mask across fork and exec. A child started
    by spawn or forkserver (macOS's default, and Python 3.14's on Linux) spends seconds importing
    torch before its own code can set handlers; a signal then would kill it (or print a
    KeyboardInterrupt traceback). Held back, it waits until the child calls
    :func:`release_stop_signals` after setting its handlers (an ignored one is then dropped).

    Blocked, not ignored: an ignored signal is discarded, so one arriving while the children start
    was lost to this process too (a Ctrl-C then did nothing, and the run trained to its end). Held
    back, it reaches this process's handler when the block ends (or at once, through another of its
    threads). Only the main thread starts the children that matter; elsewhere this does nothing.

    ``start_method``: how the children are started (None: multiprocessing's default)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if not _CAN_BLOCK:
        previous = ignore_stop_signals()
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
        return
    _start_resource_tracker_for(start_method)
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)


def _start_resource_tracker_for(start_method: str | None) -> None:
    """Python starts its multiprocessing resource tracker with the first child a process starts by
    spawn or forkserver, and starting it unblocks SIGINT and SIGTERM in the calling thread
    (resource_tracker.ensure_running blocks them, starts the tracker, then unblocks them instead of
    restoring the mask as it was). A hold taken before then ended with it, and the children started
    after died of a signal sent while they started (a process's first DataLoader workers, where nothing
    had started the tracker yet: a loader used from Python).
    Started before the hold, the tracker leaves it alone. Children started by fork need none."""
    method = start_method or multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    if method != "fork":
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()


def release_stop_signals() -> None:
    """In a child started under :func:`stop_signals_held`, once its handlers are set: the signals
    held back since it started are delivered now (to those handlers)."""
    if _CAN_BLOCK:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
