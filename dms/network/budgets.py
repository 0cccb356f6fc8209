"""What a remote party can make this host hold, bounded per peer and in total: the
budgets' shared terms, and where each budget is.

Identities, connections and streams cost an attacker nothing (DESIGN.md decision
12), so each budget is global as well as per peer (or per IP), has a setting
(``NetworkSettings``), a refusal reason counted in the transport's ``refusals``
(``dms_refusals{layer="network"}``; :class:`Budget`) and logged, and a gauge of its
use (each budget's ``usage``). Whether the node has a stake in a peer
(:data:`Stake`) decides who keeps a slot when a budget is full; the priority is
written in specs/security.md, "Budgets and priority". One module a budget:

- **Inbound connections**: ``dms.network.inboundgate`` (``InboundGate``).
- **Streams open at once**: ``dms.network.streambudget`` (``StreamBudget``).
- **Idle streams**: ``dms.network.idlewatch`` (``IdleWatch``).
- **py-libp2p's own protocols' streams**: ``dms.network.protocolstreams``
  (``ProtocolStreams``).
- **Bytes read and stream openings a second**: ``dms.network.paced``
  (``ByteBudget``, ``StreamOpens``).
- **Outbound connections**: ``dms.network.outboundbudget`` (``OutboundBudget``).

Buffered bytes (the Yamux receive window, enforced) are in
``dms.network.libp2p_patches``; chunk transfers in ``dms.network.transfer``.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum


class Budget(StrEnum):
    """Why the network layer refused or ended something (``refusals`` keys)."""

    # A connection established while its scope (total, IP, subnet) was full of peers
    # the node has a stake in, or busy ones: the newcomer is closed.
    CONNECTIONS_FULL = "connections_full"
    # An unknown, idle peer's connection closed to make room for a newcomer.
    CONNECTION_EVICTED = "connection_evicted"
    # A raw socket that did not finish its handshake within handshake_timeout_s.
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    # A handshake in progress dropped for a newer one (per IP or in total full).
    HANDSHAKE_EVICTED = "handshake_evicted"
    # An inbound stream over max_streams_per_peer or max_streams: reset.
    STREAMS_FULL = "streams_full"
    # An inbound stream with no frame for stream_idle_s: reset.
    STREAM_IDLE = "stream_idle"
    # The oldest stream of an unknown peer, reset for a newcomer (PROTOCOL_SLOTS full).
    STREAM_EVICTED = "stream_evicted"
    # A frame for a peer being dialed while max_waiting_bytes wait for streams to all
    # peers together: it fails at once.
    WAITING_FULL = "waiting_full"
    # A write to a peer that granted no window for stream_idle_s: the stream is broken.
    WRITE_STALLED = "write_stalled"
    # A peer sent more than a stream's receive window (or the total buffer): reset.
    WINDOW_EXCEEDED = "window_exceeded"
    # A chunk request over max_transfers_per_peer or max_transfers: refused.
    TRANSFERS_FULL = "transfers_full"
    # A chunk stream idle, or slower than chunk_min_bytes_per_s: ended.
    TRANSFER_STALLED = "transfer_stalled"
    # A chunk stream from a peer no manifest offered here is for: refused at once,
    # before it takes a transfer slot or is waited on.
    CHUNKS_UNOFFERED = "chunks_unoffered"
    # A peer's actor streams paused: it sent more bytes than its share (ByteBudget).
    BYTES_THROTTLED = "bytes_throttled"
    # A connection's next stream taken later: its peer opened more than its share of
    # new streams a second (StreamOpens).
    STREAMS_THROTTLED = "streams_throttled"
    # A dial refused: max_outbound_connections open (OutboundBudget).
    OUTBOUND_FULL = "outbound_full"
    # An unknown peer's outbound connection closed to dial a peer with a stake.
    OUTBOUND_EVICTED = "outbound_evicted"


Stake = Callable[[str], bool]
