"""The peers a node has met, kept in the store so a restarted node can dial them again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select

from dms.network.host import PeerInfoView
from dms.store import Database
from dms.store.models import KnownPeer

MAX_ADDRS_PER_PEER = 8
FORGET_AFTER = timedelta(days=7)


class PeerBook:
    def __init__(self, db: Database) -> None:
        self._db = db

    def remember(self, peers: list[PeerInfoView]) -> None:
        """Record connected peers (with the addresses they listen on) as seen now."""
        now = datetime.now(UTC)
        with self._db.session() as session:
            for peer in peers:
                bare = (a.split("/p2p/")[0] for a in peer.addrs)
                addrs = list(dict.fromkeys(a for a in bare if a))[:MAX_ADDRS_PER_PEER]
                if not addrs:
                    continue
                row = session.get(KnownPeer, peer.peer_id)
                if row is None:
                    session.add(KnownPeer(peer_id=peer.peer_id, addrs=addrs, last_seen=now))
                else:
                    row.addrs = addrs
                    row.last_seen = now
            session.execute(delete(KnownPeer).where(KnownPeer.last_seen < now - FORGET_AFTER))

    def dial_addrs(self) -> list[str]:
        """Every remembered address as a full ``.../p2p/<peer id>`` multiaddr."""
        with self._db.session() as session:
            rows = session.scalars(select(KnownPeer).order_by(KnownPeer.last_seen.desc())).all()
            return [f"{addr}/p2p/{row.peer_id}" for row in rows for addr in row.addrs]
