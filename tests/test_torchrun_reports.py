"""Who says what under torchrun (engine/torchrun_reports.py), against a real TCP store in this
process, each rank's torchrun environment set by hand as torchrun's agent sets it."""

from __future__ import annotations

import datetime
import socket

import pytest
import torch.distributed as dist

from zipfls_train.engine import torchrun_reports
from zipfls_train.engine.torchrun_reports import first_on_its_node_to_lose_a_peer, first_on_its_node_to_say


@pytest.fixture()
def store(monkeypatch):
    """A TCP store (as torchrun's agent hosts one) and the environment of rank 0 on node "a"."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=10))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("WORLD_SIZE", "4")
    as_rank(monkeypatch, rank=0, node="a", attempt=0)
    return server


def as_rank(monkeypatch, rank: int, node: str, attempt: int) -> None:
    """Rank ``rank`` (two per node) of the agent of ``node`` (its own folder) in its ``attempt``."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank % 2))
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", f"/tmp/torchelastic_{node}/run_{node}/attempt_{attempt}/{rank % 2}/error.json")


def test_an_error_is_said_once_per_node_and_attempt_and_a_different_one_too(store, monkeypatch):
    assert first_on_its_node_to_say("dataset.root='/data': no such folder")
    as_rank(monkeypatch, rank=1, node="a", attempt=0)
    assert not first_on_its_node_to_say("dataset.root='/data': no such folder")  # the same error on the same node
    assert first_on_its_node_to_say("a corrupt image: /data/train/x.jpg")  # this rank's own
    as_rank(monkeypatch, rank=2, node="b", attempt=0)
    assert first_on_its_node_to_say("dataset.root='/data': no such folder")  # the other node's output says it too
    as_rank(monkeypatch, rank=0, node="a", attempt=1)
    assert first_on_its_node_to_say("dataset.root='/data': no such folder")  # node a's next attempt


def test_a_lost_peer_is_said_once_per_node_and_not_where_a_rank_said_its_error(store, monkeypatch):
    assert first_on_its_node_to_lose_a_peer()
    as_rank(monkeypatch, rank=1, node="a", attempt=0)
    assert not first_on_its_node_to_lose_a_peer()
    as_rank(monkeypatch, rank=2, node="b", attempt=0)
    assert first_on_its_node_to_say("out of memory")
    as_rank(monkeypatch, rank=3, node="b", attempt=0)
    assert not first_on_its_node_to_lose_a_peer()  # the peer it lost said why, on this node


def test_without_torchrun_or_without_its_store_every_process_speaks(store, monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    monkeypatch.setenv("MASTER_PORT", str(closed))  # the store's host ended
    monkeypatch.setattr(torchrun_reports, "STORE_TIMEOUT_S", 0.2)
    assert first_on_its_node_to_say("x") and first_on_its_node_to_say("x")
    assert first_on_its_node_to_lose_a_peer() and first_on_its_node_to_lose_a_peer()
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    monkeypatch.delenv("RANK")  # not under torchrun
    assert first_on_its_node_to_say("y") and first_on_its_node_to_say("y")
