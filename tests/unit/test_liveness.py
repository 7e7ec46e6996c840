"""parallel/liveness.py with a real TCPStore in this process: a peer whose heartbeat stops is
named within the timeout, a peer that left is not, and a store that goes away is."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from megatron_revisual.parallel.liveness import PeerLost, PeerWatchdog


def _store(port: int = 0) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=5))


def _client(master: dist.TCPStore) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", master.port, is_master=False, timeout=timedelta(seconds=2))


def _watchdogs(master, world, got, timeout=1.0):
    return [PeerWatchdog(_client(master), r, world, timeout_s=timeout, interval_s=0.1,
                         on_lost=lambda lost, r=r: got.setdefault(r, (lost, time.monotonic())))
            for r in range(world)]


def _wait(pred, seconds):
    deadline = time.monotonic() + seconds
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.05)
    return pred()


def test_a_frozen_peer_is_named_after_the_timeout():
    master, got = _store(), {}
    dogs = [d.start() for d in _watchdogs(master, 3, got)]
    time.sleep(0.5)
    assert got == {}  # beating peers are not lost
    frozen_at = time.monotonic()
    dogs[2]._stop.set()  # rank 2 freezes: its thread stops without leaving
    assert _wait(lambda: 0 in got and 1 in got, 5)
    for rank in (0, 1):
        lost, when = got[rank]
        assert lost.ranks == [2] and lost.hosts and "?" not in lost.hosts
        assert f"rank {rank} " in str(lost) and "lost rank(s) [2]" in str(lost) and "no heartbeat for 1 s" in str(lost)
        assert 0.8 <= when - frozen_at <= 2.5  # the timeout, less a beat or two of phase
    assert 2 not in got


def test_a_peer_that_left_is_not_lost():
    master, got = _store(), {}
    dogs = [d.start() for d in _watchdogs(master, 2, got)]
    dogs[1].leave()
    time.sleep(1.8)
    assert got == {}
    dogs[0].leave()


def test_a_lost_store_is_named():
    master, got = _store(), {}
    dog = PeerWatchdog(_client(master), 1, 2, timeout_s=0.5, interval_s=0.1, where="the store at test",
                       on_lost=lambda lost: got.setdefault(1, lost))
    dog.start()
    del master  # the store's host (node 0's agent) goes away
    assert _wait(lambda: 1 in got, 8)
    assert isinstance(got[1], PeerLost) and "lost the store at test (node 0) for 0 s" in str(got[1])


def test_the_timeout_is_validated():
    from megatron_revisual.config import ConfigValidationError, load_config

    with pytest.raises(ConfigValidationError, match=r"cluster.peer_timeout_s=-1"):
        load_config("configs/qwen25_vl_7b_8xh100.yaml", ["cluster.peer_timeout_s=-1"])
