"""The peers a node dials at start and while they are disconnected (bootstrap and
remembered: ``dms.network.reconnect``): a bounded number at once, and a remembered
peer that never answers less and less often."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import trio
import trio.testing
from libp2p.peer.id import ID

from dms.network.discovery import Discovery
from dms.network.host import Libp2pTransport
from dms.network.loop import NetworkError
from dms.network.reconnect import Reconnects, at_once, targets
from dms.network.settings import NetworkSettings
from dms.security.identity import Identity
from tests.conftest import wait_for


def transport(known: list[str] | None = None, **settings: object) -> Libp2pTransport:
    s = NetworkSettings(
        listen=["/ip4/127.0.0.1/tcp/0"],
        dht=False,
        reachability="public",
        hole_punching=False,
        **settings,  # type: ignore[arg-type]
    )
    t = Libp2pTransport(Identity.generate(), s, known_addrs=known)
    t.start(lambda frame, from_peer, *, signature_checked=False: None)
    return t


@pytest.fixture
def silent() -> Iterator[int]:
    """A loopback port whose listener never accepts: the kernel completes each TCP
    handshake and nothing more is ever said (a Noise handshake waits for its deadline)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(4096)
        yield int(s.getsockname()[1])


def test_remembered_peers_that_never_answer_leave_room_for_other_dials(
    silent: int, started: list[Libp2pTransport]
) -> None:
    """64 remembered peers (the peer book holds up to 1,024, half of them peers without
    a stake) whose address never answers. The node dialed all of them at once, each
    holding a slot of max_outbound_connections (16 here) until its dial's 5 s, and
    again every 10 s: a provider it dialed meanwhile was refused outbound_full. Now at
    most a quarter of the budget of them at once, and the provider is reached."""
    keys = [Identity.generate().peer_id for _ in range(64)]
    known = [f"/ip4/127.0.0.1/tcp/{silent}/p2p/{key}" for key in keys]
    provider = transport()
    started.append(provider)
    node = transport(known, max_outbound_connections=16)
    started.append(node)
    limit = at_once(node.settings)
    assert limit == 4
    wait_for(lambda: len(node._dials._dialing) >= limit, 30, "the remembered peers dialed")
    node.learn_addrs(provider.peer_id, provider.addrs())
    try:
        node.ping(provider.peer_id)
    except NetworkError as exc:
        pytest.fail(f"the provider was not reached: {exc}")


def test_a_remembered_peer_that_never_answers_is_dialed_less_and_less_often() -> None:
    """Failed, a remembered peer waits reconnect_interval_s, then twice that, ... up to
    RECONNECT_MAX_S; a bootstrap peer (the operator's) every reconnect_interval_s; one
    that connected is dialed again as soon as it drops."""
    settings = NetworkSettings(reconnect_interval_s=10.0)
    boot, remembered = (ID.from_base58(Identity.generate().peer_id) for _ in range(2))
    plan = Reconnects(settings, {boot})
    waits = []
    now = 0.0
    for _ in range(8):
        plan.ended(remembered, connected=False, now=now)
        at = next(t for t in range(0, 10_000) if plan.due(remembered, now + t))
        waits.append(at)
        now += at
    assert waits == [10, 20, 40, 80, 160, 320, 600, 600]
    plan.ended(boot, connected=False, now=0.0)
    plan.ended(boot, connected=False, now=0.0)
    assert plan.due(boot, 10.0)
    plan.ended(remembered, connected=True, now=now)
    assert plan.due(remembered, now)


def test_a_peers_remembered_addresses_are_one_dial() -> None:
    """The peer book gives a peer's addresses one a line: they are dialed as one peer
    (they were one dial each, side by side), bootstrap peers first, this node left out."""
    me, a, b = (Identity.generate().peer_id for _ in range(3))
    found = targets(
        [f"/ip4/10.0.0.2/tcp/9000/p2p/{b}"],
        [
            f"/ip4/10.0.0.1/tcp/9000/p2p/{a}",
            f"/ip4/10.0.0.9/tcp/9000/p2p/{me}",
            f"/ip4/192.168.1.1/tcp/9000/p2p/{a}",
            "/ip4/10.0.0.3/tcp/9000",
        ],
        me,
    )
    assert [i.peer_id.to_base58() for i in found] == [b, a]
    assert [str(x) for x in found[1].addrs] == [
        "/ip4/10.0.0.1/tcp/9000",
        "/ip4/192.168.1.1/tcp/9000",
    ]


def test_a_remembered_peer_that_came_back_is_dialed_again_as_soon_as_it_drops() -> None:
    """A remembered peer's dials failed at 0, 10, 30 and 70 s (its next at 150 s); at
    75 s it comes back and dials this node, and at 85 s its connection drops. Its
    back-off outlived the connection: it was dialed again at 150 s, not as soon as it
    dropped. A peer seen connected now has its back-off forgotten (the reconnect loop,
    on trio's clock)."""
    remembered = Identity.generate().peer_id
    settings = NetworkSettings(reconnect_interval_s=10.0)
    connected_between = (75.0, 85.0)
    dials: list[float] = []

    def get_connections(peer: ID) -> list[object]:
        first, last = connected_between
        return ["conn"] if first <= trio.current_time() < last else []

    async def connect_quietly(info: object) -> bool:
        dials.append(trio.current_time())
        return False  # gone again by the time it is dialed: it counts as failed

    node = SimpleNamespace(
        _host=SimpleNamespace(get_network=lambda: SimpleNamespace(get_connections=get_connections)),
        settings=settings,
        _known_addrs=[f"/ip4/10.0.0.1/tcp/9000/p2p/{remembered}"],
        peer_id=Identity.generate().peer_id,
        _connect_quietly=connect_quietly,
    )

    async def main() -> None:
        with trio.move_on_after(120.0):
            await Discovery._keep_connected(node)  # type: ignore[arg-type]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert dials[:4] == [0.0, 10.0, 30.0, 70.0]
    assert any(85.0 <= t < 120.0 for t in dials), f"dialed at {dials}, not after it dropped"
