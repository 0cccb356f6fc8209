"""``threads`` mode: real nodes (libp2p on loopback) in this process, on one trio loop.

Each node is a full :class:`dms.node.daemon.Node` with its own home, key, store,
listener, Noise and Yamux sessions (``dms.sim.cluster.LocalCluster``). One
process means one GIL: good for a handful of nodes, not for fifty.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dms.node.daemon import Node
from dms.sim.backend import Backend, NodeSpec, Say, SimError, prepare_home
from dms.sim.cluster import LocalCluster
from dms.sim.faults import FaultPlan
from dms.sim.scenario import NodeSettings


class ThreadsBackend(Backend):
    mode = "threads"

    def __init__(
        self,
        root: Path,
        specs: list[NodeSpec],
        settings: NodeSettings,
        faults: FaultPlan,
        *,
        serve_api: bool = False,
        passphrase: str | None = None,
    ) -> None:
        super().__init__(root, specs, settings, faults)
        self.serve_api = serve_api
        self.passphrase = passphrase  # homes with keys, for the normal CLI ('dms sim up')
        self.cluster: LocalCluster | None = None
        self._nodes: dict[str, Node] = {}
        self._running: set[str] = set()

    def start(self, say: Say) -> None:
        heartbeat_s, budget = self.mode_defaults()
        self.cluster = LocalCluster(
            self.root,
            serve_api=self.serve_api,
            heartbeat_s=heartbeat_s,
            heartbeat_budget_per_s=budget,
            orphan_s=self.settings.orphan_s,
            invoke_timeout_s=self.settings.invoke_timeout_s,
            faults=self.faults,
        )
        for i, spec in enumerate(self.specs):
            identity = None
            if self.passphrase is not None:
                identity, _ = prepare_home(self.root / spec.name, self.passphrase)
            node = self.cluster.add(
                spec.name,
                identity=identity,
                labels=spec.labels,
                preferences=spec.preferences.model_dump(),
            )
            self._nodes[spec.name] = node
            self._running.add(spec.name)
            say(f"started {i + 1}/{len(self.specs)}")
        self.cluster.wait_linked(timeout=60)

    def settle(self, timeout: float) -> bool:
        assert self.cluster is not None
        return self.cluster.wait_settled(timeout=timeout, quiet_s=0.5)

    def node(self, name: str) -> Node:
        try:
            return self._nodes[name]
        except KeyError:
            raise SimError(f"no node {name!r}") from None

    def running(self, name: str) -> bool:
        return name in self._running

    def peer_id(self, name: str) -> str:
        return self.node(name).peer_id

    def call(self, name: str, behaviour: str, payload: Any = None, timeout: float = 30.0) -> Any:
        node = self.node(name)
        ref = node.node
        if name not in self._running or ref is None:
            raise SimError(f"{name} is not running")
        return ref.ask(ref.handle, behaviour, payload, timeout=timeout)

    def call_as(self, name: str, target: Any, behaviour: str, timeout: float) -> Any:
        ref = self.node(name).node
        if ref is None:
            raise SimError(f"{name} is not running")
        return ref.ask(target, behaviour, None, timeout=timeout)

    def crash(self, name: str) -> None:
        self.check_running(name)
        assert self.cluster is not None
        self._running.discard(name)
        self.cluster.crash(self.node(name))

    def restart(self, name: str) -> None:
        assert self.cluster is not None
        if name in self._running:
            raise SimError(f"{name} is running: kill it first")
        fresh = self.cluster.restart(self.node(name), bootstrap=self.cluster.bootstrap_addrs())
        self._nodes[name] = fresh
        self._running.add(name)

    def live_leases(self, name: str) -> int:
        ledger = self.node(name).ledger
        return len(ledger.live()) if ledger is not None else 0

    def alive_peers(self, name: str) -> dict[str, float]:
        out = {}
        for record in self.node(name).peer_table.alive():
            hb = record.heartbeat
            out[record.peer_id] = float(hb.onboarded.get("cpu") or 0.0) if hb else 0.0
        return out

    def describe(self, name: str) -> dict[str, Any]:
        node = self.node(name)
        info = super().describe(name)
        info["home"] = str(node.settings.home)
        if node.api is not None:
            info["api"] = f"http://127.0.0.1:{node.api.port}"
        return info

    def stop(self) -> None:
        if self.cluster is not None:
            started = time.monotonic()
            self.cluster.stop()
            self.cluster = None
            self._running.clear()
            self.stop_s = time.monotonic() - started
