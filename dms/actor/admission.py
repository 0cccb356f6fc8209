"""What remote peers may make this node hold, checked before the signature.

Identities are free: a limit per peer is dodged by making peers, so every
budget here has a global bound beside the per-peer one (DESIGN decision 12).
Two kinds, both read from the header alone (the behaviour, the sender's host,
which the receive pipeline has already bound to the peer that delivered the
frame, and the frame's size), so a request over a budget costs no signature
check, no payload decoding and no turn in the target actor's mailbox:

- **Rates** (:class:`BehaviourLimits`): requests a second of chosen behaviours
  (bid requests: ``Preferences.bid_requests_per_s`` per peer, and
  ``bid_requests_per_s_total`` across all peers).
- **Holdings** (:class:`Admission`): requests admitted and not yet handled by
  their actor (``max_inflight``, ``max_inflight_per_peer``) and their bytes,
  which the actor still has to validate (pending decodes:
  ``max_pending_decode_bytes``, ``..._per_peer``). A ticket taken at admission
  is given back when the actor has handled the request.

Priority when a budget is full: the node says which peers it has a stake in
(``stake``: an allocation, a committed lease, a completed job, an anchor).
Peers without one together get ``unknown_share`` of each global budget, and
those at one IP address ``ip_share`` of that (``peer_ip``: the remote address
of the peer's connection, where the transport knows it). So a flood of fresh
keys fills only the unknown share, and peers the node has a stake in keep the
rest. See ``specs/security.md``, "Global budgets".

A refused request is counted by budget, logged once a second with its count,
and answered if it asks for a reply: at once, at most ``ANSWERS_PER_S`` a second
per peer and ``TOTAL_ANSWERS_PER_S`` in all (each answer costs a signature); the
others together (:class:`LateAnswers`), one signed reply for all the refused
requests of one sender every ``LATE_ANSWER_S``, so every refusal is an answer
and a flood of them costs a signature per sender, not per request.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from dms.actor.envelope import Envelope
from dms.actor.handle import Handle
from dms.actor.ratelimit import (
    ANSWERS_PER_S,
    LOG_EVERY_S,
    TOTAL_ANSWERS_PER_S,
    Bucket,
    PeerRates,
)

# Peers whose budgets are kept before the full ones are forgotten (checked at most
# once a second).
MAX_PEERS = 4096
# In the rate of all peers, a request counts one per started unit of its size.
UNIT_BYTES = 4096
# Refusals past those are answered together this often: one reply per sender.
LATE_ANSWER_S = 0.2
# The most refused requests waiting for their answer, of one peer and of all; past
# them a refusal is not answered (the request times out at its sender).
MAX_LATE_PER_PEER = 1024
MAX_LATE = 16 * 1024
# And the bytes they keep (a sender's handle and reply_to are the sender's own strings,
# up to the header's 64 KiB; the request's payload and token chain are not kept).
MAX_LATE_BYTES_PER_PEER = 1 << 20
MAX_LATE_BYTES = 8 << 20
# The most replies sent at each of those times (a signature each); the senders left
# wait for the next.
MAX_LATE_REPLIES = 5


def _never(peer: str) -> bool:
    return False


def _unknown_ip(peer: str) -> str | None:
    return None


def _shared_ip(ip: str | None) -> str | None:
    """The address whose peers share ``ip_share``: not loopback (the processes of this
    machine are not one remote party; a simulation runs dozens of nodes there)."""
    if ip is None:
        return None
    try:
        return None if ipaddress.ip_address(ip).is_loopback else ip
    except ValueError:
        return None


@dataclass(frozen=True)
class Verdict:
    """A refused request: why (``budget`` names the setting), whether to answer it,
    and the refusals to log now (0: not yet; logged once a second)."""

    reason: str
    answer: bool
    log_count: int
    budget: str = ""


@dataclass(frozen=True)
class BudgetUse:
    """One budget as ``/metrics`` shows it: in use, its bound, refusals so far."""

    name: str
    used: float
    limit: float
    refused: int


class _Refusals:
    """Counts refusals by budget; decides which to log and which to answer."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.by_budget: Counter[str] = Counter()
        self._unlogged = 0
        self._logged = float("-inf")
        self._answers = Bucket(TOTAL_ANSWERS_PER_S, clock())
        self._peer_answers: dict[str, Bucket] = {}

    def note(self, budget: str, peer: str, reason: str) -> Verdict:
        now = self._clock()
        self.by_budget[budget] += 1
        self._unlogged += 1
        count = 0
        if now - self._logged >= LOG_EVERY_S:
            count, self._unlogged, self._logged = self._unlogged, 0, now
        if len(self._peer_answers) > MAX_PEERS:
            self._peer_answers.clear()
        mine = self._peer_answers.setdefault(peer, Bucket(ANSWERS_PER_S, now))
        answer = mine.take(ANSWERS_PER_S, ANSWERS_PER_S, now) and self.answer_in_all()
        return Verdict(reason, answer, count, budget)

    def answer_in_all(self) -> bool:
        """Take one answer from the budget of all peers; False if none is left."""
        return self._answers.take(TOTAL_ANSWERS_PER_S, TOTAL_ANSWERS_PER_S, self._clock())


@dataclass
class _Rate:
    per_peer: PeerRates
    reason: str
    total: float  # requests a second of all peers together; 0: no global bound
    total_burst: float
    everyone: Bucket
    unknown: Bucket


class BehaviourLimits:
    """Budgets a second for some behaviours; any thread may call :meth:`check`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._limits: dict[str, _Rate] = {}
        self._swept = float("-inf")
        self._refusals = _Refusals(clock)
        self.stake: Callable[[str], bool] = _never
        self.unknown_share = 0.5

    def set(
        self,
        behaviour: str,
        rate: float,
        burst: int,
        reason: str,
        *,
        total: float = 0.0,
        total_burst: int = 0,
    ) -> None:
        """At most ``rate`` requests a second (``burst`` at once) of ``behaviour`` from
        one peer, and ``total`` (``total_burst``) from all peers together, of which peers
        without a stake get ``unknown_share``; 0: no such limit. ``reason`` is the text
        of a per-peer refusal."""
        with self._lock:
            if rate <= 0 and total <= 0:
                self._limits.pop(behaviour, None)
                return
            now = self._clock()
            burst_total = float(max(total_burst, 1))
            self._limits[behaviour] = _Rate(
                PeerRates(rate if rate > 0 else float("inf"), burst, self._clock),
                reason,
                total,
                burst_total,
                Bucket(burst_total, now),
                Bucket(burst_total * self.unknown_share, now),
            )

    def __contains__(self, behaviour: str) -> bool:
        return behaviour in self._limits

    def check(self, behaviour: str, peer: str, size: int = 0) -> Verdict | None:
        """Take one request of ``size`` bytes from ``peer``'s budgets for ``behaviour``;
        a verdict if a budget has none left, else None. In the budget of all peers a
        request counts one per started ``UNIT_BYTES`` (its work grows with its size: a
        bid request of 256 slots, 42 KB, counts 11; one of a few slots, 1)."""
        with self._lock:
            limit = self._limits.get(behaviour)
            if limit is None:
                return None
            rates = limit.per_peer
            if len(rates) > MAX_PEERS and self._clock() > self._swept + 1.0:
                rates.forget("")  # every peer whose budget is full again goes
                self._swept = self._clock()
            if not rates.allow(peer):
                return self._refused(rates, peer, limit.reason)
            if limit.total > 0:
                return self._check_total(behaviour, limit, peer, 1 + max(0, size - 1) // UNIT_BYTES)
            return None

    def _refused(self, rates: PeerRates, peer: str, reason: str) -> Verdict:
        count = rates.refused(peer)
        answer = rates.may_answer(peer) and self._refusals.answer_in_all()
        if answer:
            rates.answered(peer)
        self._refusals.by_budget["per_peer_rate"] += 1
        return Verdict(reason, answer, count, "per_peer_rate")

    def _check_total(self, behaviour: str, limit: _Rate, peer: str, cost: int) -> Verdict | None:
        """Peers with a stake take from the budget of all; the others from their share
        of it too, so a flood of fresh keys leaves the rest to known peers."""
        now = self._clock()
        rate, burst = limit.total, limit.total_burst
        everyone = limit.everyone
        everyone.tokens = min(burst, everyone.tokens + (now - everyone.stamp) * rate)
        everyone.stamp = now
        if self.stake(peer):
            if everyone.tokens >= cost:
                everyone.tokens -= cost
                return None
            reason = (
                f"more than {rate:g} {behaviour} requests a second from all peers, one per "
                f"started {UNIT_BYTES // 1024} KiB (bid_requests_per_s_total)"
            )
            return self._refusals.note("total_rate", peer, reason)
        share = self.unknown_share
        unknown = limit.unknown
        unknown.tokens = min(burst * share, unknown.tokens + (now - unknown.stamp) * rate * share)
        unknown.stamp = now
        if unknown.tokens >= cost and everyone.tokens >= cost:
            unknown.tokens -= cost
            everyone.tokens -= cost
            return None
        reason = (
            f"more than {rate * share:g} {behaviour} requests a second from peers this node "
            f"has no stake in, one per started {UNIT_BYTES // 1024} KiB "
            f"(bid_requests_per_s_total {rate:g} x unknown_share {share:g})"
        )
        return self._refusals.note("total_rate", peer, reason)

    def refused(self) -> dict[str, int]:
        with self._lock:
            return dict(self._refusals.by_budget)


@dataclass(frozen=True)
class HoldingLimits:
    """The bounds of :class:`Admission` (``dms.actor.system.Limits`` holds the values)."""

    max_inflight: int
    max_inflight_per_peer: int
    max_pending_decode_bytes: int
    max_pending_decode_bytes_per_peer: int
    unknown_share: float
    ip_share: float


@dataclass
class Ticket:
    """A request admitted: given back (:meth:`Admission.release`) once handled by each
    of the ``holders`` actors it went to."""

    peer: str
    ip: str | None
    size: int
    staked: bool
    holders: int = 1


@dataclass
class _Held:
    requests: int = 0
    bytes: int = 0


@dataclass
class _Holdings:
    all: _Held = field(default_factory=_Held)
    unknown: _Held = field(default_factory=_Held)
    peers: dict[str, _Held] = field(default_factory=dict)
    ips: dict[str, _Held] = field(default_factory=dict)


def _add(table: dict[str, _Held], key: str, requests: int, size: int) -> None:
    held = table.setdefault(key, _Held())
    held.requests += requests
    held.bytes += size
    if held.requests <= 0:
        del table[key]


class Admission:
    """Requests remote peers have made this node hold, in total, per peer, per IP."""

    def __init__(self, limits: HoldingLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._held = _Holdings()
        self._refusals = _Refusals(clock)
        self.stake: Callable[[str], bool] = _never
        self.peer_ip: Callable[[str], str | None] = _unknown_ip

    def admit(self, peer: str, size: int) -> Ticket | Verdict:
        """A ticket for one more request of ``size`` bytes from ``peer``, or why not."""
        staked = self.stake(peer)
        ip = None if staked else _shared_ip(self.peer_ip(peer))
        with self._lock:
            refusal = self._over(peer, ip, size, staked)
            if refusal is not None:
                return self._refusals.note(refusal[0], peer, refusal[1])
            ticket = Ticket(peer, ip, size, staked)
            self._count(ticket, 1)
            return ticket

    def release(self, ticket: Ticket | None) -> None:
        """One holder of ``ticket`` has handled it (or could not take it)."""
        if ticket is None:
            return
        with self._lock:
            ticket.holders -= 1
            if ticket.holders == 0:
                self._count(ticket, -1)

    def _count(self, ticket: Ticket, sign: int) -> None:
        held, size = self._held, sign * ticket.size
        held.all.requests += sign
        held.all.bytes += size
        if not ticket.staked:
            held.unknown.requests += sign
            held.unknown.bytes += size
        _add(held.peers, ticket.peer, sign, size)
        if ticket.ip is not None:
            _add(held.ips, ticket.ip, sign, size)

    def _over(self, peer: str, ip: str | None, size: int, staked: bool) -> tuple[str, str] | None:
        """The budget (and the reason) one more request would pass, or None. A peer
        with nothing held may always send one frame, however large (one data frame
        may be up to ``max_data_bytes``). Every request admitted passes here: the
        reasons are written only for one refused."""
        lim, held = self.limits, self._held
        mine = held.peers.get(peer)
        if mine is not None:
            if mine.requests >= lim.max_inflight_per_peer:
                return "inflight_per_peer", (
                    f"this peer has {mine.requests} requests waiting here, the most one peer "
                    f"may have (max_inflight_per_peer)"
                )
            if mine.requests and mine.bytes + size > lim.max_pending_decode_bytes_per_peer:
                return "pending_decode_bytes_per_peer", (
                    f"this peer has {mine.bytes} bytes waiting to be decoded here, the most one "
                    f"peer may have (max_pending_decode_bytes_per_peer)"
                )
        over = self._over_pool(held.all, 1.0, size)
        if over is not None or staked:
            return over and self._pool_reason(over, held.all, "all peers", "")
        share = lim.unknown_share
        over = self._over_pool(held.unknown, share, size)
        if over is not None:
            why = f" x unknown_share {share:g}"
            return self._pool_reason(over, held.unknown, "peers this node has no stake in", why)
        if ip is None:
            return None
        part = held.ips.get(ip, _Held())
        over = self._over_pool(part, share * lim.ip_share, size)
        if over is not None:
            why = f" x unknown_share {share:g} x ip_share {lim.ip_share:g}"
            return self._pool_reason(over, part, f"peers at {ip}", why)
        return None

    def _over_pool(self, part: _Held, share: float, size: int) -> str | None:
        """The budget of a pool holding ``share`` of the global ones that one more request
        of ``size`` bytes would pass: ``inflight``, ``pending_decode_bytes`` or None."""
        lim = self.limits
        if part.requests >= max(1, int(lim.max_inflight * share)):
            return "inflight"
        if part.requests and part.bytes + size > int(lim.max_pending_decode_bytes * share):
            return "pending_decode_bytes"
        return None

    def _pool_reason(self, budget: str, part: _Held, whose: str, why: str) -> tuple[str, str]:
        lim = self.limits
        if budget == "inflight":
            return budget, (
                f"{part.requests} requests of {whose} wait here, the most they may have "
                f"(max_inflight {lim.max_inflight}{why})"
            )
        return budget, (
            f"{part.bytes} bytes of {whose} wait to be decoded here, the most they may "
            f"have (max_pending_decode_bytes {lim.max_pending_decode_bytes}{why})"
        )

    def usage(self) -> list[BudgetUse]:
        lim = self.limits
        with self._lock:
            held, refused = self._held, self._refusals.by_budget
            return [
                BudgetUse("inflight", held.all.requests, lim.max_inflight, refused["inflight"]),
                BudgetUse(
                    "inflight_unknown",
                    held.unknown.requests,
                    lim.max_inflight * lim.unknown_share,
                    0,
                ),
                BudgetUse(
                    "inflight_per_peer",
                    max((h.requests for h in held.peers.values()), default=0),
                    lim.max_inflight_per_peer,
                    refused["inflight_per_peer"],
                ),
                BudgetUse(
                    "pending_decode_bytes",
                    held.all.bytes,
                    lim.max_pending_decode_bytes,
                    refused["pending_decode_bytes"],
                ),
                BudgetUse(
                    "pending_decode_bytes_per_peer",
                    max((h.bytes for h in held.peers.values()), default=0),
                    lim.max_pending_decode_bytes_per_peer,
                    refused["pending_decode_bytes_per_peer"],
                ),
            ]


@dataclass
class LateBatch:
    """The refused requests of one sender (an actor handle), answered by one reply."""

    peer: str
    sender: Handle  # where the reply goes
    first: Envelope  # the request whose reply_to the reply takes (no payload, no caps)
    reason: str
    size: int  # the bytes this batch keeps (kept_bytes)
    nonces: list[bytes] = field(default_factory=list)  # the others'


def kept_bytes(env: Envelope) -> int:
    """About what a late refusal keeps of ``env``: its strings, a fixed part for the
    rest (keys, nonce, times, the model itself)."""
    to = env.to.address if env.to else None
    strings = (
        env.behaviour,
        env.reply_to or "",
        env.sender.address.host,
        env.sender.address.inbox,
        to.host if to else "",
        to.inbox if to else "",
    )
    return 512 + sum(len(text) for text in strings)


class LateAnswers:
    """Refusals past the answer budget, waiting to be answered together; any thread.

    ``add`` keeps one; ``due`` gives back at most ``MAX_LATE_REPLIES`` batches (one
    per sender, oldest first) once ``LATE_ANSWER_S`` has passed since the first
    waited. Bounded per peer and in all; ``dropped`` counts what did not fit.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batches: dict[tuple[str, Handle], LateBatch] = {}
        self._by_peer: Counter[str] = Counter()
        self._bytes_by_peer: Counter[str] = Counter()
        self._held = 0
        self.held_bytes = 0
        self.dropped = 0

    def add(self, peer: str, env: Envelope, reason: str) -> Literal["first", "kept", "dropped"]:
        """Keep ``env``'s refusal for a late answer: ``first`` if it is the first waiting
        (the caller schedules :meth:`due` after ``LATE_ANSWER_S``), ``dropped`` if the
        bounds are full (it is not answered)."""
        key = (peer, env.sender)
        with self._lock:
            batch = self._batches.get(key)
            size = len(env.nonce) + 16 if batch is not None else kept_bytes(env)
            if (
                self._by_peer[peer] >= MAX_LATE_PER_PEER
                or self._held >= MAX_LATE
                or self._bytes_by_peer[peer] + size > MAX_LATE_BYTES_PER_PEER
                or self.held_bytes + size > MAX_LATE_BYTES
            ):
                self.dropped += 1
                return "dropped"
            first = self._held == 0
            if batch is None:
                bare = env.model_copy(update={"payload": None, "caps": []})
                self._batches[key] = LateBatch(peer, env.sender, bare, reason, size)
            else:
                batch.nonces.append(env.nonce)
                batch.size += size
            self._by_peer[peer] += 1
            self._bytes_by_peer[peer] += size
            self._held += 1
            self.held_bytes += size
            return "first" if first else "kept"

    def due(self) -> tuple[list[LateBatch], bool]:
        """Batches to answer now, and whether more wait (schedule again)."""
        with self._lock:
            out = []
            for key in list(self._batches)[:MAX_LATE_REPLIES]:
                batch = self._batches.pop(key)
                count = 1 + len(batch.nonces)
                self._by_peer[batch.peer] -= count
                self._bytes_by_peer[batch.peer] -= batch.size
                if self._by_peer[batch.peer] <= 0:
                    del self._by_peer[batch.peer]
                    del self._bytes_by_peer[batch.peer]
                self._held -= count
                self.held_bytes -= batch.size
                out.append(batch)
            return out, bool(self._batches)

    def __len__(self) -> int:
        return self._held
