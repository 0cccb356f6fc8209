"""A patch to py-libp2p's hole punching (DCUtR).

**Hole punching looks at each connection's addresses once.** DCUtR's drive loop
(every 2 s) turned every address of every connection into text to look for
``/p2p-circuit``, on every pass: on an idle daemon with 20 connections, 3 % of
its network thread. A connection's transport addresses are set when it is made;
whether they are relayed is now remembered per connection (while that same list
is its addresses: set again, they are looked at again). Which peers it drives a
hole punch to, and when, is unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Any

import trio

log = logging.getLogger("dms.network")


# How often DCUtR looks for relayed connections to upgrade (py-libp2p's own period).
HOLE_PUNCH_DRIVE_S = 2.0


def relayed_once_per_connection() -> bool:
    from libp2p.relay.circuit_v2 import dcutr

    protocol = getattr(dcutr, "DCUtRProtocol", None)
    needed = ("_auto_drive_loop", "initiate_hole_punch")
    if (
        protocol is None
        or not all(hasattr(protocol, n) for n in needed)
        or not hasattr(dcutr, "MAX_HOLE_PUNCH_ATTEMPTS")
    ):
        log.info("py-libp2p's DCUtR changed shape; its drive loop is left as it is")
        return False
    looked: weakref.WeakKeyDictionary[Any, tuple[Any, bool]] = weakref.WeakKeyDictionary()

    def relayed(conn: Any) -> bool | None:
        """Whether ``conn`` runs over a relay; None when its addresses cannot be had."""
        fixed = getattr(conn, "_actual_transport_addresses", None)
        if fixed is not None:
            with contextlib.suppress(TypeError):  # a connection that cannot be a key
                last = looked.get(conn)
                if last is not None and last[0] is fixed:
                    return last[1]
        try:
            addrs = conn.get_transport_addresses()
        except Exception:
            return None
        answer = bool(addrs) and any("/p2p-circuit" in str(addr) for addr in addrs)
        if fixed is not None:
            with contextlib.suppress(TypeError):
                looked[conn] = (fixed, answer)
        return answer

    async def drive_relayed(self: Any) -> None:
        # py-libp2p's _auto_drive_loop, each connection's addresses looked at once.
        while True:
            await trio.sleep(HOLE_PUNCH_DRIVE_S)
            try:
                network = self.host.get_network()
                connections = getattr(network, "connections", {}) or {}
                for peer_id in list(connections.keys()):
                    if peer_id == self.host.get_id():
                        continue
                    if peer_id in self._in_progress or peer_id in self._direct_connections:
                        continue
                    attempts = self._hole_punch_attempts.get(peer_id, 0)
                    if attempts >= dcutr.MAX_HOLE_PUNCH_ATTEMPTS:
                        continue
                    conns = connections.get(peer_id)
                    if not conns:
                        continue
                    if not isinstance(conns, list):
                        conns = [conns]
                    if not any(relayed(conn) for conn in conns):
                        continue
                    log.debug("driving a hole punch to %s", peer_id)
                    await self.initiate_hole_punch(peer_id)
            except trio.Cancelled:
                raise
            except Exception as exc:
                log.debug("hole punch drive loop: %s", exc)

    protocol._auto_drive_loop = drive_relayed
    return True
