"""The requester's role in the node: the owner's deployments.

``/dms/node/deployment/{new,list,status,logs,manifest,shutdown}``, each deployment
run by a :class:`DeploymentActor` child (a mining session by its subclass), resumed
after a restart. A role of :class:`dms.node.node.NodeActor` (:class:`Requester`); the
provider's side is ``dms.provider.bidding``. The owner's mining and collaboration
sessions are deployments too: those roles start them here (:class:`Sessions`).
See ``specs/orchestration.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dms.actor import ActorRef, ErrorCode, Refusal, Request, behaviour
from dms.actor.runtime import NodeRuntime
from dms.jobs.spec import DeploymentSpec, executor_problems
from dms.network.peertable import PeerTable
from dms.orchestrator.base import revert_payload
from dms.orchestrator.deployment import (
    SHUTDOWN,
    DeploymentActor,
    Orchestration,
    actor_for,
    allocation_handle,
    new_deployment_id,
    summarize,
)
from dms.orchestrator.messages import STILL_HELD, HeldQuestion
from dms.orchestrator.records import MiningRow
from dms.orchestrator.reverts import Reverts
from dms.orchestrator.store import DeploymentStore
from dms.orchestrator.stored import UNREADABLE_PEERS, describe, invalid_said, unreadable_reason
from dms.store import STORE_REFUSED, Database, StoreBusy

log = logging.getLogger("dms.node")
_SESSION = "its mining session's"  # whose columns a session's unreadable parts are


class UnreadableRecord(ValueError):
    """Parts of a deployment's stored row, or of its mining session's, cannot be read
    (``dms.orchestrator.stored``)."""


def _why(exc: Exception) -> str:
    """One line on why a stored deployment cannot resume."""
    if isinstance(exc, UnreadableRecord):
        return str(exc)
    if isinstance(exc, ValidationError):
        return f"its spec is not valid ({invalid_said(exc)})"
    first = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class NewDeployment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    spec: DeploymentSpec


class DeploymentId(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=64)


class Sessions(Protocol):
    """What the mining owner and collaboration roles use of the requester: its
    orchestration (store, peers table, settings) and their session actors run as its
    deployments (listed, shut down and ended with them)."""

    @property
    def places(self) -> bool: ...

    def orchestration(self) -> Orchestration: ...

    def run(
        self,
        kind: type[DeploymentActor],
        deployment_id: str,
        spec: DeploymentSpec,
        saved: dict[str, Any] | None = None,
        **kw: Any,
    ) -> ActorRef: ...


class Requester:
    """The owner's deployments: each a :class:`DeploymentActor` child of the node.
    Without a store (``db``) the node places nothing. ``on_placed``: told of each
    provider that started an allocation of ours."""

    def __init__(
        self,
        node: NodeRuntime,
        *,
        peer_table: PeerTable,
        on_placed: Callable[[str], None] | None = None,
        db: Database | None = None,
        home: Path | None = None,
        supervise_s: float = 1.0,
        store_wait_s: float | None = None,
    ) -> None:
        self.node = node
        self.deployments: dict[str, ActorRef] = {}  # the running ones, by id
        self.reverts = Reverts(node)
        self._orchestration = (
            Orchestration(
                peer_table=peer_table,
                store=DeploymentStore(db, home / "unsaved" if home else None),
                on_end=self._deployment_ended,
                supervise_s=supervise_s,
                store_wait_s=store_wait_s,
                # Sent from the deployment's thread (Reverts is thread-safe): in order
                # with its own frames to that peer, and no turn of the node's mailbox.
                revert=self.reverts.send,
                on_placed=on_placed,
            )
            if db is not None
            else None
        )

    def start(self) -> None:
        """Resume the deployments the store holds as active. One whose stored record
        cannot be carried on from (a column that is not JSON, a spec this version does
        not accept, an unknown state, a slot that contradicts itself, or any other
        error building its actor) fails, saying why, and gives back what its readable
        parts name: the node starts, and every other deployment resumes. A node that
        stops meanwhile (its actor system spawns nothing) fails none: that raises.

        A mining session (its row in ``mining_sessions``, its deployment's id) not ended
        goes with its deployment: one whose row cannot be read fails its deployment so,
        and the session with it. A session not ended whose deployment is not resumed
        (ended, or not in the store: its end was never saved, or the deployment was
        failed unreadable by an earlier version) fails, saying why."""
        if self._orchestration is None:
            return
        store = self._orchestration.store
        sessions = {s.id: s for s in store.unended_sessions()}
        for row in store.active():
            session = sessions.pop(row["id"], None)
            try:
                self._resume(row, session)
            except Exception as exc:
                if self.node.system.stopped:
                    # The node is stopping (its actor system spawns nothing): nothing is
                    # wrong with the record, and the next start resumes it.
                    raise
                self._fail_unreadable(row, exc, session)
        for session in sessions.values():
            self._fail_session(session)

    def _resume(self, row: dict[str, Any], session: MiningRow | None) -> None:
        problems = unreadable_reason(row)
        if session is not None and session.unreadable:
            problems = "; ".join(filter(None, [problems, describe(session.unreadable, _SESSION)]))
        if problems:
            raise UnreadableRecord(problems)
        spec = DeploymentSpec.model_validate(row["spec"])
        try:
            # Its executors' driver, if any (a mining session: its keys were in memory,
            # so it fails, releasing every lease).
            self.run(actor_for(spec), row["id"], spec, saved=row)
        except BaseException:
            # Built far enough to answer for its leases, then raised: it holds none.
            self.orchestration().live.pop(row["id"], None)
            raise

    def _fail_unreadable(
        self, row: dict[str, Any], exc: Exception, session: MiningRow | None = None
    ) -> None:
        """Fail a deployment that cannot resume (``DeploymentStore.fail_unreadable``),
        its mining ``session`` too, and revert everything it may hold on each peer its
        readable slots or its bid index name: its leases are not kept (a provider that
        hears none of it still lets them go when it asks, ``/dms/deployment/held``: a
        failed deployment holds nothing). A store that refuses even that raises: the
        node does not start."""
        o = self.orchestration()
        deployment_id = row["id"]
        reason = f"its stored record could not be read: {_why(exc)}"
        log.warning("deployment %s cannot resume, failed: %s", deployment_id, reason)
        o.store.fail_unreadable(row, reason, session)
        peers = {s.get("peer_id") for s in row["slots"] if isinstance(s, dict)}
        peers |= set(row.get(UNREADABLE_PEERS) or [])  # named by slots it cannot read
        try:
            peers |= {b.peer_id for b in o.store.bids(deployment_id) if b.direction == "received"}
        except Exception as bids_exc:  # its bid index unreadable too: the slots' peers
            log.warning("deployment %s: its bids could not be read: %s", deployment_id, bids_exc)
        for peer in sorted(p for p in peers if isinstance(p, str) and p):
            self.reverts.send(peer, revert_payload(deployment_id, [], everything=True))

    def _fail_session(self, session: MiningRow) -> None:
        """Fail a mining session not ended whose deployment is not resumed (it ended, or
        is not in the store), saying why, once: its phase no longer says it runs."""
        store = self.orchestration().store
        if session.unreadable:
            reason = f"its stored record could not be read: {describe(session.unreadable)}"
        else:
            deployment = store.get(session.id)
            where = f"is {deployment['state']}" if deployment else "is not in the store"
            reason = f"its end was not saved before its node stopped (its deployment {where})"
        log.warning("mining session %s cannot resume, failed: %s", session.id, reason)
        store.fail_session(session, reason)

    @property
    def places(self) -> bool:
        """Whether this node keeps a deployment store (it places work)."""
        return self._orchestration is not None

    def orchestration(self) -> Orchestration:
        """The requester's orchestration (its store, peers table, settings)."""
        if self._orchestration is None:
            raise Refusal(ErrorCode.UNKNOWN_BEHAVIOUR, "this node keeps no deployment store")
        return self._orchestration

    def run(
        self,
        kind: type[DeploymentActor],
        deployment_id: str,
        spec: DeploymentSpec,
        saved: dict[str, Any] | None = None,
        **kw: Any,
    ) -> ActorRef:
        """Start a deployment (or session) actor as the node's child."""
        child = self.node.spawn(
            kind,
            self.orchestration(),
            deployment_id,
            spec,
            saved,
            inbox=f"deployment-{deployment_id}",
            **kw,
        )
        self.deployments[deployment_id] = child
        return child

    def _deployment_ended(self, deployment_id: str) -> None:
        self.node.ref.tell_call(self.deployments.pop, deployment_id, None)

    @behaviour("/dms/node/deployment/new", payload=NewDeployment)
    def deployment_new(self, request: Request) -> dict[str, Any]:
        """Place a job. One whose executor is unknown, or rejects its params, is refused
        here with every allocation's reason: no peer would ever take it."""
        spec: DeploymentSpec = request.payload.spec
        problems = executor_problems(spec)
        if problems:
            raise Refusal(ErrorCode.BAD_PAYLOAD, "; ".join(str(p) for p in problems))
        deployment_id = new_deployment_id()
        try:
            self.run(DeploymentActor, deployment_id, spec)
        except StoreBusy as exc:  # its first save (on this thread): nothing was started
            raise Refusal(
                STORE_REFUSED,
                f"this node's store is busy, the deployment was not started; try again "
                f"later: {exc}",
            ) from None
        return {"id": deployment_id}

    @behaviour("/dms/node/deployment/list")
    def deployment_list(self, request: Request) -> list[dict[str, Any]]:
        return [
            {
                "id": row["id"],
                "name": row["name"],
                "state": row["state"],
                "allocations": len(row["slots"]),
                "created_at": row["created_at"],
                # Why parts of its stored record cannot be read (None: all can).
                "unreadable": unreadable_reason(row) or None,
            }
            for row in self.orchestration().store.list()
        ]

    def _row(self, deployment_id: str) -> dict[str, Any]:
        row = self.orchestration().store.get(deployment_id)
        if row is None:
            raise Refusal(ErrorCode.NOT_FOUND, f"no deployment {deployment_id!r}")
        return row

    @behaviour("/dms/node/deployment/status", payload=DeploymentId)
    def deployment_status(self, request: Request) -> dict[str, Any]:
        return summarize(self._row(request.payload.id))

    @behaviour("/dms/node/deployment/manifest", payload=DeploymentId)
    def deployment_manifest(self, request: Request) -> dict[str, Any]:
        """Where each allocation runs, and why each bid won or lost."""
        row = self._row(request.payload.id)
        return {
            "id": row["id"],
            "state": row["state"],
            "slots": [
                {
                    "slot": s["slot"],
                    "status": s["status"],
                    "peer_id": s.get("peer_id"),
                    "lease_id": s.get("lease_id"),
                    "allocation": (
                        {"inbox": s["allocation"].get("inbox"), "host": s["allocation"].get("host")}
                        if isinstance(s.get("allocation"), dict)
                        else None
                    ),
                    "excluded": s.get("excluded") or [],
                    "reasons": s.get("reasons") or {},
                }
                for s in row["slots"]
            ],
            "bids": [
                {
                    "peer_id": b.peer_id,
                    "slot": b.slot,
                    "outcome": b.outcome,
                    "price": b.price,
                    "reason": b.reason,
                }
                for b in self.orchestration().store.bids(row["id"])
                if b.direction == "received"
            ],
        }

    @behaviour("/dms/node/deployment/logs", payload=DeploymentId)
    def deployment_logs(self, request: Request) -> None:
        row = self._row(request.payload.id)
        ref = self.node.ref

        def gather() -> dict[str, Any]:
            logs: dict[str, Any] = {}
            for slot in row["slots"]:
                if not slot.get("allocation"):
                    continue
                try:
                    handle = allocation_handle(slot["allocation"])
                    logs[slot["slot"]] = ref.ask(handle, "/dms/allocation/logs", timeout=5)
                except Exception as exc:
                    logs[slot["slot"]] = [f"(no logs: {exc})"]
            return {"id": row["id"], "logs": logs, "events": row["events"]}

        self.node.in_background(request, gather)

    @behaviour(STILL_HELD, public=True, payload=HeldQuestion)
    def held(self, request: Request) -> dict[str, Any]:
        """Which of the asked leases on the caller this node's deployments still hold: a
        provider asks when the requester went silent on an allocation (its revert may
        have been lost: the outbox is in memory and gives up after its horizon). Answered
        from the running deployments' slots, not their actors, so a deployment busy in a
        long turn still holds what it holds; a lease of an ended or unknown deployment,
        or of one this node forgot in a restart, is let go. Only the caller's own leases
        are answered."""
        peer = request.sender.address.host
        asked: HeldQuestion = request.payload
        o = self._orchestration
        held = (
            [x.lease_id for x in asked.leases if o.holds(peer, x.deployment_id, x.lease_id)]
            if o is not None
            else []
        )
        return {"held": held}

    @behaviour("/dms/node/deployment/shutdown", payload=DeploymentId)
    def deployment_shutdown(self, request: Request) -> Any:
        deployment_id = request.payload.id
        child = self.deployments.get(deployment_id)
        if child is None:
            return summarize(self._row(deployment_id))  # already ended
        responder = request.defer()

        def done(outcome: Any) -> None:
            if outcome.ok:
                responder.ok(outcome.result)
            else:
                responder.fail(outcome.error.code, outcome.error.reason)

        self.node.invoke(child.handle, SHUTDOWN, on_reply=done)
        return None
