"""Item 3 of issue 17: verify before decode, with bounded decoding.

A frame costs its receiver what its payload decodes to. Before the rule, one
unsigned 16 MiB frame of nested empty maps cost a node about 1 GiB: the payload
was decoded before the signature or the size class was looked at, with no
limit on what it decoded to.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import msgpack
import psutil
import pytest

from dms.actor import Address, ErrorCode, Handle, Refusal, make_envelope
from dms.actor.envelope import MAX_PAYLOAD_ITEMS, unseal
from dms.node.client import root_handle
from dms.node.daemon import Node
from dms.security import Identity
from dms.sim.adversary import BarePeer
from dms.sim.cluster import LocalCluster
from tests.adversarial.hostile import envelope, frame_of, refusal_code, with_payload_bytes
from tests.clitools import Daemon, init_home_quick, side_by_side
from tests.conftest import wait_for

MIB = 1024 * 1024
UNDECODABLE = b"\xc1"  # never used by MessagePack: decoding it fails at once


@pytest.fixture
def pair(cluster: LocalCluster) -> tuple[Node, Node]:
    victim, attacker = cluster.start(2)
    cluster.wait_linked()
    return attacker, victim


def bomb(max_bytes: int) -> bytes:
    """Nested empty maps, at most ``max_bytes``: each byte decodes to ~70 bytes."""
    rows = max_bytes // 1003 - 1
    return msgpack.packb([[{}] * 1000] * rows)


def test_the_signature_is_checked_before_the_payload_is_decoded(
    pair: tuple[Node, Node],
) -> None:
    attacker, victim = pair
    env = envelope(attacker, "/public/hello", to=victim, expect_reply=True)
    signed = bytearray(frame_of(attacker, env))
    forged = bytes(signed[:-65] + UNDECODABLE + signed[-64:])  # the last payload byte
    # Decoded first, this was "malformed"; verified first, it is a bad signature.
    assert refusal_code(attacker, forged, env) == ErrorCode.BAD_SIGNATURE


def test_the_size_class_is_checked_before_the_payload_is_decoded(
    pair: tuple[Node, Node],
) -> None:
    attacker, victim = pair
    env = envelope(attacker, "/public/hello", to=victim, expect_reply=True)
    # Signed, 2 MiB (under the 16 MiB frame limit), for a control behaviour (1 MiB).
    frame = with_payload_bytes(attacker.identity, env, UNDECODABLE * (2 * MIB))
    assert refusal_code(attacker, frame, env) == ErrorCode.TOO_LARGE


def test_a_signed_decode_bomb_under_the_control_limit_is_refused(
    pair: tuple[Node, Node],
) -> None:
    attacker, victim = pair
    env = envelope(attacker, "/public/hello", to=victim, expect_reply=True)
    frame = with_payload_bytes(attacker.identity, env, bomb(MIB - 4096))
    assert len(frame) <= MIB
    assert refusal_code(attacker, frame, env) == ErrorCode.MALFORMED
    assert attacker.node is not None  # and the victim still answers
    hello = attacker.node.ask(root_handle(victim.peer_id), "/public/hello", timeout=10)
    assert hello["peer_id"] == victim.peer_id


def test_decoding_a_bomb_costs_bounded_memory() -> None:
    key = Identity.generate()
    me = Handle(id=key.public_key, address=Address(host=key.peer_id, inbox="root"))
    env = make_envelope(me, key.public_key, "/x", to=me, ttl_s=10)
    frame = with_payload_bytes(key, env, bomb(16 * MIB - 4096))  # the data limit
    tracemalloc.start()
    try:
        with pytest.raises(Refusal) as info:
            unseal(frame, 16 * MIB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.code == ErrorCode.MALFORMED
    assert f"more than {MAX_PAYLOAD_ITEMS} items" in info.value.reason
    # Unbounded, this frame decodes to about 1.1 GB.
    assert peak < 2 * len(frame) + 32 * MIB


def test_refused_16_mib_frames_leave_no_rss_behind_in_a_daemon(tmp_path: Path) -> None:
    """Three peers each send four signed 16 MiB frames to a control behaviour at once
    (refused ``too_large``, undecoded). Each was buffered whole, then freed; glibc's
    mmap threshold rose to 16 MiB with the first one freed, so the next ones came
    from its heaps and stayed in the daemon's RSS: +90 to +154 MB after, measured.
    A fixed threshold (``malloc_mmap_threshold_bytes``) gives them back."""
    home = tmp_path / "victim"
    init_home_quick(home)
    daemon = Daemon(home)
    peers: list[BarePeer] = []
    try:
        addr, to = daemon.info["addrs"][0], root_handle(daemon.info["peer_id"])
        process = psutil.Process(daemon.proc.pid)
        peers = [BarePeer(addr, actor=True) for _ in range(3)]
        for peer in peers:
            assert peer.ask(to, "/public/hello") is not None  # streams up, caches warm
        envs = {peer: [peer.envelope(to, "/public/hello", reply=True) for _ in range(4)]
                for peer in peers}  # fmt: skip
        junk = UNDECODABLE * (16 * MIB - 4096)  # under the 16 MiB data limit
        frames = {
            peer: [peer.with_payload_bytes(env, junk) for env in envs[peer]] for peer in peers
        }
        before = process.memory_info().rss
        # All at once, each peer on a thread of its own (a write that fails fails the test).
        side_by_side((lambda p=p: p.write(frames[p]) for p in peers), len(peers))
        assert all(peer.finish(to, 120) for peer in peers)  # every frame was read
        for peer in peers:
            assert peer.refusal_codes([env.nonce for env in envs[peer]]) == {"too_large": 4}
        wait_for(
            lambda: process.memory_info().rss - before < 24 * MIB,
            timeout=30,
            what="the daemon's RSS back within 24 MiB of before 192 MiB of refused frames",
        )
    finally:
        BarePeer.close_all(peers)
        daemon.stop()
