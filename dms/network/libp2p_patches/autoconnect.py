"""A patch to py-libp2p's auto-connector.

**A dial this node refused itself is no failure of the peer's.** The auto-connector
(``AutoConnector.maybe_connect``) dials the peers it has addresses of while the swarm
holds fewer connections than its watermarks ask, and counts every dial that raises as
the peer's failure: the peer is skipped for 5 s, 15 s, 20 s, 40 s ... 300 s after it
(``_get_cooldown``). A dial refused before any address was tried, by a budget of this
node's own (the new keys' dials a second, ``new_dials_full``; the outbound
connections, ``outbound_full``: ``admission.refused_here``), was counted so too: a peer
refused three times while the node was busy waited 20 s, then 40 s, for its next try,
and up to 5 minutes once the budget had room again. Now the peer's count and its last
attempt are put back as they were before the cycle's refused dial: it is tried again at
the auto-connector's next cycle (10 s while the node is below ``min_connections``,
30 s else), where the budget decides again; a peer connected by the cycle's end
(inbound, or a dial of it that connected after the refusal) has both cleared instead,
as a connection py-libp2p's dial made clears them (put back, the failures counted
before the refusal stayed with a peer that had connected). A dial that failed (an
address refused, timed out, a handshake that went wrong) counts as before. Applied
only to the ``maybe_connect`` it was written against (its source's digest,
``MAYBE_CONNECT_SHA256``: it dials in tasks of its own nursery, within the call, and
counts a failure there).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from dms.network.libp2p_patches.source import shipped_source

log = logging.getLogger("dms.network")

# The sha256 of py-libp2p's AutoConnector.maybe_connect (its source, dedented) that the
# patch was written against: its dials run in a nursery the call waits for, and an
# exception of ``swarm.dial_peer`` raises the peer's ``_failure_counts`` and stamps its
# ``_last_connect_attempt`` there.
MAYBE_CONNECT_SHA256 = "de87a7c6c19261cdb7426be62a37aa38857c0efeadab9ada133df45c7b1746ac"


def local_refusals_are_no_failures() -> bool:
    from libp2p.network.auto_connector import AutoConnector

    from dms.network.admission import ON_REFUSAL, scoped

    maybe_connect: Callable[[Any], Awaitable[None]] = AutoConnector.maybe_connect
    if getattr(maybe_connect, "dms_patched", False):
        return True
    if shipped_source(maybe_connect, MAYBE_CONNECT_SHA256) is None:
        log.info("py-libp2p's auto-connector changed shape; a refused dial counts as failed")
        return False

    @functools.wraps(maybe_connect)
    async def counting_only_failures(self: Any) -> None:
        before: dict[Any, tuple[int | None, float | None]] = {}

        def refused(peer_id: Any) -> None:
            before.setdefault(
                peer_id,
                (self._failure_counts.get(peer_id), self._last_connect_attempt.get(peer_id)),
            )

        try:
            # The cycle's dials inherit it; the connections they made do not keep it.
            with scoped(ON_REFUSAL, refused):
                await maybe_connect(self)
        finally:
            # Every dial of the cycle has ended (its nursery closed) and been counted. A
            # peer connected by now (inbound, or a dial of it that connected after the
            # refusal) has no failure to put back: its count and last attempt are
            # cleared, as py-libp2p clears them for a connection its dial made.
            for peer_id, (count, at) in before.items():
                if self.swarm.get_connections(peer_id):
                    count = at = None
                _put(self._failure_counts, peer_id, count)
                _put(self._last_connect_attempt, peer_id, at)

    counting_only_failures.dms_patched = True  # type: ignore[attr-defined]
    AutoConnector.maybe_connect = counting_only_failures  # type: ignore[method-assign]
    return True


def _put(table: dict[Any, Any], key: Any, value: Any) -> None:
    if value is None:
        table.pop(key, None)
    else:
        table[key] = value
