"""Heartbeats passed on between peers, so a node need not wait for gossip to learn the network.

Heartbeat intervals grow with the network (N / ``heartbeat_budget_per_s``), so a
node that joins would learn of each peer only at that peer's next heartbeat. A
node keeps the latest heartbeat envelope it heard from each peer, exactly as the
peer signed it, and answers ``/dms/node/peers/heartbeats`` with the ones the
asker has not got (the asker sends what it holds: peer id and ``issued_at``).
A second after start a node asks one connected peer, sending its own heartbeat
along (one round trip introduces both); again every few seconds while answers
bring news, then every half minute to repair what gossip lost. Every heartbeat
passed on is checked as the gossip validator would check it, so a peer can leave
heartbeats out but not forge, alter or revive one. See ``specs/node.md``.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dms.actor import Envelope, ErrorCode, Limits, Outcome, Refusal, Request, behaviour
from dms.actor.envelope import check_time, now_ns, unseal, verify
from dms.actor.runtime import NodeRuntime
from dms.network.host import Libp2pTransport
from dms.network.peertable import (
    HEARTBEAT_BEHAVIOUR,
    HEARTBEAT_TOPIC,
    HEARTBEATS_BEHAVIOUR,
    STALE,
    Heartbeat,
    PeerTable,
)
from dms.node.client import root_handle
from dms.security.identity import peer_id_from_public_key

log = logging.getLogger("dms.node")

# The first ask, 1 s after start; the next SYNC_SOON_S after an answer that brought
# news (the network is still being learned) or while no peer was there to ask, else
# SYNC_EVERY_S (a heartbeat gossip lost, a partition that healed).
SYNC_FIRST_S = 1.0
SYNC_SOON_S = 3.0
SYNC_EVERY_S = 30.0
# A heartbeat this close to its expiry is not passed on: it would expire on the way.
EXPIRY_MARGIN_S = 5.0
# At most this many heartbeats in one answer, and at most half the control limit.
RELAY_MAX = 256
# At most this many peers in what an asker says it holds (the newest).
DIGEST_MAX = 4096
# A heartbeat is valid until the deadline it announces, so peers can pass it on
# meanwhile; never longer than this (a receiver refuses expiries past its max_ttl_s).
HEARTBEAT_MAX_TTL_S = 600.0


@dataclass(frozen=True)
class SignedHeartbeat:
    """A heartbeat envelope as its sender signed it."""

    issued_at: int  # unix ns, from the envelope
    expiry: int  # unix ns, from the envelope
    frame: bytes

    @classmethod
    def of(cls, envelope: Envelope, frame: bytes) -> SignedHeartbeat:
        return cls(envelope.issued_at, envelope.expiry, frame)


@dataclass(frozen=True)
class RelayedHeartbeat:
    peer_id: str
    did: str
    beat: Heartbeat
    signed: SignedHeartbeat

    @property
    def sent_at(self) -> float:
        return self.signed.issued_at / 1e9


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
    return RelayedHeartbeat(peer_id, env.sender.did, beat, SignedHeartbeat.of(env, frame))


class HeartbeatsPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # The asker's own latest heartbeat envelope: asking introduces it too.
    heartbeat: bytes | None = Field(default=None, max_length=64 * 1024)
    # What the asker holds: peer id -> issued_at (unix ns) of its latest heartbeat.
    have: dict[str, int] = Field(default_factory=dict, max_length=DIGEST_MAX)


class HeartbeatSync:
    """Part of the peering role: keeps, serves and asks for peers' signed heartbeats."""

    def __init__(
        self, node: NodeRuntime, peer_table: PeerTable, network: Libp2pTransport | None
    ) -> None:
        self.node = node
        self.peer_table = peer_table
        self.network = network
        # The latest heartbeat heard from each peer, oldest first.
        self._heard: dict[str, SignedHeartbeat] = {}
        self._own_heartbeat: SignedHeartbeat | None = None

    def start(self) -> None:
        self.node.call_later(SYNC_FIRST_S, self._sync)

    def keep_heartbeat(self, peer_id: str, signed: SignedHeartbeat | None) -> None:
        """Remember ``signed`` as ``peer_id``'s latest heartbeat; None forgets it."""
        self._heard.pop(peer_id, None)
        if signed is not None:
            self._heard[peer_id] = signed

    def keep_own_heartbeat(self, signed: SignedHeartbeat | None) -> None:
        self._own_heartbeat = signed

    def take_heartbeat(
        self,
        peer_id: str,
        did: str,
        beat: Heartbeat,
        signed: SignedHeartbeat | None,
        sent_at: float | None = None,
        via: str | None = None,
    ) -> str:
        """File a verified heartbeat: the peers table, the peer's addresses, and the
        envelope to pass on. ``via``: the peer that passed it on."""
        event = self.peer_table.observe(peer_id, did, beat, sent_at)
        if event == STALE:  # a later beat of the same process is held: nothing new
            log.debug("peer %s: an earlier heartbeat (seq %d) came late", peer_id, beat.seq)
            return event
        if self.network is not None:
            if beat.leaving:  # as a fresh key now: its addresses go once it disconnects
                self.network.unheard(peer_id)
            elif beat.addrs:
                self.network.learn_addrs(peer_id, beat.addrs)
        self.keep_heartbeat(peer_id, None if beat.leaving else signed)
        if event != "alive":
            log.info("peer %s %s%s", peer_id, event, f" (heard from {via})" if via else "")
        return event

    # ---- serving -----------------------------------------------------------------------

    @behaviour(HEARTBEATS_BEHAVIOUR, public=True, payload=HeartbeatsPayload)
    def peers_heartbeats(self, request: Request) -> dict[str, list[bytes]]:
        """This node's heartbeat and the latest one of each live peer that the asker
        does not hold, newest first, each as its sender signed it."""
        payload: HeartbeatsPayload = request.payload
        asker = request.sender.address.host
        if payload.heartbeat is not None:
            self._adopt([payload.heartbeat], asker, only_from=asker)
        have = payload.have
        alive = {r.peer_id for r in self.peer_table.alive()} - {asker}
        own = self._own_heartbeat
        chosen = [(self.node.system.peer_id, own)] if own is not None else []
        chosen += [(p, s) for p, s in reversed(self._heard.items()) if p in alive]
        frames: list[bytes] = []
        budget = self.node.system.limits.max_control_bytes // 2
        fresh_until = now_ns() + int(EXPIRY_MARGIN_S * 1e9)
        for peer_id, signed in chosen:
            if len(frames) >= RELAY_MAX or len(signed.frame) > budget:
                break
            if signed.issued_at > have.get(peer_id, -1) and signed.expiry > fresh_until:
                frames.append(signed.frame)
                budget -= len(signed.frame)
        return {"heartbeats": frames}

    # ---- asking ------------------------------------------------------------------------

    def _sync(self) -> None:
        """Ask one connected peer for the heartbeats this node lacks."""
        network = self.network
        if network is None:
            return  # the in-memory transport: gossip reaches every node at once
        try:
            connected = [p.peer_id for p in network.peers()]
        except Exception as exc:  # a host still starting or stopping
            log.debug("no peer to ask for heartbeats: %s", exc)
            connected = []
        if not connected:
            self.node.call_later(SYNC_SOON_S, self._sync)
            return
        source = random.choice(connected)
        newest = list(self._heard.items())[-DIGEST_MAX:]
        own = self._own_heartbeat
        try:
            self.node.invoke(
                root_handle(source),
                HEARTBEATS_BEHAVIOUR,
                {
                    "heartbeat": own.frame if own is not None else None,
                    "have": {peer_id: signed.issued_at for peer_id, signed in newest},
                },
                on_reply=lambda outcome: self._answered(source, outcome),
            )
        except Exception as exc:  # the network stopping: keep the schedule all the same
            log.debug("could not ask %s for heartbeats: %s", source, exc)
            self.node.call_later(SYNC_EVERY_S, self._sync)

    def _answered(self, source: str, outcome: Outcome) -> None:
        result: Any = outcome.result
        frames = result.get("heartbeats") if isinstance(result, dict) else None
        news = 0
        if outcome.ok and isinstance(frames, list):
            news = self._adopt(frames[:RELAY_MAX], source)
        else:
            log.debug("no heartbeats from %s: %s", source, outcome.error or "not a list")
        self.node.call_later(SYNC_SOON_S if news else SYNC_EVERY_S, self._sync)

    def _news(self, relayed: RelayedHeartbeat) -> bool:
        """Whether a heartbeat passed on is news, not an echo of what the table holds: of
        the held one's process, a later ``seq`` (its own count; a beat gossip brought late
        has a late ``last_seen``, and the next one, issued before it came, was dropped at
        every sync); else issued after the peer was last heard from."""
        known = self.peer_table.get(relayed.peer_id)
        if known is None:
            return True
        held = known.heartbeat
        if held is not None and held.nonce == relayed.beat.nonce:
            return relayed.beat.seq > held.seq
        return relayed.sent_at > known.last_seen

    def _adopt(self, frames: list[Any], source: str, only_from: str | None = None) -> int:
        """Check each heartbeat ``source`` passed on, as gossip would be checked, and
        take it where it is newer than what this node heard itself; returns how many
        were taken."""
        taken = 0
        for frame in frames:
            try:
                if not isinstance(frame, bytes):
                    raise Refusal(ErrorCode.MALFORMED, "not an envelope")
                relayed = check_relayed_heartbeat(frame, self.node.system.limits)
                if only_from is not None and relayed.peer_id != only_from:
                    raise Refusal(
                        ErrorCode.WRONG_SIGNER, "an introduction with another's heartbeat"
                    )
            except Refusal as refusal:
                self.node.system.refusals[refusal.code] += 1
                log.warning("heartbeat passed on by %s refused: %s", source, refusal)
                continue
            if relayed.peer_id == self.node.system.peer_id or relayed.beat.leaving:
                continue
            if self._news(relayed):
                event = self.take_heartbeat(
                    relayed.peer_id,
                    relayed.did,
                    relayed.beat,
                    relayed.signed,
                    sent_at=relayed.sent_at,
                    via=source,
                )
                taken += event != STALE
        return taken
