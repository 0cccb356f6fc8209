"""What any peer may ask a node: hello, its status, and the broadcast hellos it heard.

A role of :class:`dms.node.node.NodeActor` (:class:`Public`).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from pydantic import BaseModel, Field

from dms import __version__
from dms.actor import Request, behaviour
from dms.actor.runtime import NodeRuntime
from dms.network.host import Libp2pTransport

BROADCAST_TOPIC = "/dms/broadcast"
HELLO_MEMORY = 64


class HelloPayload(BaseModel):
    message: str = Field(default="hello", max_length=1024)


class Public:
    """The node's public behaviours; ``network``: the libp2p host, if any."""

    def __init__(self, node: NodeRuntime, network: Libp2pTransport | None = None) -> None:
        self.node = node
        self.network = network
        self.started = time.monotonic()
        self.hellos: deque[dict[str, Any]] = deque(maxlen=HELLO_MEMORY)

    def start(self) -> None:
        self.node.subscribe(BROADCAST_TOPIC)

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started

    @behaviour("/public/hello", public=True)
    def hello(self, request: Request) -> dict[str, Any]:
        return {
            "message": "hello",
            "did": self.node.identity.did,
            "peer_id": self.node.system.peer_id,
        }

    @behaviour("/public/status", public=True)
    def status(self, request: Request) -> dict[str, Any]:
        network = self.network
        return {
            "status": "running",
            "did": self.node.identity.did,
            "peer_id": self.node.system.peer_id,
            "version": __version__,
            "uptime_s": round(self.uptime_s, 3),
            "peers": len(network.peers()) if network else 0,
            # publicly reachable, or behind NAT (then reached through relays)
            "reachability": str(network.reachability()) if network else "unknown",
            "relay": network.serves_relay() if network else False,
        }

    @behaviour("/broadcast/hello", public=True, payload=HelloPayload, topic=BROADCAST_TOPIC)
    def broadcast_hello(self, request: Request) -> None:
        payload: HelloPayload = request.payload
        self.hellos.append(
            {"from": request.sender.did, "message": payload.message, "at": time.time()}
        )

    @behaviour("/public/hellos", public=True)
    def hellos_heard(self, request: Request) -> list[dict[str, Any]]:
        """The last broadcast hellos this node heard, oldest first."""
        return list(self.hellos)
