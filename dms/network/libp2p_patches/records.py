"""Patches to py-libp2p's signed peer records: a peer's verified once, our own read
once a second.

**Gossip sender records, verified once.** Every gossipsub RPC carries the
sender's signed peer record, and py-libp2p verifies its signature and parses
its addresses on every RPC, twice (in the reader and in the router). A
record is a byte string: the same bytes from the same peer verify the same
way, so the result is remembered (a bounded memo keyed by receiving host,
peer and bytes) and a changed record is verified again; so is an unchanged
one after ``SENDER_RECORD_REFRESH_S``, which keeps it fresh in the peerstore
(py-libp2p keeps it for two hours).

**The node's own record, read once a second.** Every RPC the node sends (each gossip
heartbeat's IHAVE to every gossip peer, every message it publishes or forwards,
identify) carries its own signed peer record, and py-libp2p builds it anew each
time: the listeners' addresses read from their sockets and parsed into multiaddrs,
the record it signed last parsed again to compare (0.2 ms a call; about a tenth of
an idle daemon's network thread). It is now read at most once every
``OWN_RECORD_CHECK_S`` per host and the same bytes sent meanwhile: a change of the
node's addresses (a listener added, an observed address confirmed) is in its
record within that second, as it was in the next one before.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

log = logging.getLogger("dms.network")


SENDER_RECORD_MEMO = 4096
SENDER_RECORD_REFRESH_S = 600.0
# How long a host sends its own signed peer record as it is before reading its
# addresses again (py-libp2p's ``env_to_send_in_RPC`` read them for every RPC).
OWN_RECORD_CHECK_S = 1.0


# The modules that imported ``env_to_send_in_RPC`` by name (each gets the memo).
OWN_RECORD_USERS = (
    "libp2p.pubsub.pubsub",
    "libp2p.pubsub.gossipsub",
    "libp2p.pubsub.floodsub",
    "libp2p.identity.identify.identify",
    "libp2p.kad_dht.kad_dht",
    "libp2p.kad_dht.peer_routing",
    "libp2p.kad_dht.provider_store",
    "libp2p.kad_dht.value_store",
    "libp2p.relay.circuit_v2.discovery",
)


def memoize_sender_records() -> bool:
    from libp2p.pubsub import floodsub, gossipsub, pubsub

    # Each module imported the function by name: every RPC is checked by pubsub's
    # reader and again by the router's control handler.
    modules = [
        m for m in (pubsub, gossipsub, floodsub) if hasattr(m, "maybe_consume_signed_record")
    ]
    if not modules:
        log.info("py-libp2p's pubsub changed shape; sender records are verified as before")
        return False
    consume: Callable[..., bool] = modules[0].maybe_consume_signed_record
    seen: OrderedDict[tuple[int, Any, bytes], float] = OrderedDict()
    seen_lock = threading.Lock()  # hosts of one process run on several trio threads

    def consume_once(msg: Any, host: Any, peer_id: Any) -> bool:
        if not msg.HasField("senderRecord"):
            return True
        key = (id(host), peer_id, bytes(msg.senderRecord))
        now = time.monotonic()
        with seen_lock:
            verified_at = seen.get(key)
            if verified_at is not None and now - verified_at < SENDER_RECORD_REFRESH_S:
                seen.move_to_end(key)
                return True
        if not consume(msg, host, peer_id):
            return False
        with seen_lock:
            seen[key] = now
            seen.move_to_end(key)
            while len(seen) > SENDER_RECORD_MEMO:
                seen.popitem(last=False)
        return True

    for module in modules:
        module.maybe_consume_signed_record = consume_once
    return len(modules) == 3


def reuse_own_record() -> bool:
    import importlib

    from libp2p.peer import peerstore

    issue = getattr(peerstore, "env_to_send_in_RPC", None)
    users = []
    for name in OWN_RECORD_USERS:
        with contextlib.suppress(ImportError):
            module = importlib.import_module(name)
            if issue is not None and getattr(module, "env_to_send_in_RPC", None) is issue:
                users.append(module)
    if issue is None or len(users) != len(OWN_RECORD_USERS):
        log.info("py-libp2p's peer records changed shape; its own is built for every RPC")
        return False
    kept: weakref.WeakKeyDictionary[Any, tuple[float, bytes]] = weakref.WeakKeyDictionary()
    kept_lock = threading.Lock()  # hosts of one process run on several trio threads

    def own_record(host: Any) -> tuple[bytes, bool]:
        now = time.monotonic()
        with kept_lock:
            last = kept.get(host)
        if last is not None and now - last[0] < OWN_RECORD_CHECK_S:
            return last[1], False
        envelope, issued = issue(host)
        with kept_lock:
            kept[host] = (now, envelope)
        return envelope, issued

    peerstore.env_to_send_in_RPC = own_record
    for module in users:
        module.env_to_send_in_RPC = own_record  # type: ignore[attr-defined]
    return True
