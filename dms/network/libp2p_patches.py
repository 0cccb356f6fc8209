"""Process-wide patches to py-libp2p (0.8.1, pinned ``>=0.8.1,<0.9``): per-message costs,
gossip races, and the budgets a hostile peer must not get around.

py-libp2p (0.8) does work on every message that its specs do not ask for, and
a node pays it on every frame it reads; its gossipsub also departs from the
spec in three ways that cost messages. Each patch is applied once per process
by :func:`apply_libp2p_patches` and skipped, with a log line, when the library
no longer has the shape it was written against; :data:`SKIPPED` names the
skipped ones (``tests/test_libp2p_patches.py`` fails on any):

- **Yamux credit, batched** (go-yamux semantics). py-libp2p sends a
  WINDOW_UPDATE after *every* read, even a 1-byte read of a varint prefix, so a
  gossip RPC costs about three extra Yamux frames (each Noise-encrypted,
  written, read, decrypted and parsed by the peer). go-yamux sends credit only
  once half the receive window is consumed; we do the same, which keeps the
  window's flow control (a sender still stops at a full window, and resumes when
  half of it is read) and removes ~70 % of the frames on an idle gossip network.
- **Gossip sender records, verified once.** Every gossipsub RPC carries the
  sender's signed peer record, and py-libp2p verifies its signature and parses
  its addresses on every RPC, twice (in the reader and in the router). A
  record is a byte string: the same bytes from the same peer verify the same
  way, so the result is remembered (a bounded memo keyed by receiving host,
  peer and bytes) and a changed record is verified again; so is an unchanged
  one after ``SENDER_RECORD_REFRESH_S``, which keeps it fresh in the peerstore
  (py-libp2p keeps it for two hours).

- **The node's own record, read once a second.** Every RPC the node sends (each gossip
  heartbeat's IHAVE to every gossip peer, every message it publishes or forwards,
  identify) carries its own signed peer record, and py-libp2p builds it anew each
  time: the listeners' addresses read from their sockets and parsed into multiaddrs,
  the record it signed last parsed again to compare (0.2 ms a call; about a tenth of
  an idle daemon's network thread). It is now read at most once every
  ``OWN_RECORD_CHECK_S`` per host and the same bytes sent meanwhile: a change of the
  node's addresses (a listener added, an observed address confirmed) is in its
  record within that second, as it was in the next one before.

- **Yamux's per-frame settings and body reads, cheaper.** py-libp2p reads its
  ``PY_YAMUX_*`` tuning variables from the environment on every frame (two to
  four ``os.getenv`` calls each), and reads every DATA frame's body under a
  fresh 60 s ``fail_after`` cancel scope, although the sender wrote header and
  body as one Noise message, so the body is already in the session's buffer
  when the header has been read. The variables are now read once, when the
  patch is applied (a daemon's environment does not change under it), and a
  body already buffered in full is taken from the buffer directly; one that is
  not is read as before, under its timeout. Together ~5 % of a busy node's
  network thread.

- **Hole punching looks at each connection's addresses once.** DCUtR's drive loop
  (every 2 s) turned every address of every connection into text to look for
  ``/p2p-circuit``, on every pass: on an idle daemon with 20 connections, 3 % of
  its network thread. A connection's transport addresses are set when it is made;
  whether they are relayed is now remembered per connection (while that same list
  is its addresses: set again, they are looked at again). Which peers it drives a
  hole punch to, and when, is unchanged.

- **An idle connection's RTT, measured every 5 minutes.** py-libp2p's Yamux pings
  every connection every 30 s from both ends, to measure the round trip time it
  tunes receive windows by (its only use): on an idle node with 20 connections the
  pings and pongs were one frame in seven it sent and read. It still measures at
  once on a new connection, then every ``YAMUX_RTT_EVERY_S``.

- **A TCP connection reads ahead.** Noise reads each message as a 2-byte length and
  then its body, and py-libp2p's TCP stream made a ``recv`` of each (and took its
  read lock, a trio checkpoint, for each): two socket reads per frame, where one
  brings both. A read now asks the socket for at least ``TCP_READ_AHEAD`` bytes and
  serves the next reads from what came beyond what was asked, in order (each still a
  trio schedule point, as a socket read was); at most that many bytes a connection
  wait there (the kernel held them before).

- **The receive window, enforced.** py-libp2p's Yamux notes when a peer sends
  past a stream's receive window, sets the window to 0 and buffers the bytes
  anyway: a peer that pushes 256 MiB on a stream the node does not read (its own
  outbound stream, say) grew the node by 257 MB. Now the bytes past the window
  (``target_recv_window``: what the node granted) are dropped, the stream is
  reset (``window_exceeded``) and its buffer freed; the bytes buffered in all
  streams of the process are bounded too (:func:`set_buffer_budget`), past which
  the stream that would overrun it is reset the same way. A connection whose
  streams overrun their window ``OVERRUNS_BEFORE_CLOSE`` times is closed
  (go-yamux closes it at the first): the node must decrypt every byte a peer
  sends, so one that ignores windows is not kept.

- **A reset wakes the stream's reader.** py-libp2p's Yamux marks a stream it resets
  itself as reset but leaves a task waiting to read it asleep for as long as the
  connection lives: the stream's handler never returned. Every stream the node
  reset for being idle (``stream_idle``) still held its slot in the stream budgets
  (a peer's 64 streams, idle-reset, blocked it for good; many keys, all 4,096),
  and its handler's task and buffers; the DHT's 12 handler slots were held so.
  Now a reset sets the stream's event, as one from the peer does, so the reader
  raises and the handler ends.

Measured with an idle 50-node cluster in one process (``bench/placement.py``'s
settings): 4.0 ms of CPU per gossip message received before, 1.7 ms after.

- **A free lock is no schedule point, but one in 16 is.** Every lock py-libp2p takes
  around a frame (the stream's state lock, its write, window and close locks, Yamux's
  write and streams locks, the TCP stream's read and write locks) is a ``trio.Lock`` (the
  stream's write lock a ``trio.Semaphore``), whose ``acquire`` yields to the scheduler
  even when the lock is free: a frame written cost its writer eight task steps (each a
  pass of trio's scheduler, an ``epoll`` call with it), a frame read 4 of Yamux's
  reader and 6 of the stream's task (an invoke's two frames: 36 steps). A free
  one is now taken at once (``QuickLock``: still a cancel point), except every
  ``FREE_LOCKS_A_TURN``-th (16) free acquire of the trio run, which is trio's own, a full
  checkpoint; a held one is waited for as before, in trio's own order. The bound
  matters: those yields were the only schedule points of some loops. Yamux's reader
  takes the frames of a Noise message already read with none of its own (a message
  of 5,000 twelve-byte frames, one lock each, was one task step of 30-50 ms with every
  free lock taken at once), and a reader of a stream whose Yamux buffer holds bytes
  (py-libp2p's pubsub reader, Noise over a relayed stream) loops over them with none
  (10,000 two-byte reads: one step of 120-150 ms); now a step takes at most 16 free
  locks, 0.2-0.3 ms in both. Yamux's ``_write_frame`` no longer parses each header to
  format a debug line nobody logs, nor yields again after the socket's send (a
  writer of many frames still yields at one take of its write lock in 16). And
  a frame that takes no lock at all (a ping's answer, a frame of an unknown type:
  Yamux's reader handled a Noise message of 5,000 of them in one step of 30-40 ms,
  patch or none) counts too: each frame Yamux's module reads (``read_exactly``,
  patched by name) adds to the same counter, its turn shielded from cancellation
  (no new cancel point between a header and its body). The patch checks that
  each lock is, once its class has made it, the trio type it was written for,
  that ``_write_frame`` is the source it replaces (by its digest,
  ``WRITE_FRAME_SHA256``) and that Yamux reads with py-libp2p's own
  ``read_exactly``; otherwise it is skipped.

- **A dial tries every address of a peer, and is done when one connects.** py-libp2p
  dials the first address of each transport class, two at most, each with a 250 ms head
  start (``_HAPPY_EYEBALLS_DELAY``) that ends on its failure alone, and waits for every
  dial it started: a peer advertising two TCP addresses (Wi-Fi and Ethernet, Docker's
  bridge, a VPN) was dialed on its first alone, reachable or not, and every dial waited
  the head start out after its last address (~0.28 s on loopback, ~0.03 s of it the
  connection). ``Swarm.dial_peer`` is now ``dms.network.dialing.dial_peer``: the same
  dial but for its choice and its wait, up to ``MAX_DIAL_ADDRS`` (8) addresses, ranked
  (the one that connected last, then on this host's networks, public, private), the
  first of each class at once and each next one 250 ms after the one before or once a
  dial fails, ended by the first connection. Applied only to the ``Swarm.dial_peer``
  it was copied from (its source's digest, ``DIAL_PEER_SHA256``).

- **A Noise message goes out whole, cancelled or not.** py-libp2p encrypts a message
  (spending its nonce) and then takes the TCP stream's write lock and sends, both
  cancel points: a write whose deadline passed in between (a dial's or new stream's
  ``dial_timeout_s``, a loaded node's yield at a lock) dropped the message, and every
  later one on the connection failed to decrypt at the peer, which closed it (quietly:
  py-libp2p logs that at debug), every stream of it reset. A loaded daemon reading a
  flood of 100 keys gave up on new streams to some of them so, and two keys of a run
  lost their connection mid-test. A cancel now lands before the encryption; once
  encrypted, the message is sent shielded from it (the caller's cancel comes at its
  next checkpoint), within ``NOISE_SEND_LIMIT_S`` (30 s; go-yamux closes a connection
  whose write takes 10 s): past it, part of the message may be on the wire, so the
  connection is closed and the write fails. The common case opens no cancel scope
  (one cost 14% of a 200-byte round trip's CPU): the TCP write lock free, it is
  taken, the message encrypted under it and handed to the socket with no checkpoint
  between; only what the socket does not take at once is sent shielded.

- **A write waits for a window as long as its caller does.** py-libp2p's Yamux
  write gave up after 5 s without a window (``MuxedStreamError``), under every
  deadline of the node's own (a unicast write's ``stream_idle_s``, 120 s, past which
  it is ``write_stalled``; a chunk's ``idle_s`` plus its size at
  ``min_bytes_per_s``): a slow but honest reader (a loaded node, one throttling a
  peer's bytes) broke the stream. The wait is now ``YAMUX_WINDOW_WAIT_S`` (120 s);
  the caller's deadline governs. Applied only to the ``YamuxStream.write`` it was
  written against (its source's digest, ``YAMUX_WRITE_SHA256``).

- **A pruner backs off too** (gossipsub v1.1 spec, go-libp2p). When a mesh is
  over ``degree_high`` the heartbeat PRUNEs peers but, unlike go-libp2p, records
  no backoff for them, so a later heartbeat may GRAFT the same peer again; the
  pruned peer (which did record one) calls that a GRAFT flood, penalises the
  pruner and PRUNEs it back. On a well-connected node this churned every mesh
  (hundreds of "GRAFT flood" warnings a minute in a 20-node cluster, broadcast
  p95 tripled). The heartbeat's prunes now record the backoff, as the spec says.
- **No opportunistic grafting without peer scoring** (go-libp2p semantics).
  It exists to replace poorly scoring mesh peers; go-libp2p runs it only with
  score parameters set, every 60th heartbeat, when the mesh's median score is
  under a threshold. py-libp2p runs it on every heartbeat of every topic and,
  with no score parameters (ours: envelopes are signed and checked, which is
  our defence), grafts peers whenever scores differ at all. Every heartbeat
  then pushed meshes past ``degree_high``; the prunes that followed put, within
  a minute, nearly every pair of a 20-node cluster in backoff, and meshes fell
  apart (nodes with no mesh peer, heartbeats not reaching whole groups).
- **IHAVE every few heartbeats.** py-libp2p emits gossip (IHAVE to up to 6 non-mesh
  peers a topic) at every heartbeat whose window holds an id; a router with
  ``ihave_every_heartbeats`` (ours: 3) emits it at every third heartbeat only, its mcache
  window as many heartbeats long, so each id is still named once, with those that came
  since the last emission: an idle node's IHAVEs come in one RPC a peer per 3 s
  instead of one a second. Unpatched, the window of 3 is emitted at every heartbeat
  (py-libp2p's behaviour: each id named three times).
- **No score upkeep without scores.** Each heartbeat py-libp2p decays every peer's
  score counters, each of every topic, and looks at every mesh for a peer to replace by
  a better-scoring one (the score of each mesh peer and each other peer of the topic).
  With the score parameters we run (py-libp2p's defaults: every weight 0, every decay
  1), the decay multiplies by 1 and every score is 0, so neither ever changes
  anything; both are skipped while that holds (:func:`decays_are_identity`,
  :func:`scores_are_zero`), and run as before with parameters that weigh or decay.
- **Subscriptions repeated to every new pubsub stream.** A node tells a peer
  its topics once, in the hello on its own stream to that peer, and later
  subscriptions only to peers whose outbound queue exists at that moment. A
  subscription made while a peer is being registered reaches it by neither
  path, and a peer that re-opens its stream to us (after its old one died) has
  forgotten our topics, while our stream to it, still open, will not say them
  again. Either way the two never meet on the topic. So whenever a peer opens a
  pubsub stream to us, we send it our current topics once we can write to it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
import sys
import threading
import time
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import trio

log = logging.getLogger("dms.network")

SENDER_RECORD_MEMO = 4096
SENDER_RECORD_REFRESH_S = 600.0
# How long a host sends its own signed peer record as it is before reading its
# addresses again (py-libp2p's ``env_to_send_in_RPC`` read them for every RPC).
OWN_RECORD_CHECK_S = 1.0
# How often DCUtR looks for relayed connections to upgrade (py-libp2p's own period).
HOLE_PUNCH_DRIVE_S = 2.0
# How often Yamux measures a connection's round trip time after the first (py-libp2p:
# 30 s, from both ends); it only tunes receive windows.
YAMUX_RTT_EVERY_S = 300.0
# The least a TCP connection asks its socket for; what comes beyond the read that asked
# is kept for the next reads (at most this much a connection).
TCP_READ_AHEAD = 4096
# How long a Noise message, once encrypted, may take to reach the socket, cancelled or
# not; past it the connection is closed (go-yamux's ConnectionWriteTimeout is 10 s).
NOISE_SEND_LIMIT_S = 30.0
# How long a Yamux write waits for a window (py-libp2p: 5 s); the node's own deadlines
# (stream_idle_s, 120 s by default: write_stalled) end it first.
YAMUX_WINDOW_WAIT_S = 120.0
# The sha256 of py-libp2p's YamuxStream.write (its source, dedented) whose 5 s window
# wait the patch lengthens; any other source is left as it is.
YAMUX_WRITE_SHA256 = "457cb7d40aa46d7c65cd7ff16798b49f4fa461778c047c5ba0afff9e87b06cb0"
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
# How long a new pubsub stream's peer may take to become writable for us.
SUBSCRIPTION_REPEAT_WAIT_S = 30.0

_applied = False
_lock = threading.Lock()
# Patches this process applied, and those skipped because py-libp2p changed shape.
APPLIED: list[str] = []
SKIPPED: list[str] = []


def apply_libp2p_patches() -> None:
    """Apply every patch this py-libp2p supports; safe to call many times."""
    global _applied
    with _lock:
        if _applied:
            return
        _applied = True
        for patch in PATCHES:
            (APPLIED if patch() else SKIPPED).append(patch.__name__.lstrip("_"))


def _batch_yamux_window_updates() -> bool:
    from libp2p.stream_muxer.yamux.yamux import YamuxStream

    needed = ("_grow_threshold", "_grow_to_delta", "_apply_autotune_epoch", "send_window_update")
    if not all(hasattr(YamuxStream, name) for name in needed) or not hasattr(
        YamuxStream, "_auto_tune_and_send_window_update"
    ):
        log.info("py-libp2p's Yamux changed shape; its window updates are left as they are")
        return False

    async def send_credit_at_half_window(self: Any, *, bytes_read: int = 0) -> None:
        # The window is what the peer may still send: target - (granted + unread).
        # Credit goes back only when half of it is used up, in one update.
        async with self.window_lock:
            buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
            used = self.target_recv_window - (self.recv_window + buffered)
            if used <= 0 or used < self._grow_threshold():
                return
            credit = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
            self._pending_recv_release = 0
        # Never hold window_lock across the write (py-libp2p's own rule: the
        # inbound WINDOW_UPDATE handler needs the lock meanwhile).
        if credit > 0:
            await self.send_window_update(credit, skip_lock=True)

    YamuxStream._auto_tune_and_send_window_update = send_credit_at_half_window
    return True


def _memoize_sender_records() -> bool:
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


def _reuse_own_record() -> bool:
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


def _relayed_once_per_connection() -> bool:
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


def _measure_rtt_less_often() -> bool:
    from libp2p.stream_muxer.yamux import yamux

    if not isinstance(getattr(yamux, "RTT_MEASURE_INTERVAL", None), int | float) or not (
        hasattr(yamux.Yamux, "_measure_rtt_loop")
    ):
        log.info("py-libp2p's Yamux changed shape; it measures RTT as often as before")
        return False
    # The loop reads the module's constant at each wait.
    yamux.RTT_MEASURE_INTERVAL = YAMUX_RTT_EVERY_S  # type: ignore[assignment]
    return True


def _read_ahead_on_tcp() -> bool:
    from libp2p.io.trio import TrioTCPStream

    if not hasattr(TrioTCPStream, "read") or hasattr(TrioTCPStream, "_ahead"):
        log.info("py-libp2p's TCP stream changed shape; it reads as before")
        return False
    read = TrioTCPStream.read
    TrioTCPStream._ahead = b""  # what the last socket read brought beyond its ask

    async def read_ahead(self: Any, n: int | None = None) -> bytes:
        # A function patched in as TrioTCPStream.read: ``self`` is py-libp2p's stream.
        if n == 0:
            return b""
        if self._ahead:
            # A schedule point, as each socket read was: a task woken by the frame just
            # read runs before the next frame is taken (a stream's reset that came in
            # the same segment as its protocol's acknowledgement is not seen before the
            # opener's first write, which it was not either).
            await trio.lowlevel.checkpoint()
        if not self._ahead:  # (another reader may have taken it meanwhile)
            data = await read(self, None if n is None else max(n, TCP_READ_AHEAD))
            if self._ahead:  # another reader's read, queued before this one, kept some
                self._ahead += data
            elif n is None or len(data) <= n:
                return data
            else:
                self._ahead = data
        ahead = self._ahead
        out = ahead if n is None else ahead[:n]
        self._ahead = ahead[len(out) :]
        return out

    TrioTCPStream.read = read_ahead
    return True


def _back_off_pruned_peers() -> bool:
    from libp2p.pubsub.gossipsub import GossipSub

    if not all(hasattr(GossipSub, n) for n in ("mesh_heartbeat", "_add_back_off")):
        log.info("py-libp2p's gossipsub changed shape; its heartbeat prunes are left as they are")
        return False
    mesh_heartbeat = GossipSub.mesh_heartbeat

    def mesh_heartbeat_with_backoff(self: Any) -> Any:
        to_graft, to_prune = mesh_heartbeat(self)
        for peer, topics in to_prune.items():
            for topic in topics:
                self._add_back_off(peer, topic, False)
        return to_graft, to_prune

    GossipSub.mesh_heartbeat = mesh_heartbeat_with_backoff
    return True


def _no_opportunistic_grafting() -> bool:
    from libp2p.pubsub.gossipsub import GossipSub

    if not hasattr(GossipSub, "_perform_opportunistic_grafting"):
        log.info("py-libp2p's gossipsub changed shape; opportunistic grafting left as it is")
        return False

    def no_grafting(self: Any, topic: str, peers_to_graft: Any) -> int:
        return 0

    GossipSub._perform_opportunistic_grafting = no_grafting
    return True


def gossip_heartbeat_is_shaped() -> bool:
    """Whether py-libp2p's heartbeat calls ``gossip_heartbeat`` once a heartbeat and
    before the mcache shifts its window, and the window it emits is the history's
    first ``window_size`` heartbeats: what ``_ihave_every_few_heartbeats`` counts on
    (each id named once if IHAVE is emitted every ``window_size`` heartbeats)."""
    import inspect

    from libp2p.pubsub.gossipsub import GossipSub
    from libp2p.pubsub.mcache import MessageCache

    try:
        beat = inspect.getsource(GossipSub.heartbeat)
        window = inspect.getsource(MessageCache.window)
    except (AttributeError, OSError, TypeError):
        return False
    gossips = [m.start() for m in re.finditer(r"self\.gossip_heartbeat\(\)", beat)]
    shifts = [m.start() for m in re.finditer(r"self\.mcache\.shift\(\)", beat)]
    return (
        len(gossips) == 1
        and len(shifts) == 1
        and gossips[0] < shifts[0]
        and "self.history[: self.window_size]" in window
    )


def _ihave_every_few_heartbeats() -> bool:
    from libp2p.pubsub.gossipsub import GossipSub

    if not hasattr(GossipSub, "gossip_heartbeat") or not gossip_heartbeat_is_shaped():
        log.info("py-libp2p's gossipsub changed shape; IHAVE is emitted at every heartbeat")
        return False
    gossip = GossipSub.gossip_heartbeat

    def gossip_every_few(router: Any) -> Any:
        # A function patched in as GossipSub.gossip_heartbeat: ``router`` is py-libp2p's;
        # ``ihave_every_heartbeats`` is set on ours (dms.network.gossip).
        every = getattr(router, "ihave_every_heartbeats", 1)
        beats = router.__dict__.get("_dms_gossip_beats", 0) + 1
        router.__dict__["_dms_gossip_beats"] = beats
        if every > 1 and beats % every:
            return defaultdict(dict)  # no IHAVE at this heartbeat: its ids wait in the window
        return gossip(router)

    GossipSub.gossip_heartbeat = gossip_every_few
    return True


def decays_are_identity(params: Any) -> bool:
    """Whether every decay of gossipsub's score parameters is 1: a decay step then
    multiplies every counter by 1 and changes nothing."""
    topic = (
        params.p1_time_in_mesh,
        params.p2_first_message_deliveries,
        params.p3_mesh_message_deliveries,
        params.p4_invalid_messages,
    )
    return all(t.decay == 1.0 for t in topic) and (
        params.p5_behavior_penalty_decay == 1.0 and params.p6_appl_slack_decay == 1.0
    )


def scores_are_zero(params: Any) -> bool:
    """Whether gossipsub's score parameters weigh nothing: every peer's score is then 0
    whatever its counters hold, so no peer scores better than another."""
    topic = (
        params.p1_time_in_mesh,
        params.p2_first_message_deliveries,
        params.p3_mesh_message_deliveries,
        params.p4_invalid_messages,
    )
    return (
        all(t.weight == 0.0 for t in topic)
        and params.p5_behavior_penalty_weight == 0.0
        and (params.app_specific_score_fn is None or params.p6_appl_slack_weight == 0.0)
        and params.p7_ip_colocation_weight == 0.0
    )


# The score parameters ``decays_are_identity`` and ``scores_are_zero`` were written
# against (py-libp2p 0.8.1): a parameter added may decay or weigh and go unread.
SCORE_PARAMS = frozenset(
    {
        "accept_px_threshold",
        "app_specific_score_fn",
        "gossip_threshold",
        "graylist_threshold",
        "p1_time_in_mesh",
        "p2_first_message_deliveries",
        "p3_mesh_message_deliveries",
        "p4_invalid_messages",
        "p5_behavior_penalty_decay",
        "p5_behavior_penalty_threshold",
        "p5_behavior_penalty_weight",
        "p6_appl_slack_decay",
        "p6_appl_slack_weight",
        "p7_ip_colocation_threshold",
        "p7_ip_colocation_weight",
        "publish_threshold",
    }
)
# The names PeerScorer.on_heartbeat may use: its counters and the decays above. A decay
# by anything else (a new parameter, a function) and the patch is not applied.
SCORE_DECAY_NAMES = frozenset(
    {
        "list",
        "keys",
        "params",
        "decay",
        "time_in_mesh",
        "first_message_deliveries",
        "mesh_message_deliveries",
        "invalid_messages",
        "behavior_penalty",
        "app_specific_scores",
        "graft_flood_penalties",
        "iwant_spam_penalties",
        "ihave_spam_penalties",
        "equivocation_penalties",
        "p1_time_in_mesh",
        "p2_first_message_deliveries",
        "p3_mesh_message_deliveries",
        "p4_invalid_messages",
        "p5_behavior_penalty_decay",
        "p6_appl_slack_decay",
    }
)


def score_upkeep_is_shaped() -> bool:
    """Whether py-libp2p's score parameters are the ones ``decays_are_identity`` and
    ``scores_are_zero`` read, and its decay step reads no other."""
    import dataclasses

    from libp2p.pubsub.score import PeerScorer, ScoreParams

    try:
        fields = {f.name for f in dataclasses.fields(ScoreParams)}
        decay = PeerScorer.on_heartbeat
        decay = getattr(decay, "__wrapped__", decay)  # py-libp2p's, once patched
        names = set(decay.__code__.co_names)
    except (AttributeError, TypeError):
        return False
    return fields == SCORE_PARAMS and names <= SCORE_DECAY_NAMES


def _no_score_upkeep_without_scores() -> bool:
    from libp2p.pubsub.gossipsub import GossipSub
    from libp2p.pubsub.score import PeerScorer, ScoreParams

    try:
        shaped = (
            score_upkeep_is_shaped()
            and decays_are_identity(ScoreParams())
            and scores_are_zero(ScoreParams())
        )
    except AttributeError:
        shaped = False
    if (
        not shaped
        or not hasattr(PeerScorer, "on_heartbeat")
        or not hasattr(GossipSub, "_maintain_mesh_quality")
    ):
        log.info("py-libp2p's peer scoring changed shape; its heartbeat upkeep is left as it is")
        return False
    decay = PeerScorer.on_heartbeat
    maintain = GossipSub._maintain_mesh_quality

    def decay_unless_identity(self: Any, dt_seconds: float = 1.0) -> None:
        # A function patched in as PeerScorer.on_heartbeat: ``self`` is py-libp2p's.
        if decays_are_identity(self.params):
            return
        decay(self, dt_seconds)

    async def maintain_unless_unscored(router: Any, topic: str) -> None:
        # A function patched in as GossipSub._maintain_mesh_quality.
        scorer = getattr(router, "scorer", None)
        if scorer is not None and scores_are_zero(scorer.params):
            return
        await maintain(router, topic)

    decay_unless_identity.__wrapped__ = decay  # type: ignore[attr-defined]
    PeerScorer.on_heartbeat = decay_unless_identity
    GossipSub._maintain_mesh_quality = maintain_unless_unscored
    return True


async def tell_topics_when_writable(
    pubsub: Any, peer_id: Any, wait_s: float = SUBSCRIPTION_REPEAT_WAIT_S
) -> None:
    """Push our topics to ``peer_id`` once pubsub can write to it (within ``wait_s``)."""
    try:
        await pubsub.wait_for_peer(peer_id, wait_s)
    except trio.TooSlowError:
        # Never registered (gone, or refused). py-libp2p leaves the event it waited on
        # in ``_peer_added_events`` for good; drop it unless another task still waits.
        events = getattr(pubsub, "_peer_added_events", {})
        event = events.get(peer_id)
        if event is not None and not event.statistics().tasks_waiting:
            del events[peer_id]
        return
    except Exception:
        return
    queue = getattr(pubsub, "peer_queues", {}).get(peer_id)
    if queue is None or not pubsub.topic_ids:
        return
    if not queue.push(pubsub.get_hello_packet()):
        log.debug("subscriptions not repeated to %s: its queue is full", peer_id)


def ended_with_pubsub(err: Exception, running: bool) -> bool:
    """Whether ``err``, raised by pubsub's stream reader, says only that the pubsub
    stopped under it: trio's "Nursery is closed to new arrivals" (its task nursery
    closed), or a ``LifecycleError`` once its manager no longer runs."""
    from libp2p.tools.anyio_service.exceptions import LifecycleError

    if isinstance(err, LifecycleError):
        return not running
    return isinstance(err, RuntimeError) and "closed to new arrivals" in str(err)


def _repeat_subscriptions_to_new_streams() -> bool:
    from libp2p.pubsub.pubsub import Pubsub

    needed = ("continuously_read_stream", "wait_for_peer", "get_hello_packet")
    if not all(hasattr(Pubsub, n) for n in needed):
        log.info("py-libp2p's pubsub changed shape; subscriptions are announced as before")
        return False
    from libp2p.tools.anyio_service.exceptions import LifecycleError

    read_stream = Pubsub.continuously_read_stream

    async def read_stream_and_tell_topics(self: Any, stream: Any) -> None:
        try:
            if self.manager.is_running:
                self.manager.run_task(tell_topics_when_writable, self, stream.muxed_conn.peer_id)
            await read_stream(self, stream)
        except (RuntimeError, LifecycleError) as err:
            # A stream opened or a message read while the node stops: pubsub's task
            # nursery is already closed (trio's RuntimeError, while the manager still
            # says it runs), or the manager has finished (its LifecycleError);
            # py-libp2p's handler raised either into the swarm's log as a traceback on
            # every such stop. The stream ends with the pubsub. Any other error,
            # stopping or not, is raised.
            if not ended_with_pubsub(err, self.manager.is_running):
                raise
            log.debug("pubsub stream from %s ended with the node: %s", stream, err)

    Pubsub.continuously_read_stream = read_stream_and_tell_topics
    return True


# Streams a connection may overrun (each reset) before the connection is closed.
OVERRUNS_BEFORE_CLOSE = 3


@dataclass
class BufferBudget:
    """Bytes buffered by Yamux streams of this process, unread: at most ``limit``."""

    limit: int = 256 * 1024 * 1024
    held: int = 0
    overruns: int = 0  # streams reset for sending past their window or the limit
    # Who hears of a reset on a host's connections: (peer id, reason), by swarm.
    listeners: weakref.WeakKeyDictionary[Any, Callable[[str, str], None]] = field(
        default_factory=weakref.WeakKeyDictionary
    )


BUFFERS = BufferBudget()


def set_buffer_budget(
    limit: int, swarm: Any = None, on_overrun: Callable[[str, str], None] | None = None
) -> None:
    """The most bytes Yamux may hold unread in this process; ``on_overrun`` hears of
    each stream of ``swarm``'s connections reset for overrunning."""
    BUFFERS.limit = limit
    if swarm is not None and on_overrun is not None:
        BUFFERS.listeners[swarm] = on_overrun


class _Window(bytearray):
    """A stream's receive buffer that refuses bytes past the stream's window."""

    __slots__ = ("_conn", "_dead", "_sid")

    def __init__(self, conn: Any, sid: int) -> None:
        super().__init__()
        self._conn, self._sid, self._dead = conn, sid, False

    def extend(self, data: Any) -> None:
        size = len(data)
        if self._dead:
            return
        stream = self._conn.streams.get(self._sid)
        window = stream.target_recv_window if stream is not None else 0
        if len(self) + size > window or BUFFERS.held + size > BUFFERS.limit:
            self._overrun(stream, size, window)
            return
        BUFFERS.held += size
        bytearray.extend(self, data)

    def clear(self) -> None:
        BUFFERS.held -= len(self)
        bytearray.clear(self)

    def __delitem__(self, key: Any) -> None:
        before = len(self)
        bytearray.__delitem__(self, key)
        BUFFERS.held -= before - len(self)

    def _overrun(self, stream: Any, size: int, window: int) -> None:
        """Drop the bytes and the buffer, and reset the stream (from a task: the
        caller holds the connection's streams lock)."""
        past_window = len(self) + size > window
        self._dead = True
        self.clear()
        peer = str(self._conn.peer_id)
        if past_window:
            reason = f"sent {size} bytes past the {window}-byte receive window it was granted"
        else:
            reason = f"the {BUFFERS.limit}-byte budget of unread bytes of all streams is full"
        BUFFERS.overruns += 1
        log.warning("stream %d from %s reset: window_exceeded: %s", self._sid, peer, reason)
        swarm = getattr(self._conn, "swarm", None)
        listener = BUFFERS.listeners.get(swarm) if swarm is not None else None
        if listener is not None:
            with contextlib.suppress(Exception):
                listener(peer, reason)
        if stream is None:
            return
        stream.closed = stream.recv_closed = stream.send_closed = True
        stream.reset_received = True
        event = self._conn.stream_events.get(self._sid)
        if event is not None:
            event.set()
        nursery = getattr(self._conn, "_nursery", None)
        if nursery is None:
            return
        nursery.start_soon(_send_reset, self._conn, stream)
        buffers = self._conn.stream_buffers
        if past_window and isinstance(buffers, _Buffers):
            # A peer that keeps breaking the protocol loses the connection (go-yamux
            # closes it at the first): else it makes the node decrypt all it sends.
            buffers.overruns += 1
            if buffers.overruns == OVERRUNS_BEFORE_CLOSE:
                log.warning(
                    "connection from %s closed: window_exceeded on %d streams",
                    peer,
                    OVERRUNS_BEFORE_CLOSE,
                )
                nursery.start_soon(_close_connection, self._conn)

    def release(self) -> None:
        BUFFERS.held -= len(self)


async def _close_connection(conn: Any) -> None:
    from libp2p.stream_muxer.yamux.yamux import GO_AWAY_PROTOCOL_ERROR

    with contextlib.suppress(Exception):
        await conn.close(GO_AWAY_PROTOCOL_ERROR)


async def _send_reset(conn: Any, stream: Any) -> None:
    from libp2p.stream_muxer.yamux.yamux import FLAG_RST, TYPE_WINDOW_UPDATE, YAMUX_HEADER_FORMAT

    with contextlib.suppress(Exception):
        header = struct.pack(
            YAMUX_HEADER_FORMAT, 0, TYPE_WINDOW_UPDATE, FLAG_RST, stream.stream_id, 0
        )
        await conn._write_frame(header)
    with contextlib.suppress(Exception):
        await conn._finalize_stream(stream, fully_closed=True)


class _Buffers(dict[int, bytearray]):
    """A connection's ``stream_buffers``: every buffer a :class:`_Window`."""

    def __init__(self, conn: Any) -> None:
        super().__init__()
        self._conn = conn
        self.overruns = 0  # streams of this connection reset for overrunning their window

    def __setitem__(self, sid: int, value: bytearray) -> None:
        old = dict.get(self, sid)
        if isinstance(old, _Window):
            old.release()
        window = _Window(self._conn, sid)
        if value:
            window.extend(value)
        dict.__setitem__(self, sid, window)

    def __delitem__(self, sid: int) -> None:
        old = dict.pop(self, sid)
        if isinstance(old, _Window):
            old.release()

    def pop(self, sid: int, *default: Any) -> Any:  # type: ignore[override]
        old = dict.pop(self, sid, *default)
        if isinstance(old, _Window):
            old.release()
        return old

    def clear(self) -> None:
        for old in dict.values(self):
            if isinstance(old, _Window):
                old.release()
        dict.clear(self)


def _cheaper_yamux_reads() -> bool:
    from libp2p.security.secure_session import SecureSession
    from libp2p.stream_muxer.yamux import yamux

    needed = ("_py_yamux_env", "_py_yamux_env_set")
    session_needed = ("_drain", "read")
    if (
        not all(callable(getattr(yamux, n, None)) for n in needed)
        or not hasattr(yamux.Yamux, "_read_data_body")
        or not all(hasattr(SecureSession, n) for n in session_needed)
    ):
        log.info("py-libp2p's Yamux changed shape; its settings are read on every frame")
        return False
    settings = {k: v for k, v in os.environ.items() if k.startswith("PY_YAMUX_")}

    def setting(name: str, default: str = "") -> str:
        return settings.get(f"PY_YAMUX_{name}", default)

    def setting_set(name: str) -> bool:
        return f"PY_YAMUX_{name}" in settings

    yamux._py_yamux_env = setting
    yamux._py_yamux_env_set = setting_set
    read_body = yamux.Yamux._read_data_body

    async def read_buffered_body(muxer: Any, length: int) -> bytes:
        # A function patched in as Yamux._read_data_body: ``muxer`` is py-libp2p's.
        conn = getattr(muxer, "secured_conn", None)
        if isinstance(conn, SecureSession):
            low, high = getattr(conn, "low_watermark", None), getattr(conn, "high_watermark", None)
            if isinstance(low, int) and isinstance(high, int) and high - low >= length:
                return conn._drain(length)  # all there: nothing to wait for
        return await read_body(muxer, length)

    yamux.Yamux._read_data_body = read_buffered_body
    return True


def _enforce_yamux_receive_window() -> bool:
    from libp2p.stream_muxer.yamux import yamux

    needed = ("FLAG_RST", "TYPE_WINDOW_UPDATE", "YAMUX_HEADER_FORMAT", "GO_AWAY_PROTOCOL_ERROR")
    conn_needed = ("_write_frame", "_finalize_stream", "handle_incoming")
    if not all(hasattr(yamux, n) for n in needed) or not all(
        hasattr(yamux.Yamux, n) for n in conn_needed
    ):
        log.info("py-libp2p's Yamux changed shape; its receive window is not enforced")
        return False
    init = yamux.Yamux.__init__

    def init_with_windows(muxer: Any, *args: Any, **kwargs: Any) -> None:
        # A function patched in as Yamux.__init__: ``muxer`` is py-libp2p's instance,
        # whose shape is checked (not assumed) before its buffers are replaced.
        init(muxer, *args, **kwargs)
        if not isinstance(getattr(muxer, "stream_buffers", None), dict):
            return
        muxer.stream_buffers = _Buffers(muxer)

    yamux.Yamux.__init__ = init_with_windows
    return True


def _wake_readers_on_reset() -> bool:
    from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream

    if not hasattr(YamuxStream, "reset") or not hasattr(Yamux, "_finalize_stream"):
        log.info("py-libp2p's Yamux changed shape; a reset stream's reader is not woken")
        return False
    reset = YamuxStream.reset

    async def reset_and_wake(stream: Any) -> None:
        # A function patched in as YamuxStream.reset: ``stream`` is py-libp2p's.
        # The event is taken first: finalizing the stream drops it from the map.
        events = getattr(stream.conn, "stream_events", None)
        event = events.get(stream.stream_id) if isinstance(events, dict) else None
        try:
            await reset(stream)
        finally:
            if event is not None:
                event.set()

    YamuxStream.reset = reset_and_wake
    return True


# How many locks around frames a trio run takes at once (free, with no turn given to
# other tasks) for one taken with a full checkpoint: no task step takes more than this
# many without a schedule point, whatever loop takes them (Yamux's reader over one Noise
# message of many small frames, a reader of a stream whose buffer holds many messages).
FREE_LOCKS_A_TURN = 16
# The sha256 of py-libp2p's Yamux._write_frame (its source, dedented) that the patch
# replaces: the debug line, the write under ``_write_lock``, a checkpoint after.
WRITE_FRAME_SHA256 = "56aa70c624e6c2a7aef7ad1d3178ba6471b6699b7a690d329bfb8ccd59ad8286"

# The free acquires taken at once since the last one that was a turn, in this trio run
# (a list, one per run: hosts of one process run on several trio threads).
_TAKEN_AT_ONCE: trio.lowlevel.RunVar[list[int]] = trio.lowlevel.RunVar("dms_free_locks")


def _taken_at_once() -> list[int]:
    try:
        return _TAKEN_AT_ONCE.get()
    except LookupError:
        taken = [0]
        _TAKEN_AT_ONCE.set(taken)
        return taken


class QuickLock:
    """A ``trio.Lock`` or ``trio.Semaphore`` whose acquire, when it is free, takes it at
    once: a cancel point (``checkpoint_if_cancelled``), not a schedule point; but every
    ``FREE_LOCKS_A_TURN``-th free acquire of the trio run is trio's own, a full
    checkpoint, so a loop that takes only such locks still yields. Held, it is waited
    for by trio's own ``acquire`` (its queue, its order; the wait is the turn).
    Everything else is the wrapped lock's."""

    __slots__ = ("_lock",)

    def __init__(self, lock: Any) -> None:
        self._lock = lock

    async def acquire(self) -> None:
        taken = _taken_at_once()
        if taken[0] + 1 >= FREE_LOCKS_A_TURN:
            taken[0] = 0
            await self._lock.acquire()  # a full checkpoint, free or held
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            taken[0] = 0  # waited for: a turn
            await self._lock.acquire()
            return
        taken[0] += 1

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lock, name)


# The locks taken around each frame, by the class whose __init__ makes them: module,
# attribute names, and the trio type each must be.
FRAME_LOCKS: dict[str, tuple[str, tuple[str, ...], type]] = {
    "NetStream": ("libp2p.network.stream.net_stream", ("_state_lock",), trio.Lock),
    "YamuxStream": ("libp2p.stream_muxer.yamux.yamux", ("window_lock", "close_lock"), trio.Lock),
    "Yamux": ("libp2p.stream_muxer.yamux.yamux", ("streams_lock", "_write_lock"), trio.Lock),
    "TrioTCPStream": ("libp2p.io.trio", ("read_lock", "write_lock"), trio.Lock),
    # A Yamux stream's writer: ``rw_lock.write_lock()`` around each frame it writes.
    "ReadWriteLock": ("libp2p.stream_muxer.rw_lock", ("_writer_lock",), trio.Semaphore),
}


class _Probe:
    """What the frame classes' ``__init__`` read of their arguments: a connection, a
    muxed stream with its connection, a peer."""

    is_initiator = True

    def __init__(self) -> None:
        self.muxed_conn = self


def _probe(cls: Any) -> Any:
    """An instance of one of FRAME_LOCKS' classes, made by its ``__init__``."""
    name = cls.__name__
    if name == "NetStream":
        return cls(_Probe(), None, None)
    if name == "YamuxStream":
        return cls(1, _Probe(), True)
    if name == "Yamux":
        return cls(_Probe(), _Probe(), is_initiator=True)
    if name == "TrioTCPStream":
        return cls(_Probe())
    return cls()


def frame_locks_off_shape() -> list[str]:
    """What differs from the shape ``_free_locks_do_not_yield`` counts on: each of
    FRAME_LOCKS' classes, made, must hold each named lock as a lock of its trio type (or
    one this patch already wraps); and Yamux's ``_write_frame`` (as shipped) must be the
    source whose digest is WRITE_FRAME_SHA256. Empty when all hold."""
    import hashlib
    import importlib
    import inspect
    import textwrap

    off: list[str] = []
    for cls_name, (module_name, names, kind) in FRAME_LOCKS.items():
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
            made = _probe(cls)
        except Exception as exc:
            off.append(f"{cls_name}: not made ({type(exc).__name__}: {exc})")
            continue
        for name in names:
            lock = getattr(made, name, None)
            inner = lock._lock if isinstance(lock, QuickLock) else lock
            if type(inner) is not kind:
                off.append(f"{cls_name}.{name}: {type(inner).__name__}, not {kind.__name__}")
    try:
        from libp2p.stream_muxer.yamux import yamux

        write_frame = getattr(yamux.Yamux._write_frame, "__wrapped__", yamux.Yamux._write_frame)
        source = textwrap.dedent(inspect.getsource(write_frame))
    except (AttributeError, ImportError, OSError, TypeError) as exc:
        off.append(f"Yamux._write_frame: no source ({exc})")
    else:
        if hashlib.sha256(source.encode()).hexdigest() != WRITE_FRAME_SHA256:
            off.append("Yamux._write_frame: another source than the one replaced")
    try:
        from libp2p.io import utils
        from libp2p.stream_muxer.yamux import yamux

        reads = getattr(yamux.read_exactly, "__wrapped__", yamux.read_exactly)
        if reads is not utils.read_exactly:
            off.append("Yamux's module reads its frames with another read_exactly")
    except (AttributeError, ImportError) as exc:
        off.append(f"Yamux's read_exactly: {exc}")
    return off


def quick_locks(obj: Any, names: tuple[str, ...], kind: type) -> None:
    """Wrap each named lock of ``obj`` (of trio type ``kind``) in a QuickLock."""
    for name in names:
        lock = getattr(obj, name, None)
        if type(lock) is kind:
            setattr(obj, name, QuickLock(lock))


def _free_locks_do_not_yield() -> bool:
    import importlib

    from libp2p.stream_muxer.yamux import yamux

    off = frame_locks_off_shape()
    if off:
        log.info("py-libp2p's locks changed shape (%s); each is a schedule point", "; ".join(off))
        return False

    def wrapping(cls: Any, names: tuple[str, ...], kind: type) -> None:
        init = cls.__init__

        def init_with_quick_locks(obj: Any, *args: Any, **kwargs: Any) -> None:
            # A function patched in as __init__: ``obj`` is py-libp2p's instance.
            init(obj, *args, **kwargs)
            quick_locks(obj, names, kind)

        init_with_quick_locks.__wrapped__ = init  # type: ignore[attr-defined]
        cls.__init__ = init_with_quick_locks

    for cls_name, (module_name, names, kind) in FRAME_LOCKS.items():
        wrapping(getattr(importlib.import_module(module_name), cls_name), names, kind)
    yamux_log = yamux.logger
    write_frame_as_shipped = yamux.Yamux._write_frame

    async def write_frame(muxer: Any, data: bytes) -> None:
        # A function patched in as Yamux._write_frame: ``muxer`` is py-libp2p's. Its
        # debug line (the header parsed to format it) only when it is logged; no
        # checkpoint after the socket's send, itself one. The write lock is a
        # QuickLock: a writer of many frames still yields every FREE_LOCKS_A_TURN.
        if yamux_log.isEnabledFor(logging.DEBUG):
            await write_frame_as_shipped(muxer, data)
            return
        async with muxer._write_lock:
            await muxer.secured_conn.write(data)

    write_frame.__wrapped__ = write_frame_as_shipped  # type: ignore[attr-defined]
    yamux.Yamux._write_frame = write_frame
    read_exactly = yamux.read_exactly

    async def read_exactly_counted(reader: Any, n: int, *args: Any, **kwargs: Any) -> bytes:
        # Patched in as the name Yamux's module reads each header (and body) with. A
        # frame that takes no lock (a ping's answer, a frame of an unknown type) still
        # counts toward the run's turn: read from a Noise message already in hand, a
        # message of 5,000 of them was one task step (30-40 ms), patch or none. The
        # turn is shielded: no new cancel point between a header and its body.
        data = await read_exactly(reader, n, *args, **kwargs)
        taken = _taken_at_once()
        taken[0] += 1
        if taken[0] >= FREE_LOCKS_A_TURN:
            taken[0] = 0
            await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    read_exactly_counted.__wrapped__ = read_exactly  # type: ignore[attr-defined]
    yamux.read_exactly = read_exactly_counted
    return True


# The sha256 of py-libp2p's Swarm.dial_peer (its source, dedented) that the dial patch
# was written against: ``dms.network.dialing.dial_peer`` replaces it, keeping what it
# does but its choice of addresses (the first of each transport class, two at most) and
# its wait (a 250 ms head start an address, ended on the address's failure alone).
# Any other source may do what the replacement would drop: it is left as it is.
DIAL_PEER_SHA256 = "f8829e76d340f3134db7e143bbe7a47acc0554b32e008070a1bfc966a7995a7e"


def dial_peer_is_shaped() -> bool:
    """Whether ``Swarm.dial_peer`` and its constants are those the replacement copies."""
    import hashlib
    import inspect
    import textwrap

    from libp2p.network import swarm

    try:
        source = textwrap.dedent(inspect.getsource(swarm.Swarm.dial_peer))
    except (AttributeError, OSError, TypeError):
        source = ""
    return (
        isinstance(getattr(swarm, "_HAPPY_EYEBALLS_DELAY", None), float)
        and getattr(swarm, "MAX_ADDRS_PER_PEER", None) == 2
        and hashlib.sha256(source.encode()).hexdigest() == DIAL_PEER_SHA256
    )


def _dial_every_address() -> bool:
    from libp2p.network import swarm

    from dms.network import dialing

    if swarm.Swarm.dial_peer is dialing.dial_peer:  # applied before (a test's apply_only)
        return True
    if not dial_peer_is_shaped():
        log.info("py-libp2p's dial changed shape; the addresses it dials are left as they are")
        return False
    dialing.dial_peer.__wrapped__ = swarm.Swarm.dial_peer  # type: ignore[attr-defined]
    swarm.Swarm.dial_peer = dialing.dial_peer  # type: ignore[method-assign]
    return True


def _noise_messages_go_whole() -> bool:
    from libp2p.io.exceptions import ConnectionClosedError
    from libp2p.security.noise import io as noise_io

    writer = getattr(noise_io, "BaseNoiseMsgReadWriter", None)
    if (
        writer is None
        or not callable(getattr(writer, "write_msg", None))
        or not callable(getattr(writer, "encrypt", None))
        or not callable(getattr(writer, "close", None))
    ):
        log.info("py-libp2p's Noise writer changed shape; a cancelled write may break it")
        return False
    write_msg = writer.write_msg
    from libp2p.io.trio import TrioTCPStream
    from libp2p.network.connection.raw_connection import RawConnection

    packets = noise_io.NoisePacketReadWriter
    most = getattr(noise_io, "MAX_PLAINTEXT_LENGTH", 0)
    fast = callable(getattr(packets, "encode_msg", None)) and isinstance(most, int)

    async def write_whole(self: Any, msg: bytes, prefix_encoded: bool = False) -> None:
        # A function patched in as BaseNoiseMsgReadWriter.write_msg. A cancel lands here,
        # before the message's nonce is spent; once encrypted, it goes out whole.
        await trio.lowlevel.checkpoint_if_cancelled()
        packet = self.read_writer
        raw = getattr(packet, "read_write_closer", None)
        tcp = getattr(raw, "stream", None)
        if (
            fast
            and not prefix_encoded
            and len(msg) <= most
            and type(packet) is packets
            and type(raw) is RawConnection
            and type(tcp) is TrioTCPStream
            and not tcp.write_lock.locked()
            and hasattr(getattr(tcp.stream, "socket", None), "_sock")  # trio's own
        ):
            # The common case, without a cancel scope (a third of a small frame's
            # write): the TCP write lock taken, the message encrypted under it and
            # handed to the socket at once, no checkpoint in between; only what the
            # socket does not take at once is sent shielded, as below.
            tcp.write_lock.acquire_nowait()
            try:
                data = packet.encode_msg(self.encrypt(msg))
                sock = tcp.stream.socket
                if sock.fileno() == -1:
                    return  # closed here: py-libp2p's write returns so too
                try:
                    sent = sock._sock.send(data)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    raise ConnectionClosedError(f"TCP connection broken: {exc}") from exc
                if sent < len(data):
                    await _send_rest(self, tcp.stream, memoryview(data)[sent:])
                    return
            finally:
                tcp.write_lock.release()
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        limit = trio.current_time() + NOISE_SEND_LIMIT_S
        with trio.CancelScope(shield=True, deadline=limit) as sending:
            await write_msg(self, msg, prefix_encoded)
        if sending.cancelled_caught:
            await _close_unsent(self)

    async def _send_rest(self: Any, stream: Any, rest: memoryview) -> None:
        limit = trio.current_time() + NOISE_SEND_LIMIT_S
        with trio.CancelScope(shield=True, deadline=limit) as sending:
            try:
                await stream.send_all(rest)
            except trio.ClosedResourceError:
                return
            except trio.BrokenResourceError as exc:
                raise ConnectionClosedError(f"TCP connection broken: {exc}") from exc
        if sending.cancelled_caught:
            await _close_unsent(self)

    async def _close_unsent(self: Any) -> NoReturn:
        # Part of the message may be on the wire: the connection cannot carry another.
        closing = trio.CancelScope(shield=True, deadline=trio.current_time() + 1)
        with closing, contextlib.suppress(Exception):
            await self.close()
        raise ConnectionClosedError(
            f"a Noise message not sent within {NOISE_SEND_LIMIT_S:g} s: connection closed"
        )

    writer.write_msg = write_whole
    return True


def _yamux_writes_wait_for_a_window() -> bool:
    import hashlib
    import inspect
    import textwrap

    from libp2p.stream_muxer.yamux import yamux

    write = yamux.YamuxStream.write
    if getattr(write, "__wrapped__", None) is not None:  # applied before
        return True
    try:
        source = textwrap.dedent(inspect.getsource(write))
    except (AttributeError, OSError, TypeError):
        source = ""
    if hashlib.sha256(source.encode()).hexdigest() != YAMUX_WRITE_SHA256:
        log.info("py-libp2p's Yamux write changed; it waits 5 s for a window")
        return False
    source = source.replace(
        "trio.move_on_after(5.0)", "trio.move_on_after(_dms_patches.YAMUX_WINDOW_WAIT_S)"
    ).replace(
        '"Timed out waiting for window update after 5 seconds."',
        'f"Timed out waiting for window update after {_dms_patches.YAMUX_WINDOW_WAIT_S:g} s."',
    )
    # Defined in Yamux's module (its names, as patched), then taken out of it.
    scope = vars(yamux)
    scope["_dms_patches"] = sys.modules[__name__]
    exec(compile(source, yamux.__file__, "exec"), scope)
    waiting = scope.pop("write")
    waiting.__qualname__ = write.__qualname__
    waiting.__wrapped__ = write
    yamux.YamuxStream.write = waiting
    return True


PATCHES: tuple[Callable[[], bool], ...] = (
    _batch_yamux_window_updates,
    _memoize_sender_records,
    _reuse_own_record,
    _relayed_once_per_connection,
    _measure_rtt_less_often,
    _read_ahead_on_tcp,
    _back_off_pruned_peers,
    _no_opportunistic_grafting,
    _no_score_upkeep_without_scores,
    _ihave_every_few_heartbeats,
    _repeat_subscriptions_to_new_streams,
    _free_locks_do_not_yield,
    _enforce_yamux_receive_window,
    _wake_readers_on_reset,
    _cheaper_yamux_reads,
    _dial_every_address,
    _noise_messages_go_whole,
    _yamux_writes_wait_for_a_window,
)
