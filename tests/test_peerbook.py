"""The peers a node has met, in a real SQLite store: what a restarted node dials."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from dms.network import peerbook as module
from dms.network.discovery import PeerInfoView
from dms.network.peerbook import PeerBook
from dms.node.client import root_handle
from dms.sim.cluster import LocalCluster
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
    for 7 days (40 peers, 40 rows, however small the node meant it to be). (Staked
    peers here: unstaked ones have a smaller share, the test below.)"""
    db = open_database(f"sqlite:///{tmp_path / 'dms.db'}")
    try:
        book = PeerBook(db, max_peers=16)
        peers = [f"12D3KooW{i:048d}" for i in range(40)]
        for i, peer in enumerate(peers):  # one at a time: each seen later than the one before
            book.remember([PeerInfoView(peer, [f"/ip4/10.0.0.{i}/tcp/4001"])], lambda p: True)
        kept = {peer for peer, _ in last_seen(db)}
        assert kept == set(peers[-16:])
        assert len(book.dial_addrs()) == 16
    finally:
        db.close()


def test_a_flood_of_unstaked_peers_evicts_only_unstaked_ones_within_their_share(
    tmp_path: Path,
) -> None:
    """A provider remembers the gossip requesters it dialed to bid: a flood of requests
    from fresh keys wrote one row each until the cap pushed out the longest unseen,
    the peers the node works with (an allocation, a placement) among them, so the
    restarted node no longer dialed them. Unstaked peers now hold at most
    unknown_share of the book and go first."""
    db = open_database(f"sqlite:///{tmp_path / 'dms.db'}")
    try:
        book = PeerBook(db, max_peers=16, unknown_share=0.5)
        staked = {f"12D3KooWs{i:047d}" for i in range(4)}
        for i, peer in enumerate(sorted(staked)):  # seen first, so the longest unseen
            book.remember([PeerInfoView(peer, [f"/ip4/10.0.1.{i}/tcp/4001"])], staked.__contains__)
        flood = [f"12D3KooWf{i:047d}" for i in range(40)]
        for i, peer in enumerate(flood):
            book.remember([PeerInfoView(peer, [f"/ip4/10.0.2.{i}/tcp/4001"])], staked.__contains__)
        kept = {peer for peer, _ in last_seen(db)}
        assert staked <= kept, f"{len(staked - kept)} of 4 staked peers evicted"
        assert kept - staked == set(flood[-8:])  # 8 = 16 x 0.5, the most recent
        # Staked peers take every place, the longest unseen of them going first.
        more = [f"12D3KooWt{i:047d}" for i in range(20)]
        for i, peer in enumerate(more):
            staked.add(peer)
            book.remember([PeerInfoView(peer, [f"/ip4/10.0.3.{i}/tcp/4001"])], staked.__contains__)
        kept = {peer for peer, _ in last_seen(db)}
        assert kept == set(more[-16:])
    finally:
        db.close()


def test_a_node_whose_host_died_first_stops_without_an_error(
    cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A node whose network stopped before it (a crash, a killed host) recorded its peers
    on the way out from the stopped network: the error ended its stop there, logged as
    the root actor's failure with a traceback, and the leaving heartbeat was skipped."""
    first = cluster.add("first")
    second = cluster.add("second", bootstrap=first.addrs()[:1])
    cluster.wait_linked()
    assert first.node is not None  # the second node's actor has started: it answers
    first.node.ask(root_handle(second.peer_id), "/public/hello", timeout=20)
    with caplog.at_level(logging.WARNING):
        cluster.crash(second)
    # py-libp2p logs its own handshakes cut short at ERROR; ours and pykka's must be quiet.
    failures = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith(("dms", "pykka"))
    ]
    assert failures == []
