"""Which rank was lost when a multi-process job fails in a collective.

A collective that fails because a peer died says only that a connection broke ("Connection reset by peer
[10.0.0.7]:21933") or that it timed out. Every rank therefore bumps its own counter in the job's rendezvous
store (the TCPStore that torchrun and `accelerate launch` host on the first node, MASTER_ADDR:MASTER_PORT)
from a daemon thread, once a second. When a collective fails, `Heartbeat.lost()` watches the counters for a
few seconds: the ranks whose counters stopped are the lost ones, named with their node and host. A store that
no longer answers means the first node itself (which hosts it, and rank 0) is gone.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from datetime import timedelta

import torch.distributed as dist

INTERVAL = 1.0  # seconds between beats
WATCH = 4.0  # seconds a counter must stand still to count as lost (beats are a few ms of work; 4 missed is dead)


class Heartbeat:
    """Started once per rank after the process group exists; `close()` stops the thread."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.reporter = False  # set by `lost`: whether this rank reports the loss
        self.address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        self.node = os.environ.get("GROUP_RANK", "?")  # torchrun's node rank (accelerate launch sets it too)
        self._stop = threading.Event()
        store = self._store()
        store.set(f"distill/where/{rank}", f"node {self.node}, host {socket.gethostname()}")
        self._thread = threading.Thread(target=self._beat, args=(store,), name="distill-heartbeat", daemon=True)
        self._thread.start()

    @staticmethod
    def start(rank: int, world: int) -> Heartbeat | None:
        """A heartbeat for a multi-process job launched with a rendezvous store; None otherwise."""
        if world < 2 or not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
            return None
        try:
            return Heartbeat(rank, world)
        except RuntimeError:  # no store at MASTER_ADDR:MASTER_PORT (a launcher without one): train without names
            return None

    def _store(self) -> dist.TCPStore:
        host, port = self.address.rsplit(":", 1)
        return dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=10), wait_for_workers=False)

    def _beat(self, store: dist.TCPStore) -> None:
        while not self._stop.wait(INTERVAL):
            try:
                store.add(f"distill/beat/{self.rank}", 1)
            except Exception:  # the store is gone (its node died): nothing left to report to
                return

    def lost(self) -> str | None:
        """After a failed collective: who is gone, in words ("rank 1 (node 1, host gpu07)"), or None if every
        rank is still beating (the failure was something else). `reporter` then says whether this rank is the one
        to say so: the lowest rank still beating (every survivor, when the store itself is gone)."""
        try:
            store = self._store()
            before = [store.add(f"distill/beat/{r}", 0) for r in range(self.world)]
            time.sleep(WATCH)
            after = [store.add(f"distill/beat/{r}", 0) for r in range(self.world)]
            stopped = [r for r in range(self.world) if r != self.rank and after[r] == before[r]]
            where = {r: store.get(f"distill/where/{r}").decode() for r in stopped}
        except Exception:  # no answer from the store: the first node, which hosts it, is gone
            self.reporter = True
            return f"the rendezvous store at {self.address} (hosted by node 0, with rank 0) no longer answers"
        if not stopped:
            return None
        self.reporter = self.rank == min(r for r in range(self.world) if r not in stopped)
        return ", ".join(f"rank {r} ({where[r]})" for r in stopped)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * INTERVAL)  # gone before the process group it reports on is destroyed
