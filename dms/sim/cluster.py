"""Real nodes on loopback in one process: the integration fixture and the benchmarks.

Every node is a full :class:`dms.node.daemon.Node` (libp2p host, store,
actor system, node actor) with its own home folder under ``root``. Nodes are
joined by bootstrap addresses, as a person would join them.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dms.config import load_settings
from dms.network.host import SharedLoop
from dms.network.settings import GossipSettings, NetworkSettings
from dms.node.daemon import Node, network_settings
from dms.security import Identity
from dms.sim.faults import FaultPlan

LOOPBACK_LISTEN = "/ip4/127.0.0.1/tcp/0"
# Gossip heartbeat copies a second that all nodes of one process receive together.
SHARED_PROCESS_HEARTBEATS_PER_S = 60.0
# Threads that stop nodes together when a cluster ends.
MAX_PARALLEL_STOPS = 32
# Settings of nodes sharing one trio loop (and one GIL), under the cluster's own: every
# node's handshakes run there. py-libp2p's aim of 175 connections had every node of a
# cluster under 176 dial every other at start (780 handshakes at 40 nodes, p90 4.7-6.0 s,
# 57-91 s to settle); a dozen each still joins every node to the gossip mesh
# (specs/sim.md, "Threads mode at tens of nodes"). A handshake waits its turn behind the
# others' on the loop, so dials and handshakes get three times a real node's 5 s.
SHARED_LOOP_SETTINGS: dict[str, Any] = {
    "connection_aim": 12,
    "dial_timeout_s": 15.0,
    "handshake_timeout_s": 15.0,
}


def shared_process_heartbeat_budget(
    nodes: int,
    received_per_s: float = SHARED_PROCESS_HEARTBEATS_PER_S,
    copies: float = float(GossipSettings().degree),
) -> float:
    """The ``heartbeat_budget_per_s`` for ``nodes`` simulated in one process.

    Every node receives every heartbeat, about ``copies`` times (once from each
    gossip mesh peer that forwards it; measured: 4 to 6 with D = 4), so N nodes
    in one process (and one GIL) do N times the gossip work of one real node,
    and py-libp2p spends ~1.5 ms of CPU on each copy. The budget is scaled so
    the whole simulation receives about ``received_per_s`` copies a second
    (~10 % of a core), never more than a real node's default of 10 heartbeats
    sent a second network-wide.
    """
    return min(10.0, received_per_s / (max(1, nodes) * copies))


class LocalCluster:
    def __init__(
        self,
        root: Path,
        *,
        serve_api: bool = False,
        seed: int = 0,
        shared_loop: bool = True,
        faults: FaultPlan | None = None,
        **settings: Any,
    ):
        self.root = Path(root)
        self.faults = faults  # applied where each node's frames and chunks arrive
        # One trio loop for every host (see SharedLoop), made when the first node starts.
        self._shared = shared_loop
        self._loop: SharedLoop | None = None
        self.serve_api = serve_api
        self.settings = settings
        self.nodes: list[Node] = []
        self._identities: dict[str, Identity] = {}
        self._overrides: dict[str, dict[str, Any]] = {}
        self._rng = random.Random(seed)

    def add(
        self,
        name: str | None = None,
        *,
        bootstrap: list[str] | None = None,
        identity: Identity | None = None,
        **overrides: Any,
    ) -> Node:
        """Start a node; by default it bootstraps from up to three running nodes.
        ``overrides`` are settings of this node alone (labels, preferences, ...)."""
        name = name or f"node{len(self._identities)}"
        if bootstrap is None:
            bootstrap = self.bootstrap_addrs()
        identity = self._identities.setdefault(name, identity or Identity.generate())
        self._overrides[name] = overrides
        node = self._start(name, identity, bootstrap)
        self.nodes.append(node)
        return node

    def bootstrap_addrs(self, most: int = 3) -> list[str]:
        """Addresses of up to ``most`` running nodes, picked at random."""
        running = [n for n in self.nodes if n.transport is not None]
        picks = self._rng.sample(running, min(most, len(running)))
        return [n.addrs()[0] for n in picks]

    def start(self, count: int) -> list[Node]:
        return [self.add() for _ in range(count)]

    def wait_linked(self, timeout: float = 30.0) -> None:
        """Return once every node has a connection (bootstrap dials are asynchronous)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(n.transport is not None and n.transport.peers() for n in self.nodes):
                return
            time.sleep(0.05)
        raise TimeoutError(f"nodes not linked within {timeout:g} s")

    def wait_settled(self, timeout: float = 60.0, quiet_s: float = 2.0) -> bool:
        """Wait for the end of start-up; return whether it ended within ``timeout``.

        Start-up is over when every node's peers table holds every other node
        (so none is still in a newcomer's fast heartbeats), every node holds as
        many connections as its connection manager aims at (``aimed_connections``,
        counted as it counts them: ``connection_count``), or one with every other
        node in a smaller cluster (it dials the peers whose heartbeats named their
        addresses, in waves about 10 s apart, each dial a Noise handshake), and no
        count has changed for ``quiet_s``. A burst of dials or fast heartbeats
        would load whatever is measured next.
        """
        deadline = time.monotonic() + timeout
        last: list[int] | None = None
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            running = [(n, n.transport) for n in self.nodes if n.transport is not None]
            others = len(running) - 1
            tables = all(len(n.peer_table.alive()) >= others for n, _ in running)
            counts = [len(transport.peers()) for _, transport in running]
            wanted = all(
                count >= others
                or transport.connection_count() >= n.network_settings.aimed_connections()
                for (n, transport), count in zip(running, counts, strict=True)
            )
            if counts != last:
                last, quiet_since = counts, time.monotonic()
            elif tables and wanted and time.monotonic() - quiet_since >= quiet_s:
                return True
            time.sleep(0.2)
        return False

    def restart(self, node: Node, bootstrap: list[str] | None = None) -> Node:
        """Stop ``node`` (if it still runs) and start it again from the same home and key;
        it dials the peers it knew, and ``bootstrap`` too."""
        name = node.settings.home.name
        node.stop()
        fresh = self._start(name, node.identity, bootstrap or [])
        self.nodes[self.nodes.index(node)] = fresh
        return fresh

    def crash(self, node: Node) -> None:
        """Take ``node`` off the network abruptly: its host stops before the node can say
        goodbye, as when the process is killed; then the rest of it stops."""
        if node.transport is not None:
            node.transport.stop()
        node.stop()

    def stop(self) -> None:
        """Stop every node at once. One after another, each host's goodbye waits on a
        loop still busy with the running nodes' dials and gossip (up to 10 s each: a
        50-node simulation took minutes to end)."""
        if self.nodes:
            workers = min(len(self.nodes), MAX_PARALLEL_STOPS)
            with ThreadPoolExecutor(workers, thread_name_prefix="dms-sim-stop") as pool:
                list(pool.map(Node.stop, self.nodes))
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def _start(self, name: str, identity: Identity, bootstrap: list[str]) -> Node:
        shared = SHARED_LOOP_SETTINGS if self._shared else {}
        overrides = {**shared, **self.settings, **self._overrides.get(name, {})}
        settings = load_settings(home=self.root / name, api_port=0, **overrides)
        network: NetworkSettings = network_settings(
            settings, listen=[LOOPBACK_LISTEN], bootstrap=bootstrap
        )
        if self._shared and self._loop is None:
            self._loop = SharedLoop()
        layer = self.faults.layer if self.faults is not None else None
        node = Node(settings, identity, network, api_port=0, loop=self._loop, layer=layer)
        return node.start(serve_api=self.serve_api)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
