"""The node's peer behaviours: ``/dms/node/peers/*`` and the heartbeat it sends and hears.

A role of :class:`dms.node.node.NodeActor` (:class:`Peering`); see
``specs/node.md`` for the heartbeat format and timing, and
``dms.node.heartbeat_sync`` for heartbeats passed on between peers.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dms.actor import ErrorCode, Refusal, Request, behaviour
from dms.actor.envelope import peek
from dms.actor.runtime import NodeRuntime
from dms.actor.threads import PARK
from dms.actor.timers import TimerHandle
from dms.network.host import Libp2pTransport
from dms.network.interfaces import fitted
from dms.network.peerbook import PeerBook
from dms.network.peertable import (
    DEADLINE_FACTOR,
    HEARTBEAT_ADDRS,
    HEARTBEAT_BEHAVIOUR,
    HEARTBEAT_TOPIC,
    Heartbeat,
    PeerTable,
)
from dms.node.heartbeat_sync import HEARTBEAT_MAX_TTL_S, HeartbeatSync, SignedHeartbeat
from dms.security.identity import peer_id_from_public_key
from dms.store import StoreBusy

log = logging.getLogger("dms.node")

# The longest a heartbeat waits for its figures, as a share of its interval: a store
# another process holds locked makes a read wait SQLite's busy timeout (30 s).
FIGURES_WAIT_SHARE = 0.25
# The first periodic beat after the start and after each announce comes at a random
# point of its interval, no sooner than this share of it: nodes started or onboarded
# together would otherwise beat together for as long as they run (every node's interval
# is the same), and every node of the network then heard them all within a second or
# two (specs/orchestration.md, "Seventh pass: the tail").
DEPHASE_MIN_SHARE = 0.1
# A sweep runs this long after the deadline it is timed for (the table's deadlines
# are strict: a peer is gone once its deadline has passed).
SWEEP_AFTER_DEADLINE_S = 0.01
# The longest a sweep is timed ahead (a peer_forget_s of days, or infinite).
SWEEP_AT_MOST_EVERY_S = 3600.0


class PingPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    peer_id: str = Field(min_length=1)


class ConnectPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    address: str = Field(min_length=1, description="a multiaddr ending in /p2p/<peer id>")


class Peering:
    """The node's peers: the heartbeat it sends and hears, the peers table, and the
    owner's ``/dms/node/peers/*`` behaviours. ``summary(wait_s)``: the figures each
    heartbeat carries (the provider role's resources and scores), waiting for the store
    ``wait_s`` at most.

    The periodic heartbeat runs on a thread of its own, timed by the actor system's
    timer thread, not in the node's mailbox: a handler of the node waiting on its store
    (another process's lock: 30 s) held it up, and past its deadline every peer had the
    node gone; nor on the timer thread itself, whose every other deadline waited while
    the beat waited for the store."""

    def __init__(
        self,
        node: NodeRuntime,
        *,
        peer_table: PeerTable,
        heartbeats: HeartbeatSync,
        summary: Callable[[float | None], dict[str, Any]],
        network: Libp2pTransport | None = None,
        peerbook: PeerBook | None = None,
        heartbeat_s: float = 2.0,
        heartbeat_budget_per_s: float = 10.0,
        remember_every_s: float = 30.0,
        peer_forget_s: float = 3600.0,
        labels: list[str] | None = None,
        stake: Callable[[str], bool] | None = None,
    ) -> None:
        self.node = node
        self.peer_table = peer_table
        self.heartbeats = heartbeats
        self.summary = summary
        self.network = network
        self.peerbook = peerbook
        self.heartbeat_s = heartbeat_s
        self.heartbeat_budget_per_s = heartbeat_budget_per_s
        self.remember_every_s = remember_every_s
        self.peer_forget_s = peer_forget_s
        self.labels = labels or []
        # Peers this node has a stake in (dms.node.stakes): remembered even if they
        # send no heartbeat.
        self.stake = stake or (lambda peer: False)
        self.nonce = ""
        self._beats = 0
        # The figures the last heartbeat carried: sent again while ``summary`` fails,
        # since ``_stale_since`` (time.monotonic(); None while they are read).
        self._figures: dict[str, Any] = {}
        self._stale_since: float | None = None
        # A heartbeat is built and sent by one thread at a time (the periodic one, on a
        # parked thread, and the leaving one at stop): held while a beat waits for its
        # figures and for the network.
        self._beat_lock = threading.Lock()
        # The periodic beat's schedule: the fields below. Never held while waiting, so
        # announce (on the node's own thread) takes it at once.
        self._schedule_lock = threading.Lock()
        self._beat_timer: TimerHandle | None = None
        # Which timing of the periodic beat is current: a timer that fired before it
        # was cancelled (its beat not started yet) finds a newer one and sends nothing.
        self._timing = 0
        self._beating = False  # a periodic beat is in progress
        self._stopped = False
        # An announce came while a beat was in progress: the next one goes at once.
        self._again = False
        # The next periodic beat comes at a random point of its interval (after the
        # start and each announce: DEPHASE_MIN_SHARE), not a whole interval on.
        self._dephase = True
        # The interval the last beat published announced: its peers hold this node to
        # that beat's deadline (DEADLINE_FACTOR intervals), so the next comes within it.
        # A beat that was not published (refused, no thread) announced nothing.
        self._announced_s: float | None = None
        # Set once the publish of the last heartbeat returned (it waits on the network
        # thread): the next is not sent while one still waits.
        self._sent = threading.Event()
        self._sent.set()
        # The next sweep of the peers table: timed for the next deadline in it, moved
        # sooner when a heartbeat sets an earlier one (``_deadline_set``).
        self._sweep_lock = threading.Lock()
        self._sweep_timer: TimerHandle | None = None
        self._sweep_at: float | None = None  # table clock; None: none timed
        self._last_sweep: float | None = None  # table clock
        self.sweeps = 0  # sweeps run, for tests and status

    def start(self) -> None:
        self.nonce = secrets.token_hex(8)  # new per process: peers see a restart
        self.heartbeats.start()
        self.node.subscribe(HEARTBEAT_TOPIC)
        with self._schedule_lock:
            self._beat_soon(0.0)
        self.peer_table.on_deadline = self._deadline_set
        self._sweep_when_due()
        if self.peerbook is not None and self.network is not None:
            self.node.call_later(1.0, self._remember_peers)

    def stop(self) -> None:
        self._remember_peers(reschedule=False)
        with self._schedule_lock:
            self._stopped = True
            if self._beat_timer is not None:
                self._beat_timer.cancel()
        self.peer_table.on_deadline = None
        with self._sweep_lock:
            if self._sweep_timer is not None:
                self._sweep_timer.cancel()
            self._sweep_timer, self._sweep_at = None, None
        try:  # best effort: peers that miss it find out at the deadline
            self._publish_heartbeat(leaving=True)
        except Exception as exc:
            log.debug("no leaving heartbeat: %s", exc)

    # ---- heartbeat -----------------------------------------------------------------

    def heartbeat_interval(self) -> float:
        """``heartbeat_s``, stretched so the whole network sends at most
        ``heartbeat_budget_per_s`` heartbeats a second: each node's gossip load stays
        flat as the network grows (N / interval heartbeats reach every node). Only
        live peers count: a gone one sends nothing."""
        peers = len(self.peer_table.alive()) + 1
        return max(self.heartbeat_s, peers / self.heartbeat_budget_per_s)

    def heartbeat(self, leaving: bool = False) -> dict[str, Any]:
        """The next heartbeat: its interval and deadline as of now, and the figures it
        carries. It records the beat count (the next one's ``seq``) and, through
        ``_summary``, the figures read; not the interval it announces. That one is
        recorded once the beat was published (``_publish_heartbeat_now``): peers hold
        this node to the deadline of the last beat they received, and
        ``_interval_due`` times the next beat by it. A beat built but not published
        (refused, no thread) moves no deadline."""
        interval = self.heartbeat_interval()
        wait_s = 0.0 if leaving else interval * FIGURES_WAIT_SHARE
        beat: dict[str, Any] = {
            "nonce": self.nonce,
            "seq": self._beats,
            "interval_s": interval,
            "deadline_s": interval * DEADLINE_FACTOR,
            "load": round(os.getloadavg()[0] / (os.cpu_count() or 1), 3)
            if hasattr(os, "getloadavg")
            else 0.0,
            "leaving": leaving,
            "labels": self.labels,
            "addrs": self._listen_addrs(),
        }
        beat.update(self._summary(wait_s))
        self._beats += 1
        return beat

    def _summary(self, wait_s: float) -> dict[str, Any]:
        """The figures a heartbeat carries, or the last ones read when they cannot be
        read now (a store that refuses, a read-only file: its reads begin as writes).
        The node is alive all the same: without a heartbeat its peers would have it gone
        past its deadline and place its running jobs again elsewhere. Warned of once,
        when they first fail (a store that refuses for hours is not a line every beat),
        and told at info when they are read again. A store that makes them wait longer
        than ``wait_s`` (another process holds it locked) counts as one that refuses."""
        try:
            figures = self.summary(wait_s)
        except Exception as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if self._stale_since is None:
                self._stale_since = time.monotonic()
                # Busy (a lock held past wait_s) may be a moment's: said at info.
                busy = isinstance(exc, StoreBusy) or "database is locked" in why
                log.log(
                    logging.INFO if busy else logging.WARNING,
                    "heartbeat figures not read (%s): the last ones are sent until they "
                    "can be read again", why,
                )  # fmt: skip
            else:
                log.debug("heartbeat figures still not read (%s)", why)
            return self._figures
        if self._stale_since is not None:
            log.info(
                "heartbeat figures read again, after %.0f s of sending the last ones",
                time.monotonic() - self._stale_since,
            )
            self._stale_since = None
        self._figures = figures
        return figures

    def _listen_addrs(self) -> list[str]:
        network = self.network
        if network is None:
            return []
        try:
            # Those other machines reach it at first: dozens of interface addresses
            # (a Docker host's bridges) must not cut its public and relayed ones.
            return fitted(network.addrs(), HEARTBEAT_ADDRS)
        except Exception:  # a host still starting or stopping: the next beat has them
            return []

    def _publish_heartbeat(self, leaving: bool = False) -> None:
        with self._beat_lock:
            if self._stopped and not leaving:
                return
            self._publish_heartbeat_now(leaving)

    def _publish_heartbeat_now(self, leaving: bool) -> None:
        """Build a heartbeat and publish it, waiting at most its interval (``_beat_lock``
        held, never on the node's own thread): the publish waits on the network thread,
        which can itself wait on a slow or hostile peer's write (5 s each). A publish
        past the deadline goes on on its own thread; while it does, no other is started
        (the beats it misses are logged)."""
        if not self._sent.is_set():
            log.info("heartbeat not sent: the last one still waits for the network")
            return
        beat = self.heartbeat(leaving)
        # Valid until the deadline it announces, so peers can pass it on meanwhile.
        ttl_s = min(beat["deadline_s"], HEARTBEAT_MAX_TTL_S, self.node.system.limits.max_ttl_s)
        sent = self._sent = threading.Event()

        def publish() -> None:
            try:
                frame = self.node.publish(HEARTBEAT_TOPIC, HEARTBEAT_BEHAVIOUR, beat, ttl_s=ttl_s)
                if not leaving:  # out: its peers now hold this node to its deadline
                    self._announced_s = beat["interval_s"]
                env = peek(frame)
                signed = SignedHeartbeat.of(env, frame) if env is not None else None
                self.heartbeats.keep_own_heartbeat(None if leaving else signed)
            except Exception as exc:  # a stopping host: the next beat tries again
                log.warning("heartbeat not sent: %s", exc)
            finally:
                sent.set()

        try:
            PARK.run(publish, "dms-heartbeat-publish")
        except BaseException:  # no thread to be had (a transient limit): the next beat tries
            sent.set()
            raise
        if not sent.wait(beat["interval_s"]):
            log.warning(
                "heartbeat not sent within %g s (its interval): the network thread is "
                "held up (a slow peer's write); it goes out when the network is free",
                beat["interval_s"],
            )

    def _beat_soon(self, delay_s: float) -> None:
        """The next periodic heartbeat in ``delay_s``, in place of the one timed before
        (``_schedule_lock`` held). The timer thread only hands it to a thread of its own
        (a parked one, ``dms.actor.threads``): the beat may wait a quarter of its
        interval for the store, and that one thread serves every deadline of the node
        (invoke timeouts, each actor's ``call_later``), which all waited with it."""
        if self._beat_timer is not None:
            self._beat_timer.cancel()
        self._timing += 1
        timing = self._timing

        def hand_over() -> None:
            try:
                PARK.run(lambda: self._heartbeat(timing), "dms-heartbeat")
            except Exception as exc:  # no thread to be had: again an interval later
                log.warning("heartbeat not sent: %s; tried again in an interval", exc)
                with self._schedule_lock:
                    if not self._stopped and timing == self._timing:
                        self._beat_soon(self._interval_due())

        self._beat_timer = self.node.system.timers.call_later(delay_s, hand_over)

    def _heartbeat(self, timing: int) -> None:
        """Off the timer thread: send one, and the next after the interval (one beat of
        this node at a time: the next is timed once this one is sent), or at once if an
        announce came meanwhile (after this one read its figures, maybe before the
        change)."""
        with self._schedule_lock:
            if self._stopped or timing != self._timing:
                return  # stopped, or timed again (by announce) after this timer fired
            self._beating = True
            self._again = False  # this beat reads the figures after any change so far
        try:
            self._publish_heartbeat()
        except Exception as exc:  # a busy store or a stopping host: try next time
            log.warning("heartbeat not sent: %s", exc)
        finally:
            with self._schedule_lock:
                self._beating = False
                if not self._stopped:
                    again, self._again = self._again, False
                    self._beat_soon(0.0 if again else self._next_interval())

    def _next_interval(self) -> float:
        """The wait for the next periodic beat (``_schedule_lock`` held): the interval,
        or a random share of it for the first beat after the start or an announce. Never
        longer than the interval, so no gap nears the deadline peers hold this node to
        (DEADLINE_FACTOR intervals); an announce costs at most one beat over the budget."""
        interval = self._interval_due()
        if not self._dephase:
            return interval
        self._dephase = False
        return interval * random.uniform(DEPHASE_MIN_SHARE, 1.0)

    def _interval_due(self) -> float:
        """The interval as of now, but no longer than the one the last beat published
        announced: peers hold this node gone past that beat's deadline (DEADLINE_FACTOR
        of its interval), and the interval grows with the peers table. A newcomer's
        beat announced a small network's interval, a heartbeat sync then brought it
        every peer, and the next beat was timed a whole new interval later, past that
        deadline: its peers held it gone until then. The interval now grows a beat at
        a time. A beat that was not published counts for nothing: its peers still hold
        the deadline of the one before."""
        interval = self.heartbeat_interval()
        announced = self._announced_s
        return interval if announced is None else min(interval, announced)

    def announce(self) -> None:
        """Send a heartbeat now (after onboarding changes), not at the next tick. The
        node's thread calls this, so it never sends one itself (the publish waits on the
        network thread, up to an interval: about 100 s at 1,000 peers) nor waits on a
        beat in progress: it has the periodic beat go at once, on its own thread, or,
        while one is in progress (it may have read the figures before the change), go
        again right after it."""
        with self._schedule_lock:
            if self._stopped:
                return
            self._again = True
            self._dephase = True
            if not self._beating:
                self._beat_soon(0.0)

    def _sweep_when_due(self, sooner_only: bool = False) -> None:
        """Time the next sweep for the next deadline in the table (a peer's, or a gone
        peer's forgetting), no sooner than ``heartbeat_s / 2`` after the last sweep: a
        peer is gone within its deadline plus that, as when the table was swept on that
        period, and an idle node wakes for its peers' deadlines only (it woke twice a
        second). ``sooner_only`` (a heartbeat set a deadline): the sweep timed is only
        ever moved sooner, never later, so heartbeats with early deadlines, however
        many and however often, cannot keep the table from being swept."""
        with self._sweep_lock:  # read under it: a deadline set meanwhile is not lost
            if self._stopped:
                return
            due = self.peer_table.next_due(self.peer_forget_s)
            if due is None:  # nobody heard yet: the first heartbeat times it
                if not sooner_only and self._sweep_timer is not None:
                    self._sweep_timer.cancel()
                    self._sweep_timer, self._sweep_at = None, None
                return
            now = self.peer_table.now()
            half = self.heartbeat_s / 2
            at = max(due + SWEEP_AFTER_DEADLINE_S, now)
            if self._last_sweep is not None:
                at = max(at, self._last_sweep + half)
            at = min(at, now + max(SWEEP_AT_MOST_EVERY_S, half))
            if sooner_only and self._sweep_at is not None and at >= self._sweep_at:
                return
            if self._sweep_timer is not None:
                self._sweep_timer.cancel()
            self._sweep_at = at
            self._sweep_timer = self.node.call_later(at - now, self._sweep)

    def _deadline_set(self, deadline: float) -> None:
        """A heartbeat set ``deadline`` (any thread): the sweep comes sooner if it is
        before the one timed; never later."""
        with self._sweep_lock:
            timed = self._sweep_at
        if timed is None or deadline + SWEEP_AFTER_DEADLINE_S < timed:
            self._sweep_when_due(sooner_only=True)

    def _sweep(self) -> None:
        self.sweeps += 1
        with self._sweep_lock:
            self._last_sweep = self.peer_table.now()
        for peer_id in self.peer_table.sweep():
            log.info("peer %s is gone (missed its heartbeat deadline)", peer_id)
            # expired with the deadline: nothing to pass on
            self.heartbeats.keep_heartbeat(peer_id, None)
            if self.network is not None:  # its addresses go unless a connection keeps them
                self.network.unheard(peer_id)
        for peer_id in self.peer_table.forget_gone(self.peer_forget_s):
            log.info("peer %s forgotten (gone for %g s)", peer_id, self.peer_forget_s)
            self.heartbeats.keep_heartbeat(peer_id, None)
        self._sweep_when_due()

    @behaviour(HEARTBEAT_BEHAVIOUR, public=True, payload=Heartbeat, topic=HEARTBEAT_TOPIC)
    def heard_heartbeat(self, request: Request) -> None:
        sender = request.sender
        peer_id = peer_id_from_public_key(sender.id)
        if peer_id == self.node.system.peer_id:
            return
        if sender.address.host != peer_id:
            raise Refusal(ErrorCode.WRONG_SIGNER, "a heartbeat must come from a node's root")
        sealed = request.sealed
        signed = SignedHeartbeat.of(sealed.envelope, sealed.frame) if sealed else None
        self.heartbeats.take_heartbeat(peer_id, sender.did, request.payload, signed)

    # ---- peers (owner) ---------------------------------------------------------------

    @behaviour("/dms/node/peers/self")
    def peers_self(self, request: Request) -> dict[str, Any]:
        return {
            "peer_id": self.node.system.peer_id,
            "did": self.node.identity.did,
            "addrs": self._network().addrs(),
            "reachability": str(self._network().reachability()),
            "nonce": self.nonce,
        }

    @behaviour("/dms/node/peers/list")
    def peers_list(self, request: Request) -> list[dict[str, Any]]:
        """Every peer known from heartbeats or connections, with its status and figures."""
        connected = {p.peer_id: p.addrs for p in self.network.peers()} if self.network else {}
        now = time.time()
        rows = []
        for record in self.peer_table.records():
            row = record.as_dict(now)
            row["connected"] = record.peer_id in connected
            # direct, relayed (through a circuit relay) or none
            row["path"] = self._network().path_to(record.peer_id)
            advertised = row.pop("addrs", [])
            row["addrs"] = list(dict.fromkeys([*connected.pop(record.peer_id, []), *advertised]))
            rows.append(row)
        for peer_id, addrs in sorted(connected.items()):  # connected, no heartbeat yet
            rows.append({"peer_id": peer_id, "status": "connected", "connected": True,
                         "addrs": addrs})  # fmt: skip
        return rows

    @behaviour("/dms/node/peers/ping", payload=PingPayload)
    def peers_ping(self, request: Request) -> None:
        peer_id = request.payload.peer_id
        network = self._network()
        self.node.in_background(
            request, lambda: {"peer_id": peer_id, "rtt_ms": round(network.ping(peer_id), 3)}
        )

    @behaviour("/dms/node/peers/connect", payload=ConnectPayload)
    def peers_connect(self, request: Request) -> None:
        address = request.payload.address
        network = self._network()
        self.node.in_background(request, lambda: {"peer_id": network.connect(address)})

    @behaviour("/dms/node/peers/dht")
    def peers_dht(self, request: Request) -> dict[str, Any]:
        peers = self._network().dht_peers()
        return {"size": len(peers), "peers": peers}

    @behaviour("/dms/node/peers/score")
    def peers_score(self, request: Request) -> list[dict[str, Any]]:
        scores = self._network().scores()
        return [{"peer_id": p, "score": s} for p, s in sorted(scores.items())]

    # ---- helpers ---------------------------------------------------------------------

    def _network(self) -> Libp2pTransport:
        if self.network is None:
            raise Refusal(ErrorCode.UNREACHABLE, "this node has no libp2p network")
        return self.network

    def _remember_peers(self, reschedule: bool = True) -> None:
        peerbook, network = self.peerbook, self.network
        if peerbook is None or network is None:
            return
        # A remembered peer is dialed at start and keeps its slots as a staked one: only
        # peers this node dialed (it chose them), dms nodes heard (a heartbeat in the
        # peers table) and peers with a stake here, not every key that connected to it
        # (fresh keys are free).
        try:  # the node outlives a busy or stopped store, and a stopped network
            worth = [
                p
                for p in network.peers()
                if p.dialed or self.peer_table.get(p.peer_id) is not None or self.stake(p.peer_id)
            ]
            peerbook.remember(worth, self.stake)
        except Exception as exc:
            log.warning("could not record peers: %s", exc)
        if reschedule:
            self.node.call_later(self.remember_every_s, self._remember_peers)
