"""Discovery: finding peers and keeping in touch with them.

Bootstrap addresses and peers remembered in the store are dialed at start and
whenever they drop; addresses learnt from signed heartbeats go to the
peerstore; a Kademlia DHT (server mode) finds a peer's addresses by its id when
a frame must go to a peer with none known; mDNS is the host's own option. Ping
and the list of connected peers are here too. See specs/network.md,
"Discovery".
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.host.ping import PingService
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service

from dms.backoff import Backoff
from dms.network.admission import admit, admitted, remember, worked_for
from dms.network.dialing import ranked
from dms.network.dialslots import slots_for
from dms.network.interfaces import interface_networks
from dms.network.loop import LoopBridge, NetworkError, why
from dms.network.outboundbudget import OutboundBudget
from dms.network.reconnect import Reconnects, at_once, targets
from dms.network.relay import RelayClient, is_relayed
from dms.network.settings import NetworkSettings, no_peer_named, parse_multiaddr

log = logging.getLogger("dms.network")

# How long addresses learnt from a heartbeat stay in the peerstore.
LEARNED_ADDR_TTL_S = 600
# A peer with relayed addresses is dialed through a relay if no direct address has
# connected within this (a direct dial to a NATed peer fails or hangs).
RELAY_AFTER_S = 0.5
# A connected peer is added to the DHT's routing table after identify: tries and waits.
DHT_ADD_TRIES = 7
DHT_ADD_BACKOFF = Backoff(0.5, 8.0)


@dataclass(frozen=True)
class PeerInfoView:
    """A connected peer as the node shows it."""

    peer_id: str
    addrs: list[str]
    dialed: bool = False  # this node opened a connection to it (it chose the peer)


class Discovery(LoopBridge):
    """Dialing, addresses, the DHT, ping and the peer list (a transport part)."""

    settings: NetworkSettings
    _host: IHost | None
    _dht: KadDHT | None
    _ping: PingService | None
    _known_addrs: list[str]
    _relays: RelayClient | None
    peer_id: str  # dms.network.host.Libp2pTransport.peer_id

    def addrs(self) -> list[str]:
        """Full listen multiaddrs, each ending in ``/p2p/<peer id>``."""
        assert self._host is not None
        suffix = f"/p2p/{self.peer_id}"
        out = []
        for addr in self._host.get_addrs():
            text = str(addr)
            out.append(text if text.endswith(suffix) else text + suffix)
        return out

    def learn_addrs(self, peer_id: str, addrs: list[str]) -> None:
        """Remember where ``peer_id`` listens (from its signed heartbeat), so a request
        to a peer known only through gossip can dial it; never blocks. Addresses that
        name another peer, or do not parse, are ignored."""
        if self._token is None or self._stopped or peer_id == self.peer_id:
            return
        suffix = f"/p2p/{peer_id}"
        parsed = []
        for text in addrs:
            if "/p2p/" in text and not text.endswith(suffix):
                continue
            try:
                parsed.append(parse_multiaddr(text.removesuffix(suffix)))
            except ValueError:
                continue
        if parsed:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._add_addrs, peer_id, parsed)

    def _add_addrs(self, peer_id: str, addrs: list[Any]) -> None:
        # Runs as a trio callback: an exception here would end the host.
        try:
            if self._host is None:
                return
            pid = peer_id_of(peer_id)
            store = self._host.get_peerstore()
            known = {str(a) for a in store.addrs(pid)} if has_addrs(self._host, pid) else set()
            # Relayed addresses come and go with the peer's reservations: new ones count.
            if not known or any(is_relayed(str(a)) and str(a) not in known for a in addrs):
                store.add_addrs(pid, addrs, LEARNED_ADDR_TTL_S)
        except Exception as exc:
            log.debug("addresses of %s not kept: %s", peer_id, why(exc))

    def connect(self, multiaddr: str) -> str:
        """Dial a ``.../p2p/<peer id>`` address; return the peer id."""
        try:
            parsed = parse_multiaddr(multiaddr)
        except ValueError as exc:
            raise NetworkError(str(exc)) from None
        try:  # py-libp2p's ValueError named its protocol codes ("P_P2P (421) instead of 6")
            info = info_from_p2p_addr(parsed)
        except Exception:
            raise NetworkError(no_peer_named(multiaddr)) from None
        self._call(self._connect, info)
        return info.peer_id.to_base58()

    def ping(self, peer_id: str) -> float:
        """Round trip of the standard libp2p ping, in milliseconds."""
        return self._call(self._ping_peer, peer_id)

    def peers(self) -> list[PeerInfoView]:
        return self._call(self._peers)

    def dht_peers(self) -> list[str]:
        if self._dht is None:
            return []
        return [p.to_base58() for p in self._dht.routing_table.get_peer_ids()]

    def is_connected(self, peer_id: str) -> bool:
        return any(p.peer_id == peer_id for p in self.peers())

    def connection_count(self) -> int:
        """Connections open, as py-libp2p's connection manager counts them toward its aim
        (``NetworkSettings.aimed_connections``): two with one peer, both dialed at once,
        count two."""
        return self._call(self._connection_count)

    async def _connection_count(self) -> int:
        assert self._host is not None
        return int(self._host.get_network().get_total_connections())

    def _on_connected(self, pid: ID) -> None:
        if self._dht is not None:
            # A connection can complete while the host shuts down (nursery closed).
            self._start_soon(self._add_to_dht, pid)

    async def _add_to_dht(self, pid: ID) -> None:
        """Into the DHT's routing table once identify gave the peer's listen addresses:
        the table skips a peer it has none for, and on a loaded machine identify can take
        longer than the first wait, so try again (0.5 s, 1 s, ... about 30 s in all)
        while the peer stays connected."""
        for attempt in range(DHT_ADD_TRIES):
            await trio.sleep(DHT_ADD_BACKOFF.delay(attempt))
            if self._dht is None or self._host is None:
                return
            if not self._host.get_network().get_connections(pid):
                return
            with contextlib.suppress(Exception):
                if await self._dht.add_peer(pid, skip_server_mode_check=True):
                    return

    async def _ensure_connected(self, pid: ID) -> None:
        assert self._host is not None
        if self._host.get_network().get_connections(pid):
            return
        addrs = self._host.get_peerstore().addrs(pid) if has_addrs(self._host, pid) else []
        if not addrs and self._dht is not None:
            found = await self._dht.find_peer(pid)
            addrs = list(found.addrs) if found is not None else []
        if not addrs:
            raise NetworkError(f"peer {pid.to_base58()} is unreachable: no known address")
        relayed = [a for a in addrs if is_relayed(str(a))]
        direct = [a for a in addrs if not is_relayed(str(a))]
        if not relayed or self._relays is None:
            await self._host.connect(PeerInfo(pid, addrs))
            return
        # One dial of the peer, whichever way it goes (direct, through a relay, both): a
        # new key's takes one of the new keys' budget here, and past it is refused
        # (NotDialed) as its direct dial alone is. A relayed dial takes no dial slot:
        # asked only of the direct dial, a refusal went through the relay at once. The
        # outbound connection slot first, as the swarm's dial_peer takes it: a dial
        # refused outbound_full spends nothing of the new keys' budget.
        async with self._relays.slot(pid):
            admit(self._host.get_network(), pid)
            with admitted(pid):
                await self._dial_direct_or_relayed(pid, direct, relayed)

    async def _dial_direct_or_relayed(self, pid: ID, direct: list[Any], relayed: list[Any]) -> None:
        """Direct addresses first (a peer on the same network, or whose NAT lets us in);
        through a relay if they fail or have not connected within ``RELAY_AFTER_S``.
        Admitted by the caller (``admit``), once for both ways."""
        assert self._host is not None and self._relays is not None
        swarm = self._host.get_network()
        errors: list[str] = []
        direct_over = trio.Event()

        async def try_direct() -> None:
            try:
                await self._host.connect(PeerInfo(pid, direct))  # type: ignore[union-attr]
                nursery.cancel_scope.cancel()
            except Exception as exc:
                errors.append(why(exc))
            direct_over.set()

        async def try_relayed() -> None:
            with trio.move_on_after(RELAY_AFTER_S):
                await direct_over.wait()
            try:
                with slots_for(swarm).relaying():  # contends for the new keys' budget
                    addr = await self._relays.dial(pid, relayed)  # type: ignore[union-attr]
                remember(swarm, pid, addr)
                nursery.cancel_scope.cancel()
            except Exception as exc:
                errors.append(why(exc))

        async with trio.open_nursery() as nursery:
            if direct:
                nursery.start_soon(try_direct)
            else:
                direct_over.set()
            nursery.start_soon(try_relayed)
        if not self._host.get_network().get_connections(pid):
            raise NetworkError(f"peer {pid.to_base58()} is unreachable: {'; '.join(errors)}")

    async def _connect(self, info: PeerInfo) -> None:
        assert self._host is not None
        # py-libp2p keeps a peer whose every address failed out of reach for 60 s; a
        # dial asked for here (bootstrap, remembered peers, `dms peers connect`) is
        # paced by reconnect_interval_s instead, so a peer that was full a moment ago
        # (its connection budget) is reached as soon as it has room.
        self._host.get_network().unblock_peer(info.peer_id)
        try:
            with trio.fail_after(self.settings.dial_timeout_s):
                await self._host.connect(info)
        except trio.TooSlowError:
            raise NetworkError(
                f"no connection to {info.peer_id} within {self.settings.dial_timeout_s:g} s"
            ) from None
        except Exception as exc:
            raise NetworkError(f"cannot connect to {info.peer_id}: {why(exc)}") from None
        if self._dht is not None:
            with contextlib.suppress(Exception):
                await self._dht.add_peer(info.peer_id, skip_server_mode_check=True)

    async def _keep_connected(self) -> None:
        """Dial bootstrap and remembered peers now, and again whenever they drop: at
        most ``reconnect.at_once`` at a time, bootstrap first, a remembered peer whose
        dial failed later each time (``dms.network.reconnect``)."""
        assert self._host is not None
        network = self._host.get_network()
        peers = targets(self.settings.bootstrap, self._known_addrs, self.peer_id)
        bootstrap = targets(self.settings.bootstrap, [], self.peer_id)
        plan = Reconnects(self.settings, {info.peer_id for info in bootstrap})
        limit = at_once(self.settings)
        dialing: set[ID] = set()
        ended = [trio.Event()]

        async def dial(info: PeerInfo) -> None:
            connected = False
            try:
                connected = await self._connect_quietly(info)
            finally:
                dialing.discard(info.peer_id)
                plan.ended(info.peer_id, connected, trio.current_time())
                ended[0].set()

        async with trio.open_nursery() as nursery:
            while True:
                now = trio.current_time()
                for info in peers:
                    if len(dialing) >= limit:
                        break
                    pid = info.peer_id
                    if network.get_connections(pid):  # it dialed this node, or we it
                        plan.connected(pid)
                        continue
                    if pid in dialing or not plan.due(pid, now):
                        continue
                    dialing.add(pid)
                    nursery.start_soon(dial, info)
                ended[0] = trio.Event()
                with trio.move_on_after(self.settings.reconnect_interval_s):
                    await ended[0].wait()

    async def _connect_quietly(self, info: PeerInfo) -> bool:
        try:
            await self._connect(info)
        except NetworkError as err:
            log.info("%s", err)
            return False
        return True

    async def _ping_peer(self, peer_id: str) -> float:
        pid = peer_id_of(peer_id)
        assert self._ping is not None
        try:
            with trio.fail_after(self.settings.dial_timeout_s):
                await self._ensure_connected(pid)
                start = time.perf_counter()
                await self._ping.ping(pid, 1)
                return (time.perf_counter() - start) * 1000.0
        except trio.TooSlowError:
            raise NetworkError(
                f"peer {peer_id} did not answer ping within {self.settings.dial_timeout_s:g} s"
            ) from None
        except NetworkError:
            raise
        except Exception as exc:
            raise NetworkError(f"ping to {peer_id} failed: {why(exc)}") from None

    async def _peers(self) -> list[PeerInfoView]:
        assert self._host is not None
        network = self._host.get_network()
        out = []
        dialed = {pid for pid, _ in OutboundBudget.dialed(network)}
        for pid, conns in network.get_connections_map().items():
            if not conns:
                continue
            addrs = self._host.get_peerstore().addrs(pid) if has_addrs(self._host, pid) else []
            # In the order a dial tries them (the one that connected last first): the
            # peer book keeps a peer's first 8, and a peer on 0.0.0.0 with a dozen
            # interface addresses (Docker's bridges) lists the one that reaches it last.
            addrs = ranked(addrs, interface_networks(), worked_for(network).get(pid))
            out.append(PeerInfoView(pid.to_base58(), [str(a) for a in addrs], pid in dialed))
        return sorted(out, key=lambda p: p.peer_id)

    @contextlib.asynccontextmanager
    async def _maybe_dht(self, host: IHost) -> AsyncIterator[None]:
        if not self.settings.dht:
            yield
            return
        dht = KadDHT(host, DHTMode.SERVER)
        self._dht = dht
        async with background_trio_service(dht):
            yield


def peer_id_of(peer_id: str) -> ID:
    """A peer id from its text; ``NetworkError`` if it is none."""
    try:
        return ID.from_base58(peer_id)
    except Exception:
        raise NetworkError(f"{peer_id!r} is not a peer id") from None


def has_addrs(host: IHost, pid: ID) -> bool:
    try:
        return bool(host.get_peerstore().addrs(pid))
    except Exception:
        return False
