"""A lost rank or node ends the job in about a minute, not after the collective timeout.

A rank that dies cleanly closes its sockets and its peers' collectives fail at once; a node that
freezes or drops off the network does not: NCCL (and gloo) wait in the collective until the group
timeout, 10 minutes or more, before anything notices. `PeerWatchdog` runs a thread on every rank
that bumps the rank's counter in the rendezvous TCPStore every `interval_s` and reads every other
rank's; a peer whose counter stands still for `timeout_s` (or a store that cannot be reached for
that long: the node hosting it, node 0, is gone) makes the rank print which ranks and hosts were
lost, write the lost-peer file ($REVISUAL_PEER_LOST_FILE, which slurm/train.sbatch reads to requeue
the job) and exit with EXIT_PEER_LOST. A rank that ends normally leaves first (its `left` key), so
a peer finishing later never counts it as lost.

The thread needs only the GIL now and then, which collectives and kernels release while they
wait; a frozen process (SIGSTOP, a hung driver call holding the GIL) stops its counter too, which
is the point.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

EXIT_PEER_LOST = 76
LOST_FILE_ENV = "REVISUAL_PEER_LOST_FILE"
_PREFIX = "revisual/liveness"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class PeerLost(RuntimeError):
    """Ranks whose heartbeat stopped, or the store that carries the heartbeats."""

    def __init__(self, message: str, ranks: list[int], hosts: list[str]):
        super().__init__(message)
        self.ranks, self.hosts = ranks, hosts


class PeerWatchdog:
    def __init__(self, store: Any, rank: int, world_size: int, *, timeout_s: float = 60.0,
                 interval_s: float = 5.0, where: str = "the rendezvous store",
                 on_lost: Callable[[PeerLost], None] | None = None):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.timeout_s, self.interval_s, self.where = timeout_s, interval_s, where
        self.on_lost = on_lost or exit_on_lost
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _key(self, kind: str, rank: int) -> str:
        return f"{_PREFIX}/{kind}/{rank}"

    def start(self) -> PeerWatchdog:
        self.store.set(self._key("host", self.rank), socket.gethostname())
        self.store.add(self._key("beat", self.rank), 1)
        self._thread = threading.Thread(target=self._run, name="revisual-peer-watchdog", daemon=True)
        self._thread.start()
        return self

    def leave(self) -> None:
        """This rank ends normally: its peers stop watching it, and it stops watching them."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval_s)
        try:
            self.store.set(self._key("left", self.rank), "1")
        except Exception:  # the store's host may already have finished
            pass

    def _host(self, rank: int) -> str:
        try:
            if self.store.check([self._key("host", rank)]):
                return self.store.get(self._key("host", rank)).decode()
        except Exception:
            pass
        return "?"

    def check_once(self, seen: dict[int, tuple[int, float]], now: float) -> PeerLost | None:
        """One beat and one look at the peers; `seen` maps a peer to (its last count, when it
        changed). Returns the loss to report, or None."""
        self.store.add(self._key("beat", self.rank), 1)
        lost = []
        for peer in range(self.world_size):
            if peer == self.rank:
                continue
            count = self.store.add(self._key("beat", peer), 0)
            last = seen.get(peer)
            if last is None or count != last[0]:
                seen[peer] = (count, now)
            elif now - last[1] > self.timeout_s and not self.store.check([self._key("left", peer)]):
                lost.append(peer)
        if not lost:
            return None
        hosts = sorted({self._host(r) for r in lost})
        return PeerLost(f"rank {self.rank} ({socket.gethostname()}): lost rank(s) {lost} on host(s) "
                        f"{', '.join(hosts)}: no heartbeat for {self.timeout_s:.0f} s", lost, hosts)

    def _run(self) -> None:
        seen: dict[int, tuple[int, float]] = {}
        unreachable_since: float | None = None
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            try:
                lost = self.check_once(seen, now)
                unreachable_since = None
            except Exception as e:  # the store's host (node 0's agent) is gone or cut off
                unreachable_since = unreachable_since or now
                if now - unreachable_since <= self.timeout_s:
                    continue
                lost = PeerLost(f"rank {self.rank} ({socket.gethostname()}): lost {self.where} "
                                f"(node 0) for {self.timeout_s:.0f} s: {type(e).__name__}: {e}", [0], ["?"])
            if lost is not None and not self._stop.is_set():
                self.on_lost(lost)
                return


def exit_on_lost(lost: PeerLost) -> None:
    """Say who was lost on the job's console, leave the lost-peer file, exit EXIT_PEER_LOST."""
    from megatron_revisual.logfiles import console

    message = f"revisual train: {lost}; exiting {EXIT_PEER_LOST} (the job requeues and resumes)"
    print(message, file=console(), flush=True)
    print(message, file=sys.stderr, flush=True)
    path = os.environ.get(LOST_FILE_ENV)
    if path:
        _write_atomic(Path(path), json.dumps({"message": str(lost), "ranks": lost.ranks, "hosts": lost.hosts,
                                              "time": time.time()}) + "\n")
    os._exit(EXIT_PEER_LOST)


def start_peer_watchdog(timeout_s: float, interval_s: float | None = None) -> PeerWatchdog | None:
    """The watchdog for this torch.distributed rank, on its own client of the rendezvous store
    (MASTER_ADDR:MASTER_PORT); None when timeout_s is 0 or the world has one rank."""
    import torch.distributed as dist

    if timeout_s <= 0 or dist.get_world_size() == 1:
        return None
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(addr, port, is_master=False, timeout=timedelta(seconds=max(30.0, timeout_s)))
    interval = interval_s if interval_s is not None else min(5.0, timeout_s / 6)
    return PeerWatchdog(store, dist.get_rank(), dist.get_world_size(), timeout_s=timeout_s, interval_s=interval,
                        where=f"the rendezvous store at {addr}:{port}").start()
