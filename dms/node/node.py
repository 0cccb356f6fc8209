"""The node actor: the root actor of a node, at inbox ``root`` with the node's key.

It answers the public behaviours any peer may call and the ``/dms/node/*``
behaviours its owner (the root-anchored user key) calls through the CLI. It is a
composition (DESIGN decision 14): each role is a service built here with what it
needs, and the node routes the behaviours each declares to it:

- ``public``: hello, status, broadcast hellos (``dms.node.public``);
- ``caps``: capability anchors and revocations, child actors' roles (``dms.node.caps``);
- ``provider``: onboarding, resources, hardware (``dms.provider.onboarding``);
- ``bidding``: the provider's side of placement, allocations (``dms.provider.bidding``);
- ``requester``: the owner's deployments (``dms.orchestrator.requester``);
- ``mining``: the owner's mining sessions (``dms.orchestrator.mining_owner``);
- ``collab``: the owner's collaborations (``dms.node.collab``);
- ``heartbeats`` and ``peering``: peers and heartbeats (``dms.node.heartbeat_sync``,
  ``dms.node.peering``).

Slow work runs on a worker pool (``dms.node.workers``) and answers through
``Request.defer``, so the node's mailbox never stalls. Nor does its store: every
message the node handles (a peer's request, its owner's command, a timer, a
reply) waits for the store ``store_wait_s`` at most (``Database.waiting_at_most``),
then is refused ``store_refused`` saying the store is busy, or its timer tries again
later (specs/node.md, "A store another process holds locked").
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from dms.actor import Actor, ActorContext, Request
from dms.node.caps import Capabilities
from dms.node.chunks import open_courier
from dms.node.collab import Collab
from dms.node.heartbeat_sync import HeartbeatSync
from dms.node.peering import Peering
from dms.node.public import BROADCAST_TOPIC, Public
from dms.node.services import NodeServices
from dms.node.workers import WorkerPool
from dms.orchestrator.mining_owner import MiningOwner
from dms.orchestrator.requester import Requester
from dms.provider.bidding import Bidding
from dms.provider.onboarding import Benchmark, Provider
from dms.store import STORE_RETRY, StoreError
from dms.store.retention import prune

__all__ = ["BROADCAST_TOPIC", "STARTED", "NodeActor"]

# Asked of the node actor (pykka's ask) by Node.start: answered once on_start is done,
# with the store's error that ended it (``start_error``: Node.start raises it and stops
# the actor), else None. An actor whose on_start raised anything else is dead.
STARTED = "dms.node.started"

log = logging.getLogger("dms.node")


class NodeActor(Actor):
    def __init__(self, context: ActorContext, services: NodeServices | None = None) -> None:
        super().__init__(context)
        self.services = s = services or NodeServices()
        self._pool = WorkerPool(self.call_later, self._work_bound)
        db = s.onboarder.db if s.onboarder is not None else None
        self.courier = open_courier(s.home, s.network, s.chunk_network, s.chunk_quota)

        self.public = Public(self, s.network)
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
            ended_allocations_kept=s.ended_allocations_kept,
            ended_allocation_keep_s=s.ended_allocation_keep_s,
            store_wait_s=s.store_wait_s,
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
        self.requester = Requester(
            self,
            peer_table=s.peer_table,
            # a provider this node placed an allocation on is a stake of this node
            on_placed=lambda peer: s.stakes.note(peer, "placed"),
            db=db,
            home=s.home,
            supervise_s=s.supervise_s,
            store_wait_s=s.store_wait_s,
        )
        s.counts.reverts, s.counts.held_checks = self.requester.reverts, self.bidding.held_checks
        self.mining = MiningOwner(
            self,
            sessions=self.requester,
            courier=self.courier,
            limits=s.mining,
            network=s.network,
        )
        self.collab = Collab(
            self,
            sessions=self.requester,
            max_seats=s.collab_max_seats,
            owner_timeout_s=s.collab_owner_timeout_s,
            join_timeout_s=s.collab_join_timeout_s,
            home=s.home,
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
            stake=s.stakes.__contains__,
        )
        self._started = False  # on_start went through: peering runs (and stops at the end)
        for role in (
            self.public,
            self.caps,
            self.provider,
            self.bidding,
            self.requester,
            self.mining,
            self.collab,
            self.heartbeats,
            self.peering,
        ):
            self.route(role)

    def on_start(self) -> None:
        """The roles start in this order: capabilities first (the roles of the child
        actors that bidding and the requester spawn); the provider reads its benchmark
        and expires what ran out while the node was down before bids are answered; the
        requester resumes its deployments (and the collaboration role the
        collaborations it kept); peering last, so the first heartbeat carries
        the provider's figures."""
        s = self.services
        until = None if s.store_start_deadline is None else s.store_start_deadline
        waiting = (
            s.db.waiting_until(max(0.0, until - time.monotonic()), s.store_progress)
            if s.db is not None and until is not None
            else contextlib.nullcontext()
        )
        # Start-up's store work (expiry, the restored record, resumed deployments) waits
        # for a store another process holds locked until start-up's deadline at most
        # (store_start_wait_s, with dms run's own): past it the node does not start, and
        # Node.start says why (specs/node.md, "Start-up on a locked store").
        try:
            with waiting:
                self.caps.start()
                self.public.start()
                self.provider.start()
                self.bidding.start()
                self.requester.start()
                self.collab.start()  # after the requester: a kept collaboration places again
                self.peering.start()
        except StoreError as exc:
            # Not raised: pykka would log it with its traceback before Node.start said it
            # in one line. The actor waits for Node.start's stop (specs/node.md).
            log.debug("the node actor did not start: %s", exc)
            s.start_error = exc
            return
        self._started = True
        self.call_later(self.services.prune_every_s, self._prune)

    def on_message(self, message: Any) -> Any:
        if message == STARTED:  # Node.start asks, once on_start is done
            return self.services.start_error
        return super().on_message(message)

    def on_receive(self, message: Any) -> Any:
        """Every message within the store's bound (see the module docstring)."""
        with self._work_bound():
            return super().on_receive(message)

    def _work_bound(self) -> contextlib.AbstractContextManager[Any]:
        """The store's bound for the node's work, on the thread that enters it: its
        messages, its worker pool's work (``store_wait_s``; none without a store). Not
        ``Actor.store_bound``, which would bound start-up too: it has a deadline of its
        own (``StartWait``)."""
        db, wait_s = self.services.db, self.services.store_wait_s
        if db is None or wait_s is None:
            return contextlib.nullcontext()
        return db.waiting_at_most(wait_s)

    def stopping(self) -> None:
        """Work in the pool is abandoned, the revocation checks stop, and peers hear
        this node leave (its children stop after this). Within the store's bound: the
        peers' last flush waits for a store another process holds locked
        ``store_wait_s`` at most, as every message does."""
        self._pool.shutdown()
        self.caps.stop()
        if not self._started:  # its start failed: peers never heard of it
            return
        with self._work_bound():
            self.peering.stop()

    # ---- what the roles get from the node (dms.actor.runtime.NodeRuntime) -------------

    def in_background(
        self,
        request: Request,
        work: Callable[[], Any],
        then: Callable[[Any], Any] | None = None,
    ) -> None:
        """Run slow ``work`` off the mailbox and answer when it is done
        (:meth:`WorkerPool.run`)."""
        self._pool.run(request, work, then)

    def announce(self) -> None:
        """Tell peers about a change now (a heartbeat), not at the next tick."""
        self.peering.announce()

    def _prune(self, retry_s: float = 0.0) -> None:
        """Rows of bids, events and ended leases older than ``retention_s`` go. A store that
        is busy or refuses is asked again sooner, waiting longer each time (``retry_s``:
        the last wait), up to the usual period."""
        every = self.services.prune_every_s
        if self.services.db is not None:
            try:
                counts = prune(self.services.db, self.services.retention_s)
                if any(counts.values()):
                    log.info("pruned rows older than %g s: %s", self.services.retention_s, counts)
            except Exception as exc:
                retry = min(every, STORE_RETRY.after(retry_s) if retry_s else STORE_RETRY.first_s)
                log.warning("could not prune old rows (%s): trying again in %g s", exc, retry)
                self.call_later(retry, lambda: self._prune(retry))
                return
        self.call_later(every, self._prune)
