"""Running a scenario: start the nodes, play the timeline, check the expectations.

``run_scenario`` is what ``dms sim run`` and the tests call. It prints one line
per thing that happens (through ``say``), returns a :class:`Report` (what
``DIR/report.json`` holds), and stops every node whatever happens, Ctrl-C
included. See ``specs/sim.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dms.errors import DmsError
from dms.orchestrator.states import DEPLOYMENT
from dms.sim.backend import Backend, NodeSpec, SimError
from dms.sim.collab import check_collab, plan_collab
from dms.sim.faults import FaultPlan, LinkRule
from dms.sim.jobs import Follower, Job
from dms.sim.scenario import Collab, Deploy, Mine, Scenario, Step, Target

log = logging.getLogger("dms.sim")

Say = Callable[[str], None]
READY_TIMEOUT_S = 120.0
SETTLE_TIMEOUT_S = 60.0  # the longest start-up may stay busy before the timeline starts
END_TIMEOUT_S = 600.0  # the longest the end waits for jobs that have not ended


class StepFailed(DmsError):
    """A step could not do what it says (the node is not running, the job ended, ...)."""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Report:
    scenario: str
    mode: str
    nodes: int
    started_at: float
    duration_s: float = 0.0
    timeline: list[dict[str, Any]] = field(default_factory=list)
    jobs: list[dict[str, Any]] = field(default_factory=list)
    batches: list[dict[str, Any]] = field(default_factory=list)
    placement: dict[str, Any] = field(default_factory=dict)
    leases: dict[str, Any] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    root: str = ""

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "mode": self.mode,
            "nodes": self.nodes,
            "ok": self.ok,
            "failed": [c.name for c in self.failed],
            "started_at": round(self.started_at, 3),
            "duration_s": round(self.duration_s, 2),
            "timeline": self.timeline,
            "jobs": self.jobs,
            "batches": self.batches,
            "placement": self.placement,
            "leases": self.leases,
            "faults": self.faults,
            "expectations": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
        }


def node_specs(scenario: Scenario) -> list[NodeSpec]:
    return [
        NodeSpec(name, group.name, list(group.labels), group.preferences, group.onboard)
        for group in scenario.nodes
        for name in group.node_names()
    ]


def make_backend(scenario: Scenario, root: Path, faults: FaultPlan, **options: Any) -> Backend:
    specs = node_specs(scenario)
    if scenario.mode == "threads":
        from dms.sim.threads import ThreadsBackend

        return ThreadsBackend(root, specs, scenario.settings, faults, **options)
    if scenario.mode == "netns":
        from dms.sim.netns_mode import NetnsBackend

        options.setdefault("seed", scenario.seed)
        public = {n for g in scenario.nodes if g.public for n in g.node_names()}
        return NetnsBackend(root, specs, scenario.settings, faults, public=public, **options)
    if scenario.mode == "processes":
        from dms.sim.processes import ProcessBackend

        options.setdefault("seed", scenario.seed)
        return ProcessBackend(root, specs, scenario.settings, faults, **options)
    from dms.sim.memory import MemoryBackend

    return MemoryBackend(root, specs, scenario.settings, faults)


def percentile(values: list[float], q: float) -> float | None:
    """The median for q = 0.5, else the nearest-rank percentile."""
    if not values:
        return None
    if q == 0.5:
        return statistics.median(values)
    return sorted(values)[max(0, math.ceil(q * len(values)) - 1)]


class Runner:
    def __init__(
        self, scenario: Scenario, backend: Backend, faults: FaultPlan, say: Say | None = None
    ) -> None:
        self.scenario = scenario
        self.backend = backend
        self.faults = faults
        self._say = say or (lambda _line: None)
        self.t0 = self.timeline_t0 = time.monotonic()
        self.report = Report(
            scenario.name, scenario.mode, len(backend.specs), started_at=time.time()
        )
        self.jobs: dict[str, Job] = {}
        self.step_failures: list[str] = []
        self.follower: Follower | None = None
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="dms-sim-local")
        self.batch_sizes = {
            s.deploy.name: s.deploy.count for s in scenario.timeline if s.deploy is not None
        }

    # ---- output ------------------------------------------------------------------------

    def line(self, action: str, what: str, ok: bool = True, **extra: Any) -> None:
        t = time.monotonic() - self.t0
        entry = {"t": round(t, 2), "action": action, "what": what, "ok": ok, **extra}
        self.report.timeline.append(entry)
        # Whole: the CLI wraps it to the terminal (a cut would lose the reason a worker
        # was lost, or a job failed).
        self._say(f"{t:7.1f}s  {action:<9} {what}")

    # ---- the whole run -------------------------------------------------------------------

    def run(self) -> Report:
        try:
            self.setup()
            self.follower = Follower(self.backend, self._job_told, self._quiet)
            self.timeline_t0 = time.monotonic()
            for i, step in enumerate(self.scenario.timeline):
                self.play(i, step)
            self.finish()
        finally:
            if self.follower is not None:
                self.follower.stop()
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.line("stop", f"{len(self.backend.specs)} nodes")
            self.backend.stop()
            self.report.duration_s = time.monotonic() - self.t0
        return self.report

    def setup(self) -> None:
        n = len(self.backend.specs)
        self.line("start", f"{n} node(s), mode {self.scenario.mode}")
        last = [0.0]

        def progress(text: str) -> None:  # at most a line a second while nodes start
            if time.monotonic() - last[0] >= 1.0 or text.startswith(f"started {n}/"):
                last[0] = time.monotonic()
                self.line("start", text)

        self.backend.first = self.requesters()
        self.backend.start(progress)
        providers = self.onboard_all()
        self.wait_ready(providers)
        self.warm_up(providers)
        started = time.monotonic()
        if not self.backend.settle(SETTLE_TIMEOUT_S):
            self.line("ready", f"start-up still busy after {SETTLE_TIMEOUT_S:g} s; going on")
        elif time.monotonic() - started >= 1.0:
            self.line("ready", f"start-up settled ({time.monotonic() - started:.1f} s)")

    def onboard_all(self) -> set[str]:
        onboarded = []
        for spec in self.backend.specs:
            amounts = self.scenario.group_of(spec.name).onboard
            if amounts is None:
                continue
            if not self.backend.onboards_at_start:
                self.backend.onboard(spec.name, amounts)
            onboarded.append(spec.name)
        groups = {self.scenario.group_of(name).name for name in onboarded}
        if len(groups) == 1:
            amounts = self.scenario.group_of(onboarded[0]).onboard
            assert amounts is not None
            self.line("onboard", f"{len(onboarded)} node(s), each {describe(amounts)}")
        elif onboarded:
            self.line("onboard", f"{len(onboarded)} node(s) of {len(groups)} groups")
        return {self.backend.peer_id(name) for name in onboarded}

    def requesters(self) -> list[str]:
        names = {self.scenario.first_node}
        for step in self.scenario.timeline:
            action = step.deploy or step.mine
            if action is not None and action.from_:
                names.add(action.from_)
            if step.collab is not None:  # its proposer places the aggregator
                names.add(self.scenario.owner_nodes(step.collab)[0])
        return sorted(names)

    def wait_ready(self, providers: set[str]) -> None:
        """Until every requester holds every onboarded node alive, with its resources."""
        requesters = self.requesters()
        started = last = time.monotonic()
        while True:
            missing = 0
            for name in requesters:
                known = self.backend.alive_peers(name)
                me = self.backend.peer_id(name)
                missing += sum(1 for p in providers - {me} if not known.get(p))
            if not missing:
                took = time.monotonic() - started
                who = requesters[0] if len(requesters) == 1 else f"{len(requesters)} requesters"
                self.line("ready", f"{who} knows every provider ({took:.1f} s)")
                return
            if time.monotonic() - started > READY_TIMEOUT_S:
                raise SimError(
                    f"the requesters did not hear {missing} provider heartbeat(s) within "
                    f"{READY_TIMEOUT_S:g} s"
                )
            if time.monotonic() - last >= 5.0:
                last = time.monotonic()
                self.line("ready", f"waiting for {missing} provider heartbeat(s)")
            time.sleep(0.1)

    def warm_up(self, providers: set[str]) -> None:
        """Each requester says hello to every provider, as a node that has been running
        a while has: the first message to a peer pays for opening streams (and, over
        libp2p, perhaps a dial), which would otherwise land on the first jobs."""
        started, failed = time.monotonic(), 0
        for name in self.requesters():
            for peer in sorted(providers - {self.backend.peer_id(name)}):
                try:
                    self.backend.hello(name, peer)
                except DmsError as err:  # placement copes with it: the run just says so
                    failed += 1
                    log.info("warm-up: %s to %s: %s", name, peer, err)
        took = time.monotonic() - started
        note = f", {failed} did not answer" if failed else ""
        self.line("ready", f"streams to {len(providers)} provider(s) open ({took:.1f} s){note}")

    # ---- the timeline --------------------------------------------------------------------

    def play(self, index: int, step: Step) -> None:
        if step.at is not None:
            delay = self.timeline_t0 + step.at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        try:
            getattr(self, f"do_{step.action}")(getattr(step, step.action))
        except DmsError as err:  # a refusal (RemoteError), a node not running, ...
            reason = str(err)
            self.step_failures.append(f"step {index + 1} ({step.action}): {reason}")
            self.line(step.action, f"FAILED: {reason}", ok=False)

    def requester(self, action: Deploy | Mine) -> str:
        name = action.from_ or self.scenario.first_node
        self.backend.check_running(name)
        return name

    def do_deploy(self, deploy: Deploy) -> None:
        node = self.requester(deploy)
        assert deploy.spec is not None
        spec = deploy.spec.model_dump(mode="json")
        names = deploy.job_names()
        how = "all at once" if deploy.concurrent else "one after another"
        what = f"{deploy.name}: {deploy.spec.name!r} from {node}"
        self.line("deploy", what if len(names) == 1 else f"{what}, {len(names)} x, {how}")
        last = time.monotonic()
        for i, name in enumerate(names):
            job = Job(name, "deploy", node, deploy.name, concurrent=deploy.concurrent)
            job.submitted = time.time()
            reply = self.backend.call(node, "/dms/node/deployment/new", {"spec": spec})
            job.id = reply["id"]
            self.jobs[name] = job
            assert self.follower is not None
            self.follower.add(job)
            if not deploy.concurrent:
                self.follower.wait(
                    lambda job=job: job.running_at is not None or job.ended,
                    deploy.spec.deadline_s + 10,
                )
                if len(names) > 1 and time.monotonic() - last >= 2.0:
                    last = time.monotonic()
                    self.line("deploy", f"{deploy.name}: {i + 1}/{len(names)} placed")

    def do_mine(self, mine: Mine) -> None:
        node = self.requester(mine)
        source = Path(mine.data or mine.train or "").name
        scheme = "" if mine.plaintext else f"/{mine.scheme}"
        shards = f"{mine.shards} shard{'s' if mine.shards > 1 else ''}"
        what = f"{mine.name}: {mine.algorithm}{scheme} on {source}, {shards}, from {node}"
        self.line("mine", what)
        job = Job(mine.name, "mine", node, mine.name)
        expect = self.scenario.expect
        if expect.labels_equal_local:
            job.local = self.pool.submit(local_labels, mine, False)
        if expect.labels_equal_plaintext:
            job.plaintext = self.pool.submit(local_labels, mine, True)
        job.submitted = time.time()
        reply = self.backend.call(node, "/dms/node/mining/new", mine.request(), timeout=120)
        job.id = reply["id"]
        self.jobs[mine.name] = job
        assert self.follower is not None
        self.follower.add(job)

    def do_collab(self, collab: Collab) -> None:
        owners = self.scenario.owner_nodes(collab)
        for name in owners:
            self.backend.check_running(name)
        peers = [self.backend.peer_id(n) for n in owners]
        folder = Path(self.report.root or self.backend.root) / "collab" / collab.name
        collab_id = f"{collab.name}-{hashlib.sha256(peers[0].encode()).hexdigest()[:8]}"
        try:
            plan = plan_collab(collab, owners, peers, folder, collab_id)
        except ValueError as exc:
            raise StepFailed(f"{collab.name}: {exc}") from None
        p, n = plan.proposal, sum(len(x) for x in plan.parts)
        self.line(
            "collab",
            f"{collab.name}: k-means of {len(owners)} owners' rows ({n} in all, a = {p.a}), "
            f"k = {p.k}, {p.rounds} rounds, threshold {p.threshold}, proposed by {owners[0]}",
        )
        job = Job(collab.name, "collab", owners[0], collab.name, collab=plan)
        job.submitted = time.time()
        (proposer, propose, payload), *joins = plan.payloads(peers[0], collab)
        job.id = self.backend.call(proposer, propose, payload, timeout=60)["deployment"]
        self.jobs[collab.name] = job
        assert self.follower is not None
        self.follower.add(job)
        refused = []
        for node, join, payload in joins:  # one refused: the others go on without it
            try:
                self.backend.call(node, join, payload, timeout=60)
            except DmsError as err:
                refused.append(f"{node}: {err}")
        if refused:
            raise StepFailed(f"{len(refused)} owner(s) could not join: {'; '.join(refused[:2])}")

    def do_wait(self, wait: Any) -> None:
        if wait.seconds is not None:
            self.line("wait", f"{wait.seconds:g} s")
            time.sleep(wait.seconds)
            return
        job = self.jobs[wait.job]
        if wait.steps is not None:
            what, done = f"{wait.steps} step(s) of {job.name}", lambda: job.steps >= wait.steps
        elif wait.until == "running":
            what, done = f"{job.name} to run", lambda: job.running_at is not None
        else:
            what, done = f"{job.name} to end", lambda: job.ended
        self.line("wait", f"for {what}")
        assert self.follower is not None
        if not self.follower.wait(lambda: done() or job.ended, wait.timeout_s):
            raise StepFailed(f"no {what} within {wait.timeout_s:g} s")
        if not done():
            raise StepFailed(f"{job.name} {job.state} before {what}")

    def target(self, target: Target) -> tuple[str, str]:
        """The node a kill or restart is for, and how it was chosen."""
        if target.node is not None:
            return target.node, ""
        job = self.jobs[target.worker_of or ""]
        if job.ended:
            raise StepFailed(f"{job.name} has {job.state}: it has no worker any more")
        for peer in job.shard_peers:
            name = self.backend.name_of(peer)
            if name is not None and self.backend.running(name):
                return name, f" (worker of {job.name})"
        raise StepFailed(f"{job.name} has no worker on a running node")

    def do_kill(self, target: Target) -> None:
        name, why = self.target(target)
        self.backend.crash(name)
        self.line("kill", f"{name}{why}: kill -9")

    def do_restart(self, target: Target) -> None:
        name, why = self.target(target)
        self.backend.restart(name)
        self.line("restart", f"{name}{why}")

    def do_onboard(self, onboard: Any) -> None:
        self.backend.onboard(onboard.node, onboard)
        self.line("onboard", f"{onboard.node}: {describe(onboard)}")

    def do_offboard(self, offboard: Any) -> None:
        payload = {"force": offboard.force}
        self.backend.call(offboard.node, "/dms/node/onboarding/offboard", payload, timeout=60)
        self.line("offboard", offboard.node + (" (forced)" if offboard.force else ""))

    def peers_of(self, names: list[str]) -> set[str]:
        groups = self.scenario.groups()
        return {self.backend.peer_id(n) for name in names for n in groups[name]}

    def do_partition(self, sides: list[list[str]]) -> None:
        self.faults.partition([self.peers_of(side) for side in sides])
        self.line("partition", " | ".join(", ".join(side) for side in sides))

    def do_link(self, link: Any) -> None:
        a, b = (frozenset(self.peers_of([name])) for name in link.between)
        rule = LinkRule(a, b, link.latency_ms / 1000.0, link.loss, link.bandwidth_bps)
        self.faults.link(rule)
        parts = []
        if link.latency_ms:
            parts.append(f"latency {link.latency_ms:g} ms")
        if link.loss:
            parts.append(f"loss {link.loss:.0%}")
        if link.bandwidth is not None:
            parts.append(f"bandwidth {link.bandwidth}")
        self.line("link", f"{link.between[0]} <-> {link.between[1]}: {', '.join(parts)}")

    def do_heal(self, _heal: Any) -> None:
        self.faults.heal()
        self.line("heal", "every node reaches every other again")

    # ---- jobs ----------------------------------------------------------------------------

    def _quiet(self, job: Job) -> bool:
        return self.batch_sizes.get(job.batch, 1) > 1

    def _job_told(self, job: Job, text: str) -> None:
        self.line("job", text)

    # ---- the end ---------------------------------------------------------------------------

    def finish(self) -> None:
        assert self.follower is not None
        pending = [j for j in self.jobs.values() if not j.ended]
        if pending:
            self.line("end", f"waiting for {len(pending)} job(s) to end")

        def settled() -> bool:
            return all(j.ended or not self.backend.running(j.node) for j in self.jobs.values())

        self.follower.wait(settled, END_TIMEOUT_S)
        if self.scenario.mode not in ("processes", "netns"):  # each node counts in its own
            self.report.faults = self.faults.stats()
        leases = self.settle_leases()
        self.report.leases = leases
        self.report.jobs = [self.job_row(j) for j in self.jobs.values()]
        self.report.batches = self.batch_rows()
        times = [j.placement_ms for j in self.jobs.values() if j.placement_ms is not None]
        p50, p95 = rounded(percentile(times, 0.5)), rounded(percentile(times, 0.95))
        self.report.placement = {"count": len(times), "p50_ms": p50, "p95_ms": p95}
        self.report.checks = self.checks(leases, p50)

    def settle_leases(self) -> dict[str, Any]:
        """Live leases on running nodes, once none is left or ``settle_s`` has passed."""
        deadline = time.monotonic() + self.scenario.expect.settle_s
        while True:
            by_node = {}
            for name in self.backend.names:
                if self.backend.running(name):
                    with contextlib.suppress(Exception):
                        count = self.backend.live_leases(name)
                        if count:
                            by_node[name] = count
            if not by_node or time.monotonic() >= deadline:
                return {"leaked": sum(by_node.values()), "by_node": by_node}
            time.sleep(0.1)

    def job_row(self, job: Job) -> dict[str, Any]:
        row: dict[str, Any] = {
            "name": job.name,
            "kind": job.kind,
            "node": job.node,
            "id": job.id,
            "state": job.state,
            "reason": job.reason,
            "placement_ms": None if job.placement_ms is None else round(job.placement_ms, 1),
        }
        if job.collab is not None:
            session, plan = job.collab.session, job.collab
            dropped = [self.backend.name_of(d["owner"]) or d["owner"] for d in session.get(
                "dropped", [])]  # fmt: skip
            aggregator = session.get("aggregator")
            row.update(
                steps=job.steps,
                owners=len(plan.owners),
                dropped=dropped,
                aggregator=self.backend.name_of(aggregator) if aggregator else None,
                aggregator_losses=len(session.get("aggregator_losses") or []),
                kb_per_owner_per_round=session.get("kb_per_owner_per_round"),
            )
            if job.state == "completed":
                row["equals_plaintext"], row["plaintext_detail"] = check_collab(plan)
        if job.kind == "mine":
            row.update(steps=job.steps, replacements=job.replacements)
            placement = (job.result or {}).get("placement") or []
            # How the owner reached each shard's worker at the end: direct or relayed.
            row["paths"] = [p.get("path") for p in placement if isinstance(p, dict)]
            if job.labels is not None:  # to compare runs: the same labels, the same digest
                digest = hashlib.sha256(json.dumps(job.labels).encode()).hexdigest()
                row["labels_sha256"] = digest[:16]
            pairs = (("labels_equal_local", job.local), ("labels_equal_plaintext", job.plaintext))
            for key, future in pairs:
                row[key] = self._equal(job, future)
        return row

    def _equal(self, job: Job, future: Future[list[Any]] | None) -> bool | None:
        if future is None or job.labels is None:
            return None
        try:
            return future.result(timeout=600) == job.labels
        except Exception as exc:
            log.warning("local labels of %s: %s", job.name, exc)
            return False

    def batch_rows(self) -> list[dict[str, Any]]:
        rows = []
        for step in self.scenario.timeline:
            if step.deploy is None or step.deploy.count == 1:
                continue
            jobs = [self.jobs[n] for n in step.deploy.job_names() if n in self.jobs]
            times = [j.placement_ms for j in jobs if j.placement_ms is not None]
            running = [j.running_at for j in jobs if j.running_at is not None]
            span = max(running) - min(j.submitted for j in jobs) if running else 0.0
            p50, p95 = rounded(percentile(times, 0.5)), rounded(percentile(times, 0.95))
            rows.append(
                {
                    "name": step.deploy.name,
                    "count": len(jobs),
                    "concurrent": step.deploy.concurrent,
                    "completed": sum(1 for j in jobs if j.state == "completed"),
                    "p50_ms": p50,
                    "p95_ms": p95,
                    "placements_per_s": round(len(running) / span, 1) if span > 0 else None,
                }
            )
        return rows

    def checks(self, leases: dict[str, Any], p50: float | None) -> list[Check]:
        expect = self.scenario.expect
        jobs = list(self.jobs.values())
        mining = [j for j in jobs if j.kind == "mine"]
        out = [
            Check(
                "every step ran",
                not self.step_failures,
                "; ".join(self.step_failures[:2]) or f"{len(self.scenario.timeline)} step(s)",
            )
        ]
        if expect.jobs_complete:
            bad = [j for j in jobs if j.state != "completed"]
            detail = "; ".join(
                f"{j.name}: {j.state}" + (f": {j.reason}" if j.reason else "") for j in bad[:2]
            )
            out.append(
                Check(
                    "every job completes",
                    not bad,
                    (detail + (f" (and {len(bad) - 2} more)" if len(bad) > 2 else ""))
                    or f"{len(jobs)} of {len(jobs)}",
                )
            )
        if expect.no_leaked_leases:
            by_node = leases.get("by_node", {})
            out.append(
                Check(
                    "no leaked lease",
                    not by_node,
                    ", ".join(f"{n}: {c}" for n, c in list(by_node.items())[:4])
                    or f"none {expect.settle_s:g} s after the end",
                )
            )
        for key, name, wanted in (
            ("labels_equal_local", "mining labels equal --local", expect.labels_equal_local),
            ("labels_equal_plaintext", "mining labels = plaintext", expect.labels_equal_plaintext),
        ):
            if not wanted or not mining:
                continue
            rows = {r["name"]: r for r in self.report.jobs}
            bad = [j.name for j in mining if rows[j.name].get(key) is not True]
            detail = f"differ or missing: {', '.join(bad)}" if bad else f"{len(mining)} job(s)"
            out.append(Check(name, not bad, detail))
        collabs = [j for j in jobs if j.collab is not None]
        if expect.collab_equals_plaintext and collabs:
            rows = {r["name"]: r for r in self.report.jobs}
            bad = [f"{j.name}: {rows[j.name].get('plaintext_detail', j.state)}" for j in collabs
                   if rows[j.name].get("equals_plaintext") is not True]  # fmt: skip
            detail = "; ".join(bad[:2]) or f"{len(collabs)} collaboration(s)"
            out.append(Check("collaborations = plaintext k-means", not bad, detail))
        if expect.owners_dropped is not None:
            rows = {r["name"]: r for r in self.report.jobs}
            count = sum(len(rows[j.name].get("dropped") or []) for j in collabs)
            out.append(
                Check(
                    f"at least {expect.owners_dropped} owner(s) dropped",
                    count >= expect.owners_dropped,
                    f"{count} dropped",
                )
            )
        if expect.placement_p50_ms is not None:
            ok = p50 is not None and p50 <= expect.placement_p50_ms
            detail = "no placement" if p50 is None else f"p50 {p50:g} ms"
            out.append(Check(f"placement p50 <= {expect.placement_p50_ms:g} ms", ok, detail))
        if expect.workers_replaced is not None:
            replaced = sum(j.replacements for j in mining)
            out.append(
                Check(
                    f"at least {expect.workers_replaced} worker(s) replaced",
                    replaced >= expect.workers_replaced,
                    f"{replaced} replaced",
                )
            )
        return out


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def describe(amounts: Any) -> str:
    def show(value: str | float) -> str:
        return f"{value:g}" if isinstance(value, float | int) else str(value)

    return f"cpu {show(amounts.cpu)}, ram {show(amounts.ram)}, disk {show(amounts.disk)}"


def local_labels(mine: Mine, plaintext: bool) -> list[Any]:
    """What ``dms mine --local`` gives for the same settings (``plaintext``: the
    plaintext algorithm's labels instead)."""
    from dms.mining import run_classification, run_clustering
    from dms.mining.data import read_table, read_test_table
    from dms.mining.distance import Distance
    from dms.mining.settings import CLUSTERING

    s = mine.settings()
    common: dict[str, Any] = {"distance": Distance(s.distance)}
    if s.algorithm in CLUSTERING:
        assert mine.data is not None
        features = read_table(mine.data).features
        params = replace(s.clustering(), shards=1)  # run here, the records whole
        if plaintext:
            return run_clustering("kmeans", features, params).labels
        extra = {} if s.plaintext else {"scheme": s.scheme, "protocol": s.protocol}
        return run_clustering(s.algorithm, features, params, **extra).labels
    assert mine.train is not None and mine.test is not None
    training = read_table(mine.train, label=True, label_column=mine.label_column)
    queries = read_test_table(mine.test, training)
    assert training.labels is not None
    if plaintext:
        algorithm, extra = "knn", {}
    else:
        algorithm = s.algorithm
        extra = {} if s.plaintext else {"scheme": s.scheme, "protocol": s.protocol}
    train, test = training.features, queries.features
    return run_classification(
        algorithm, train, training.labels, test, s.k, **common, **extra
    ).labels


def run_scenario(
    scenario: Scenario,
    *,
    root: Path | None = None,
    say: Say | None = None,
    **options: Any,
) -> Report:
    """Run ``scenario`` with node homes under ``root`` (a temporary folder if None)."""
    if scenario.mode == "memory" and any(s.mine for s in scenario.timeline):
        raise SimError("mining needs libp2p: use mode threads or processes")
    root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="dms-sim-"))
    faults = FaultPlan(seed=scenario.seed)
    backend = make_backend(scenario, root, faults, **options)
    runner = Runner(scenario, backend, faults, say)
    runner.report.root = str(root)
    try:
        return runner.run()
    finally:
        faults.close()


def summary_rows(report: Report) -> list[list[str]]:
    """The jobs table: one row a job, or a batch of a deploy step."""
    rows: list[list[str]] = []
    batched = {b["name"] for b in report.batches}
    for batch in report.batches:
        ms = batch["p50_ms"]
        rows.append(
            [
                f"{batch['name']} ({batch['count']})",
                "deploy",
                f"{batch['completed']}/{batch['count']} done",
                "" if ms is None else f"{ms:.0f}",
                "at once" if batch["concurrent"] else "one by one",
            ]
        )
    for job in report.jobs:
        if job["name"].rsplit(".", 1)[0] in batched and "." in job["name"]:
            continue
        note = job["reason"]  # the table wraps it between words
        if job["kind"] == "collab":
            parts = [f"{job['owners']} owners, {job['steps']} rounds"]
            if job["dropped"]:
                parts.append(f"dropped {', '.join(job['dropped'])}")
            if job.get("equals_plaintext") is not None:
                parts.append("= plaintext" if job["equals_plaintext"] else "!= plaintext")
            note = ", ".join(parts) + (f"; {note}" if note else "")
        if job["kind"] == "mine":
            parts = [f"{job['steps']} steps"]
            if job.get("replacements"):
                parts.append(f"{job['replacements']} replaced")
            if job.get("labels_equal_local") is not None:
                parts.append("= local" if job["labels_equal_local"] else "!= local")
            if any(job.get("paths") or []):
                parts.append("reached " + "/".join(str(p) for p in job["paths"]))
            note = ", ".join(parts) + (f"; {note}" if note else "")
        ms = job["placement_ms"]
        state = job["state"] if job["state"] in DEPLOYMENT.terminal else f"{job['state']}?"
        rows.append([job["name"], job["kind"], state, "" if ms is None else f"{ms:.0f}", note])
    return rows
