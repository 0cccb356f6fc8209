"""The mining session: the data owner's side of a job placed on other nodes.

A :class:`MiningSessionActor` is a deployment (``DeploymentActor``) of one
``mining`` allocation per shard, placed by the normal bid flow, that also
drives those allocations (DESIGN.md decision 10):

    placing  -> bids are collected while the owner encrypts (a worker thread)
    shipping -> each running shard gets its opening message (public context and
                ciphertexts, as chunks), then the rounds begin
    mining   -> each step: every shard computes, the owner combines and decides
    completed | failed

Heavy work (encryption, decryption, chunk transfers) runs on the session's
worker threads; the actor's mailbox only moves state, so status polls and
bids are never stuck behind a round. The owner is the source of truth: a
shard whose worker is lost is placed again by the deployment, gets a new
opening message built from the owner's current state, and resumes at the
current step. Progress, a checkpoint each step, and the result are saved in
the store (``mining_sessions``). After a restart of the owner's node a
session does not resume: its keys lived only in memory. It fails, and every
provider's lease is released (``resumable``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from dms.actor import ActorContext, ErrorCode, Handle, Outcome
from dms.jobs.allocation import SESSION_BEHAVIOUR, SessionAnswer, SessionCall
from dms.jobs.mining_params import MiningParams, count_objects, split_context
from dms.jobs.spec import DeploymentSpec
from dms.mining.errors import WorkerMisbehaved
from dms.mining.learned import worker_learns
from dms.network.transfer import Courier
from dms.orchestrator.deployment import (
    DeploymentActor,
    Orchestration,
    allocation_handle,
    drives,
)
from dms.orchestrator.records import MiningRow
from dms.orchestrator.slots import Slot, SlotState
from dms.orchestrator.states import SESSION, SHARD, DeploymentState, SessionPhase, ShardState
from dms.statemachine import Tracked
from dms.store import STORE_ERRORS

if TYPE_CHECKING:  # the drivers (NumPy, TenSEAL) load with the owner's first job
    from dms.mining.placed import Driver

log = logging.getLogger("dms.mining")

MIB = 1024 * 1024
SECONDS_PER_MIB = 1.0  # generous: py-libp2p moves ~30 MB/s on one core
HEARD_S = 15.0  # an answer this recent keeps a shard alive through missed polls
MAX_SHARD_FAILURES = 4  # the same shard lost this often fails the session
MIN_MUL_PER_S = 10.0  # a worker's benchmark counts at least this (a low claim buys no time)
UNKNOWN_MUL_PER_S = 50.0  # a worker whose benchmark the peers table does not hold


@dataclass(frozen=True)
class SessionLimits:
    """What the session allows its workers (settings ``mining_*``, ``specs/mining.md``).

    A step's deadline is ``max(step_floor_s, step_slack x work / the worker's
    ckks_mul_per_s)`` plus 1 s per MiB sent: the work from the shard's padded
    shape (``MiningParams.step_work``), the rate from the worker's benchmark in the
    peers table. A worker past it is lost and excluded for this job.
    """

    step_floor_s: float = 30.0
    step_slack: float = 20.0
    max_replacements: int = 8  # workers lost or excluded per job before it fails

    def deadline_s(self, work: float, rate: float | None, size: int) -> float:
        """A step of ``work`` CKKS multiplications sending ``size`` bytes to a worker
        whose benchmark says ``rate`` a second (None: not known)."""
        rate = UNKNOWN_MUL_PER_S if rate is None or rate <= 0 else max(rate, MIN_MUL_PER_S)
        compute = self.step_slack * work / rate
        return max(self.step_floor_s, compute) + SECONDS_PER_MIB * size / MIB


@dataclass
class Shard:
    """One shard's worker as the session sees it."""

    index: int
    slot: str
    rows: int
    peer: str | None = None
    allocation: Handle | None = None
    generation: int = 0  # bumped at every placement; older answers are ignored
    state: ShardState = ShardState.UNPLACED  # moved only through SHARD (below)
    worker_at: int = 0  # the owner step the worker's state matches
    placements: int = 0
    failures: int = 0
    sent: int = 0
    received: int = 0
    worker_cpu_s: float = 0.0
    last_heard: float = 0.0
    sent_at: float = 0.0  # when this step's operation went out
    deadline_s: float = 0.0  # the operation in flight's deadline
    step_s: float = 0.0  # how long its last step took, transfers included
    history: list[dict[str, Any]] = field(default_factory=list)  # earlier placements

    def _move(self, to: ShardState) -> None:
        if to != self.state:
            self.state = SHARD.check(self.state, to, self.slot)

    def placed(self) -> None:
        """A worker runs it (again): nothing shipped to it yet."""
        self._move(ShardState.PLACED)

    def lost(self) -> None:
        self._move(ShardState.UNPLACED)

    @property
    def ready(self) -> bool:
        """The worker holds its opening message (idle or working)."""
        return self.state in (ShardState.READY, ShardState.WORKING)

    @ready.setter
    def ready(self, value: bool) -> None:
        if value:
            self._move(ShardState.WORKING if self.busy else ShardState.READY)

    @property
    def busy(self) -> bool:
        """A call is in flight: the opening message, or a step's operation."""
        return self.state in (ShardState.SHIPPING, ShardState.WORKING)

    @busy.setter
    def busy(self, value: bool) -> None:
        if self.state == ShardState.UNPLACED:
            return  # a late answer of a lost worker: nothing to move
        if value:
            self._move(ShardState.WORKING if self.ready else ShardState.SHIPPING)
        else:
            self._move(ShardState.READY if self.ready else ShardState.PLACED)


@drives("mining")
class MiningSessionActor(DeploymentActor):
    phase = Tracked(SESSION)  # every move checked against SESSION

    def __init__(
        self,
        context: ActorContext,
        orchestration: Orchestration,
        deployment_id: str,
        spec: DeploymentSpec,
        saved: dict[str, Any] | None = None,
        *,
        driver: Driver | None = None,
        courier: Courier | None = None,
        shard_rows: list[int] | None = None,
        summary: dict[str, Any] | None = None,
        on_progress: Callable[[str], None] | None = None,
        limits: SessionLimits | None = None,
        path_to: Callable[[str], str] | None = None,
    ) -> None:
        super().__init__(context, orchestration, deployment_id, spec, saved)
        # How this node reaches a peer: "direct", "relayed" (through a circuit relay)
        # or "none" (dms.network.host.Libp2pTransport.path_to); for result.json.
        self.path_to = path_to
        self.limits = limits or SessionLimits()
        # Each shard's padded shape: what its worker's answers and steps may be.
        self.params = {name: MiningParams.model_validate(a.params) for name, a in spec.slots()}
        self.banned: dict[str, str] = {}  # peers excluded for this job, with the reason
        self.excluded: list[dict[str, Any]] = []  # for result.json: shard, peer_id, reason
        self.lost = 0  # workers lost or excluded so far (bounded by max_replacements)
        self.driver = driver
        self.courier = courier
        self.summary_base = summary or {}
        self.on_progress = on_progress
        names = [name for name, _ in spec.slots()]
        rows = shard_rows or [0] * len(names)
        self.shards = {name: Shard(i, name, rows[i]) for i, name in enumerate(names)}
        self.phase = SessionPhase.PLACING
        self.prepared = False
        self.pending: set[int] = set()  # shards that still owe an answer this step
        self.combining = False
        self.began = time.monotonic()
        self.owner_cpu_s = 0.0
        self.steps: list[dict[str, Any]] = []
        self.step_began = 0.0
        self.reason = ""
        self._unsaved_mining: MiningRow | None = None  # a row the store refused, to retry
        self._tags: set[str] = set()  # chunk owners in the courier, freed at the end
        self._pool = ThreadPoolExecutor(2, thread_name_prefix=f"dms-mining-{deployment_id[:6]}")

    # ---- deployment hooks -------------------------------------------------------------

    def resumable(self) -> bool:
        return False

    def on_start(self) -> None:
        super().on_start()
        if self.driver is None or self.courier is None:
            return  # resumed after a restart: on_start failed it already
        b = self.summary_base
        if b.get("algorithm"):
            self.book.event(worker_learns(b["algorithm"], b.get("protocol"), b.get("scheme", "")))
        self._progress("placing", save=True)
        self._off_mailbox(self.driver.prepare, self._prepared, "preparing the data")

    def stopping(self) -> None:
        super().stopping()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.courier is not None:
            for tag in self._tags:
                self.courier.release(tag)

    def slot_running(self, slot: Slot) -> None:
        assert slot.allocation is not None
        shard = self.shards[slot.name]
        shard.peer = slot.peer_id
        shard.allocation = allocation_handle(slot.allocation)
        shard.generation += 1
        shard.placements += 1
        shard.placed()
        shard.last_heard = time.monotonic()
        if self.prepared:
            self._ship(shard)

    def excludes(self, name: str, peer: str) -> bool:
        return peer in self.banned or super().excludes(name, peer)

    def slot_lost(self, slot: Slot, reason: str) -> None:
        shard = self.shards.get(slot.name)
        if shard is None or shard.allocation is None:
            return
        shard.history.append({"peer_id": shard.peer, "reason": reason})
        self.lost += 1
        self._release(shard, "start", "step")
        shard.allocation = None
        shard.generation += 1  # whatever the lost worker still answers is ignored
        shard.lost()
        shard.failures += 1
        if shard.failures >= MAX_SHARD_FAILURES and self.phase not in SESSION.terminal:
            self._fail(f"{shard.slot} was lost {shard.failures} times; last: {reason}")
        elif self.lost > self.limits.max_replacements and self.phase not in SESSION.terminal:
            self._fail(
                f"{self.lost} workers lost or excluded, more than this job allows "
                f"(mining_max_replacements = {self.limits.max_replacements}); "
                f"last: {shard.slot}: {reason}"
            )

    def lost_line(self, slot: Slot, reason: str) -> str:
        peer = slot.peer_id or ""
        if peer in self.banned:  # caught: one line says it is excluded and why
            what = f"worker {peer[-8:]} excluded for this job: {self.banned[peer]}"
        else:
            what = f"worker lost ({reason})"
        return f"{slot.name}: {what}; placing it again"

    def heard_from(self, slot: Slot) -> bool:
        shard = self.shards.get(slot.name)
        return shard is not None and (shard.busy or time.monotonic() - shard.last_heard < HEARD_S)

    def ended(self, state: DeploymentState, what: str) -> None:
        if self.phase not in SESSION.terminal:
            self.phase = SessionPhase.FAILED
            failed = state == DeploymentState.FAILED
            self.reason = what if failed else f"the deployment ended: {what}"
            if self.driver is None:  # resumed after a restart: the session is only stored
                self._fail_stored(self.reason)
            else:
                self._progress(self.reason, save=True)

    def _fail_stored(self, reason: str) -> None:
        """Fail the stored session of a deployment resumed after a restart, which knows
        nothing of it: written from this actor, its empty progress (no steps, no shards)
        replaced the stored one, and a session whose completion was saved but not its
        deployment's end (the node stopped while its workers were told to finish) read
        failed, its result refused. Its stored progress is kept; an ended one is left."""
        store = self.o.store
        try:
            stored = store.mining(self.id)
            if stored is not None and stored.phase not in SESSION.terminal:
                store.fail_session(stored, reason)
        except STORE_ERRORS as exc:  # the next start fails it (its deployment is not resumed)
            log.warning("mining session %s: its failure not saved: %s", self.id, exc)

    # ---- preparing and shipping ---------------------------------------------------------

    def _prepared(self, _: Any) -> None:
        self.prepared = True
        self.book.event("data encrypted; shipping to each running shard")
        for shard in self.shards.values():
            if shard.allocation is not None and not shard.ready:
                self._ship(shard)

    def _ship(self, shard: Shard) -> None:
        """Send shard its opening message built from the owner's current state."""
        assert self.driver is not None and self.courier is not None
        if self.phase == SessionPhase.PLACING:
            self.phase = SessionPhase.SHIPPING
            self._progress("shipping", save=True)
        driver, courier, gen = self.driver, self.courier, shard.generation
        peer, tag = shard.peer, self._tag(shard, "start")
        assert peer is not None

        def build() -> tuple[SessionCall, int, int]:
            at, raw = driver.opening(shard.index)
            if raw is None:  # nothing to ship first (plaintext jobs send data with 'run')
                return SessionCall(op="start"), at, 0
            body, context = split_context(raw)
            call = SessionCall(
                op="start",
                parcel=courier.pack(body, peer, tag),
                context=courier.pack(context, peer, tag) if context is not None else None,
            )
            return call, at, len(raw)

        def send(built: tuple[SessionCall, int, int]) -> None:
            call, at, size = built
            if shard.generation != gen:
                return
            if call.parcel.size == 0 and call.context is None:
                self._ready(shard, at)
                return
            shard.busy = True
            shard.sent += size
            self._progress(f"{shard.slot}: shipping {size / MIB:.1f} MB to {peer[-8:]}")
            self._call(shard, call, size, partial(self._started, shard, gen, at))

        self._off_mailbox(build, send, f"building {shard.slot}'s opening message")

    def _started(self, shard: Shard, gen: int, at: int, outcome: Outcome) -> None:
        if shard.generation != gen:
            return
        shard.busy = False
        self._release(shard, "start")  # the worker has pulled it, or never will
        if not outcome.ok:
            assert outcome.error is not None
            if outcome.error.code == ErrorCode.TIMEOUT:
                self._stalled(shard, "start")
            else:
                self._worker_failed(
                    shard, f"start refused: {outcome.error.code}: {outcome.error.reason}"
                )
            return
        shard.last_heard = time.monotonic()
        peer = shard.peer[-8:] if shard.peer else "?"
        self.book.event(f"{shard.slot}: {shard.sent / 1e6:.1f} MB shipped to {peer}")
        self._ready(shard, at)

    def _ready(self, shard: Shard, at: int) -> None:
        """The shard's worker holds the owner's state of step ``at``: mine."""
        shard.ready, shard.worker_at = True, at
        if self.phase == SessionPhase.SHIPPING and all(s.ready for s in self.shards.values()):
            self.phase = SessionPhase.MINING
            self._progress("mining", save=True)
            self._begin_step()
        else:
            self._pump()

    # ---- steps --------------------------------------------------------------------------

    def _begin_step(self) -> None:
        self.pending = set(range(len(self.shards)))
        self.step_began = time.monotonic()
        self._pump()

    def _pump(self) -> None:
        """Send this step's operation to every ready shard that owes an answer."""
        if self.phase != SessionPhase.MINING or self.combining or self.driver is None:
            return
        driver, courier = self.driver, self.courier
        assert courier is not None
        for shard in self.shards.values():
            if shard.index not in self.pending or not shard.ready or shard.busy:
                continue
            shard.busy = True
            gen, peer, at = shard.generation, shard.peer, shard.worker_at
            tag = self._tag(shard, "step")
            assert peer is not None

            def build(
                shard: Shard = shard, peer: str = peer, at: int = at, tag: str = tag
            ) -> tuple[SessionCall, int, int]:
                now = driver.iteration  # the step whose state the worker will hold
                op, body = driver.request(shard.index, at)
                parcel = courier.pack(body, peer, tag)
                return SessionCall(op=op, parcel=parcel), len(body), now

            def send(
                built: tuple[SessionCall, int, int], shard: Shard = shard, gen: int = gen
            ) -> None:
                call, size, now = built
                if shard.generation != gen:
                    return
                shard.sent += size
                shard.worker_at = now
                shard.sent_at = time.monotonic()
                self._call(shard, call, size, partial(self._on_answer, shard, gen, call.op))

            self._off_mailbox(build, send, f"building {shard.slot}'s request")

    def _on_answer(self, shard: Shard, gen: int, op: str, outcome: Outcome) -> None:
        if shard.generation != gen:
            return
        if not outcome.ok:
            shard.busy = False
            assert outcome.error is not None
            if outcome.error.code == ErrorCode.TIMEOUT:
                self._stalled(shard, op)
            else:
                self._worker_failed(shard, f"{outcome.error.code}: {outcome.error.reason}")
            return
        assert self.driver is not None and self.courier is not None
        driver, courier, peer = self.driver, self.courier, shard.peer
        assert peer is not None
        try:
            answer = SessionAnswer.model_validate(outcome.result)
        except Exception as exc:
            shard.busy = False
            self._caught(shard, f"a malformed answer: {str(exc).splitlines()[0]}")
            return
        shard.worker_cpu_s += answer.compute_s
        shard.last_heard = time.monotonic()
        # A provider's answer is hostile input: its declared size is checked against
        # the shard's padded shape before a byte of it is fetched, allocated or decoded.
        params = self.params[shard.slot]
        limit = params.answer_bytes()
        if answer.parcel.size > limit:
            shard.busy = False
            self._caught(
                shard,
                f"an answer of {answer.parcel.size} bytes; this shard's shape allows "
                f"at most {limit}",
            )
            return

        answers = self._tag(shard, "answer")

        def take() -> int | WorkerMisbehaved:
            try:
                raw = courier.unpack(answer.parcel, peer, answers)
            finally:
                courier.release(answers)  # decoded below: its chunks are not needed
            try:
                count_objects(raw, params.answer_objects())
                driver.accept(shard.index, raw)
            except WorkerMisbehaved as exc:
                return exc
            except Exception as exc:  # not the answer asked for: the worker's doing
                first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
                return WorkerMisbehaved(f"a malformed answer: {first}", shard.index)
            return len(raw)

        def taken(size: int | WorkerMisbehaved) -> None:
            if shard.generation != gen:
                return
            if isinstance(size, WorkerMisbehaved):
                shard.busy = False
                self._caught(shard, size.reason)
                return
            shard.busy = False
            shard.received += size
            shard.last_heard = time.monotonic()
            shard.step_s = shard.last_heard - shard.sent_at
            self._release(shard, "step")
            self.pending.discard(shard.index)
            if not self.pending:
                self._combine()

        def bad(reason: str) -> None:
            if shard.generation == gen:
                shard.busy = False
                self._worker_failed(shard, reason)

        self._off_mailbox(take, taken, f"taking {shard.slot}'s answer", on_error=bad)

    def _combine(self) -> None:
        assert self.driver is not None
        self.combining = True
        slowest = max(self.shards.values(), key=lambda s: s.step_s)
        elapsed = time.monotonic() - self.step_began
        driver = self.driver

        def advance() -> bool | WorkerMisbehaved:
            try:
                return driver.advance()
            except WorkerMisbehaved as exc:  # a spot check caught a shard's worker
                return exc

        self._off_mailbox(
            advance,
            partial(self._advanced, slowest.slot, elapsed),
            "combining the shards' answers",
        )

    def _advanced(self, slowest: str, elapsed: float, done: bool | WorkerMisbehaved) -> None:
        assert self.driver is not None and self.courier is not None
        self.combining = False
        if self.phase != SessionPhase.MINING:  # it failed while the answers were combined
            return
        if isinstance(done, WorkerMisbehaved):
            caught = next((s for s in self.shards.values() if s.index == done.shard), None)
            if caught is None:
                self._fail(f"a worker misbehaved: {done.reason}")
                return
            # The driver kept the other shards' answers; only this one is asked again,
            # of the worker that replaces it, at the same step.
            self.pending.add(caught.index)
            self._caught(caught, done.reason)
            return
        step = self.driver.iteration
        change = self.driver.changes[-1] if self.driver.changes else None
        record = {"step": step, "change": change, "slowest": slowest, "s": round(elapsed, 3)}
        self.steps.append(record)
        slow = f", slowest {slowest}" if len(self.shards) > 1 else ""
        self.book.event(f"{self.driver.note()} ({elapsed:.2f} s{slow})")
        self._progress(f"step {step} done", save=True, checkpoint=self.driver.checkpoint())
        if done:
            self._complete()
        else:
            self._begin_step()

    # ---- the end -------------------------------------------------------------------------

    def _complete(self) -> None:
        assert self.driver is not None and self.courier is not None
        labels, fields = self.driver.outcome()
        wall = time.monotonic() - self.began
        timings = self.driver.timings
        result = {
            **self.summary_base,
            **fields,
            "timings": {**{k: round(v, 4) for k, v in timings.items()}, "total": round(wall, 3)},
            "bytes_to_worker": sum(s.sent for s in self.shards.values()),
            "bytes_to_owner": sum(s.received for s in self.shards.values()),
            "placement": [self._placement(s) for s in self.shards.values()],
            "replacements": sum(max(0, s.placements - 1) for s in self.shards.values()),
            "excluded": list(self.excluded),
            "owner_cpu_s": round(self.owner_cpu_s, 3),
            "worker_cpu_s": round(sum(s.worker_cpu_s for s in self.shards.values()), 3),
            "wall_s": round(wall, 3),
        }
        self.phase = SessionPhase.COMPLETED
        self.reason = "completed"
        self._save_mining(result=result, labels=list(labels))
        self._progress("completed", save=True)
        self.book.event("mining completed; finishing the workers")
        for shard in self.shards.values():
            if shard.allocation is not None:
                self.invoke(
                    shard.allocation,
                    SESSION_BEHAVIOUR,
                    SessionCall(op="finish").model_dump(),
                    on_reply=lambda _outcome: None,
                )

    def _placement(self, s: Shard) -> dict[str, Any]:
        return {
            "shard": s.slot,
            "peer_id": s.peer,
            "rows": s.rows,
            "mb_sent": round(s.sent / 1e6, 3),
            "mb_received": round(s.received / 1e6, 3),
            "rounds": self.driver.iteration if self.driver else 0,
            "placements": s.placements,
            "lost": s.history,
            "path": self.path_to(s.peer) if self.path_to and s.peer else "unknown",
        }

    def _fail(self, reason: str) -> None:
        if self.phase in SESSION.terminal:
            return
        self.phase = SessionPhase.FAILED
        self.reason = reason
        self._progress(reason, save=True)
        self.abort(f"mining failed: {reason}")

    def _stalled(self, shard: Shard, op: str) -> None:
        self._caught(
            shard,
            f"no answer to '{op}' within its deadline of {shard.deadline_s:.0f} s "
            f"(from the shard's shape and the worker's benchmark)",
        )

    def _caught(self, shard: Shard, reason: str) -> None:
        """The worker stalled past its deadline, or answered what the protocol does not
        allow: it is excluded for this job (a permanent decline for this owner's job) and
        the shard placed again, on another peer."""
        peer = shard.peer
        if peer is None or peer in self.banned:
            self._worker_failed(shard, reason)
            return
        self.banned[peer] = reason
        self.excluded.append({"shard": shard.slot, "peer_id": peer, "reason": reason})
        if not self._worker_failed(shard, reason):  # no loss line says it (lost_line)
            self.book.event(f"{shard.slot}: worker {peer[-8:]} excluded for this job: {reason}")

    def _worker_failed(self, shard: Shard, reason: str) -> bool:
        """An operation failed: the worker is treated as lost and placed again. False
        when its slot was no longer running (nothing to lose)."""
        slot = self.book.slots.get(shard.slot)
        if slot is None or slot.state != SlotState.RUNNING:
            self.settle()
            return False
        self.supervision.lost(slot, f"the worker failed: {reason}")
        self.settle()
        return True

    # ---- plumbing ---------------------------------------------------------------------

    def _tag(self, shard: Shard, kind: str) -> str:
        """Whose chunks these are: one owner per shard, placement and kind, so freeing
        one step's never pulls a parcel another worker is still fetching."""
        tag = f"session:{self.id}/{shard.slot}/g{shard.generation}/{kind}"
        self._tags.add(tag)
        return tag

    def _release(self, shard: Shard, *kinds: str) -> None:
        if self.courier is None:
            return
        for kind in kinds:
            tag = f"session:{self.id}/{shard.slot}/g{shard.generation}/{kind}"
            if tag in self._tags:
                self._tags.discard(tag)
                self.courier.release(tag)

    def _call(
        self, shard: Shard, call: SessionCall, size: int, on_reply: Callable[[Outcome], None]
    ) -> None:
        assert shard.allocation is not None
        timeout = shard.deadline_s = self._deadline_s(shard, call.op, size)
        try:
            self.invoke(
                shard.allocation,
                SESSION_BEHAVIOUR,
                call.model_dump(),
                timeout=timeout,
                on_reply=on_reply,
            )
        except Exception as exc:
            shard.busy = False
            self._worker_failed(shard, f"not sent: {exc}")

    def _deadline_s(self, shard: Shard, op: str, size: int) -> float:
        """How long the worker may take over ``op``: see :class:`SessionLimits`."""
        work = 0.0 if op == "start" else self.params[shard.slot].step_work()
        rate = None
        record = self.o.peer_table.get(shard.peer) if shard.peer else None
        if record is not None and record.heartbeat is not None:
            rate = record.heartbeat.scores.get("ckks_mul_per_s")
        return self.limits.deadline_s(work, rate, size)

    def _off_mailbox(
        self,
        work: Callable[[], Any],
        then: Callable[[Any], None],
        what: str,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        """Run ``work`` on a session thread; ``then(result)`` back in this actor."""
        ref = self.ref

        def run() -> None:
            cpu = time.thread_time()
            try:
                result = work()
            except Exception as exc:
                reason = f"{what}: {getattr(exc, 'message', None) or exc}"
                if not isinstance(exc, ValueError | KeyError) and not hasattr(exc, "message"):
                    log.exception("mining session %s: %s failed", self.id, what)
                ref.tell_call(on_error or self._fail, reason)
            else:
                ref.tell_call(then, result)
            finally:
                ref.tell_call(self._add_cpu, time.thread_time() - cpu)

        with contextlib.suppress(RuntimeError):  # shut down: the session is stopping
            self._pool.submit(run)

    def _add_cpu(self, seconds: float) -> None:
        self.owner_cpu_s += seconds

    def _progress(
        self, what: str, *, save: bool = False, checkpoint: dict[str, Any] | None = None
    ) -> None:
        if self.on_progress is not None:
            self.on_progress(what)
        if save:
            self._save_mining(checkpoint=checkpoint)

    def progress(self) -> dict[str, Any]:
        return {
            "phase": self.phase.value,
            "reason": self.reason,
            "deployment": self.state,
            "shards": [
                {
                    "shard": s.slot,
                    "peer_id": s.peer,
                    "ready": s.ready,
                    "mb_sent": round(s.sent / 1e6, 3),
                    "mb_received": round(s.received / 1e6, 3),
                    "placements": s.placements,
                }
                for s in self.shards.values()
            ],
            "steps": self.steps,
            "excluded": self.excluded,
            "total_steps": getattr(self.driver, "total_steps", None),
            "events": self.book.row.events[-20:],
        }

    def _save_mining(
        self,
        *,
        checkpoint: dict[str, Any] | None = None,
        result: dict[str, Any] | None = None,
        labels: list[Any] | None = None,
    ) -> bool:
        row = MiningRow(
            self.id,
            # Not known to a session resumed after a restart: the stored one is kept.
            algorithm=self.summary_base.get("algorithm") or None,
            phase=self.phase.value,
            progress=self.progress(),
            checkpoint=checkpoint,
            result=result,
            labels=labels,
        )
        if self._unsaved_mining is not None:  # what an earlier refused save held
            row = self._unsaved_mining.updated_by(row)
        try:
            self.o.store.save_mining(row)
        except Exception as exc:  # keep mining; the next step saves again
            log.warning("mining session %s not saved: %s", self.id, exc)
            self._unsaved_mining = row
            return False
        self._unsaved_mining = None
        return True

    def _save_end(self) -> bool:
        # The result (labels included) lives only in this actor until it is saved.
        mining_saved = self._unsaved_mining is None or self._save_mining()
        return super()._save_end() and mining_saved
