"""The node's capability behaviours: its anchors (``/dms/cap/*``) and revocations heard.

A mixin of :class:`dms.node.node.NodeActor`. The trust store is the actor
system's (``DMS_HOME/cap/dms.json``): while the node runs, ``dms cap`` changes
it through these behaviours, so the file has one writer. A revocation given
here is stored and published on ``/dms/revocation``; every node that hears it
stores it when it concerns a chain anchored there, and refuses that chain from
then on. The node publishes the revocations its own keys made again a few
seconds after it starts and every ``REPUBLISH_S``, for nodes that were away.

It also holds the roles of the node's child actors (least privilege): a
deployment (or mining session) may call the marketplace and allocations, an
allocation may only send its updates.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dms.actor import ErrorCode, Refusal, Request, behaviour
from dms.actor.policy import Role
from dms.jobs.allocation import AllocationActor
from dms.node.base import NodeBase
from dms.orchestrator.deployment import DeploymentActor
from dms.security.identity import IdentityError, public_key_from_did
from dms.security.tokens import TokenError, verify_revocation
from dms.security.trust import TrustStore

log = logging.getLogger("dms.node")

REVOCATION_TOPIC = "/dms/revocation"
REVOCATION_BEHAVIOUR = "/broadcast/revocation"
REPUBLISH_S = 600.0
FIRST_REPUBLISH_S = 3.0

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


def anchor(trust: TrustStore, node_did: str, payload: AnchorPayload) -> dict[str, Any]:
    """Add one anchor to ``trust``; the same for the node and for the CLI without one."""
    if payload.root is not None:
        try:
            added = trust.anchor_root(payload.root)
        except IdentityError as err:
            raise Refusal(ErrorCode.BAD_PAYLOAD, str(err)) from None
        return {"anchored": "root", "did": payload.root, "new": added}
    kind = "require" if payload.require else "provide" if payload.provide else "issued"
    raw = payload.require or payload.provide or payload.issued
    assert raw is not None
    try:
        chain = trust.verifier.verify(raw)
    except TokenError as err:
        raise Refusal(ErrorCode.FORBIDDEN, f"{err.rule}: {err.message}", rule=err.rule) from None
    token = chain.token
    if kind == "provide":
        me = trust.node_key
        if token.aud != me and not trust.is_root(token.aud):
            raise Refusal(
                ErrorCode.BAD_PAYLOAD,
                f"this token is for {token.describe()['aud']}, not this node ({node_did})",
            )
    kinds = [kind]
    _, new = trust.anchor(raw, kind)
    if kind == "provide" and not payload.one_way:
        trust.anchor(raw, "require")
        kinds.append("require")
    return {
        "anchored": "+".join(kinds),
        "new": new,
        "accepts": token.describe()["iss"] if "require" in kinds else None,
        **token.describe(),
        "chain": chain.length,
    }


def remove(trust: TrustStore, payload: RemovePayload) -> dict[str, Any]:
    if payload.root is not None:
        removed = ["root"] if trust.remove_root(payload.root) else []
        return {"removed": removed, "root": payload.root}
    if payload.id is None:
        raise Refusal(ErrorCode.BAD_PAYLOAD, "give a root DID or a token id")
    found = trust.find(payload.id)
    if len(found) != 1:
        what = "no anchored token" if not found else f"{len(found)} tokens"
        raise Refusal("unknown", f"{what} with an id starting {payload.id}")
    token_id = found[0].token.id
    return {"removed": trust.remove(token_id), "id": token_id.hex()}


class CapBehaviours(NodeBase):
    def start_caps(self) -> None:
        """Before any child actor starts: the roles they get."""
        self.system.roles.update(ROLES)
        self.subscribe(REVOCATION_TOPIC)
        self.call_later(FIRST_REPUBLISH_S, self._republish)

    @property
    def trust(self) -> TrustStore:
        return self.system.trust

    @behaviour(REVOCATION_BEHAVIOUR, public=True, payload=RevocationPayload, topic=REVOCATION_TOPIC)
    def revocation_heard(self, request: Request) -> None:
        """A revocation is its own proof (signed by an issuer of the chain it revokes),
        so anyone may pass it on."""
        outcome = self.trust.add_revocation(request.payload.revocation)
        if outcome.stored:
            log.info("%s (heard from %s)", outcome.reason, request.sender.did)
        else:
            log.debug("revocation from %s not stored: %s", request.sender.did, outcome.reason)

    @behaviour("/dms/cap/list")
    def cap_list(self, request: Request) -> dict[str, Any]:
        return {
            "did": self.identity.did,
            "deployment_policy": self.system.deployment_policy,
            **self.trust.listing(),
        }

    @behaviour("/dms/cap/anchor", payload=AnchorPayload)
    def cap_anchor(self, request: Request) -> dict[str, Any]:
        return anchor(self.trust, self.identity.did, request.payload)

    @behaviour("/dms/cap/remove", payload=RemovePayload)
    def cap_remove(self, request: Request) -> dict[str, Any]:
        return remove(self.trust, request.payload)

    @behaviour("/dms/cap/revoke", payload=RevocationPayload)
    def cap_revoke(self, request: Request) -> dict[str, Any]:
        """Store a revocation and publish it to every node."""
        raw = request.payload.revocation
        outcome = self.trust.add_revocation(raw)
        if outcome.revocation is None:
            raise Refusal(ErrorCode.BAD_PAYLOAD, outcome.reason)
        self.publish(REVOCATION_TOPIC, REVOCATION_BEHAVIOUR, {"revocation": raw})
        return {
            "revoked": outcome.revocation.revoked_id.hex(),
            "stored": outcome.stored,
            "note": outcome.reason,
            "published": REVOCATION_TOPIC,
        }

    def _republish(self) -> None:
        """The revocations this node's keys made, for nodes that were away."""
        mine = {self.identity.public_key} | _keys(self.trust.anchors.root)
        for raw in self.trust.revocations():
            try:
                rev = verify_revocation(self.trust.verifier, raw)
            except TokenError:
                continue
            if rev.token.iss in mine:
                try:
                    self.publish(REVOCATION_TOPIC, REVOCATION_BEHAVIOUR, {"revocation": raw})
                except Exception as exc:  # the network may be stopping
                    log.debug("revocation not published again: %s", exc)
        self.call_later(REPUBLISH_S, self._republish)


def _keys(dids: list[str]) -> set[bytes]:
    return {public_key_from_did(d) for d in dids}
