"""Faults between simulated nodes: partitions, latency, loss and bandwidth, per peer pair.

A :class:`FaultPlan` says, for a frame from peer A arriving at peer B, whether it
is dropped (A and B are on different sides of a partition, or the link's loss
says so) and how late it arrives (the link's latency, plus the time its bytes
take at the link's bandwidth behind what the link already carries). It is
applied where frames *arrive*, by :class:`FaultyTransport`, a wrapper of any
``dms.actor`` transport (libp2p or in-memory): the sender's write succeeds and
the frame is lost or late on the way, as on a real network, and no transport's
internals change. Gossip is judged by its publisher, so a partition also holds
for gossip relayed by a third node. Chunks pulled on their own stream
(``dms.network.transfer``) pass through the same plan: a fetch across a
partition fails, and a fetch over a slow link waits for its bytes.

In one process (``threads`` and ``memory`` modes) every node's wrapper shares one
plan. Across processes each ``dms run`` keeps a copy read from a file
(``dms run --faults FILE``, hidden) that the simulation rewrites on every change;
the copy notices within ``WATCH_S``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dms.actor.codes import Unreachable
from dms.actor.timers import Timers
from dms.actor.transport import Receiver, Transport, Undeliverable
from dms.network.loop import NetworkError

log = logging.getLogger("dms.sim")

WATCH_S = 0.1  # how often a node in its own process looks at the faults file


@dataclass(frozen=True)
class LinkRule:
    """Conditions on every frame between a peer of ``a`` and a peer of ``b``, both ways.
    ``bandwidth_bps`` is per pair of peers: each pair's link has that rate."""

    a: frozenset[str]
    b: frozenset[str]
    latency_s: float = 0.0
    loss: float = 0.0
    bandwidth_bps: float | None = None

    def covers(self, src: str, dst: str) -> bool:
        return (src in self.a and dst in self.b) or (src in self.b and dst in self.a)

    def as_dict(self) -> dict[str, Any]:
        return {
            "a": sorted(self.a),
            "b": sorted(self.b),
            "latency_s": self.latency_s,
            "loss": self.loss,
            "bandwidth_bps": self.bandwidth_bps,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LinkRule:
        return cls(
            frozenset(data["a"]),
            frozenset(data["b"]),
            float(data.get("latency_s", 0.0)),
            float(data.get("loss", 0.0)),
            data.get("bandwidth_bps"),
        )


@dataclass(frozen=True)
class Verdict:
    drop: str | None = None  # "partition" or "loss"
    delay_s: float = 0.0


PASS = Verdict()


class FaultPlan:
    """The faults in force, by peer id; every method may be called from any thread."""

    def __init__(self, seed: int = 0) -> None:
        self._lock = threading.Lock()
        self._sides: dict[str, int] = {}
        self._links: list[LinkRule] = []
        self._busy: dict[tuple[str, str], float] = {}  # a pair's link is busy until
        self._rng = random.Random(seed)
        self._timers: Timers | None = None
        self._watcher: threading.Thread | None = None
        self._closed = threading.Event()
        self._listeners: list[Callable[[], None]] = []
        self.dropped: Counter[str] = Counter()
        self.delayed = 0

    # ---- changing the plan ---------------------------------------------------------

    def partition(self, sides: Iterable[Iterable[str]]) -> None:
        """Peers on different sides cannot reach each other; a peer on no side reaches
        everyone. Replaces the partition in force."""
        with self._lock:
            self._sides = {peer: i for i, side in enumerate(sides) for peer in side}
        self._changed()

    def link(self, rule: LinkRule) -> None:
        """Add conditions between two sets of peers (replacing those for the same sets)."""
        with self._lock:
            self._links = [r for r in self._links if {r.a, r.b} != {rule.a, rule.b}] + [rule]
        self._changed()

    def heal(self) -> None:
        """No partition and no link conditions any more."""
        with self._lock:
            self._sides, self._links = {}, []
            self._busy.clear()
        self._changed()

    @property
    def active(self) -> bool:
        return bool(self._sides or self._links)

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    # ---- judging frames ------------------------------------------------------------

    def judge(self, src: str | None, dst: str, size: int) -> Verdict:
        """What happens to ``size`` bytes from ``src`` arriving at ``dst``."""
        if src is None or src == dst or not (self._sides or self._links):
            return PASS
        with self._lock:
            a, b = self._sides.get(src), self._sides.get(dst)
            if a is not None and b is not None and a != b:
                self.dropped["partition"] += 1
                return Verdict(drop="partition")
            rule = next((r for r in reversed(self._links) if r.covers(src, dst)), None)
            if rule is None:
                return PASS
            if rule.loss and self._rng.random() < rule.loss:
                self.dropped["loss"] += 1
                return Verdict(drop="loss")
            delay = rule.latency_s
            if rule.bandwidth_bps:
                now = time.monotonic()
                start = max(now, self._busy.get((src, dst), now))
                done = start + size / rule.bandwidth_bps
                self._busy[(src, dst)] = done
                delay += done - now
            if delay > 0:
                self.delayed += 1
            return Verdict(delay_s=delay)

    def later(self, delay_s: float, fn: Callable[[], None]) -> None:
        with self._lock:
            if self._timers is None:
                self._timers = Timers("dms-sim-faults")
            timers = self._timers
        timers.call_later(delay_s, fn)

    def layer(self, transport: Any) -> FaultyTransport:
        """``transport`` with this plan's faults applied to what it receives."""
        return FaultyTransport(transport, self)

    def stats(self) -> dict[str, int]:
        return {
            "dropped_partition": self.dropped["partition"],
            "dropped_loss": self.dropped["loss"],
            "delayed": self.delayed,
        }

    # ---- the file form (a plan shared with other processes) -------------------------

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            sides: dict[int, list[str]] = {}
            for peer, side in self._sides.items():
                sides.setdefault(side, []).append(peer)
            return {
                "partition": [sorted(sides[k]) for k in sorted(sides)],
                "links": [r.as_dict() for r in self._links],
            }

    def load_dict(self, data: dict[str, Any]) -> None:
        links = [LinkRule.from_dict(r) for r in data.get("links", [])]
        with self._lock:
            self._sides = {p: i for i, side in enumerate(data.get("partition", [])) for p in side}
            self._links = links
            self._busy.clear()

    def save(self, path: Path) -> None:
        """Write the plan where nodes in other processes read it (atomically)."""
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.as_dict()))
        os.replace(tmp, path)

    @classmethod
    def watching(cls, path: Path, seed: int = 0) -> FaultPlan:
        """A plan that follows ``path`` (missing: no faults) until :meth:`close`."""
        plan = cls(seed)
        plan._watcher = threading.Thread(
            target=plan._watch, args=(Path(path),), name="dms-sim-faults-watch", daemon=True
        )
        plan._watcher.start()
        return plan

    def _watch(self, path: Path) -> None:
        seen: int | None = None
        while not self._closed.wait(WATCH_S):
            try:
                stamp = path.stat().st_mtime_ns
            except FileNotFoundError:
                stamp = None
            if stamp == seen:
                continue
            seen = stamp
            try:
                self.load_dict(json.loads(path.read_text()) if stamp is not None else {})
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("faults file %s not applied: %s", path, exc)

    def close(self) -> None:
        self._closed.set()
        if self._timers is not None:
            self._timers.stop()


class FaultyTransport:
    """A :class:`dms.actor.Transport` (and, over libp2p, the courier's chunk network)
    whose arrivals pass through a :class:`FaultPlan`."""

    def __init__(self, inner: Transport, plan: FaultPlan) -> None:
        self.inner = inner
        self.plan = plan
        self.cut_off = False

    def cut(self) -> None:
        """A node killed: from now on nothing it sends leaves, nothing reaches it (its
        goodbye heartbeat included, as after kill -9)."""
        self.cut_off = True

    @property
    def peer_id(self) -> str:
        return self.inner.peer_id

    def start(self, receiver: Receiver, undeliverable: Undeliverable | None = None) -> None:
        me, plan = self.inner.peer_id, self.plan

        def arrive(frame: bytes, from_peer: str | None, *, signature_checked: bool = False) -> None:
            if self.cut_off:
                return
            verdict = plan.judge(from_peer, me, len(frame))
            if verdict.drop is not None:
                return
            if verdict.delay_s > 0:
                plan.later(
                    verdict.delay_s,
                    lambda: receiver(frame, from_peer, signature_checked=signature_checked),
                )
            else:
                receiver(frame, from_peer, signature_checked=signature_checked)

        self.inner.start(arrive, undeliverable)

    def send(self, peer_id: str, frame: bytes) -> None:
        if self.cut_off:
            raise Unreachable("this node was killed")
        self.inner.send(peer_id, frame)

    def publish(self, topic: str, frame: bytes) -> None:
        if not self.cut_off:
            self.inner.publish(topic, frame)

    def subscribe(self, topic: str) -> None:
        self.inner.subscribe(topic)

    def unsubscribe(self, topic: str) -> None:
        self.inner.unsubscribe(topic)

    def stop(self) -> None:
        self.inner.stop()

    def relay_room(self, peer_id: str) -> tuple[int, int] | None:
        return self.inner.relay_room(peer_id)  # type: ignore[attr-defined]

    def fetch_chunks(
        self, peer_id: str, manifest_id: str, hashes: list[str], max_chunk_bytes: int
    ) -> list[tuple[str, bytes]]:
        """The inner transport's fetch, as the plan lets the chunks through: a partition
        or a lost batch fails it (the courier tries again), a slow link delays it."""
        me = self.inner.peer_id
        if self.plan.judge(peer_id, me, 0).drop == "partition":
            raise NetworkError(f"peer {peer_id} is unreachable (partitioned)")
        arrived = self.inner.fetch_chunks(  # type: ignore[attr-defined]
            peer_id, manifest_id, hashes, max_chunk_bytes
        )
        verdict = self.plan.judge(peer_id, me, sum(len(data) for _, data in arrived))
        if verdict.drop is not None:
            raise NetworkError(f"chunks from {peer_id} lost ({verdict.drop})")
        if verdict.delay_s > 0:
            time.sleep(verdict.delay_s)
        return arrived


def close_quietly(plan: FaultPlan | None) -> None:
    if plan is not None:
        with contextlib.suppress(Exception):
            plan.close()
