"""A dial tries every address of a peer (up to 8, ranked, staggered), not the first of
each transport class (``dms.network.dialing``): on loopback, with a peer advertising 1,000
addresses, and on real networks (namespaces, root only: skipped elsewhere with the
reason) where a peer's first address drops every packet."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from dms.network import admission, dialslots, libp2p_patches
from dms.network.budgets import Budget
from dms.network.dialing import MAX_DIAL_ADDRS, ranked, reaches_this_host
from dms.network.dialslots import (
    HOLD_S,
    NEW_DIAL_BURST,
    NEW_DIALS_FULL,
    NEW_DIALS_PER_S,
    PREEMPTED,
    DialSlots,
    slots_for,
)
from dms.network.discovery import Discovery
from dms.network.host import Libp2pTransport
from dms.network.interfaces import advertised, expanded
from dms.network.loop import NetworkError, why
from dms.network.outboundbudget import OutboundBudget
from dms.network.relay import DialSlot
from dms.network.settings import NetworkSettings
from dms.security.identity import Identity
from dms.sim.adversary import bare_host
from dms.sim.netns import NatTopology, unavailable
from tests.conftest import wait_for


def transport(listen: list[str], bootstrap: list[str] | None = None) -> Libp2pTransport:
    settings = NetworkSettings(
        listen=listen,
        bootstrap=bootstrap or [],
        dht=False,
        reachability="public",
        hole_punching=False,
    )
    t = Libp2pTransport(Identity.generate(), settings)
    t.start(lambda frame, from_peer, *, signature_checked=False: None)
    return t


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then let go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers_ping(t: Libp2pTransport, peer_id: str) -> bool:
    try:
        return t.ping(peer_id) > 0
    except Exception:
        return False


# ---- ranking --------------------------------------------------------------------------


def test_a_dial_tries_the_address_that_worked_then_on_link_public_private() -> None:
    here = [ipaddress.ip_interface("192.168.1.20/24")]
    docker, vpn = "/ip4/172.17.0.1/tcp/9000", "/ip4/10.8.0.2/tcp/9000"
    lan, public = "/ip4/192.168.1.5/tcp/9000", "/ip4/8.8.4.4/tcp/9000"
    addrs = [Multiaddr(a) for a in (docker, vpn, public, lan)]
    assert [str(a) for a in ranked(addrs, here)] == [lan, public, docker, vpn]
    # The address that connected last goes first, whatever its scope.
    assert str(ranked(addrs, here, worked=Multiaddr(vpn))[0]) == vpn
    # Among equals, the peer's own order.
    assert [str(a) for a in ranked(addrs[:2], [])] == [docker, vpn]


def test_an_address_that_lands_on_this_host_is_not_the_peer() -> None:
    own = {ipaddress.ip_address("172.17.0.1")}
    assert reaches_this_host(Multiaddr("/ip4/0.0.0.0/tcp/9000"), own, {"9000"})
    assert reaches_this_host(Multiaddr("/ip4/127.0.0.1/tcp/4001"), own, {"9000"})
    # Docker's bridge on both machines, the same port: this node's own listener.
    assert reaches_this_host(Multiaddr("/ip4/172.17.0.1/tcp/9000"), own, {"9000"})
    assert not reaches_this_host(Multiaddr("/ip4/172.17.0.1/tcp/9001"), own, {"9000"})
    assert not reaches_this_host(Multiaddr("/ip4/192.168.1.5/tcp/9000"), own, {"9000"})


def test_a_wildcard_listen_address_is_advertised_as_each_interface_address() -> None:
    nets = [
        ipaddress.ip_interface(n)
        for n in ("127.0.0.1/8", "192.168.1.20/24", "172.17.0.1/16", "::1/128", "fe80::1/64")
    ]
    assert [str(a) for a in expanded(Multiaddr("/ip4/0.0.0.0/tcp/9000"), nets)] == [
        "/ip4/192.168.1.20/tcp/9000",
        "/ip4/172.17.0.1/tcp/9000",
        "/ip4/127.0.0.1/tcp/9000",  # loopback last: for peers on this machine
    ]
    # Link-local IPv6 needs a zone to be dialed: left out.
    assert [str(a) for a in expanded(Multiaddr("/ip6/::/tcp/9000"), nets)] == ["/ip6/::1/tcp/9000"]
    bound = Multiaddr("/ip4/192.168.1.20/tcp/9000")
    assert expanded(bound, nets) == [bound]
    # No interface known (not Linux): as bound.
    assert expanded(Multiaddr("/ip4/0.0.0.0/tcp/9000"), []) == [Multiaddr("/ip4/0.0.0.0/tcp/9000")]


def test_a_heartbeat_of_a_host_with_many_interfaces_keeps_its_public_and_relayed_addresses() -> (
    None
):
    """A Docker host on 0.0.0.0: its LAN address, docker0 and 24 compose bridges, then
    (as py-libp2p lists them) the public address its peers observed and its relayed
    one. The heartbeat carries 16: cut in order, the bridges took them all and a peer
    that heard only the heartbeat had neither the public nor the relayed address."""
    from dms.node.peering import Peering

    nets = [
        ipaddress.ip_interface(n)
        for n in (
            "127.0.0.1/8",
            "192.168.1.20/24",
            "172.17.0.1/16",
            *(f"172.{18 + i // 16}.{i % 16}.1/24" for i in range(24)),
        )
    ]
    me = Identity.generate().peer_id
    interfaces = [f"{a}/p2p/{me}" for a in expanded(Multiaddr("/ip4/0.0.0.0/tcp/9000"), nets)]
    public = f"/ip4/93.184.216.34/tcp/9000/p2p/{me}"
    relayed = f"/ip4/93.184.216.40/tcp/4001/p2p/{Identity.generate().peer_id}/p2p-circuit/p2p/{me}"

    class Network:
        def addrs(self) -> list[str]:
            return [*interfaces, public, relayed]

    peering = Peering.__new__(Peering)
    peering.network = Network()  # type: ignore[assignment]
    said = peering._listen_addrs()
    assert len(said) == 16
    assert public in said and relayed in said
    assert f"/ip4/192.168.1.20/tcp/9000/p2p/{me}" in said
    assert not any("/ip4/127." in a for a in said)


# ---- loopback -------------------------------------------------------------------------


def test_a_peers_second_tcp_address_is_dialed_when_its_first_refuses(
    started: list[Libp2pTransport],
) -> None:
    """py-libp2p dialed one address a transport class: a peer whose first TCP address
    refused (a port nobody listens on) was unreachable, its second never tried."""
    provider = transport(["/ip4/127.0.0.1/tcp/0"])
    requester = transport(["/ip4/127.0.0.1/tcp/0"])
    started += [provider, requester]
    dead = f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{provider.peer_id}"
    requester.learn_addrs(provider.peer_id, [dead, provider.addrs()[0]])
    wait_for(lambda: answers_ping(requester, provider.peer_id), 30, "a ping to the provider")
    assert requester.path_to(provider.peer_id) == "direct"


def test_a_peers_address_that_connected_is_among_those_the_peer_book_keeps(
    started: list[Libp2pTransport],
) -> None:
    """A peer on 0.0.0.0 with a dozen interface addresses (Docker's bridges) lists the
    one this node reaches it at after them: the peer book keeps a peer's first 8, and
    kept the bridges, so a restarted node could not dial it again. The peers' view
    (what the book is written from) lists a peer's addresses in the dial's order, the
    one that connected first."""
    from dms.network.peerbook import MAX_ADDRS_PER_PEER

    provider = transport(["/ip4/127.0.0.1/tcp/0"])
    requester = transport(["/ip4/127.0.0.1/tcp/0"])
    started += [provider, requester]
    good = provider.addrs()[0].removesuffix(f"/p2p/{provider.peer_id}")
    requester.connect(f"{good}/p2p/{provider.peer_id}")
    pid = ID.from_base58(provider.peer_id)

    async def bridges_first() -> None:  # as identify from such a peer leaves them
        store = requester._host.get_peerstore()
        store.clear_addrs(pid)
        bridges = [Multiaddr(f"/ip4/172.{18 + i}.0.1/tcp/9000") for i in range(12)]
        store.add_addrs(pid, [*bridges, Multiaddr(good)], 7200)

    requester._call(bridges_first)
    (view,) = [p for p in requester.peers() if p.peer_id == provider.peer_id]
    assert len(view.addrs) == 13
    assert good in view.addrs[:MAX_ADDRS_PER_PEER]


def _dials_of_a_peer_advertising(
    count: int, deadline_s: float, addr: Callable[[int], str] | None = None
) -> tuple[list[str], bool]:
    """The addresses a host's dial of a peer that advertises ``count`` addresses (none of
    which ever answers; the ``i``th ``addr(i)``, by default each on an IP of its own)
    tried, and whether the dial ended at its caller's deadline."""
    addr = addr or (lambda i: f"/ip4/10.{i // 250}.{i % 250}.1/tcp/4001")
    libp2p_patches.apply_libp2p_patches()
    dialed: list[str] = []
    ended_at_deadline = False

    async def main() -> None:
        nonlocal ended_at_deadline
        host = bare_host(Identity.generate())
        peer = ID.from_base58(Identity.generate().peer_id)
        async with host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            swarm = host.get_network()

            async def never_answers(addr: Any, peer_id: Any, source: Any = None) -> Any:
                dialed.append(str(addr))
                await trio.sleep_forever()

            swarm._dial_with_retry = never_answers  # type: ignore[method-assign]
            addrs = [Multiaddr(addr(i)) for i in range(count)]
            host.get_peerstore().add_addrs(peer, addrs, 600)
            try:
                with trio.fail_after(deadline_s):
                    await swarm.dial_peer(peer)
            except trio.TooSlowError:
                ended_at_deadline = True
            tried.extend(dialed)  # not py-libp2p's auto-connector's later dials of it

    tried: list[str] = []

    trio.run(main)
    return tried, ended_at_deadline


def test_a_peer_advertising_1000_addresses_is_dialed_on_8_within_the_callers_deadline() -> None:
    """A hostile peer's 1,000 addresses (py-libp2p's identify keeps that many) cost at
    most MAX_DIAL_ADDRS dials, and a dial none of whose addresses answers ends at its
    caller's deadline (generous: 8 staggered starts take ~2 s)."""
    dialed, ended_at_deadline = _dials_of_a_peer_advertising(1000, deadline_s=10.0)
    assert ended_at_deadline
    assert len(dialed) == len(set(dialed)) == MAX_DIAL_ADDRS
    # Every address is in one /16 here (10.0.0.0/8, private): the peer's order is kept.
    assert dialed == [f"/ip4/10.0.{i}.1/tcp/4001" for i in range(MAX_DIAL_ADDRS)]


def test_a_peer_advertising_one_hosts_ports_is_dialed_on_two() -> None:
    """A peer advertising 1,000 ports of one IP (a third party's: every node that dials
    the peer would send it 8 connection attempts, each with the swarm's retries) is
    dialed on 2 of them, as py-libp2p's own dial of two addresses at most did; and on
    a name, too."""
    dialed, _ = _dials_of_a_peer_advertising(
        1000, deadline_s=3.0, addr=lambda i: f"/ip4/192.0.2.7/tcp/{1000 + i}"
    )
    assert dialed == ["/ip4/192.0.2.7/tcp/1000", "/ip4/192.0.2.7/tcp/1001"]
    dialed, _ = _dials_of_a_peer_advertising(
        20, deadline_s=3.0, addr=lambda i: f"/dns4/victim.example/tcp/{1000 + i}"
    )
    assert len(dialed) == 2


def _honest_dial_beside(
    hostile: int, *, per_s: float = 0.0, reached_before: bool = False, honest_at: float = 2.005
) -> tuple[bool, Counter[str], Counter[str]]:
    """``hostile`` keys, each advertising 8 addresses that never answer, dialed at once
    with the auto-connector's deadline (10 s), and ``per_s`` more keys' dials a second
    from then on; ``honest_at`` s in (2 s), a dial of an honest peer whose one address
    connects at once (``reached_before``: one of its addresses connected before, in this
    process), within this node's ``dial_timeout_s`` (5 s). Returns whether the honest
    dial connected before that deadline (on trio's virtual clock, which jumps ahead
    while every task waits: the machine's load does not move it), the dials of each
    hostile key's addresses, and the dial slots' refusals."""
    libp2p_patches.apply_libp2p_patches()
    dialed: Counter[str] = Counter()
    refusals: Counter[str] = Counter()
    connected = False

    async def main() -> None:
        nonlocal connected
        host = bare_host(Identity.generate())
        honest = ID.from_base58(Identity.generate().peer_id)
        sinks = [Multiaddr(f"/ip4/10.{i}.0.1/tcp/4001") for i in range(MAX_DIAL_ADDRS)]
        async with host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            swarm = host.get_network()
            slots_for(swarm).refusals = refusals
            store = host.get_peerstore()

            async def dial_with_retry(addr: Any, peer_id: Any, source: Any = None) -> Any:
                if peer_id == honest:
                    await trio.sleep(0.01)
                    return object()  # a connection, as far as the dial is concerned
                dialed[str(peer_id)] += 1
                await trio.sleep_forever()

            swarm._dial_with_retry = dial_with_retry  # type: ignore[method-assign]
            swarm.get_connections = lambda peer_id=None: []  # type: ignore[method-assign]
            store.add_addrs(honest, [Multiaddr("/ip4/10.99.0.1/tcp/4001")], 600)
            if reached_before:
                admission.worked_for(swarm)[honest] = Multiaddr("/ip4/10.99.0.1/tcp/4001")

            async def auto_connect() -> None:
                key = ID.from_base58(Identity.generate().peer_id)
                store.add_addrs(key, sinks, 600)
                with trio.move_on_after(10.0), contextlib.suppress(Exception):
                    await swarm.dial_peer(key)

            async def more_keys() -> None:
                while per_s:
                    nursery.start_soon(auto_connect)
                    await trio.sleep(1.0 / per_s)

            async with trio.open_nursery() as nursery:
                for _ in range(hostile):
                    nursery.start_soon(auto_connect)
                nursery.start_soon(more_keys)
                await trio.sleep(honest_at)
                with trio.move_on_after(5.0):
                    await swarm.dial_peer(honest)
                    connected = True
                nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.002))
    return connected, dialed, refusals


def test_a_peers_dial_is_not_queued_behind_addresses_that_never_answer() -> None:
    """200 keys' dials, 8 addresses each, none of which ever answers: 1,600 addresses
    for the swarm's 32 dial slots, each held until its dial's deadline (the
    auto-connector's 10 s). A slot went to whoever asked first, so an honest peer's dial
    2 s later waited behind them all, past its own 5 s. Now a dial's first address goes
    before any dial's next ones, the latest first, and a connect pending for HOLD_S
    gives its slot up when others wait: the honest dial connects."""
    connected, dialed, _ = _honest_dial_beside(200)
    assert connected, "the honest dial ended at its deadline"
    # The hostile keys' dials went on meanwhile, each on its first address at least.
    assert len(dialed) >= 32


def test_a_peer_reached_before_is_dialed_ahead_of_a_stream_of_new_keys() -> None:
    """New keys' dials keep coming (50 a second, more than the slots serve when none
    answers: 32 a second), each newer than the honest dial: a peer never reached waits
    behind them. A peer this node reached before (an address of it connected once) goes
    ahead of every such dial, and connects."""
    connected, _, _ = _honest_dial_beside(64, per_s=50, reached_before=True)
    assert connected, "the dial of a peer reached before ended at its deadline"


def test_an_older_dial_of_a_peer_never_reached_is_served_beside_a_stream_of_new_keys() -> None:
    """A peer never reached and without a stake is dialed (a provider asked for a bid)
    while 32 keys' dials hold every slot, and new keys' dials keep coming, 50 a second:
    more than the slots serve when none answers (32 a second), each newer than it, so
    its first address waited behind theirs until its deadline. New keys' dials a second
    now have a budget while the slots are contended: past it they are refused at once,
    and the older dial is served."""
    connected, dialed, refusals = _honest_dial_beside(32, per_s=50, honest_at=0.1)
    assert connected, "the older dial ended at its deadline"
    # The keys past the budget were refused and counted, none of their addresses dialed:
    # keys dialed over the 5.1 s, at most the burst and the budget's rate.
    assert refusals[NEW_DIALS_FULL] > 0
    assert len(dialed) <= NEW_DIAL_BURST + NEW_DIALS_PER_S * 5.2


@contextlib.asynccontextmanager
async def _cycles_when_told() -> AsyncIterator[tuple[Any, Any, Any]]:
    """Two bare hosts on loopback, the first's auto-connector running its cycles when
    the test says (``maybe_connect``), not on its own timer: (host, other, its swarm)."""
    host, other = bare_host(Identity.generate()), bare_host(Identity.generate())
    loopback = [Multiaddr("/ip4/127.0.0.1/tcp/0")]
    async with host.run(loopback), other.run(loopback):
        swarm = host.get_network()
        await swarm.auto_connector.stop()
        await trio.testing.wait_all_tasks_blocked()
        await swarm.auto_connector.start()
        yield host, other, swarm


@contextlib.asynccontextmanager
async def _no_slot(pid: ID) -> AsyncIterator[None]:
    yield


class _Relays:
    """As much of a ``RelayClient`` as a dial through a relay asks: the peers dialed
    through one (each as if its circuit opened), and the outbound connection slot a
    dial holds (``slot``: none unless given)."""

    def __init__(self, slot: DialSlot = _no_slot, *, answers: bool = True) -> None:
        self.dialed: list[ID] = []
        self.slot = slot
        self.answers = answers  # False: a CONNECT the relay never answers

    async def dial(self, pid: ID, circuit_addrs: list[Any]) -> Any:
        async with self.slot(pid):
            self.dialed.append(pid)
            if not self.answers:
                await trio.sleep_forever()
        return circuit_addrs[0]


def _relay_only_key(i: int) -> tuple[ID, list[Multiaddr]]:
    """A new key and its one address, relayed."""
    via = Multiaddr(f"/ip4/10.200.0.{i % 250}/tcp/4001/p2p/{Identity.generate().peer_id}")
    circuit = via.encapsulate(Multiaddr("/p2p-circuit"))
    return ID.from_base58(Identity.generate().peer_id), [circuit]


def test_a_relayed_dial_refused_outbound_full_spends_nothing_of_the_new_keys_budget() -> None:
    """Every outbound connection this node may hold is taken (a dial in flight): a new
    key's dial through its relay is refused outbound_full. It took one of the new keys'
    budget first (``admission.admit``, then the relay's ``OutboundBudget.slot``), so each
    such refusal spent the budget of a dial that never happened; the swarm's own dials
    take the slot first. Now the relayed path does too: the refusal leaves the budget
    whole, and the same dial with room spends one."""
    libp2p_patches.apply_libp2p_patches()
    refusals: Counter[str] = Counter()

    async def main() -> None:
        host = bare_host(Identity.generate())
        async with host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            swarm = host.get_network()
            await swarm.auto_connector.stop()
            dialslots.configure(swarm, lambda pid: False, refusals, new_per_s=1e-6, new_burst=4)
            slots = slots_for(swarm)
            settings = NetworkSettings(max_outbound_connections=1)
            budget = OutboundBudget(settings, refusals, lambda peer: False, lambda peer: None)
            node = Discovery()
            relays = _Relays(lambda pid: budget.slot(swarm, pid))
            node._host, node._dht, node._relays = host, None, relays  # type: ignore[assignment]
            key, addrs = _relay_only_key(1)
            host.get_peerstore().add_addrs(key, addrs, 600)
            holder = ID.from_base58(Identity.generate().peer_id)
            held, release = trio.Event(), trio.Event()

            async def hold_the_slot() -> None:
                async with budget.slot(swarm, holder):
                    held.set()
                    await release.wait()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(hold_the_slot)
                await held.wait()
                with pytest.raises(NetworkError, match=Budget.OUTBOUND_FULL):
                    await node._ensure_connected(key)
                assert refusals[Budget.OUTBOUND_FULL] == 1
                # Before: (1, 4), a token spent on the dial refused.
                assert slots.usage()["new_dials"] == (0, 4), "the refused dial took a token"
                release.set()
            with contextlib.suppress(NetworkError):  # no circuit really opened
                await node._ensure_connected(key)
            assert relays.dialed == [key]
            assert slots.usage()["new_dials"] == (1, 4)

    trio.run(main)


def test_keys_reached_through_a_relay_alone_are_refused_past_the_budget() -> None:
    """New keys, each advertising a relayed address alone, dialed one after another,
    their relays never answering CONNECT; no direct dial anywhere. A relayed dial takes
    no dial slot, and the budget refused only while the slots were contended: with no
    slot ever held, it refused none, and every key was dialed through its relay, past
    the budget too. Now a relayed dial in flight counts as a slot held: past the burst
    (64), with 64 such dials in flight (more than the 32 slots), the rest are refused
    new_dials_full before any relay is asked. On trio's clock, stopped: no token comes
    back meanwhile."""
    libp2p_patches.apply_libp2p_patches()
    refusals: Counter[str] = Counter()
    errors: dict[ID, str] = {}
    keys = [_relay_only_key(i) for i in range(NEW_DIAL_BURST + 8)]

    async def main() -> None:
        host = bare_host(Identity.generate())
        async with host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            swarm = host.get_network()
            await swarm.auto_connector.stop()  # it would dial the keys too
            dialslots.configure(swarm, lambda pid: False, refusals)
            slots = slots_for(swarm)
            relays = _Relays(answers=False)
            node = Discovery()
            node._host, node._dht, node._relays = host, None, relays  # type: ignore[assignment]

            async def ensure_connected(key: ID, addrs: list[Multiaddr]) -> None:
                host.get_peerstore().add_addrs(key, addrs, 600)
                try:
                    await node._ensure_connected(key)
                except Exception as exc:
                    errors[key] = why(exc)

            async with trio.open_nursery() as nursery:
                for key, addrs in keys:
                    nursery.start_soon(ensure_connected, key, addrs)
                    await trio.testing.wait_all_tasks_blocked()
                assert slots.held == 0 and slots.waiting == 0, "a direct dial was made"
                nursery.cancel_scope.cancel()
        burst, past = keys[:NEW_DIAL_BURST], keys[NEW_DIAL_BURST:]
        # Before: all 72 dialed through their relays, none refused.
        assert relays.dialed == [key for key, _ in burst], "a key past the budget was dialed"
        assert set(errors) == {key for key, _ in past}
        assert all(NEW_DIALS_FULL in error for error in errors.values()), errors
        assert refusals[NEW_DIALS_FULL] == len(past)

    trio.run(main, clock=trio.testing.MockClock())


def test_a_refused_new_key_is_not_dialed_through_its_relay_instead() -> None:
    """Every dial slot is held by addresses that never answer and the new keys' budget
    is spent: a new key's direct dial is refused (new_dials_full). A key that also
    advertised a relayed address was then dialed through its relay at once, and one
    with a relayed address alone always was: a relayed dial takes no slot, so any
    number of keys advertising a relay got dials the budget refused. Now the dial of a
    peer is admitted once whichever way it goes: those keys are refused with the same
    reason, counted once each, and no relay is asked; a peer with a stake and one
    reached before are still dialed through the relay, never counted."""
    libp2p_patches.apply_libp2p_patches()
    relays = _Relays()
    refusals: Counter[str] = Counter()
    errors: dict[ID, str] = {}

    def new_key(i: int, direct: bool) -> tuple[ID, list[Multiaddr]]:
        key = ID.from_base58(Identity.generate().peer_id)
        via = Multiaddr(f"/ip4/10.200.0.{i}/tcp/4001/p2p/{Identity.generate().peer_id}")
        circuit = via.encapsulate(Multiaddr("/p2p-circuit"))
        return key, [Multiaddr(f"/ip4/10.100.0.{i}/tcp/4001")] * direct + [circuit]

    async def main() -> None:
        host = bare_host(Identity.generate())
        async with host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            swarm = host.get_network()
            await swarm.auto_connector.stop()  # it would dial the keys too
            store = host.get_peerstore()
            slots = slots_for(swarm)
            staked, reached = (new_key(200 + i, True) for i in range(2))
            # The budget: what is left of it is spent by the dials holding the slots.
            dialslots.configure(
                swarm, lambda pid: pid == staked[0], refusals, new_per_s=1e-6, new_burst=32
            )

            async def never_answers(addr: Any, peer_id: Any, source: Any = None) -> Any:
                await trio.sleep_forever()

            swarm._dial_with_retry = never_answers  # type: ignore[method-assign]
            node = Discovery()
            node._host, node._dht, node._relays = host, None, relays  # type: ignore[assignment]

            async def hold_a_slot(i: int) -> None:
                holder = ID.from_base58(Identity.generate().peer_id)
                store.add_addrs(holder, [Multiaddr(f"/ip4/10.50.{i}.1/tcp/4001")], 600)
                with contextlib.suppress(Exception):
                    await swarm.dial_peer(holder)

            async def ensure_connected(key: ID, addrs: list[Multiaddr]) -> None:
                store.add_addrs(key, addrs, 600)
                try:
                    with trio.fail_after(5.0):
                        await node._ensure_connected(key)
                except Exception as exc:
                    errors[key] = why(exc)

            async with trio.open_nursery() as nursery:
                for i in range(slots.limit):
                    nursery.start_soon(hold_a_slot, i)
                await trio.testing.wait_all_tasks_blocked()
                assert slots.held == slots.limit and slots.admit() is not None
                refusals.clear()
                for i in range(10):
                    await ensure_connected(*new_key(i, direct=i % 2 == 0))
                admission.worked_for(swarm)[reached[0]] = reached[1][0]
                for key, addrs in (staked, reached):
                    await ensure_connected(key, addrs)
                nursery.cancel_scope.cancel()
            new_keys = set(errors) - {staked[0], reached[0]}
            assert len(new_keys) == 10
            # Before: every one of the 10 keys too, the 5 with a relayed address alone
            # without ever being refused.
            assert relays.dialed == [staked[0], reached[0]], "a refused key went through a relay"
            assert all(NEW_DIALS_FULL in errors[key] for key in new_keys), errors
            assert refusals[NEW_DIALS_FULL] == 10

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.002))


def test_a_peer_this_node_refused_to_dial_is_tried_at_the_auto_connectors_next_cycle() -> None:
    """py-libp2p's auto-connector dials a peer while every dial slot is held and the new
    keys' budget is spent: this node refuses the dial (new_dials_full) before any
    address. The auto-connector counted it as the peer's failure and skipped the peer
    for 5 s, 15 s, ... up to 300 s, so it was not dialed at the next cycle even once the
    slots were free. The refusal is now no failure of the peer's: its next cycle dials
    it, and it connects."""
    libp2p_patches.apply_libp2p_patches()
    refusals: Counter[str] = Counter()
    connected = False

    async def main() -> None:
        nonlocal connected
        async with _cycles_when_told() as (host, other, swarm):
            auto = swarm.auto_connector
            dialslots.configure(swarm, lambda pid: False, refusals, new_per_s=0.0, new_burst=0)
            slots = slots_for(swarm)
            info = info_from_p2p_addr(other.get_addrs()[0])
            peer = info.peer_id
            host.get_peerstore().add_addrs(peer, info.addrs, 600)

            async def hold_a_slot() -> None:
                async with slots.slot(False, 0):
                    await trio.sleep_forever()

            async with trio.open_nursery() as nursery:
                for _ in range(slots.limit):
                    nursery.start_soon(hold_a_slot)
                await trio.testing.wait_all_tasks_blocked()
                await auto.maybe_connect()
                nursery.cancel_scope.cancel()
            assert refusals[NEW_DIALS_FULL] == 1, "the dial was not refused by the budget"
            # The slots are free: the budget refuses nothing now.
            await auto.maybe_connect()
            connected = bool(swarm.get_connections(peer))

    trio.run(main)
    assert connected, "the peer refused by this node's budget was skipped as a failed one"


def test_a_peer_that_connects_during_the_cycle_that_refused_it_keeps_no_failures() -> None:
    """The auto-connector's cycle dials a peer with two failures counted long ago, and
    this node refuses the dial itself (``refused_here``); while the cycle's other dial
    runs, the peer connects to this node. At the cycle's end the count and the last
    attempt taken at the refusal were put back: a connected peer kept its two failures
    (skipped 15 s once it drops, then longer). Now a peer connected by then has both
    cleared, as py-libp2p clears them for a connection its own dial made."""
    libp2p_patches.apply_libp2p_patches()
    left: dict[str, object] = {}

    async def main() -> None:
        async with _cycles_when_told() as (host, other, swarm):
            auto = swarm.auto_connector
            info = info_from_p2p_addr(other.get_addrs()[0])
            peer, unanswered = info.peer_id, ID.from_base58(Identity.generate().peer_id)
            store = host.get_peerstore()
            store.add_addrs(peer, info.addrs, 600)
            store.add_addrs(unanswered, [Multiaddr(f"/ip4/127.0.0.1/tcp/{closed_port()}")], 600)
            auto._failure_counts[peer] = 2
            auto._last_connect_attempt[peer] = time.time() - 3600.0  # its cooldown over
            refused = trio.Event()

            async def dial_peer(peer_id: ID) -> Any:
                if peer_id == peer:
                    admission.refused_here(peer_id)
                    refused.set()
                    raise admission.NotDialed(f"not dialing {peer_id}: refused here")
                await refused.wait()  # the peer dials in meanwhile
                await other.connect(info_from_p2p_addr(host.get_addrs()[0]))
                with trio.fail_after(30):
                    while not swarm.get_connections(peer):
                        await trio.sleep(0.01)
                raise ConnectionError(f"{peer_id} did not answer")

            swarm.dial_peer = dial_peer  # type: ignore[method-assign]
            await auto.maybe_connect()
            assert swarm.get_connections(peer), "the peer did not connect during the cycle"
            left["count"] = auto._failure_counts.get(peer)
            left["last attempt"] = auto._last_connect_attempt.get(peer)

    trio.run(main)
    # Before: {"count": 2, "last attempt": <an hour ago>}, put back at the cycle's end.
    assert left == {"count": None, "last attempt": None}


def _slot_kept(connected: bool, *, preferred: bool = False) -> tuple[bool, float]:
    """One slot, held by an unknown peer's address (its TCP connect done or still
    pending) for 10 s; another address waits for it from 0.1 s on. Whether the holder
    kept its slot, and when the waiting one got it (trio's clock)."""
    slots = DialSlots(1)
    kept, got = True, 0.0

    async def main() -> None:
        nonlocal kept, got

        async def holder() -> None:
            nonlocal kept
            async with slots.slot(False, 0) as attempt:
                if connected:
                    attempt.connecting_since = None  # upgrading (Noise, Yamux)
                with attempt.scope:
                    await trio.sleep(10.0)
                kept = not attempt.preempted

        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder)
            await trio.sleep(0.1)
            async with slots.slot(preferred, 0):
                got = trio.current_time()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return kept, got


def test_a_pending_connect_gives_its_slot_up_after_hold_s_and_an_upgrade_does_not() -> None:
    """A connect still pending when another address waits gives its slot up once it
    has had HOLD_S; a connection being upgraded keeps it until it is done."""
    kept, got = _slot_kept(connected=False)
    assert not kept and HOLD_S <= got < 10.0
    kept, got = _slot_kept(connected=True)
    assert kept and got >= 10.0


# ---- real networks (namespaces) --------------------------------------------------------

WHY_NOT = unavailable()
needs_netns = pytest.mark.skipif(WHY_NOT is not None, reason=f"no namespaces: {WHY_NOT}")
# An address of the provider's on the requester's network whose packets the provider
# drops (iptables DROP): a dial to it waits, as to a host gone or a firewalled interface.
BLACKHOLE = "10.78.200.2"


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[NatTopology]:
    """Two hosts on one network, no NAT, no relay: "prov" (10.78.100.1) and "req"
    (10.78.101.1), both on 10.78.0.0/16."""
    with NatTopology(tmp_path, public=("prov", "req"), nated=()) as topology:
        yield topology


def in_ns(nat: NatTopology, role: str, make: Callable[[], Libp2pTransport]) -> Libp2pTransport:
    """A transport whose trio thread lives in ``role``'s namespace (a thread starts in
    the namespace of the thread that made it)."""
    with nat.entered(role):
        return make()


@needs_netns
def test_a_provider_whose_first_address_drops_packets_is_reached_on_its_second(
    hosts: NatTopology, started: list[Libp2pTransport]
) -> None:
    """The provider listens on two addresses of the requester's network and drops every
    packet to the first (a second interface down, a firewall): py-libp2p dialed the
    first alone and waited until the ping's 5 s deadline, every time; no relay, so the
    provider was unreachable. Now its second is dialed 0.25 s later and connects."""
    nat = hosts
    nat.sh("prov", "ip", "addr", "add", f"{BLACKHOLE}/16", "dev", "eth0")
    nat.sh("prov", "iptables", "-A", "INPUT", "-d", BLACKHOLE, "-j", "DROP")
    good = f"/ip4/{nat.ip('prov')}/tcp/4001"
    prov = in_ns(nat, "prov", lambda: transport([f"/ip4/{BLACKHOLE}/tcp/4001", good]))
    req = in_ns(nat, "req", lambda: transport([f"/ip4/{nat.ip('req')}/tcp/4001"]))
    started += [prov, req]
    # As a heartbeat carries them, the dropped one first (both on the requester's network).
    req.learn_addrs(prov.peer_id, [f"/ip4/{BLACKHOLE}/tcp/4001", good])
    assert req.ping(prov.peer_id) > 0
    assert req.path_to(prov.peer_id) == "direct"
    assert admission.worked_for(req._host.get_network())[ID.from_base58(prov.peer_id)] == (
        Multiaddr(good)
    )


@needs_netns
def test_a_node_listening_on_every_interface_dials_its_bootstrap_again(
    hosts: NatTopology, started: list[Libp2pTransport]
) -> None:
    """Two nodes on 0.0.0.0, one port (the default listen, 0.0.0.0:9000). A node that
    advertises its listener as bound gives the requester, by identify,
    /ip4/0.0.0.0/tcp/4001 ahead of the bootstrap address: once their connection dropped,
    py-libp2p dialed that one alone, which on the requester's machine is the requester
    itself (a Noise handshake with the wrong key, four tries), and never the bootstrap
    address again."""
    nat = hosts
    wildcard = ["/ip4/0.0.0.0/tcp/4001"]
    prov = in_ns(nat, "prov", lambda: transport(wildcard))
    boot = f"/ip4/{nat.ip('prov')}/tcp/4001/p2p/{prov.peer_id}"
    req = in_ns(nat, "req", lambda: transport(wildcard, [boot]))
    started += [prov, req]
    pid = ID.from_base58(prov.peer_id)

    wait_for(lambda: req.is_connected(prov.peer_id), 30, "the bootstrap connection")
    req._call(req._host.get_network().close_peer, pid)
    wait_for(lambda: not req.is_connected(prov.peer_id), 30, "the connection closed")

    async def told_wildcard() -> None:
        # As identify from a node that advertises its listener as bound (py-libp2p's
        # own, dms before it advertised its interfaces) leaves the requester's store.
        store = req._host.get_peerstore()
        store.clear_addrs(pid)
        store.add_addrs(pid, [Multiaddr("/ip4/0.0.0.0/tcp/4001")], 7200)

    req._call(told_wildcard)
    req.connect(boot)
    assert req.is_connected(prov.peer_id)


@needs_netns
def test_a_node_listening_on_every_interface_is_reached_at_the_addresses_it_advertises(
    hosts: NatTopology, started: list[Libp2pTransport]
) -> None:
    """A provider on 0.0.0.0 (the default listen) with two addresses on the requester's
    network, one of which drops every packet. Its heartbeat carried its listener as
    bound, /ip4/0.0.0.0/tcp/4001: a requester that heard only that dialed itself and
    could not reach it. It now carries each interface address, and the requester
    reaches it directly."""
    nat = hosts
    nat.sh("prov", "ip", "addr", "add", f"{BLACKHOLE}/16", "dev", "eth0")
    nat.sh("prov", "iptables", "-A", "INPUT", "-d", BLACKHOLE, "-j", "DROP")
    prov = in_ns(nat, "prov", lambda: transport(["/ip4/0.0.0.0/tcp/4001"]))
    req = in_ns(nat, "req", lambda: transport([f"/ip4/{nat.ip('req')}/tcp/4001"]))
    started += [prov, req]
    with nat.entered("prov"):  # as its heartbeat reads them: on its own machine
        said = prov.addrs()
    req.learn_addrs(prov.peer_id, said)
    assert req.ping(prov.peer_id) > 0
    assert req.path_to(prov.peer_id) == "direct"


@needs_netns
def test_a_public_node_listening_on_every_interface_is_dialed_back(
    hosts: NatTopology, started: list[Libp2pTransport]
) -> None:
    """Reachability (DialBack.ask) of a node on 0.0.0.0 that its peer can dial: it asked
    with no address at all (the wildcard left out, nothing else advertised), so the
    peer could dial nothing back and the node was judged private. It now asks with its
    interface addresses, and the peer's dial back to the one it is seen from connects."""
    nat = hosts
    prov = in_ns(nat, "prov", lambda: transport(["/ip4/0.0.0.0/tcp/4001"]))
    req = in_ns(nat, "req", lambda: transport([f"/ip4/{nat.ip('req')}/tcp/4001"]))
    started += [prov, req]
    prov.connect(f"/ip4/{nat.ip('req')}/tcp/4001/p2p/{req.peer_id}")
    assert prov._dialback is not None
    assert prov._call(prov._dialback.ask, ID.from_base58(req.peer_id)) is True
    assert prov._dialback.confirmed_addr == f"/ip4/{nat.ip('prov')}/tcp/4001/p2p/{prov.peer_id}"


@needs_netns
def test_the_cli_prints_every_address_the_node_advertises(hosts: NatTopology) -> None:
    """``dms run`` and ``dms peers self`` print a wildcard listen address as the node
    advertises it: every address of every interface, secondary ones too (the CLI kept
    its own listing, one IPv4 address an interface, and left the second out)."""
    from dms.cli.common import dialable

    nat = hosts
    nat.sh("prov", "ip", "addr", "add", f"{BLACKHOLE}/16", "dev", "eth0")
    with nat.entered("prov"):
        printed = dialable(["/ip4/0.0.0.0/tcp/4001"])
        advertised_here = [str(a) for a in advertised([Multiaddr("/ip4/0.0.0.0/tcp/4001")])]
    assert printed == advertised_here
    assert f"/ip4/{nat.ip('prov')}/tcp/4001" in printed
    assert f"/ip4/{BLACKHOLE}/tcp/4001" in printed
    assert printed[-1] == "/ip4/127.0.0.1/tcp/4001"


# ---- many keys advertising addresses that never answer ------------------------------------

# Addresses of the hostile keys: four IPs on the requester's network whose packets a
# host drops (iptables DROP), two ports each, so a dial of a key tries 8 (4 hosts x 2).
SINKS = [f"10.78.201.{i}" for i in range(1, 5)]


def blackholed(nat: NatTopology, role: str) -> list[str]:
    """Addresses on ``role`` whose every packet is dropped: a dial to one waits for its
    caller's deadline, as to a host gone or firewalled."""
    for ip in SINKS:
        nat.sh(role, "ip", "addr", "add", f"{ip}/16", "dev", "eth0")
    nat.sh(role, "iptables", "-A", "INPUT", "-d", "10.78.201.0/24", "-j", "DROP")
    return [f"/ip4/{ip}/tcp/{port}" for ip in SINKS for port in (4001, 4002)]


@needs_netns
def test_keys_advertising_blackholed_addresses_do_not_starve_a_dial_of_an_honest_peer(
    hosts: NatTopology, started: list[Libp2pTransport]
) -> None:
    """64 keys heard (as through their signed heartbeats: the peerstore keeps them), each
    advertising 8 addresses whose packets are dropped; py-libp2p's auto-connector dials
    32 of them at once, each within its 10 s. Every address held a slot of the swarm's
    32 until then, handed out first come, first served: the ping of a provider the
    requester had not dialed yet waited behind the 224 queued and failed at its 5 s
    (dial_timeout_s). Now it is dialed at once, or once a pending connect has had
    HOLD_S."""
    nat = hosts
    sinks = blackholed(nat, "prov")
    prov = in_ns(nat, "prov", lambda: transport([f"/ip4/{nat.ip('prov')}/tcp/4001"]))
    req = in_ns(nat, "req", lambda: transport([f"/ip4/{nat.ip('req')}/tcp/4001"]))
    started += [prov, req]
    keys = [Identity.generate().peer_id for _ in range(64)]
    req.heard = lambda: keys
    for key in keys:
        req.learn_addrs(key, sinks)
    swarm = req._host.get_network()  # type: ignore[union-attr]
    wait_for(lambda: len(swarm.peerstore.peers_with_addrs()) >= 64, 30, "the keys' addresses")

    async def auto_connect() -> None:  # its cycle now, not in up to 10 s
        req._start_soon(swarm.auto_connector.maybe_connect)

    req._call(auto_connect)
    # Every dial dispatched (50 ms apart) and on its 8 addresses (0.25 s apart).
    time.sleep(4.0)
    req.learn_addrs(prov.peer_id, [f"/ip4/{nat.ip('prov')}/tcp/4001"])
    why_not = ""
    try:
        rtt: float | None = req.ping(prov.peer_id)
    except NetworkError as exc:
        rtt, why_not = None, str(exc)
    assert rtt is not None, why_not
    # The keys' dials were going on: their addresses gave their slots up to it.
    assert req.refusals[PREEMPTED] > 0


def test_a_connection_made_by_a_dial_keeps_nothing_of_the_dials_context() -> None:
    """A trio task inherits the context of the task that starts it, and a connection
    a dial makes starts its tasks (its stream handlers', for as long as it lives) from
    the dial's. Made inside ``admission.admitted(x)`` (the relay's connection, dialed for
    x) and by the auto-connector's cycle, its handlers kept both after the dial: a dial
    of x they asked for took nothing of the new keys' budget however spent, and every
    refusal they met was told to a cycle long over. Now both end with their block."""
    libp2p_patches.apply_libp2p_patches()
    refusals: Counter[str] = Counter()
    seen: dict[str, object] = {}
    protocol = TProtocol("/dms-test/context/1")
    x = ID.from_base58(Identity.generate().peer_id)  # a key never reached

    async def main() -> None:
        async with _cycles_when_told() as (host, relay, swarm):
            auto = swarm.auto_connector
            dialslots.configure(swarm, lambda pid: False, refusals, new_per_s=0.0, new_burst=0)
            slots = slots_for(swarm)
            done = trio.Event()

            async def handler(stream: Any) -> None:
                told = admission.ON_REFUSAL.get()
                seen["refusals told to"] = getattr(told, "value", told)
                try:
                    admission.admit(swarm, x)
                    seen["dial of x"] = "not counted"
                except admission.NotDialed:
                    seen["dial of x"] = "refused"
                await stream.close()
                done.set()

            host.set_stream_handler(protocol, handler)
            info = info_from_p2p_addr(relay.get_addrs()[0])
            host.get_peerstore().add_addrs(info.peer_id, info.addrs, 600)
            with admission.admitted(x):
                await auto.maybe_connect()
            assert swarm.get_connections(info.peer_id), "the auto-connector did not dial"

            async def hold_a_slot() -> None:
                async with slots.slot(False, 0):
                    await trio.sleep_forever()

            async with trio.open_nursery() as nursery:
                for _ in range(slots.limit):  # contended, the budget spent: x is refused
                    nursery.start_soon(hold_a_slot)
                await trio.testing.wait_all_tasks_blocked()
                with trio.fail_after(30):
                    await relay.new_stream(host.get_id(), [protocol])
                    await done.wait()
                nursery.cancel_scope.cancel()

    trio.run(main)
    assert seen == {"refusals told to": None, "dial of x": "refused"}
