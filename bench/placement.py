"""Decentralized placement on N real nodes (libp2p on loopback).

Two modes (``"mode"`` in every line):

- ``threads`` (the default): the nodes are ``LocalCluster``'s, N hosts with
  their own keys, listeners, Noise and Yamux sessions, run as tasks of one trio
  loop in this one process, and heartbeats scaled to the process
  (``shared_process_heartbeat_budget``); see specs/network.md and specs/node.md
  for why a simulation runs that way. One node requests; the other N - 1 are
  onboarded and bid.
- ``processes`` (``--processes``): N providers, each a ``dms run`` daemon in
  its own OS process with its own home, started and onboarded as ``dms sim``
  does in its processes mode (``dms.sim.processes.ProcessBackend``); the
  requester is a node in this process (its own process, as the providers have
  theirs), so its deployments' rows and timings are read where they happen.
  Start-up waits, with deadlines, for the requester to hold every provider
  alive with its resources, then for the providers' CPU to go quiet.

For each provider count (``--nodes 5 20 50``) and each concurrency (``--concurrency 1 8 32``),
``--jobs`` single-allocation deployments (a ``compute`` allocation that returns
at once) are placed with at most that many in flight (one starts as another
ends, as one script placing many short jobs would). One JSON line per
(nodes, concurrency):

- ``p50_ms`` / ``p95_ms``: request (the ``/dms/node/deployment/new`` call) to
  running (the allocation started on its provider);
- ``placements_per_s``: placements over the time from the first request to the
  last one running;
- ``phases_ms``: per-phase medians, from each deployment's own events:
  ``setup`` (request sent -> bid requests sent: the API call, the deployment
  actor's spawn), ``bids`` (-> the winner chosen: the bid round trip, the last
  bid in, then select), ``select`` (inside ``bids``: the selection and the bid
  records), ``commit`` (-> the commit answered: its round trip; where commit and
  allocate are one exchange, the whole of it), ``allocate`` (-> running; 0 then);
- ``work_ms``: where the time goes inside the phases, per placement, summed over
  every node and thread of this process (wall time inside each call; in
  processes mode the requester's alone): Ed25519
  ``sign``, ``verify``, ``sqlite`` (every transaction, its lock wait included);
  ``window_closes``: rounds that ended on the bid window, not on the last bid;
- ``messages_per_placement``: unicast frames received by all nodes per
  placement; heartbeats and other gossip are not counted (in processes mode:
  the frames the requester received and sent, as every placement message
  goes between it and a provider);
- ``cpu_ms_per_placement``: CPU time of every node (every node and thread,
  the jobs' ends included; in processes mode this process and every
  provider's) from the first request to the last
  deployment's end, less what the process spends idle over as long
  (``idle_cpu_ms_per_s``, measured for 2 s before: heartbeats, gossip,
  timers), per placement. Far less sensitive than the wall times to other
  processes on the machine; ``requester_cpu_ms_per_placement``: the same for
  this process alone (the requester's, in processes mode);
- ``leaked_leases``: leases and allocations still live on any node 3 s after
  every deployment of the run ended (losing bids are reverted at once, and 3 s
  is well under the 10 s lease, so only a revert that never happened counts);
- ``success_rate``: deployments that completed, over all.

``--placements FILE`` appends one line a placement to FILE: its latency, phases and
the deployment's own events (what the slowest ones waited for: specs/orchestration.md,
"Seventh pass: the tail").

The baseline, measured in the same run, is ``floor_ms``: the p50 of one signed
invoke round trip from the requester to a provider (``/public/hello``); a
placement needs at least three (bid, commit, allocate).
Prints JSON lines with --json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from dms.actor import ROOT_INBOX, Address, Handle
from dms.jobs.spec import DeploymentSpec
from dms.network.settings import NetworkSettings
from dms.node.allocator import freeze_start_heap
from dms.node.daemon import Node
from dms.orchestrator.states import DEPLOYMENT
from dms.resources import Resources
from dms.security.identity import public_key_from_peer_id
from dms.sim.backend import NodeSpec
from dms.sim.cluster import (
    SHARED_PROCESS_HEARTBEATS_PER_S,
    LocalCluster,
    shared_process_heartbeat_budget,
)
from dms.sim.faults import FaultPlan
from dms.sim.processes import ProcessBackend
from dms.sim.scenario import Amounts, NodeSettings

PROVIDER_AMOUNTS = Amounts(cpu=2, ram=8, disk=10)  # a daemon onboards (this machine: 2 cores)
PROVIDER = Resources(cpu=4, ram=8, disk=10)  # a node of this process (its ledger, unchecked)
START_DEADLINE_S = 240.0  # processes mode: to hear every provider, then to go quiet


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


class Work:
    """Wall time spent inside signing, verification and SQLite transactions, on every
    thread of the process (the bench's own instrument: wraps them in place)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.totals: Counter[str] = Counter()
        self.window_closes = 0

    def add(self, kind: str, took: float) -> None:
        with self.lock:
            self.totals[kind] += took

    def timed(self, kind: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self.add(kind, time.perf_counter() - t)

        return wrapper

    def timed_cm(self, kind: str, cm: Callable[..., Any]) -> Callable[..., Any]:
        @contextlib.contextmanager
        def wrapper(*args: Any, **kw: Any) -> Iterator[Any]:
            t = time.perf_counter()
            try:
                with cm(*args, **kw) as value:
                    yield value
            finally:
                self.add(kind, time.perf_counter() - t)

        return wrapper

    def install(self) -> None:
        from dms.actor import envelope
        from dms.orchestrator import choosing, rounds
        from dms.security.identity import Identity
        from dms.store.db import Database

        Identity.sign = self.timed("sign", Identity.sign)  # type: ignore[method-assign]
        envelope.verify_signature = self.timed("verify", envelope.verify_signature)
        for name in ("session", "transaction", "snapshot"):
            setattr(Database, name, self.timed_cm("sqlite", getattr(Database, name)))
        choosing.select = self.timed("select", choosing.select)
        window_ends = rounds.BidRounds._window_ends

        def counted(actor: Any, rid: int) -> None:
            if rid == actor.round and rid not in actor._closed and actor._asked - actor._answered:
                with self.lock:
                    self.window_closes += 1
            window_ends(actor, rid)

        rounds.BidRounds._window_ends = counted  # type: ignore[method-assign]

    def snapshot(self) -> tuple[Counter[str], int]:
        with self.lock:
            return Counter(self.totals), self.window_closes


WORK = Work()


class Network:
    """The nodes of one run, whichever way they run: the requester (a node of this
    process) and the providers, and what the run reads of them."""

    def __init__(self, req: Node, providers: list[str]) -> None:
        self.req = req
        self.providers = providers  # peer ids

    def cpu_s(self) -> float:
        """CPU seconds every node has used so far."""
        return time.process_time()

    def frames(self) -> int:
        """Unicast frames the nodes have received so far."""
        raise NotImplementedError

    def live_leases(self) -> int:
        """Leases and allocations still live on any node."""
        raise NotImplementedError

    def reach(self, peer_ids: set[str]) -> None:
        """Connect the requester to these providers directly (their heartbeats are late)."""

    def idle_cpu_per_s(self, seconds: float = 2.0) -> tuple[float, float]:
        """CPU seconds a second with no placement running (heartbeats, gossip, the
        nodes' timers): what a run's CPU time holds beside its placements; of every
        node, and of this process."""
        cpu, own, wall = self.cpu_s(), time.process_time(), time.monotonic()
        time.sleep(seconds)
        took = time.monotonic() - wall
        return (self.cpu_s() - cpu) / took, (time.process_time() - own) / took


class Threads(Network):
    """Every node a ``LocalCluster`` node of this process."""

    mode = "threads"

    def __init__(self, nodes: list[Node]) -> None:
        super().__init__(nodes[0], [n.peer_id for n in nodes[1:]])
        self.nodes = nodes

    def frames(self) -> int:
        return sum(n.transport.frames_in for n in self.nodes if n.transport is not None)

    def live_leases(self) -> int:
        return sum(len(n.ledger.live()) for n in self.nodes if n.ledger is not None)

    def debug_leases(self) -> None:
        for n in self.nodes:
            for lease in n.ledger.live() if n.ledger is not None else []:
                print(n.peer_id[-6:], lease.state, lease.ref, file=sys.stderr)


class Daemons(ProcessBackend):
    """``dms sim``'s processes mode, without its fault layer (nothing is injected)."""

    def extra_run_args(self) -> list[str]:
        return []

    def pids(self) -> list[int]:
        return [int(self.describe(name)["pid"]) for name in self.names if self.running(name)]


class Processes(Network):
    """Every provider a ``dms run`` daemon of its own; the requester this process's node."""

    mode = "processes"

    def __init__(self, req: Node, daemons: Daemons) -> None:
        super().__init__(req, [daemons.peer_id(name) for name in daemons.names])
        self.daemons = daemons
        self._procs = [psutil.Process(pid) for pid in daemons.pids()]

    def cpu_s(self) -> float:
        total = time.process_time()
        for proc in self._procs:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def frames(self) -> int:
        # Every placement message goes between the requester and a provider: what the
        # providers received is what the requester sent them.
        sent, _sizes = self.req.metrics.traffic.snapshot()
        transport = self.req.transport
        received = transport.frames_in if transport is not None else 0
        return received + sent.get(("out", "direct"), 0)

    def live_leases(self) -> int:
        own = len(self.req.ledger.live()) if self.req.ledger is not None else 0
        return own + sum(self.daemons.live_leases(name) for name in self.daemons.names)

    def reach(self, peer_ids: set[str]) -> None:
        # A daemon whose bootstrap dials all failed (a 50-provider start at load 28) is
        # alone: nobody hears its heartbeat until someone connects to it. Once connected,
        # its heartbeat sync introduces it to the requester within seconds.
        transport = self.req.transport
        for peer in peer_ids:
            name = self.daemons.name_of(peer)
            addrs = self.daemons.addrs(name) if name is not None else []
            if transport is None or not addrs or transport.is_connected(peer):
                continue
            try:
                transport.connect(addrs[0])
                say(f"connected to {name} ({peer[-8:]}), whose heartbeat had not come")
            except Exception as exc:
                say(f"{name} ({peer[-8:]}) did not answer a dial: {exc}")

    def debug_leases(self) -> None:
        for name in self.daemons.names:
            print(name, self.daemons.live_leases(name), file=sys.stderr)


def phases(row: dict[str, Any], t0: float) -> dict[str, float] | None:
    """Request -> bid requests sent -> winner chosen -> allocate sent -> running, from the
    deployment's events (ms, the last round's)."""
    asked = chose = allocating = None
    for e in row.get("events", []):
        what = e["what"]
        if what.startswith("round ") and ": asking" in what and chose is None:
            asked = e["at"]
        elif ": chose " in what and chose is None:
            chose = e["at"]
        elif what == "state: allocating" and allocating is None:
            allocating = e["at"]
    running = row.get("running_at")
    if allocating is None:  # committed and allocated in one exchange: no allocating state
        allocating = running
    if None in (asked, chose, allocating, running):
        return None
    return {
        "setup": (asked - t0) * 1000,
        "bids": (chose - asked) * 1000,
        "commit": (allocating - chose) * 1000,
        "allocate": (running - allocating) * 1000,
    }


class Ends:
    """The requester's deployments as they end: each terminal row as its actor saves it
    (the bench wraps ``DeploymentStore.save``), so waiting reads no database."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.rows: dict[str, dict[str, Any]] = {}

    def install(self) -> None:
        from dms.orchestrator.store import DeploymentStore

        save = DeploymentStore.save

        def saved(store: DeploymentStore, row: dict[str, Any], bids: Any = None) -> None:
            save(store, row, bids)
            if row["state"] in DEPLOYMENT.terminal:
                with self.cond:
                    self.rows[row["id"]] = row
                    self.cond.notify_all()

        DeploymentStore.save = saved  # type: ignore[method-assign]


ENDS = Ends()


def place(req: Any, specs: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    """A deployment of each spec, at most ``concurrency`` in flight; each row and its
    start. The specs are built before the clock runs: the bench's own validation is not
    placement work (a script sends the specs it holds; the node validates each one)."""
    jobs = len(specs)
    started: dict[str, float] = {}
    rows: dict[str, dict[str, Any]] = {}
    pending: set[str] = set()
    submitted = 0
    deadline = time.monotonic() + 60 + jobs
    while (submitted < jobs or pending) and time.monotonic() < deadline:
        while submitted < jobs and len(pending) < concurrency:
            t0 = time.time()
            dep = req.node.ask(
                req.node.handle,
                "/dms/node/deployment/new",
                {"spec": specs[submitted]},
                timeout=30,
            )
            started[dep["id"]] = t0
            pending.add(dep["id"])
            submitted += 1
        with ENDS.cond:
            ENDS.cond.wait_for(lambda: any(i in ENDS.rows for i in pending), timeout=1.0)
            for i in [i for i in pending if i in ENDS.rows]:
                rows[i] = ENDS.rows[i]
                pending.discard(i)
    for i in pending:  # never ended: counted as not completed
        rows[i] = {}
    return {"rows": rows, "started": started}


def figures_of(
    done: dict[str, Any], span_from: float, work: Counter[str], closes: int
) -> dict[str, Any]:
    rows, started = done["rows"], done["started"]
    latencies = sorted(
        (r["running_at"] - started[i]) * 1000 for i, r in rows.items() if r.get("running_at")
    )
    running = [r["running_at"] for r in rows.values() if r.get("running_at")]
    per_phase: dict[str, list[float]] = {}
    for i, r in rows.items():
        for name, ms in (phases(r, started[i]) or {}).items():
            per_phase.setdefault(name, []).append(ms)
    n = max(1, len(latencies))
    states = [r.get("state") for r in rows.values()]
    return {
        "success_rate": round(states.count("completed") / max(1, len(states)), 3),
        "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
        "p95_ms": round(latencies[int(0.95 * (len(latencies) - 1))], 1) if latencies else None,
        "placements_per_s": round(len(running) / (max(running) - span_from), 1) if running else 0.0,
        "phases_ms": {k: round(statistics.median(v), 1) for k, v in per_phase.items()},
        "work_ms": {k: round(v * 1000 / n, 2) for k, v in sorted(work.items())},
        "window_closes": closes,
    }


def write_placements(path: str, done: dict[str, Any], concurrency: int) -> None:
    """One JSON line a placement (appended to ``path``): its latency, phases and the
    deployment's own events, to find where the slow ones spent their time."""
    rows, started = done["rows"], done["started"]
    with open(path, "a") as out:
        for i, r in rows.items():
            running = r.get("running_at")
            line = {
                "concurrency": concurrency,
                "id": i,
                "started": started[i],
                "latency_ms": round((running - started[i]) * 1000, 2) if running else None,
                "phases_ms": {k: round(v, 2) for k, v in (phases(r, started[i]) or {}).items()},
                "events": r.get("events", []),
            }
            out.write(json.dumps(line) + "\n")


def homes(stack: contextlib.ExitStack) -> Path:
    """A folder for the run's node homes, removed once every node stopped (kept, with
    the daemons' logs, when DMS_BENCH_DEBUG is set)."""
    root = Path(tempfile.mkdtemp(prefix="dms-placement-"))
    if not os.environ.get("DMS_BENCH_DEBUG"):
        stack.callback(shutil.rmtree, root, ignore_errors=True)
    return root


def start_threads(count: int, args: argparse.Namespace, stack: contextlib.ExitStack) -> Threads:
    # All N nodes share this one process (and its GIL): see shared_process_heartbeat_budget.
    budget = shared_process_heartbeat_budget(count, args.heartbeat_budget)
    root = homes(stack)
    # Every node aims at every other (a LocalCluster's own aim is 12): bid requests find
    # a connection open, as they did before that aim; what is measured is placement.
    # At most max_connections (300), the setting's own bound.
    full_mesh = {"connection_aim": max(1, min(count - 1, NetworkSettings().max_connections))}
    c = stack.enter_context(
        LocalCluster(root, heartbeat_s=2.0, heartbeat_budget_per_s=budget, **full_mesh)
    )
    say(f"starting {count} nodes")
    nodes = c.start(count)
    c.wait_linked(timeout=120)
    say("linked; waiting for every provider's heartbeat")
    for n in nodes[1:]:
        n.ledger.onboard(PROVIDER)
    net = Threads(nodes)
    wait_known(net, deadline_s=120)
    # Steady state (LocalCluster.wait_settled): start-up's fast heartbeats and
    # dials would load the run, not the placements. After 60 s it goes on anyway.
    settled = c.wait_settled(timeout=60)
    say(f"peers table complete; start-up settled: {settled}")
    freeze_start_heap()  # as dms run does once its node started
    return net


def start_processes(count: int, args: argparse.Namespace, stack: contextlib.ExitStack) -> Processes:
    """``count`` provider daemons, then the requester in this process, bootstrapping
    from three of them; each provider onboarded through its API."""
    root = homes(stack)
    specs = [NodeSpec(f"p-{i + 1}", "p") for i in range(count)]
    daemons = Daemons(root / "providers", specs, NodeSettings(), FaultPlan())
    stack.callback(daemons.stop)
    say(f"starting {count} provider processes")
    daemons.start(say)
    # The requester runs at the providers' heartbeat settings (dms sim's processes mode).
    heartbeat_s, budget = daemons.mode_defaults()
    cluster = stack.enter_context(
        LocalCluster(root / "requester", heartbeat_s=heartbeat_s, heartbeat_budget_per_s=budget)
    )
    addrs = [daemons.addrs(name)[0] for name in daemons.names[:3]]
    req = cluster.add("requester", bootstrap=addrs)
    cluster.wait_linked(timeout=120)
    say("requester linked; onboarding the providers")
    for name in daemons.names:
        daemons.onboard(name, PROVIDER_AMOUNTS)
    net = Processes(req, daemons)
    wait_known(net, deadline_s=START_DEADLINE_S)
    # The providers' start-up (dials, meshing, fast heartbeats) would load the run.
    settled = daemons.settle(timeout=START_DEADLINE_S)
    idle = wait_steady(net, deadline_s=START_DEADLINE_S)
    say(f"peers table complete; start-up settled: {settled}; idle {idle * 1000:.0f} ms/s")
    # The requester's process as a daemon's (dms run freezes the heap it started with):
    # a full collection over it stalled every placement in flight for 120-380 ms.
    freeze_start_heap()
    return net


def wait_steady(net: Network, deadline_s: float, window_s: float = 2.0) -> float:
    """Until the nodes' CPU with no placement running stops falling (two windows in a
    row each at least 90 % of the one before), within ``deadline_s``; that CPU a
    second. ``settle``'s bar (a quarter of a core plus 2 % a node) lets 50 providers
    go on while their connection managers still dial in waves: their idle CPU was
    0.3 to 0.8 cores from one run to the next."""
    deadline = time.monotonic() + deadline_s
    last, steady = net.idle_cpu_per_s(window_s)[0], 0
    while time.monotonic() < deadline and steady < 2:
        now = net.idle_cpu_per_s(window_s)[0]
        steady = steady + 1 if now >= 0.9 * last else 0
        last = now
    return last


def wait_known(net: Network, deadline_s: float, reach_after_s: float = 15.0) -> None:
    """Until the requester holds every provider alive, with its resources; SystemExit
    naming how many it lacks after ``deadline_s``. The providers still missing after
    ``reach_after_s`` (and every ``reach_after_s`` after) are dialled directly."""
    started = last = reached = time.monotonic()
    want = set(net.providers)
    while True:
        known = {
            r.peer_id
            for r in net.req.peer_table.alive()
            if r.heartbeat and r.heartbeat.onboarded and r.heartbeat.onboarded.get("cpu")
        }
        missing = want - known
        if not missing:
            return
        now = time.monotonic()
        if now - started > deadline_s:
            raise SystemExit(
                f"the requester did not hear {len(missing)} provider(s) in {deadline_s:g} s"
            )
        if now - reached >= reach_after_s:
            reached = now
            net.reach(missing)
        if now - last >= 5.0:
            last = now
            say(f"waiting for {len(missing)} provider heartbeat(s)")
        time.sleep(0.1)


def run(count: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    with contextlib.ExitStack() as stack:
        if args.processes:
            return measure(start_processes(count, args, stack), count, args)
        return measure(start_threads(count, args, stack), count, args)


def measure(net: Threads | Processes, count: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    req = net.req
    out = []
    # Floor: one signed invoke round trip to a provider, the first that answers (on a
    # loaded machine a 50-node start may leave one not yet dialled: the run went on
    # to fail with Unreachable here, before any placement).
    floor: list[float] = []
    handles = [
        Handle(id=public_key_from_peer_id(p), address=Address(host=p, inbox=ROOT_INBOX))
        for p in net.providers
    ]
    for target in handles:
        try:
            req.node.ask(target, "/public/hello", timeout=5)
        except Exception as exc:
            say(f"floor: {target.address.host[-8:]} did not answer ({exc}); the next one")
            continue
        for _ in range(50):
            t = time.perf_counter()
            req.node.ask(target, "/public/hello")
            floor.append(time.perf_counter() - t)
        break
    # Warm-up, as on a node that has been running: a stream to every provider is
    # open before timing (the first message to a peer pays for opening it).
    for target in handles:
        try:
            req.node.ask(target, "/public/hello", timeout=5)
        except Exception as exc:  # placement copes with it: the bench just says so
            say(f"warm-up: {target.address.host[-8:]} did not answer ({exc})")
    offset = 0
    for concurrency in args.concurrency:
        specs = [spec(offset + i, args.strategy) for i in range(args.jobs)]
        idle, idle_own = net.idle_cpu_per_s()
        before, (work0, closes0) = net.frames(), WORK.snapshot()
        span_from, wall_from = time.time(), time.monotonic()
        cpu_from, own_from = net.cpu_s(), time.process_time()
        done = place(req, specs, concurrency)
        wall = time.monotonic() - wall_from
        cpu_s = net.cpu_s() - cpu_from - idle * wall
        own_s = time.process_time() - own_from - idle_own * wall
        offset += args.jobs
        work1, closes1 = WORK.snapshot()
        work1.subtract(work0)
        if args.placements:
            write_placements(args.placements, done, concurrency)
        figures = {
            "bench": "placement",
            "mode": net.mode,
            "nodes": len(net.providers) + 1,
            "providers": len(net.providers),
            "concurrency": concurrency,
            "jobs": args.jobs,
            "strategy": args.strategy,
            **figures_of(done, span_from, work1, closes1 - closes0),
            "messages_per_placement": round((net.frames() - before) / args.jobs, 1),
            "cpu_ms_per_placement": round(cpu_s * 1000 / args.jobs, 1),
            "idle_cpu_ms_per_s": round(idle * 1000, 1),
            # The requester's process alone (in threads mode, every node's): one
            # requester places at most 1000 / this many a second, whatever the providers.
            "requester_cpu_ms_per_placement": round(own_s * 1000 / args.jobs, 1),
            "floor_ms": round(statistics.median(floor) * 1000, 2) if floor else None,
        }
        # Reverts are one-way messages still in providers' mailboxes; give them 3 s
        # to land (well under the 10 s lease, so an expiry cannot hide a real leak).
        settle = time.monotonic() + 3.0
        leaked = net.live_leases()
        while time.monotonic() < settle and leaked:
            time.sleep(0.25)
            leaked = net.live_leases()
        figures["leaked_leases"] = leaked
        say(f"{count} nodes, concurrency {concurrency}: {figures['p50_ms']} ms p50")
        out.append(figures)
        if os.environ.get("DMS_BENCH_DEBUG"):
            net.debug_leases()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, nargs="+", default=[5, 20, 50])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--jobs", type=int, default=64, help="per concurrency")
    parser.add_argument("--strategy", default="score")
    parser.add_argument(
        "--heartbeat-budget",
        type=float,
        default=SHARED_PROCESS_HEARTBEATS_PER_S,
        help="gossip heartbeats/s received by all simulated nodes together",
    )
    parser.add_argument(
        "--processes",
        action="store_true",
        help="every provider a dms run daemon of its own (--nodes counts the providers)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    parser.add_argument(
        "--placements",
        metavar="FILE",
        help="append one JSON line a placement to FILE (latency, phases, its events)",
    )
    args = parser.parse_args()
    WORK.install()
    ENDS.install()
    for count in args.nodes:
        for figures in run(count, args):
            if args.json:
                print(json.dumps(figures), flush=True)
            else:
                for key, value in figures.items():
                    print(f"{key:>24}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
