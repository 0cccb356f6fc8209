"""The in-memory transport: many nodes in one process.

Frames are handed over synchronously on the sender's thread, or after an
injected latency on the network's timer thread. Loss is injected with a
seeded random generator so a failing test can be replayed.
"""

from __future__ import annotations

import random
import threading
from collections import defaultdict

from dms.actor.codes import Unreachable
from dms.actor.timers import Timers
from dms.actor.transport import Receiver, Undeliverable


class MemoryNetwork:
    """The shared medium: who is attached and who listens to which topic."""

    def __init__(self, latency_s: float = 0.0, loss: float = 0.0, seed: int = 0) -> None:
        if not 0.0 <= loss < 1.0:
            raise ValueError("loss must be in [0, 1)")
        self.latency_s = latency_s
        self.loss = loss
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._receivers: dict[str, Receiver] = {}
        self._topics: dict[str, set[str]] = defaultdict(set)
        self._timers: Timers | None = Timers("dms-memnet") if latency_s > 0 else None
        self.frames_sent = 0
        self.frames_dropped = 0

    def transport(self, peer_id: str) -> MemoryTransport:
        return MemoryTransport(self, peer_id)

    def close(self) -> None:
        if self._timers is not None:
            self._timers.stop()

    def _attach(self, peer_id: str, receiver: Receiver) -> None:
        with self._lock:
            self._receivers[peer_id] = receiver

    def _detach(self, peer_id: str) -> None:
        with self._lock:
            self._receivers.pop(peer_id, None)
            for members in self._topics.values():
                members.discard(peer_id)

    def _deliver(self, src: str, dst: str, frame: bytes, *, required: bool) -> None:
        # No shared lock per frame: with hundreds of nodes sending, it became a convoy
        # (a contended acquire waits out a GIL switch, ~5 ms, per receiver of a
        # broadcast). A dict read is atomic; frames_sent may miss a concurrent increment.
        receiver = self._receivers.get(dst)
        self.frames_sent += 1
        lost = False
        if self.loss > 0:
            with self._lock:  # the seeded draws stay in one order
                lost = self._rng.random() < self.loss
                if lost:
                    self.frames_dropped += 1
        if receiver is None:
            if required:
                raise Unreachable(f"peer {dst} is not reachable")
            return
        if lost:
            return
        if self._timers is not None:
            self._timers.call_later(self.latency_s, lambda: receiver(frame, src))
        else:
            receiver(frame, src)

    def _publish(self, src: str, topic: str, frame: bytes) -> None:
        with self._lock:
            members = [p for p in self._topics.get(topic, ()) if p != src]
        for peer in members:
            self._deliver(src, peer, frame, required=False)


class MemoryTransport:
    def __init__(self, network: MemoryNetwork, peer_id: str) -> None:
        self._network = network
        self._peer_id = peer_id

    @property
    def peer_id(self) -> str:
        return self._peer_id

    def start(self, receiver: Receiver, undeliverable: Undeliverable | None = None) -> None:
        self._network._attach(self._peer_id, receiver)

    def send(self, peer_id: str, frame: bytes) -> None:
        self._network._deliver(self._peer_id, peer_id, frame, required=True)

    def publish(self, topic: str, frame: bytes) -> None:
        self._network._publish(self._peer_id, topic, frame)

    def subscribe(self, topic: str) -> None:
        with self._network._lock:
            self._network._topics[topic].add(self._peer_id)

    def unsubscribe(self, topic: str) -> None:
        with self._network._lock:
            self._network._topics[topic].discard(self._peer_id)

    def stop(self) -> None:
        self._network._detach(self._peer_id)
