"""The peers table: who is out there, built from heartbeats (as EDGELESS does).

Every node announces itself on :data:`HEARTBEAT_TOPIC` every ``interval_s``
with its capability summary, free resources, load, the deadline by which its
next heartbeat will have come, and a nonce drawn once per process. A peer whose
deadline passes is ``gone``; a heartbeat with a new nonce means the peer
restarted (its earlier promises are void); a ``leaving`` heartbeat marks it
gone at once. The table knows nothing about what the figures mean: it keeps
them for the bidder, the orchestrator and ``dms peers list``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dms.statemachine import Machine

HEARTBEAT_TOPIC = "/dms/heartbeat"
HEARTBEAT_BEHAVIOUR = "/broadcast/heartbeat"
# A node's latest heartbeat from each live peer, as each peer signed it.
HEARTBEATS_BEHAVIOUR = "/dms/node/peers/heartbeats"
DEADLINE_FACTOR = 3.0  # a peer may miss two heartbeats before it is gone
# Addresses a heartbeat carries, at most (the sender keeps those other machines reach it
# at first: dms.network.interfaces.fitted).
HEARTBEAT_ADDRS = 16


class PeerState(StrEnum):
    ALIVE = "alive"  # heard from within its deadline
    GONE = "gone"  # past its deadline, or it said it was leaving


# alive <-> gone: a peer that is heard from again is alive again; none is final (a
# peer gone for long is forgotten: its row is dropped, and it comes back as a new one).
PEER = Machine(
    "peer",
    PeerState,
    {PeerState.ALIVE: {PeerState.GONE}, PeerState.GONE: {PeerState.ALIVE}},
)
ALIVE, GONE = PeerState.ALIVE, PeerState.GONE
# What ``PeerTable.observe`` says of a beat older than the one it holds.
STALE = "stale"


class Heartbeat(BaseModel):
    """One announcement; who sent it is the envelope's verified sender."""

    model_config = ConfigDict(extra="ignore")  # newer nodes may add fields

    nonce: str = Field(min_length=8, max_length=64)
    seq: int = Field(ge=0)
    interval_s: float = Field(gt=0, le=3600)
    deadline_s: float = Field(gt=0, le=3 * 3600)
    onboarded: dict[str, float] = Field(default_factory=dict)
    free: dict[str, float] = Field(default_factory=dict)
    allocations: int = Field(default=0, ge=0)
    load: float = Field(default=0.0, ge=0)
    price: float = Field(default=0.0, ge=0)
    scores: dict[str, float] = Field(default_factory=dict)
    labels: list[str] = Field(default_factory=list, max_length=64)
    leaving: bool = False
    # The sender's listen multiaddrs: a peer heard only through gossip can be dialed.
    addrs: list[str] = Field(default_factory=list, max_length=HEARTBEAT_ADDRS)


@dataclass
class PeerRecord:
    peer_id: str
    did: str
    nonce: str
    status: PeerState
    first_seen: float  # wall clock, for people
    last_seen: float
    deadline: float  # table clock (monotonic)
    restarts: int = 0
    heartbeat: Heartbeat | None = None
    history: list[str] = field(default_factory=list)

    def move(self, to: PeerState) -> None:
        """Enter ``to`` (checked against ``PEER``; the same state is no move)."""
        if to != self.status:
            self.status = PEER.check(self.status, to, self.peer_id[-8:])

    def as_dict(self, now_wall: float | None = None) -> dict[str, Any]:
        now_wall = time.time() if now_wall is None else now_wall
        hb = self.heartbeat
        return {
            "peer_id": self.peer_id,
            "did": self.did,
            "status": self.status.value,
            "last_seen_s": round(max(0.0, now_wall - self.last_seen), 3),
            "restarts": self.restarts,
            "nonce": self.nonce,
            "onboarded": hb.onboarded if hb else {},
            "free": hb.free if hb else {},
            "allocations": hb.allocations if hb else 0,
            "load": hb.load if hb else 0.0,
            "price": hb.price if hb else 0.0,
            "scores": hb.scores if hb else {},
            "labels": hb.labels if hb else [],
            "addrs": list(hb.addrs) if hb else [],  # as it advertises them (relayed too)
        }


class PeerTable:
    """Thread-safe: the node actor writes it, orchestrators read it."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        history: int = 8,
    ) -> None:
        self._clock, self._wall = clock, wall
        self._peers: dict[str, PeerRecord] = {}
        self._lock = threading.Lock()
        self._history = history
        # Told each deadline a heartbeat sets (table clock), outside the lock: whoever
        # sweeps the table sleeps until the next one (``next_due``), not on a period.
        self.on_deadline: Callable[[float], None] | None = None

    def now(self) -> float:
        """The table's clock (deadlines are on it)."""
        return self._clock()

    def observe(self, peer_id: str, did: str, beat: Heartbeat, sent_at: float | None = None) -> str:
        """Take in one heartbeat; returns what it meant: ``joined``, ``alive``,
        ``returned`` (was gone, same process), ``restarted`` (new nonce), ``left``,
        or ``stale``: an earlier beat of the process already heard (a lower ``seq``
        under the same nonce), which changes nothing.

        ``sent_at`` (wall clock): when the peer sent a heartbeat that reaches us
        late, relayed by another peer; its deadline then runs from that time.

        Gossip does not keep a publisher's messages in order: a beat published before
        the mesh formed can come, through another peer's gossip window, after a later
        one. Taken, it put back the figures it carried (a provider's onboarding read as
        none until its next beat, 300 s away at most) and revived a peer that had
        said it was leaving.
        """
        now, wall = self._clock(), self._wall()
        age = 0.0 if sent_at is None else min(max(0.0, wall - sent_at), beat.deadline_s)
        with self._lock:
            record = self._peers.get(peer_id)
            held = record.heartbeat if record is not None else None
            if held is not None and held.nonce == beat.nonce and beat.seq < held.seq:
                return STALE
            if record is None:
                record = PeerRecord(peer_id, did, beat.nonce, ALIVE, wall, wall, now)
                self._peers[peer_id] = record
                event = "joined"
            elif record.nonce != beat.nonce:
                record.restarts += 1
                record.nonce = beat.nonce
                event = "restarted"
            elif record.status == GONE and not beat.leaving:
                event = "returned"
            else:
                event = "alive"
            if beat.leaving:
                record.move(GONE)
                event = "left"
            else:
                record.move(ALIVE)
            record.did = did
            record.heartbeat = beat
            record.last_seen = wall - age
            record.deadline = now - age + beat.deadline_s
            if event != "alive":
                record.history = [*record.history, event][-self._history :]
            deadline = record.deadline
        told = self.on_deadline
        if told is not None:
            told(deadline)
        return event

    def sweep(self) -> list[str]:
        """Mark peers past their deadline as gone; returns the ones that just went."""
        now = self._clock()
        gone = []
        with self._lock:
            for record in self._peers.values():
                if record.status == ALIVE and now > record.deadline:
                    record.move(GONE)
                    record.history = [*record.history, "expired"][-self._history :]
                    gone.append(record.peer_id)
        return gone

    def next_due(self, forget_after_s: float) -> float | None:
        """When a sweep would next change the table (table clock): the earliest deadline
        of a live peer, or ``forget_after_s`` past a gone one's; None when no row would
        ever change without a heartbeat."""
        with self._lock:
            return min(
                (
                    r.deadline if r.status == ALIVE else r.deadline + forget_after_s
                    for r in self._peers.values()
                ),
                default=None,
            )

    def forget_gone(self, after_s: float) -> list[str]:
        """Drop peers gone for longer than ``after_s`` (past their deadline, or since
        they left); returns their ids. A peer that comes back is a new row."""
        now = self._clock()
        with self._lock:
            old = [
                r.peer_id
                for r in self._peers.values()
                if r.status == GONE and now - r.deadline > after_s
            ]
            for peer_id in old:
                del self._peers[peer_id]
        return old

    def get(self, peer_id: str) -> PeerRecord | None:
        with self._lock:
            return self._peers.get(peer_id)

    def records(self, status: str | None = None) -> list[PeerRecord]:
        with self._lock:
            rows = list(self._peers.values())
        rows.sort(key=lambda r: r.peer_id)
        return [r for r in rows if status is None or r.status == status]

    def alive(self) -> list[PeerRecord]:
        return self.records(ALIVE)

    def heard(self) -> list[str]:
        """The live peers, those known the longest first (``first_seen``): the
        peerstore keeps their addresses ahead of fresh keys' (``dms.network.peerstore``).
        A key that starts heartbeating now comes after every peer already known."""
        with self._lock:
            rows = [r for r in self._peers.values() if r.status == ALIVE]
        rows.sort(key=lambda r: r.first_seen)
        return [r.peer_id for r in rows]
