"""The peers a node has met, in a real SQLite store: what a restarted node dials."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from dms.network import peerbook as module
from dms.network.discovery import PeerInfoView
from dms.network.peerbook import PeerBook
from dms.store import Database, open_database
from dms.store.models import KnownPeer

A = "12D3KooWAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"


def last_seen(db: Database) -> list[tuple[str, datetime]]:
    with db.session() as session:
        return [(r.peer_id, r.last_seen) for r in session.scalars(select(KnownPeer))]


def test_a_connected_peer_is_rewritten_only_when_its_addresses_change_or_it_is_due(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'dms.db'}")
    try:
        book = PeerBook(db)
        book.remember([PeerInfoView(A, ["/ip4/10.0.0.1/tcp/4001"])])
        [(_, first)] = last_seen(db)
        book.remember([PeerInfoView(A, ["/ip4/10.0.0.1/tcp/4001"])])
        assert last_seen(db) == [(A, first)]  # nothing new: no write
        book.remember([PeerInfoView(A, ["/ip4/10.0.0.2/tcp/4001"])])
        [(_, moved)] = last_seen(db)
        assert moved > first
        assert book.dial_addrs() == [f"/ip4/10.0.0.2/tcp/4001/p2p/{A}"]
        # Due again after REWRITE_AFTER, with the same addresses.
        monkeypatch.setattr(module, "REWRITE_AFTER", timedelta(0))
        book.remember([PeerInfoView(A, ["/ip4/10.0.0.2/tcp/4001"])])
        [(_, again)] = last_seen(db)
        assert again > moved
        # A restarted node (a new book on the same store) dials what was kept.
        assert PeerBook(db).dial_addrs() == [f"/ip4/10.0.0.2/tcp/4001/p2p/{A}"]
    finally:
        db.close()


def test_the_book_keeps_at_most_max_peers_and_the_longest_unseen_go(tmp_path: Path) -> None:
    """Each row is a peer dialed at start: before, the book grew by every peer written
    for 7 days (40 peers, 40 rows, however small the node meant it to be)."""
    db = open_database(f"sqlite:///{tmp_path / 'dms.db'}")
    try:
        book = PeerBook(db, max_peers=16)
        peers = [f"12D3KooW{i:048d}" for i in range(40)]
        for i, peer in enumerate(peers):  # one at a time: each seen later than the one before
            book.remember([PeerInfoView(peer, [f"/ip4/10.0.0.{i}/tcp/4001"])])
        kept = {peer for peer, _ in last_seen(db)}
        assert kept == set(peers[-16:])
        assert len(book.dial_addrs()) == 16
    finally:
        db.close()
