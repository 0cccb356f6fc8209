"""The node actor: the root actor of a node, at inbox ``root`` with the node's key.

It answers the public behaviours any peer may call and the ``/dms/node/*``
behaviours its owner (the root-anchored user key) calls through the CLI. The
behaviours are grouped by purpose into mixins: peers and heartbeats
(``dms.node.peering``), placement as provider (``dms.node.bidding``) and as
requester (``dms.node.deploying``), mining sessions (``dms.node.mining``),
onboarding, resources and hardware (``dms.node.provider``), capability anchors and
revocations (``dms.node.caps``). Slow work runs on a worker pool and answers
through ``Request.defer``, so the node's mailbox never stalls.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from pydantic import BaseModel, Field

from dms import __version__
from dms.actor import ActorContext, Request, behaviour
from dms.node.bidding import Bidding
from dms.node.caps import Capabilities
from dms.node.chunks import open_courier
from dms.node.collab import CollabBehaviours
from dms.node.deploying import DeployingBehaviours
from dms.node.heartbeat_sync import HeartbeatSync
from dms.node.mining import MiningBehaviours
from dms.node.peering import Peering
from dms.node.provider import Benchmark, Provider
from dms.node.services import NodeServices
from dms.store.retention import prune

log = logging.getLogger("dms.node")

BROADCAST_TOPIC = "/dms/broadcast"
HELLO_MEMORY = 64


class HelloPayload(BaseModel):
    message: str = Field(default="hello", max_length=1024)


class NodeActor(
    MiningBehaviours,
    CollabBehaviours,
    DeployingBehaviours,
):
    def __init__(self, context: ActorContext, services: NodeServices | None = None) -> None:
        super().__init__(context, services)
        self.started = time.monotonic()
        self.hellos: deque[dict[str, Any]] = deque(maxlen=HELLO_MEMORY)
        s = self.services
        db = s.onboarder.db if s.onboarder is not None else None
        self.courier = open_courier(s.home, s.network, s.chunk_network, s.chunk_quota)
        self.caps = Capabilities(self)
        benchmark = Benchmark(s.onboarder)
        self.bidding = Bidding(
            self,
            ledger=s.ledger,
            preferences=s.preferences,
            peer_table=s.peer_table,
            stakes=s.stakes,
            scores=benchmark.scores,
            courier=self.courier,
            db=db,
            bid_index=s.bid_index,
            labels=s.labels,
            max_bid_slots=s.max_bid_slots,
            bid_requests_per_s_total=s.bid_requests_per_s_total,
            bid_request_burst_total=s.bid_request_burst_total,
            unknown_share=s.unknown_share,
            orphan_s=s.orphan_s,
        )
        self.provider = Provider(
            self,
            benchmark=benchmark,
            changed=self.announce,
            released=self.bidding.allocations_released,
            onboarder=s.onboarder,
            ledger=s.ledger,
            home=s.home,
            expire_every_s=s.expire_every_s,
        )
        self.heartbeats = HeartbeatSync(self, s.peer_table, s.network)
        self.peering = Peering(
            self,
            peer_table=s.peer_table,
            heartbeats=self.heartbeats,
            summary=self.provider.resource_summary,
            network=s.network,
            peerbook=s.peerbook,
            heartbeat_s=s.heartbeat_s,
            heartbeat_budget_per_s=s.heartbeat_budget_per_s,
            remember_every_s=s.remember_every_s,
            peer_forget_s=s.peer_forget_s,
            labels=s.labels,
        )
        for role in (self.caps, self.provider, self.bidding, self.heartbeats, self.peering):
            self.route(role)

    def on_start(self) -> None:
        self.caps.start()  # first: the roles of the child actors the others start
        self.subscribe(BROADCAST_TOPIC)
        self.provider.start()
        self.start_collab()
        self.bidding.start()
        self.start_deploying()
        self.peering.start()
        self.call_later(self.services.prune_every_s, self._prune)

    def stopping(self) -> None:
        self.shutdown_pool()
        self.caps.stop()
        self.peering.stop()

    def _prune(self) -> None:
        """Rows of bids, events and ended leases older than ``retention_s`` go."""
        if self.services.db is not None:
            try:
                counts = prune(self.services.db, self.services.retention_s)
                if any(counts.values()):
                    log.info("pruned rows older than %g s: %s", self.services.retention_s, counts)
            except Exception as exc:  # a busy store: next time
                log.warning("could not prune old rows: %s", exc)
        self.call_later(self.services.prune_every_s, self._prune)

    def announce(self) -> None:
        """Tell peers about a change now (a heartbeat), not at the next tick."""
        self.peering.announce()

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started

    # ---- public --------------------------------------------------------------------

    @behaviour("/public/hello", public=True)
    def hello(self, request: Request) -> dict[str, Any]:
        return {"message": "hello", "did": self.identity.did, "peer_id": self.system.peer_id}

    @behaviour("/public/status", public=True)
    def status(self, request: Request) -> dict[str, Any]:
        network = self.services.network
        return {
            "status": "running",
            "did": self.identity.did,
            "peer_id": self.system.peer_id,
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
