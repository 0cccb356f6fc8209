"""The denial matrix: every kind of behaviour against every kind of caller.

Behaviour classes on one target node (``deployment_policy = "tokens"``): public,
node owner (``/dms/node/...``), marketplace (public, under ``/dms/deployment``)
and an allocation session (a real allocation placed by another node). Callers:
the owner, holders of good chains (granted, delegated, delegated twice, granted
by the owner's key), holders of each kind of bad token, a child actor beyond its
role, and the allocation's requester. Each cell is ``ok`` or the rule of the
``forbidden`` refusal. Every envelope travels the in-memory network and the
whole receive pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import msgpack
import pytest

from dms.actor import (
    ROOT_INBOX,
    Actor,
    ActorSystem,
    Address,
    ErrorCode,
    Handle,
    MemoryNetwork,
    RemoteError,
    Request,
    Role,
    behaviour,
    make_envelope,
    seal,
)
from dms.jobs.allocation import AllocationActor
from dms.security import Identity
from dms.security.tokens import issue, revoke
from dms.security.trust import TrustStore

PUBLIC = "/public/test"
OWNER = "/dms/node/test"
MARKET = "/dms/deployment/test"
SESSION = "/dms/allocation/status"
CLASSES = ("public", "owner", "market", "allocation")
CAPS = [OWNER, "/dms/deployment"]

OK = "ok"
# caller: (public, node owner, marketplace, allocation session)
EXPECTED: dict[str, tuple[str, str, str, str]] = {
    "owner": (OK, OK, OK, OK),
    "granted": (OK, OK, OK, "not_requester"),
    "granted by the owner's key": (OK, OK, OK, "not_requester"),
    "delegated": (OK, OK, OK, "not_requester"),
    "delegated twice": (OK, OK, OK, "not_requester"),
    "expired": (OK, "expired", "expired", "not_requester"),
    "outlives its parent": (OK, "outlives_parent", "outlives_parent", "not_requester"),
    "revoked": (OK, "revoked", "revoked", "not_requester"),
    "widened": (OK, "widened", "widened", "not_requester"),
    "not a delegation, chained": (OK, "not_delegation", "not_delegation", "not_requester"),
    "wrong audience": (OK, "wrong_audience", "wrong_audience", "not_requester"),
    "tampered signature": (OK, "bad_signature", "bad_signature", "not_requester"),
    "unanchored issuer": (OK, "unanchored", "unanchored", "not_requester"),
    "depth exceeded": (OK, "depth_exceeded", "depth_exceeded", "not_requester"),
    "no token": (OK, "no_token", "no_token", "not_requester"),
    "capability not granted": (OK, "not_granted", OK, "not_requester"),
    "child actor beyond its role": (OK, "beyond_role", OK, "not_requester"),
    "the allocation's requester": (OK, "no_token", "no_token", OK),
}


class Target(Actor):
    @behaviour(PUBLIC, public=True)
    def public(self, request: Request) -> str:
        return OK

    @behaviour(OWNER)
    def owner(self, request: Request) -> str:
        return OK

    @behaviour(MARKET, public=True)
    def market(self, request: Request) -> str:
        return OK


class Session(Actor):
    """The requester's deployment actor, which placed the allocation."""

    @behaviour("/dms/deployment/update", public=True)
    def update(self, request: Request) -> None:
        return None


class Plain(Actor):
    pass


@dataclass
class Caller:
    system: ActorSystem
    identity: Identity
    inbox: str
    caps: list[bytes]

    def call(self, to: Handle, path: str) -> str:
        me = Handle(id=self.identity.public_key, address=Address(host=self.system.peer_id,
                    inbox=self.inbox))  # fmt: skip
        # 30 s: a lifetime and a deadline of 5 s were no longer than a loaded machine's
        # pause, and a call that timed out failed as if it had been refused.
        env = make_envelope(me, self.identity.public_key, path, None, to=to, ttl_s=30,
                            expect_reply=True, caps=self.caps)  # fmt: skip
        future = self.system.invoke_frame(seal(env, self.identity), env, 30)
        try:
            assert future.result(31) == OK or path == SESSION
        except RemoteError as err:
            assert err.code == ErrorCode.FORBIDDEN, err
            assert err.rule is not None and f"{err.rule}:" in err.reason
            if err.rule != "not_requester":
                assert f"lacks capability {path}:" in err.reason
            return err.rule
        return OK


# One expiry for every token that takes the default: a child issued a second after
# its parent, across a clock second, must not outlive it (a CI failure).
_AN_HOUR_AFTER_IMPORT = int(time.time() + 3600)


def later(s: float | None = None) -> int:
    return _AN_HOUR_AFTER_IMPORT if s is None else int(time.time() + s)


@dataclass
class World:
    target: ActorSystem
    root: Handle
    allocation: Handle
    callers: dict[str, Caller]


@pytest.fixture
def world() -> Iterator[World]:
    net = MemoryNetwork()
    systems: list[ActorSystem] = []

    def node(policy: str = "open") -> ActorSystem:
        ident = Identity.generate()
        system = ActorSystem(ident, net.transport(ident.peer_id), trust=TrustStore(None),
                             deployment_policy=policy)  # type: ignore[arg-type]  # fmt: skip
        systems.append(system)
        system.spawn(Target, inbox=ROOT_INBOX, identity=ident)
        return system

    target = node("tokens")
    t = target.identity
    owner = Identity.generate()
    target.trust.anchor_root(owner.did)
    g, h, i, m = node(), node(), node(), node()
    requester = node()
    session = requester.spawn(Session)
    allocation = target.spawn(
        AllocationActor, lease_id="lease-1", deployment_id="dep-1", slot="w",
        executor="compute", params={"seconds": 60}, requester_host=requester.peer_id,
        reply_to=session.handle, inbox="alloc-lease-1",
    )  # fmt: skip
    stranger = Identity.generate()
    to_g, to_h, to_i = g.identity.public_key, h.identity.public_key, i.identity.public_key

    grant = issue(t, to_g, CAPS, expires_at=later(), depth=2)
    by_owner = issue(owner, to_g, CAPS, expires_at=later())
    delegated = issue(g.identity, to_h, CAPS, expires_at=later(), depth=1, proofs=[grant.raw])
    twice = issue(h.identity, to_i, CAPS, expires_at=later(), proofs=[delegated.raw])
    expired = issue(t, to_g, CAPS, expires_at=int(time.time()) - 60)
    short = issue(t, to_g, CAPS, expires_at=later(600), depth=1)
    outlives = issue(g.identity, to_h, CAPS, expires_at=later(), proofs=[short.raw])
    revoked = issue(t, to_g, CAPS, expires_at=later())
    assert target.trust.add_revocation(revoke(t, target.trust.verifier.verify(revoked.raw)).raw)
    narrow = issue(t, to_g, ["/dms/deployment"], expires_at=later(), depth=1)
    widened = issue(g.identity, to_h, ["/"], expires_at=later(), proofs=[narrow.raw])
    invoke_only = issue(t, to_g, CAPS, act="invoke", expires_at=later(), depth=3)
    below_invoke = issue(g.identity, to_h, CAPS, expires_at=later(), proofs=[invoke_only.raw])
    body, sig = msgpack.unpackb(grant.raw)
    tampered = msgpack.packb([body, bytes([sig[0] ^ 0x40]) + sig[1:]])
    unanchored = issue(stranger, to_g, CAPS, expires_at=later())
    flat = issue(t, to_g, CAPS, expires_at=later(), depth=0)
    too_deep = issue(g.identity, to_h, CAPS, expires_at=later(), proofs=[flat.raw])
    market_only = issue(t, to_g, ["/dms/deployment"], expires_at=later())
    child = target.spawn(Plain, role=Role(caps=("/dms/deployment",)))

    def root(system: ActorSystem, caps: list[bytes]) -> Caller:
        return Caller(system, system.identity, ROOT_INBOX, caps)

    callers = {
        "owner": Caller(target, owner, "cli-1", []),
        "granted": root(g, [grant.raw]),
        "granted by the owner's key": root(g, [by_owner.raw]),
        "delegated": root(h, [delegated.raw]),
        "delegated twice": root(i, [twice.raw]),
        "expired": root(g, [expired.raw]),
        "outlives its parent": root(h, [outlives.raw]),
        "revoked": root(g, [revoked.raw]),
        "widened": root(h, [widened.raw]),
        "not a delegation, chained": root(h, [below_invoke.raw]),
        "wrong audience": root(m, [grant.raw]),
        "tampered signature": root(g, [tampered]),
        "unanchored issuer": root(g, [unanchored.raw]),
        "depth exceeded": root(h, [too_deep.raw]),
        "no token": root(m, []),
        "capability not granted": root(g, [market_only.raw]),
        "child actor beyond its role": Caller(
            target, child.identity, child.handle.address.inbox, []
        ),
        "the allocation's requester": Caller(
            requester, session.identity, session.handle.address.inbox, []
        ),
    }
    root_handle = Handle(id=t.public_key, address=Address(host=target.peer_id, inbox=ROOT_INBOX))
    yield World(target, root_handle, allocation.handle, callers)
    for system in systems:
        system.stop()
    net.close()


def test_denial_matrix(world: World) -> None:
    found: dict[str, tuple[str, ...]] = {}
    for name, caller in world.callers.items():
        found[name] = (
            caller.call(world.root, PUBLIC),
            caller.call(world.root, OWNER),
            caller.call(world.root, MARKET),
            caller.call(world.allocation, SESSION),
        )
    wrong = {
        f"{name} x {CLASSES[i]}": (found[name][i], want[i])
        for name, want in EXPECTED.items()
        for i in range(4)
        if found[name][i] != want[i]
    }
    assert not wrong, wrong
    # Every refusal was counted by its code, and none went unanswered.
    assert world.target.refusals[ErrorCode.FORBIDDEN] >= sum(
        cell not in (OK, "not_requester") for row in found.values() for cell in row
    )


def test_the_marketplace_is_open_under_the_open_policy(world: World) -> None:
    world.target.policy.deployment_policy = "open"
    stranger = world.callers["no token"]
    assert stranger.call(world.root, MARKET) == OK
    assert stranger.call(world.root, OWNER) == "no_token"


def test_a_denial_names_the_capability_and_the_rule(world: World) -> None:
    caller = world.callers["expired"]
    me = Handle(id=caller.identity.public_key,
                address=Address(host=caller.system.peer_id, inbox=ROOT_INBOX))  # fmt: skip
    env = make_envelope(me, me.id, MARKET, None, to=world.root, ttl_s=5, expect_reply=True,
                        caps=caller.caps)  # fmt: skip
    with pytest.raises(RemoteError) as info:
        caller.system.invoke_frame(seal(env, caller.identity), env, 5).result(6)
    err = info.value
    assert (err.code, err.rule) == ("forbidden", "expired")
    assert err.reason.startswith(f"{caller.identity.did} lacks capability {MARKET}: expired: ")
    assert "expired at" in err.reason
