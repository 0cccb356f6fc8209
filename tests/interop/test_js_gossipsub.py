"""Gossip with a reference implementation: js-libp2p's gossipsub 14, default settings.

Issue 17, item 1: a js-libp2p peer under its default policy (StrictSign) dialed a
dms node and subscribed to ``/dms/heartbeat``; in 20 s it heard nothing, because
dms published unsigned messages. Now dms signs every message with its host key:
the JS peer hears the heartbeats, its own publications reach the dms validator
(garbage is refused ``malformed`` and the node stays up; a dms envelope signed by
the peer's own key, under its own host, is a broadcast like any other).

Needs ``node`` and ``npm`` (the packages are installed here on first use, from
``package-lock.json``); skipped without them.
"""

from __future__ import annotations

import base64
import json
import queue
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dms.actor import ROOT_INBOX, Address, Handle, make_envelope, seal
from dms.network.peertable import HEARTBEAT_TOPIC
from dms.node.client import root_handle
from dms.node.node import BROADCAST_TOPIC
from dms.security import Identity
from dms.sim.cluster import LocalCluster
from tests.conftest import wait_for

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def js_ready() -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed for the js-libp2p peer")
    if not (HERE / "node_modules" / "@chainsafe" / "libp2p-gossipsub").exists():
        done = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            pytest.skip(f"npm ci failed: {done.stderr.strip()[-500:]}")


class JsPeer:
    """``gossip_peer.mjs`` in a process of its own; its events arrive as JSON lines."""

    def __init__(self, addr: str, topic: str, identity: Identity) -> None:
        self.proc = subprocess.Popen(
            ["node", str(HERE / "gossip_peer.mjs"), addr, topic, identity.private_bytes().hex()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                continue

    def heard(self, **match: Any) -> bool:
        while not self.events.empty():
            self.seen.append(self.events.get())
        return any(all(e.get(k) == v for k, v in match.items()) for e in self.seen)

    def publish(self, topic: str, data: bytes) -> None:
        assert self.proc.stdin is not None
        command = {"publish": topic, "data": base64.b64encode(data).decode()}
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write(json.dumps({"stop": True}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


@pytest.fixture
def js_peers() -> Iterator[list[JsPeer]]:
    peers: list[JsPeer] = []
    yield peers
    for peer in peers:
        peer.close()


def test_a_js_libp2p_peer_hears_dms_gossip_and_is_heard(
    js_ready: None, cluster: LocalCluster, js_peers: list[JsPeer]
) -> None:
    node, other = cluster.start(2)
    cluster.wait_linked()
    assert node.transport is not None and node.node is not None and other.node is not None
    identity = Identity.generate()
    peer = JsPeer(node.addrs()[0], HEARTBEAT_TOPIC, identity)
    js_peers.append(peer)
    wait_for(lambda: peer.heard(event="ready", peer=identity.peer_id), timeout=30, what="ready")

    # It learns the node's topics and hears its signed heartbeats.
    wait_for(
        lambda: peer.heard(event="subscription", peer=node.peer_id),
        timeout=30,
        what="the dms node's subscriptions at the JS peer",
    )
    wait_for(
        lambda: peer.heard(event="message", topic=HEARTBEAT_TOPIC, type="signed"),
        timeout=40,
        what="a heartbeat at the JS peer",
    )

    # Its publications reach the validator: garbage is refused with a reason.
    before = node.transport.refusals["malformed"]
    peer.publish(BROADCAST_TOPIC, b"not an envelope")
    wait_for(
        lambda: node.transport is not None and node.transport.refusals["malformed"] > before,
        timeout=30,
        what="the validator's refusal",
    )

    # A dms envelope signed by the JS peer's own key, under its own host, is a broadcast.
    me = Handle(id=identity.public_key, address=Address(host=identity.peer_id, inbox=ROOT_INBOX))
    env = make_envelope(
        me,
        identity.public_key,
        "/broadcast/hello",
        {"message": "from js-libp2p"},
        ttl_s=60,
        topic=BROADCAST_TOPIC,
    )
    peer.publish(BROADCAST_TOPIC, seal(env, identity))

    def hellos() -> list[str]:
        assert node.node is not None
        return [h["message"] for h in node.node.ask(node.node.handle, "/public/hellos")]

    wait_for(lambda: "from js-libp2p" in hellos(), timeout=30, what="the JS peer's hello")
    # The node stayed up.
    assert other.node.ask(root_handle(node.peer_id), "/public/hello")["peer_id"] == node.peer_id
