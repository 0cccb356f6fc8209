"""A host's goodbye (dms/network/closing.py), on bare py-libp2p hosts in one trio run."""

from __future__ import annotations

import contextlib
import logging

import pytest
import trio
from multiaddr import Multiaddr

from dms.network.closing import close_host, refuse_connections
from dms.security import Identity
from dms.sim.adversary import bare_host, connect


def test_a_closing_host_says_goodbye_on_every_inbound_connection_and_takes_no_new_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each peer that dialed the host reads its Yamux GO_AWAY. Closing the listeners
    first cancelled the task that holds each inbound connection, trio closed those
    sockets at once, and every goodbye went to a closed socket (none of 5 read). A
    peer dialing once the host stopped accepting gets no connection."""
    from libp2p.peer.peerinfo import info_from_p2p_addr

    caplog.set_level(logging.DEBUG, logger="libp2p.stream_muxer.yamux.yamux")

    async def main() -> None:
        host = bare_host(Identity.generate())
        peers = [bare_host(Identity.generate()) for _ in range(5)]
        late = bare_host(Identity.generate())
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]))
            for peer in [*peers, late]:
                await stack.enter_async_context(peer.run([]))
            info = info_from_p2p_addr(host.get_addrs()[0])
            for peer in peers:
                await connect(peer, info)
            swarm = host.get_network()
            assert sum(len(c) for c in swarm.connections.values()) == 5

            refuse_connections(swarm)
            with contextlib.suppress(Exception), trio.fail_after(5):
                await connect(late, info)
            await trio.sleep(0.3)
            assert not swarm.get_connections(late.get_id())
            assert not late.get_network().get_connections(host.get_id())

            caplog.clear()
            await close_host(host)
            assert not swarm.connections
            with trio.fail_after(5):
                while any(p.get_network().get_connections(host.get_id()) for p in peers):
                    await trio.sleep(0.05)
            goodbyes = [r for r in caplog.records if "Received GO_AWAY" in r.getMessage()]
            assert len(goodbyes) == 5

    trio.run(main)
