"""Stores as dms made them before Alembic: frozen DDL, the ``schema_version`` table, rows.

Until Alembic, each migration ran ``Base.metadata.create_all`` for its tables,
and ``schema_version`` (id 1) held the number of the newest one. The statements
below are what that code emitted, copied from its SQLite file and its
PostgreSQL log; they must never follow the models. A test builds a database at
each version from them and upgrades it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, text

SCHEMA_VERSION = {
    "sqlite": "CREATE TABLE schema_version (id INTEGER NOT NULL, version INTEGER NOT NULL, "
    "updated_at DATETIME NOT NULL, PRIMARY KEY (id))",
    "postgresql": "CREATE TABLE schema_version (id SERIAL NOT NULL, version INTEGER NOT NULL, "
    "updated_at TIMESTAMP WITH TIME ZONE NOT NULL, PRIMARY KEY (id))",
}

# version -> backend -> statements; the dialects differ only in types.
_SQLITE_TYPES = {"SERIAL": "INTEGER", "TIMESTAMP WITH TIME ZONE": "DATETIME"}
_DDL = {
    1: [
        'CREATE TABLE node_settings ("key" VARCHAR(128) NOT NULL, value JSON, PRIMARY KEY ("key"))',
        "CREATE TABLE events (id SERIAL NOT NULL, at TIMESTAMP WITH TIME ZONE NOT NULL, "
        "kind VARCHAR(64) NOT NULL, data JSON, PRIMARY KEY (id))",
        "CREATE INDEX ix_events_at ON events (at)",
        "CREATE INDEX ix_events_kind ON events (kind)",
    ],
    2: [
        "CREATE TABLE known_peers (peer_id VARCHAR(128) NOT NULL, addrs JSON NOT NULL, "
        "last_seen TIMESTAMP WITH TIME ZONE NOT NULL, PRIMARY KEY (peer_id))",
    ],
    3: [
        "CREATE TABLE onboarding (id SERIAL NOT NULL, cpu_milli INTEGER NOT NULL, "
        "ram_mib INTEGER NOT NULL, disk_mib INTEGER NOT NULL, gpu INTEGER NOT NULL, "
        "price FLOAT NOT NULL, updated_at FLOAT NOT NULL, PRIMARY KEY (id))",
        "CREATE TABLE leases (id VARCHAR(32) NOT NULL, state VARCHAR(16) NOT NULL, "
        "cpu_milli INTEGER NOT NULL, ram_mib INTEGER NOT NULL, disk_mib INTEGER NOT NULL, "
        "gpu INTEGER NOT NULL, holder VARCHAR(256) NOT NULL, ref VARCHAR(256) NOT NULL, "
        "created_at FLOAT NOT NULL, expires_at FLOAT, committed_at FLOAT, ended_at FLOAT, "
        "PRIMARY KEY (id))",
        "CREATE INDEX ix_leases_state ON leases (state)",
    ],
    4: [
        "CREATE TABLE deployments (id VARCHAR(64) NOT NULL, name VARCHAR(128) NOT NULL, "
        "state VARCHAR(16) NOT NULL, spec JSON NOT NULL, slots JSON NOT NULL, "
        "events JSON NOT NULL, created_at FLOAT NOT NULL, updated_at FLOAT NOT NULL, "
        "running_at FLOAT, ended_at FLOAT, PRIMARY KEY (id))",
        "CREATE INDEX ix_deployments_state ON deployments (state)",
        "CREATE TABLE bids (id SERIAL NOT NULL, deployment_id VARCHAR(64) NOT NULL, "
        "direction VARCHAR(8) NOT NULL, peer_id VARCHAR(128) NOT NULL, "
        "slot VARCHAR(128) NOT NULL, lease_id VARCHAR(32), price FLOAT, "
        "outcome VARCHAR(16) NOT NULL, reason VARCHAR(512) NOT NULL, at FLOAT NOT NULL, "
        "PRIMARY KEY (id))",
        "CREATE INDEX ix_bids_deployment ON bids (deployment_id)",
    ],
    5: [
        "CREATE TABLE mining_sessions (id VARCHAR(64) NOT NULL, algorithm VARCHAR(32) NOT NULL, "
        "phase VARCHAR(16) NOT NULL, progress JSON NOT NULL, checkpoint JSON, result JSON, "
        "labels JSON, created_at FLOAT NOT NULL, updated_at FLOAT NOT NULL, PRIMARY KEY (id))",
        "CREATE INDEX ix_mining_sessions_phase ON mining_sessions (phase)",
    ],
}

LEGACY_VERSIONS = tuple(sorted(_DDL))


def ddl(version: int, backend: str) -> list[str]:
    """The statements that version ``version``'s migration ran on ``backend``."""
    statements = _DDL[version]
    if backend == "sqlite":
        for pg, sqlite in _SQLITE_TYPES.items():
            statements = [s.replace(pg, sqlite) for s in statements]
    return statements


# One row per table, inserted at the version that made it: (table, columns). Serial ids
# are left to the database, as dms did: an explicit one would not move the sequence.
_ROWS: dict[int, list[tuple[str, dict[str, Any]]]] = {
    1: [
        ("node_settings", {"key": "registered_capability", "value": '{"cpu": 2}'}),
        ("events", {"at": "2025-01-02 03:04:05+00:00", "kind": "started", "data": "{}"}),
    ],
    2: [
        ("known_peers", {"peer_id": "12D3KooWpeer", "addrs": '["/ip4/127.0.0.1/tcp/4001"]',
                         "last_seen": "2025-01-02 03:04:05+00:00"}),
    ],
    3: [
        ("onboarding", {"id": 1, "cpu_milli": 2000, "ram_mib": 2048, "disk_mib": 4096, "gpu": 0,
                        "price": 0.5, "updated_at": 1.0}),
        ("leases", {"id": "a" * 32, "state": "allocated", "cpu_milli": 500, "ram_mib": 256,
                    "disk_mib": 0, "gpu": 0, "holder": "did:key:z6Mk", "ref": "dep:d1/s0",
                    "created_at": 1.0, "expires_at": None, "committed_at": 2.0,
                    "ended_at": None}),
    ],
    4: [
        ("deployments", {"id": "d1", "name": "job", "state": "running", "spec": "{}",
                         "slots": "[]", "events": "[]", "created_at": 1.0, "updated_at": 2.0,
                         "running_at": 2.0, "ended_at": None}),
        ("bids", {"deployment_id": "d1", "direction": "sent", "peer_id": "12D3KooWpeer",
                  "slot": "s0", "lease_id": "a" * 32, "price": 0.5, "outcome": "won",
                  "reason": "", "at": 1.5}),
    ],
    5: [
        ("mining_sessions", {"id": "d1", "algorithm": "skmeans", "phase": "rounds",
                             "progress": '{"round": 3}', "checkpoint": None, "result": None,
                             "labels": None, "created_at": 1.0, "updated_at": 2.0}),
    ],
}  # fmt: skip


def rows(up_to: int) -> list[tuple[str, dict[str, Any]]]:
    """The sample rows of the tables that exist at version ``up_to``."""
    return [row for version in LEGACY_VERSIONS if version <= up_to for row in _ROWS[version]]


def build(conn: Connection, version: int) -> None:
    """Make ``conn``'s database what dms left at ``version`` before Alembic, with rows."""
    backend = conn.dialect.name
    conn.execute(text(SCHEMA_VERSION[backend]))
    for v in LEGACY_VERSIONS:
        if v <= version:
            for statement in ddl(v, backend):
                conn.execute(text(statement))
    for table, values in rows(version):
        names = ", ".join(f'"{name}"' for name in values)
        marks = ", ".join(f":{name}" for name in values)
        conn.execute(text(f"INSERT INTO {table} ({names}) VALUES ({marks})"), values)
    conn.execute(
        text("INSERT INTO schema_version (id, version, updated_at) VALUES (1, :v, :at)"),
        {"v": version, "at": "2025-01-02 03:04:05+00:00"},
    )
