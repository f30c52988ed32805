"""The errors a user can cause (as opposed to bugs): train.py prints their message alone, without a
traceback, since each one already names the key, file or value and what was expected."""

from __future__ import annotations


def user_errors() -> tuple[type[BaseException], ...]:
    from .data.images import DatasetError
    from .engine.checkpoint import CheckpointError
    from .engine.config_checks import ConfigError
    from .engine.trainer import NonFiniteLossError, ResumeError

    return (ConfigError, DatasetError, CheckpointError, ResumeError, NonFiniteLossError)
