"""A host's goodbye: py-libp2p's ``host.close()`` against ``close_host``, same run.

A bare py-libp2p host listens on loopback and ``--peers`` bare hosts each dial it;
then it is closed, within the 5 s a dms node's stop gives its host:

- ``swarm_close_s`` / ``swarm_close_left``: ``host.close()`` as py-libp2p ships it
  (``Swarm.close`` closes the connections one after another, 0.2 s of sleeps each),
  under ``trio.move_on_after(5)`` as a node's stop called it before
  ``dms.network.closing``; ``..._left``: connections it had not closed at the cap.
- ``close_host_s`` / ``close_host_left``: ``dms.network.closing.close_host`` (new
  connections refused, every connection closed side by side, then the host).
- ``..._told``: how many of the peers saw their connection end within 5 s after.

Both sides alternate ``--rounds`` times with fresh hosts; the medians are printed,
one JSON line per peer count with --json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from dms.network.closing import CLOSE_TIMEOUT_S, close_host, close_hosts
from dms.security import Identity
from dms.sim.adversary import bare_host, connect

LISTEN = Multiaddr("/ip4/127.0.0.1/tcp/0")


async def shipped_close(host: Any) -> None:
    with contextlib.suppress(Exception), trio.move_on_after(CLOSE_TIMEOUT_S):
        await host.close()


async def one_close(peers: int, close: Callable[[Any], Awaitable[None]]) -> dict[str, float]:
    """``peers`` hosts connected to a listening host, which ``close`` then closes: its
    time, the connections it held after, and how many peers saw theirs end."""
    server = bare_host(Identity.generate())
    clients = [bare_host(Identity.generate()) for _ in range(peers)]
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(server.run([LISTEN]))
        info = info_from_p2p_addr(server.get_addrs()[0])
        for client in clients:
            await stack.enter_async_context(client.run([]))
            await connect(client, info)
        swarm = server.get_network()
        held = sum(len(c) for c in swarm.connections.values())
        if held != peers:
            raise SystemExit(f"{held} connections of {peers} peers")
        t0 = time.perf_counter()
        await close(server)
        took = time.perf_counter() - t0
        left = sum(len(c) for c in swarm.connections.values())
        with trio.move_on_after(5):
            while any(c.get_network().get_connections(info.peer_id) for c in clients):
                await trio.sleep(0.05)
        told = sum(1 for c in clients if not c.get_network().get_connections(info.peer_id))
        await close_hosts(clients)
    return {"s": took, "left": left, "told": told}


def measure(peers: int, rounds: int) -> dict[str, Any]:
    shipped: list[dict[str, float]] = []
    ours: list[dict[str, float]] = []
    for _ in range(rounds):
        shipped.append(trio.run(one_close, peers, shipped_close))
        ours.append(trio.run(one_close, peers, close_host))

    def median(runs: list[dict[str, float]], key: str) -> float:
        return round(statistics.median(r[key] for r in runs), 3)

    return {
        "bench": "close",
        "peers": peers,
        "rounds": rounds,
        "swarm_close_s": median(shipped, "s"),
        "swarm_close_left": median(shipped, "left"),
        "swarm_close_told": median(shipped, "told"),
        "close_host_s": median(ours, "s"),
        "close_host_left": median(ours, "left"),
        "close_host_told": median(ours, "told"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[10, 40])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="one JSON line per peer count")
    args = parser.parse_args()
    # py-libp2p logs each identify stream a close cuts short: noise, not the figures.
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    for peers in args.peers:
        row = measure(peers, args.rounds)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(
                f"{peers} peers: py-libp2p {row['swarm_close_s']:.2f} s "
                f"({row['swarm_close_left']:g} left, {row['swarm_close_told']:g} told), "
                f"close_host {row['close_host_s']:.2f} s "
                f"({row['close_host_left']:g} left, {row['close_host_told']:g} told)",
                flush=True,
            )


if __name__ == "__main__":
    main()
