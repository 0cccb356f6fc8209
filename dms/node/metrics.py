"""Prometheus metrics of one node: ``GET /metrics`` on the local API.

Every node has a registry of its own (``LocalCluster`` runs many nodes in one
process), holding one collector that reads the node's state when it is scraped:
the actor system's refusal counts, the ledger's leases, the peers table, the
store's deployments and mining sessions, and the counts the roles keep as they
happen (``RoleCounts``: the revert outbox, the held checks). Two things are
counted here as they happen, because nothing keeps them otherwise: the invokes
this node answers (an observer of ``ActorSystem``) and the frames its transport
moves (:class:`CountingTransport`, a wrapper like ``dms.sim.faults.FaultyTransport``).
Names: ``specs/metrics.md``.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import select

from dms import __version__
from dms.actor.admission import BudgetUse
from dms.actor.system import ActorSystem
from dms.actor.transport import Receiver, Transport, Undeliverable
from dms.config import Settings
from dms.network.host import Libp2pTransport
from dms.network.peertable import PeerTable
from dms.node.services import RoleCounts
from dms.orchestrator.stored import read_session
from dms.provider.bidindex import BidIndex
from dms.resources.ledger import ResourceLedger
from dms.store import Database, StoreBusy
from dms.store.models import DeploymentRecord, MiningSessionRecord
from dms.store.sql import as_text


class Node(Protocol):
    """What the metrics read of a running node (``dms.node.daemon.Node``), declared here
    so that this module does not import the daemon that imports it."""

    @property
    def peer_id(self) -> str: ...
    @property
    def started(self) -> float: ...
    @property
    def db(self) -> Database | None: ...
    @property
    def transport(self) -> Libp2pTransport | None: ...
    @property
    def system(self) -> ActorSystem | None: ...
    @property
    def ledger(self) -> ResourceLedger | None: ...
    @property
    def peer_table(self) -> PeerTable: ...
    @property
    def bid_index(self) -> BidIndex | None: ...
    @property
    def settings(self) -> Settings: ...
    @property
    def role_counts(self) -> RoleCounts: ...


log = logging.getLogger("dms.node")


# Seconds from a deployment's request to its last allocation running.
PLACEMENT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0, 300.0)
# Seconds of one mining step (every shard answered and the owner combined).
ROUND_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# Distinct behaviour names kept as label values; the rest count as "other", so a
# peer that invokes made-up names cannot grow the metrics without bound.
MAX_BEHAVIOURS = 256
UNKNOWN_CODES = frozenset({"unknown_behaviour", "unknown_actor"})

DEPLOYMENTS = DeploymentRecord.__table__
MINING = MiningSessionRecord.__table__


class Traffic:
    """Frames and bytes a transport moved, by direction (in, out) and kind (direct,
    gossip). Inbound gossip frames cannot be told from direct ones at the transport,
    so inbound frames are all counted as kind ``any``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.frames: Counter[tuple[str, str]] = Counter()
        self.bytes: Counter[tuple[str, str]] = Counter()

    def add(self, direction: str, kind: str, size: int) -> None:
        with self._lock:
            self.frames[(direction, kind)] += 1
            self.bytes[(direction, kind)] += size

    def snapshot(self) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int]]:
        with self._lock:
            return dict(self.frames), dict(self.bytes)


class CountingTransport:
    """A :class:`dms.actor.Transport` that counts what passes through it."""

    def __init__(self, inner: Transport, traffic: Traffic) -> None:
        self.inner = inner
        self.traffic = traffic

    @property
    def peer_id(self) -> str:
        return self.inner.peer_id

    def start(self, receiver: Receiver, undeliverable: Undeliverable | None = None) -> None:
        traffic = self.traffic

        def arrive(frame: bytes, from_peer: str | None, *, signature_checked: bool = False) -> None:
            traffic.add("in", "any", len(frame))
            receiver(frame, from_peer, signature_checked=signature_checked)

        self.inner.start(arrive, undeliverable)

    def send(self, peer_id: str, frame: bytes) -> None:
        self.inner.send(peer_id, frame)
        self.traffic.add("out", "direct", len(frame))

    def publish(self, topic: str, frame: bytes) -> None:
        self.inner.publish(topic, frame)
        self.traffic.add("out", "gossip", len(frame))

    def subscribe(self, topic: str) -> None:
        self.inner.subscribe(topic)

    def unsubscribe(self, topic: str) -> None:
        self.inner.unsubscribe(topic)

    def stop(self) -> None:
        self.inner.stop()


def _copy(counter: Counter[Any]) -> dict[Any, int]:
    """A consistent copy of a counter other threads update."""
    for _ in range(10):
        try:
            return dict(counter)
        except RuntimeError:  # changed size during the copy
            continue
    return {}


def histogram(
    name: str, doc: str, values: Iterable[float], buckets: tuple[float, ...]
) -> HistogramMetricFamily:
    values = sorted(values)
    counts, at = [], 0
    for bound in buckets:
        while at < len(values) and values[at] <= bound:
            at += 1
        counts.append((_bound(bound), at))
    counts.append(("+Inf", len(values)))
    return HistogramMetricFamily(name, doc, buckets=counts, sum_value=sum(values))


def _bound(value: float) -> str:
    return repr(float(value))


def _times(*values: Any) -> bool:
    """Whether each of ``values`` is a time (a stored row's may be anything)."""
    return all(isinstance(v, int | float) for v in values)


class NodeCollector(Collector):
    """Reads one node's state at each scrape."""

    def __init__(self, node: Node, metrics: NodeMetrics) -> None:
        self.node = node
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        node = self.node
        info = InfoMetricFamily("dms_node", "This node: its peer id and dms version.")
        info.add_metric([], {"peer_id": node.peer_id, "version": __version__})
        yield info
        uptime = time.monotonic() - node.started if node.started else 0.0
        yield GaugeMetricFamily("dms_uptime_seconds", "Seconds since the node started.", uptime)
        yield from self._actors()
        yield from self._budgets()
        yield from self._network()
        yield from self._given_back()
        figures = self._from_store()
        yield from self._store_busy()  # after the reads: a refusal of this scrape counted
        yield from figures
        yield from self._collector()

    def _from_store(self) -> list[Metric]:
        """The figures read from the store (the ledger's pools and leases, deployments,
        mining sessions), within the node's ``store_wait_s``; none if the store stayed
        busy that long (another process holding it locked): the scrape answers at once
        without them, ``dms_store_read`` 0, rather than wait SQLite's 30 s."""
        db = self.node.db
        if db is None:
            return list(self._resources())
        try:
            with db.waiting_at_most(self.node.settings.store_wait_s):
                figures = [*self._resources(), *self._store()]
        except StoreBusy as exc:
            log.warning("/metrics: the store's figures are left out of this scrape: %s", exc)
            figures, read = [], 0
        else:
            read = 1
        return [
            GaugeMetricFamily(
                "dms_store_read",
                "1: this scrape read the store's figures (dms_resources, dms_leases, "
                "dms_deployments, dms_placement_seconds, dms_mining_*); 0: the store stayed "
                "busy past store_wait_s and they are left out of it.",
                read,
            ),
            *figures,
        ]

    # ---- the process's garbage collector ----------------------------------------------

    def _collector(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "dms_gc_frozen_objects",
            "Objects kept out of the collector's passes (dms run freezes its start heap).",
            gc.get_freeze_count(),
        )
        runs = CounterMetricFamily(
            "dms_gc_collections",
            "Collections by the process's garbage collector, by generation.",
            labels=["generation"],
        )
        for generation, stats in enumerate(gc.get_stats()):
            runs.add_metric([str(generation)], stats["collections"])
        yield runs

    # ---- the actor system -----------------------------------------------------------

    def _actors(self) -> Iterator[Metric]:
        invokes = CounterMetricFamily(
            "dms_invokes",
            "Invokes this node answered, by behaviour and outcome (ok, or the refusal's code).",
            labels=["behaviour", "outcome"],
        )
        for (behaviour, outcome), count in sorted(self.metrics.invokes().items()):
            invokes.add_metric([behaviour, outcome], count)
        yield invokes
        refusals = CounterMetricFamily(
            "dms_refusals",
            "Messages and API requests refused, by code and by the layer that refused them "
            "(actor: the receive pipeline and the local API; network: the transport, before "
            "the actor system saw the frame). Every refusal is logged too.",
            labels=["code", "layer"],
        )
        system = self.node.system
        for code, count in sorted(_copy(system.refusals).items() if system else ()):
            refusals.add_metric([code, "actor"], count)
        network = getattr(self.node.transport, "refusals", None)
        for code, count in sorted(_copy(network).items() if isinstance(network, Counter) else ()):
            refusals.add_metric([str(code), "network"], count)
        yield refusals
        trust = system.trust if system is not None else None
        revocations = CounterMetricFamily(
            "dms_revocations",
            "Revocations this node was given or heard, by outcome (stored, or why not: "
            "unknown_token, issuer_full, store_full, over_budget, queue_full, ...).",
            labels=["outcome"],
        )
        for outcome, count in sorted(_copy(trust.revocation_outcomes).items() if trust else ()):
            revocations.add_metric([outcome], count)
        yield revocations
        chains = CounterMetricFamily(
            "dms_token_chain_checks_refused",
            "New token chains refused over the chain check budget (rate_limited, rule "
            "over_budget), by the budget spent: one peer's or all peers'.",
            labels=["scope"],
        )
        for scope, count in sorted(_copy(trust.chain_budget.refused).items() if trust else ()):
            chains.add_metric([scope], count)
        yield chains

    def _budgets(self) -> Iterator[Metric]:
        """What remote peers make this node hold, against each global and per-peer
        budget (specs/security.md, "Global budgets")."""
        uses: list[BudgetUse] = []
        system = self.node.system
        if system is not None:
            uses += system.admission.usage()
            uses += [
                BudgetUse(name, 0, 0, count)
                for name, count in sorted(system.behaviour_limits.refused().items())
            ]
        if self.node.bid_index is not None:
            uses += self.node.bid_index.usage()
        used = GaugeMetricFamily(
            "dms_budget_used",
            "What remote peers hold of each budget now (per_peer: the peer holding most).",
            labels=["budget"],
        )
        limit = GaugeMetricFamily(
            "dms_budget_limit", "The bound of each budget (its setting).", labels=["budget"]
        )
        refused = CounterMetricFamily(
            "dms_budget_refusals",
            "Requests refused because a budget was full, by budget.",
            labels=["budget"],
        )
        for use in uses:
            if use.limit:
                used.add_metric([use.name], use.used)
                limit.add_metric([use.name], use.limit)
            refused.add_metric([use.name], use.refused)
        yield used
        yield limit
        yield refused

    def _network(self) -> Iterator[Metric]:
        frames, sizes = self.metrics.traffic.snapshot()
        frame_family = CounterMetricFamily(
            "dms_network_frames",
            "Envelopes this node's transport sent and received.",
            labels=["direction", "kind"],
        )
        byte_family = CounterMetricFamily(
            "dms_network_bytes",
            "Bytes of envelopes this node's transport sent and received (chunks apart).",
            labels=["direction", "kind"],
        )
        for (direction, kind), count in sorted(frames.items()):
            frame_family.add_metric([direction, kind], count)
            byte_family.add_metric([direction, kind], sizes.get((direction, kind), 0))
        yield frame_family
        yield byte_family
        transport = self.node.transport
        offers = getattr(transport, "offers", None)
        served = CounterMetricFamily(
            "dms_chunk_served_bytes", "Chunk bytes this node served to peers (bulk transfer)."
        )
        served.add_metric([], offers.served_bytes if offers is not None else 0)
        yield served
        if offers is not None:
            yield GaugeMetricFamily(
                "dms_chunk_store_bytes",
                "Bytes in this node's chunk store.",
                offers.store.used_bytes,
            )
        peers = GaugeMetricFamily(
            "dms_peers", "Peers in the heartbeat peers table, by status.", labels=["status"]
        )
        statuses = Counter(r.status for r in self.node.peer_table.records())
        for status in sorted({"alive", "gone", *statuses}):
            peers.add_metric([status], statuses.get(status, 0))
        yield peers
        if transport is not None:
            try:
                connected = len(transport.peers())
            except Exception:  # a host still starting or stopping
                connected = 0
            yield GaugeMetricFamily(
                "dms_connections", "Peers this node holds a libp2p connection to.", connected
            )
            used = GaugeMetricFamily(
                "dms_network_budget_used",
                "What remote peers hold of each network budget now (specs/security.md, "
                "'Budgets and priority'); a per-peer or per-IP budget shows its fullest.",
                labels=["budget"],
            )
            limit = GaugeMetricFamily(
                "dms_network_budget_limit", "Each network budget's limit.", labels=["budget"]
            )
            try:
                usage = transport.budget_usage()
            except RuntimeError:  # a count changed size under us: the next scrape has it
                usage = {}
            for name, (now, most) in sorted(usage.items()):
                used.add_metric([name], now)
                limit.add_metric([name], most)
            yield used
            yield limit

    # ---- leases given back: the revert outbox, the held checks -------------------------

    def _given_back(self) -> Iterator[Metric]:
        """Counted by the roles as they happen (``RoleCounts``): no read of the store."""
        counts = self.node.role_counts
        outbox = counts.reverts
        reverts = CounterMetricFamily(
            "dms_reverts",
            "Reverts this node's deployments sent providers (leases given back), by "
            "outcome: acknowledged (the provider answered), abandoned (no answer within "
            "the outbox's horizon, or dropped with the outbox full).",
            labels=["outcome"],
        )
        reverts.add_metric(["acknowledged"], outbox.acknowledged if outbox else 0)
        reverts.add_metric(["abandoned"], outbox.abandoned if outbox else 0)
        yield reverts
        yield GaugeMetricFamily(
            "dms_reverts_pending",
            "Reverts sent and not yet acknowledged or abandoned (sent again until then).",
            outbox.pending if outbox else 0,
        )
        checks = counts.held_checks
        yield CounterMetricFamily(
            "dms_held_check_questions",
            "Questions this node sent requesters silent on its allocations for orphan_s: "
            "which of these leases do you still hold (/dms/deployment/held).",
            value=checks.asked if checks else 0,
        )
        yield CounterMetricFamily(
            "dms_held_check_let_go",
            "Allocations this node stopped because their requester answered that it no "
            "longer holds them.",
            value=checks.let_go if checks else 0,
        )

    # ---- the ledger and the store ----------------------------------------------------

    def _resources(self) -> Iterator[Metric]:
        ledger = self.node.ledger
        if ledger is None:
            return
        pools = ledger.pools()
        gauge = GaugeMetricFamily(
            "dms_resources",
            "Onboarded resources by pool (onboarded = free + locked + allocated).",
            labels=["pool", "resource"],
        )
        for pool in ("onboarded", "free", "locked", "allocated"):
            amounts = getattr(pools, pool).human()
            for resource in ("cpu", "ram_gib", "disk_gib", "gpu"):
                gauge.add_metric([pool, resource], float(amounts.get(resource, 0)))
        yield gauge
        counts = ledger.lease_counts()
        leases = GaugeMetricFamily(
            "dms_leases",
            "Leases in the ledger by state (locked and allocated hold resources now).",
            labels=["state"],
        )
        for name in ("locked", "allocated", "released", "expired"):
            leases.add_metric([name], counts.get(name, 0))
        yield leases

    def _store_busy(self) -> Iterator[Metric]:
        """Counted as they happen (the store keeps them): no read of the store."""
        db = self.node.db
        if db is None:
            return
        busy = CounterMetricFamily(
            "dms_store_busy",
            "Store transactions refused because the store stayed busy past their wait "
            "(another process holding it locked; store_refused).",
        )
        busy.add_metric([], db.busy_refusals)
        yield busy
        waited = CounterMetricFamily(
            "dms_store_busy_wait_seconds",
            "Seconds those refused transactions waited for the store, each counted once.",
        )
        waited.add_metric([], db.busy_waited_s)
        yield waited

    def _store(self) -> Iterator[Metric]:
        db = self.node.db
        if db is None:
            return
        with db.transaction() as conn:
            deployments = conn.execute(
                select(DEPLOYMENTS.c.state, DEPLOYMENTS.c.created_at, DEPLOYMENTS.c.running_at)
            ).all()
            # Read as text, each row on its own: a progress that is not JSON raised out of
            # the whole scrape. What a row cannot give counts for nothing.
            stored = conn.execute(select(*as_text(MINING, ["phase", "progress"]))).all()
        sessions = [read_session(r._mapping) for r in stored]
        by_state = Counter(str(r.state) for r in deployments)
        gauge = GaugeMetricFamily(
            "dms_deployments", "Deployments this node requested, by state.", labels=["state"]
        )
        for state, count in sorted(by_state.items()):
            gauge.add_metric([state], count)
        yield gauge
        yield histogram(
            "dms_placement_seconds",
            "From a deployment's request to all its allocations running (this node's requests).",
            (
                r.running_at - r.created_at
                for r in deployments
                if _times(r.running_at, r.created_at) and r.running_at >= r.created_at
            ),
            PLACEMENT_BUCKETS,
        )
        phases = Counter(str(r["phase"]) for r in sessions)
        gauge = GaugeMetricFamily(
            "dms_mining_sessions", "Mining sessions this node owns, by phase.", labels=["phase"]
        )
        for phase, count in sorted(phases.items()):
            gauge.add_metric([phase], count)
        yield gauge
        steps = [
            float(step["s"])
            for r in sessions
            for step in r["progress"].get("steps") or []
            if isinstance(step.get("s"), int | float)
        ]
        rounds = CounterMetricFamily(
            "dms_mining_rounds", "Mining steps (rounds) combined by this node's sessions."
        )
        rounds.add_metric([], len(steps))
        yield rounds
        yield histogram(
            "dms_mining_round_seconds",
            "Time of one mining step: every shard answered and the owner combined.",
            steps,
            ROUND_BUCKETS,
        )


class NodeMetrics:
    """One node's registry and the counts nothing else keeps."""

    def __init__(self, node: Node) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.traffic = Traffic()
        self._lock = threading.Lock()
        self._invokes: Counter[tuple[str, str]] = Counter()
        self._behaviours: set[str] = set()  # label values in use (MAX_BEHAVIOURS)
        self.registry.register(NodeCollector(node, self))

    def count(self, transport: Transport) -> CountingTransport:
        return CountingTransport(transport, self.traffic)

    def answered(self, behaviour: str, outcome: str) -> None:
        """The observer ``ActorSystem`` calls for every invoke this node answers."""
        if outcome in UNKNOWN_CODES:
            behaviour = "(unknown)"
        with self._lock:
            if behaviour not in self._behaviours and behaviour != "(unknown)":
                if len(self._behaviours) >= MAX_BEHAVIOURS:
                    behaviour = "other"
                else:
                    self._behaviours.add(behaviour)
            self._invokes[(behaviour, outcome)] += 1

    def invokes(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._invokes)

    def render(self) -> bytes:
        """The text exposition format, as ``GET /metrics`` answers."""
        return generate_latest(self.registry)
