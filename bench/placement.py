"""Decentralized placement on N real nodes (libp2p on loopback, one process).

The nodes are ``LocalCluster``'s: N hosts with their own keys, listeners, Noise
and Yamux sessions, run as tasks of one trio loop, and heartbeats scaled to the
process (``shared_process_heartbeat_budget``); see specs/network.md and
specs/node.md for why a simulation runs that way.

One node requests; every other node is onboarded and bids. M single-allocation
deployments (a ``compute`` allocation that returns at once) are placed one
after another, then all at once. Figures:

- ``p50_ms`` / ``p95_ms``: request (the ``/dms/node/deployment/new`` call) to
  running (every allocation started on its provider), sequential phase;
- ``placements_per_s``: concurrent phase, M placements over the time to the
  last one running;
- ``messages_per_placement``: unicast frames received by all nodes (requests,
  bids, commits, allocations, replies, status) per placement; heartbeats and
  other gossip are not counted;
- ``leaked_leases``: leases and allocations still live on any node 3 s after
  every deployment completed (losing bids are reverted at once, and 3 s is well
  under the 10 s lease, so only a revert that never happened counts);
- ``success_rate``: deployments that completed, over all.

The baseline, measured in the same run, is ``floor_ms``: the p50 of one signed
invoke round trip from the requester to a provider (``/public/hello``); a
placement needs at least three (bid, commit, allocate).
Prints one JSON line with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dms.actor import ROOT_INBOX, Address, Handle
from dms.jobs.spec import DeploymentSpec
from dms.orchestrator.states import DEPLOYMENT
from dms.resources import Resources
from dms.security.identity import public_key_from_peer_id
from dms.sim.cluster import (
    SHARED_PROCESS_HEARTBEATS_PER_S,
    LocalCluster,
    shared_process_heartbeat_budget,
)


def spec(i: int, strategy: str) -> dict[str, Any]:
    return DeploymentSpec.model_validate(
        {
            "name": f"bench-{i}",
            "strategy": strategy,
            "deadline_s": 30,
            "allocations": [
                {
                    "name": "w",
                    "executor": "compute",
                    "resources": {"cpu": "100m", "ram": "64MiB"},
                    "params": {"seconds": 0},
                }
            ],
        }
    ).model_dump()


def say(what: str) -> None:
    """Progress on stderr (stdout is the one JSON line)."""
    print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


def frames(nodes: list) -> int:
    return sum(n.transport.frames_in for n in nodes if n.transport is not None)


def wait_all(req: Any, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Rows of ``ids`` once all are terminal. Each row records its own times, so polling
    only needs to be frequent enough not to waste the run, and light enough (pending
    rows only, every 50 ms) not to take CPU from the nodes it measures."""
    store = req.node_actor_store
    deadline = time.monotonic() + timeout
    rows: dict[str, dict[str, Any]] = {}
    pending = list(ids)
    while pending and time.monotonic() < deadline:
        for i in pending:
            rows[i] = store.get(i) or {}
        pending = [i for i in pending if rows[i].get("state") not in DEPLOYMENT.terminal]
        if pending:
            time.sleep(0.05)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--strategy", default="score")
    parser.add_argument(
        "--heartbeat-budget",
        type=float,
        default=SHARED_PROCESS_HEARTBEATS_PER_S,
        help="gossip heartbeats/s received by all simulated nodes together",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()

    from dms.orchestrator.store import DeploymentStore

    # All N nodes share this one process (and its GIL): see shared_process_heartbeat_budget.
    budget = shared_process_heartbeat_budget(args.nodes, args.heartbeat_budget)
    root = Path(tempfile.mkdtemp(prefix="dms-placement-"))
    with LocalCluster(root, heartbeat_s=2.0, heartbeat_budget_per_s=budget) as c:
        say(f"starting {args.nodes} nodes")
        nodes = c.start(args.nodes)
        c.wait_linked(timeout=120)
        say("linked; waiting for every provider's heartbeat")
        for n in nodes[1:]:
            n.ledger.onboard(Resources(cpu=4, ram=8, disk=10))
        req = nodes[0]
        req.node_actor_store = DeploymentStore(req.db)  # type: ignore[attr-defined]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # every provider known, with its resources
            known = [r for r in req.peer_table.alive() if r.heartbeat and r.heartbeat.onboarded]
            if len([r for r in known if r.heartbeat.onboarded.get("cpu")]) >= args.nodes - 1:
                break
            time.sleep(0.1)
        # Steady state (LocalCluster.wait_settled): start-up's fast heartbeats and
        # dials would load the run, not the placements. After 60 s it goes on anyway.
        settled = c.wait_settled(timeout=60)
        say(f"peers table complete; start-up settled: {settled}")
        # Floor: one signed invoke round trip to a provider.
        target = Handle(
            id=public_key_from_peer_id(nodes[1].peer_id),
            address=Address(host=nodes[1].peer_id, inbox=ROOT_INBOX),
        )
        floor = []
        for _ in range(50):
            t = time.perf_counter()
            req.node.ask(target, "/public/hello")
            floor.append(time.perf_counter() - t)
        # Warm-up, as on a node that has been running: a stream to every provider is
        # open before timing (the first message to a peer pays for opening it).
        for n in nodes[1:]:
            handle = Handle(
                id=n.identity.public_key, address=Address(host=n.peer_id, inbox=ROOT_INBOX)
            )
            try:
                req.node.ask(handle, "/public/hello", timeout=5)
            except Exception as exc:  # placement copes with it: the bench just says so
                say(f"warm-up: {n.peer_id[-8:]} did not answer ({exc})")

        def new(i: int) -> tuple[str, float]:
            t0 = time.time()
            dep = req.node.ask(
                req.node.handle, "/dms/node/deployment/new", {"spec": spec(i, args.strategy)}
            )
            return dep["id"], t0

        # Sequential phase.
        latencies, states = [], []
        slowest: list[tuple[float, list]] = []
        before = frames(nodes)
        for i in range(args.jobs):
            dep_id, t0 = new(i)
            row = wait_all(req, [dep_id], 30)[dep_id]
            states.append(row.get("state"))
            if row.get("running_at"):
                latencies.append(row["running_at"] - t0)
                slowest.append(
                    (
                        row["running_at"] - t0,
                        [(round(e["at"] - t0, 3), e["what"]) for e in row["events"]],
                    )
                )
        seq_frames = frames(nodes) - before

        say(f"sequential phase done: {len(latencies)} running")
        # Concurrent phase.
        before = frames(nodes)
        started = time.time()
        futures = [
            req.node.invoke(
                req.node.handle,
                "/dms/node/deployment/new",
                {"spec": spec(args.jobs + i, args.strategy)},
                timeout=30,
            )
            for i in range(args.jobs)
        ]  # all submitted at once, as M users (or one script) would
        submitted = [f.result(timeout=31)["id"] for f in futures]
        rows = wait_all(req, submitted, 60)
        conc_frames = frames(nodes) - before
        running = [r["running_at"] for r in rows.values() if r.get("running_at")]
        states += [r.get("state") for r in rows.values()]
        span = (max(running) - started) if running else float("inf")

        say(f"concurrent phase done: {len(running)} running")
        # Reverts are one-way messages still in providers' mailboxes; give them 3 s to
        # land (well under the 10 s lease, so an expiry cannot hide a real leak).
        settle = time.monotonic() + 3.0
        while time.monotonic() < settle and sum(len(n.ledger.live()) for n in nodes):
            time.sleep(0.05)
        leaked = sum(len(n.ledger.live()) for n in nodes)
        if os.environ.get("DMS_BENCH_DEBUG"):
            for took, events in sorted(slowest, key=lambda x: x[0])[-3:]:
                print(round(took, 3), events, file=sys.stderr)
            for n in nodes:
                for lease in n.ledger.live():
                    print(
                        n.peer_id[-6:],
                        lease.state,
                        lease.ref,
                        lease.expires_at - time.time(),
                        file=sys.stderr,
                    )

    latencies_ms = sorted(x * 1000 for x in latencies)
    figures = {
        "bench": "placement",
        "nodes": args.nodes,
        "jobs": args.jobs,
        "strategy": args.strategy,
        "success_rate": round(states.count("completed") / len(states), 3),
        "p50_ms": round(statistics.median(latencies_ms), 1) if latencies_ms else None,
        "p95_ms": round(latencies_ms[int(0.95 * (len(latencies_ms) - 1))], 1)
        if latencies_ms
        else None,
        "placements_per_s": round(len(running) / span, 1) if running else 0.0,
        "messages_per_placement": round((seq_frames + conc_frames) / (2 * args.jobs), 1),
        "leaked_leases": leaked,
        "floor_ms": round(statistics.median(floor) * 1000, 2),
    }
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:>24}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
