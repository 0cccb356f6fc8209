"""One gossip broadcast to N real dms nodes on loopback: who got it, and how fast.

N nodes start in this process, each bootstrapping from up to three running
ones; as real nodes do, they then dial the peers whose heartbeats name their
addresses, up to the connection manager's aim (a dozen, nodes sharing a loop).
Once start-up is over (``LocalCluster.wait_settled``: every peers table
complete, connections stable) and every gossipsub mesh has formed
(``mesh_ready_s`` from the probes' start; at most 30 s more for the mesh, then
the broadcast goes anyway), one node publishes a signed envelope on a topic
every node's probe actor subscribes to; each probe notes when its actor ran the
behaviour. Latency is publish-call to handler, per receiving node.
Prints one JSON line with --json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from dms.actor import Actor, Request, behaviour
from dms.sim.cluster import LocalCluster, shared_process_heartbeat_budget

TOPIC = "/bench/broadcast"


class Probe(Actor):
    def __init__(self, context: Any, arrivals: dict[str, float], lock: threading.Lock) -> None:
        super().__init__(context)
        self.arrivals = arrivals
        self.lock = lock

    def on_start(self) -> None:
        self.subscribe(TOPIC)

    @behaviour("/bench/broadcast", public=True, topic=TOPIC)
    def arrived(self, request: Request) -> None:
        with self.lock:
            self.arrivals.setdefault(self.system.peer_id, time.perf_counter())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--wait", type=float, default=10.0, help="seconds to wait for delivery")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    arrivals: dict[str, float] = {}
    lock = threading.Lock()
    # The nodes' heartbeats are the background gossip; scaled as for every simulation
    # in one process (see shared_process_heartbeat_budget).
    budget = shared_process_heartbeat_budget(args.nodes)
    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalCluster(Path(tmp), heartbeat_budget_per_s=budget) as cluster,
    ):
        nodes = cluster.start(args.nodes)
        cluster.wait_linked()
        probes = [n.system.spawn(Probe, arrivals, lock) for n in nodes if n.system is not None]
        mesh_started = time.perf_counter()
        # Steady state first (LocalCluster.wait_settled): start-up's fast heartbeats
        # and dials are over.
        cluster.wait_settled(timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready = all(
                n.transport is not None
                and len(n.transport.mesh_peers(TOPIC))
                >= min(len(n.transport.peers()), n.network_settings.gossip.degree_low)
                for n in nodes
            )
            if ready:
                break
            time.sleep(0.05)
        mesh_s = time.perf_counter() - mesh_started

        sender = probes[0]
        sent = time.perf_counter()
        sender.publish(TOPIC, "/bench/broadcast", {"sent": sent})
        others = {n.peer_id for n in nodes[1:]}
        wait_until = time.monotonic() + args.wait
        while time.monotonic() < wait_until:
            with lock:
                if others <= arrivals.keys():
                    break
            time.sleep(0.005)
        with lock:
            latencies = [(arrivals[p] - sent) * 1e3 for p in others if p in arrivals]

    latencies.sort()
    result = {
        "bench": "broadcast",
        "nodes": args.nodes,
        "delivered_fraction": round(len(latencies) / len(others), 4),
        "p50_ms": round(statistics.median(latencies), 2) if latencies else None,
        "p95_ms": round(latencies[max(0, round(0.95 * len(latencies)) - 1)], 2)
        if latencies
        else None,
        "max_ms": round(latencies[-1], 2) if latencies else None,
        "mesh_ready_s": round(mesh_s, 2),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>20}: {value}")
    return 0 if result["delivered_fraction"] == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
