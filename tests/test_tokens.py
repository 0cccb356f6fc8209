"""Capability tokens: the format, each rule with its reason code, the cache, revocations,
anchors, and the tokens outgoing envelopes carry."""

from __future__ import annotations

import time
from typing import Any

import msgpack
import pytest

from dms.actor.policy import Role
from dms.actor.wallet import Wallet
from dms.security import Identity
from dms.security.tokens import (
    MAX_CHAIN,
    Action,
    ChainVerifier,
    OverBudget,
    Rule,
    Scope,
    TokenError,
    check_use,
    covers,
    decode,
    from_text,
    grants,
    intersect,
    issue,
    revoke,
    to_text,
    verify_revocation,
)
from dms.security.trust import TrustLimits, TrustStore

HOUR = 3600


# One expiry for every token that takes the default: a child issued a second after
# its parent, across a clock second, must not outlive it (a CI failure).
_AN_HOUR_AFTER_IMPORT = int(time.time() + HOUR)


def later(s: float | None = None) -> int:
    return _AN_HOUR_AFTER_IMPORT if s is None else int(time.time() + s)


def rule_of(fn) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(TokenError) as info:
        fn()
    return str(info.value.rule)


@pytest.fixture
def keys() -> dict[str, Identity]:
    return {name: Identity.generate() for name in ("a", "b", "c", "d", "s")}


def test_paths_imply_what_is_below_them() -> None:
    assert covers("/", "/dms/node/peers/list")
    assert covers("/dms/node", "/dms/node/peers/list")
    assert covers("/dms/node", "/dms/node")
    assert not covers("/dms/node", "/dms/nodes")
    assert not covers("/dms/node/peers", "/dms/node")
    assert intersect(("/dms",), ("/dms/deployment", "/x")) == ("/dms/deployment",)
    assert intersect(("/dms/deployment", "/dms/allocation"), ("/dms/deployment/update",)) == (
        "/dms/deployment/update",
    )


def test_a_token_round_trips_and_its_encoding_is_canonical(keys) -> None:  # type: ignore[no-untyped-def]
    a, b = keys["a"], keys["b"]
    tok = issue(a, b.public_key, ["/dms/deployment"], expires_at=later(), topics=["/t"], depth=1)
    assert decode(tok.raw) == tok
    assert from_text(to_text(tok.raw)) == tok.raw and tok.text.startswith("dmscap1")
    fields = msgpack.unpackb(msgpack.unpackb(tok.raw)[0])
    assert list(fields) == sorted(fields)  # sorted keys: one encoding per token
    assert tok.sub == b.public_key and tok.act == Action.DELEGATE
    info = tok.describe()
    assert info["iss"] == a.did and info["aud"] == b.did and info["cap"] == ["/dms/deployment"]


def test_garbage_is_malformed(keys) -> None:  # type: ignore[no-untyped-def]
    assert rule_of(lambda: decode(b"\x93\x01\x02\x03")) == Rule.MALFORMED
    assert rule_of(lambda: from_text("hello")) == Rule.MALFORMED
    tok = issue(keys["a"], keys["b"].public_key, ["/x"], expires_at=later())
    body, sig = msgpack.unpackb(tok.raw)
    fields = msgpack.unpackb(body)
    fields["extra"] = 1
    bad = msgpack.packb([msgpack.packb(fields), sig])
    assert rule_of(lambda: decode(bad)) == Rule.MALFORMED


def test_each_intrinsic_rule_has_its_code(keys) -> None:  # type: ignore[no-untyped-def]
    a, b, c, d = keys["a"], keys["b"], keys["c"], keys["d"]
    v = ChainVerifier()
    root = issue(a, b.public_key, ["/dms/deployment"], expires_at=later(), depth=1)
    good = issue(
        b, c.public_key, ["/dms/deployment/request"], expires_at=later(), proofs=[root.raw]
    )
    assert v.verify(good.raw).length == 2 and v.verify(good.raw).root == a.public_key

    body, sig = msgpack.unpackb(root.raw)
    tampered = msgpack.packb([body, bytes([sig[0] ^ 1]) + sig[1:]])
    assert rule_of(lambda: v.verify(tampered)) == Rule.BAD_SIGNATURE
    under_tampered = issue(b, c.public_key, ["/dms/deployment"], expires_at=later(),
                           proofs=[tampered])  # fmt: skip
    assert rule_of(lambda: v.verify(under_tampered.raw)) == Rule.BAD_SIGNATURE

    outlives = issue(b, c.public_key, ["/dms/deployment"], expires_at=later(2 * HOUR),
                     proofs=[root.raw])  # fmt: skip
    assert rule_of(lambda: v.verify(outlives.raw)) == Rule.OUTLIVES_PARENT

    stranger = issue(d, c.public_key, ["/dms/deployment"], expires_at=later(), proofs=[root.raw])
    assert rule_of(lambda: v.verify(stranger.raw)) == Rule.BROKEN_CHAIN

    wider = issue(b, c.public_key, ["/dms"], expires_at=later(), proofs=[root.raw])
    assert rule_of(lambda: v.verify(wider.raw)) == Rule.WIDENED
    topics = issue(b, c.public_key, ["/dms/deployment"], topics=["/t"], expires_at=later(),
                   proofs=[root.raw])  # fmt: skip
    assert rule_of(lambda: v.verify(topics.raw)) == Rule.WIDENED

    invoke = issue(a, b.public_key, ["/dms"], act=Action.INVOKE, expires_at=later(), depth=3)
    below_invoke = issue(b, c.public_key, ["/dms"], expires_at=later(), proofs=[invoke.raw])
    assert rule_of(lambda: v.verify(below_invoke.raw)) == Rule.NOT_DELEGATION

    flat = issue(a, b.public_key, ["/dms"], expires_at=later(), depth=0)
    once = issue(b, c.public_key, ["/dms"], expires_at=later(), proofs=[flat.raw])
    assert not v.verify(once.raw).depth_ok  # usable only as an actor certificate (below)
    twice = issue(c, d.public_key, ["/dms"], expires_at=later(), proofs=[once.raw])
    assert rule_of(lambda: v.verify(twice.raw)) == Rule.DEPTH_EXCEEDED
    two = issue(a, b.public_key, ["/dms"], expires_at=later(), depth=2)
    greedy = issue(b, c.public_key, ["/dms"], expires_at=later(), depth=5, proofs=[two.raw])
    assert not v.verify(greedy.raw).depth_ok

    revocation = revoke(a, v.verify(root.raw))
    assert rule_of(lambda: v.verify(revocation.raw)) == Rule.MALFORMED


def test_a_chain_has_at_most_max_chain_tokens(keys) -> None:  # type: ignore[no-untyped-def]
    people = [Identity.generate() for _ in range(MAX_CHAIN + 2)]
    raw = issue(people[0], people[1].public_key, ["/"], expires_at=later(), depth=16).raw
    chains = [raw]
    for i in range(1, MAX_CHAIN + 1):
        depth = 16 - i
        raw = issue(people[i], people[i + 1].public_key, ["/"], expires_at=later(),
                    depth=depth, proofs=[raw]).raw  # fmt: skip
        chains.append(raw)
    v = ChainVerifier()
    assert v.verify(chains[MAX_CHAIN - 1]).length == MAX_CHAIN
    assert rule_of(lambda: v.verify(chains[MAX_CHAIN])) == Rule.DEPTH_EXCEEDED
    fresh = ChainVerifier()  # a too-long chain first does not poison its parents
    assert rule_of(lambda: fresh.verify(chains[MAX_CHAIN])) == Rule.DEPTH_EXCEEDED
    assert fresh.verify(chains[MAX_CHAIN - 1]).length == MAX_CHAIN


def test_use_checks_expiry_revocation_anchor_audience_and_grant(keys) -> None:  # type: ignore[no-untyped-def]
    a, b, c = keys["a"], keys["b"], keys["c"]
    v = ChainVerifier()
    full = [Scope(("/",), ("/",))]
    tok = issue(a, b.public_key, ["/dms/deployment"], topics=["/dms/deployment"],
                expires_at=later())  # fmt: skip
    chain = v.verify(tok.raw)
    now = time.time()
    use = dict(signer=b.public_key, host_key=None, now=now, revoked=set(), scopes=full)
    check_use(chain, **use)  # type: ignore[arg-type]
    assert rule_of(lambda: check_use(chain, **{**use, "now": now + 2 * HOUR})) == Rule.EXPIRED  # type: ignore[arg-type]
    assert rule_of(lambda: check_use(chain, **{**use, "revoked": {tok.id}})) == Rule.REVOKED  # type: ignore[arg-type]
    assert rule_of(lambda: check_use(chain, **{**use, "scopes": None})) == Rule.UNANCHORED  # type: ignore[arg-type]
    wrong = {**use, "signer": c.public_key}
    assert rule_of(lambda: check_use(chain, **wrong)) == Rule.WRONG_AUDIENCE  # type: ignore[arg-type]
    assert grants(chain, "/dms/deployment/request", None, full) is None
    assert grants(chain, "/dms/deployment/request", "/dms/deployment", full) is None
    refused = grants(chain, "/dms/node/peers/list", None, full)
    assert refused is not None and refused.rule == Rule.NOT_GRANTED
    narrow = [Scope(("/dms/deployment/bid",), ())]
    refused = grants(chain, "/dms/deployment/request", None, narrow)
    assert refused is not None and refused.rule == Rule.NOT_GRANTED
    invoke = v.verify(issue(a, b.public_key, ["/x"], act=Action.INVOKE, expires_at=later()).raw)
    refused = grants(invoke, "/x", "/x", full)  # an invoke token does not broadcast
    assert refused is not None and refused.rule == Rule.NOT_GRANTED


def test_an_actor_certificate_is_no_delegation_to_count(keys) -> None:  # type: ignore[no-untyped-def]
    """A node's token to its own actor (the envelope comes from that node's host) may
    sit below a depth-0 grant; the same link to another principal may not."""
    a, b, child = keys["a"], keys["b"], keys["c"]
    v = ChainVerifier()
    grant = issue(a, b.public_key, ["/dms/deployment"], expires_at=later(), depth=0)
    cert = v.verify(issue(b, child.public_key, ["/dms/deployment/update"], expires_at=later(),
                          proofs=[grant.raw]).raw)  # fmt: skip
    full = [Scope(("/",), ("/",))]
    use = dict(signer=child.public_key, now=time.time(), revoked=set(), scopes=full)
    check_use(cert, host_key=b.public_key, **use)  # type: ignore[arg-type]
    assert rule_of(lambda: check_use(cert, host_key=a.public_key, **use)) == Rule.DEPTH_EXCEEDED  # type: ignore[arg-type]


def test_the_cache_makes_a_repeated_chain_one_lookup(keys) -> None:  # type: ignore[no-untyped-def]
    a, b, c, d = keys["a"], keys["b"], keys["c"], keys["d"]
    v = ChainVerifier()
    t1 = issue(a, b.public_key, ["/"], expires_at=later(), depth=2)
    t2 = issue(b, c.public_key, ["/"], expires_at=later(), depth=1, proofs=[t1.raw])
    t3 = issue(c, d.public_key, ["/"], expires_at=later(), proofs=[t2.raw])
    assert v.verify(t3.raw).length == 3
    misses = v.misses
    for _ in range(100):
        v.verify(t3.raw)
    assert v.misses == misses  # no signature checked again
    t3b = issue(c, d.public_key, ["/x"], expires_at=later(), proofs=[t2.raw])
    v.verify(t3b.raw)
    assert v.misses == misses + 1  # a new leaf on a known chain: one check
    bad = t3.raw[:-1] + bytes([t3.raw[-1] ^ 1])
    assert rule_of(lambda: v.verify(bad)) == Rule.BAD_SIGNATURE
    assert rule_of(lambda: v.verify(bad)) == Rule.BAD_SIGNATURE  # failures are cached too
    assert v.misses == misses + 2


def test_revocation_is_signed_by_an_issuer_of_the_chain(keys) -> None:  # type: ignore[no-untyped-def]
    a, b, c, s = keys["a"], keys["b"], keys["c"], keys["s"]
    v = ChainVerifier()
    t1 = issue(a, b.public_key, ["/"], expires_at=later(), depth=1)
    t2 = v.verify(issue(b, c.public_key, ["/"], expires_at=later(), proofs=[t1.raw]).raw)
    for revoker in (a, b):  # the issuer, or one above it
        rev = verify_revocation(v, revoke(revoker, t2).raw)
        assert rev.revoked_id == t2.token.id and rev.token.exp == t2.exp
    assert rule_of(lambda: revoke(s, t2)) == Rule.BROKEN_CHAIN
    forged = issue(s, s.public_key, [], act=Action.REVOKE, expires_at=later(), proofs=[t2.raw])
    assert rule_of(lambda: verify_revocation(v, forged.raw)) == Rule.BROKEN_CHAIN


def test_trust_store_anchors_scopes_and_revocations(tmp_path, keys) -> None:  # type: ignore[no-untyped-def]
    node, founder, other, s = keys["a"], keys["b"], keys["c"], keys["s"]
    trust = TrustStore.for_context(tmp_path, "dms", node.public_key)
    assert trust.scopes(node.public_key) is not None  # the node itself
    assert trust.scopes(founder.public_key) is None
    grant = issue(founder, node.public_key, ["/dms/deployment"], topics=["/dms/deployment"],
                  expires_at=later())  # fmt: skip
    trust.anchor(grant.raw, "provide")
    trust.anchor(grant.raw, "require")
    scopes = trust.scopes(founder.public_key)
    assert scopes == [Scope(("/dms/deployment",), ("/dms/deployment",))]
    assert [c.token.id for c in trust.provide()] == [grant.id]
    # Another member's token from the same founder is anchored here through it.
    member = trust.verifier.verify(
        issue(founder, other.public_key, ["/dms/deployment"], expires_at=later()).raw
    )
    # A stranger's revocation is refused; the founder's is stored, and survives a reload.
    refused = trust.add_revocation(
        issue(s, s.public_key, [], act=Action.REVOKE, expires_at=later(), proofs=[member.raw]).raw
    )
    assert not refused.stored and "broken_chain" in refused.reason
    gen = trust.generation
    outcome = trust.add_revocation(revoke(founder, member).raw)
    assert outcome.stored and trust.is_revoked(member.token.id) and trust.generation > gen
    assert not trust.add_revocation(revoke(founder, member).raw).stored  # already
    # A revocation of a chain nobody here trusts is not kept (bounded storage).
    unrelated = trust.verifier.verify(issue(s, other.public_key, ["/"], expires_at=later()).raw)
    assert not trust.add_revocation(revoke(s, unrelated).raw).stored
    again = TrustStore.for_context(tmp_path, "dms", node.public_key)
    assert again.is_revoked(member.token.id)
    assert again.scopes(founder.public_key) == scopes
    listing = again.listing()
    assert listing["tokens"][0]["kind"] == "require+provide"
    assert listing["revoked"][0]["id"] == member.token.id.hex()
    # Revoking the require anchor itself withdraws the founder's authority.
    again.add_revocation(revoke(founder, again.verifier.verify(grant.raw)).raw)
    assert again.scopes(founder.public_key) is None
    assert again.remove(grant.id) == ["require", "provide"]


def test_the_wallet_shows_provide_tokens_and_actor_certificates(keys) -> None:  # type: ignore[no-untyped-def]
    node, founder, child = keys["a"], keys["b"], keys["c"]
    trust = TrustStore(None, node.public_key)
    roles = {child.public_key: Role(caps=("/dms/deployment",), topics=("/dms/deployment",))}
    wallet = Wallet(node, trust, roles.get)
    founder_host = founder.peer_id
    assert wallet.tokens_for(node.public_key, founder_host, "/dms/deployment/request") == []
    grant = issue(founder, node.public_key, ["/dms/deployment"], topics=["/dms/deployment"],
                  expires_at=later())  # fmt: skip
    trust.anchor(grant.raw, "provide")
    assert wallet.tokens_for(node.public_key, founder_host, "/dms/deployment/request") == [
        grant.raw
    ]
    assert wallet.tokens_for(node.public_key, founder_host, "/dms/node/peers/list") == []
    assert wallet.tokens_for(node.public_key, node.peer_id, "/dms/deployment/request") == []
    shown = wallet.tokens_for(child.public_key, founder_host, "/dms/deployment/request")
    chains = [trust.verifier.verify(raw) for raw in shown]
    assert chains[0].root == founder.public_key  # rooted at the destination's node first
    assert {c.root for c in chains} == {founder.public_key, node.public_key}
    assert all(c.token.aud == child.public_key for c in chains)
    assert wallet.tokens_for(child.public_key, founder_host, "/dms/deployment/request") == shown
    broadcast = wallet.tokens_for(child.public_key, None, "/dms/deployment/request",
                                  "/dms/deployment")  # fmt: skip
    assert len(broadcast) == 2
    assert wallet.tokens_for(child.public_key, founder_host, "/dms/node/peers/list") == []
    trust.add_revocation(revoke(founder, trust.verifier.verify(grant.raw)).raw)
    after = wallet.tokens_for(child.public_key, founder_host, "/dms/deployment/request")
    assert [trust.verifier.verify(r).root for r in after] == [node.public_key]
    assert wallet.tokens_for(node.public_key, founder_host, "/dms/deployment/request") == []


def test_an_actor_certificate_rooted_at_the_node_is_kept_without_checking_its_signature(
    keys, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """The node signs a certificate for its actor and keeps its chain as verified: no
    signature of its own is checked back (one a deployment or an allocation, each a new
    actor), and the chain is what a verification would give, cached alike."""
    import dms.security.tokens as tokens

    node, peer, child = keys["a"], keys["b"], keys["c"]
    trust = TrustStore(None, node.public_key)
    roles = {child.public_key: Role(caps=("/dms/deployment",), topics=("/dms/deployment",))}
    wallet = Wallet(node, trust, roles.get)
    checked = []
    real = tokens.verify_signature
    monkeypatch.setattr(tokens, "verify_signature", lambda *a: checked.append(1) or real(*a))
    shown = wallet.tokens_for(child.public_key, peer.peer_id, "/dms/deployment/request")
    assert len(shown) == 1 and checked == []
    assert wallet.tokens_for(child.public_key, peer.peer_id, "/dms/deployment/revert") == shown
    chain = trust.verifier.verify(shown[0])  # cached: no check either
    assert checked == []
    assert ChainVerifier().verify(shown[0]) == chain  # what a verification gives
    assert checked == [1]
    assert chain.root == node.public_key and chain.token.aud == child.public_key
    assert trust.verifier.is_known(chain.token.id)
    below = issue(node, child.public_key, ["/"], expires_at=later(), proofs=[shown[0]])
    with pytest.raises(ValueError):  # a token with a parent is verified, never taken so
        trust.verifier.signed(below)


def test_a_long_chain_is_refused_before_any_signature_is_checked(keys) -> None:  # type: ignore[no-untyped-def]
    """A chain of 9 whose every signature is bad: its length is the reason, found by
    decoding alone (before, each token's signature was checked on the way down)."""
    people = [Identity.generate() for _ in range(MAX_CHAIN + 2)]
    raw = b""
    for i in range(MAX_CHAIN + 1):
        tok = issue(people[i], people[i + 1].public_key, ["/"], expires_at=later(),
                    depth=16 - i, proofs=[raw] if raw else [])  # fmt: skip
        body, _ = msgpack.unpackb(tok.raw)
        raw = msgpack.packb([body, b"\x00" * 64])  # not signed
    v = ChainVerifier()
    charged = []
    assert rule_of(lambda: v.verify(raw, lambda: charged.append(1))) == Rule.DEPTH_EXCEEDED
    assert charged == []  # no budget taken either
    huge = b"\x92" + b"\xc6" + (20_000).to_bytes(4, "big") + b"x" * 20_000 + b"\xc4\x40" + b"s" * 64
    assert rule_of(lambda: v.verify(huge)) == Rule.TOO_LARGE


def test_over_budget_is_not_remembered_against_the_chain(keys) -> None:  # type: ignore[no-untyped-def]
    a, b = keys["a"], keys["b"]
    tok = issue(a, b.public_key, ["/"], expires_at=later())
    v = ChainVerifier()

    def spent() -> None:
        raise OverBudget("over this node's budget")

    assert rule_of(lambda: v.verify(tok.raw, spent)) == Rule.OVER_BUDGET
    assert v.verify(tok.raw, lambda: None).token.id == tok.id  # budget back: verified
    assert v.verify(tok.raw, spent).token.id == tok.id  # and cached: no budget taken
    assert v.is_known(tok.id)


def test_junk_revocations_cannot_crowd_out_a_real_one(tmp_path, keys) -> None:  # type: ignore[no-untyped-def]
    """Before, the store took the first 10,000 revocations of anything anchored here
    and refused the next: a member's junk made a real revocation be dropped."""
    node, founder, member = keys["a"], keys["b"], keys["c"]
    extra = [Identity.generate() for _ in range(4)]
    limits = TrustLimits(max_revocations=10, revocations_per_issuer=3)
    trust = TrustStore.for_context(tmp_path, "dms", node.public_key, limits)
    ticket = issue(founder, node.public_key, ["/dms/deployment"], topics=["/dms/deployment"],
                   expires_at=later())  # fmt: skip
    trust.anchor_token(ticket.raw, "provide")  # joins the founder's group
    tokens = {  # the members' tokens, seen here
        who.did: trust.verifier.verify(
            issue(founder, who.public_key, ["/dms/deployment"], expires_at=later(), depth=1).raw
        )
        for who in (member, *extra)
    }

    def below(who: Identity, seen: bool = True) -> Any:
        raw = issue(who, Identity.generate().public_key, ["/dms/deployment"],
                    expires_at=later(), proofs=[tokens[who.did].raw]).raw  # fmt: skip
        return trust.verifier.verify(raw) if seen else ChainVerifier().verify(raw)

    # Tokens this node never saw: not kept, and no signature is checked for them.
    misses = trust.verifier.misses
    unseen = [trust.add_revocation(revoke(member, below(member, seen=False)).raw)
              for _ in range(20)]  # fmt: skip
    assert {o.outcome for o in unseen} == {"unknown_token"} and trust.revocations() == []
    assert trust.verifier.misses == misses
    # Seen ones: at most revocations_per_issuer per revoking key.
    outcomes = [trust.add_revocation(revoke(member, below(member)).raw).outcome
                for _ in range(5)]  # fmt: skip
    assert outcomes == ["stored"] * 3 + ["issuer_full"] * 2
    # Every key its share, up to max_revocations in all; none stored is pushed out.
    held = [trust.add_revocation(revoke(w, below(w)).raw).outcome for w in extra for _ in "ab"]
    assert held.count("stored") == 7 and held.count("store_full") == 1, held
    before = set(trust.revocations())
    # The founder (an authority here) revokes the member: stored past both limits.
    real = trust.add_revocation(revoke(founder, tokens[member.did]).raw)
    assert real.stored and trust.is_revoked(tokens[member.did].token.id)
    assert before <= set(trust.revocations())
    again = TrustStore.for_context(tmp_path, "dms", node.public_key, limits)
    assert again.is_revoked(tokens[member.did].token.id) and len(again.revocations()) == 11
