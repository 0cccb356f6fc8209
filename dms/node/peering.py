"""The node's peer behaviours: ``/dms/node/peers/*`` and the heartbeat it sends and hears.

A mixin of :class:`dms.node.node.NodeActor`; see ``specs/node.md`` for the
heartbeat format and timing, and ``dms.node.heartbeat_sync`` for heartbeats
passed on between peers.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dms.actor import ErrorCode, Refusal, Request, behaviour
from dms.actor.envelope import peek
from dms.network.host import Libp2pTransport
from dms.network.peertable import (
    DEADLINE_FACTOR,
    HEARTBEAT_BEHAVIOUR,
    HEARTBEAT_TOPIC,
    Heartbeat,
    PeerTable,
)
from dms.node.heartbeat_sync import HEARTBEAT_MAX_TTL_S, HeartbeatSync, SignedHeartbeat
from dms.security.identity import peer_id_from_public_key

log = logging.getLogger("dms.node")


class PingPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    peer_id: str = Field(min_length=1)


class ConnectPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    address: str = Field(min_length=1, description="a multiaddr ending in /p2p/<peer id>")


class PeeringBehaviours(HeartbeatSync):
    nonce: str = ""
    _beats: int = 0

    def start_peering(self) -> None:
        self.nonce = secrets.token_hex(8)  # new per process: peers see a restart
        self.start_heartbeat_sync()
        self.subscribe(HEARTBEAT_TOPIC)
        self.call_later(0.0, self._heartbeat)
        self.call_later(self.services.heartbeat_s / 2, self._sweep)
        if self.services.peerbook is not None and self.services.network is not None:
            self.call_later(1.0, self._remember_peers)

    def stop_peering(self) -> None:
        self._remember_peers(reschedule=False)
        try:  # best effort: peers that miss it find out at the deadline
            self._publish_heartbeat(leaving=True)
        except Exception as exc:
            log.debug("no leaving heartbeat: %s", exc)

    @property
    def peer_table(self) -> PeerTable:
        return self.services.peer_table

    # ---- heartbeat -----------------------------------------------------------------

    def heartbeat_interval(self) -> float:
        """``heartbeat_s``, stretched so the whole network sends at most
        ``heartbeat_budget_per_s`` heartbeats a second: each node's gossip load stays
        flat as the network grows (N / interval heartbeats reach every node). Only
        live peers count: a gone one sends nothing."""
        peers = len(self.peer_table.alive()) + 1
        return max(self.services.heartbeat_s, peers / self.services.heartbeat_budget_per_s)

    def heartbeat(self, leaving: bool = False) -> dict[str, Any]:
        interval = self.heartbeat_interval()
        beat: dict[str, Any] = {
            "nonce": self.nonce,
            "seq": self._beats,
            "interval_s": interval,
            "deadline_s": interval * DEADLINE_FACTOR,
            "load": round(os.getloadavg()[0] / (os.cpu_count() or 1), 3)
            if hasattr(os, "getloadavg")
            else 0.0,
            "leaving": leaving,
            "labels": self.services.labels,
            "addrs": self._listen_addrs(),
        }
        beat.update(self.resource_summary())
        self._beats += 1
        return beat

    def _listen_addrs(self) -> list[str]:
        network = self.services.network
        if network is None:
            return []
        try:
            return network.addrs()[:16]
        except Exception:  # a host still starting or stopping: the next beat has them
            return []

    def _publish_heartbeat(self, leaving: bool = False) -> None:
        beat = self.heartbeat(leaving)
        # Valid until the deadline it announces, so peers can pass it on meanwhile.
        ttl_s = min(beat["deadline_s"], HEARTBEAT_MAX_TTL_S, self.system.limits.max_ttl_s)
        frame = self.publish(HEARTBEAT_TOPIC, HEARTBEAT_BEHAVIOUR, beat, ttl_s=ttl_s)
        env = peek(frame)
        signed = SignedHeartbeat.of(env, frame) if env is not None else None
        self.keep_own_heartbeat(None if leaving else signed)

    def _heartbeat(self) -> None:
        self.announce()
        self.call_later(self.heartbeat_interval(), self._heartbeat)

    def announce(self) -> None:
        """Send a heartbeat now (after onboarding changes), not at the next tick."""
        try:
            self._publish_heartbeat()
        except Exception as exc:  # a busy store or a stopping host: try next time
            log.warning("heartbeat not sent: %s", exc)

    def _sweep(self) -> None:
        for peer_id in self.peer_table.sweep():
            log.info("peer %s is gone (missed its heartbeat deadline)", peer_id)
            self.keep_heartbeat(peer_id, None)  # expired with the deadline: nothing to pass on
        for peer_id in self.peer_table.forget_gone(self.services.peer_forget_s):
            log.info("peer %s forgotten (gone for %g s)", peer_id, self.services.peer_forget_s)
            self.keep_heartbeat(peer_id, None)
        self.call_later(self.services.heartbeat_s / 2, self._sweep)

    @behaviour(HEARTBEAT_BEHAVIOUR, public=True, payload=Heartbeat, topic=HEARTBEAT_TOPIC)
    def heard_heartbeat(self, request: Request) -> None:
        sender = request.sender
        peer_id = peer_id_from_public_key(sender.id)
        if peer_id == self.system.peer_id:
            return
        if sender.address.host != peer_id:
            raise Refusal(ErrorCode.WRONG_SIGNER, "a heartbeat must come from a node's root")
        sealed = request.sealed
        signed = SignedHeartbeat.of(sealed.envelope, sealed.frame) if sealed else None
        self.take_heartbeat(peer_id, sender.did, request.payload, signed)

    # ---- peers (owner) ---------------------------------------------------------------

    @behaviour("/dms/node/peers/self")
    def peers_self(self, request: Request) -> dict[str, Any]:
        return {
            "peer_id": self.system.peer_id,
            "did": self.identity.did,
            "addrs": self._network().addrs(),
            "reachability": str(self._network().reachability()),
            "nonce": self.nonce,
        }

    @behaviour("/dms/node/peers/list")
    def peers_list(self, request: Request) -> list[dict[str, Any]]:
        """Every peer known from heartbeats or connections, with its status and figures."""
        connected = (
            {p.peer_id: p.addrs for p in self.services.network.peers()}
            if self.services.network
            else {}
        )
        now = time.time()
        rows = []
        for record in self.peer_table.records():
            row = record.as_dict(now)
            row["connected"] = record.peer_id in connected
            # direct, relayed (through a circuit relay) or none
            row["path"] = self._network().path_to(record.peer_id)
            advertised = row.pop("addrs", [])
            row["addrs"] = list(dict.fromkeys([*connected.pop(record.peer_id, []), *advertised]))
            rows.append(row)
        for peer_id, addrs in sorted(connected.items()):  # connected, no heartbeat yet
            rows.append({"peer_id": peer_id, "status": "connected", "connected": True,
                         "addrs": addrs})  # fmt: skip
        return rows

    @behaviour("/dms/node/peers/ping", payload=PingPayload)
    def peers_ping(self, request: Request) -> None:
        peer_id = request.payload.peer_id
        network = self._network()
        self.in_background(
            request, lambda: {"peer_id": peer_id, "rtt_ms": round(network.ping(peer_id), 3)}
        )

    @behaviour("/dms/node/peers/connect", payload=ConnectPayload)
    def peers_connect(self, request: Request) -> None:
        address = request.payload.address
        network = self._network()
        self.in_background(request, lambda: {"peer_id": network.connect(address)})

    @behaviour("/dms/node/peers/dht")
    def peers_dht(self, request: Request) -> dict[str, Any]:
        peers = self._network().dht_peers()
        return {"size": len(peers), "peers": peers}

    @behaviour("/dms/node/peers/score")
    def peers_score(self, request: Request) -> list[dict[str, Any]]:
        scores = self._network().scores()
        return [{"peer_id": p, "score": s} for p, s in sorted(scores.items())]

    # ---- helpers ---------------------------------------------------------------------

    def _network(self) -> Libp2pTransport:
        if self.services.network is None:
            raise Refusal(ErrorCode.UNREACHABLE, "this node has no libp2p network")
        return self.services.network

    def _remember_peers(self, reschedule: bool = True) -> None:
        peerbook, network = self.services.peerbook, self.services.network
        if peerbook is None or network is None:
            return
        try:
            peerbook.remember(network.peers())
        except Exception as exc:  # the node outlives a busy or stopped store
            log.warning("could not record peers: %s", exc)
        if reschedule:
            self.call_later(self.services.remember_every_s, self._remember_peers)
