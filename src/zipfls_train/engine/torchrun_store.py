"""What the ranks of a torchrun launch tell each other through its TCP store (its agent's, on the
first node; ``MASTER_ADDR:MASTER_PORT``), so that one rank's failure is said once and reaches the
ranks of every node.

- Which rank prints an error: the first of its node to raise that same error
  (:func:`first_on_its_node_to_say`), and a rank that only lost a peer says so once per node
  (:func:`first_on_its_node_to_lose_a_peer`).
- A rank that stops before training starts (its node lacks the data or model.init_from, say)
  records why (:func:`others_told_if_this_rank_stops`); the ranks wait for each other where their
  set-up could fail on one rank alone, before a collective (:func:`wait_for_every_rank`), and stop
  at once with that message, where they would otherwise wait in the collective for a rank that is
  gone: with NCCL until its timeout (10 minutes).

Keys are per launch, restart and (where said so) node. Outside torchrun every function is a no-op
that lets the process speak for itself. An unreachable store is never a reason to fail: the error is
then said (twice, it may be, never not at all) and nobody waits.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from .distributed import launched_by_torchrun, lost_a_peer

T = TypeVar("T")
# How often a rank waiting for the others looks at the store, and how long it waits for its own
# node's torchrun agent to stop it once a rank of its node stopped (see wait_for_every_rank).
POLL_S = 0.1
SAME_NODE_GRACE_S = 30.0
# How long a rank tries to reach the store before it speaks for itself.
STORE_TIMEOUT_S = 5.0


class AnotherRankStopped(RuntimeError):
    """Another rank stopped while the ranks set up, before their first collective; the message says
    which rank, where, and why."""


def _attempt_key(*parts: str) -> str:
    attempt = [os.environ.get(variable, "") for variable in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")]
    return "/".join(["zipfls_train", *attempt, *parts])


def _node() -> str:
    return os.environ.get("GROUP_RANK", "0")


def _with_store(use: Callable[[dist.TCPStore], T], otherwise: T) -> T:
    """``use(store)``, or ``otherwise`` outside torchrun or when the store cannot be reached."""
    if not launched_by_torchrun():
        return otherwise
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=STORE_TIMEOUT_S))  # fmt: skip
        return use(store)
    except AnotherRankStopped:
        raise
    except Exception:  # noqa: BLE001 - no store (its host ended, a launcher without one)
        return otherwise


def first_on_its_node_to_say(error_message: str) -> bool:
    """Whether this process prints ``error_message``, a user error: every process, but under
    torchrun only the first of each node's ranks to raise this same error. A node's ranks often fail
    alike (a config value, the node's data): one line, not one per rank; a rank's own error (a
    corrupt image in its shard) is said, by that rank."""
    digest = hashlib.sha256(error_message.encode()).hexdigest()[:16]

    def first_to_say(store: dist.TCPStore) -> bool:
        store.add(_attempt_key(_node(), "errors"), 1)
        return store.add(_attempt_key(_node(), digest), 1) == 1

    return _with_store(first_to_say, otherwise=True)


def first_on_its_node_to_lose_a_peer() -> bool:
    """Whether this process says it stopped because another rank's process ended: under torchrun
    the node's first rank to lose one, where none of the node's ranks said an error (the peer was
    one of them: its error is there already); every process otherwise."""
    return _with_store(
        lambda store: store.add(_attempt_key(_node(), "errors"), 0) == 0 and store.add(_attempt_key(_node(), "lost_a_peer"), 1) == 1,
        otherwise=True,
    )


@contextlib.contextmanager
def others_told_if_this_rank_stops(describe: Callable[[BaseException], str]) -> Iterator[None]:
    """Under torchrun: an exception that ends this rank's run (``describe``: its message) is
    recorded for the ranks waiting in :func:`wait_for_every_rank`, the first rank's to stop only.
    Not a lost peer (that rank says why itself), nor Ctrl-C or SIGTERM (every rank gets them)."""
    try:
        yield
    except (AnotherRankStopped, KeyboardInterrupt):
        raise
    except Exception as error:
        if launched_by_torchrun() and not lost_a_peer(error):
            stopped = json.dumps({"rank": os.environ["RANK"], "node": _node(), "host": socket.gethostname(), "message": describe(error)})
            _with_store(lambda store: store.compare_set(_attempt_key("stopped"), "", stopped), otherwise=None)
        raise


def wait_for_every_rank(world_size: int, stage: str) -> None:
    """Under torchrun, before a collective of the ranks' set-up (``stage`` names the place): return
    once all ``world_size`` ranks got here, or raise :class:`AnotherRankStopped` once a rank on
    another node recorded that it stopped.
    One on this node is left to torchrun, whose agent stops this rank too when it sees that one end
    (its failure report naming the rank that failed first): this rank keeps waiting, for at most
    ``SAME_NODE_GRACE_S``. After the process group's timeout it returns, as if all had come (the
    collective then fails as it would have)."""
    if world_size == 1:
        return

    def wait(store: dist.TCPStore) -> None:
        arrived, stopped = _attempt_key("arrived", stage), _attempt_key("stopped")
        store.add(arrived, 1)
        deadline, same_node_since = time.monotonic() + default_pg_timeout.total_seconds(), None
        while time.monotonic() < deadline:
            if store.check([stopped]):
                record = json.loads(store.get(stopped))
                if record["node"] != _node():
                    raise AnotherRankStopped(
                        f"rank {record['rank']} (node {record['node']}, {record['host']}) stopped before training started: {record['message']}"
                    )
                same_node_since = same_node_since or time.monotonic()
                if time.monotonic() - same_node_since > SAME_NODE_GRACE_S:
                    raise AnotherRankStopped(f"rank {record['rank']} of this node stopped before training started: {record['message']}")
            elif store.add(arrived, 0) >= world_size:
                return
            time.sleep(POLL_S)

    _with_store(wait, otherwise=None)


def tell_torchrun(error: BaseException) -> None:
    """Under torchrun: ``error`` into the file its agent reads a failed process's error from
    (TORCHELASTIC_ERROR_FILE), so its failure report shows this rank's message (and traceback) rather
    than "error_file: <N/A>"; the first rank to fail is its "Root Cause". Called in the ``except``
    block that handles ``error``."""
    if launched_by_torchrun() and os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(error)
