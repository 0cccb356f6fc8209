"""The node's provider side of placement: bids, commits, allocations, reverts.

Any peer may call these (``/dms/deployment/{request,commit,allocate,revert}``); the
lease holder is the caller's host, which the libp2p connection authenticates. Each
allocation runs as an :class:`AllocationActor` child, which stops as soon as it
ends: the node answers its late polls from its record (:class:`EndedAllocations`,
through the actor system's stand-in for ``alloc-`` inboxes). A role of
:class:`dms.node.node.NodeActor` (:class:`Bidding`); the requester's side is
``dms.orchestrator.requester``.
See ``specs/orchestration.md``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from dms.actor import ActorRef, ErrorCode, Handle, Refusal, Request, behaviour
from dms.actor.runtime import NodeRuntime
from dms.backoff import Backoff
from dms.jobs.allocation import (
    LOGS_BEHAVIOUR,
    SESSION_BEHAVIOUR,
    START,
    START_BEHAVIOUR,
    STATUS_BEHAVIOUR,
    STOP_BEHAVIOUR,
    AllocationActor,
    EndedAllocation,
    SessionCall,
)
from dms.jobs.executors import ExecutorError
from dms.network.peertable import GONE, PeerTable
from dms.network.transfer import Courier
from dms.orchestrator.messages import (
    ALLOCATE,
    BID,
    COMMIT,
    DEPLOYMENT_TOPIC,
    REQUEST,
    REVERT,
    AllocateRequest,
    Bid,
    BidRequest,
    CommitRequest,
    RevertRequest,
)
from dms.provider.bidder import BidderView, make_bid
from dms.provider.bidindex import BidIndex, bid_rows
from dms.provider.ended import EndedAllocations
from dms.provider.heldcheck import HeldChecks
from dms.provider.lapses import Lapses
from dms.provider.onboarding import need_ledger
from dms.resources import ALLOCATED, Preferences, ResourceError, ResourceLedger
from dms.resources.ledger import LeaseView
from dms.store import STORE_ERRORS, STORE_REFUSED, STORE_RETRY, Database, StoreBusy

log = logging.getLogger("dms.node")
DEPLOYMENT_REF = "dep:"
ALLOCATION_INBOX = "alloc-"  # an allocation's inbox: this and its lease id's start
BID_INDEX_FLUSH_S = 0.5
RELEASE_RETRY_FIRST_S = STORE_RETRY.first_s  # an ended allocation's lease the store
RELEASE_RETRY_MAX_S = STORE_RETRY.max_s  # refused: again after this, doubling up to this


class Stakes(Protocol):
    """The peers this node has a stake in (``dms.node.stakes.StakeBook``): a requester
    whose job runs here becomes one."""

    def __contains__(self, peer: object) -> bool: ...

    def note(self, peer: str, why: str) -> None: ...


@contextlib.contextmanager
def _store_refusal() -> Iterator[None]:
    """The store's error (a full disk, a locked or read-only file) raised inside, as a
    refusal ``store_refused`` with its first line: answered to the caller, counted and
    logged on one line (raised through the handler, it was a traceback per request).
    A store busy past the node's bound (``store_wait_s``: another process holds its
    database locked) is said so: the request may succeed when asked again later."""
    try:
        yield
    except StoreBusy as exc:
        reason = f"this node's store is busy, ask again later: {str(exc).splitlines()[0]}"
        raise ResourceError(STORE_REFUSED, reason) from None
    except STORE_ERRORS as exc:
        reason = f"this node's store refused: {str(exc).splitlines()[0]}"
        raise ResourceError(STORE_REFUSED, reason) from None


def _answers_to_requester(reply_to: Handle | None, requester: str, what: str) -> None:
    """A request may name where its answers go (``reply_to``: the bids of a gossip bid
    request, an allocation's updates), but only an actor of the requester's own host:
    else one broadcast would make every provider lease and send bids to a third party
    (reflection)."""
    if reply_to is not None and reply_to.address.host != requester:
        raise Refusal(
            ErrorCode.FORBIDDEN,
            f"{what}'s reply_to must be an actor of the requester's host {requester}, "
            f"not of {reply_to.address.host}",
        )


class Bidding:
    """The provider's side of placement: bids, commits, allocations and reverts.
    ``scores``: the benchmark scores bids carry (the provider's capability)."""

    def __init__(
        self,
        node: NodeRuntime,
        *,
        ledger: ResourceLedger | None,
        preferences: Preferences,
        peer_table: PeerTable,
        stakes: Stakes,
        scores: Callable[[], dict[str, float]],
        courier: Courier | None = None,
        db: Database | None = None,
        bid_index: BidIndex | None = None,
        labels: list[str] | None = None,
        max_bid_slots: int = 64,
        bid_requests_per_s_total: float = 100.0,
        bid_request_burst_total: int = 200,
        unknown_share: float = 0.5,
        orphan_s: float = 15.0,
        ended_allocations_kept: int = 256,
        ended_allocation_keep_s: float = 120.0,
        store_wait_s: float | None = None,
    ) -> None:
        self.node = node
        self.ledger = ledger
        self.preferences = preferences
        self.peer_table = peer_table
        self.stakes = stakes
        self.scores = scores
        self.courier = courier
        self.db = db
        self.labels = labels or []
        self.max_bid_slots = max_bid_slots
        self.bid_requests_per_s_total = bid_requests_per_s_total
        self.bid_request_burst_total = bid_request_burst_total
        self.unknown_share = unknown_share
        self.orphan_s = orphan_s
        self.store_wait_s = store_wait_s  # an allocation's thread's bound (store_bound)
        self._bid_index = (
            (bid_index or BidIndex(db, stake=stakes.__contains__)) if db is not None else None
        )
        self._lapses = Lapses(preferences.lapse_cooldown_s)
        self._allocations: dict[str, ActorRef] = {}
        # The final answers of the allocations that ended, for their late polls.
        self._ended = EndedAllocations(ended_allocations_kept, ended_allocation_keep_s)
        self._ended_early: set[str] = set()  # ended before their allocate registered them
        # Committed leases whose allocation has not started: only these lapse at
        # ``allocate_within_s`` (one that ran and ended may still be allocated while the
        # store refuses its release). Each leaves at its allocate or its watch.
        self._unstarted: set[str] = set()
        # Past allocate_within_s with no allocate, their release still to be taken by the
        # store: an allocate that came now would run on a lease about to be released.
        self._lapsing: set[str] = set()
        self._alloc_lock = threading.Lock()
        # Live requesters silent on an allocation are asked whether they still hold it.
        self.held_checks = HeldChecks(node, self._stop_allocation, every_s=orphan_s)
        self._topic_lock = threading.Lock()  # joins and leaves of the deployment topic

    def start(self) -> None:
        prefs = self.preferences
        # Requests to an allocation that ended (its actor stopped) come to this node's
        # actor while its record is kept (``ended_status`` and the others below).
        self.node.system.stand_in(
            ALLOCATION_INBOX, self.node.ref, self._ended.holds, self._ended.gone
        )
        # Checked by the receive pipeline before a request's signature or payload, so a
        # flood of them never queues in this actor's mailbox (dms.actor.admission).
        self.node.system.behaviour_limits.set(
            REQUEST,
            prefs.bid_requests_per_s,
            prefs.bid_request_burst,
            f"more than {prefs.bid_requests_per_s:g} bid requests a second from this peer "
            "(bid_requests_per_s)",
            total=self.bid_requests_per_s_total,
            total_burst=self.bid_request_burst_total,
        )
        if self.ledger is not None:
            # On the deployment topic only while this node takes work: every bid request
            # published there costs each subscriber its validation and delivery, and a
            # node with nothing onboarded would answer none (specs/security.md,
            # "Only providers hear bid requests").
            self.ledger.watch_onboarding(self._on_topic)
            self._on_topic(self.ledger.pools().is_onboarded)
        if self.db is not None:
            self._clean_orphaned_allocations()

    def _on_topic(self, onboarded: bool) -> None:
        with self._topic_lock:
            if onboarded:
                self.node.subscribe(DEPLOYMENT_TOPIC)
            else:
                self.node.unsubscribe(DEPLOYMENT_TOPIC)

    def _clean_orphaned_allocations(self) -> None:
        """Allocations made for deployments ran in the process that died: release them
        (their requesters see them gone and place them again)."""
        ledger = self.ledger
        if ledger is None:
            return
        for lease in ledger.live():
            if lease.state == ALLOCATED and lease.ref.startswith(DEPLOYMENT_REF):
                ledger.release(lease.id)
                ledger.db.record("allocation.cleaned", id=lease.id, ref=lease.ref)

    def _bidder(self) -> BidderView:
        if self.ledger is None:
            raise Refusal(ErrorCode.UNKNOWN_BEHAVIOUR, "this node does not take work")
        return BidderView(
            peer_id=self.node.system.peer_id,
            did=self.node.identity.did,
            ledger=self.ledger,
            preferences=self.preferences,
            scores=self.scores(),
            labels=self.labels,
            max_slots=self.max_bid_slots,
            stake=self.stakes.__contains__,
            unknown_share=self.unknown_share,
        )

    @behaviour(REQUEST, public=True, payload=BidRequest, topic=DEPLOYMENT_TOPIC)
    def bid_request(self, request: Request) -> Any:
        """Answer a bid request: the bid is the reply (direct) or is sent to ``reply_to``
        (a request heard on the deployment topic). A store that refuses (a full disk, a
        locked or read-only file) refuses the request ``store_refused``, with its reason:
        answered when asked directly, counted and logged on one line when heard on the
        topic (its error raised through the handler was a traceback per request)."""
        with _store_refusal():
            return self._bid_request(request)

    def _bid_request(self, request: Request) -> Any:
        payload: BidRequest = request.payload
        requester = request.sender.address.host
        if requester == self.node.system.peer_id:
            return None  # our own gossip request
        if payload.reply_to is not None and self.node.system.peer_id in payload.asked:
            # Heard on the topic, and its round asked this node directly too: that request
            # is the one answered (one bid, one set of leases, a round).
            return None
        _answers_to_requester(payload.reply_to, requester, "a bid request")
        cooling = self._lapses.waiting(requester)
        if cooling:
            if payload.reply_to is not None:
                return None  # heard on the topic: nothing to answer
            raise Refusal(
                ErrorCode.RATE_LIMITED,
                f"this peer committed leases here and never allocated them: no bids for "
                f"another {cooling:.0f} s (lapse_cooldown_s)",
            )
        full = self._bid_index.refusal(requester) if self._bid_index is not None else None
        if full:  # its bids would pass its share of the bid index: refused, not stored
            if payload.reply_to is not None:
                return None
            raise Refusal(ErrorCode.RATE_LIMITED, full)
        if payload.reply_to is None:
            bid = make_bid(payload, requester, request.sender.did, self._bidder())
            self._record_sent(bid, requester)
            return bid.model_dump()
        # Heard on the topic: answered only with an offer, so a node with nothing to
        # offer does no more (every subscriber hears every request: before, each wrote
        # a declined bid to its bid index, and tried a lease, per request heard).
        ledger = self.ledger
        if ledger is None or not ledger.pools().is_onboarded:
            return None
        bid = make_bid(payload, requester, request.sender.did, self._bidder())
        if bid.offers:
            self._record_sent(bid, requester)
            leases = [o.lease_id for o in bid.offers]
            self.node.invoke(
                payload.reply_to,
                BID,
                bid.model_dump(),
                # No longer than the leases hold: a requester that never answers does
                # not keep an invoke pending here for up to 10 minutes.
                timeout=min(payload.lease_s, self.preferences.max_lease_s),
                on_reply=lambda outcome: self._bid_refused(outcome, leases),
            )
        return None

    def _bid_refused(self, outcome: Any, lease_ids: list[str]) -> None:
        """A bid nobody took (the deployment ended, or it never arrived): free it now."""
        if not outcome.ok and self.ledger is not None:
            try:
                self.ledger.release_many(lease_ids)
            except STORE_ERRORS as exc:  # they expire on their own (lease_s)
                log.warning("bid nobody took: its leases are not released (%s)", exc)

    def _record_sent(self, bid: Bid, requester: str) -> None:
        """Queue this bid for the bid index; written in batches, off the bidding path."""
        if self._bid_index is None:
            return
        if self._bid_index.add(bid_rows(bid, requester)):
            self.node.call_later(BID_INDEX_FLUSH_S, self._flush_bids)

    def _flush_bids(self, retry_s: float = 0.0) -> None:
        """Write the queued bids. A store that is busy or refuses keeps them queued and
        is asked again, waiting longer each time (``retry_s``: the last wait)."""
        if self._bid_index is not None:
            try:
                self._bid_index.flush()
            except Exception as exc:
                retry = STORE_RETRY.after(retry_s) if retry_s else STORE_RETRY.first_s
                log.warning("bid index not written (%s): trying again in %g s", exc, retry)
                self.node.call_later(retry, lambda: self._flush_bids(retry))

    @behaviour(COMMIT, public=True, payload=CommitRequest)
    def commit(self, request: Request) -> dict[str, Any]:
        p: CommitRequest = request.payload
        holder = request.sender.address.host
        with _store_refusal():
            committed = self._need_ledger().commit(p.lease_id, holder=holder).as_dict()
        self._watch_allocated(p.lease_id)
        return committed

    def _watch_allocated(self, lease_id: str) -> None:
        """A commit that no allocation follows would hold the resources for ever."""
        with self._alloc_lock:
            # A commit sent again after its allocate, or before it: the first commit's
            # watch stands (one timer a lease, however often it is committed).
            if lease_id in self._allocations or lease_id in self._unstarted:
                return
            if lease_id in self._lapsing:  # committed again while its release waits
                return
            self._unstarted.add(lease_id)
        within = self.preferences.allocate_within_s
        self.node.call_later(within, lambda: self._allocated_in_time(lease_id, within))

    def _allocated_in_time(self, lease_id: str, within: float) -> None:
        with self._alloc_lock:
            if lease_id not in self._unstarted:
                # Its allocation started: running, or ended with its lease's release
                # still to come (a store that refused it), which is no lapse.
                return
            self._unstarted.discard(lease_id)
            self._lapsing.add(lease_id)  # no allocate starts it now (see _allocate)
        self._release_lapsed(lease_id, within, STORE_RETRY.first_s)

    def _release_lapsed(self, lease_id: str, within: float, wait_s: float) -> None:
        """Release a committed lease no allocate followed. A store that is busy or refuses
        is asked again, waiting longer each time: given up, the lease stayed allocated
        until the next restart."""
        ledger = self._need_ledger()
        try:
            lease = ledger.lease(lease_id)
            if lease.state == ALLOCATED:
                ledger.release(lease_id)
        except ResourceError as exc:
            log.warning("lease %s not released: %s", lease_id, exc)
            lease = None
        except STORE_ERRORS as exc:
            log.warning(
                "lease %s committed but not allocated within %g s; not released yet (%s): "
                "trying again in %g s", lease_id, within, str(exc).splitlines()[0], wait_s,
            )  # fmt: skip
            later = STORE_RETRY.after(wait_s)
            self.node.call_later(wait_s, lambda: self._release_lapsed(lease_id, within, later))
            return
        with self._alloc_lock:
            self._lapsing.discard(lease_id)
        if lease is None or lease.state != ALLOCATED:
            return
        cooldown = self._lapses.note(lease.holder)
        with contextlib.suppress(*STORE_ERRORS):  # the record only
            ledger.db.record(
                "allocation.never_started", id=lease_id, within_s=within, holder=lease.holder,
                cooldown_s=cooldown,
            )  # fmt: skip
        log.info(
            "lease %s committed but not allocated within %g s: released; no bids to %s "
            "for %g s", lease_id, within, lease.holder, cooldown,
        )  # fmt: skip

    @behaviour(ALLOCATE, public=True, payload=AllocateRequest)
    def allocate(self, request: Request) -> dict[str, Any] | None:
        with _store_refusal():
            return self._allocate(request)

    def _allocate(self, request: Request) -> dict[str, Any] | None:
        p: AllocateRequest = request.payload
        holder = request.sender.address.host
        with self._alloc_lock:
            lapsed = p.lease_id in self._lapsing
        if lapsed:
            raise ResourceError(
                "ended",
                f"lease {p.lease_id} was not allocated within allocate_within_s "
                f"({self.preferences.allocate_within_s:g} s): it is being released",
            )
        if p.commit:  # commit and allocate in one exchange (the commit checks the holder)
            _answers_to_requester(p.reply_to, holder, "an allocate")
            lease = self._need_ledger().commit(p.lease_id, holder=holder)
            # Its allocation starts in this exchange, so the commit needs no watch (a
            # timer and a turn of this actor's mailbox at allocate_within_s, a placement
            # each) unless it does not: then the lease lapses as a lone commit's does.
            spawned: list[bool] = []
            try:
                return self._start(request, p, lease, spawned)
            except BaseException:
                if not spawned:  # raised after its spawn (the answer): it started
                    self._watch_allocated(p.lease_id)
                raise
        return self._start(request, p, self._need_ledger().lease(p.lease_id))

    def _start(
        self,
        request: Request,
        p: AllocateRequest,
        lease: LeaseView,
        spawned: list[bool] | None = None,
    ) -> dict[str, Any] | None:
        """An allocation on the committed ``lease``: answered, then started. ``spawned``
        gets a ``True`` once its actor exists (whatever is raised after)."""
        holder = request.sender.address.host
        if lease.holder != holder:
            raise Refusal(ErrorCode.FORBIDDEN, f"lease {p.lease_id} is not held by the caller")
        _answers_to_requester(p.reply_to, lease.holder, "an allocate")
        if lease.state != ALLOCATED:
            raise ResourceError("ended", f"lease {p.lease_id} is {lease.state}, not committed")
        with self._alloc_lock:
            existing = self._allocations.get(p.lease_id)
        if existing is not None:  # a retried allocate: the same allocation
            return {"allocation": existing.handle.model_dump(), "status": None}
        requester = request.sender.address.host
        try:
            child = self.node.spawn(
                AllocationActor,
                lease_id=p.lease_id,
                deployment_id=p.deployment_id,
                slot=p.slot,
                executor=p.executor,
                params=p.params,
                requester_host=requester,
                reply_to=p.reply_to,
                on_end=self._allocation_ended,
                store_bound=self._store_bound,
                requester_gone=lambda heard_at: self._requester_gone(
                    requester, p.deployment_id, p.lease_id, heard_at
                ),
                resources=lease.resources,
                courier=self.courier,
                inbox=f"{ALLOCATION_INBOX}{p.lease_id[:16]}",
                autostart=False,
            )
        except ExecutorError:
            self._need_ledger().release(p.lease_id)
            raise
        if spawned is not None:
            spawned.append(True)
        # A real job of this requester here: it keeps its share of the global budgets.
        self.stakes.note(requester, "allocation")
        with self._alloc_lock:
            self._unstarted.discard(p.lease_id)  # started: no lapse, whenever it ends
            if p.lease_id in self._ended_early:  # it ended already (its record is kept)
                self._ended_early.discard(p.lease_id)
            else:
                self._allocations[p.lease_id] = child
        # Answered first, then the work starts: its start (and a short job's end, with
        # its lease's release) no longer runs ahead of the answer on this node, and its
        # end never reaches the requester before it (both go down one stream, in order).
        # Its state changes reach the requester as updates (and by polling).
        responder = request.defer()
        try:
            responder.ok({"allocation": child.handle.model_dump(), "status": {"state": "starting"}})
        finally:
            with contextlib.suppress(Exception):  # stopped meanwhile: nothing to start
                child.tell(START)
        return None

    @behaviour(REVERT, public=True, payload=RevertRequest)
    def revert(self, request: Request) -> dict[str, Any]:
        p: RevertRequest = request.payload
        holder = request.sender.address.host
        # Everything it holds for the deployment is found in the release's transaction.
        prefix = f"{DEPLOYMENT_REF}{p.deployment_id}/" if p.everything else None
        with _store_refusal():
            released = self._need_ledger().release_many(
                list(p.lease_ids), holder=holder, ref_prefix=prefix
            )
        for lease in released:
            self._stop_allocation(lease.id, "reverted by the requester")
        return {"released": [lease.id for lease in released]}

    def _requester_gone(
        self, peer_id: str, deployment_id: str, lease_id: str, heard_at: float
    ) -> bool:
        """Whether an allocation's requester is gone: it has not called the allocation
        for ``orphan_s`` (``heard_at``: its last call, or the allocate), and the peers
        table has it ``gone`` that long, or does not hold it at all (dropped, or never
        heard: then its calls are all there is to go by). Silent that long but alive, it
        is asked whether it still holds the lease (``held_checks``): a revert of its
        may have been lost."""
        now, orphan_s = time.time(), self.orphan_s
        if now - heard_at <= orphan_s:
            return False
        record = self.peer_table.get(peer_id)
        if record is None:
            return True
        if record.status == GONE and now - record.last_seen > orphan_s:
            return True
        self.held_checks.silent(peer_id, deployment_id, lease_id)
        return False

    def _store_bound(self) -> contextlib.AbstractContextManager[Any]:
        """An allocation's thread waits for the store ``store_wait_s`` at most, as the
        node's does: its lease's release at its end waited SQLite's 30 s on a file
        another process held locked, the allocation's actor frozen meanwhile. Refused
        now, and tried again on the node's thread (``_release_ended``)."""
        ledger = self.ledger
        if ledger is None or self.store_wait_s is None:
            return contextlib.nullcontext()
        return ledger.db.waiting_at_most(self.store_wait_s)

    def _allocation_ended(self, ended: EndedAllocation) -> None:
        """From the allocation's thread, before it stops: keep its final answers for
        late polls (a record, not its thread) and give its resources back (within the
        thread's bound, ``_store_bound``; past it, again later)."""
        self._ended.add(ended)
        lease_id = ended.lease_id
        self.held_checks.forget(lease_id)
        with self._alloc_lock:
            if self._allocations.pop(lease_id, None) is None:  # before ``allocate`` ran on
                self._ended_early.add(lease_id)
        self._release_ended(lease_id, RELEASE_RETRY_FIRST_S)

    # ---- an ended allocation's behaviours, answered from its record ------------------

    def _ended_for(self, request: Request) -> EndedAllocation:
        """The record of the ended allocation a request is for (the actor system gave it
        to this node's actor in its stead, ``ActorSystem.stand_in``)."""
        to = request.envelope.to
        record = self._ended.get(to.address.inbox, to.id) if to is not None else None
        if record is not None:
            return record
        inbox = to.address.inbox if to is not None else ""
        if not inbox.startswith(ALLOCATION_INBOX):  # asked of this node's actor itself
            raise Refusal(
                ErrorCode.UNKNOWN_BEHAVIOUR,
                f"{inbox} has no behaviour {request.envelope.behaviour}",
            )
        # Dropped between its delivery and now (its age or the count).
        raise Refusal(
            ErrorCode.UNKNOWN_ACTOR, f"no actor {inbox} with that key here ({self._ended.gone})"
        )

    @behaviour(STATUS_BEHAVIOUR, public=True)
    def ended_status(self, request: Request) -> dict[str, Any]:
        return self._ended_for(request).status_for(request, self.node.system)

    @behaviour(LOGS_BEHAVIOUR, public=True)
    def ended_logs(self, request: Request) -> list[str]:
        return self._ended_for(request).logs_for(request, self.node.system)

    @behaviour(START_BEHAVIOUR, public=True)
    def ended_start(self, request: Request) -> dict[str, Any]:
        return self._ended_for(request).status_for(request, self.node.system)

    @behaviour(STOP_BEHAVIOUR, public=True)
    def ended_stop(self, request: Request) -> dict[str, Any]:
        return self._ended_for(request).status_for(request, self.node.system)

    @behaviour(SESSION_BEHAVIOUR, public=True, payload=SessionCall)
    def ended_session(self, request: Request) -> None:
        raise self._ended_for(request).session_refusal(request)

    def _release_ended(self, lease_id: str, wait_s: float) -> None:
        """Release an ended allocation's lease. A store that refuses (a full disk, a
        locked database) is asked again, with growing waits, until it takes it: the
        allocation itself has stopped either way, and a restart releases it too."""
        if self.ledger is None:
            return
        try:
            self.ledger.release(lease_id)
        except ResourceError as exc:
            log.warning("allocation %s not released: %s", lease_id, exc)
        except STORE_ERRORS as exc:
            log.warning(
                "allocation %s ended; its lease is not released yet (%s): trying again in %g s",
                lease_id, str(exc).splitlines()[0], wait_s,
            )  # fmt: skip
            later = Backoff(RELEASE_RETRY_FIRST_S, RELEASE_RETRY_MAX_S).after(wait_s)
            self.node.call_later(wait_s, lambda: self._release_ended(lease_id, later))

    def _stop_allocation(self, lease_id: str, reason: str) -> None:
        with self._alloc_lock:
            child = self._allocations.get(lease_id)
        if child is not None:
            with contextlib.suppress(Exception):  # already stopped: nothing to do
                child.pykka_ref.proxy().request_stop(reason)

    def _need_ledger(self) -> ResourceLedger:
        return need_ledger(self.ledger)

    def allocations_released(self, ids: list[str]) -> None:
        """Stop the allocations of these leases (released by the node's owner)."""
        for lease_id in ids:
            self._stop_allocation(lease_id, "released by the node's owner")
