"""A provider's placement handlers alone: per-handler time and CPU, one process.

One provider is the real node actor (bidding, its ledger on a real SQLite file)
on the in-memory transport; a requester actor on the same network drives the
path a placement takes on the provider, one step at a time and waiting for
each: a bid request (answered with a bid holding a lease), the allocate that
commits that lease and starts its allocation, the allocation's end (a
``compute`` job of no length: the lease released, the update pushed to the
requester), and a bid request whose lease is reverted (the losing bidder's
path). No libp2p, so the figures are the handlers' own cost, without the
noise of a whole placement bench (``bench/placement.py``).

Per handler, medians over ``--n`` placements, µs: ``wall`` (the handler's own
time on the node's thread, from its payload validated to its return; the
allocate's includes its deferred answer, which on this transport is handed to
the requester on the same thread) and ``cpu`` (that thread's CPU time over
the same span); ``rtt`` (the requester's invoke, signatures and hops
included); inner parts: the ledger's transactions (``lock_many``, ``commit``,
``release_many``) and the allocation's spawn; ``p95``: the handler's or the part's 95th
percentile wall time. ``end_us``: from the allocate's
answer to the requester holding the allocation's end. ``cpu_us_per_placement``:
the whole process's CPU time (both sides, every thread) over the run, per
placement (bid + allocate + end + a reverted bid).

``--against TREE`` also runs this script with ``PYTHONPATH=TREE`` (another
checkout of dms: the before of an A/B), alternating ``--pairs`` times, each
run a fresh process; every run prints its own JSON line with its ``tree``.
Prints JSON lines with --json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dms.actor import (
    ROOT_INBOX,
    Actor,
    ActorRef,
    ActorSystem,
    Limits,
    MemoryNetwork,
    Request,
    behaviour,
)
from dms.node.caps import REQUESTER_ROLE
from dms.orchestrator.messages import ALLOCATE, REQUEST, REVERT, UPDATE
from dms.resources import Preferences
from dms.security import Identity
from dms.sim.backend import NodeSpec
from dms.sim.faults import FaultPlan
from dms.sim.memory import MemoryNode
from dms.sim.scenario import Amounts

Samples = dict[str, list[float]]


class Requester(Actor):
    """Takes the allocations' updates (their ends) and wakes the driver."""

    def __init__(self, context: Any, ended: Callable[[dict[str, Any]], None]) -> None:
        super().__init__(context)
        self._ended = ended

    @behaviour(UPDATE, public=True)
    def update(self, request: Request) -> None:
        self._ended(request.payload)


def _timed(samples: Samples, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def timed(*args: Any, **kw: Any) -> Any:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kw)
        finally:
            samples[f"{name}.cpu"].append(time.thread_time() - cpu)
            samples[f"{name}.wall"].append(time.perf_counter() - wall)

    return timed


def _bid_payload(i: int) -> dict[str, Any]:
    return {
        "deployment_id": f"bench-{i}",
        "lease_s": 10,
        "slots": [
            {
                "slot": "w",
                "executor": "compute",
                "resources": {"cpu_milli": 100, "ram_mib": 64},
                "params": {"seconds": 0},
            }
        ],
    }


def run(n: int, warmup: int, child: bool = False) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="dms-bench-handlers-"))
    net = MemoryNetwork()
    prefs = Preferences(bid_requests_per_s=1e6, bid_request_burst=10**6, max_leases_per_peer=0)
    spec = NodeSpec(
        name="provider", group="p", preferences=prefs, onboard=Amounts(cpu=2, ram=8, disk=10)
    )
    budgets = {"bid_requests_per_s_total": 1e6, "bid_request_burst_total": 10**6}
    provider = MemoryNode(
        spec, root / "provider", Identity.generate(), net, FaultPlan(), budgets, Limits()
    ).start()
    assert provider.system is not None and provider.node is not None
    assert provider.ledger is not None
    samples: Samples = defaultdict(list)
    # The node's behaviours and its ledger's transitions, timed where they run.
    behaviours = provider.system._behaviours[ROOT_INBOX]  # the node actor's own dict
    for path, name in ((REQUEST, "bid_request"), (ALLOCATE, "allocate"), (REVERT, "revert")):
        spec_ = behaviours[path]
        behaviours[path] = dataclasses.replace(spec_, handler=_timed(samples, name, spec_.handler))
    ledger = provider.ledger
    for name in ("lock_many", "commit", "release_many"):
        setattr(ledger, name, _timed(samples, name, getattr(ledger, name)))
    system = provider.system
    system.spawn = _timed(samples, "spawn", system.spawn)  # type: ignore[method-assign]

    ident = Identity.generate()
    requester_system = ActorSystem(ident, net.transport(ident.peer_id))
    ended = threading.Semaphore(0)
    root = requester_system.spawn(
        Requester, lambda update: ended.release(), inbox=ROOT_INBOX, identity=ident
    )
    to = provider.node.handle

    def one(i: int, keep: bool) -> None:
        requester = root
        if child:  # as a deployment asks: an actor of its own, with the node's certificate
            requester = requester_system.spawn(
                Requester, lambda update: ended.release(), role=REQUESTER_ROLE
            )
        try:
            placed(requester, i, keep)
        finally:
            if child:
                requester_system.stop_actor(requester.handle.address.inbox)

    def placed(requester: ActorRef, i: int, keep: bool) -> None:
        start = time.perf_counter()
        bid = requester.ask(to, REQUEST, _bid_payload(i))
        samples["bid_request.rtt"].append(time.perf_counter() - start)
        lease = bid["offers"][0]["lease_id"]
        if not keep:
            start = time.perf_counter()
            requester.ask(to, REVERT, {"deployment_id": f"bench-{i}", "lease_ids": [lease]})
            samples["revert.rtt"].append(time.perf_counter() - start)
            return
        allocate = {
            "deployment_id": f"bench-{i}",
            "slot": "w",
            "lease_id": lease,
            "executor": "compute",
            "params": {"seconds": 0},
            "reply_to": requester.handle.model_dump(),
            "commit": True,
        }
        start = time.perf_counter()
        reply = requester.ask(to, ALLOCATE, allocate)
        answered = time.perf_counter()
        samples["allocate.rtt"].append(answered - start)
        assert reply["status"]["state"] == "starting", reply
        if not ended.acquire(timeout=30):
            raise RuntimeError(f"allocation {lease} never ended")
        samples["end"].append(time.perf_counter() - answered)

    try:
        for i in range(warmup):
            one(i, keep=True)
            one(i, keep=False)
        samples.clear()
        cpu, wall = time.process_time(), time.perf_counter()
        for i in range(warmup, warmup + n):
            one(i, keep=True)
            one(i, keep=False)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        time.sleep(0.2)  # the last end's release
        live = ledger.live()
        pools = ledger.pools()
    finally:
        requester_system.stop()
        provider.stop()
        net.close()
    us = {k: round(statistics.median(v) * 1e6, 1) for k, v in sorted(samples.items())}
    p95 = {k: round(sorted(v)[int(len(v) * 0.95)] * 1e6, 1) for k, v in samples.items()}
    return {
        "bench": "provider_handlers",
        "n": n,
        "child": child,
        "handlers_us": {
            h: {
                "wall": us.get(f"{h}.wall"),
                "cpu": us.get(f"{h}.cpu"),
                "rtt": us.get(f"{h}.rtt"),
                "p95": p95.get(f"{h}.wall"),
            }
            for h in ("bid_request", "allocate", "revert")
        },
        "inner_us": {
            k: {"wall": us.get(f"{k}.wall"), "cpu": us.get(f"{k}.cpu"), "p95": p95.get(f"{k}.wall")}
            for k in ("lock_many", "commit", "release_many", "spawn")
        },
        "end_us": us.get("end"),
        "cpu_us_per_placement": round(cpu / n * 1e6, 1),
        "wall_us_per_placement": round(wall / n * 1e6, 1),
        "leaked_leases": len(live),
        "violations": pools.violations(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=400, help="placements per run")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--against", help="another dms tree, run alternately (A/B)")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    parser.add_argument(
        "--child",
        action="store_true",
        help="each placement from an actor of its own with a certificate, as a deployment",
    )
    parser.add_argument(
        "--log", action="store_true", help="log at INFO to a file, as a daemon does (dms run)"
    )
    args = parser.parse_args()
    if args.log:
        from dms.cli.node import configure_daemon_logging

        configure_daemon_logging("INFO", log_file=Path(tempfile.mkdtemp()) / "dms.log")
    if args.against:
        here = str(Path(__file__).resolve().parents[1])
        for _ in range(args.pairs):
            for tree in (args.against, here):
                env = {**os.environ, "PYTHONPATH": tree}
                cmd = [sys.executable, __file__, "--n", str(args.n), "--warmup", str(args.warmup)]
                cmd += ["--log"] if args.log else []
                cmd += ["--child"] if args.child else []
                out = subprocess.run([*cmd, "--json"], env=env, check=True, capture_output=True)
                line = json.loads(out.stdout.decode().strip().splitlines()[-1])
                print(json.dumps({"tree": tree, **line}), flush=True)
        return 0
    result = run(args.n, args.warmup, args.child)
    result = {"tree": os.environ.get("PYTHONPATH", ""), **result}
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0 if not result["leaked_leases"] and not result["violations"] else 1


if __name__ == "__main__":
    sys.exit(main())
