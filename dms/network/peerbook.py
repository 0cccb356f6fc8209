"""The peers a node has met, kept in the store so a restarted node can dial them again.

A remembered peer is dialed at start and, at the network layer, keeps its slots as
a peer with a stake (``Libp2pTransport._has_stake``). So only peers worth that are
remembered (the caller chooses: ``dms.node.peering`` passes dms nodes it heard a
heartbeat of and peers it has a stake in, not every key that connected), and at most
``max_peers`` of them. Peers it has no stake in (``stake``, asked at each write) keep
at most ``unknown_share`` of those places and go first: past either bound, the
unstaked peers seen the longest ago go, and a staked peer goes only to make room for
another staked one. So a flood of fresh keys (gossip requesters a provider dialed to
bid, keys that publish heartbeats) cannot push out the peers the node works with. See
``specs/security.md``, "Global budgets".

A remembered row that cannot be read (its addresses not JSON, or not a list of
strings: a hand edit, disk trouble) is not dialed, with a warning naming the peer,
and is written over when that peer is remembered again: it kept the node from
starting (``dms run`` raised the JSON error).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select, update

from dms.network.host import PeerInfoView
from dms.store import Database
from dms.store.models import KnownPeer
from dms.store.sql import as_text, json_value

log = logging.getLogger("dms.network")
KNOWN_PEERS = KnownPeer.__table__

MAX_ADDRS_PER_PEER = 8
FORGET_AFTER = timedelta(days=7)
# A peer still connected with the same addresses is written again only this often: a
# week's forgetting needs no fresher "last seen", and the rewrite of every connected
# peer every 30 s was a store transaction on each node's hot threads.
REWRITE_AFTER = timedelta(minutes=10)


MAX_PEERS = 1024  # Settings.peerbook_max_peers
UNKNOWN_SHARE = 0.5  # Settings.unknown_share: of the places, what unstaked peers hold


def _no_stake(peer_id: str) -> bool:
    return False


class PeerBook:
    def __init__(
        self, db: Database, max_peers: int = MAX_PEERS, unknown_share: float = UNKNOWN_SHARE
    ) -> None:
        self._db = db
        self.max_peers = max_peers
        self.max_unstaked = max(1, int(max_peers * unknown_share))
        self._written: dict[str, tuple[tuple[str, ...], datetime]] = {}

    def remember(self, peers: list[PeerInfoView], stake: Callable[[str], bool] = _no_stake) -> None:
        """Record connected peers (with the addresses they listen on) as seen now:
        those new here, with other addresses, or not written for REWRITE_AFTER; then
        keep the book within its bounds (``stake``: the node has a stake in that peer)."""
        now = datetime.now(UTC)
        due: dict[str, list[str]] = {}
        for peer in peers:
            bare = (a.split("/p2p/")[0] for a in peer.addrs)
            addrs = list(dict.fromkeys(a for a in bare if a))[:MAX_ADDRS_PER_PEER]
            written = self._written.get(peer.peer_id)
            unchanged = (
                written is not None
                and written[0] == tuple(addrs)
                and now - written[1] < REWRITE_AFTER
            )
            if addrs and not unchanged:
                due[peer.peer_id] = addrs
        if not due:
            return
        with self._db.session() as session:
            for peer_id, addrs in due.items():
                # Written over, never read first: a stored row that cannot be read is
                # replaced (loaded, it raised).
                row = {"addrs": addrs, "last_seen": now}
                where = KNOWN_PEERS.c.peer_id == peer_id
                if session.execute(update(KNOWN_PEERS).where(where).values(row)).rowcount == 0:
                    session.execute(insert(KNOWN_PEERS).values(peer_id=peer_id, **row))
            session.execute(delete(KnownPeer).where(KnownPeer.last_seen < now - FORGET_AFTER))
            session.flush()
            newest = session.scalars(
                select(KnownPeer.peer_id).order_by(KnownPeer.last_seen.desc())
            ).all()
            gone = self._over_bounds(list(newest), stake)
            for start in range(0, len(gone), 500):  # SQLite's bound parameters
                session.execute(
                    delete(KnownPeer)
                    .where(KnownPeer.peer_id.in_(gone[start : start + 500]))
                    .execution_options(synchronize_session=False)
                )
        for peer_id, addrs in due.items():
            self._written[peer_id] = (tuple(addrs), now)
        if len(self._written) > 4 * len(peers) + 1024:  # peers long gone: forget them here
            old = now - REWRITE_AFTER
            self._written = {p: w for p, w in self._written.items() if w[1] >= old}

    def _over_bounds(self, newest: list[str], stake: Callable[[str], bool]) -> list[str]:
        """Of the remembered peers (the most recently seen first), those past the bounds:
        staked peers keep up to ``max_peers`` places, unstaked ones what is left of
        them, at most ``max_unstaked``."""
        if len(newest) <= self.max_unstaked:
            return []
        staked: list[str] = []
        unstaked: list[str] = []
        for peer in newest:  # one question a peer: the answer may change meanwhile
            (staked if stake(peer) else unstaked).append(peer)
        kept = len(staked[: self.max_peers])
        room = min(self.max_peers - kept, self.max_unstaked)
        return staked[self.max_peers :] + unstaked[room:]

    def dial_addrs(self) -> list[str]:
        """Every remembered address as a full ``.../p2p/<peer id>`` multiaddr; a row whose
        addresses cannot be read is left out, with a warning."""
        query = select(*as_text(KNOWN_PEERS, ["peer_id", "addrs"]))
        with self._db.session() as session:
            rows = session.execute(query.order_by(KNOWN_PEERS.c.last_seen.desc())).all()
        return [f"{addr}/p2p/{peer_id}" for peer_id, text in rows for addr in _addrs(peer_id, text)]


def _addrs(peer_id: str, text: Any) -> list[str]:
    """A remembered peer's addresses from their stored text ([] if they cannot be read)."""
    try:
        addrs = json_value(text)
    except ValueError as exc:
        why = f"are not JSON ({exc})"
    else:
        if isinstance(addrs, list) and all(isinstance(a, str) for a in addrs):
            return addrs
        why = f"are {type(addrs).__name__}, not a list of addresses"
    log.warning("remembered peer %s: its addresses in the store %s; not dialed (written "
                "again when it connects)", peer_id, why)  # fmt: skip
    return []
