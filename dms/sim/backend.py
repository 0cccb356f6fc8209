"""What a simulation needs from its nodes, whichever way they run (``specs/sim.md``).

A backend starts the scenario's nodes and then offers the same few operations
in every mode: ask a node's behaviour as its owner would (``call``), kill one
abruptly (``crash``), start it again from its home (``restart``), and read what
the expectations check (live leases, the peers a node knows). Everything else
the runner does through the nodes' own behaviours (``/dms/node/deployment/*``,
``/dms/node/mining/*``, ``/dms/node/onboarding/*``), so a scenario exercises
the same code paths in every mode.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from dms.errors import DmsError
from dms.node.home import NODE_KEY, USER_KEY
from dms.resources import Preferences
from dms.resources.benchmark import Capability
from dms.security import Identity, Keystore, TrustStore
from dms.sim.faults import FaultPlan
from dms.sim.scenario import Amounts, NodeSettings

Say = Callable[[str], None]


class SimError(DmsError):
    """The simulation cannot do what the scenario asks (a node not running, ...)."""


@dataclass
class NodeSpec:
    name: str
    group: str
    labels: list[str] = field(default_factory=list)
    preferences: Preferences = field(default_factory=Preferences)
    onboard: Amounts | None = None


def nominal_capability() -> Capability:
    """What simulated nodes register instead of measuring: N nodes on one machine would
    benchmark the same machine N times (about 4 s each). Figures of a small 2-core
    machine; ``seconds`` 0 marks them as not measured."""
    return Capability(
        measured_at=time.time(),
        seconds=0.0,
        cores=os.cpu_count() or 1,
        cpu_single_mops=100.0,
        cpu_all_mops=200.0,
        memory_gbps=5.0,
        disk_write_mbps=200.0,
        disk_read_mbps=500.0,
        ckks_add_per_s=5000.0,
        ckks_mul_per_s=500.0,
        ckks_rotate_per_s=1000.0,
        liu_encrypt_per_s=100000.0,
        liu_add_per_s=1000000.0,
    )


def prepare_home(home: Path, passphrase: str) -> tuple[Identity, Identity]:
    """A home as ``dms init`` leaves it: node and user keys (sealed with ``passphrase``),
    the user a root of the node. Returns (node, user) identities."""
    keystore = Keystore(home, passphrase=lambda _context, _new: passphrase)
    node, user = Identity.generate(), Identity.generate()
    keystore.new(NODE_KEY, node)
    keystore.new(USER_KEY, user)
    TrustStore.for_context(home, NODE_KEY).anchor_root(user.did)
    return node, user


def heartbeat_budget(nodes: int, copies_per_s: float, copies: float = 4.0) -> float:
    """Heartbeats a second for the whole simulated network, so that every node together
    receives about ``copies_per_s`` copies a second: N nodes on one machine do N times
    a real node's gossip work (``dms.sim.cluster.shared_process_heartbeat_budget``)."""
    return min(10.0, copies_per_s / (max(1, nodes) * copies))


class Backend(ABC):
    """N nodes of one mode, by name."""

    mode: ClassVar[str]
    supports_mining: ClassVar[bool] = True
    # Nodes onboard before they start (their first heartbeat carries their resources),
    # instead of through /dms/node/onboarding/onboard once running.
    onboards_at_start: ClassVar[bool] = False

    def __init__(
        self, root: Path, specs: list[NodeSpec], settings: NodeSettings, faults: FaultPlan
    ) -> None:
        self.root = Path(root)
        self.specs = specs
        self.settings = settings
        self.faults = faults
        self.first: list[str] = []  # nodes to start first (the runner's requesters)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def spec(self, name: str) -> NodeSpec:
        return next(s for s in self.specs if s.name == name)

    @abstractmethod
    def start(self, say: Say) -> None:
        """Start every node and return once they are linked."""

    @abstractmethod
    def running(self, name: str) -> bool: ...

    @abstractmethod
    def peer_id(self, name: str) -> str: ...

    @abstractmethod
    def call(self, name: str, behaviour: str, payload: Any = None, timeout: float = 30.0) -> Any:
        """Ask ``behaviour`` of node ``name`` as its owner; ``RemoteError`` on refusal."""

    def hello(self, name: str, peer_id: str, timeout: float = 10.0) -> None:
        """Have node ``name`` invoke ``/public/hello`` of the node ``peer_id``: the first
        message to a peer opens the streams both ways, later ones reuse them."""
        from dms.node.client import root_handle

        self.call_as(name, root_handle(peer_id), "/public/hello", timeout)

    def call_as(self, name: str, target: Any, behaviour: str, timeout: float) -> Any:
        """Node ``name``'s actor invokes ``behaviour`` of another node's actor."""
        raise NotImplementedError

    def onboard(self, name: str, amounts: Amounts, timeout: float = 60.0) -> None:
        """Onboard node ``name`` as ``dms onboard`` would, with the nominal capability
        (simulated nodes do not benchmark the machine they share)."""
        payload = {**amounts.request(), "capability": nominal_capability().model_dump(mode="json")}
        self.call(name, "/dms/node/onboarding/onboard", payload, timeout=timeout)

    @abstractmethod
    def crash(self, name: str) -> None:
        """Kill the node at once: no goodbye, no clean-up (kill -9)."""

    @abstractmethod
    def restart(self, name: str) -> None:
        """Start a stopped node again from its home (same key, same store)."""

    @abstractmethod
    def live_leases(self, name: str) -> int:
        """Leases and allocations still live on a running node."""

    @abstractmethod
    def alive_peers(self, name: str) -> dict[str, float]:
        """Peers the node holds alive in its peers table: peer id -> onboarded cpu."""

    @abstractmethod
    def stop(self) -> None:
        """Stop every node (cleanly), and whatever the backend started."""

    def settle(self, timeout: float) -> bool:
        """Wait for the nodes to be done with start-up (heartbeats heard, dials made);
        whether they were within ``timeout``. Measurements start after it."""
        return True

    def describe(self, name: str) -> dict[str, Any]:
        """What a person needs to use the node with the normal CLI."""
        return {"name": name, "peer_id": self.peer_id(name), "running": self.running(name)}

    def name_of(self, peer_id: str) -> str | None:
        return next((n for n in self.names if self.peer_id(n) == peer_id), None)

    def check_running(self, name: str) -> None:
        if not self.running(name):
            raise SimError(f"{name} is not running")

    def mode_defaults(self) -> tuple[float, float]:
        """(heartbeat_s, heartbeat_budget_per_s) for this mode and size, unless the
        scenario sets them."""
        beat, budget = self.default_heartbeat()
        s = self.settings
        return (s.heartbeat_s or beat, s.heartbeat_budget_per_s or budget)

    def default_heartbeat(self) -> tuple[float, float]:
        return 0.5, heartbeat_budget(len(self.specs), 60.0)
