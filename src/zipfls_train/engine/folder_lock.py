"""One training process per run folder. A job submitted twice, or a rerun started while the first
is still going, would otherwise resume from the other's checkpoints and append every epoch to
``metrics.jsonl`` twice (or, started in the same instant, set the other's files aside mid-write).
The first process holds an advisory lock on ``<run>/.lock`` while it trains; a second is refused
with a line naming the holder. The lock goes with its process, however that ends (a kill too)."""

from __future__ import annotations

import datetime
import os
import socket
import warnings
from pathlib import Path
from typing import TextIO

from .run_folder import not_writable

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; warned, not checked
    fcntl = None

LOCK_NAME = ".lock"


class RunFolderBusy(RuntimeError):
    """Another process trains in this run folder (the message names it)."""


class RunFolderLock:
    """``with RunFolderLock(run_dir):`` holds the folder's lock, or raises :class:`RunFolderBusy`.
    On a filesystem without locks (some cluster filesystems) it warns once and goes on unlocked."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self._stream: TextIO | None = None

    def __enter__(self) -> RunFolderLock:
        if fcntl is not None:
            self._stream = self._acquire()
        else:
            warnings.warn(
                f"no advisory file locks on this platform (Windows): nothing stops a second process from "
                f"training in {self.path.parent} at the same time", stacklevel=2,
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stream is not None:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiting process then makes a new file
            self._stream.close()
            self._stream = None

    def _acquire(self) -> TextIO | None:
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                stream = self.path.open("a+")
            except OSError as error:
                raise not_writable(self.path.parent, error) from error
            try:
                fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                stream.seek(0)
                holder = stream.read().strip() or "another process"
                stream.close()
                raise RunFolderBusy(
                    f"{self.path.parent} is in use: {holder} trains in it. Wait for that run to end (rerunning "
                    "this command then resumes or reports it), stop it, or give this run a folder of its own "
                    "(hydra.run.dir=..., or another tag=...)"
                ) from None
            except OSError as error:  # no locks on this filesystem (ENOLCK, EOPNOTSUPP, ...)
                stream.close()
                warnings.warn(
                    f"cannot lock {self.path} ({error.strerror or error}): nothing stops a second process "
                    "from training in this run folder at the same time", stacklevel=3,
                )
                return None
            if self._still_the_file(stream):
                break
            stream.close()  # its holder removed it between our open and our lock: lock the new one
        stream.seek(0)
        stream.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        stream.write(f"process {os.getpid()} on {socket.gethostname()} (since {started})\n")
        stream.flush()
        return stream

    def _still_the_file(self, stream: TextIO) -> bool:
        try:
            return os.fstat(stream.fileno()).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False
