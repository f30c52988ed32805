"""Who says what when a run under torchrun stops: its ranks count what they said in torchrun's TCP
store (its agent's, on the first node: ``MASTER_ADDR:MASTER_PORT``), so that an error is said once
per node by a rank that met it, and the failed rank's error reaches torchrun's failure report.

Outside torchrun every process speaks for itself. An unreachable store is never a reason to fail or
wait: the error is then said (twice, it may be, never not at all).
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from .distributed import launched_by_torchrun

# How long a rank tries to reach the store before it speaks for itself.
STORE_TIMEOUT_S = 5.0


def first_on_its_node_to_say(error_message: str) -> bool:
    """Whether this process prints ``error_message``, a user error: every process, but under
    torchrun only the first of each node's ranks to raise this same error. A node's ranks often fail
    alike (a config value, the node's data): one line, not one per rank; a rank's own error (a
    corrupt image in its shard) is said, by that rank."""
    digest = hashlib.sha256(error_message.encode()).hexdigest()[:16]

    def first_to_say(store: dist.TCPStore) -> bool:
        store.add(_node_key("errors"), 1)
        return store.add(_node_key(digest), 1) == 1

    return _counted_on_the_node(first_to_say)


def first_on_its_node_to_lose_a_peer() -> bool:
    """Whether this process says it stopped because another rank's process ended: under torchrun
    the node's first rank to lose one, where none of the node's ranks said an error (the peer was
    one of them: its error is there already); every process otherwise."""
    return _counted_on_the_node(lambda store: store.add(_node_key("errors"), 0) == 0 and store.add(_node_key("lost_a_peer"), 1) == 1)


def _node_key(name: str) -> str:
    """A key of this node's torchrun agent and attempt. The agent's own folder for the attempt (the
    ranks' error files are in it) names both: a random folder per agent, ``attempt_<k>`` per
    restart. Not the node's GROUP_RANK and TORCHELASTIC_RESTART_COUNT: after a restart a node may
    get another node's rank, and a node restarted because another failed keeps its count, so a
    later attempt could find an earlier one's keys."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        attempt = str(Path(error_file).parents[1])
    else:
        attempt = "/".join(os.environ.get(variable, "") for variable in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "GROUP_RANK"))
    return f"zipfls_train/{hashlib.sha256(attempt.encode()).hexdigest()[:16]}/{name}"


def _counted_on_the_node(first: Callable[[dist.TCPStore], bool]) -> bool:
    if not launched_by_torchrun():
        return True
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=STORE_TIMEOUT_S))  # fmt: skip
        return first(store)
    except Exception:  # noqa: BLE001 - no store (its host ended, a launcher without one): say it
        return True


def tell_torchrun(error: BaseException) -> None:
    """Under torchrun: ``error`` into the file its agent reads a failed process's error from
    (TORCHELASTIC_ERROR_FILE), so its failure report shows this rank's message (and traceback) rather
    than "error_file: <N/A>"; the first rank to fail is its "Root Cause". Called in the ``except``
    block that handles ``error``."""
    if launched_by_torchrun() and os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(error)
