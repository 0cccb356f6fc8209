"""Issue 17, item 2 (reflection): nothing a peer sends makes a node send to a third party.

A refusal is answered only to the host that sent the frame, so a frame naming a
third party as its sender cannot make a node answer it; and a request that names
where its answers go (a bid request's or an allocate's ``reply_to``) may name only
an actor of the requester's own host."""

from __future__ import annotations

import logging

import pytest

from dms.actor import ROOT_INBOX, Address, ErrorCode, Handle, RemoteError, make_envelope, seal
from dms.node.client import root_handle
from dms.orchestrator.messages import ALLOCATE, COMMIT, DEPLOYMENT_TOPIC, REQUEST
from dms.sim.cluster import LocalCluster
from tests.adversarial.hostile import envelope, frame_of, publish, send, until_refused
from tests.adversarial.test_adversarial_leases import ask, bid_request
from tests.conftest import wait_for
from tests.test_orchestrator import providers


def test_a_refusal_is_not_answered_to_a_third_party(
    cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    victim, attacker, third = cluster.start(3)
    cluster.wait_linked()
    assert victim.system is not None and third.system is not None
    # Names the third node's root as its sender and asks for a reply, signed by the
    # attacker's key: the victim refuses it, and must not send the refusal to the third.
    third_root = Address(host=third.peer_id, inbox=ROOT_INBOX)
    claimed = Handle(id=third.identity.public_key, address=third_root)
    env = make_envelope(
        claimed,
        third.identity.public_key,
        "/public/hello",
        to=root_handle(victim.peer_id),
        ttl_s=20,
        expect_reply=True,
    )
    frame = seal(env, attacker.identity)  # not the third's signature
    before = victim.system.refusals[ErrorCode.WRONG_SIGNER]

    def refused() -> list[str]:
        said = [r.getMessage() for r in caplog.records]
        return [m for m in said if m.startswith("refused /public/hello ")]

    with caplog.at_level(logging.WARNING, logger="dms.actor"):
        send(attacker, victim, frame)
        # The refusal's log line, not its count: the victim counts a refusal before it
        # logs it, on the host's thread, and the count seen first left the line unwritten.
        wait_for(refused, what="the victim's refusal, logged")
    (line,) = refused()
    assert "not answered" in line and ErrorCode.WRONG_SIGNER in line
    assert victim.system.refusals[ErrorCode.WRONG_SIGNER] > before


def test_a_bid_request_cannot_send_bids_to_a_third_party(cluster: LocalCluster) -> None:
    """A gossip bid request names where its bids go (``reply_to``). Before, it could name
    any actor: one broadcast made every provider lease and send a bid to a third party."""
    attacker, third = cluster.add(), cluster.add()
    (victim,) = providers(cluster, 1)
    cluster.wait_linked()
    assert victim.ledger is not None and third.system is not None
    third_unknown = third.system.refusals[ErrorCode.UNKNOWN_BEHAVIOUR]

    def attempt() -> None:
        request = bid_request(1) | {"reply_to": root_handle(third.peer_id).model_dump()}
        env = envelope(attacker, REQUEST, request, topic=DEPLOYMENT_TOPIC)
        publish(attacker, DEPLOYMENT_TOPIC, frame_of(attacker, env))

    until_refused(victim, ErrorCode.FORBIDDEN, attempt, "forbidden at the victim")
    assert victim.ledger.live() == []  # nothing leased for it
    # Direct, the refusal is answered, with the reason.
    request = bid_request(1) | {"reply_to": root_handle(third.peer_id).model_dump()}
    env = envelope(attacker, REQUEST, request, to=victim, expect_reply=True)
    with pytest.raises(RemoteError) as refused:
        attacker.system.invoke_frame(frame_of(attacker, env), env, 10).result(15)  # type: ignore[union-attr]
    assert refused.value.code == ErrorCode.FORBIDDEN
    assert "reply_to must be an actor of the requester's host" in refused.value.reason
    assert victim.ledger.live() == []
    # The third party never heard of it (a bid to its root would be unknown_behaviour).
    assert third.system.refusals[ErrorCode.UNKNOWN_BEHAVIOUR] == third_unknown


def test_an_allocation_cannot_report_to_a_third_party(cluster: LocalCluster) -> None:
    attacker, third = cluster.add(), cluster.add()
    (victim,) = providers(cluster, 1)
    cluster.wait_linked()
    bid = ask(attacker, victim, REQUEST, bid_request(1))
    lease = bid["offers"][0]["lease_id"]
    ask(attacker, victim, COMMIT, {"deployment_id": "attack", "slot": "w.0", "lease_id": lease})
    third_root = root_handle(third.peer_id).model_dump()
    allocate = {"deployment_id": "attack", "slot": "w.0", "lease_id": lease,
                "executor": "compute", "reply_to": third_root}  # fmt: skip
    with pytest.raises(RemoteError) as refused:
        ask(attacker, victim, ALLOCATE, allocate)
    assert refused.value.code == ErrorCode.FORBIDDEN
    assert "an allocate's reply_to must be an actor of the requester's host" in (
        refused.value.reason
    )
