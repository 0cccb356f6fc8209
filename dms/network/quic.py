"""What a dms host asks of py-libp2p's QUIC transport (built for a ``/udp/.../quic-v1``
listen address), beside what it asks of TCP + Noise + Yamux.

A QUIC connection comes secured (TLS 1.3 with the peer's libp2p key) and multiplexed
(QUIC's own streams): the inbound gate takes it as it is (``InboundGate.handle``, no
Noise and Yamux upgrade). Its streams gave up a read after 30 s without a byte and a
write after 30 s without flow-control credit (``QUICTransportConfig``'s
``STREAM_READ_TIMEOUT``, ``STREAM_WRITE_TIMEOUT``), under the node's own deadlines: a
dms stream idle between two frames, a gossipsub stream between two messages, was
reset with an ERROR line at each, where over Yamux it waits until the node's idle
watch (``stream_idle_s``, ``protocol_idle_s``) or its caller's deadline ends it. Here
they wait as long as over Yamux: a read as long as its caller, a write for the
peer's acknowledgements ``YAMUX_WINDOW_WAIT_S`` (120 s), as a Yamux write waits for a
window (``libp2p_patches.yamux``), never for ever: a write of py-libp2p's own
protocols (gossipsub's to a peer that reads nothing) has no deadline of its own. See
specs/network.md, "QUIC".

A stream's reset here wakes what waits on it: py-libp2p's ``QUICStream.reset`` marks
the stream reset but sets neither the event a read waits on nor the one a write
waits on (a reset from the peer sets both), so the idle watch's reset of an idle dms
stream left its handler in its read until the read's timeout, and with the read
waiting as long as its caller, for good: each such stream held its place in the
stream budgets (a peer's 64, all 4,096 with many keys), as Yamux's resets did before
``libp2p_patches.yamux``'s wake. :func:`resets_wake_the_streams_waiters`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from dms.network.libp2p_patches import yamux

QUIC_TRANSPORT = "libp2p.transport.quic.transport"


def resets_wake_the_streams_waiters(stream_class: Any) -> None:
    """``stream_class.reset`` (py-libp2p's ``QUICStream``) then sets the events its
    reads and writes wait on, as a reset from the peer does: they see the reset."""
    reset = stream_class.reset
    if getattr(reset, "dms_wakes", False):
        return

    @functools.wraps(reset)
    async def waking(self: Any, error_code: int = 0) -> None:
        try:
            await reset(self, error_code)
        finally:
            for name in ("_receive_event", "_backpressure_event"):
                event = getattr(self, name, None)
                if event is not None:
                    event.set()

    waking.dms_wakes = True  # type: ignore[attr-defined]
    stream_class.reset = waking


def streams_wait_as_over_yamux(swarm: Any) -> None:
    """The QUIC transport of ``swarm``, if it has one: its streams' reads wait as long
    as their callers do, its writes as long as a Yamux write waits for a window, and a
    reset wakes both. Before its first connection (read per stream)."""
    for transport in swarm.transport_manager.get_transports():
        config = getattr(transport, "_config", None)
        if type(transport).__module__ == QUIC_TRANSPORT and config is not None:
            config.STREAM_READ_TIMEOUT = math.inf
            config.STREAM_WRITE_TIMEOUT = yamux.YAMUX_WINDOW_WAIT_S
            from libp2p.transport.quic.stream import QUICStream  # loaded with the transport

            resets_wake_the_streams_waiters(QUICStream)
