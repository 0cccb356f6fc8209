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


def test_a_closing_host_dials_no_one() -> None:
    """py-libp2p's auto-connector dials the peerstore's peers from a loop of its own
    (every 10 s below min_connections; here every 50 ms), stopped only once the
    swarm's manager stops, at the end of ``Swarm.close``: a tick while the host
    closed its connections dialed a known peer (2 dials here)."""
    from libp2p.peer.peerinfo import info_from_p2p_addr

    async def main() -> None:
        host, held, known = (bare_host(Identity.generate()) for _ in range(3))
        host.get_network().auto_connector._critical_check_interval = 0.05
        dialed: list[object] = []
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(host.run([]))
            for peer in (held, known):
                await stack.enter_async_context(peer.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]))
            swarm = known.get_network()
            handle = swarm._handle_inbound_connection

            async def counted(conn: object, maddr: object) -> None:
                dialed.append(conn)
                await handle(conn, maddr)

            swarm._handle_inbound_connection = counted
            await connect(host, info_from_p2p_addr(held.get_addrs()[0]))
            await trio.sleep(0.2)
            # Known only now: no tick before the close dialed it.
            host.get_peerstore().add_addrs(known.get_id(), known.get_addrs(), 3600)
            await close_host(host)
            await trio.sleep(0.3)
        assert not dialed

    trio.run(main)


def test_a_host_whose_peer_reads_nothing_stops_with_its_socket_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A peer that stopped reading, the host's socket to it full: the connection's
    GO_AWAY waited behind a frame the socket never took (a Noise message is sent
    shielded, up to ``NOISE_SEND_LIMIT_S``; made endless here), so ``close_host``
    reached its bound with the connection still open ("1 connections left"), the
    socket left to the kernel. A connection not closed within ``CLOSE_GRACE_S`` has
    its socket closed, which ends the send at once: the host stops, every connection
    closed."""
    from libp2p.peer.peerinfo import info_from_p2p_addr

    from dms.network import libp2p_patches
    from dms.network.libp2p_patches import noise as patches_noise

    libp2p_patches.apply_libp2p_patches()
    monkeypatch.setattr(patches_noise, "NOISE_SEND_LIMIT_S", 3600.0)

    async def main() -> None:
        host, deaf = bare_host(Identity.generate()), bare_host(Identity.generate())
        stopped = trio.Event()
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(deaf.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]))
            await stack.enter_async_context(host.run([]))
            await connect(host, info_from_p2p_addr(deaf.get_addrs()[0]))
            # The peer stops reading its end of the connection.
            (theirs,) = deaf.get_network().get_connections(host.get_id())
            tcp = theirs.muxed_conn.secured_conn.conn.read_writer.read_write_closer.stream
            tcp.read = lambda n=None: trio.sleep_forever()
            (ours,) = host.get_network().get_connections(deaf.get_id())
            muxer = ours.muxed_conn
            sent = [0]

            async def fill() -> None:
                while True:  # frames of a stream the peer never reads (its window aside)
                    await muxer._write_frame(b"x" * 60_000)
                    sent[0] += 1

            async def stop() -> None:
                await close_host(host)
                stopped.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(fill)
                # The socket is full once the writes stop going out.
                with trio.fail_after(60):
                    while True:
                        before = sent[0]
                        await trio.sleep(1)
                        if sent[0] == before:
                            break
                nursery.start_soon(stop)
                with trio.move_on_after(60):
                    await stopped.wait()
                stopped_in_time = stopped.is_set()
                # Before: the sends still held; closing the socket lets the test end.
                ours.muxed_conn.secured_conn.conn.read_writer.read_write_closer.stream.stream.socket.close()
                nursery.cancel_scope.cancel()
            assert stopped_in_time
            assert not host.get_network().connections

    trio.run(main)
