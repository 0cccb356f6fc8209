"""SQLAlchemy models of the node's store. Each table belongs to the migration that made it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, Index, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class SchemaVersion(Base):
    """One row: the version of the newest migration applied."""

    __tablename__ = "schema_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Setting(Base):
    """Small named values the node keeps (its own state, not user configuration)."""

    __tablename__ = "node_settings"

    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON, nullable=True)


class Event(Base):
    """The node's event log: what happened, when, with details."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    data: Mapped[Any] = mapped_column(JSON, nullable=True)


class KnownPeer(Base):
    """A peer this node has been connected to, so it can dial it again after a restart."""

    __tablename__ = "known_peers"

    peer_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    addrs: Mapped[Any] = mapped_column(JSON, nullable=False, default=list)
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Onboarding(Base):
    """What the owner contributed to the network (one row; none means not onboarded)."""

    __tablename__ = "onboarding"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cpu_milli: Mapped[int] = mapped_column(Integer, nullable=False)
    ram_mib: Mapped[int] = mapped_column(Integer, nullable=False)
    disk_mib: Mapped[int] = mapped_column(Integer, nullable=False)
    gpu: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    price: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    updated_at: Mapped[float] = mapped_column(Float, nullable=False)


class Lease(Base):
    """Resources held for someone: a lease (``locked``, until ``expires_at``) or an
    allocation (``allocated``, until released). Ended rows stay for the record."""

    __tablename__ = "leases"
    __table_args__ = (Index("ix_leases_state", "state"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    cpu_milli: Mapped[int] = mapped_column(Integer, nullable=False)
    ram_mib: Mapped[int] = mapped_column(Integer, nullable=False)
    disk_mib: Mapped[int] = mapped_column(Integer, nullable=False)
    gpu: Mapped[int] = mapped_column(Integer, nullable=False)
    holder: Mapped[str] = mapped_column(String(256), nullable=False, default="")
    ref: Mapped[str] = mapped_column(String(256), nullable=False, default="")
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    committed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class DeploymentRecord(Base):
    """A deployment this node requested: its spec and state, saved on every transition."""

    __tablename__ = "deployments"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False, index=True)
    spec: Mapped[Any] = mapped_column(JSON, nullable=False)
    slots: Mapped[Any] = mapped_column(JSON, nullable=False)
    events: Mapped[Any] = mapped_column(JSON, nullable=False, default=list)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    updated_at: Mapped[float] = mapped_column(Float, nullable=False)
    running_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class BidRecord(Base):
    """The bid indices: bids this node sent (provider) and received (requester)."""

    __tablename__ = "bids"
    __table_args__ = (Index("ix_bids_deployment", "deployment_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    deployment_id: Mapped[str] = mapped_column(String(64), nullable=False)
    direction: Mapped[str] = mapped_column(String(8), nullable=False)  # sent | received
    peer_id: Mapped[str] = mapped_column(String(128), nullable=False)
    slot: Mapped[str] = mapped_column(String(128), nullable=False)
    lease_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    price: Mapped[float | None] = mapped_column(Float, nullable=True)
    outcome: Mapped[str] = mapped_column(String(16), nullable=False)  # offer|decline|won|lost
    reason: Mapped[str] = mapped_column(String(512), nullable=False, default="")
    at: Mapped[float] = mapped_column(Float, nullable=False)


class MiningSessionRecord(Base):
    """A data owner's mining session: its progress, its checkpoint each round, its result."""

    __tablename__ = "mining_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # its deployment's id
    algorithm: Mapped[str] = mapped_column(String(32), nullable=False)
    phase: Mapped[str] = mapped_column(String(16), nullable=False, index=True)
    progress: Mapped[Any] = mapped_column(JSON, nullable=False, default=dict)
    checkpoint: Mapped[Any] = mapped_column(JSON, nullable=True)
    result: Mapped[Any] = mapped_column(JSON, nullable=True)
    labels: Mapped[Any] = mapped_column(JSON, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    updated_at: Mapped[float] = mapped_column(Float, nullable=False)
