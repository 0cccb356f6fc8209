"""Issue 17, item 2 (reflection): a refusal is answered only to the host that sent the
frame, so a frame naming a third party as its sender cannot make a node answer it."""

from __future__ import annotations

import logging

import pytest

from dms.actor import ROOT_INBOX, Address, ErrorCode, Handle, make_envelope, seal
from dms.node.client import root_handle
from dms.sim.cluster import LocalCluster
from tests.adversarial.hostile import send
from tests.conftest import wait_for


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
    with caplog.at_level(logging.WARNING, logger="dms.actor"):
        send(attacker, victim, frame)
        wait_for(
            lambda: (
                victim.system is not None
                and victim.system.refusals[ErrorCode.WRONG_SIGNER] > before
            ),
            what="the victim's refusal",
        )
    assert any("not answered" in r.getMessage() for r in caplog.records)
