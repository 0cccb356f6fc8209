"""The resource ledger: onboarded = free + locked + allocated, in one transaction each.

Every transition (onboard, lock, commit, release, expire, offboard) is a single
database transaction. On SQLite each one begins with ``BEGIN IMMEDIATE`` (see
``dms.store.db``), so the check "does it still fit?" and the write that takes
the resources happen under one write lock: threads and processes sharing the
file cannot both take the last core.

``free`` is never stored: it is what the onboarded row leaves after the live
leases and allocations, so it cannot drift from them. A lease past its
``expires_at`` stops counting at once, even before :meth:`ResourceLedger.expire`
marks it ``expired`` for the record.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.orm import Session

from dms.errors import DmsError
from dms.resources.amounts import KINDS, ZERO, Resources, show
from dms.store import Database
from dms.store.models import Event, Lease, Onboarding

LOCKED, ALLOCATED, RELEASED, EXPIRED = "locked", "allocated", "released", "expired"
LIVE_STATES = (LOCKED, ALLOCATED)
MAX_LEASE_S = 3600.0


class ResourceError(DmsError):
    """A transition the ledger refuses; ``code`` says which kind, for replies."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True)
class Pools:
    onboarded: Resources
    locked: Resources
    allocated: Resources
    price: float = 0.0
    allocations: int = 0
    leases: int = 0

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
    state: str
    resources: Resources
    holder: str
    ref: str
    expires_at: float | None

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "state": self.state,
            "resources": self.resources.human(),
            "holder": self.holder,
            "ref": self.ref,
            "expires_at": self.expires_at,
        }


def _amounts(row: Lease | Onboarding) -> Resources:
    return Resources(
        cpu_milli=row.cpu_milli, ram_mib=row.ram_mib, disk_mib=row.disk_mib, gpu=row.gpu
    )


def _view(row: Lease) -> LeaseView:
    return LeaseView(row.id, row.state, _amounts(row), row.holder, row.ref, row.expires_at)


class ResourceLedger:
    """Onboarding, leases and allocations of one node, kept in its store."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    # ---- reading -------------------------------------------------------------------

    def pools(self) -> Pools:
        with self.db.session() as s:
            return self._pools(s, self.clock())

    def lease(self, lease_id: str) -> LeaseView:
        with self.db.session() as s:
            return _view(self._get(s, lease_id))

    def live(self) -> list[LeaseView]:
        """Leases that still hold resources and allocations, oldest first."""
        now = self.clock()
        with self.db.session() as s:
            rows = s.scalars(select(Lease).where(self._live_clause(now)).order_by(Lease.created_at))
            return [_view(r) for r in rows]

    # ---- transitions -----------------------------------------------------------------

    def onboard(self, amounts: Resources, price: float = 0.0) -> Pools:
        """Set (or change) what this node contributes; what is in use must still fit."""
        if amounts.is_zero():
            raise ResourceError("invalid", "onboarding needs some cpu, ram or disk")
        if price < 0:
            raise ResourceError("invalid", "price must not be negative")
        now = self.clock()
        with self.db.session() as s:
            pools = self._pools(s, now)
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
            s.merge(
                Onboarding(
                    id=1,
                    cpu_milli=amounts.cpu_milli,
                    ram_mib=amounts.ram_mib,
                    disk_mib=amounts.disk_mib,
                    gpu=amounts.gpu,
                    price=price,
                    updated_at=now,
                )
            )
            s.add(Event(kind="resources.onboarded", data={**amounts.human(), "price": price}))
            s.flush()
            return self._pools(s, now)

    def offboard(self, force: bool = False) -> list[LeaseView]:
        """Withdraw from the network. Refused while anything is held, unless ``force``,
        which releases every lease and allocation (returned, so the caller can stop them)."""
        now = self.clock()
        with self.db.session() as s:
            live = list(s.scalars(select(Lease).where(self._live_clause(now))))
            if live and not force:
                allocs = sum(1 for r in live if r.state == ALLOCATED)
                raise ResourceError(
                    "conflict",
                    f"{allocs} allocation(s) and {len(live) - allocs} lease(s) are live; "
                    "use --force to stop them and offboard",
                )
            for row in live:
                row.state, row.ended_at = RELEASED, now
            onboarding = s.get(Onboarding, 1)
            if onboarding is not None:
                s.delete(onboarding)
            s.add(Event(kind="resources.offboarded", data={"released": [r.id for r in live]}))
            return [_view(r) for r in live]

    def lock(
        self, request: Resources, lease_s: float, holder: str = "", ref: str = ""
    ) -> LeaseView:
        """Hold ``request`` for ``lease_s`` seconds; raises ``ResourceError`` with the reason
        (not onboarded, or which kinds are short) when it does not fit."""
        if request.is_zero():
            raise ResourceError("invalid", "a lease must ask for some resources")
        if not 0 < lease_s <= MAX_LEASE_S:
            raise ResourceError("invalid", f"lease_s must be in (0, {MAX_LEASE_S:g}]")
        now = self.clock()
        with self.db.session() as s:
            pools = self._pools(s, now)
            if not pools.is_onboarded:
                raise ResourceError("not_onboarded", "this node is not onboarded")
            short = request.shortfall(pools.free)
            if short:
                raise ResourceError("insufficient", "not enough resources: " + "; ".join(short))
            row = Lease(
                id=uuid.uuid4().hex,
                state=LOCKED,
                cpu_milli=request.cpu_milli,
                ram_mib=request.ram_mib,
                disk_mib=request.disk_mib,
                gpu=request.gpu,
                holder=holder,
                ref=ref,
                created_at=now,
                expires_at=now + lease_s,
            )
            s.add(row)
            return _view(row)

    def commit(self, lease_id: str, ref: str | None = None) -> LeaseView:
        """Turn a live lease into an allocation (same id)."""
        now = self.clock()
        with self.db.session() as s:
            row = self._get(s, lease_id)
            if row.state == ALLOCATED:
                return _view(row)  # committing twice is harmless: a retried message
            expired = row.state == LOCKED and (row.expires_at or 0) <= now
            if expired:
                row.state, row.ended_at = EXPIRED, now
            elif row.state != LOCKED:
                raise ResourceError("ended", f"lease {lease_id} is {row.state}")
            else:
                row.state, row.committed_at, row.expires_at = ALLOCATED, now, None
                if ref is not None:
                    row.ref = ref
                s.add(Event(kind="resources.allocated", data={"id": row.id, "ref": row.ref}))
            view = _view(row)
        if expired:  # raised after the transaction, so the expiry is recorded
            raise ResourceError("expired", f"lease {lease_id} expired before commit")
        return view

    def release(self, lease_id: str) -> LeaseView:
        """Give back a lease or an allocation; releasing an ended one changes nothing."""
        now = self.clock()
        with self.db.session() as s:
            row = self._get(s, lease_id)
            if row.state in LIVE_STATES:
                if row.state == ALLOCATED:
                    s.add(Event(kind="resources.released", data={"id": row.id, "ref": row.ref}))
                row.state, row.ended_at = RELEASED, now
            return _view(row)

    def expire(self) -> list[str]:
        """Mark leases past their expiry as ``expired``; returns their ids."""
        now = self.clock()
        with self.db.session() as s:
            ids = list(
                s.scalars(select(Lease.id).where(Lease.state == LOCKED, Lease.expires_at <= now))
            )
            if ids:
                s.execute(
                    update(Lease).where(Lease.id.in_(ids)).values(state=EXPIRED, ended_at=now)
                )
            return ids

    # ---- internals -------------------------------------------------------------------

    @staticmethod
    def _live_clause(now: float):  # type: ignore[no-untyped-def]
        return or_(Lease.state == ALLOCATED, and_(Lease.state == LOCKED, Lease.expires_at > now))

    def _pools(self, s: Session, now: float) -> Pools:
        onboarding = s.get(Onboarding, 1, populate_existing=True)
        live_locked = and_(Lease.state == LOCKED, Lease.expires_at > now)
        columns = []
        for col in (Lease.cpu_milli, Lease.ram_mib, Lease.disk_mib, Lease.gpu):
            columns.append(func.coalesce(func.sum(case((live_locked, col), else_=0)), 0))
            columns.append(
                func.coalesce(func.sum(case((Lease.state == ALLOCATED, col), else_=0)), 0)
            )
        columns.append(func.count(case((live_locked, 1))))
        columns.append(func.count(case((Lease.state == ALLOCATED, 1))))
        row = s.execute(select(*columns).where(Lease.state.in_(LIVE_STATES))).one()
        locked = Resources.of([int(row[i]) for i in (0, 2, 4, 6)])
        allocated = Resources.of([int(row[i]) for i in (1, 3, 5, 7)])
        return Pools(
            onboarded=_amounts(onboarding) if onboarding is not None else ZERO,
            locked=locked,
            allocated=allocated,
            price=onboarding.price if onboarding is not None else 0.0,
            leases=int(row[8]),
            allocations=int(row[9]),
        )

    @staticmethod
    def _get(s: Session, lease_id: str) -> Lease:
        row = s.get(Lease, lease_id, populate_existing=True)
        if row is None:
            raise ResourceError("unknown", f"no lease or allocation {lease_id!r}")
        return row
