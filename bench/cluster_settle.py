"""How long a cluster of N nodes sharing one trio loop takes to settle after its start.

``LocalCluster`` nodes (``dms sim``'s threads mode) started one after another, each
bootstrapping from up to three running ones, at threads mode's heartbeat settings.
Two cases, each a fresh cluster in a process of its own, in the same run (``--cases``):

- ``baseline``: py-libp2p's connection aim (175, midway between its ``min_connections``
  50 and ``max_connections`` 300) and a real node's 5 s ``dial_timeout_s`` and
  ``handshake_timeout_s``: below 176 nodes every node dials every other at start.
- ``shared_loop``: ``LocalCluster``'s settings for nodes sharing a loop
  (``dms.sim.cluster.SHARED_LOOP_SETTINGS``: an aim of 12, 15 s deadlines).

One JSON line a case: ``start_s`` (the first start to the last), ``tables_s`` (the
last start until every node's peers table holds every other node alive: every
heartbeat reached every node; null if not within ``--timeout``), ``settled_s`` (the
last start until ``LocalCluster.wait_settled`` returns: tables full, each node at its
aim or every other node, no count changing for 2 s), ``handshakes`` (inbound Noise and
Yamux upgrades done), their ``handshake_p50_s``, ``handshake_p90_s``,
``handshake_max_s``, ``handshakes_failed`` (the upgrade failed or timed out),
``handshake_timeouts`` and ``handshakes_evicted`` (the nodes' refusals),
``bootstrap_dials_failed`` (a bootstrap or remembered peer not reached within
``dial_timeout_s``, or refused), ``peers_min``, ``_p50``, ``_max`` (the peers a node is
connected to, at the end), ``connections_min`` (a node's connections as its aim counts
them: two with one peer that both dialed count two), ``cpu_s`` (the process, from the
first start to settled).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dms.network.budgets import Budget
from dms.network.inboundgate import InboundGate
from dms.sim.cluster import LocalCluster, shared_process_heartbeat_budget

HEARTBEAT_S = 0.5  # threads mode's (dms.sim.backend.Backend.default_heartbeat)
CASES: dict[str, dict[str, Any]] = {
    "baseline": {"connection_aim": None, "dial_timeout_s": 5.0, "handshake_timeout_s": 5.0},
    "shared_loop": {},
}


class _BootstrapFailures(logging.Handler):
    """Counts discovery's lines for a bootstrap or remembered peer it could not reach."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(("no connection to ", "cannot connect to ")):
            self.count += 1


@contextlib.contextmanager
def timed_handshakes() -> Iterator[list[tuple[float, bool]]]:
    """Every inbound upgrade's (seconds, done) while inside, every node of the process."""
    upgrade = InboundGate._upgrade
    seen: list[tuple[float, bool]] = []

    async def timed(self: InboundGate, socket: Any, maddr: Any, ip: str) -> Any:
        began = time.monotonic()
        muxed = await upgrade(self, socket, maddr, ip)
        seen.append((time.monotonic() - began, muxed is not None))
        return muxed

    InboundGate._upgrade = timed  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        InboundGate._upgrade = upgrade  # type: ignore[method-assign]


def tables_full(cluster: LocalCluster) -> bool:
    others = len(cluster.nodes) - 1
    return all(len(n.peer_table.alive()) >= others for n in cluster.nodes)


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


def measure(case: str, nodes: int, timeout: float) -> dict[str, Any]:
    failures = _BootstrapFailures()
    network_log = logging.getLogger("dms.network")
    network_log.addHandler(failures)
    network_log.setLevel(logging.INFO)
    budget = shared_process_heartbeat_budget(nodes)
    settings = {"heartbeat_s": HEARTBEAT_S, "heartbeat_budget_per_s": budget, **CASES[case]}
    try:
        with (
            tempfile.TemporaryDirectory() as tmp,
            timed_handshakes() as handshakes,
            LocalCluster(Path(tmp), **settings) as cluster,
        ):
            cpu0, first = time.process_time(), time.monotonic()
            cluster.start(nodes)
            last = time.monotonic()
            tables_s = None
            while time.monotonic() - last < timeout:
                if tables_full(cluster):
                    tables_s = round(time.monotonic() - last, 1)
                    break
                time.sleep(0.2)
            left = max(1.0, timeout - (time.monotonic() - last))
            settled = cluster.wait_settled(timeout=left)
            settled_s = round(time.monotonic() - last, 1) if settled else None
            cpu_s = round(time.process_time() - cpu0, 1)
            running = [n.transport for n in cluster.nodes if n.transport is not None]
            counts = sorted(len(transport.peers()) for transport in running)
            connections = min(transport.connection_count() for transport in running)
            refusals = [n.transport.refusals for n in cluster.nodes if n.transport]
            aim = cluster.nodes[0].network_settings.aimed_connections()
            done = [s for s, ok in handshakes if ok]
            return {
                "bench": "cluster_settle",
                "case": case,
                "nodes": nodes,
                "aim": aim,
                "dial_timeout_s": cluster.nodes[0].network_settings.dial_timeout_s,
                "handshake_timeout_s": cluster.nodes[0].network_settings.handshake_timeout_s,
                "start_s": round(last - first, 1),
                "tables_s": tables_s,
                "settled_s": settled_s,
                "handshakes": len(done),
                "handshake_p50_s": quantile(done, 0.5),
                "handshake_p90_s": quantile(done, 0.9),
                "handshake_max_s": quantile(done, 1.0),
                "handshakes_failed": len(handshakes) - len(done),
                "handshake_timeouts": sum(r[Budget.HANDSHAKE_TIMEOUT] for r in refusals),
                "handshakes_evicted": sum(r[Budget.HANDSHAKE_EVICTED] for r in refusals),
                "bootstrap_dials_failed": failures.count,
                "peers_min": counts[0],
                "peers_p50": statistics.median(counts),
                "peers_max": counts[-1],
                "connections_min": connections,
                "cpu_s": cpu_s,
            }
    finally:
        network_log.removeHandler(failures)


def run_case(case: str, args: argparse.Namespace) -> dict[str, Any]:
    """One case in a process of its own: what a cluster's stop leaves running (its last
    dials, py-libp2p's lines) stays out of the next case's figures."""
    child = [sys.executable, __file__, "--child", case, "--nodes", str(args.nodes)]
    done = subprocess.run(
        [*child, "--timeout", str(args.timeout)], capture_output=True, text=True, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"case {case} failed: {done.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=40)
    parser.add_argument(
        "--timeout", type=float, default=180.0, help="seconds after the last start to wait"
    )
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--child", choices=list(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.child:
        # py-libp2p's and the nodes' own lines would bury the result: none shown.
        logging.getLogger().addHandler(logging.NullHandler())
        print(json.dumps(measure(args.child, args.nodes, args.timeout)), flush=True)
        return 0
    ok = True
    for case in args.cases:
        result = run_case(case, args)
        ok = ok and result["tables_s"] is not None
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(" ".join(f"{key}={value}" for key, value in result.items()), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
