"""The node actor: the root actor of a node, at inbox ``root`` with the node's key.

It answers the public behaviours any peer may call, and the ``/dms/node/peers/*``
behaviours its owner (the root-anchored user key) calls through the CLI. Work
that waits on the network (ping, dial) runs on a small worker pool and answers
through ``Request.defer``, so the node's mailbox never stalls on a slow peer.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dms import __version__
from dms.actor import Actor, ActorContext, ErrorCode, Refusal, Request, behaviour
from dms.network.host import Libp2pTransport, NetworkError
from dms.network.peerbook import PeerBook

log = logging.getLogger("dms.node")

BROADCAST_TOPIC = "/dms/broadcast"
HELLO_MEMORY = 64


class PingPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    peer_id: str = Field(min_length=1)


class ConnectPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    address: str = Field(min_length=1, description="a multiaddr ending in /p2p/<peer id>")


class HelloPayload(BaseModel):
    message: str = Field(default="hello", max_length=1024)


class NodeActor(Actor):
    def __init__(
        self,
        context: ActorContext,
        network: Libp2pTransport | None = None,
        peerbook: PeerBook | None = None,
        remember_every_s: float = 30.0,
    ) -> None:
        super().__init__(context)
        self.network = network
        self.peerbook = peerbook
        self.started = time.monotonic()
        self.hellos: deque[dict[str, Any]] = deque(maxlen=HELLO_MEMORY)
        self._remember_every_s = remember_every_s
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dms-node-net")

    def on_start(self) -> None:
        self.subscribe(BROADCAST_TOPIC)
        if self.peerbook is not None and self.network is not None:
            self.call_later(1.0, self._remember_peers)

    def stopping(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._remember_peers(reschedule=False)

    # ---- public ------------------------------------------------------------------

    @behaviour("/public/hello", public=True)
    def hello(self, request: Request) -> dict[str, Any]:
        return {"message": "hello", "did": self.identity.did, "peer_id": self.system.peer_id}

    @behaviour("/public/status", public=True)
    def status(self, request: Request) -> dict[str, Any]:
        return {
            "status": "running",
            "did": self.identity.did,
            "peer_id": self.system.peer_id,
            "version": __version__,
            "uptime_s": round(self.uptime_s, 3),
            "peers": len(self.network.peers()) if self.network else 0,
        }

    @behaviour("/broadcast/hello", public=True, payload=HelloPayload)
    def broadcast_hello(self, request: Request) -> None:
        payload: HelloPayload = request.payload
        self.hellos.append(
            {"from": request.sender.did, "message": payload.message, "at": time.time()}
        )

    @behaviour("/public/hellos", public=True)
    def hellos_heard(self, request: Request) -> list[dict[str, Any]]:
        """The last broadcast hellos this node heard, oldest first."""
        return list(self.hellos)

    # ---- peers (owner) -----------------------------------------------------------

    @behaviour("/dms/node/peers/self")
    def peers_self(self, request: Request) -> dict[str, Any]:
        return {
            "peer_id": self.system.peer_id,
            "did": self.identity.did,
            "addrs": self._network().addrs(),
        }

    @behaviour("/dms/node/peers/list")
    def peers_list(self, request: Request) -> list[dict[str, Any]]:
        return [{"peer_id": p.peer_id, "addrs": p.addrs} for p in self._network().peers()]

    @behaviour("/dms/node/peers/ping", payload=PingPayload)
    def peers_ping(self, request: Request) -> None:
        peer_id = request.payload.peer_id
        network = self._network()
        self._in_background(
            request, lambda: {"peer_id": peer_id, "rtt_ms": round(network.ping(peer_id), 3)}
        )

    @behaviour("/dms/node/peers/connect", payload=ConnectPayload)
    def peers_connect(self, request: Request) -> None:
        address = request.payload.address
        network = self._network()
        self._in_background(request, lambda: {"peer_id": network.connect(address)})

    @behaviour("/dms/node/peers/dht")
    def peers_dht(self, request: Request) -> dict[str, Any]:
        peers = self._network().dht_peers()
        return {"size": len(peers), "peers": peers}

    @behaviour("/dms/node/peers/score")
    def peers_score(self, request: Request) -> list[dict[str, Any]]:
        scores = self._network().scores()
        return [{"peer_id": p, "score": s} for p, s in sorted(scores.items())]

    # ---- helpers -----------------------------------------------------------------

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started

    def _network(self) -> Libp2pTransport:
        if self.network is None:
            raise Refusal(ErrorCode.UNREACHABLE, "this node has no libp2p network")
        return self.network

    def _in_background(self, request: Request, work: Callable[[], Any]) -> None:
        responder = request.defer()

        def done(future: Future[Any]) -> None:
            try:
                responder.ok(future.result())
            except NetworkError as err:
                responder.fail(ErrorCode.UNREACHABLE, str(err))
            except Exception as exc:
                responder.fail(ErrorCode.HANDLER_ERROR, f"{type(exc).__name__}: {exc}")

        self._pool.submit(work).add_done_callback(done)

    def _remember_peers(self, reschedule: bool = True) -> None:
        if self.peerbook is None or self.network is None:
            return
        try:
            self.peerbook.remember(self.network.peers())
        except Exception as exc:  # the node outlives a busy or stopped store
            log.warning("could not record peers: %s", exc)
        if reschedule:
            self.call_later(self._remember_every_s, self._remember_peers)
