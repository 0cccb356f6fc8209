"""The node's requester side of placement: the owner's deployments.

``/dms/node/deployment/{new,list,status,logs,manifest,shutdown}``, each deployment
run by a :class:`DeploymentActor` child (a mining session by its subclass), resumed
after a restart. A mixin of :class:`dms.node.node.NodeActor`; the provider's side is
``dms.node.bidding``. See ``specs/orchestration.md``.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dms.actor import ActorRef, ErrorCode, Refusal, Request, behaviour
from dms.jobs.spec import DeploymentSpec, executor_problems
from dms.node.base import NodeBase
from dms.orchestrator.deployment import (
    SHUTDOWN,
    DeploymentActor,
    Orchestration,
    actor_for,
    allocation_handle,
    new_deployment_id,
    summarize,
)
from dms.orchestrator.reverts import Reverts
from dms.orchestrator.store import DeploymentStore

log = logging.getLogger("dms.node")


class NewDeployment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    spec: DeploymentSpec


class DeploymentId(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=64)


class DeployingBehaviours(NodeBase):
    def start_deploying(self) -> None:
        self._deployments = {}
        self.reverts = Reverts(self)
        db = self.services.onboarder.db if self.services.onboarder else None
        if db is None:
            return
        self._orchestration = Orchestration(
            peer_table=self.services.peer_table,
            store=DeploymentStore(
                db, self.services.home / "unsaved" if self.services.home else None
            ),
            on_end=self._deployment_ended,
            supervise_s=self.services.supervise_s,
            revert=lambda peer, payload: self.ref.tell_call(self.reverts.send, peer, payload),
            on_placed=lambda peer: self.services.stakes.note(peer, "placed"),
        )
        for row in self._orchestration.store.active():
            try:
                spec = DeploymentSpec.model_validate(row["spec"])
            except Exception as exc:
                log.warning("deployment %s cannot resume: %s", row["id"], exc)
                continue
            # Its executors' driver, if any (a mining session: its keys were in memory,
            # so it fails, releasing every lease).
            self._spawn_deployment(row["id"], spec, saved=row, kind=actor_for(spec))

    # ---- provider ----------------------------------------------------------------------

    # ---- requester (owner) -------------------------------------------------------------

    def _spawn_deployment(
        self,
        deployment_id: str,
        spec: DeploymentSpec,
        saved: dict[str, Any] | None = None,
        kind: type[DeploymentActor] = DeploymentActor,
    ) -> ActorRef:
        child = self.spawn(
            kind,
            self._orch(),
            deployment_id,
            spec,
            saved,
            inbox=f"deployment-{deployment_id}",
        )
        self._deployments[deployment_id] = child
        return child

    def _deployment_ended(self, deployment_id: str) -> None:
        self.ref.tell_call(self._deployments.pop, deployment_id, None)

    @behaviour("/dms/node/deployment/new", payload=NewDeployment)
    def deployment_new(self, request: Request) -> dict[str, Any]:
        """Place a job. One whose executor is unknown, or rejects its params, is refused
        here with every allocation's reason: no peer would ever take it."""
        spec: DeploymentSpec = request.payload.spec
        problems = executor_problems(spec)
        if problems:
            raise Refusal(ErrorCode.BAD_PAYLOAD, "; ".join(str(p) for p in problems))
        deployment_id = new_deployment_id()
        self._spawn_deployment(deployment_id, spec)
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
            }
            for row in self._orch().store.list()
        ]

    def _row(self, deployment_id: str) -> dict[str, Any]:
        row = self._orch().store.get(deployment_id)
        if row is None:
            raise Refusal("unknown", f"no deployment {deployment_id!r}")
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
                    "peer_id": s["peer_id"],
                    "lease_id": s["lease_id"],
                    "allocation": (
                        {"inbox": s["allocation"]["inbox"], "host": s["allocation"]["host"]}
                        if s["allocation"]
                        else None
                    ),
                    "excluded": s["excluded"],
                    "reasons": s["reasons"],
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
                for b in self._orch().store.bids(row["id"])
                if b.direction == "received"
            ],
        }

    @behaviour("/dms/node/deployment/logs", payload=DeploymentId)
    def deployment_logs(self, request: Request) -> None:
        row = self._row(request.payload.id)
        ref = self.ref

        def gather() -> dict[str, Any]:
            logs: dict[str, Any] = {}
            for slot in row["slots"]:
                if slot["allocation"] is None:
                    continue
                handle = allocation_handle(slot["allocation"])
                try:
                    logs[slot["slot"]] = ref.ask(handle, "/dms/allocation/logs", timeout=5)
                except Exception as exc:
                    logs[slot["slot"]] = [f"(no logs: {exc})"]
            return {"id": row["id"], "logs": logs, "events": row["events"]}

        self.in_background(request, gather)

    @behaviour("/dms/node/deployment/shutdown", payload=DeploymentId)
    def deployment_shutdown(self, request: Request) -> Any:
        deployment_id = request.payload.id
        child = self._deployments.get(deployment_id)
        if child is None:
            return summarize(self._row(deployment_id))  # already ended
        responder = request.defer()

        def done(outcome: Any) -> None:
            if outcome.ok:
                responder.ok(outcome.result)
            else:
                responder.fail(outcome.error.code, outcome.error.reason)

        self.invoke(child.handle, SHUTDOWN, on_reply=done)
        return None
