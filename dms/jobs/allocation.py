"""An allocation: a child actor of the provider's node that runs one executor.

States: ``pending -> starting -> running -> completed | failed | stopped``.
The executor runs on its own thread; the actor's mailbox stays free to answer
``status``, ``logs`` and ``stop``. On every change of state the allocation
tells its requester (``/dms/deployment/update``, best effort: the requester
also polls), and when it ends it hands its final answers (an
:class:`EndedAllocation`) to ``on_end``, which gives its resources back and keeps
the record, then stops: its node answers late polls from that record
(``dms.provider.bidding``), no thread is kept for them.
Only the requester's host and this node (its key and its owner) may call it: not
another actor of this node. Its own role: sending those updates.

An interactive executor (``mining``) also opens a session: the requester's
deployment actor (the mining session) invokes ``/dms/allocation/session`` with
one operation at a time. Operations run on a thread of their own, so the
mailbox keeps answering ``status`` while a round computes; payloads travel as
parcels (inline, or chunks pulled through the node's courier). A node without a
courier (the in-memory transport of ``dms sim`` memory mode) takes inline parcels
only, and refuses a larger payload or answer with that reason.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dms.actor import (
    Actor,
    ActorContext,
    ActorSystem,
    ErrorCode,
    Handle,
    Refusal,
    Request,
    behaviour,
)
from dms.actor.threads import PARK
from dms.actor.timers import TimerHandle
from dms.errors import DmsError
from dms.jobs.base import InteractiveExecutor
from dms.jobs.executors import ExecutorError, executor_for
from dms.jobs.mining_params import join_context
from dms.network.transfer import INLINE_BYTES, Courier, Parcel
from dms.resources import Resources
from dms.statemachine import Machine, Tracked

log = logging.getLogger("dms.jobs")

UPDATE_BEHAVIOUR = "/dms/deployment/update"
STATUS_BEHAVIOUR = "/dms/allocation/status"
LOGS_BEHAVIOUR = "/dms/allocation/logs"
START_BEHAVIOUR = "/dms/allocation/start"
STOP_BEHAVIOUR = "/dms/allocation/stop"
# Told by the node once the allocate is answered (an allocation spawned with
# ``autostart=False``): the work starts only then, so that neither its start nor, for a
# job of no length, its end and the release of its lease run ahead of that answer.
START = "start"
SESSION_BEHAVIOUR = "/dms/allocation/session"
LOG_LINES = 200


class SessionCall(BaseModel):
    """One operation of an interactive executor, with its payload as a parcel."""

    model_config = ConfigDict(extra="forbid")

    op: str = Field(min_length=1, max_length=32)
    parcel: Parcel = Field(default_factory=Parcel)
    # Sent apart from the parcel so its chunks are shared by every shard on this node.
    context: Parcel | None = None


class SessionAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    parcel: Parcel = Field(default_factory=Parcel)
    compute_s: float = 0.0


class AllocationState(StrEnum):
    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"


A = AllocationState
# pending -> starting -> running -> completed | failed | stopped; stopped before it started.
ALLOCATION = Machine(
    "allocation",
    AllocationState,
    {
        A.PENDING: {A.STARTING, A.STOPPED},
        A.STARTING: {A.RUNNING, A.FAILED, A.STOPPED},
        A.RUNNING: {A.COMPLETED, A.FAILED, A.STOPPED},
        A.COMPLETED: set(),
        A.FAILED: set(),
        A.STOPPED: set(),
    },
)


def authorize(request: Request, system: ActorSystem, requester_host: str, lease_id: str) -> bool:
    """An allocation's behaviours answer the requester's host (its node, or the
    deployment that placed it), or this node's own key or owner; not another actor of
    this node (least privilege). True: the caller is the requester (a sign of life)."""
    host = request.sender.address.host
    if host == requester_host:
        return True
    signer = request.envelope.signer
    if host == system.peer_id and (
        signer == system.identity.public_key or system.trust.is_root(signer)
    ):
        return False
    raise Refusal(
        ErrorCode.FORBIDDEN,
        f"{request.sender.did} may not manage allocation {lease_id}: not_requester: "
        "only its requester's host or this node may",
        rule="not_requester",
    )


def _not_driver(request: Request, lease_id: str) -> Refusal:
    return Refusal(
        ErrorCode.FORBIDDEN,
        f"{request.sender.did} may not drive allocation {lease_id}: "
        "not_requester: only the session that placed it may",
        rule="not_requester",
    )


@dataclass(frozen=True, slots=True)
class EndedAllocation:
    """What an ended allocation still answers once its actor has stopped: its last
    status (the same mapping ``/dms/allocation/status`` answered), its log lines, and
    who may ask. Its node keeps a bounded number of these for a while
    (``dms.provider.bidding``) and answers the allocation's behaviours from them."""

    inbox: str
    key: bytes  # the allocation's public key: a request must name it, as before
    lease_id: str
    requester_host: str
    driver: bytes | None  # the only actor that may call its session (``reply_to``)
    interactive: bool  # it had a session
    status: dict[str, Any]
    logs: tuple[str, ...]
    ended: float  # time.monotonic() at its end

    def status_for(self, request: Request, system: ActorSystem) -> dict[str, Any]:
        """``status``, ``start`` and ``stop`` all answer the status once it ended."""
        authorize(request, system, self.requester_host, self.lease_id)
        return self.status

    def logs_for(self, request: Request, system: ActorSystem) -> list[str]:
        authorize(request, system, self.requester_host, self.lease_id)
        return list(self.logs)

    def session_refusal(self, request: Request) -> Refusal:
        """What a session operation gets once the allocation ended."""
        if self.driver is None or request.sender.id != self.driver:
            return _not_driver(request, self.lease_id)
        if not self.interactive:
            return Refusal(ErrorCode.UNKNOWN_BEHAVIOUR, f"{self.status['executor']} has no session")
        return Refusal(ErrorCode.STOPPED, f"the allocation is {self.status['state']}")


class AllocationActor(Actor):
    state = Tracked(ALLOCATION)  # every move checked against ALLOCATION

    def __init__(
        self,
        context: ActorContext,
        *,
        lease_id: str,
        deployment_id: str,
        slot: str,
        executor: str,
        params: dict[str, Any],
        requester_host: str,
        reply_to: Handle | None = None,
        on_end: Callable[[EndedAllocation], None] | None = None,
        requester_gone: Callable[[float], bool] | None = None,
        watch_s: float = 1.0,
        resources: Resources | None = None,
        courier: Courier | None = None,
        autostart: bool = True,
        store_bound: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> None:
        super().__init__(context)
        self._store_bound = store_bound
        self._autostart = autostart
        self.lease_id, self.deployment_id, self.slot = lease_id, deployment_id, slot
        self.executor_kind, self.params = executor, params
        self.executor = executor_for(executor)
        self.executor.check(params, resources)
        ram_mib = resources.ram_mib if resources is not None else None
        self._ram_bytes = ram_mib * 1024 * 1024 if ram_mib else None  # the lease's memory
        self.session: Any = None
        self._courier = courier
        self._session_thread: ThreadPoolExecutor | None = None
        self._calls = 0
        if isinstance(self.executor, InteractiveExecutor):
            # Without a courier (the in-memory transport carries no chunks) only inline
            # payloads travel: a larger one is refused with the reason (_unpack, _pack).
            self.session = self.executor.session(params, self._log)
            self._session_thread = ThreadPoolExecutor(1, thread_name_prefix="dms-session")
        self.requester_host, self.reply_to = requester_host, reply_to
        self._on_end, self._requester_gone = on_end, requester_gone
        self._watch_s = watch_s
        self.state = AllocationState.PENDING
        self.result: Any = None
        self.error: str | None = None
        self.created_at = time.time()
        self.heard_at = self.created_at  # the requester's last call (the allocate, at first)
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.logs: deque[str] = deque(maxlen=LOG_LINES)
        self._halt = threading.Event()
        self._halt_reason = ""
        self._watching: TimerHandle | None = None  # the requester's watch (_watch)

    # ---- lifecycle -----------------------------------------------------------------

    def store_bound(self) -> contextlib.AbstractContextManager[Any]:
        """Its node's bound on this thread's waits for the store (its lease's release at
        its end: ``Bidding._store_bound``)."""
        if self._store_bound is None:
            return contextlib.nullcontext()
        return self._store_bound()

    def on_start(self) -> None:
        if self._autostart:
            self.start_work()

    def on_message(self, message: Any) -> Any:
        if message == START:
            self.start_work()
            return None
        return super().on_message(message)

    def start_work(self) -> None:
        if self.state != AllocationState.PENDING:
            return
        self._set(AllocationState.STARTING)
        self.started_at = time.time()
        PARK.run(self._work, f"dms-alloc-{self.lease_id[:8]}")  # a parked thread, if any
        self._set(AllocationState.RUNNING)
        if self._requester_gone is not None:
            self._watching = self.call_later(self._watch_s, self._watch)

    def _work(self) -> None:
        try:
            if self.session is not None:
                result = self.executor.run(  # type: ignore[call-arg]
                    self.params, self._halt, self._log, session=self.session
                )
            else:
                result = self.executor.run(self.params, self._halt, self._log)
        except ExecutorError as exc:
            self.ref.tell_call(self._finished, None, str(exc))
        except Exception as exc:  # a bug in an executor fails the allocation, not the node
            self.ref.tell_call(self._finished, None, f"{type(exc).__name__}: {exc}")
        else:
            self.ref.tell_call(self._finished, result, None)

    def _finished(self, result: Any, error: str | None) -> None:
        if self._halt.is_set():
            self.error = self._halt_reason or "stopped"
            self._set(AllocationState.STOPPED)
        elif error is not None:
            self.error = error
            self._set(AllocationState.FAILED)
        else:
            self.result = result
            self._set(AllocationState.COMPLETED)

    def _watch(self) -> None:
        if self.state in ALLOCATION.terminal:
            return
        if self._requester_gone is not None and self._requester_gone(self.heard_at):
            self.request_stop("the requester is gone")
            return
        self._watching = self.call_later(self._watch_s, self._watch)

    def request_stop(self, reason: str) -> None:
        if self.state in ALLOCATION.terminal:
            return
        self._halt_reason = reason
        self._halt.set()
        if self.state == AllocationState.PENDING:
            self.error = reason
            self._set(AllocationState.STOPPED)

    def stopping(self) -> None:
        if self.state not in ALLOCATION.terminal:
            self._halt_reason = self._halt_reason or "the node stopped"
            self._halt.set()
        self._end_session()

    def _end_session(self) -> None:
        """Stop taking operations and free every chunk this allocation held."""
        if self._session_thread is not None:
            self._session_thread.shutdown(wait=False, cancel_futures=True)
        if self._courier is not None:
            self._courier.release(self._chunk_owner)
            self._courier.release(f"{self._chunk_owner}:out")

    def _set(self, state: AllocationState) -> None:
        self.state = state
        self._log(f"state: {state.value}")
        if state == AllocationState.RUNNING:
            log.info(
                "allocation %s started: %s of deployment %s (%s) for %s",
                self.lease_id[:12], self.slot, self.deployment_id, self.executor_kind,
                self.requester_host,
            )  # fmt: skip
        elif state in ALLOCATION.terminal:
            ran = time.time() - (self.started_at or self.created_at)
            log.info(
                "allocation %s %s after %.1f s: %s of deployment %s%s",
                self.lease_id[:12], state.value, ran, self.slot, self.deployment_id,
                f" ({self.error})" if self.error else "",
            )  # fmt: skip
        if state not in ALLOCATION.terminal:
            return
        self.ended_at = time.time()
        if self._watching is not None:  # ended: no more watching (no timer fires in vain)
            self._watching.cancel()
            self._watching = None
        self._end_session()
        if self._on_end is not None:
            try:
                self._on_end(self.ended())
            except Exception:  # the node's bookkeeping must not keep this actor alive
                log.exception("allocation %s: ending it failed", self.lease_id[:12])
        if self.reply_to is not None:
            # Only the end is news: the requester learns of the start from the allocate
            # reply. Best effort: it polls too, and may be unreachable for a while.
            with contextlib.suppress(Exception):
                self.send(self.reply_to, UPDATE_BEHAVIOUR, self.status_dict(), ttl_s=30)
        # Stopped once this message is handled (a stop's reply, the update above go out
        # as this actor): late polls are answered from the record ``on_end`` kept.
        self.call_later(0, self.ref.stop_soon)

    def ended(self) -> EndedAllocation:
        """The record of this allocation's final answers (once it ended)."""
        return EndedAllocation(
            inbox=self.handle.address.inbox,
            key=self.handle.id,
            lease_id=self.lease_id,
            requester_host=self.requester_host,
            driver=self.reply_to.id if self.reply_to is not None else None,
            interactive=self.session is not None,
            status=self.status_dict(),
            logs=tuple(self.logs),
            ended=time.monotonic(),
        )

    def _log(self, line: str) -> None:
        self.logs.append(f"{time.strftime('%H:%M:%S')} {line}")

    def status_dict(self) -> dict[str, Any]:
        return {
            "lease_id": self.lease_id,
            "deployment_id": self.deployment_id,
            "slot": self.slot,
            "executor": self.executor_kind,
            "state": self.state.value,
            "result": self.result,
            "error": self.error,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "peer_id": self.system.peer_id,
        }

    # ---- behaviours ----------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if authorize(request, self.system, self.requester_host, self.lease_id):
            self.heard_at = time.time()

    @behaviour(STATUS_BEHAVIOUR, public=True)
    def status(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return self.status_dict()

    @property
    def _chunk_owner(self) -> str:
        return f"alloc:{self.lease_id}"

    @behaviour(SESSION_BEHAVIOUR, public=True, payload=SessionCall)
    def session_call(self, request: Request) -> None:
        """One operation of the session; only the requester's actor that placed this
        allocation (the mining session) may call it."""
        if self.reply_to is None or request.sender.id != self.reply_to.id:
            raise _not_driver(request, self.lease_id)
        self.heard_at = time.time()
        if self.session is None or self._session_thread is None:
            raise Refusal(ErrorCode.UNKNOWN_BEHAVIOUR, f"{self.executor_kind} has no session")
        if self.state != AllocationState.RUNNING:
            raise Refusal(ErrorCode.STOPPED, f"the allocation is {self.state.value}")
        call: SessionCall = request.payload
        responder = request.defer()
        courier, peer, owner = self._courier, self.requester_host, self._chunk_owner
        self._calls += 1
        out_owner = f"{owner}:out"

        def work() -> None:
            try:
                # The previous answer was fetched before this call was made: free it.
                if courier is not None:
                    courier.release(out_owner)
                # Declared sizes first: nothing is fetched that the job could not need.
                context_size = call.context.size if call.context is not None else None
                self.session.admit(call.op, call.parcel.size, context_size, self._ram_bytes)
                body = _unpack(courier, call.parcel, peer, owner)
                self.session.check_body(body)  # before anything decodes it
                if call.context is not None:
                    body = join_context(body, _unpack(courier, call.context, peer, owner))
                began = time.perf_counter()
                out = self.session.call(call.op, body)
                compute_s = time.perf_counter() - began
                answer = SessionAnswer(
                    parcel=_pack(courier, out, peer, out_owner), compute_s=compute_s
                )
                log.info(
                    "allocation %s: %s %s done in %.2f s (%d KiB in, %d KiB out)",
                    self.lease_id[:12], self.executor_kind, call.op, compute_s,
                    len(body) // 1024, len(out) // 1024,
                )  # fmt: skip
            except DmsError as exc:
                self._log(f"session {call.op} refused: {exc.message}")
                responder.fail(exc.code if exc.code != "invalid" else ErrorCode.BAD_PAYLOAD,
                               exc.message)  # fmt: skip
            except Exception as exc:  # a bug in the executor fails the call, not the node
                log.exception("session %s failed", call.op)
                responder.fail(ErrorCode.HANDLER_ERROR, f"{type(exc).__name__}: {exc}")
            else:
                responder.ok(answer.model_dump())

        try:
            self._session_thread.submit(work)
        except RuntimeError:  # shut down: the allocation ended meanwhile
            responder.fail(ErrorCode.STOPPED, "the allocation has ended")

    @behaviour(LOGS_BEHAVIOUR, public=True)
    def get_logs(self, request: Request) -> list[str]:
        self._authorize(request)
        return list(self.logs)

    # (Not named start/stop: those are pykka's.)
    @behaviour(START_BEHAVIOUR, public=True)
    def start_requested(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        self.start_work()
        return self.status_dict()

    @behaviour(STOP_BEHAVIOUR, public=True)
    def stop_requested(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        self.request_stop(f"stopped by {request.sender.address.host}")
        return self.status_dict()


NO_CHUNKS = "this node's transport carries no chunks (the in-memory transport)"


def _unpack(courier: Courier | None, parcel: Parcel, peer: str, owner: str) -> bytes:
    if courier is not None:
        return courier.unpack(parcel, peer, owner)
    if parcel.manifest is not None:
        raise ExecutorError(f"a payload of {parcel.size} bytes sent as chunks: {NO_CHUNKS}")
    return parcel.inline or b""


def _pack(courier: Courier | None, data: bytes, peer: str, owner: str) -> Parcel:
    if courier is not None:
        return courier.pack(data, peer, owner)
    if len(data) > INLINE_BYTES:
        raise ExecutorError(
            f"an answer of {len(data)} bytes needs chunks (inline at most {INLINE_BYTES}): "
            f"{NO_CHUNKS}"
        )
    return Parcel(inline=data)
