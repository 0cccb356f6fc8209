"""Hostile bytes on the actor protocol are refused and the node keeps answering."""

from __future__ import annotations

import os
import struct

import pytest
from libp2p.peer.id import ID

from dms.actor import ROOT_INBOX, Address, Handle, RemoteError, make_envelope, seal
from dms.network.host import ACTOR_PROTOCOL, Libp2pTransport
from dms.node.client import root_handle
from dms.node.daemon import Node
from dms.security import Identity
from dms.sim.cluster import LocalCluster
from tests.conftest import wait_for


def write_raw(attacker: Node, victim: Node, data: bytes) -> None:
    """Open a fresh actor stream to ``victim`` and write ``data`` on it, then close it."""
    transport = attacker.transport
    assert isinstance(transport, Libp2pTransport) and transport._host is not None
    host = transport._host

    async def go() -> None:
        stream = await host.new_stream(ID.from_base58(victim.peer_id), [ACTOR_PROTOCOL])
        await stream.write(data)
        await stream.close()

    transport._call(go)


def still_answers(attacker: Node, victim: Node) -> None:
    assert attacker.transport is not None and attacker.node is not None
    assert attacker.transport.ping(victim.peer_id) > 0
    hello = attacker.node.ask(root_handle(victim.peer_id), "/public/hello", timeout=10)
    assert hello["peer_id"] == victim.peer_id


@pytest.fixture
def pair(cluster: LocalCluster) -> tuple[Node, Node]:
    victim, attacker = cluster.start(2)
    wait_for(lambda: attacker.transport is not None and attacker.transport.peers(), what="link")
    return attacker, victim


def refused_streams(node: Node) -> int:
    assert node.transport is not None
    return node.transport.frames_refused


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(os.urandom(4096), id="random-bytes"),
        pytest.param(struct.pack(">I", 2 * 1024**3) + b"x" * 64, id="announces-2GiB"),
        pytest.param(struct.pack(">I", 1000) + b"x" * 10, id="truncated-frame"),
        pytest.param(b"\x00\x00", id="truncated-prefix"),
    ],
)
def test_bad_framing_is_refused(pair: tuple[Node, Node], data: bytes) -> None:
    attacker, victim = pair
    write_raw(attacker, victim, data)
    wait_for(lambda: refused_streams(victim) == 1, what="the stream to be refused")
    still_answers(attacker, victim)


def test_frame_that_is_not_an_envelope_is_dropped(pair: tuple[Node, Node]) -> None:
    attacker, victim = pair
    assert victim.system is not None
    write_raw(attacker, victim, struct.pack(">I", 100) + os.urandom(100))
    wait_for(lambda: victim.system is not None and victim.system.refusals["malformed"] == 1)
    still_answers(attacker, victim)


def test_bad_signature_is_refused_with_a_signed_error(pair: tuple[Node, Node]) -> None:
    attacker, victim = pair
    assert attacker.node is not None and attacker.system is not None
    env = attacker.node.envelope(
        "/public/hello", None, to=root_handle(victim.peer_id), expect_reply=True
    )
    frame = bytearray(attacker.node.seal(env))
    frame[-1] ^= 0xFF  # the last byte of the signature
    future = attacker.system.invoke_frame(bytes(frame), env, 10)
    with pytest.raises(RemoteError) as caught:
        future.result(11)
    assert caught.value.code == "bad_signature"
    still_answers(attacker, victim)


def test_envelope_signed_by_another_key_than_the_sending_peer(pair: tuple[Node, Node]) -> None:
    attacker, victim = pair
    assert attacker.system is not None
    impostor = Identity.generate()
    # Claims to be the attacker node's root actor but is signed by another key.
    claimed = Address(host=attacker.peer_id, inbox=ROOT_INBOX)
    sender = Handle(id=impostor.public_key, address=claimed)
    env = make_envelope(
        sender,
        impostor.public_key,
        "/public/hello",
        to=root_handle(victim.peer_id),
        ttl_s=10,
        expect_reply=True,
    )
    future = attacker.system.invoke_frame(seal(env, impostor), env, 10)
    with pytest.raises(RemoteError) as caught:
        future.result(11)
    assert caught.value.code == "wrong_signer"
    assert victim.system is not None and victim.system.refusals["wrong_signer"] == 1
    still_answers(attacker, victim)
