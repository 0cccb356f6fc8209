"""Deployments and bid indices in the node's store (Core statements: saved often).

A deployment's end must outlive a store that refuses writes (a full disk, a
locked or read-only database): otherwise the node would resume, after its next
restart, a deployment that had finished. So an end the database refused is
also kept as a small JSON file under ``DMS_HOME/unsaved/``; reads see it, and it
is written into the database (and the file deleted) as soon as a write succeeds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, insert, select, update

from dms.files import write_private
from dms.orchestrator.records import BidRow, MiningRow
from dms.orchestrator.states import DEPLOYMENT, SESSION, DeploymentState, SessionPhase
from dms.orchestrator.stored import UNREADABLE, read_row, read_session
from dms.store import STORE_ERRORS, Database
from dms.store.group import GroupCommit
from dms.store.models import BidRecord, DeploymentRecord, MiningSessionRecord
from dms.store.sql import Statement, as_text, json_text

DEPLOYMENTS = DeploymentRecord.__table__
BIDS = BidRecord.__table__
MINING = MiningSessionRecord.__table__
# A session's row as read (``read_session``), with its labels or without (status polls).
_MINING_READ = as_text(MINING)
_MINING_NO_LABELS = as_text(MINING, [c.name for c in MINING.c if c.name != "labels"])

# A deployment is saved at each transition, several times a placement: its statements are
# SQL run on the driver (``dms.store.sql``), its JSON columns written as their text.
_COLUMNS = [c.name for c in DEPLOYMENTS.c]
_JSON = frozenset(c.name for c in DEPLOYMENTS.c if isinstance(c.type, JSON))
_UPDATE = Statement(
    "UPDATE deployments SET "
    + ", ".join(f"{c} = :{c}" for c in _COLUMNS if c != "id")
    + " WHERE id = :id"
)
_INSERT = Statement(
    f"INSERT INTO deployments ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join(':' + c for c in _COLUMNS)})"
)
# Read with the JSON columns as their text, each parsed on its own (``read_row``).
_READ = select(*as_text(DEPLOYMENTS))
_BID_COLUMNS = [c.name for c in BIDS.c if c.name != "id"]
_INSERT_BIDS = Statement(
    f"INSERT INTO bids ({', '.join(_BID_COLUMNS)}) "
    f"VALUES ({', '.join(':' + c for c in _BID_COLUMNS)})"
)

log = logging.getLogger("dms.orchestrator")


def insert_bids(db: Database, rows: list[BidRow], at: float) -> None:
    """Write bid index rows (a requester's bids received, a provider's bids sent) in one
    transaction; ``at`` for each row that has no time of its own."""
    with db.transaction() as conn:
        _insert_bids(conn, rows, at)


def _insert_bids(conn: Any, rows: list[BidRow], at: float) -> None:
    _INSERT_BIDS.run_many(conn, [r.columns(at) for r in rows])


class DeploymentStore:
    def __init__(self, db: Database, unsaved_dir: Path | None = None) -> None:
        self.db = db
        self.unsaved_dir = unsaved_dir  # None: an end the database refuses is only retried
        # Deployments save from their own threads: saves made at the same moment share a
        # transaction (dms.store.group), each returning once its own row is committed.
        self.group = GroupCommit(db)
        # The ends kept on disk, by id, read once here: saves and reads touch no file
        # unless an end is kept.
        self._kept = self._read_kept()

    def save(self, row: dict[str, Any], bids: list[BidRow] | None = None) -> None:
        """Insert or update one deployment (``row`` holds every column), and add ``bids``
        to the bid index in the same transaction. Raises the store's error; an end is
        kept on disk first, so it survives a restart."""
        row = {**row, "updated_at": time.time()}
        try:
            self._write(row, bids)
        except STORE_ERRORS:
            if row["state"] in DEPLOYMENT.terminal:
                self._keep_unsaved(row)
            raise
        self._drop_unsaved(row["id"])

    def get(self, deployment_id: str) -> dict[str, Any] | None:
        """A deployment's row; what of it cannot be read is named under ``UNREADABLE``
        (``dms.orchestrator.stored``)."""
        kept = self._kept.get(deployment_id)
        if kept is not None:
            return kept
        with self.db.transaction() as conn:
            row = conn.execute(_READ.where(DEPLOYMENTS.c.id == deployment_id)).first()
            return read_row(row._mapping) if row is not None else None

    def list(self, limit: int = 100) -> list[dict[str, Any]]:
        with self.db.transaction() as conn:
            rows = conn.execute(_READ.order_by(DEPLOYMENTS.c.created_at.desc()).limit(limit))
            return [self._kept.get(r.id) or read_row(r._mapping) for r in rows]

    def active(self) -> list[dict[str, Any]]:
        """Deployments to resume: none whose end is known, saved or not. A row whose
        state this version does not know is among them (``UNREADABLE`` says so): it may
        hold leases."""
        unsaved = self.flush_unsaved()
        with self.db.transaction() as conn:
            ended = DEPLOYMENTS.c.state.in_(sorted(DEPLOYMENT.terminal))
            rows = conn.execute(_READ.where(~ended))
            return [read_row(r._mapping) for r in rows if r.id not in unsaved]

    def fail_unreadable(
        self, row: dict[str, Any], reason: str, session: MiningRow | None = None
    ) -> None:
        """Fail a deployment whose stored record cannot be carried on from, writing only
        what needs no reading of it: its state, its end time and, if its events could be
        read, an event saying ``reason``. The rest of the row is left as it is. Its
        mining ``session`` (read, not ended) fails with it, in the same transaction
        (:meth:`fail_session`)."""
        now = time.time()
        values: dict[str, Any] = {
            "state": DeploymentState.FAILED.value,
            "ended_at": now,
            "updated_at": now,
        }
        if "events" not in (row.get(UNREADABLE) or {}):
            values["events"] = [*row["events"], {"at": round(now, 3), "what": reason}]
        with self.db.transaction() as conn:
            conn.execute(update(DEPLOYMENTS).where(DEPLOYMENTS.c.id == row["id"]).values(**values))
            if session is not None:
                self._fail_session(conn, session, reason, now)

    def flush_unsaved(self) -> set[str]:
        """Write kept ends into the database; returns the ids still only on disk."""
        left = set()
        for deployment_id, row in list(self._kept.items()):
            try:
                self._write(row)
            except STORE_ERRORS as exc:
                log.warning("the end of deployment %s is still not saved: %s", deployment_id, exc)
                left.add(deployment_id)
            else:
                self._drop_unsaved(deployment_id)
        return left

    # ---- ends the database refused --------------------------------------------------

    def _write(self, row: dict[str, Any], bids: list[BidRow] | None = None) -> None:
        params = {c: json_text(row[c]) if c in _JSON else row[c] for c in _COLUMNS}
        at = row["updated_at"]

        def write(conn: Any) -> None:
            if _UPDATE.run(conn, params).rowcount == 0:
                _INSERT.run(conn, params)
            if bids:
                _insert_bids(conn, bids, at)

        self.group.run(write)

    def _unsaved_path(self, deployment_id: str) -> Path | None:
        if self.unsaved_dir is None:
            return None
        return self.unsaved_dir / f"deployment-{deployment_id}.json"

    def _keep_unsaved(self, row: dict[str, Any]) -> None:
        path = self._unsaved_path(row["id"])
        if path is None:
            return
        self._kept[row["id"]] = row
        try:
            write_private(path, json.dumps(row))  # 0600; whole or absent, never half a file
        except OSError as exc:  # the disk refuses this too: the actor retries the save
            log.error("the end of deployment %s could not be kept: %s", row["id"], exc)

    def _drop_unsaved(self, deployment_id: str) -> None:
        if self._kept.pop(deployment_id, None) is None:
            return
        path = self._unsaved_path(deployment_id)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _read_kept(self) -> dict[str, dict[str, Any]]:
        if self.unsaved_dir is None or not self.unsaved_dir.is_dir():
            return {}
        rows: dict[str, dict[str, Any]] = {}
        for path in sorted(self.unsaved_dir.glob("deployment-*.json")):
            try:
                row = json.loads(path.read_text())
                missing = [c for c in _COLUMNS if c not in row]
                if missing:
                    raise ValueError(f"no {', '.join(missing)}")
                rows[row["id"]] = row
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # Set aside, not deleted and not retried: a row the database cannot take
                # (a column missing: edited by hand, or kept by another version) failed
                # every start at the first write of the node's start-up.
                aside = path.with_name(path.name + ".unreadable")
                with contextlib.suppress(OSError):
                    path.rename(aside)
                log.warning("unsaved deployment end %s set aside as %s: %s", path.name,
                            aside.name, exc)  # fmt: skip
        return rows

    def record_bids(self, rows: list[BidRow]) -> None:
        if not rows:
            return
        at = time.time()
        self.group.run(lambda conn: _insert_bids(conn, rows, at))

    def bids(self, deployment_id: str) -> list[BidRow]:
        with self.db.transaction() as conn:
            rows = conn.execute(
                select(BIDS).where(BIDS.c.deployment_id == deployment_id).order_by(BIDS.c.id)
            )
            return [BidRow.from_row(r._mapping) for r in rows]

    # ---- mining sessions (their deployment has the same id) ---------------------------

    def save_mining(self, session: MiningRow) -> None:
        """Insert or update a mining session's row; only the columns given change."""
        now = time.time()
        row = session.columns()
        with self.db.transaction() as conn:
            done = conn.execute(
                update(MINING).where(MINING.c.id == row["id"]).values(**row, updated_at=now)
            )
            if done.rowcount == 0:
                conn.execute(insert(MINING).values(**{"created_at": now, **row, "updated_at": now}))

    def mining(self, session_id: str, *, labels: bool = False) -> MiningRow | None:
        """A session's row (``labels`` only when asked for); what of it cannot be read is
        named in its ``unreadable`` (``dms.orchestrator.stored.read_session``)."""
        columns = _MINING_READ if labels else _MINING_NO_LABELS
        with self.db.transaction() as conn:
            row = conn.execute(select(*columns).where(MINING.c.id == session_id)).first()
            return MiningRow.from_row(read_session(row._mapping)) if row is not None else None

    def unended_sessions(self) -> list[MiningRow]:
        """The sessions not ended (a phase this version does not know counts), without
        their labels: each is carried on from, or failed, at start (``Requester.start``)."""
        ended = MINING.c.phase.in_(sorted(SESSION.terminal))
        with self.db.transaction() as conn:
            rows = conn.execute(select(*_MINING_NO_LABELS).where(~ended))
            return [MiningRow.from_row(read_session(r._mapping)) for r in rows]

    def fail_session(self, session: MiningRow, reason: str) -> None:
        """Fail a session that cannot be carried on from: its phase becomes ``failed``
        and, if its progress could be read, the progress says so and why. The rest of
        the row is left as it is."""
        with self.db.transaction() as conn:
            self._fail_session(conn, session, reason, time.time())

    @staticmethod
    def _fail_session(conn: Any, session: MiningRow, reason: str, now: float) -> None:
        failed = SessionPhase.FAILED.value
        values: dict[str, Any] = {"phase": failed, "updated_at": now}
        if "progress" not in (session.unreadable or {}):
            values["progress"] = {**(session.progress or {}), "phase": failed, "reason": reason}
        conn.execute(update(MINING).where(MINING.c.id == session.id).values(**values))
