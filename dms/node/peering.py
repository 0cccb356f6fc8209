"""The node's peer behaviours: ``/dms/node/peers/*`` and the heartbeat it sends and hears.

A mixin of :class:`dms.node.node.NodeActor`; see ``specs/node.md`` for the
heartbeat format and timing.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dms.actor import ErrorCode, Outcome, Refusal, Request, behaviour
from dms.actor.envelope import check_time, now_ns, unseal, verify
from dms.actor.system import Limits
from dms.network.host import Libp2pTransport
from dms.network.peertable import (
    DEADLINE_FACTOR,
    HEARTBEAT_BEHAVIOUR,
    HEARTBEAT_TOPIC,
    HEARTBEATS_BEHAVIOUR,
    Heartbeat,
    PeerTable,
)
from dms.node.base import NodeBase
from dms.node.client import root_handle
from dms.security.identity import peer_id_from_public_key

log = logging.getLogger("dms.node")


# After start, ask a connected peer for the heartbeats it holds (three times: at
# first, the peers it asks may be new too). Without it a newcomer learns of each
# peer only at that peer's next heartbeat, N / heartbeat_budget_per_s seconds away.
SYNC_AFTER_S = (1.0, 4.0, 12.0)
# At most this many heartbeats in one relay, and at most half the control limit.
RELAY_MAX = 256
# Heartbeats live as long as their deadline, so a peer can relay the last one it
# heard, but no longer than this (a receiver refuses expiries beyond its max_ttl_s).
HEARTBEAT_MAX_TTL_S = 600.0


@dataclass(frozen=True)
class RelayedHeartbeat:
    peer_id: str
    did: str
    beat: Heartbeat
    sent_at: float  # wall clock, seconds


def check_relayed_heartbeat(frame: bytes, limits: Limits) -> RelayedHeartbeat:
    """A heartbeat envelope that another peer passed on, checked as if it had come by
    gossip: a heartbeat, in time, signed by its sender, the root actor of its peer.
    Raises ``Refusal``."""
    sealed = unseal(frame, limits.max_control_bytes)
    env = sealed.envelope
    if env.topic != HEARTBEAT_TOPIC or env.behaviour != HEARTBEAT_BEHAVIOUR or env.to is not None:
        raise Refusal(ErrorCode.MALFORMED, "not a heartbeat")
    check_time(env, now_ns(), limits.max_ttl_s, limits.clock_skew_s)
    verify(sealed)
    peer_id = peer_id_from_public_key(env.signer)
    if env.sender.address.host != peer_id:
        raise Refusal(ErrorCode.WRONG_SIGNER, "a heartbeat must come from a node's root")
    try:
        beat = Heartbeat.model_validate(env.payload)
    except ValidationError as exc:
        raise Refusal(ErrorCode.BAD_PAYLOAD, str(exc).splitlines()[0]) from None
    return RelayedHeartbeat(peer_id, env.sender.did, beat, env.issued_at / 1e9)


class HeartbeatsPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # The asker's own latest heartbeat: asking introduces it too.
    heartbeat: bytes | None = Field(default=None, max_length=64 * 1024)


class PingPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    peer_id: str = Field(min_length=1)


class ConnectPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    address: str = Field(min_length=1, description="a multiaddr ending in /p2p/<peer id>")


class PeeringBehaviours(NodeBase):
    nonce: str = ""
    _beats: int = 0
    _own_frame: bytes | None = None

    def start_peering(self) -> None:
        self.nonce = secrets.token_hex(8)  # new per process: peers see a restart
        # The latest heartbeat heard from each peer, as signed, oldest first: relayed
        # to newcomers (/dms/node/peers/heartbeats).
        self._frames: dict[str, bytes] = {}
        self.subscribe(HEARTBEAT_TOPIC)
        self.call_later(0.0, self._heartbeat)
        for delay_s in SYNC_AFTER_S:
            self.call_later(delay_s, self._sync_peers)
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
        flat as the network grows (N / interval heartbeats reach every node)."""
        peers = len(self.peer_table.records()) + 1
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
        self._own_frame = None if leaving else frame

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
        self.call_later(self.services.heartbeat_s / 2, self._sweep)

    @behaviour(HEARTBEAT_BEHAVIOUR, public=True, payload=Heartbeat)
    def heard_heartbeat(self, request: Request) -> None:
        sender = request.sender
        peer_id = peer_id_from_public_key(sender.id)
        if peer_id == self.system.peer_id:
            return
        if sender.address.host != peer_id:
            raise Refusal(ErrorCode.WRONG_SIGNER, "a heartbeat must come from a node's root")
        frame = request.sealed.frame if request.sealed is not None else None
        self._take_heartbeat(peer_id, sender.did, request.payload, frame)

    def _take_heartbeat(
        self,
        peer_id: str,
        did: str,
        beat: Heartbeat,
        frame: bytes | None,
        sent_at: float | None = None,
        via: str | None = None,
    ) -> str:
        event = self.peer_table.observe(peer_id, did, beat, sent_at)
        if beat.addrs and self.services.network is not None:
            self.services.network.learn_addrs(peer_id, beat.addrs)
        self._frames.pop(peer_id, None)
        if frame is not None and not beat.leaving:
            self._frames[peer_id] = frame  # now the newest
        if event != "alive":
            log.info("peer %s %s%s", peer_id, event, f" (heard from {via})" if via else "")
        return event

    # ---- heartbeats relayed to newcomers ----------------------------------------------

    @behaviour(HEARTBEATS_BEHAVIOUR, public=True, payload=HeartbeatsPayload)
    def peers_heartbeats(self, request: Request) -> dict[str, list[bytes]]:
        """This node's heartbeat and the latest one of each live peer, newest first, each
        as its sender signed it: what gossip already told everyone, for a newcomer."""
        asker = request.sender.address.host
        if request.payload.heartbeat is not None:
            self._adopt_heartbeats(asker, [request.payload.heartbeat], only_from=asker)
        alive = {r.peer_id for r in self.peer_table.alive()} - {asker}
        frames = [self._own_frame] if self._own_frame is not None else []
        budget = self.system.limits.max_control_bytes // 2 - sum(map(len, frames))
        for peer_id, frame in reversed(self._frames.items()):
            if len(frames) >= RELAY_MAX or len(frame) > budget:
                break
            if peer_id in alive:
                frames.append(frame)
                budget -= len(frame)
        return {"heartbeats": frames}

    def _sync_peers(self) -> None:
        network = self.services.network
        if network is None:
            return
        try:
            connected = [p.peer_id for p in network.peers()]
        except Exception as exc:  # a host still starting or stopping: the next try
            log.debug("no peers to ask for heartbeats: %s", exc)
            return
        if connected:
            source = random.choice(connected)
            self.invoke(
                root_handle(source),
                HEARTBEATS_BEHAVIOUR,
                {"heartbeat": self._own_frame},
                on_reply=lambda outcome: self._relayed_to_me(source, outcome),
            )

    def _relayed_to_me(self, source: str, outcome: Outcome) -> None:
        frames = outcome.result.get("heartbeats") if isinstance(outcome.result, dict) else None
        if not outcome.ok or not isinstance(frames, list):
            log.debug("no heartbeats from %s: %s", source, outcome.error or "not a list")
            return
        self._adopt_heartbeats(source, frames[:RELAY_MAX])

    def _adopt_heartbeats(
        self, source: str, frames: list[Any], only_from: str | None = None
    ) -> None:
        """Take in the heartbeats ``source`` passed on, each checked as gossip would be,
        where they are newer than what this node heard itself."""
        for frame in frames:
            try:
                if not isinstance(frame, bytes):
                    raise Refusal(ErrorCode.MALFORMED, "not an envelope")
                relayed = check_relayed_heartbeat(frame, self.system.limits)
            except Refusal as refusal:
                self.system.refusals[str(refusal.code)] += 1
                log.warning("heartbeat relayed by %s refused: %s", source, refusal)
                continue
            if only_from is not None and relayed.peer_id != only_from:
                self.system.refusals[str(ErrorCode.WRONG_SIGNER)] += 1
                log.warning("peer %s introduced itself with another's heartbeat", source)
                continue
            if relayed.peer_id == self.system.peer_id or relayed.beat.leaving:
                continue
            known = self.peer_table.get(relayed.peer_id)
            if known is None or relayed.sent_at > known.last_seen:  # news, not an echo
                self._take_heartbeat(
                    relayed.peer_id, relayed.did, relayed.beat, frame, relayed.sent_at, source
                )

    # ---- peers (owner) ---------------------------------------------------------------

    @behaviour("/dms/node/peers/self")
    def peers_self(self, request: Request) -> dict[str, Any]:
        return {
            "peer_id": self.system.peer_id,
            "did": self.identity.did,
            "addrs": self._network().addrs(),
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
            row["addrs"] = connected.pop(record.peer_id, [])
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
