"""A hostile peer: a real dms node on loopback whose key signs whatever it likes.

Frames are built with our own envelope code (or by hand) and leave through the
attacker's real py-libp2p host, so the victim sees them exactly as it would see
them from any peer on the network.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from dms.actor import Envelope, Handle, RemoteError, make_envelope, seal
from dms.node.client import root_handle
from dms.node.daemon import Node
from dms.security import Identity
from dms.sim import adversary
from tests.conftest import wait_for


def me(attacker: Node) -> Handle:
    return adversary.root_of(attacker.identity)


def envelope(
    attacker: Node,
    behaviour: str,
    payload: Any = None,
    *,
    to: Node | None = None,
    topic: str | None = None,
    expect_reply: bool = False,
    ttl_s: float = 20.0,
) -> Envelope:
    """An envelope from the attacker's root actor, correctly signed by its node key."""
    return make_envelope(
        me(attacker),
        attacker.identity.public_key,
        behaviour,
        payload,
        to=root_handle(to.peer_id) if to is not None else None,
        ttl_s=ttl_s,
        expect_reply=expect_reply,
        topic=topic,
    )


def frame_of(attacker: Node, env: Envelope) -> bytes:
    return seal(env, attacker.identity)


def send(attacker: Node, victim: Node, frame: bytes) -> None:
    """Over the attacker's real libp2p stream to the victim (u32-prefixed frames)."""
    assert attacker.transport is not None
    attacker.transport.send(victim.peer_id, frame)


def publish(attacker: Node, topic: str, frame: bytes) -> None:
    """On gossipsub only (the attacker's own actors do not see it)."""
    assert attacker.transport is not None
    attacker.transport.publish(topic, frame)


def refusals(node: Node, code: str) -> int:
    assert node.system is not None
    return node.system.refusals[code]


def until_refused(victim: Node, code: str, attempt: Callable[[], None], what: str) -> None:
    """Repeat ``attempt`` (a fresh envelope each time) until the victim counts ``code``:
    gossip reaches a new subscriber only once the topic's mesh has formed."""
    before = refusals(victim, code)
    last = [0.0]

    def refused() -> bool:
        if refusals(victim, code) > before:
            return True
        if time.monotonic() - last[0] >= 0.5:
            last[0] = time.monotonic()
            attempt()
        return False

    wait_for(refused, timeout=40, what=what)


def with_payload_bytes(key: Identity, env: Envelope, payload: bytes) -> bytes:
    """A frame for ``env`` whose payload is ``payload`` as given (any bytes, even
    undecodable), correctly signed by ``key``."""
    return adversary.with_payload_bytes(key, env, payload)


def refusal_code(attacker: Node, frame: bytes, env: Envelope, timeout: float = 20.0) -> str:
    """Send a request frame from the attacker and return the code of the victim's refusal."""
    assert attacker.system is not None
    future = attacker.system.invoke_frame(frame, env, timeout)
    try:
        result = future.result(timeout + 5)
    except RemoteError as err:
        return err.code
    raise AssertionError(f"the victim accepted it: {result!r}")
