"""Process-wide patches to py-libp2p (0.8.1, pinned ``>=0.8.1,<0.9``): per-message costs,
gossip races, and the budgets a hostile peer must not get around.

py-libp2p (0.8) does work on every message that its specs do not ask for, and
a node pays it on every frame it reads; its gossipsub also departs from the
spec in three ways that cost messages. Each patch is applied once per process
by :func:`apply_libp2p_patches` and skipped, with a log line, when the library
no longer has the shape it was written against; :data:`SKIPPED` names the
skipped ones (``tests/test_libp2p_patches.py`` fails on any). One module a part
of the library, each saying what it changes and why:

- :mod:`.yamux`: credit sent at half a window, settings read once, a buffered
  body taken at once, RTT measured every 5 minutes, a reset that wakes its reader,
  a write that waits for a window as long as its caller does;
- :mod:`.windows`: the receive window enforced, the bytes all streams hold bounded;
- :mod:`.locks`: a free lock around a frame is no schedule point, but one in 16 is;
- :mod:`.tcp`: a TCP connection reads ahead;
- :mod:`.noise`: a Noise message goes out whole, cancelled or not;
- :mod:`.quic`: a QUIC stream's reset wakes its read and write, which then wait as
  over Yamux, and an overflow of its receive buffer resets it (no bytes dropped);
  applied once the QUIC transport is loaded (:func:`apply_quic_patches`);
- :mod:`.dial`: a dial tries every address of a peer (``dms.network.dialing``);
- :mod:`.autoconnect`: a dial this node refused itself is no failure of the peer's
  to the auto-connector;
- :mod:`.records`: a peer's signed record verified once, the node's own read once
  a second;
- :mod:`.holepunch`: DCUtR looks at each connection's addresses once;
- :mod:`.gossip`, :mod:`.scoring`, :mod:`.subscriptions`: gossipsub's prunes back
  off, no opportunistic grafting, IHAVE every few heartbeats, no score upkeep
  without scores, subscriptions repeated to every new stream, a peer's queued
  messages flushed once it is writable (no warning before).

Measured with an idle 50-node cluster in one process (``bench/placement.py``'s
settings): 4.0 ms of CPU per gossip message received before, 1.7 ms after.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from dms.network import deferred
from dms.network.libp2p_patches import (
    autoconnect,
    dial,
    gossip,
    holepunch,
    locks,
    noise,
    quic,
    records,
    scoring,
    subscriptions,
    tcp,
    windows,
    yamux,
)
from dms.network.libp2p_patches.windows import BUFFERS, set_buffer_budget

__all__ = [
    "APPLIED",
    "BUFFERS",
    "PATCHES",
    "QUIC_PATCHES",
    "SKIPPED",
    "apply_libp2p_patches",
    "apply_quic_patches",
    "set_buffer_budget",
]

_applied = False
_quic_applied = False
_lock = threading.Lock()
# Patches this process applied, and those skipped because py-libp2p changed shape.
APPLIED: list[str] = []
SKIPPED: list[str] = []

# In the order they are applied (each is independent of the others).
PATCHES: tuple[Callable[[], bool], ...] = (
    yamux.batch_yamux_window_updates,
    records.memoize_sender_records,
    records.reuse_own_record,
    holepunch.relayed_once_per_connection,
    yamux.measure_rtt_less_often,
    tcp.read_ahead_on_tcp,
    gossip.back_off_pruned_peers,
    gossip.no_opportunistic_grafting,
    scoring.no_score_upkeep_without_scores,
    gossip.ihave_every_few_heartbeats,
    subscriptions.repeat_subscriptions_to_new_streams,
    subscriptions.flush_pending_messages_once_writable,
    locks.free_locks_do_not_yield,
    windows.enforce_yamux_receive_window,
    yamux.wake_readers_on_reset,
    yamux.cheaper_yamux_reads,
    dial.dial_every_address,
    autoconnect.local_refusals_are_no_failures,
    noise.noise_messages_go_whole,
    yamux.yamux_writes_wait_for_a_window,
)
# Those of py-libp2p's QUIC transport, whose modules a host imports only for a QUIC
# listen address (``dms.network.deferred``): applied when the first such host is built.
QUIC_PATCHES: tuple[Callable[[], bool], ...] = (
    quic.resets_wake_the_streams_waiters,
    quic.overflows_reset_the_stream,
)


def apply_libp2p_patches() -> None:
    """Apply every patch this py-libp2p supports; safe to call many times."""
    global _applied
    with _lock:
        if _applied:
            return
        _applied = True
        _apply(PATCHES)


def apply_quic_patches() -> None:
    """Apply every QUIC patch this py-libp2p supports; safe to call many times. Loads
    py-libp2p's QUIC transport."""
    global _quic_applied
    with _lock:
        if _quic_applied:
            return
        _quic_applied = True
        # The real QUIC modules first: patched before they load, a patch would set its
        # wrapper on a stand-in (dms.network.deferred) and the class keep its own.
        for group in deferred.GROUPS:
            if group.name == "quic":
                deferred.load(group)
        _apply(QUIC_PATCHES)


def _apply(patches: tuple[Callable[[], bool], ...]) -> None:
    """Apply each patch, noting it in APPLIED or SKIPPED (its source not the one it was
    written against). The caller holds ``_lock``."""
    for patch in patches:
        (APPLIED if patch() else SKIPPED).append(patch.__name__)
