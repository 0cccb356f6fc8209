"""A running node: keys, store, libp2p transport, actor system, node actor, local API.

:class:`Node` is the composition root used by ``dms run``, by the integration
fixture and by the benchmarks; ``start`` brings the parts up in dependency
order and ``stop`` takes them down in reverse (streams closed, peers flushed to
the store, ``api.json`` removed). A node holds its home's run lock from the first
step of ``start`` to the last of ``stop``: one running node per home.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

import pykka
from pydantic import ValidationError
from sqlalchemy import make_url

from dms import __version__
from dms.actor import ROOT_INBOX, ActorRef, ActorSystem, Limits
from dms.actor.transport import Transport
from dms.config import Settings
from dms.files import sqlite_path
from dms.network.host import Libp2pTransport, NetworkError, SharedLoop
from dms.network.peerbook import PeerBook
from dms.network.peertable import PeerTable
from dms.network.settings import BUDGET_SETTINGS, RELAY_SETTINGS, NetworkSettings
from dms.network.transfer import ChunkNetwork
from dms.node.api import ApiError, LocalApi
from dms.node.home import NODE_KEY, NodeError, private_home
from dms.node.lock import RunLock, check_listen_free
from dms.node.metrics import NodeMetrics
from dms.node.node import STARTED, NodeActor
from dms.node.services import NodeServices, RoleCounts
from dms.node.stakes import StakeBook
from dms.orchestrator.mining import SessionLimits
from dms.provider.bidindex import BidIndex, BidIndexBudget
from dms.resources import Onboarder, ResourceLedger
from dms.security import Identity, TrustStore
from dms.security.trust import TrustLimits
from dms.store import Database, StoreBusy, open_database

log = logging.getLogger("dms.node")
# Holders of allocations read from the ledger into the stake book at start.
STAKES_AT_START = 1024
# Start-up on a store another process holds locked says so this often (StartWait), and
# waits this long past its deadline for the node actor's on_start to end (a slow one).
START_PROGRESS_S = 5.0
START_ASK_MARGIN_S = 120.0


def network_settings(settings: Settings, **overrides: Any) -> NetworkSettings:
    """The network part of the user's settings, with command-line overrides."""
    values: dict[str, Any] = {
        "listen": settings.listen,
        "bootstrap": settings.bootstrap,
        "mdns": settings.mdns,
        "dial_timeout_s": settings.dial_timeout_s,
        "connection_aim": settings.connection_aim,
        "reconnect_interval_s": settings.reconnect_interval_s,
        "max_frame_bytes": settings.max_data_bytes + 1024,
        "max_frames_per_s": settings.max_frames_per_s,
        "frame_burst": settings.frame_burst,
        "max_unknown_frames_per_s": settings.max_unknown_frames_per_s,
        "unknown_frame_burst": settings.unknown_frame_burst,
        "flooder_frames_per_s": settings.flooder_frames_per_s,
        "flooder_cooldown_s": settings.flooder_cooldown_s,
        "max_outbound_frames": settings.max_outbound_frames,
        "max_outbound_bytes": settings.max_outbound_bytes,
        "gossip": {
            "max_messages_per_peer_per_s": settings.gossip_messages_per_peer_per_s,
            "message_burst_per_peer": settings.gossip_burst_per_peer,
            "flooder_messages_per_s": settings.gossip_flooder_messages_per_s,
        },
    }
    values.update({name: getattr(settings, name) for name in BUDGET_SETTINGS})
    values["reachability"] = settings.reachability
    values["hole_punching"] = settings.hole_punching
    values["relay"] = {"serve": settings.relay} | {
        name.removeprefix("relay_"): getattr(settings, name) for name in RELAY_SETTINGS
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return NetworkSettings(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"][:1])
        raise NodeError(f"bad {where}: {err['msg'].removeprefix('Value error, ')}") from None


def limits_from(settings: Settings) -> Limits:
    return Limits(
        max_data_bytes=settings.max_data_bytes,
        max_control_bytes=settings.max_control_bytes,
        max_ttl_s=settings.max_ttl_s,
        clock_skew_s=settings.clock_skew_s,
        invoke_timeout_s=settings.invoke_timeout_s,
        replay_cache_size=settings.replay_cache_size,
        max_inflight=settings.max_inflight,
        max_inflight_per_peer=settings.max_inflight_per_peer,
        max_pending_decode_bytes=settings.max_pending_decode_bytes,
        max_pending_decode_bytes_per_peer=settings.max_pending_decode_bytes_per_peer,
        unknown_share=settings.unknown_share,
        ip_share=settings.ip_share,
    )


def bid_index_budget(settings: Settings) -> BidIndexBudget:
    return BidIndexBudget(
        rows=settings.bid_index_rows,
        bytes=settings.bid_index_bytes,
        rows_per_peer=settings.bid_index_rows_per_peer,
        bytes_per_peer=settings.bid_index_bytes_per_peer,
        max_age_s=settings.bid_index_max_age_s,
    )


def trust_limits_from(settings: Settings) -> TrustLimits:
    return TrustLimits(
        max_revocations=settings.max_revocations,
        revocations_per_issuer=settings.revocations_per_issuer,
        revocation_checks_per_s=settings.revocation_checks_per_s,
        revocation_checks_per_peer_per_s=settings.revocation_checks_per_peer_per_s,
        chain_checks_per_s=settings.chain_checks_per_s,
        chain_checks_per_peer_per_s=settings.chain_checks_per_peer_per_s,
    )


class StartWait:
    """Start-up's one wait for a store another process holds locked: until ``deadline``
    (``store_start_wait_s`` from its start), saying so every few seconds meanwhile
    (``progress``); past it :meth:`refusal` is what ``dms run`` says."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.wait_s = settings.store_start_wait_s
        self.began = time.monotonic()
        self.deadline = self.began + self.wait_s
        url = settings.database_url
        path = sqlite_path(url)
        self.where = path if path is not None else _shown_url(url)
        self.holder = "another process" if path is not None else "another session"
        self._said = 0.0

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def open(self) -> Database:
        return open_database(self.settings.database_url, self.left(), self.progress)

    def progress(self, _waited_s: float = 0.0) -> None:
        """Told by the store while a start-up transaction waits (every ~2 s): said at
        most every ``START_PROGRESS_S``, with the time since start-up began."""
        waited = time.monotonic() - self.began
        if self._said and waited - self._said < START_PROGRESS_S - 0.1:
            return
        self._said = waited
        log.warning(
            "waiting for the store %s, which %s holds locked (a program with a write "
            "transaction open on it, e.g. sqlite3?): %.0f s so far, %g s at most "
            "(store_start_wait_s)", self.where, self.holder, waited, self.wait_s,
        )  # fmt: skip

    def started(self, node: ActorRef) -> None:
        """Wait for the node actor's on_start (its own store work, within the same
        deadline): the store's error that ended it (busy past the deadline, a damaged
        row) is raised here, in one line (the caller stops the actor); an actor whose
        start raised anything else (a bug: its traceback logged) is dead."""
        try:
            error = node.pykka_ref.ask(STARTED, timeout=self.left() + START_ASK_MARGIN_S)
        except pykka.ActorDeadError:
            raise NodeError("the node actor did not start: see the log") from None
        except pykka.Timeout:  # a slow machine: the start goes on, as it did before
            log.warning("the node actor is still starting after %g s", START_ASK_MARGIN_S)
            return
        if error is not None:
            raise error

    def refusal(self, busy: StoreBusy) -> str:
        waited = time.monotonic() - self.began
        return (
            f"the store {self.where} is locked by {self.holder} (a program with a write "
            f"transaction open on it, e.g. sqlite3): waited {waited:.0f} s for it "
            f"(store_start_wait_s = {self.wait_s:g}); the node did not start. End that "
            f"transaction, or wait longer with store_start_wait_s. ({busy})"
        )


def _shown_url(url: str) -> str:
    with contextlib.suppress(Exception):
        return make_url(url).render_as_string(hide_password=True)
    return "(its database URL)"


class Layered(Transport, ChunkNetwork, Protocol):
    """The host seen through a layer: frames for the actor system, chunks for the courier."""


# A simulation's fault layer (dms.sim.faults): given the libp2p host, what the actor
# system and the courier use in its place. None for every real node.
Layer = Callable[[Libp2pTransport], Layered]


class Node:
    """One node's parts, started and stopped together."""

    def __init__(
        self,
        settings: Settings,
        identity: Identity,
        network: NetworkSettings,
        *,
        api_port: int | None = None,
        db: Database | None = None,
        loop: SharedLoop | None = None,
        layer: Layer | None = None,
    ) -> None:
        self.settings = settings
        self._loop = loop
        self._layer = layer
        self.identity = identity
        self.network_settings = network
        self.api_port = settings.api_port if api_port is None else api_port
        self._db = db
        self.db: Database | None = None
        self.transport: Libp2pTransport | None = None
        self.system: ActorSystem | None = None
        self.node: ActorRef | None = None
        self.api: LocalApi | None = None
        self.ledger: ResourceLedger | None = None
        self.peer_table = PeerTable()
        self.stakes = StakeBook()
        self.bid_index: BidIndex | None = None
        self.started = 0.0
        self._lock = RunLock(settings.home)
        self.role_counts = RoleCounts()  # the roles' counts, filled in as the node starts
        self.metrics = NodeMetrics(self)  # GET /metrics: read at each scrape

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    def start(self, *, serve_api: bool = True) -> Node:
        home = self.settings.home
        self.started = time.monotonic()
        self._lock.acquire()  # AlreadyRunning names the pid of the node that holds the home
        waiting = StartWait(self.settings)
        try:
            private_home(home, self.settings.database_url)  # 0700 home, 0600 files
            check_listen_free(self.network_settings.listen)
            self.db = self._db or waiting.open()
            # All of start-up's store work, here and in the node actor's on_start, waits
            # for a store another process holds locked until one deadline, saying so.
            with self.db.waiting_until(waiting.left(), waiting.progress):
                peerbook = PeerBook(
                    self.db, self.settings.peerbook_max_peers, self.settings.unknown_share
                )
                self.transport = Libp2pTransport(
                    self.identity,
                    self.network_settings,
                    known_addrs=peerbook.dial_addrs(),
                    max_ttl_s=self.settings.max_ttl_s,
                    clock_skew_s=self.settings.clock_skew_s,
                    loop=self._loop,
                )
                trust = TrustStore.for_context(
                    home, NODE_KEY, self.identity.public_key, trust_limits_from(self.settings)
                )
                layered = self._layer(self.transport) if self._layer is not None else None
                self.system = ActorSystem(
                    self.identity,
                    self.metrics.count(layered or self.transport),  # bytes in and out (/metrics)
                    limits=limits_from(self.settings),
                    trust=trust,
                    deployment_policy=self.settings.deployment_policy,
                )
                self.system.answer_observers.append(self.metrics.answered)
                self.ledger = ResourceLedger(
                    self.db, holder_share=lambda: self.settings.preferences.max_peer_share
                )
                # Peers with an allocation here (or had one), or anchored: they keep their
                # share of every global budget (dms.node.stakes).
                self.stakes = StakeBook(is_root=trust.is_root)
                self.stakes.note_all(self.ledger.committed_holders(STAKES_AT_START), "allocation")
                self.system.admission.stake = self.stakes.__contains__
                self.system.behaviour_limits.stake = self.stakes.__contains__
                trust.chain_budget.stake = self.stakes.__contains__
                trust.revocation_budget.stake = self.stakes.__contains__
                self.system.admission.peer_ip = self.transport.remote_ip
                self.bid_index = BidIndex(
                    self.db, bid_index_budget(self.settings), self.stakes.__contains__
                )
                # ... and keep their connection slots when the connection budget is full.
                self.transport.stake = self.stakes.__contains__
                # ... and peers heard lately keep their addresses ahead of fresh keys'.
                self.transport.heard = self.peer_table.heard
                services = NodeServices(
                    home=home,
                    db=self.db,
                    network=self.transport,
                    chunk_network=layered,
                    peerbook=peerbook,
                    ledger=self.ledger,
                    onboarder=Onboarder(self.db, home, self.ledger, self.settings.benchmark_step_s),
                    preferences=self.settings.preferences,
                    peer_table=self.peer_table,
                    heartbeat_s=self.settings.heartbeat_s,
                    heartbeat_budget_per_s=self.settings.heartbeat_budget_per_s,
                    labels=self.settings.labels,
                    orphan_s=self.settings.orphan_s,
                    expire_every_s=self.settings.expire_every_s,
                    ended_allocations_kept=self.settings.ended_allocations_kept,
                    ended_allocation_keep_s=self.settings.ended_allocation_keep_s,
                    peer_forget_s=self.settings.peer_forget_s,
                    retention_s=self.settings.retention_s,
                    store_wait_s=self.settings.store_wait_s,
                    store_start_deadline=waiting.deadline,
                    store_progress=waiting.progress,
                    chunk_quota=self.settings.chunk_quota,
                    stakes=self.stakes,
                    bid_index=self.bid_index,
                    max_bid_slots=self.settings.max_bid_slots,
                    bid_requests_per_s_total=self.settings.bid_requests_per_s_total,
                    bid_request_burst_total=self.settings.bid_request_burst_total,
                    mining=SessionLimits(
                        step_floor_s=self.settings.mining_step_floor_s,
                        step_slack=self.settings.mining_step_slack,
                        max_replacements=self.settings.mining_max_replacements,
                    ),
                    unknown_share=self.settings.unknown_share,
                    collab_max_seats=self.settings.collab_max_seats,
                    collab_owner_timeout_s=self.settings.collab_owner_timeout_s,
                    collab_join_timeout_s=self.settings.collab_join_timeout_s,
                    counts=self.role_counts,
                )
                self.node = self.system.spawn(
                    NodeActor, services, inbox=ROOT_INBOX, identity=self.identity
                )
                waiting.started(self.node)
                if serve_api:
                    self.api = LocalApi(
                        self.system,
                        self.health,
                        self.effective_settings,
                        self.metrics.render,
                        max_connections=self.settings.api_max_connections,
                        timeout_s=self.settings.api_timeout_s,
                    )
                    try:
                        self.api.start(self.api_port)
                    except ApiError as err:
                        hint = "another program (another dms node?) has it: choose another"
                        raise ApiError(f"{err}; {hint} with --api-port (0: any free one)") from None
                    self.api.record(home)
                self.db.record("node.started", peer_id=self.peer_id, addrs=self.transport.addrs())
        except NetworkError as err:
            self.stop()
            raise NodeError(str(err)) from None
        except StoreBusy as exc:
            self.stop()
            raise NodeError(waiting.refusal(exc)) from None
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.api is not None:
            self.api.stop(self.settings.home)
            self.api = None
        if self.system is not None:
            self.system.stop()  # stops the node actor (peers flushed) and the transport
            self.system = None
        elif self.transport is not None:
            self.transport.stop()
        self.transport = None
        if self.db is not None:
            # Best effort, and within the node's bound: a store another process holds
            # locked (a start refused for it among them) does not hold the stop 30 s.
            bound = self.db.waiting_at_most(self.settings.store_wait_s)
            with contextlib.suppress(Exception), bound:
                self.db.record("node.stopped", peer_id=self.peer_id)
            if self._db is None:
                self.db.close()
            self.db = None
        self._lock.release()

    def addrs(self) -> list[str]:
        assert self.transport is not None
        return self.transport.addrs()

    def effective_settings(self) -> dict[str, Any]:
        """The settings this node runs with, as ``dms config show`` prints them: the
        files and variables, then the command line's flags (what ``dms run`` was given)."""
        data = self.settings.shown()
        network = self.network_settings
        data.update(listen=network.listen, bootstrap=network.bootstrap, mdns=network.mdns)
        data["api_port"] = self.api.port if self.api is not None else self.api_port
        data["daemon"] = {
            "pid": os.getpid(),
            "peer_id": self.peer_id,
            "addrs": self.transport.addrs() if self.transport is not None else [],
        }
        return data

    def health(self) -> dict[str, Any]:
        uptime = time.monotonic() - self.started if self.started else 0.0
        return {
            "status": "running",
            "node_id": self.identity.public_key.hex(),
            "did": self.identity.did,
            "peer_id": self.peer_id,
            "version": __version__,
            "uptime_s": round(uptime, 3),
        }

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
