"""``memory`` mode: hundreds of nodes in this process on the in-memory transport.

Each node is the real node actor (the same behaviours: heartbeats, the peers
table, bidding, leases in its own SQLite store, orchestration, allocations)
on an :class:`dms.actor.ActorSystem` whose transport is a
:class:`dms.actor.MemoryNetwork` attachment behind the scenario's fault layer.
What it leaves out is libp2p: no sockets, Noise, Yamux or gossipsub mesh (a
broadcast reaches every subscriber directly, and a frame is handed over on the
sender's thread), so it measures placement and the protocol, not the wire.
Mining is refused: its data travels as chunks on a libp2p stream protocol of
their own (``dms.network.transfer``), which this transport does not carry.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Any

import pykka

from dms.actor import ROOT_INBOX, ActorRef, ActorSystem, Limits, MemoryNetwork
from dms.node.home import NODE_KEY
from dms.node.node import STARTED, NodeActor
from dms.node.services import NodeServices
from dms.resources import Onboarder, OnboardRequest, ResourceLedger
from dms.security import Identity, TrustStore
from dms.sim.backend import (
    Backend,
    NodeSpec,
    Say,
    SimError,
    heartbeat_budget,
    nominal_capability,
)
from dms.sim.faults import FaultPlan, FaultyTransport
from dms.sim.scenario import NodeSettings
from dms.store import Database, open_database

# Heartbeat copies a second all nodes together receive: each is a signature check on
# the sender's thread and a turn of the receiver's mailbox.
MEMORY_HEARTBEATS_PER_S = 400.0
# The longest a node's start is waited for (its on_start: the store's first work).
START_WAIT_S = 60.0


class MemoryNode:
    """One node's parts on the in-memory network."""

    def __init__(
        self,
        spec: NodeSpec,
        home: Path,
        identity: Identity,
        network: MemoryNetwork,
        faults: FaultPlan,
        services: dict[str, Any],
        limits: Limits,
    ) -> None:
        self.spec = spec
        self.home = home
        self.identity = identity
        self.network = network
        self.faults = faults
        self.options = services
        self.limits = limits
        self.db: Database | None = None
        self.ledger: ResourceLedger | None = None
        self.system: ActorSystem | None = None
        self.transport: FaultyTransport | None = None
        self.node: ActorRef | None = None
        self.services: NodeServices | None = None

    def start(self, template: Path | None = None) -> MemoryNode:
        self.home.mkdir(parents=True, exist_ok=True)
        path = self.home / "dms.db"
        if template is not None and not path.exists():
            shutil.copyfile(template, path)  # an empty store at the latest schema: no migration
        self.db = open_database(f"sqlite:///{path}")
        prefs = self.spec.preferences
        self.ledger = ResourceLedger(self.db, holder_share=lambda: prefs.max_peer_share)
        onboarder = Onboarder(self.db, self.home, self.ledger)
        if self.spec.onboard is not None and not self.ledger.pools().is_onboarded:
            # Before the node actor starts: its first heartbeat carries its resources.
            request = {**self.spec.onboard.request(), "capability": nominal_capability()}
            onboarder.onboard(OnboardRequest.model_validate(request))
        self.transport = self.faults.layer(self.network.transport(self.identity.peer_id))
        trust = TrustStore.for_context(self.home, NODE_KEY, self.identity.public_key)
        self.system = ActorSystem(self.identity, self.transport, limits=self.limits, trust=trust)
        self.services = NodeServices(
            home=self.home,
            db=self.db,
            ledger=self.ledger,
            onboarder=onboarder,
            preferences=self.spec.preferences,
            labels=list(self.spec.labels),
            **self.options,
        )
        self.node = self.system.spawn(
            NodeActor, self.services, inbox=ROOT_INBOX, identity=self.identity
        )
        # Its on_start keeps a store's error for this handshake (as dms run's Node.start
        # asks): unasked, a node whose start failed ran on half-started, saying nothing.
        try:
            error = self.node.pykka_ref.ask(STARTED, timeout=START_WAIT_S)
        except pykka.ActorDeadError:
            error = "its node actor did not start: see the log"
        except pykka.Timeout:  # a slow machine: it goes on starting
            return self
        if error is not None:
            self.stop()
            raise SimError(f"{self.spec.name} did not start: {error}")
        return self

    @property
    def running(self) -> bool:
        return self.system is not None

    def crash(self) -> None:
        """Cut the node off first (no goodbye reaches anyone), then stop its parts."""
        if self.transport is not None:
            self.transport.cut()
        self.stop()

    def stop(self) -> None:
        if self.system is not None:
            with contextlib.suppress(Exception):
                self.system.stop()
            self.system = None
        if self.db is not None:
            with contextlib.suppress(Exception):
                self.db.close()
            self.db = None
        self.node = None


class MemoryBackend(Backend):
    mode = "memory"
    supports_mining = False
    onboards_at_start = True

    def __init__(
        self, root: Path, specs: list[NodeSpec], settings: NodeSettings, faults: FaultPlan
    ) -> None:
        super().__init__(root, specs, settings, faults)
        self.network = MemoryNetwork()
        self._nodes: dict[str, MemoryNode] = {}
        self._peer_ids: dict[str, str] = {}
        self.template: Path | None = None

    def default_heartbeat(self) -> tuple[float, float]:
        # Every node hears every heartbeat once (no mesh copies). Each node beats at the
        # budgeted interval from the start (N / budget): a newcomer that knows few peers
        # would otherwise beat every few seconds, and N newcomers flood the network.
        n = len(self.specs)
        budget = heartbeat_budget(n, MEMORY_HEARTBEATS_PER_S, copies=1.0)
        return max(2.0, n / budget), budget

    def start(self, say: Say) -> None:
        heartbeat_s, budget = self.mode_defaults()
        options = {
            "heartbeat_s": heartbeat_s,
            "heartbeat_budget_per_s": budget,
            "orphan_s": self.settings.orphan_s,
        }
        limits = Limits(invoke_timeout_s=self.settings.invoke_timeout_s)
        self.root.mkdir(parents=True, exist_ok=True)
        self.template = self.root / "empty.db"
        open_database(f"sqlite:///{self.template}").close()
        # The requesters first: a node hears the first heartbeat of every node started
        # after it, and the next one of the others only an interval later.
        order = sorted(self.specs, key=lambda spec: spec.name not in self.first)
        for i, spec in enumerate(order):
            identity = Identity.generate()
            node = MemoryNode(
                spec, self.root / spec.name, identity, self.network, self.faults, options, limits
            )
            self._nodes[spec.name] = node.start(self.template)
            self._peer_ids[spec.name] = identity.peer_id
            say(f"started {i + 1}/{len(order)}")

    def node(self, name: str) -> MemoryNode:
        try:
            return self._nodes[name]
        except KeyError:
            raise SimError(f"no node {name!r}") from None

    def running(self, name: str) -> bool:
        return self.node(name).running

    def peer_id(self, name: str) -> str:
        return self._peer_ids[name]

    def call(self, name: str, behaviour: str, payload: Any = None, timeout: float = 30.0) -> Any:
        ref = self.node(name).node
        if ref is None:
            raise SimError(f"{name} is not running")
        return ref.ask(ref.handle, behaviour, payload, timeout=timeout)

    def call_as(self, name: str, target: Any, behaviour: str, timeout: float) -> Any:
        ref = self.node(name).node
        if ref is None:
            raise SimError(f"{name} is not running")
        return ref.ask(target, behaviour, None, timeout=timeout)

    def crash(self, name: str) -> None:
        self.check_running(name)
        self.node(name).crash()

    def restart(self, name: str) -> None:
        old = self.node(name)
        if old.running:
            raise SimError(f"{name} is running: kill it first")
        fresh = MemoryNode(
            old.spec, old.home, old.identity, self.network, self.faults, old.options, old.limits
        )
        self._nodes[name] = fresh.start(self.template)

    def live_leases(self, name: str) -> int:
        ledger = self.node(name).ledger
        return len(ledger.live()) if ledger is not None else 0

    def alive_peers(self, name: str) -> dict[str, float]:
        services = self.node(name).services
        if services is None:
            return {}
        out = {}
        for record in services.peer_table.alive():
            hb = record.heartbeat
            out[record.peer_id] = float(hb.onboarded.get("cpu") or 0.0) if hb else 0.0
        return out

    def settle(self, timeout: float, quiet_s: float = 0.5) -> bool:
        """Until every node actor's mailbox has been empty for ``quiet_s``: N nodes
        started in a row leave N x N heartbeats to take in."""
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            backlog = 0
            for node in self._nodes.values():
                if node.node is not None:
                    backlog += node.node.pykka_ref.actor_inbox.qsize()
            now = time.monotonic()
            if backlog:
                quiet_since = now
            elif now - quiet_since >= quiet_s:
                return True
            time.sleep(0.05)
        return False

    def describe(self, name: str) -> dict[str, Any]:
        return {**super().describe(name), "home": str(self.node(name).home)}

    def stop(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        nodes = [n for n in self._nodes.values() if n.running]
        for node in nodes:  # the whole network stops: no goodbye heartbeats (N x N frames)
            if node.transport is not None:
                node.transport.cut()
        if nodes:
            with ThreadPoolExecutor(min(32, len(nodes)), thread_name_prefix="dms-sim-stop") as p:
                list(p.map(MemoryNode.stop, nodes))
        self.network.close()
