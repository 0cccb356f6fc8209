"""The capability stage of the receive pipeline.

A request passes when:

- its behaviour is ``public``, except in the marketplace (the public behaviours
  under ``/dms/deployment``: bid requests, commits, allocations, reverts, bids,
  allocation updates), which is open to all only while the node's
  ``deployment_policy`` is ``open``; under ``tokens`` they need their capability;
- or its signer is the node itself, or a DID anchored as root;
- or its signer is a child actor of this node and the behaviour is within the
  child's :class:`Role` (least privilege: a child holds only what its role
  needs; anything else is ``beyond_role``);
- or its signer is an authority anchored here (the first issuer of a require
  anchor) within that anchor's scope;
- or one of the envelope's tokens is a chain that passes every rule
  (``dms.security.tokens``) and grants the behaviour's path (and, for a
  broadcast, its topic).

Anything else is refused with ``forbidden``; the refusal names the missing
capability and carries the rule that failed (``Refusal.rule``). A chain seen for
the first time is checked for size and length before any signature, then its
signatures are charged to the trust store's ``chain_budget`` (per peer and for
all peers): over it, the request is refused ``rate_limited`` (rule
``over_budget``), and the same chain may be shown again later.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from dms.actor.behaviour import Behaviour
from dms.actor.codes import ErrorCode, Refusal
from dms.actor.envelope import Envelope
from dms.security.identity import IdentityError, public_key_from_peer_id
from dms.security.tokens import (
    OverBudget,
    Rule,
    TokenError,
    check_use,
    covered,
    covers,
    decode,
    grants,
)
from dms.security.trust import TrustStore

DeploymentPolicy = Literal["open", "tokens"]
MARKETPLACE = "/dms/deployment"
MAX_TOKENS = 4  # tokens looked at in one envelope (at most 4 x 8 signatures checked)


@dataclass(frozen=True)
class Role:
    """The capabilities (behaviour paths) and topics a child actor holds."""

    caps: tuple[str, ...] = ()
    topics: tuple[str, ...] = ()

    def grants(self, path: str, topic: str | None = None) -> bool:
        return covered(path, self.caps) and (topic is None or covered(topic, self.topics))

    def __str__(self) -> str:
        return ", ".join(self.caps) or "nothing"


def _host_key(peer_id: str) -> bytes | None:
    try:
        return public_key_from_peer_id(peer_id)
    except IdentityError:
        return None


class CapabilityPolicy:
    def __init__(
        self,
        trust: TrustStore,
        node_key: bytes,
        role_of: Callable[[bytes], Role | None],
        deployment_policy: DeploymentPolicy = "open",
    ) -> None:
        self.trust = trust
        self.node_key = node_key
        self._role_of = role_of
        self.deployment_policy: DeploymentPolicy = deployment_policy

    def authorize(self, envelope: Envelope, spec: Behaviour) -> None:
        path = spec.required_capability
        if spec.public and (self.deployment_policy == "open" or not covers(MARKETPLACE, path)):
            return
        signer = envelope.signer
        trust = self.trust
        if signer == self.node_key or trust.is_root(signer):
            return
        topic = envelope.topic if envelope.to is None else None
        role = self._role_of(signer)
        if role is not None:
            if role.grants(path, topic):
                return
            raise self._denied(envelope, path, Rule.BEYOND_ROLE, f"its role holds {role}")
        now = time.time()
        own = trust.scopes(signer, now)
        if own is not None and any(
            covered(path, s.caps) and (topic is None or covered(topic, s.topics)) for s in own
        ):
            return
        if not envelope.caps:
            raise self._denied(envelope, path, Rule.NO_TOKEN, "it showed no token")
        failure = self._check_tokens(envelope, path, topic, now)
        if isinstance(failure, OverBudget):
            raise Refusal(ErrorCode.RATE_LIMITED, failure.message, rule=failure.rule)
        if failure is not None:
            raise self._denied(envelope, path, failure.rule, failure.message)

    def _check_tokens(
        self, envelope: Envelope, path: str, topic: str | None, now: float
    ) -> TokenError | None:
        """None if a token grants ``path``; else the most telling failure: the first
        one of a token that names the path, or the first one."""
        trust = self.trust
        signer = envelope.signer
        host_key = _host_key(envelope.sender.address.host)
        revoked = trust.revoked
        first: TokenError | None = None
        telling: TokenError | None = None
        peer = envelope.sender.address.host  # bound to the delivering peer already

        def charge() -> None:
            why = trust.chain_budget.take(peer)
            if why is not None:
                raise OverBudget(why)

        for raw in envelope.caps[:MAX_TOKENS]:
            try:
                chain = trust.verifier.verify(raw, charge)
                scopes = trust.scopes(chain.root, now)
                check_use(
                    chain,
                    signer=signer,
                    host_key=host_key,
                    now=now,
                    revoked=revoked,
                    scopes=scopes,
                )
                assert scopes is not None
                refused = grants(chain, path, topic, scopes)
            except TokenError as err:
                refused = err
            if refused is None:
                return None
            first = first or refused
            if telling is None and _names(raw, path):
                telling = refused
        assert first is not None
        return telling or first

    def _denied(self, envelope: Envelope, path: str, rule: Rule, detail: str) -> Refusal:
        return Refusal(
            ErrorCode.FORBIDDEN,
            f"{envelope.sender.did} lacks capability {path}: {rule}: {detail}",
            rule=rule,
        )


def _names(raw: bytes, path: str) -> bool:
    try:
        return covered(path, decode(raw).cap)
    except TokenError:
        return False
