"""The tokens an outgoing envelope carries, chosen for it automatically.

The node shows its ``provide`` anchors: the chains granted to it whose leaf
covers the behaviour (and, for a broadcast, the topic). A child actor shows
actor certificates: tokens from the node to the child, narrowed to the child's
:class:`~dms.actor.policy.Role`. One is rooted at the node itself (for peers
that accept this node as an authority, such as the members of a group it
founded); one more per provide chain, with that chain as its parent (for peers
that accept whoever granted it). A certificate lives ``CERT_TTL_S`` (never
longer than its parent) and is made again when it nears its end.

Choices are cached per (signer, host, behaviour, topic) until the anchors
change or a token nears its expiry, so an envelope pays one lookup. Chains
whose first issuer is the destination's own node go first; at most
``MAX_ATTACHED`` are carried.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from dms.actor.envelope import REPLY_PREFIX
from dms.actor.policy import Role
from dms.security.identity import Identity, IdentityError, public_key_from_peer_id
from dms.security.tokens import Action, Chain, covered, intersect, issue
from dms.security.trust import TrustStore

CERT_TTL_S = 2 * 3600
RENEW_S = 600  # a token closer than this to its expiry is not shown; certificates are renewed
MAX_ATTACHED = 4
MAX_ENTRIES = 8192


@dataclass(frozen=True, slots=True)
class _Choice:
    generation: int
    until: float  # reuse while time.time() < until
    tokens: list[bytes]


class Wallet:
    def __init__(
        self, identity: Identity, trust: TrustStore, role_of: Callable[[bytes], Role | None]
    ) -> None:
        self.identity = identity
        self.trust = trust
        self._role_of = role_of
        self._lock = threading.Lock()
        self._choices: dict[tuple[bytes, str | None, str, str | None], _Choice] = {}
        self._certs: dict[tuple[bytes, bytes | None], tuple[Chain, int]] = {}

    def tokens_for(
        self, signer: bytes, host: str | None, path: str, topic: str | None = None
    ) -> list[bytes]:
        """The tokens an envelope from ``signer`` to ``host`` (None: a broadcast on
        ``topic``) for ``path`` should carry."""
        if path.startswith(REPLY_PREFIX) or host == self.identity.peer_id:
            return []  # replies need none; at home, the role or the node key decides
        node = signer == self.identity.public_key
        if node and not self.trust.provide():
            return []
        key = (signer, host, path, topic)
        choice = self._choices.get(key)
        now = time.time()
        if choice is not None and choice.generation == self.trust.generation and now < choice.until:
            return choice.tokens
        generation = self.trust.generation
        chains = (
            self._node_chains(path, topic, now)
            if node
            else self._actor_chains(signer, path, topic, now)
        )
        chains.sort(key=lambda c: c.root != _host_key(host))
        chosen = chains[:MAX_ATTACHED]
        until = min((c.exp - RENEW_S for c in chosen), default=now + CERT_TTL_S)
        with self._lock:
            if len(self._choices) >= MAX_ENTRIES:
                self._choices.clear()
            self._choices[key] = _Choice(generation, until, [c.raw for c in chosen])
        return [c.raw for c in chosen]

    def forget(self, signer: bytes) -> None:
        """An actor stopped: drop its certificates and choices."""
        with self._lock:
            for k in [k for k in self._choices if k[0] == signer]:
                del self._choices[k]
            for c in [c for c in self._certs if c[0] == signer]:
                del self._certs[c]

    # ---- choosing ----------------------------------------------------------------------

    def _usable(self, chain: Chain, now: float) -> bool:
        return chain.exp - RENEW_S > now and chain.ids.isdisjoint(self.trust.revoked)

    def _node_chains(self, path: str, topic: str | None, now: float) -> list[Chain]:
        me = self.identity.public_key
        return [
            c
            for c in self.trust.provide()
            if c.token.aud == me and self._usable(c, now) and _covers(c, path, topic)
        ]

    def _actor_chains(self, signer: bytes, path: str, topic: str | None, now: float) -> list[Chain]:
        role = self._role_of(signer)
        if role is None or not role.grants(path, topic):
            return []
        me = self.identity.public_key
        found = [self._cert(signer, role, None, now)]
        for parent in self.trust.provide():
            tok = parent.token
            if (
                tok.aud == me
                and tok.act == Action.DELEGATE
                and self._usable(parent, now)
                and _covers(parent, path, topic)
            ):
                found.append(self._cert(signer, role, parent, now))
        return [c for c in found if c is not None and _covers(c, path, topic)]

    def _cert(self, signer: bytes, role: Role, parent: Chain | None, now: float) -> Chain | None:
        """The node's certificate for its actor ``signer``, below ``parent`` (or rooted at
        the node), made once and renewed near its expiry."""
        key = (signer, parent.token.id if parent else None)
        with self._lock:
            held = self._certs.get(key)
        if held is None or held[1] - RENEW_S <= now:
            exp = int(now + CERT_TTL_S)
            caps, topics = role.caps, role.topics
            proofs: list[bytes] = []
            if parent is not None:
                tok = parent.token
                exp = min(exp, tok.exp)
                caps, topics = intersect(caps, tok.cap), intersect(topics, tok.topic)
                proofs = [parent.raw]
            if not caps:
                return None
            cert = issue(
                self.identity,
                signer,
                caps,
                expires_at=exp,
                act=Action.DELEGATE,
                topics=topics,
                depth=0,
                proofs=proofs,
            )
            # Rooted at this node, its chain is its own signature over what was just
            # built: kept as verified, not checked again. Below a parent, the verifier
            # checks that it narrows it.
            chain = (
                self.trust.verifier.verify(cert.raw)
                if parent is not None
                else self.trust.verifier.signed(cert)
            )
            held = (chain, exp)
            with self._lock:
                self._certs[key] = held
        return held[0]


def _covers(chain: Chain, path: str, topic: str | None) -> bool:
    tok = chain.token
    if topic is None:
        return covered(path, tok.cap) and tok.act in (Action.INVOKE, Action.DELEGATE)
    return (
        covered(path, tok.cap)
        and covered(topic, tok.topic)
        and tok.act in (Action.BROADCAST, Action.DELEGATE)
    )


def _host_key(host: str | None) -> bytes | None:
    if host is None:
        return None
    try:
        return public_key_from_peer_id(host)
    except IdentityError:
        return None
