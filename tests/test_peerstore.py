"""The peerstore's order of eviction among peers heard through heartbeats, and its bound
on them (``dms.network.peerstore``; specs/security.md, "Budgets and priority").

Keys and heartbeats are free: a key that publishes heartbeats is in the peers table
like any dms node. So peers heard lately outrank fresh keys only up to
``max_heard``, those known the longest first; past it they are as any fresh key.
The network side (a heard peer reachable after a flood of fresh keys, a key that
left not dialed again) is in tests/adversarial/test_network_budgets.py.
"""

from __future__ import annotations

from libp2p.peer.id import ID
from multiaddr import Multiaddr

from dms.network.peerstore import BoundedPeerStore
from dms.security.identity import Identity

ADDR = Multiaddr("/ip4/127.0.0.1/tcp/1")


def fresh_keys(count: int) -> list[ID]:
    return [ID.from_base58(Identity.generate().peer_id) for _ in range(count)]


def test_heartbeats_from_many_keys_outrank_fresh_keys_only_up_to_the_bound() -> None:
    """Eight keys heartbeat (the first three known the longest), then twenty fresh keys
    arrive: the three keep their entries, the five heard after them go like any fresh
    key, and the store stays within its bound."""
    store = BoundedPeerStore(max_peers=10, max_heard=3)
    heard = fresh_keys(8)
    store.heard = lambda: [pid.to_base58() for pid in heard]  # known the longest first
    for pid in heard:
        store.add_addrs(pid, [ADDR], 600)
    for pid in fresh_keys(20):
        store.add_addrs(pid, [ADDR], 3600)

    assert store.size() <= 10
    assert all(store.has_peer(pid) for pid in heard[:3])
    assert not any(store.has_peer(pid) for pid in heard[3:])


def test_a_peer_that_leaves_is_forgotten_unless_kept_or_heard_within_the_bound() -> None:
    store = BoundedPeerStore(max_peers=100, max_heard=1)
    heard, beyond, staked, fresh = fresh_keys(4)
    store.heard = lambda: [heard.to_base58(), beyond.to_base58()]
    store.keep = lambda pid: pid == staked
    for pid in (heard, beyond, staked, fresh):
        store.add_addrs(pid, [ADDR], 7200)

    assert [store.forget(pid) for pid in (heard, beyond, staked, fresh)] == [
        False,
        True,
        False,
        True,
    ]
    assert store.has_peer(heard) and store.has_peer(staked)
    assert not store.has_peer(beyond) and not store.has_peer(fresh)


def test_the_cleanup_drops_expired_entries_but_those_kept_or_heard() -> None:
    """py-libp2p's cleanup (started by the host every CLEANUP_S) dropped every entry
    whose addresses expired, a connected or staked peer's too."""
    store = BoundedPeerStore(max_peers=100, max_heard=10)
    heard, staked, fresh = fresh_keys(3)
    store.heard = lambda: [heard.to_base58()]
    store.keep = lambda pid: pid == staked
    for pid in (heard, staked, fresh):
        store.add_addrs(pid, [ADDR], 60)
        store.peer_data_map[pid].last_identified -= 120  # identified 2 min ago

    store._cleanup_expired_records()
    assert store.has_peer(heard) and store.has_peer(staked)
    assert not store.has_peer(fresh)
