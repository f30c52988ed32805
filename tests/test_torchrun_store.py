"""What torchrun's ranks tell each other through its TCP store (engine/torchrun_store.py), against a
real store in this process, each rank's torchrun environment set by hand."""

from __future__ import annotations

import datetime
import socket

import pytest
import torch.distributed as dist

from zipfls_train.engine import torchrun_store
from zipfls_train.engine.torchrun_store import (
    AnotherRankStopped, first_on_its_node_to_lose_a_peer, first_on_its_node_to_say, others_told_if_this_rank_stops,
    wait_for_every_rank,
)


@pytest.fixture()
def store(monkeypatch):
    """A TCP store (as torchrun's agent hosts one) and the environment of rank 0 on node 0."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=10))
    as_rank(monkeypatch, rank=0, node=0)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test-run")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    return server


def as_rank(monkeypatch, rank: int, node: int) -> None:
    for variable, value in (("RANK", rank), ("LOCAL_RANK", rank), ("GROUP_RANK", node)):
        monkeypatch.setenv(variable, str(value))


def test_an_error_is_said_once_per_node_and_a_different_one_too(store, monkeypatch):
    assert first_on_its_node_to_say("dataset.root='/data': no such folder")
    as_rank(monkeypatch, rank=1, node=0)
    assert not first_on_its_node_to_say("dataset.root='/data': no such folder")  # the same error on the same node
    assert first_on_its_node_to_say("a corrupt image: /data/train/x.jpg")  # this rank's own
    as_rank(monkeypatch, rank=2, node=1)
    assert first_on_its_node_to_say("dataset.root='/data': no such folder")  # another node's output says it too
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    as_rank(monkeypatch, rank=0, node=0)
    assert first_on_its_node_to_say("dataset.root='/data': no such folder")  # torchrun's next attempt


def test_a_lost_peer_is_said_once_per_node_and_not_where_a_rank_said_its_error(store, monkeypatch):
    assert first_on_its_node_to_lose_a_peer()
    as_rank(monkeypatch, rank=1, node=0)
    assert not first_on_its_node_to_lose_a_peer()
    as_rank(monkeypatch, rank=2, node=1)
    assert first_on_its_node_to_say("out of memory")
    as_rank(monkeypatch, rank=3, node=1)
    assert not first_on_its_node_to_lose_a_peer()  # the peer it lost said why, on this node


def test_without_torchrun_or_without_its_store_every_process_speaks_and_nobody_waits(store, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", str(_closed_port()))  # the store's host ended
    monkeypatch.setattr(torchrun_store, "STORE_TIMEOUT_S", 0.2)
    assert first_on_its_node_to_say("x") and first_on_its_node_to_say("x")
    assert first_on_its_node_to_lose_a_peer() and first_on_its_node_to_lose_a_peer()
    wait_for_every_rank(2, "model built")  # returns (the collective after it fails, or waits, as it would have)
    monkeypatch.delenv("RANK")
    assert first_on_its_node_to_say("x") and first_on_its_node_to_lose_a_peer()


def test_ranks_wait_for_each_other_and_stop_at_once_when_one_on_another_node_stopped(store, monkeypatch):
    as_rank(monkeypatch, rank=1, node=1)
    with pytest.raises(FileNotFoundError), others_told_if_this_rank_stops(lambda error: f"said: {error}"):
        raise FileNotFoundError("no /data on this node")
    as_rank(monkeypatch, rank=2, node=1)
    with pytest.raises(ValueError), others_told_if_this_rank_stops(str):
        raise ValueError("a later failure")  # the first rank's to stop is kept
    as_rank(monkeypatch, rank=0, node=0)
    with pytest.raises(AnotherRankStopped) as stopped:
        wait_for_every_rank(4, "model built")
    assert str(stopped.value) == f"rank 1 (node 1, {socket.gethostname()}) stopped before training started: said: no /data on this node"


def test_a_rank_stopped_on_this_node_is_left_to_torchrun_for_a_while(store, monkeypatch):
    with pytest.raises(RuntimeError), others_told_if_this_rank_stops(str):
        raise RuntimeError("CUDA error: an illegal memory access")
    as_rank(monkeypatch, rank=1, node=0)
    monkeypatch.setattr(torchrun_store, "SAME_NODE_GRACE_S", 0.3)  # torchrun's agent stops this rank meanwhile
    with pytest.raises(AnotherRankStopped, match=r"^rank 0 of this node stopped before training started: CUDA error"):
        wait_for_every_rank(2, "model built")


def test_a_rank_that_lost_a_peer_or_was_interrupted_records_nothing(store, monkeypatch):
    for error in (RuntimeError("Connection closed by peer [127.0.0.1]:1234"), KeyboardInterrupt()):
        with pytest.raises(type(error)), others_told_if_this_rank_stops(str):
            raise error
    assert not store.check([torchrun_store._attempt_key("stopped")])


def test_every_rank_set_up_lets_each_go_on(store, monkeypatch):
    store.add(torchrun_store._attempt_key("arrived", "model built"), 1)  # rank 1 got there first
    wait_for_every_rank(2, "model built")
    assert store.add(torchrun_store._attempt_key("arrived", "model built"), 0) == 2
    store.add(torchrun_store._attempt_key("arrived", "weights read"), 1)  # each place counts its own arrivals
    wait_for_every_rank(2, "weights read")


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
