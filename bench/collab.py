"""Collaborative k-means by secure aggregation against plaintext k-means, in one run.

One JSON line per case (with --json): ``owners, n_per_owner, a, k, rounds,
owner_cpu_s_per_round, plain_cpu_s_per_round, aggregator_cpu_s_per_round,
kb_per_owner_per_round, wall_s, agreement``. Owners and the aggregator run in
this process (``dms.mining.collab.simulate``), every message carried as bytes.
``owner_cpu_s_per_round`` is one owner's CPU in a round (its statistics, the
encoding, the masks, the shares, the message encoding), averaged over owners and
rounds; ``plain_cpu_s_per_round`` is one round of plaintext k-means on that
owner's rows alone (assign and update). ``kb_per_owner_per_round`` counts what an
owner sends and receives in a round. ``agreement`` is the share of labels equal
to plaintext k-means on the union with the same initial centroids and rounds.
Targets: agreement 1.0; kb per owner per round independent of n; owner CPU per
round at most 3 x plaintext on its own rows (``cpu_ratio``).

``--nodes N ...``: the same collaboration on real nodes (``LocalCluster``: libp2p
on loopback, one node per owner and one provider for the aggregator, placed by
the bid rounds), ``mode: nodes``. It adds ``wall_s`` from propose to the last
owner's result and ``agreement``; the per-owner CPU and bytes are not separable
from the other nodes in one process there, so they are null (the in-process
lines measure them).

``--sim N ...``: N owners in ``dms sim`` memory mode (``dms/sim/collab.py``: N owner
node actors and three providers on the in-memory transport, each owner's rows in
its own file, the aggregator placed by the bid rounds), ``mode: sim-memory``, no
fault. It adds ``kb_per_owner_per_round`` as the proposer's session counts it (the
protocol bytes it relays to and from each owner, without envelopes), ``wall_s``
from propose to the end, and ``agreement``; CPU per party is not separable there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from dms.mining.collab import Proposal
from dms.mining.collab.simulate import run_collab
from dms.mining.data import blobs
from dms.mining.plain import ClusteringParams, kmeans
from dms.orchestrator.states import COLLAB

A, K, ROUNDS = 8, 5, 10
# The plaintext baseline runs every round, as the collaboration does (never converged).
FIXED = ClusteringParams(K, min_error=-1.0, max_iterations=ROUNDS)
CASES = [(3, 1_000), (3, 10_000), (10, 10_000), (50, 10_000)]


def plain_cpu_per_round(rows: np.ndarray, init: np.ndarray) -> float:
    start = time.thread_time()
    kmeans(rows, FIXED, centroids=init)
    return (time.thread_time() - start) / ROUNDS


def line(
    owners: int, n_per_owner: int, mode: str, wall_s: float, agreement: float, **figures: Any
) -> dict[str, object]:
    """One case's JSON line: the keys issue 29 spells, None where the mode cannot
    measure a figure (CPU per party is not separable across nodes in one process)."""
    keyed: dict[str, object] = {
        "owners": owners,
        "n_per_owner": n_per_owner,
        "a": A,
        "k": K,
        "rounds": ROUNDS,
        "owner_cpu_s_per_round": None,
        "plain_cpu_s_per_round": None,
        "aggregator_cpu_s_per_round": None,
        "kb_per_owner_per_round": None,
        "wall_s": round(wall_s, 3),
        "agreement": agreement,
    }
    return {**keyed, **figures, "mode": mode}


def agreement(labels: list[int] | np.ndarray, plain: np.ndarray) -> float:
    """The share of rows labelled as plaintext k-means labels them (0 if rows are missing)."""
    got = np.asarray(labels)
    return float((got == plain).mean()) if len(got) == len(plain) else 0.0


def case(owners: int, n_per_owner: int) -> dict[str, object]:
    data, _ = blobs(owners * n_per_owner, A, K, seed=owners, std=2.0)
    names = [f"owner{i}" for i in range(1, owners + 1)]
    parts = dict(zip(names, np.array_split(data, owners), strict=True))
    init = data[:K].copy()
    proposal = Proposal(
        collab_id=f"bench-{owners}-{n_per_owner}",
        owners=names,
        a=A,
        k=K,
        rounds=ROUNDS,
        threshold=owners // 2 + 1,
        centroids=init.tolist(),
    )
    run = run_collab(proposal, parts)
    plain = kmeans(data, FIXED, centroids=init)
    labels = np.concatenate([run.results[o].labels for o in names])
    sampled = names[:: max(1, owners // 5)]  # plaintext timing on a few owners' rows
    plain_s = statistics.mean(plain_cpu_per_round(parts[o], init) for o in sampled)
    owner_s = statistics.mean(s for per in run.owner_cpu_s.values() for s in per)
    kb = statistics.mean(b for per in run.owner_bytes.values() for b in per) / 1024
    return line(
        owners,
        n_per_owner,
        "in-process",
        run.wall_s,
        agreement(labels, plain.labels),
        owner_cpu_s_per_round=round(owner_s, 5),
        plain_cpu_s_per_round=round(plain_s, 5),
        aggregator_cpu_s_per_round=round(statistics.mean(run.aggregator_cpu_s), 5),
        kb_per_owner_per_round=round(kb, 2),
        cpu_ratio=round(owner_s / plain_s, 2),
        setup_kb_per_owner=round(statistics.mean(run.setup_bytes.values()) / 1024, 2),
    )


def nodes_case(owners: int, n_per_owner: int, folder: Path) -> dict[str, object]:
    from dms.resources import Resources
    from dms.sim.cluster import LocalCluster

    data, _ = blobs(owners * n_per_owner, A, K, seed=owners, std=2.0)
    parts = np.array_split(data, owners)
    init = data[:K].copy()
    with LocalCluster(folder, heartbeat_s=1.0) as cluster:
        provider = cluster.add()
        assert provider.ledger is not None
        provider.ledger.onboard(Resources(cpu=2, ram=4, disk=4))
        nodes = [cluster.add() for _ in range(owners)]

        def ask(node: Any, behaviour: str, payload: dict[str, Any]) -> Any:
            return node.node.ask(node.node.handle, behaviour, payload, timeout=60)

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            record = nodes[0].peer_table.get(provider.peer_id)
            if record and record.heartbeat and record.heartbeat.onboarded.get("cpu"):
                break
            time.sleep(0.2)
        proposal = Proposal(
            collab_id=f"bench-nodes-{owners}",
            owners=[n.peer_id for n in nodes],
            a=A,
            k=K,
            rounds=ROUNDS,
            threshold=owners // 2 + 1,
            centroids=init.tolist(),
        )
        body = proposal.model_dump(mode="json")
        files = []
        for i, rows in enumerate(parts):
            path = folder / f"owner{i}.csv"
            np.savetxt(path, rows, delimiter=",", fmt="%.17g")
            files.append(path)
        began = time.perf_counter()
        ask(nodes[0], "/dms/node/collab/propose", {"proposal": body, "data": str(files[0])})
        for node, path in zip(nodes[1:], files[1:], strict=True):
            payload = {"proposal": body, "proposer": nodes[0].peer_id, "data": str(path)}
            ask(node, "/dms/node/collab/join", payload)
        labels: list[int] = []
        for node in nodes:
            while True:
                answer = ask(node, "/dms/node/collab/result", {"collab_id": proposal.collab_id})
                if answer["phase"] in COLLAB.terminal or time.perf_counter() - began > 600:
                    break
                time.sleep(0.2)
            labels += (answer.get("result") or {}).get("labels", [])
        wall = time.perf_counter() - began
    plain = kmeans(data, FIXED, centroids=init)
    return line(owners, n_per_owner, "nodes", wall, agreement(labels, plain.labels))


def sim_case(owners: int, n_per_owner: int, folder: Path) -> dict[str, object]:
    from dms.sim.faults import FaultPlan
    from dms.sim.runner import Runner, make_backend
    from dms.sim.scenario import parse_scenario

    text = f"""
name: collab-{owners}
mode: memory
nodes:
  - {{name: owner, count: {owners}}}
  - {{name: provider, count: 3, onboard: {{cpu: 1, ram: 1, disk: 1}}}}
timeline:
  - collab:
      name: joint
      owners: [owner]
      blobs: {{rows: {owners * n_per_owner}, attributes: {A}, centers: {K}, seed: {owners},
              std: 2.0}}
      k: {K}
      rounds: {ROUNDS}
  - wait: {{job: joint, timeout_s: 600}}
"""
    scenario = parse_scenario(text, "bench")
    faults = FaultPlan(seed=0)
    runner = Runner(scenario, make_backend(scenario, folder, faults), faults)
    runner.report.root = str(folder)
    report = runner.run()
    faults.close()
    job = runner.jobs["joint"]
    plan = job.collab
    assert plan is not None
    rows = np.concatenate(plan.parts)
    init = np.asarray(plan.proposal.centroids)
    plain = kmeans(rows, FIXED, centroids=init)
    labels = [x for name in plan.owners for x in plan.results.get(name, {}).get("labels", [])]
    # Each owner's node measures its answers' CPU; plaintext on a few owners' rows here.
    owner_s = statistics.mean(plan.owner_cpu_s.values()) / ROUNDS if plan.owner_cpu_s else None
    sampled = plan.parts[:: max(1, owners // 5)]
    plain_s = statistics.mean(plain_cpu_per_round(part, init) for part in sampled)
    return line(
        owners,
        n_per_owner,
        "sim-memory",
        (job.ended_at or time.time()) - job.submitted,
        agreement(labels, plain.labels),
        owner_cpu_s_per_round=round(owner_s, 5) if owner_s is not None else None,
        plain_cpu_s_per_round=round(plain_s, 5),
        kb_per_owner_per_round=plan.session.get("kb_per_owner_per_round"),
        cpu_ratio=round(owner_s / plain_s, 2) if owner_s is not None else None,
        ok=report.ok,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="one JSON line per case")
    parser.add_argument(
        "--owners", type=int, nargs="+", help="only the cases with these numbers of owners"
    )
    parser.add_argument(
        "--nodes", type=int, nargs="*", help="also run these numbers of owners on real nodes"
    )
    parser.add_argument(
        "--sim", type=int, nargs="*", help="also run these numbers of owners in dms sim memory"
    )
    parser.add_argument(
        "--rows", type=int, default=1_000, help="rows per owner of the --sim and --nodes cases"
    )
    args = parser.parse_args()
    for run, counts in ((sim_case, args.sim), (nodes_case, args.nodes)):
        for owners in counts or []:
            with tempfile.TemporaryDirectory(prefix="dms-collab-") as folder:
                figures = run(owners, args.rows, Path(folder))
            print(json.dumps(figures) if args.json else figures, flush=True)
            if figures["agreement"] != 1.0:
                print(f"target missed: {figures}", file=sys.stderr)
    if (args.nodes is not None or args.sim is not None) and not args.owners:
        return 0
    for owners, n in CASES:
        if args.owners and owners not in args.owners:
            continue
        figures = case(owners, n)
        line = (
            json.dumps(figures) if args.json else "  ".join(f"{k}={v}" for k, v in figures.items())
        )
        print(line, flush=True)
        if figures["agreement"] != 1.0 or float(figures["cpu_ratio"]) > 3:  # type: ignore[arg-type]
            print(f"target missed: {figures}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
