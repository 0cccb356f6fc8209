"""The jobs a scenario starts, followed through their requester's status behaviours.

A follower thread polls every job that has not ended: ``/dms/node/deployment/
status`` (state, ``running_at``) and, for mining, ``/dms/node/mining/status``
(phase, steps, shards, events) and at the end ``/dms/node/mining/result``. It
tells the runner what changed, one short line at a time. A job whose requester
is not running is not polled (its row is in that node's store and is read again
once it runs).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from dms.orchestrator.states import COLLAB, DEPLOYMENT, SESSION
from dms.sim.backend import Backend
from dms.sim.collab import CollabPlan

log = logging.getLogger("dms.sim")

POLL_S = 0.2


@dataclass
class Job:
    name: str
    kind: str  # "deploy", "mine" or "collab"
    node: str  # the requester
    batch: str  # the step that started it (a deploy step's name)
    concurrent: bool = False
    submitted: float = 0.0  # wall clock, when the request was sent
    id: str | None = None
    state: str = "submitted"  # a deployment state; for mining, the session's phase
    running_at: float | None = None
    ended_at: float | None = None
    reason: str = ""
    steps: int = 0
    total_steps: int | None = None
    replacements: int = 0
    shard_peers: list[str] = field(default_factory=list)
    labels: list[Any] | None = None
    result: dict[str, Any] | None = None
    local: Future[list[Any]] | None = None
    plaintext: Future[list[Any]] | None = None
    events_seen: set[str] = field(default_factory=set)
    collab: CollabPlan | None = None  # a collaboration's owners, rows, results
    poll_errors: int = 0

    @property
    def ended(self) -> bool:
        return self.state in DEPLOYMENT.terminal

    @property
    def placement_ms(self) -> float | None:
        if self.running_at is None:
            return None
        return max(0.0, (self.running_at - self.submitted) * 1000.0)


Tell = Callable[[Job, str], None]


class Follower:
    """Polls the jobs that have not ended; ``tell(job, line)`` hears what changed."""

    def __init__(self, backend: Backend, tell: Tell, quiet: Callable[[Job], bool]) -> None:
        self.backend = backend
        self.tell = tell
        self.quiet = quiet  # jobs of a batch: only their failures are told
        self.jobs: list[Job] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dms-sim-jobs", daemon=True)
        self._thread.start()

    def add(self, job: Job) -> None:
        with self._lock:
            self.jobs.append(job)

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` (checked after every poll) or ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.5))
        return True

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            with self._lock:
                pending = [j for j in self.jobs if not j.ended]
            for job in pending:
                if self._stop.is_set():
                    return
                if not self.backend.running(job.node) or job.id is None:
                    continue
                try:
                    self.poll(job)
                    job.poll_errors = 0
                except Exception as exc:  # a node stopping mid-poll: try again
                    job.poll_errors += 1
                    log.debug("status of %s: %s", job.name, exc)
            with self._changed:
                self._changed.notify_all()

    # ---- one poll ----------------------------------------------------------------------

    def poll(self, job: Job) -> None:
        if job.kind == "mine":
            self._poll_mining(job)
        elif job.collab is not None:
            self._poll_collab(job, job.collab)
        else:
            self._poll_deployment(job)

    def _deployment(self, job: Job) -> dict[str, Any]:
        return self.backend.call(
            job.node, "/dms/node/deployment/status", {"id": job.id}, timeout=10
        )

    def _poll_deployment(self, job: Job) -> None:
        status = self._deployment(job)
        state = status.get("state", job.state)
        self._note_running(job, status)
        if state in DEPLOYMENT.terminal and not job.ended:
            job.ended_at = status.get("ended_at") or time.time()
            if state != "completed":
                events = status.get("events") or []
                job.reason = events[-1]["what"] if events else state
        if state != job.state:
            job.state = state
            if state in DEPLOYMENT.terminal:
                self._say(job, f"{job.name} {state}" + (f": {job.reason}" if job.reason else ""))

    def _note_running(self, job: Job, status: dict[str, Any]) -> None:
        if job.running_at is None and status.get("running_at"):
            job.running_at = float(status["running_at"])
            ms = job.placement_ms or 0.0
            if not self.quiet(job):
                self.tell(job, f"{job.name} running, placed in {ms:.0f} ms")

    def _poll_mining(self, job: Job) -> None:
        if job.running_at is None:
            self._note_running(job, self._deployment(job))
        status = self.backend.call(job.node, "/dms/node/mining/status", {"id": job.id}, timeout=10)
        progress = status.get("progress") or {}
        steps = progress.get("steps") or []
        job.total_steps = progress.get("total_steps") or job.total_steps
        peers = [s.get("peer_id") for s in progress.get("shards", []) if s.get("peer_id")]
        if peers:
            job.shard_peers = peers
        for event in progress.get("events", []):
            what = str(event.get("what", ""))
            key = f"{event.get('at')}:{what}"
            if key in job.events_seen:
                continue
            job.events_seen.add(key)
            if any(said in what for said in ("placing it again", "excluded", "MB shipped")):
                self._say(job, f"{job.name} {self._named(what)}")
        if len(steps) > job.steps:
            job.steps = len(steps)
            total = f"/{job.total_steps}" if job.total_steps else ""
            self._say(job, f"{job.name} step {job.steps}{total} done")
        phase = status.get("phase", job.state)
        if phase in SESSION.terminal and not job.ended:
            job.reason = progress.get("reason", "") if phase == "failed" else ""
            if phase == "completed":
                answer = self.backend.call(
                    job.node, "/dms/node/mining/result", {"id": job.id}, timeout=30
                )
                job.labels = list(answer.get("labels") or [])
                job.result = answer.get("result") or {}
                job.replacements = int(job.result.get("replacements", 0))
            job.ended_at = time.time()
            job.state = phase
            tail = f": {job.reason}" if job.reason else ""
            extra = f" ({job.replacements} worker(s) replaced)" if job.replacements else ""
            self._say(job, f"{job.name} {phase}{extra}{tail}")
        elif phase != job.state:
            job.state = phase
            if phase in ("shipping", "mining"):
                self._say(job, f"{job.name} {phase}")

    def _poll_collab(self, job: Job, plan: CollabPlan) -> None:
        """The proposer's session (``/dms/node/collab/result``: phase, rounds done, who
        dropped); once it ends, every running owner's own result."""
        if job.running_at is None:
            self._note_running(job, self._deployment(job))
        collab_id = {"collab_id": plan.proposal.collab_id}
        answer = self.backend.call(job.node, "/dms/node/collab/result", collab_id, timeout=10)
        session = answer.get("session") or {}
        plan.session = session
        job.total_steps = session.get("rounds") or job.total_steps
        for event in [
            *(f"round {d['round']}: {d['owner']} dropped" for d in session.get("dropped", [])),
            *(f"aggregator on {x['peer_id']} lost: {x['reason']}"
              for x in session.get("aggregator_losses", [])),
        ]:  # fmt: skip
            if event not in job.events_seen:
                job.events_seen.add(event)
                self._say(job, f"{job.name} {self._named(event)}")
        done = int(session.get("rounds_done") or 0)
        if done > job.steps:
            job.steps = done
            self._say(job, f"{job.name} round {done}/{job.total_steps} done")
        phase = session.get("phase", job.state)
        if phase in COLLAB.terminal and not job.ended:
            if phase == "completed":
                for name in plan.owners:
                    if self.backend.running(name):
                        mine = self.backend.call(name, "/dms/node/collab/result", collab_id, 30)
                        if mine.get("result"):
                            plan.results[name] = mine["result"]
                            plan.owner_cpu_s[name] = mine.get("owner_cpu_s") or 0.0
            job.reason = session.get("reason", "") if phase == "failed" else ""
            job.ended_at = time.time()
            job.state = phase
            tail = f": {self._named(job.reason)}" if job.reason else ""
            self._say(job, f"{job.name} {phase}{tail}")
        elif phase != job.state:
            job.state = phase
            if phase in ("joining", "rounds"):
                self._say(job, f"{job.name} {phase}")

    def _named(self, what: str) -> str:
        """An event with the peer ids it names shown as node names."""
        for name in self.backend.names:
            peer = self.backend.peer_id(name)
            what = what.replace(peer, name).replace(peer[-8:], name)
        return what

    def _say(self, job: Job, line: str) -> None:
        if not self.quiet(job) or (job.state in DEPLOYMENT.terminal and job.state != "completed"):
            self.tell(job, line)
