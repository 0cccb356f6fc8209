"""Schema migrations: numbered steps, applied in order, each in one transaction.

A new table joins ``dms.store.models`` and a new migration creates it; a
changed table gets a migration with the DDL that changes it. Never edit a
migration that has shipped: add the next one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection

from dms.store.models import (
    Base,
    BidRecord,
    DeploymentRecord,
    Event,
    KnownPeer,
    Lease,
    MiningSessionRecord,
    Onboarding,
    Setting,
)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


def _create(*models: type[Base]) -> Callable[[Connection], None]:
    def apply(conn: Connection) -> None:
        Base.metadata.create_all(conn, tables=[m.__table__ for m in models])  # type: ignore[attr-defined]

    return apply


MIGRATIONS: list[Migration] = [
    Migration(1, "node settings and event log", _create(Setting, Event)),
    Migration(2, "known peers, for reconnecting after a restart", _create(KnownPeer)),
    Migration(3, "onboarding and resource leases", _create(Onboarding, Lease)),
    Migration(4, "deployments and the bid indices", _create(DeploymentRecord, BidRecord)),
    Migration(5, "mining sessions: progress, checkpoints, results", _create(MiningSessionRecord)),
]

LATEST_VERSION = MIGRATIONS[-1].version
