"""The requester's orchestrator: one child actor of the node per deployment.

States (saved on every transition, ``specs/orchestration.md``)::

    queued <-> bidding -> committing -> allocating -> running -> completed
        \\________________________________________________/  \\-> failed | shutdown

Each slot (one allocation of the spec) moves ``open -> committing ->
allocating -> running -> completed``; a slot whose commit, allocation or
provider fails goes back to ``open`` with that peer excluded and a new bid
round places it, until its placement deadline. Nothing here blocks: every
request is an invoke with a callback that runs back in this actor.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from dms.actor import (
    ROOT_INBOX,
    Actor,
    ActorContext,
    Address,
    ErrorCode,
    Handle,
    Outcome,
    Refusal,
    Request,
    behaviour,
)
from dms.jobs.spec import AllocationSpec, DeploymentSpec
from dms.network.peertable import GONE, PeerRecord, PeerTable
from dms.orchestrator.messages import (
    ALLOCATE,
    BID,
    COMMIT,
    DEPLOYMENT_TOPIC,
    REQUEST,
    REVERT,
    UPDATE,
    Bid,
    BidRequest,
    SlotRequest,
)
from dms.orchestrator.selection import Candidate, RoundRobin, select
from dms.orchestrator.store import DeploymentStore
from dms.security.identity import public_key_from_peer_id

log = logging.getLogger("dms.orchestrator")

TERMINAL = frozenset({"completed", "failed", "shutdown"})
SHUTDOWN = "/dms/deployment/shutdown"
STATUS = "/dms/allocation/status"
STOP = "/dms/allocation/stop"
EVENT_MEMORY = 200
BID_GRACE_S = 2.0  # after the window: how long a round with an empty slot waits for answers


def node_handle(peer_id: str) -> Handle:
    return Handle(
        id=public_key_from_peer_id(peer_id), address=Address(host=peer_id, inbox=ROOT_INBOX)
    )


def allocation_ref(handle: Handle) -> dict[str, str]:
    """An allocation's handle as JSON keeps it (in the store and in status)."""
    return {"id": handle.id.hex(), "host": handle.address.host, "inbox": handle.address.inbox}


def allocation_handle(ref: dict[str, str]) -> Handle:
    return Handle(
        id=bytes.fromhex(ref["id"]), address=Address(host=ref["host"], inbox=ref["inbox"])
    )


def new_deployment_id() -> str:
    return uuid.uuid4().hex[:16]


@dataclass
class Orchestration:
    """What a deployment needs from its node (shared by all of them)."""

    peer_table: PeerTable
    store: DeploymentStore
    cursor: RoundRobin = field(default_factory=RoundRobin)
    rng: random.Random = field(default_factory=random.Random)
    fanout: int = 3  # peers asked per open slot ...
    min_ask: int = 3  # ... and never fewer than this
    supervise_s: float = 1.0
    retry_s: float = 0.25  # first wait when nothing fits; doubles to retry_max_s
    retry_max_s: float = 2.0
    on_end: Callable[[str], None] | None = None


def misfit(record: PeerRecord, spec: AllocationSpec) -> str | None:
    """From the peer's last heartbeat: why it could not take this allocation, or None."""
    hb = record.heartbeat
    if hb is None or not hb.free:
        return "it offers no resources (not onboarded)"
    want = spec.resources.human()
    short = [
        f"{kind} {hb.free.get(kind, 0) or 0:g} free < {amount:g}"
        for kind, amount in want.items()
        if amount and (hb.free.get(kind, 0) or 0) + 1e-9 < amount
    ]
    return f"too small by its last heartbeat: {', '.join(short)}" if short else None


class DeploymentActor(Actor):
    def __init__(
        self,
        context: ActorContext,
        orchestration: Orchestration,
        deployment_id: str,
        spec: DeploymentSpec,
        saved: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(context)
        self.o = orchestration
        self.id = deployment_id
        self.spec = spec
        self.by_slot = dict(spec.slots())
        now = time.time()
        self.row: dict[str, Any] = saved or {
            "id": deployment_id,
            "name": spec.name,
            "state": "queued",
            "spec": spec.model_dump(mode="json"),
            "slots": [self._new_slot(name, now) for name in self.by_slot],
            "events": [],
            "created_at": now,
            "running_at": None,
            "ended_at": None,
        }
        self.slots: dict[str, dict[str, Any]] = {s["slot"]: s for s in self.row["slots"]}
        self.round = 0
        self._asked: set[str] = set()
        self._answered: set[str] = set()
        self._offers: dict[str, list[Candidate]] = {}
        self._gossiped = False
        self._closed: set[int] = set()
        self._round_scheduled = False
        self._retry_s = orchestration.retry_s
        self._misses: dict[str, int] = {}
        self._uncertain: set[str] = set()  # peers that may hold leases we do not know of
        self._dirty = False
        self.messages = 0

    @staticmethod
    def _new_slot(name: str, now: float) -> dict[str, Any]:
        return {
            "slot": name,
            "status": "open",
            "peer_id": None,
            "lease_id": None,
            "allocation": None,
            "attempts": 0,
            "excluded": [],
            "reasons": {},
            "result": None,
            "error": None,
            "placing_since": now,
            "running_at": None,
        }

    # ---- lifecycle -----------------------------------------------------------------

    def on_start(self) -> None:
        if self.row["events"]:
            self._resume()
        else:
            self._event(f"deployment {self.spec.name!r}: {len(self.slots)} allocation(s)")
            self._save()
        self._schedule_round(0.0)
        self.call_later(self.o.supervise_s, self._supervise)

    # ---- hooks for subclasses (the mining session) -------------------------------------

    def resumable(self) -> bool:
        """Whether this deployment may carry on after its node restarted."""
        return True

    def slot_running(self, slot: dict[str, Any]) -> None:
        """A slot's allocation has just started running (its handle is in the slot)."""

    def slot_lost(self, slot: dict[str, Any], reason: str) -> None:
        """A slot's allocation is gone (before the slot is reopened)."""

    def heard_from(self, slot: dict[str, Any]) -> bool:
        """Whether the slot's allocation answered something else lately (session traffic
        counts as liveness: a poll that times out behind a large transfer is no death)."""
        return False

    def ended(self, state: str, what: str) -> None:
        """The deployment reached a terminal state."""

    def _resume(self) -> None:
        """After a restart: revert what was half done, keep supervising what runs."""
        if not self.resumable():
            self._finish("failed", "the requester restarted, and this deployment cannot resume")
            return
        now = time.time()
        for slot in self.slots.values():
            if slot["status"] in ("committing", "allocating"):
                self._revert(slot["peer_id"], [slot["lease_id"]])
                # Not the peer's fault: it stays eligible.
                self._reopen(slot, "the requester restarted before it was running", now, False)
            elif slot["status"] == "open":
                slot["status"] = "open"
                slot["placing_since"] = now
        self._event("resumed after a restart")
        self._settle()

    @property
    def state(self) -> str:
        return self.row["state"]

    def _set_state(self, state: str) -> None:
        if self.row["state"] != state:
            self.row["state"] = state
            self._event(f"state: {state}")

    def _event(self, what: str) -> None:
        self._dirty = True
        events = self.row["events"]
        events.append({"at": round(time.time(), 3), "what": what})
        if len(events) > EVENT_MEMORY:
            del events[: len(events) - EVENT_MEMORY]

    def _save(self) -> None:
        self._dirty = False
        self.row["slots"] = list(self.slots.values())
        try:
            self.o.store.save(self.row)
        except Exception as exc:  # keep placing; the next transition saves again
            log.warning("deployment %s not saved: %s", self.id, exc)

    def _finish(self, state: str, what: str) -> None:
        # Whatever a provider may still hold for this deployment (a bid whose reply was
        # lost, a slot that did not complete) goes back now, not at its lease's expiry.
        unfinished = {s["peer_id"] for s in self.slots.values() if s["status"] != "completed"}
        for peer in sorted((self._uncertain | unfinished) - {None}):
            self._revert(peer, [], everything=True)
        self._set_state(state)
        self._event(what)
        self.row["ended_at"] = time.time()
        self._save()
        try:
            self.ended(state, what)
        finally:
            if self.o.on_end is not None:
                self.o.on_end(self.id)
            self.ref.stop_soon()

    # ---- bid rounds ----------------------------------------------------------------

    def _schedule_round(self, delay_s: float) -> None:
        if not self._round_scheduled and self.state not in TERMINAL and self.state != "stopping":
            self._round_scheduled = True
            self.call_later(delay_s, self._round)

    def _open_slots(self) -> list[dict[str, Any]]:
        return [s for s in self.slots.values() if s["status"] == "open"]

    def _candidates(self, open_slots: list[dict[str, Any]]) -> list[str]:
        """Fresh peers from the table that could take some open slot: a weighted random
        sample, freer peers likelier. Every requester reads much the same table, so
        taking the top few by free capacity would send every concurrent request to
        the same providers; sampling spreads them (the power of d choices)."""
        weights: dict[str, float] = {}
        for record in self.o.peer_table.alive():
            for slot in open_slots:
                spec = self.by_slot[slot["slot"]]
                c = spec.constraints
                peer = record.peer_id
                if peer in slot["excluded"] or peer in c.exclude_peers:
                    continue
                if c.include_peers and peer not in c.include_peers:
                    continue
                why = misfit(record, spec)
                if why is not None:
                    # Not asked: say why, so a job nothing can run explains itself.
                    slot["reasons"].setdefault(peer, f"not asked: {why}")
                    continue
                hb = record.heartbeat
                assert hb is not None
                onboarded = hb.onboarded.get("cpu") or 1.0
                weights[peer] = 0.05 + max(0.0, hb.free.get("cpu", 0.0) / onboarded)
                break
        # Efraimidis-Spirakis: a weighted sample without replacement.
        keyed = sorted(weights, key=lambda p: -(self.o.rng.random() ** (1.0 / weights[p])))
        return keyed[: max(self.o.min_ask, self.o.fanout * len(open_slots))]

    def _round(self) -> None:
        self._round_scheduled = False
        if self.state in TERMINAL or self.state == "stopping":
            return
        now = time.time()
        open_slots = self._open_slots()
        if not open_slots:
            return
        late = [s for s in open_slots if now - s["placing_since"] > self.spec.deadline_s]
        if late:
            self._fail_unplaced(late)
            return
        self.round += 1
        rid = self.round
        self._asked, self._answered, self._gossiped = set(), set(), False
        self._offers = {s["slot"]: [] for s in open_slots}
        request = BidRequest(
            deployment_id=self.id,
            slots=[
                SlotRequest(
                    slot=s["slot"],
                    executor=self.by_slot[s["slot"]].executor,
                    resources=self.by_slot[s["slot"]].resources,
                    constraints=self.by_slot[s["slot"]].constraints,
                )
                for s in open_slots
            ],
            lease_s=self.spec.lease_s,
        )
        peers = self._candidates(open_slots)
        self._set_state("bidding")
        self._event(f"round {rid}: asking {len(peers)} peer(s) for {len(open_slots)} slot(s)")
        payload = request.model_dump()
        for peer in peers:
            self._asked.add(peer)
            try:
                self.invoke(
                    node_handle(peer),
                    REQUEST,
                    payload,
                    timeout=self.spec.bid_window_s + 2.0,
                    on_reply=partial(self._on_bid_reply, rid, peer),
                )
                self.messages += 1
            except Exception as exc:
                self._answered.add(peer)
                self._note_reason(peer, [s["slot"] for s in open_slots], f"unreachable: {exc}")
        if len(peers) < len(open_slots):
            # The table knows too few fitting peers: ask everyone listening, bids come back
            # point to point to this actor.
            self._gossiped = True
            self.publish(
                DEPLOYMENT_TOPIC,
                REQUEST,
                {**payload, "reply_to": self.handle.model_dump()},
                ttl_s=self.spec.bid_window_s + 2.0,
            )
            self.messages += 1
        self.call_later(self.spec.bid_window_s, lambda: self._window_ends(rid))
        if not peers and not self._gossiped:
            self._close(rid)

    def _note_reason(self, peer: str, slots: list[str], reason: str) -> None:
        for name in slots:
            if name in self.slots:
                self.slots[name]["reasons"][peer] = reason

    def _on_bid_reply(self, rid: int, peer: str, outcome: Outcome) -> None:
        if outcome.ok:
            try:
                bid = Bid.model_validate(outcome.result)
            except Exception as exc:
                self._answered.add(peer)
                self._note_reason(peer, list(self._offers), f"bad bid: {exc}")
                return
            self._take_bid(rid, bid)
        else:
            self._answered.add(peer)
            self._uncertain.add(peer)  # it may have locked before the reply got lost
            assert outcome.error is not None
            self._note_reason(
                peer, list(self._offers), f"{outcome.error.code}: {outcome.error.reason}"
            )
            self._maybe_close(rid)

    @behaviour(BID, public=True, payload=Bid)
    def bid_received(self, request: Request) -> None:
        """Bids answering a gossip request come here, point to point."""
        bid: Bid = request.payload
        if request.sender.address.host != bid.peer_id or bid.deployment_id != self.id:
            raise Refusal(ErrorCode.FORBIDDEN, "a bid must come from the peer that makes it")
        self._take_bid(self.round, bid)

    def _take_bid(self, rid: int, bid: Bid) -> None:
        if rid != self.round or rid in self._closed or self.state in TERMINAL:
            if bid.offers:  # too late: give the leases back at once
                self._revert(bid.peer_id, [o.lease_id for o in bid.offers])
            return
        self._answered.add(bid.peer_id)
        for offer in bid.offers:
            if offer.slot in self._offers:
                self._offers[offer.slot].append(Candidate(bid, offer))
            else:
                self._revert(bid.peer_id, [offer.lease_id])
        for decline in bid.declines:
            self._note_reason(bid.peer_id, [decline.slot], f"declined: {decline.reason}")
        self._maybe_close(rid)

    def _maybe_close(self, rid: int) -> None:
        if not self._gossiped and self._asked <= self._answered:
            self._close(rid)

    def _window_ends(self, rid: int) -> None:
        """Close the round, unless a slot has no offer yet and asked peers still owe an
        answer: busy providers answer late, and a round closed empty only to throw
        their bids back would be retried anyway. Then wait for them, up to the bid
        request's own timeout."""
        waiting = self._asked - self._answered
        empty = [name for name, offers in self._offers.items() if not offers]
        if empty and waiting and not self._gossiped:
            self.call_later(BID_GRACE_S, lambda: self._close(rid))
            return
        self._close(rid)

    def _close(self, rid: int) -> None:
        if rid != self.round or rid in self._closed or self.state in TERMINAL:
            return
        self._closed.add(rid)
        taken: dict[str, int] = {}
        for slot in self.slots.values():
            if slot["peer_id"] and slot["status"] in ("committing", "allocating", "running"):
                taken[slot["peer_id"]] = taken.get(slot["peer_id"], 0) + 1
        decision = select(
            self.spec.strategy,
            self._offers,
            self.o.rng,
            self.o.cursor,
            taken,
            distinct=self.spec.distinct_peers,
        )
        records = []
        losers: dict[str, list[str]] = {}
        for name, candidates in self._offers.items():
            for c in candidates:
                reason = decision.reasons.get((c.peer_id, name), "")
                won = decision.winners.get(name) is c
                self.slots[name]["reasons"][c.peer_id] = reason
                records.append(
                    {"deployment_id": self.id, "direction": "received", "peer_id": c.peer_id,
                     "slot": name, "lease_id": c.offer.lease_id, "price": c.offer.price,
                     "outcome": "won" if won else "lost", "reason": reason}
                )  # fmt: skip
                if not won:
                    losers.setdefault(c.peer_id, []).append(c.offer.lease_id)
        for name in self._offers:
            for peer, reason in self.slots[name]["reasons"].items():
                if reason.startswith(("declined", "unreachable", "timeout", "bad bid")):
                    records.append(
                        {"deployment_id": self.id, "direction": "received", "peer_id": peer,
                         "slot": name, "outcome": "decline", "reason": reason}
                    )  # fmt: skip
        for peer, lease_ids in losers.items():
            self._revert(peer, lease_ids)
        try:
            self.o.store.record_bids(records)
        except Exception as exc:
            log.warning("bids of %s not recorded: %s", self.id, exc)
        for name, chosen in sorted(decision.winners.items()):
            slot = self.slots[name]
            slot.update(status="committing", peer_id=chosen.peer_id, lease_id=chosen.offer.lease_id)
            slot["attempts"] += 1
            self._event(f"{name}: chose {chosen.peer_id[-8:]} ({slot['reasons'][chosen.peer_id]})")
            self.invoke(
                node_handle(chosen.peer_id),
                COMMIT,
                {"deployment_id": self.id, "slot": name, "lease_id": chosen.offer.lease_id},
                on_reply=partial(self._on_commit, name, chosen.offer.lease_id),
            )
            self.messages += 1
        unplaced = [n for n in self._offers if n not in decision.winners]
        if unplaced:
            self._event(f"round {rid}: no acceptable bid for {', '.join(unplaced)}; queued")
            self._schedule_round(self._retry_s)
            self._retry_s = min(self._retry_s * 2, self.o.retry_max_s)
        else:
            self._retry_s = self.o.retry_s
        self._settle()

    # ---- commit, allocate ------------------------------------------------------------

    def _current(self, name: str, lease_id: str, status: str) -> dict[str, Any] | None:
        slot = self.slots.get(name)
        if slot is None or slot["lease_id"] != lease_id or slot["status"] != status:
            return None
        return slot

    def _on_commit(self, name: str, lease_id: str, outcome: Outcome) -> None:
        slot = self._current(name, lease_id, "committing")
        if slot is None:
            return
        if not outcome.ok:
            assert outcome.error is not None
            self._lost(slot, f"commit failed: {outcome.error.code}: {outcome.error.reason}")
            return
        slot["status"] = "allocating"
        spec = self.by_slot[name]
        self.invoke(
            node_handle(slot["peer_id"]),
            ALLOCATE,
            {"deployment_id": self.id, "slot": name, "lease_id": lease_id,
             "executor": spec.executor, "params": spec.params,
             "reply_to": self.handle.model_dump()},
            on_reply=partial(self._on_allocate, name, lease_id),
        )  # fmt: skip
        self.messages += 1
        self._settle()

    def _on_allocate(self, name: str, lease_id: str, outcome: Outcome) -> None:
        slot = self._current(name, lease_id, "allocating")
        if slot is None:
            return
        if not outcome.ok:
            assert outcome.error is not None
            self._lost(slot, f"allocation failed: {outcome.error.code}: {outcome.error.reason}")
            return
        slot["allocation"] = allocation_ref(Handle.model_validate(outcome.result["allocation"]))
        slot["status"] = "running"
        slot["running_at"] = time.time()
        self._event(f"{name}: running on {slot['peer_id'][-8:]}")
        self._apply_status(slot, outcome.result.get("status") or {})
        if slot["status"] == "running":
            self.slot_running(slot)
        self._settle()

    # ---- supervision -----------------------------------------------------------------

    @behaviour(UPDATE, public=True)
    def update(self, request: Request) -> None:
        status = request.payload if isinstance(request.payload, dict) else {}
        slot = self.slots.get(str(status.get("slot")))
        if slot is None or slot["lease_id"] != status.get("lease_id"):
            return
        if request.sender.address.host != slot["peer_id"]:
            raise Refusal(ErrorCode.FORBIDDEN, "only the provider may report on its allocation")
        self._apply_status(slot, status)
        self._settle()

    def _apply_status(self, slot: dict[str, Any], status: dict[str, Any]) -> None:
        state = status.get("state")
        if slot["status"] != "running" or state in (None, "pending", "starting", "running"):
            return
        if state == "completed":
            slot["status"] = "completed"
            slot["result"] = status.get("result")
            self._event(f"{slot['slot']}: completed")
        elif self.state != "stopping":  # failed, or stopped by someone else: place it again
            self._lost(slot, f"allocation {state}: {status.get('error') or ''}".strip())

    def _supervise(self) -> None:
        if self.state in TERMINAL:
            return
        try:
            self._check_running()
        finally:
            self.call_later(self.o.supervise_s, self._supervise)

    def _check_running(self) -> None:
        for slot in list(self.slots.values()):
            if slot["status"] != "running" or slot["allocation"] is None:
                continue
            record = self.o.peer_table.get(slot["peer_id"])
            if record is not None and record.status == GONE:
                self._lost(slot, "the provider is gone (missed its heartbeat deadline)")
                continue
            try:
                self.invoke(
                    allocation_handle(slot["allocation"]),
                    STATUS,
                    timeout=max(1.0, self.o.supervise_s * 2),
                    on_reply=partial(self._on_poll, slot["slot"], slot["lease_id"]),
                )
            except Exception as exc:
                self._poll_failed(slot, str(exc))
        self._settle()

    def _on_poll(self, name: str, lease_id: str, outcome: Outcome) -> None:
        slot = self._current(name, lease_id, "running")
        if slot is None:
            return
        if outcome.ok:
            self._misses.pop(name, None)
            self._apply_status(slot, outcome.result or {})
        else:
            assert outcome.error is not None
            self._poll_failed(slot, f"{outcome.error.code}: {outcome.error.reason}")
        self._settle()

    def _poll_failed(self, slot: dict[str, Any], reason: str) -> None:
        if self.heard_from(slot):
            return
        misses = self._misses.get(slot["slot"], 0) + 1
        self._misses[slot["slot"]] = misses
        if misses >= 2:
            self._lost(slot, f"the allocation does not answer ({reason})")

    # ---- failures ----------------------------------------------------------------------

    def _reopen(self, slot: dict[str, Any], reason: str, now: float, exclude: bool = True) -> None:
        self.slot_lost(slot, reason)
        if slot["peer_id"]:
            slot["reasons"][slot["peer_id"]] = reason
            if exclude and slot["peer_id"] not in slot["excluded"]:
                slot["excluded"].append(slot["peer_id"])
        slot.update(status="open", peer_id=None, lease_id=None, allocation=None,
                    placing_since=now, running_at=None, error=reason)  # fmt: skip
        self._misses.pop(slot["slot"], None)

    def _lost(self, slot: dict[str, Any], reason: str) -> None:
        """Give the slot's lease back, exclude that peer, and place the slot again."""
        self._event(f"{slot['slot']}: {reason}; placing it again")
        if slot["peer_id"] and slot["lease_id"]:
            self._revert(slot["peer_id"], [slot["lease_id"]])
        self._reopen(slot, reason, time.time())
        self._schedule_round(0.0)

    def _revert(self, peer: str | None, lease_ids: list[str], everything: bool = False) -> None:
        if not peer or not (lease_ids or everything):
            return
        payload = {"deployment_id": self.id, "lease_ids": lease_ids, "everything": everything}
        try:
            self.send(node_handle(peer), REVERT, payload)
            self.messages += 1
        except Exception as exc:  # an unreachable peer's leases expire on their own
            self._uncertain.add(peer)
            log.debug("revert to %s not sent: %s", peer, exc)

    def _fail_unplaced(self, late: list[dict[str, Any]]) -> None:
        parts = []
        for slot in late:
            reasons = "; ".join(f"{p[-8:]}: {r}" for p, r in sorted(slot["reasons"].items()))
            parts.append(f"{slot['slot']}: {reasons or 'no peer fits'}")
        self._abort("not placed within the deadline: " + " | ".join(parts))

    def _abort(self, what: str) -> None:
        """Fail the deployment: stop what runs, give every lease back."""
        for slot in self.slots.values():
            if slot["status"] in ("running", "committing", "allocating"):
                self._stop_slot(slot)
        self._finish("failed", what)

    def _stop_slot(self, slot: dict[str, Any]) -> None:
        if slot.get("allocation") is not None:
            with contextlib.suppress(Exception):
                self.invoke(
                    allocation_handle(slot["allocation"]), STOP, on_reply=lambda _outcome: None
                )
        self._revert(slot["peer_id"], [slot["lease_id"]] if slot["lease_id"] else [])
        slot["status"] = "stopped"

    def _settle(self) -> None:
        """Derive the deployment's state from its slots, and save."""
        if self.state in TERMINAL:
            return
        statuses = [s["status"] for s in self.slots.values()]
        if all(s == "completed" for s in statuses):
            self._finish("completed", "every allocation completed")
            return
        if all(s in ("running", "completed") for s in statuses):
            if self.row["running_at"] is None:
                self.row["running_at"] = time.time()
            self._set_state("running")
        elif any(s == "allocating" for s in statuses):
            self._set_state("allocating")
        elif any(s == "committing" for s in statuses):
            self._set_state("committing")
        elif self._round_scheduled:
            self._set_state("queued")
        if self._dirty:  # every transition appends an event; a status echo changes nothing
            self._save()

    # ---- owner -------------------------------------------------------------------------

    @behaviour(SHUTDOWN)
    def shutdown(self, request: Request) -> dict[str, Any]:
        if self.state in TERMINAL:
            return self.summary()
        self._set_state("stopping")
        for slot in self.slots.values():
            if slot["status"] in ("running", "committing", "allocating"):
                self._stop_slot(slot)
            elif slot["status"] == "open":
                slot["status"] = "stopped"
        summary = self.summary()
        self._finish("shutdown", "shut down by the owner")
        summary["state"] = "shutdown"
        return summary

    def summary(self) -> dict[str, Any]:
        return summarize(self.row)


def summarize(row: dict[str, Any]) -> dict[str, Any]:
    """The status people and scripts read (from a live actor or the store)."""
    slots = row["slots"]
    return {
        "id": row["id"],
        "name": row["name"],
        "state": row["state"],
        "strategy": row["spec"].get("strategy"),
        "created_at": row["created_at"],
        "running_at": row.get("running_at"),
        "ended_at": row.get("ended_at"),
        "slots": [
            {
                "slot": s["slot"],
                "status": s["status"],
                "peer_id": s["peer_id"],
                "attempts": s["attempts"],
                "error": s["error"],
                "result": s["result"],
            }
            for s in slots
        ],
        "events": row["events"],
    }
