"""What the node actor works with besides the actor system: handed in by the daemon.

Every field may be absent (``None``) so the node actor also runs on the
in-memory transport in unit tests, where there is no store or libp2p host.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dms.network.host import Libp2pTransport
from dms.network.peerbook import PeerBook
from dms.network.peertable import PeerTable
from dms.network.transfer import ChunkNetwork
from dms.node.stakes import StakeBook
from dms.orchestrator.mining import SessionLimits
from dms.provider.bidindex import BidIndex
from dms.resources import Onboarder, Preferences, ResourceLedger
from dms.store import Database

if TYPE_CHECKING:
    from dms.orchestrator.reverts import Reverts
    from dms.provider.heldcheck import HeldChecks


@dataclass
class RoleCounts:
    """What the node's roles count as it happens that ``GET /metrics`` exports
    (``dms.node.metrics``): the requester's revert outbox and the provider's held
    checks. Made by the daemon, filled in by the node actor as it builds its roles
    (None until then, or without that role)."""

    reverts: Reverts | None = None
    held_checks: HeldChecks | None = None


@dataclass
class NodeServices:
    home: Path | None = None
    db: Database | None = None  # for pruning old rows (dms.store.retention)
    network: Libp2pTransport | None = None
    chunk_network: ChunkNetwork | None = None  # chunks go through this, if not the host
    peerbook: PeerBook | None = None
    ledger: ResourceLedger | None = None
    onboarder: Onboarder | None = None
    preferences: Preferences = field(default_factory=Preferences)
    peer_table: PeerTable = field(default_factory=PeerTable)
    heartbeat_s: float = 2.0
    heartbeat_budget_per_s: float = 10.0
    remember_every_s: float = 30.0
    expire_every_s: float = 5.0  # bookkeeping only: expired leases stop counting at once
    labels: list[str] = field(default_factory=list)
    orphan_s: float = 15.0  # stop an allocation whose requester is gone this long
    ended_allocations_kept: int = 256  # ended allocations whose final answers are kept
    ended_allocation_keep_s: float = 120.0  # ... this long after their end
    peer_forget_s: float = 3600.0  # drop a peer from the peers table once gone this long
    store_wait_s: float | None = 0.5  # longest the node's thread waits for the store
    # Start-up (the node actor's on_start) waits for the store until this (monotonic) at
    # most, telling ``store_progress(waited_s)`` as it waits; None: SQLite's busy timeout.
    store_start_deadline: float | None = None
    store_progress: Callable[[float], None] | None = None
    start_error: BaseException | None = None  # why the node actor's on_start failed
    retention_s: float = 7 * 24 * 3600.0  # prune rows of bids, events, ended leases after
    prune_every_s: float = 600.0  # how often the node prunes them
    supervise_s: float = 1.0  # how often a requester checks its running allocations
    chunk_quota: int = 2 * 1024**3  # most bytes the chunk store holds (dms.store.chunks)
    # Peers this node has a stake in (they keep their share of each global budget), the
    # bid index it writes its bids to, and the bid budgets (specs/security.md).
    stakes: StakeBook = field(default_factory=StakeBook)
    bid_index: BidIndex | None = None
    max_bid_slots: int = 64
    bid_requests_per_s_total: float = 100.0
    bid_request_burst_total: int = 200
    unknown_share: float = 0.5  # of each global budget, what peers without a stake use
    mining: SessionLimits = field(default_factory=SessionLimits)  # the owner's sessions
    collab_max_seats: int = 32  # collaborations this node takes part in at once
    collab_owner_timeout_s: float = 20.0  # each owner's answer, or it drops from the round
    collab_join_timeout_s: float = 120.0  # how long a proposal waits for the owners
    counts: RoleCounts = field(default_factory=RoleCounts)  # what /metrics reads of the roles
