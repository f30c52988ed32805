"""The files of a run folder that tools read without training: the epoch records of
``metrics.jsonl``, and setting aside an earlier attempt's results. No torch import here: the table
builder (``zipfls_train.tables``) reads run folders through this module and must start fast."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any


class RunFolderNotWritable(OSError):
    """The run folder cannot be created or written (the message names it and how to pick another)."""


def not_writable(run_dir: Path, error: OSError) -> RunFolderNotWritable:
    return RunFolderNotWritable(
        f"cannot write the run folder {run_dir} ({error.strerror or error}): give a writable "
        "one with hydra.run.dir=... (hydra.sweep.dir=... for a sweep)"
    )


class MetricsFileError(ValueError):
    """A metrics.jsonl line before the last is not an epoch record: the file is damaged."""


def parse_metrics(path: Path) -> list[dict[str, Any]]:
    """The epoch records of a metrics.jsonl, in file order. A malformed *last* line is a write cut
    short by a kill: dropped, with a warning. A malformed line before it is damage:
    :class:`MetricsFileError` naming the file and line."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            record["epoch"] = int(record["epoch"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            if number == len(lines):
                warnings.warn(f"{path}:{number}: ignoring a truncated last line", stacklevel=2)
                break
            raise MetricsFileError(f"{path}:{number}: not a JSON object with an 'epoch' ({error})") from error
        records.append(record)
    return records


# What a run writes into its folder. config.yaml and environment.jsonl alone (an attempt that
# stopped before training) are simply rewritten; anything else is an earlier attempt's results.
RUN_SETUP = ("config.yaml", "environment.jsonl")
RUN_OUTPUTS = (*RUN_SETUP, "metrics.jsonl", "summary.json", "zipf_fit.png", "checkpoints", "tb")
EARLIER_ATTEMPT_PREFIX = "earlier_attempt_"


def set_aside_earlier_attempt(run_dir: Path) -> Path | None:
    """A run that starts from step 0 where an earlier attempt left results (trainer.resume=never, or
    an attempt that died before its first checkpoint) moves them all into ``earlier_attempt_<k>/``
    and returns that folder. Nothing is deleted, and the new run's files never sit beside the old
    ones: a restart that fails before its first checkpoint cannot leave the old run's last.pt or
    summary.json looking like its own. TensorBoard shows the old events as a run of their own; the
    table builder skips these folders."""
    present = [run_dir / name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if all(path.name in RUN_SETUP for path in present):
        return None
    suffixes = [path.name.removeprefix(EARLIER_ATTEMPT_PREFIX) for path in run_dir.glob(f"{EARLIER_ATTEMPT_PREFIX}*")]
    target = run_dir / f"{EARLIER_ATTEMPT_PREFIX}{max((int(n) for n in suffixes if n.isdigit()), default=0) + 1}"
    target.mkdir()
    for path in present:
        os.replace(path, target / path.name)
    return target
