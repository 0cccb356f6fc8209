"""The node's chunk store and courier: chunks in and out, for the allocations it runs
and the mining sessions its owner places (``specs/chunks.md``)."""

from __future__ import annotations

import logging
from pathlib import Path

from dms.network.host import Libp2pTransport
from dms.network.transfer import ChunkNetwork, Courier
from dms.store.chunks import ChunkStore

log = logging.getLogger("dms.node")


def open_courier(
    home: Path | None,
    network: Libp2pTransport | None,
    chunk_network: ChunkNetwork | None,
    quota_bytes: int,
) -> Courier | None:
    """The courier over ``home/chunks`` (None without a home or a libp2p network). No
    session survives a restart, so every chunk on disk is an orphan and goes; the
    network serves the courier's offers."""
    if network is None or home is None:
        return None
    store = ChunkStore(home / "chunks", quota_bytes)
    freed = store.clean()
    if freed:
        log.info("removed %d orphaned chunk bytes", freed)
    courier = Courier(store, chunk_network or network)
    network.offers = courier.offers
    return courier
