"""The node's capability behaviours: its anchors (``/dms/cap/*``) and revocations heard.

A role of :class:`dms.node.node.NodeActor` (:class:`Capabilities`). The trust
store is the actor system's (``DMS_HOME/cap/dms.json``): while the node runs, ``dms cap`` changes
it through these behaviours, so the file has one writer. A revocation given
here is stored and published on ``/dms/revocation``; every node that hears it
stores it when it concerns a chain anchored there, and refuses that chain from
then on. The node publishes the revocations its own keys made again a few
seconds after it starts and every ``REPUBLISH_S``, for nodes that were away.

A revocation heard is checked on a thread of its own (:class:`RevocationIntake`),
not in the node's mailbox: a flood of them costs the node no turn that hellos,
heartbeats and bids need. At most ``REVOCATION_QUEUE`` wait; more are dropped
(counted as ``queue_full``). The signature work is budgeted by the trust store.

It also holds the roles of the node's child actors (least privilege): a
deployment (or mining session) may call the marketplace and allocations, an
allocation may only send its updates.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dms.actor import ErrorCode, Refusal, Request, behaviour
from dms.actor.policy import Role
from dms.actor.runtime import NodeRuntime
from dms.jobs.allocation import AllocationActor
from dms.network.gossip import REVOCATION_TOPIC
from dms.orchestrator.deployment import DeploymentActor
from dms.security.identity import IdentityError, public_key_from_did
from dms.security.trust import RevocationOutcome, TrustStore

log = logging.getLogger("dms.node")

REVOCATION_BEHAVIOUR = "/broadcast/revocation"
REPUBLISH_S = 600.0
FIRST_REPUBLISH_S = 3.0
REVOCATION_QUEUE = 256  # heard revocations waiting for their check; more are dropped

# What each kind of child actor may do, here and (by certificate) on other nodes.
REQUESTER_ROLE = Role(caps=("/dms/deployment", "/dms/allocation"), topics=("/dms/deployment",))
ALLOCATION_ROLE = Role(caps=("/dms/deployment/update",))
ROLES: dict[type, Role] = {DeploymentActor: REQUESTER_ROLE, AllocationActor: ALLOCATION_ROLE}


class RevocationPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    revocation: bytes = Field(max_length=64 * 1024)


class AnchorPayload(BaseModel):
    """Exactly one of ``root`` (a DID), ``require``, ``provide``, ``issued`` (a token)."""

    model_config = ConfigDict(extra="forbid")
    root: str | None = Field(default=None, max_length=128)
    require: bytes | None = Field(default=None, max_length=32 * 1024)
    provide: bytes | None = Field(default=None, max_length=32 * 1024)
    issued: bytes | None = Field(default=None, max_length=32 * 1024)
    one_way: bool = False  # provide only: do not also accept its first issuer's chains

    @model_validator(mode="after")
    def _one(self) -> AnchorPayload:
        given = [k for k in ("root", "require", "provide", "issued") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of root, require, provide, issued")
        return self


class RemovePayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    root: str | None = Field(default=None, max_length=128)
    id: str | None = Field(default=None, min_length=4, max_length=64, pattern=r"^[0-9a-fA-F]+$")


class RevocationIntake:
    """Heard revocations, checked one at a time on a thread of their own."""

    def __init__(self, trust: TrustStore, capacity: int = REVOCATION_QUEUE) -> None:
        self.trust = trust
        self.capacity = capacity
        self._waiting = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dms-revocations")

    def offer(
        self,
        raw: bytes,
        peer: str,
        signer: bytes,
        done: Callable[[RevocationOutcome], None] | None = None,
    ) -> bool:
        """Queue ``raw`` (sent by ``peer``, its envelope signed by ``signer``); False
        if the queue is full (the revocation is dropped, counted as ``queue_full``)."""
        with self._lock:
            if self._waiting >= self.capacity:
                self.trust.revocation_outcomes["queue_full"] += 1
                return False
            self._waiting += 1
        try:
            self._pool.submit(self._check, raw, peer, signer, done)
        except RuntimeError:  # stopping
            return False
        return True

    def _check(
        self,
        raw: bytes,
        peer: str,
        signer: bytes,
        done: Callable[[RevocationOutcome], None] | None,
    ) -> None:
        with self._lock:
            self._waiting -= 1
        trust = self.trust
        # Sent by this node, a root or an authority (an authenticated envelope):
        # outside the budget that every other sender shares.
        charged = None if trust.privileged(signer) else peer
        try:
            outcome = trust.add_revocation(raw, peer=charged)
        except Exception:  # a bug must not stop the thread
            log.exception("revocation check failed")
            return
        if done is not None:
            done(outcome)

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Capabilities:
    """The node's trust anchors and revocations, and its child actors' roles."""

    def __init__(self, node: NodeRuntime) -> None:
        self.node = node
        self.trust: TrustStore = node.system.trust
        self.revocation_intake = RevocationIntake(self.trust)

    def start(self) -> None:
        """Before any child actor starts: the roles they get."""
        self.node.system.roles.update(ROLES)
        self.node.subscribe(REVOCATION_TOPIC)
        self.node.call_later(FIRST_REPUBLISH_S, self._republish)

    def stop(self) -> None:
        self.revocation_intake.stop()

    @behaviour(REVOCATION_BEHAVIOUR, public=True, payload=RevocationPayload, topic=REVOCATION_TOPIC)
    def revocation_heard(self, request: Request) -> None:
        """A revocation is its own proof (signed by an issuer of the chain it revokes),
        so anyone may pass it on. Checked off the mailbox (:class:`RevocationIntake`)."""
        sender = request.sender
        did = sender.did

        def done(outcome: RevocationOutcome) -> None:
            if outcome.stored:
                log.info("%s (heard from %s)", outcome.reason, did)
            else:
                log.debug("revocation from %s not stored: %s", did, outcome.reason)

        if not self.revocation_intake.offer(
            request.payload.revocation, sender.address.host, request.envelope.signer, done
        ):
            log.debug("revocation from %s dropped: %d waiting already", did, REVOCATION_QUEUE)

    @behaviour("/dms/cap/list")
    def cap_list(self, request: Request) -> dict[str, Any]:
        return {
            "did": self.node.identity.did,
            "deployment_policy": self.node.system.deployment_policy,
            **self.trust.listing(),
        }

    @behaviour("/dms/cap/anchor", payload=AnchorPayload)
    def cap_anchor(self, request: Request) -> dict[str, Any]:
        p: AnchorPayload = request.payload
        if p.root is not None:
            try:
                return {"anchored": "root", "did": p.root, "new": self.trust.anchor_root(p.root)}
            except IdentityError as err:
                raise Refusal(ErrorCode.BAD_PAYLOAD, str(err)) from None
        kind = "require" if p.require else "provide" if p.provide else "issued"
        raw = p.require or p.provide or p.issued
        assert raw is not None
        return self.trust.anchor_token(raw, kind, one_way=p.one_way)

    @behaviour("/dms/cap/remove", payload=RemovePayload)
    def cap_remove(self, request: Request) -> dict[str, Any]:
        p: RemovePayload = request.payload
        return self.trust.remove_anchor(root=p.root, prefix=p.id)

    @behaviour("/dms/cap/revoke", payload=RevocationPayload)
    def cap_revoke(self, request: Request) -> dict[str, Any]:
        """Store a revocation and publish it to every node."""
        raw = request.payload.revocation
        outcome = self.trust.add_revocation(raw, local=True)
        if outcome.revocation is None:
            raise Refusal(ErrorCode.BAD_PAYLOAD, outcome.reason)
        self._publish(raw)
        return {
            "revoked": outcome.revocation.revoked_id.hex(),
            "stored": outcome.stored,
            "note": outcome.reason,
            "published": REVOCATION_TOPIC,
        }

    def _publish(self, raw: bytes) -> None:
        """Publish a revocation, sealed to live until the next republication: the network
        paces this node's own revocations below the budget each receiver gives it
        (``dms.network.gossip.Pacer``), so one may wait its turn far longer than an
        invoke's lifetime, and a receiver refuses an expired envelope."""
        ttl_s = min(REPUBLISH_S, self.node.system.limits.max_ttl_s)
        self.node.publish(REVOCATION_TOPIC, REVOCATION_BEHAVIOUR, {"revocation": raw}, ttl_s=ttl_s)

    def _republish(self) -> None:
        """The revocations this node's keys made, for nodes that were away."""
        mine = {self.node.identity.public_key} | _keys(self.trust.anchors.root)
        for raw in self.trust.revocations_by(mine):
            try:
                self._publish(raw)
            except Exception as exc:  # the network may be stopping
                log.debug("revocation not published again: %s", exc)
        self.node.call_later(REPUBLISH_S, self._republish)


def _keys(dids: list[str]) -> set[bytes]:
    return {public_key_from_did(d) for d in dids}
