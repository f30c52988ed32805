"""The errors a user can cause (as opposed to bugs): train.py prints their message alone, without a
traceback, since each one already names the key, file or value and what was expected."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path


def user_errors() -> tuple[type[BaseException], ...]:
    from .data.file_loader import LoaderWorkerKilled
    from .data.images import DatasetError
    from .engine.checkpoint import CheckpointError, FileWriteError
    from .engine.folder_lock import RunFolderBusy
    from .engine.config_checks import ConfigError
    from .engine.interrupt import TrainingInterrupted
    from .engine.out_of_memory import OutOfMemory
    from .engine.run import RankKilled
    from .engine.run_folder import MetricsFileError, RunFolderNotWritable
    from .engine.resume import ResumeError
    from .engine.trainer import NonFiniteLossError
    from .losses.ban import TeacherCheckpointError
    from .losses.base import MethodContractError

    return (ConfigError, DatasetError, CheckpointError, ResumeError, NonFiniteLossError, TeacherCheckpointError,
            TrainingInterrupted, MetricsFileError, RunFolderNotWritable, MethodContractError, RankKilled, FileWriteError,
            RunFolderBusy, LoaderWorkerKilled, OutOfMemory)  # fmt: skip


def format_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001 - warnings.formatwarning's signature
    """train.py's format of warnings: this package's own (each names the key and the reason, as its
    errors do) as ``warning: <message>``, like the ``error: ...`` lines; other libraries' as Python
    shows them (file, line and source)."""
    package = str(Path(__file__).resolve().parent)
    if str(Path(filename).resolve()).startswith(package):
        return f"warning: {message}\n"
    return _python_format(message, category, filename, lineno, line)


_python_format = warnings.formatwarning


def original_message(error: BaseException) -> str:
    """The error's own message. An exception raised in a DataLoader worker reaches the main process
    as ``type(error)("Caught <Type> in DataLoader worker process N.\\nOriginal Traceback ...")``, the
    whole worker traceback in its message; its original message is the traceback's last entry."""
    text = str(error)
    kind = type(error)
    if not (text.startswith(f"Caught {kind.__name__} in DataLoader worker process") and "\nOriginal Traceback" in text):
        return text
    marker = f"{kind.__module__}.{kind.__qualname__}: "
    position = text.rfind(marker)
    return text[position + len(marker):].rstrip("\n") if position >= 0 else text


def error_in_chain(error: BaseException, wanted: Callable[[BaseException], bool]) -> BaseException | None:
    """The first error ``wanted`` accepts: ``error`` itself, one it was raised from or while
    handling, or a compiler error's ``inner_exception`` (torch._dynamo keeps the original there)."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if wanted(current):
            return current
        pending += [current.__cause__, current.__context__, getattr(current, "inner_exception", None)]
    return None
