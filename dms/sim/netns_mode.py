"""``netns`` mode: ``processes`` mode across real NATs (root only; ``specs/sim.md``).

Each node is a ``dms run`` as in ``processes`` mode, but in a network namespace of
its own (:class:`dms.sim.netns.NatTopology`): a node marked ``public`` in the
scenario sits on the public network (it relays, ``relay = true``, and every other
node bootstraps from the public ones); every other node sits behind a
masquerading router of its own, so it is reached only through a relay or a
punched hole, as a machine behind a home router. Public nodes start first. The
simulation talks to a node's local API (its 127.0.0.1) from inside the node's
namespace (``NatTopology.entered``). Where namespaces cannot be made (not root,
no ``ip`` or ``iptables``, no NAT table), the mode refuses to start and says why.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dms.sim.backend import NodeSpec, Say, SimError
from dms.sim.faults import FaultPlan
from dms.sim.netns import MAX_NATED, MAX_PUBLIC, NatTopology, unavailable
from dms.sim.processes import ProcessBackend
from dms.sim.scenario import NodeSettings

__all__ = ["NetnsBackend"]


class NetnsBackend(ProcessBackend):
    mode = "netns"

    def __init__(
        self,
        root: Path,
        specs: list[NodeSpec],
        settings: NodeSettings,
        faults: FaultPlan,
        *,
        public: set[str],
        **options: Any,
    ) -> None:
        why = unavailable()
        if why is not None:
            raise SimError(f"mode netns cannot run here: {why}")
        publics = [s.name for s in specs if s.name in public]
        nated = [s.name for s in specs if s.name not in public]
        if not 1 <= len(publics) <= MAX_PUBLIC or len(nated) > MAX_NATED:
            raise SimError(
                f"mode netns takes 1 to {MAX_PUBLIC} public nodes and at most {MAX_NATED} "
                f"behind NAT (got {len(publics)} and {len(nated)})"
            )
        # Public nodes first: the others bootstrap from them.
        ordered = sorted(specs, key=lambda s: s.name not in public)
        super().__init__(root, ordered, settings, faults, **options)
        self.topology = NatTopology(self.root / "net", public=publics, nated=nated)

    def start(self, say: Say) -> None:
        (self.root / "net").mkdir(parents=True, exist_ok=True)
        self.topology.build()  # stop() deletes what was made, after a failure too
        publics = ", ".join(self.topology.public)
        say(f"network: {publics} public; {len(self.topology.nated)} node(s) behind NAT")
        super().start(say)

    def run_argv(self, name: str) -> list[str]:
        return [
            *("ip", "netns", "exec", self.topology.ns(name)),
            *(sys.executable, "-m", "dms", "run", "--listen", self.topology.listen(name)),
        ]

    def extra_config(self, spec: NodeSpec) -> dict[str, Any]:
        return {"relay": True} if spec.name in self.topology.public else {}

    def _bootstrap(self, exclude: str) -> list[str]:
        """The public nodes running (a NATed node's address cannot be dialed)."""
        return [
            proc.info["addrs"][0]
            for name, proc in self._procs.items()
            if name != exclude
            and name in self.topology.public
            and proc.info
            and proc.info.get("addrs")
            and self.running(name)
        ]

    @contextmanager
    def _inside(self, name: str) -> Iterator[None]:
        try:
            with self.topology.entered(name):
                yield
        except OSError as exc:
            raise SimError(f"{name}: {exc}") from None

    def call(self, name: str, behaviour: str, payload: Any = None, timeout: float = 30.0) -> Any:
        with self._inside(name):
            return super().call(name, behaviour, payload, timeout)

    def hello(self, name: str, peer_id: str, timeout: float = 10.0) -> None:
        with self._inside(name):
            super().hello(name, peer_id, timeout)

    def describe(self, name: str) -> dict[str, Any]:
        info = super().describe(name)
        info["netns"] = self.topology.ns(name)
        info["ip"] = self.topology.ip(name)
        info["public"] = name in self.topology.public
        return info

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self.topology.close()
