"""The resource ledger: onboarded = free + locked + allocated, in one transaction each.

Every transition (onboard, lock, commit, release, expire, offboard) is a single
database transaction, and transitions queue for each other: on SQLite each one
begins with ``BEGIN IMMEDIATE`` (see ``dms.store.db``); on PostgreSQL each one
first locks the ``leases`` table against other writers
(``Database.transaction(exclusive=...)``). So the check "does it still fit?"
and the write that takes the resources happen under one lock: threads and
processes sharing the store cannot both take the last core, nor commit a lease
that another has just released. (Row locks would not do: what a lock checks is a
sum over every live lease, and the row a new lease adds does not exist yet.
Serializable isolation would, but a failed transition would then have to be run
again, and a transition here is the body of a ``with`` block, which cannot be.)

``free`` is never stored: it is what the onboarded row leaves after the live
leases and allocations, so it cannot drift from them. A lease past its
``expires_at`` stops counting at once, even before :meth:`ResourceLedger.expire`
marks it ``expired`` for the record. A lease's state is a ``LeaseState`` and
every write of one is checked against the table ``LEASE`` (``dms.statemachine``):
``locked -> allocated | expired | released``, ``allocated -> released``.

Reading the pools is the hot path (every bid, every heartbeat), so
:meth:`ResourceLedger.pools` keeps the last answer until this ledger writes
again or the earliest live lease expires, whichever comes first. The ledger is
the only writer of its store while it lives (the daemon's; the CLI writes the
store itself only when no daemon runs); transitions read inside their own
transaction and never use the snapshot.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, and_, case, func, insert, or_, select, update

from dms.errors import DmsError
from dms.resources.amounts import KINDS, ZERO, Resources, show
from dms.statemachine import Machine
from dms.store import Database, StoreError
from dms.store.errors import client_command
from dms.store.models import Event, Lease, Onboarding, utcnow
from dms.store.sql import Statement, json_text

LEASES = Lease.__table__
ONBOARDING = Onboarding.__table__
EVENTS = Event.__table__

log = logging.getLogger("dms.resources")


class LeaseState(StrEnum):
    LOCKED = "locked"  # held for a bid, until it is committed or expires
    ALLOCATED = "allocated"  # committed: an allocation runs on it
    RELEASED = "released"
    EXPIRED = "expired"


LOCKED, ALLOCATED, RELEASED, EXPIRED = LeaseState
# locked -> allocated (commit) | expired | released; allocated -> released.
LEASE = Machine(
    "lease",
    LeaseState,
    {
        LOCKED: {ALLOCATED, EXPIRED, RELEASED},
        ALLOCATED: {RELEASED},
        RELEASED: set(),
        EXPIRED: set(),
    },
)
LIVE_STATES = LEASE.live
MAX_LEASE_S = 3600.0


class ResourceError(DmsError):
    """A transition the ledger refuses; ``code`` says which kind, for replies."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True)
class Held:
    """What one holder's live leases and allocations hold here, and how many they are."""

    count: int
    amount: Resources


@dataclass(frozen=True)
class Pools:
    onboarded: Resources
    locked: Resources
    allocated: Resources
    price: float = 0.0
    allocations: int = 0
    leases: int = 0
    # Per holder, read in the same transaction when ``lock_many(holders=True)`` asks.
    holders: Mapping[str, Held] = field(default_factory=dict, compare=False)

    @property
    def free(self) -> Resources:
        return Resources.of([max(0, v) for v in self.onboarded.minus(self.locked + self.allocated)])

    @property
    def is_onboarded(self) -> bool:
        return not self.onboarded.is_zero()

    def violations(self) -> list[str]:
        """Where locked + allocated exceeds onboarded (empty when the invariant holds)."""
        used = self.locked + self.allocated
        return [
            f"{kind}: locked+allocated {show(kind, u)} > onboarded {show(kind, o)}"
            for kind, u, o in zip(KINDS, used.as_tuple(), self.onboarded.as_tuple(), strict=True)
            if u > o
        ]

    def as_dict(self) -> dict[str, object]:
        return {
            "onboarded": self.onboarded.human(),
            "free": self.free.human(),
            "locked": self.locked.human(),
            "allocated": self.allocated.human(),
            "price": self.price,
            "allocations": self.allocations,
            "leases": self.leases,
        }


@dataclass(frozen=True)
class LeaseView:
    id: str
    state: LeaseState
    resources: Resources
    holder: str
    ref: str
    expires_at: float | None

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "state": self.state.value,
            "resources": self.resources.human(),
            "holder": self.holder,
            "ref": self.ref,
            "expires_at": self.expires_at,
        }


# The statements every transition runs, as SQL (``dms.store.sql``: a Core statement cost
# ~15 times what SQLite spends on it, and a bid is four of them). A lease's row is read as
# the columns of ``_LEASE_COLUMNS``, in that order (``_view``).
_LIVE = "(state = 'allocated' OR (state = 'locked' AND expires_at > :now))"
_LEASE_COLUMNS = "id, state, cpu_milli, ram_mib, disk_mib, gpu, holder, ref, expires_at"
_ONBOARDED = Statement(
    "SELECT cpu_milli, ram_mib, disk_mib, gpu, price FROM onboarding WHERE id = 1"
)
# Live leases and allocations, summed per state: the one query every transition runs.
_SUMS = Statement(
    "SELECT state, SUM(cpu_milli), SUM(ram_mib), SUM(disk_mib), SUM(gpu), COUNT(*), "
    f"MIN(expires_at) FROM leases WHERE {_LIVE} GROUP BY state"
)
# Each holder's live leases and allocations: how many, and what they hold.
_HOLDERS = Statement(
    "SELECT holder, COUNT(*), SUM(cpu_milli), SUM(ram_mib), SUM(disk_mib), SUM(gpu) "
    f"FROM leases WHERE {_LIVE} GROUP BY holder"
)
_HELD = Statement(
    "SELECT SUM(cpu_milli), SUM(ram_mib), SUM(disk_mib), SUM(gpu) "
    f"FROM leases WHERE {_LIVE} AND holder = :holder"
)
_GET = Statement(f"SELECT {_LEASE_COLUMNS} FROM leases WHERE id = :id")
_LIVE_LEASES = Statement(
    f"SELECT {_LEASE_COLUMNS} FROM leases WHERE {_LIVE} ORDER BY created_at, id"
)
_INSERT = Statement(
    "INSERT INTO leases (id, state, cpu_milli, ram_mib, disk_mib, gpu, holder, ref, "
    "created_at, expires_at) VALUES (:id, :state, :cpu_milli, :ram_mib, :disk_mib, :gpu, "
    ":holder, :ref, :created_at, :expires_at)"
)
_ALLOCATE = Statement(
    "UPDATE leases SET state = :state, committed_at = :now, expires_at = NULL, ref = :ref "
    "WHERE id = :id"
)
_END = Statement("UPDATE leases SET state = :state, ended_at = :now WHERE id = :id")
# A holder's live leases and allocations whose ref starts with a prefix (a deployment's,
# all it holds here, when its requester reverts everything at its end). The prefix is
# compared exactly (no LIKE: no escaping, and the same answer on SQLite and PostgreSQL).
_LIVE_IDS = Statement(
    f"SELECT id FROM leases WHERE {_LIVE} AND holder = :holder "
    "AND substr(ref, 1, :length) = :prefix ORDER BY created_at, id"
)
_EVENT = Statement("INSERT INTO events (at, kind, data) VALUES (:at, :kind, :data)")
# The event's time as SQLAlchemy's column type writes it, per dialect (a string on
# SQLite, the datetime itself for psycopg): the row reads back through the ORM as any
# other event. Its bind processor, taken once per dialect.
_EVENT_AT: dict[str, Any] = {}


def _sums(
    conn: Connection, values: tuple[Any, ...], what: str = "the leases' amounts", *args: Any
) -> Resources:
    """Amounts from their columns (``what.format(*args)``: whose, for the error a value
    that is no number raises; formatted only then, off the transitions' path)."""
    try:
        return Resources.of([int(v or 0) for v in values])
    except (TypeError, ValueError):
        raise _damaged(conn, what.format(*args), values) from None


def _number(conn: Connection, value: Any, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _damaged(conn, what, value) from None


def _damaged(conn: Connection, what: str, values: Any) -> StoreError:
    """A ledger row that holds what is no number where one belongs (a hand edit, disk
    trouble): each read of it raised Python's conversion error, out of the node's start
    and ``dms resources``. Nothing can be counted from it, so nothing is: the command
    or the start fails, saying which row and what to do."""
    return StoreError(
        f"the store is damaged: {what}: {values!r} where numbers belong; correct or delete "
        f"that row of the database ({client_command(conn.engine.url)}), then try again"
    )


def _view(conn: Connection, row: tuple[Any, ...]) -> LeaseView:
    """A lease from its row (the columns of ``_LEASE_COLUMNS``)."""
    amounts = _sums(conn, row[2:6], "lease {}'s amounts", row[0])
    return LeaseView(row[0], LeaseState(row[1]), amounts, row[6], row[7], row[8])


def _live_clause(now: float) -> Any:
    return or_(
        LEASES.c.state == ALLOCATED, and_(LEASES.c.state == LOCKED, LEASES.c.expires_at > now)
    )


def _amounts_text(resources: Resources) -> str:
    amounts = resources.human()
    return f"{amounts['cpu']:g} cpu, {amounts['ram_gib']:g} GiB RAM"


def _log_locks(
    requests: list[tuple[Resources, str]],
    results: list[LeaseView | ResourceError],
    holder: str,
) -> None:
    """One line per lock: a bid (refs ``dep:<deployment>/<slot>``) made or declined."""
    leases = [r for r in results if isinstance(r, LeaseView)]
    refused = [r for r in results if isinstance(r, ResourceError)]
    bid = any(ref.startswith("dep:") for _, ref in requests)
    what = f"bid to {holder or 'this node'}" if bid else "lock"
    if leases:
        refs = ", ".join(f"{lease.ref or lease.id[:12]} ({_amounts_text(lease.resources)})"
                         for lease in leases[:5])  # fmt: skip
        more = f"; declined {len(refused)}: {refused[0].message}" if refused else ""
        log.info("%s: %d lease(s) locked: %s%s", what, len(leases), refs, more)
    elif refused:
        log.info("%s declined (%d slot(s)): %s", what, len(refused), refused[0].message)


def _over_share(held: Resources, onboarded: Resources, share: float) -> str | None:
    """Why one holder may not hold ``held`` (this lease included) of ``onboarded``, or None:
    it would hold more than ``share`` of some kind (``Preferences.max_peer_share``)."""
    for kind, have, total in zip(KINDS, held.as_tuple(), onboarded.as_tuple(), strict=True):
        if total and have > share * total:
            return (
                f"this requester would hold {show(kind, have)} of this node's "
                f"{show(kind, total)}, more than its share (max_peer_share {share:g})"
            )
    return None


def _event(conn: Connection, kind: str, data: dict[str, Any]) -> None:
    dialect = conn.dialect
    if dialect.name not in _EVENT_AT:
        _EVENT_AT[dialect.name] = EVENTS.c.at.type.bind_processor(dialect)
    at, now = _EVENT_AT[dialect.name], utcnow()
    _EVENT.run(conn, {"at": at(now) if at else now, "kind": kind, "data": json_text(data)})


class ResourceLedger:
    """Onboarding, leases and allocations of one node, kept in its store.

    Transitions run their SQL on one connection each (``dms.store.sql``): they run
    many times a second, and building statements would cost more than the SQL."""

    def __init__(
        self,
        db: Database,
        clock: Callable[[], float] = time.time,
        holder_share: Callable[[], float] = lambda: 1.0,
    ) -> None:
        self.db = db
        self.clock = clock
        # The largest share of each onboarded resource one holder may hold at once
        # (``Preferences.max_peer_share``, read at each lock: it may change live).
        self.holder_share = holder_share
        # (pools, valid until): dropped by every write; see the module docstring.
        self._snapshot: tuple[Pools, float] | None = None
        self._writes = 0
        self._snapshot_lock = threading.Lock()
        self._onboarding_watchers: list[Callable[[bool], None]] = []

    def watch_onboarding(self, watcher: Callable[[bool], None]) -> None:
        """``watcher(onboarded)`` after each onboard (True) or offboard (False) this ledger
        commits, on the caller's thread (the bidding role joins the deployment topic
        only while the node takes work)."""
        self._onboarding_watchers.append(watcher)

    def _onboarding_changed(self, onboarded: bool) -> None:
        for watcher in list(self._onboarding_watchers):
            try:
                watcher(onboarded)
            except Exception:
                log.exception("an onboarding watcher failed")

    # ---- reading -------------------------------------------------------------------

    def pools(self, wait_s: float | None = None) -> Pools:
        """The pools now. ``wait_s``: wait no longer for the store (its other writers,
        another process's lock), else raise (``Database.transaction``)."""
        now = self.clock()
        snapshot = self._snapshot
        if snapshot is not None and now < snapshot[1]:
            return snapshot[0]
        writes = self._writes
        with self.db.snapshot(wait_s) as conn:  # onboarding and the sums from one moment
            # The time of that moment, read inside it: a time read before could come
            # before a lock it then sees, and count as live the lease it replaced.
            pools, valid_until = self._read_pools(conn, self.clock())
        with self._snapshot_lock:
            if writes == self._writes:  # no write landed meanwhile: the answer is current
                self._snapshot = (pools, valid_until)
        return pools

    def lease_counts(self) -> dict[str, int]:
        """How many leases are in each state, a locked one past its expiry counted as
        ``expired`` (as it holds nothing), all at one moment: the time is read inside the
        snapshot, as in :meth:`pools` (read before, a lease that expired and whose
        resources a new lock took while the read queued counted as locked beside it)."""
        with self.db.snapshot() as conn:
            now = self.clock()
            state = case(
                (and_(LEASES.c.state == LOCKED, LEASES.c.expires_at <= now), EXPIRED),
                else_=LEASES.c.state,
            )
            rows = conn.execute(select(state, func.count()).group_by(state)).all()
        return {str(s): int(n) for s, n in rows}

    def lease(self, lease_id: str) -> LeaseView:
        with self.db.transaction() as conn:
            return _view(conn, self._get(conn, lease_id))

    def live(self) -> list[LeaseView]:
        """Leases that still hold resources and allocations, oldest first."""
        with self.db.snapshot() as conn:
            now = self.clock()
            return [_view(conn, r) for r in _LIVE_LEASES.run(conn, {"now": now}).fetchall()]

    # ---- transitions -----------------------------------------------------------------

    def onboard(self, amounts: Resources, price: float = 0.0) -> Pools:
        """Set (or change) what this node contributes; what is in use must still fit."""
        if amounts.is_zero():
            raise ResourceError("invalid", "onboarding needs some cpu, ram or disk")
        if price < 0:
            raise ResourceError("invalid", "price must not be negative")
        with self._writing() as (conn, now):
            pools = self._pools(conn, now)
            in_use = pools.locked + pools.allocated
            conflicts = [
                f"{kind} {show(kind, want)} < {show(kind, used)} in use"
                for kind, want, used in zip(
                    KINDS, amounts.as_tuple(), in_use.as_tuple(), strict=True
                )
                if want < used
            ]
            if conflicts:
                raise ResourceError(
                    "conflict",
                    "cannot onboard less than is locked or allocated: " + "; ".join(conflicts),
                )
            values = {**amounts.model_dump(), "price": price, "updated_at": now}
            if pools.is_onboarded or conn.execute(select(ONBOARDING.c.id)).first():
                conn.execute(update(ONBOARDING).where(ONBOARDING.c.id == 1).values(**values))
            else:
                conn.execute(insert(ONBOARDING).values(id=1, **values))
            _event(conn, "resources.onboarded", {**amounts.human(), "price": price})
            pools = self._pools(conn, now)
        self._onboarding_changed(True)
        return pools

    def offboard(self, force: bool = False) -> list[LeaseView]:
        """Withdraw from the network. Refused while anything is held, unless ``force``,
        which releases every lease and allocation (returned, so the caller can stop them)."""
        with self._writing() as (conn, now):
            live = [_view(conn, r) for r in _LIVE_LEASES.run(conn, {"now": now}).fetchall()]
            if live and not force:
                allocs = sum(1 for r in live if r.state == ALLOCATED)
                raise ResourceError(
                    "conflict",
                    f"{allocs} allocation(s) and {len(live) - allocs} lease(s) are live; "
                    "use --force to stop them and offboard",
                )
            if live:
                for lease in live:
                    LEASE.check(lease.state, RELEASED, lease.id[:12])
                conn.execute(
                    update(LEASES)
                    .where(LEASES.c.id.in_([r.id for r in live]))
                    .values(state=RELEASED, ended_at=now)
                )
            conn.execute(ONBOARDING.delete())
            _event(conn, "resources.offboarded", {"released": [r.id for r in live]})
        self._onboarding_changed(False)
        return live

    def lock(
        self, request: Resources, lease_s: float, holder: str = "", ref: str = ""
    ) -> LeaseView:
        """Hold ``request`` for ``lease_s`` seconds; raises ``ResourceError`` with the reason
        (not onboarded, or which kinds are short) when it does not fit."""
        results, _ = self.lock_many([(request, ref)], lease_s, holder)
        if isinstance(results[0], ResourceError):
            raise results[0]
        return results[0]

    def lock_many(
        self,
        requests: list[tuple[Resources, str]],
        lease_s: float,
        holder: str = "",
        screen: Callable[[Pools], list[str | None]] | None = None,
        holders: bool = False,
    ) -> tuple[list[LeaseView | ResourceError], Pools]:
        """Lock each ``(request, ref)`` that still fits, in order, in one transaction (a bid
        for several allocations); returns a lease or the reason for each, and the pools after.

        ``screen(pools)``, when given, sees the pools the transaction read and returns a
        refusal (or ``None``) for each request: a bidder's checks that depend on price or
        on the allocations held cost no second transaction. A refusal comes back as a
        ``ResourceError`` with code ``declined``. With ``holders``, the pools it sees hold
        what each holder holds (``Pools.holders``), from the same transaction: a bid
        needs no other one for its per-requester caps."""
        if not 0 < lease_s <= MAX_LEASE_S:
            raise ResourceError("invalid", f"lease_s must be in (0, {MAX_LEASE_S:g}]")
        share = self.holder_share() if holder else 1.0
        results: list[LeaseView | ResourceError] = []
        with self._writing() as (conn, now):
            pools = self._pools(conn, now)
            if holders:
                pools = replace(pools, holders=self._holders(conn, now))
            refusals = screen(pools) if screen is not None else [None] * len(requests)
            locked = pools.locked
            held = self._held(conn, holder, now) if share < 1.0 else ZERO
            for (request, ref), refusal in zip(requests, refusals, strict=True):
                if refusal is None and share < 1.0:
                    refusal = _over_share(held + request, pools.onboarded, share)
                if refusal is not None:
                    results.append(ResourceError("declined", refusal))
                    continue
                free = Resources.of(
                    [max(0, v) for v in pools.onboarded.minus(locked + pools.allocated)]
                )
                if request.is_zero():
                    results.append(ResourceError("invalid", "a lease must ask for some resources"))
                    continue
                if not pools.is_onboarded:
                    results.append(ResourceError("not_onboarded", "this node is not onboarded"))
                    continue
                short = request.shortfall(free)
                if short:
                    reason = "not enough resources: " + "; ".join(short)
                    results.append(ResourceError("insufficient", reason))
                    continue
                lease = LeaseView(uuid.uuid4().hex, LOCKED, request, holder, ref, now + lease_s)
                _INSERT.run(
                    conn,
                    {"id": lease.id, "state": LOCKED.value, "cpu_milli": request.cpu_milli,
                     "ram_mib": request.ram_mib, "disk_mib": request.disk_mib,
                     "gpu": request.gpu, "holder": holder, "ref": ref, "created_at": now,
                     "expires_at": lease.expires_at},
                )  # fmt: skip
                locked = locked + request
                held = held + request
                results.append(lease)
        _log_locks(requests, results, holder)
        after = Pools(
            onboarded=pools.onboarded,
            locked=locked,
            allocated=pools.allocated,
            price=pools.price,
            allocations=pools.allocations,
            leases=pools.leases + sum(isinstance(r, LeaseView) for r in results),
        )
        return results, after

    def commit(self, lease_id: str, ref: str | None = None, holder: str | None = None) -> LeaseView:
        """Turn a live lease into an allocation (same id); ``holder``, when given, must be
        the one the lease was made for."""
        with self._writing() as (conn, now):
            row = _view(conn, self._get(conn, lease_id, holder))
            if row.state == ALLOCATED:
                return row  # committing twice is harmless: a retried message
            if row.state != LOCKED:
                raise ResourceError("ended", f"lease {lease_id} is {row.state}")
            expired = (row.expires_at or 0) <= now
            if expired:
                LEASE.check(row.state, EXPIRED, lease_id[:12])
                _END.run(conn, {"state": EXPIRED.value, "now": now, "id": lease_id})
            else:
                LEASE.check(row.state, ALLOCATED, lease_id[:12])
                row = replace(row, state=ALLOCATED, ref=row.ref if ref is None else ref,
                              expires_at=None)  # fmt: skip
                _ALLOCATE.run(
                    conn, {"state": ALLOCATED.value, "now": now, "ref": row.ref, "id": lease_id}
                )
                _event(conn, "resources.allocated", {"id": lease_id, "ref": row.ref})
        if expired:  # raised after the transaction, so the expiry is recorded
            log.info("lease %s (%s) expired before its commit", lease_id[:12], row.ref)
            raise ResourceError("expired", f"lease {lease_id} expired before commit")
        won = "bid won: " if row.ref.startswith("dep:") else ""
        log.info("%slease %s committed for %s (%s)", won, lease_id[:12], row.holder, row.ref)
        return row

    def release(self, lease_id: str, holder: str | None = None) -> LeaseView:
        """Give back a lease or an allocation; releasing an ended one changes nothing."""
        return self.release_many([lease_id], holder, strict=True)[0]

    def release_many(
        self,
        lease_ids: list[str],
        holder: str | None = None,
        strict: bool = False,
        ref_prefix: str | None = None,
    ) -> list[LeaseView]:
        """Release several in one transaction. Unknown ids, and ids not held by ``holder``
        when it is given, raise with ``strict`` and are skipped without it. With
        ``ref_prefix`` (and ``holder``), also every live lease and allocation of
        ``holder`` whose ref starts with it, found in the same transaction (what
        ``live_ids`` would list: a requester's revert of everything it holds for a
        deployment costs one transaction, not two)."""
        out = []
        ended: list[str] = []
        with self._writing() as (conn, now):
            if ref_prefix is not None and holder is not None:
                named = set(lease_ids)
                found = self._live_ids(conn, ref_prefix, holder, now)
                lease_ids = [*lease_ids, *(i for i in found if i not in named)]
            for lease_id in lease_ids:
                try:
                    row = _view(conn, self._get(conn, lease_id, holder))
                except ResourceError:
                    if strict:
                        raise
                    continue
                if row.state in LIVE_STATES:
                    LEASE.check(row.state, RELEASED, lease_id[:12])
                    ended.append(f"{row.ref or row.id[:12]} ({row.state})")
                    if row.state == ALLOCATED:
                        _event(conn, "resources.released", {"id": row.id, "ref": row.ref})
                    _END.run(conn, {"state": RELEASED.value, "now": now, "id": lease_id})
                    row = replace(row, state=RELEASED)
                out.append(row)
        if ended:
            shown = ", ".join(ended[:5]) + (f" and {len(ended) - 5} more" if len(ended) > 5 else "")
            log.info("released %d lease(s): %s", len(ended), shown)
        return out

    @staticmethod
    def _holders(conn: Connection, now: float) -> dict[str, Held]:
        """Each holder's live leases and allocations: how many, and what they hold."""
        rows = _HOLDERS.run(conn, {"now": now}).fetchall()
        return {str(r[0]): Held(int(r[1]), _sums(conn, r[2:6])) for r in rows}

    @staticmethod
    def _held(conn: Connection, holder: str, now: float) -> Resources:
        """What ``holder``'s live leases and allocations hold."""
        return _sums(conn, _HELD.run(conn, {"now": now, "holder": holder}).fetchone())

    def held_by_holder(self) -> dict[str, Resources]:
        """What each holder's live leases and allocations hold (a row per holder)."""
        with self.db.transaction() as conn:
            return {h: held.amount for h, held in self._holders(conn, self.clock()).items()}

    def held_by(self, holder: str) -> int:
        """How many live leases and allocations ``holder`` holds here."""
        with self.db.transaction() as conn:
            now = self.clock()
            query = select(func.count()).where(_live_clause(now), LEASES.c.holder == holder)
            return int(conn.scalar(query.select_from(LEASES)) or 0)

    def committed_holders(self, limit: int) -> list[str]:
        """Up to ``limit`` holders that committed a lease here (an allocation, live or
        ended and not yet pruned), the most recent last."""
        latest = func.max(LEASES.c.committed_at)
        with self.db.transaction() as conn:
            rows = conn.execute(
                select(LEASES.c.holder, latest)
                .where(LEASES.c.committed_at.is_not(None), LEASES.c.holder != "")
                .group_by(LEASES.c.holder)
                .order_by(latest.desc())
                .limit(limit)
            ).all()
        return [str(r[0]) for r in reversed(rows)]

    def live_ids(self, ref_prefix: str, holder: str) -> list[str]:
        """Ids of live leases and allocations of ``holder`` whose ref starts with the prefix."""
        with self.db.transaction() as conn:
            return self._live_ids(conn, ref_prefix, holder, self.clock())

    @staticmethod
    def _live_ids(conn: Connection, ref_prefix: str, holder: str, now: float) -> list[str]:
        params = {"now": now, "holder": holder, "length": len(ref_prefix), "prefix": ref_prefix}
        return [str(r[0]) for r in _LIVE_IDS.run(conn, params).fetchall()]

    def expire(self) -> list[str]:
        """Mark leases past their expiry as ``expired``; returns their ids."""
        with self._writing() as (conn, now):
            ids = list(
                conn.scalars(
                    select(LEASES.c.id).where(LEASES.c.state == LOCKED, LEASES.c.expires_at <= now)
                )
            )
            if ids:
                LEASE.check(LOCKED, EXPIRED)  # the query took locked leases only
                conn.execute(
                    update(LEASES).where(LEASES.c.id.in_(ids)).values(state=EXPIRED, ended_at=now)
                )
            return ids

    # ---- internals -------------------------------------------------------------------

    @contextmanager
    def _writing(self) -> Iterator[tuple[Connection, float]]:
        """A write transaction and the time it acts at; the pools snapshot is dropped
        once it ends (committed or not: a reader that started meanwhile must not keep
        what it saw).

        The time is read once the transaction holds the writers' lock, never before:
        a commit that queued behind other writers past its lease's expiry must see it
        expired, or it would allocate what a lock in the queue before it has just
        taken (two holders of the one gpu)."""
        try:
            with self.db.transaction(exclusive=(LEASES.name,)) as conn:
                yield conn, self.clock()
        finally:
            with self._snapshot_lock:
                self._writes += 1
                self._snapshot = None

    @classmethod
    def _pools(cls, conn: Connection, now: float) -> Pools:
        return cls._read_pools(conn, now)[0]

    @staticmethod
    def _read_pools(conn: Connection, now: float) -> tuple[Pools, float]:
        """The pools at ``now``, and until when they hold (the next lease expiry)."""
        onboarding = _ONBOARDED.run(conn).fetchone()
        sums = {row[0]: row for row in _SUMS.run(conn, {"now": now}).fetchall()}
        locked_row = sums.get(LOCKED)
        valid_until = (
            _number(conn, locked_row[6], "the locked leases' expiry (expires_at)")
            if locked_row is not None
            else math.inf
        )

        def pool(state: str) -> tuple[Resources, int]:
            row = sums.get(state)
            if row is None:
                return ZERO, 0
            return _sums(conn, row[1:5], "the {} leases' amounts", state), int(row[5])

        locked, leases = pool(LOCKED)
        allocated, allocations = pool(ALLOCATED)
        pools = Pools(
            onboarded=(
                _sums(conn, onboarding[:4], "the onboarding row's amounts")
                if onboarding is not None
                else ZERO
            ),
            locked=locked,
            allocated=allocated,
            price=(
                _number(conn, onboarding[4], "the onboarding row's price")
                if onboarding is not None
                else 0.0
            ),
            leases=leases,
            allocations=allocations,
        )
        return pools, valid_until

    @staticmethod
    def _get(conn: Connection, lease_id: str, holder: str | None = None) -> tuple[Any, ...]:
        """A lease's row (the columns of ``_LEASE_COLUMNS``)."""
        row = _GET.run(conn, {"id": lease_id}).fetchone()
        if row is None:
            raise ResourceError("unknown", f"no lease or allocation {lease_id!r}")
        if holder is not None and row[6] != holder:
            raise ResourceError("forbidden", f"lease {lease_id} is not held by the caller")
        return row
