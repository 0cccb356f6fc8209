"""Network attacks of ``bench/adversary.py`` (issue 24): what one process posing as many
peers can make a node hold, and whether a newcomer can still join.

- ``unread_stream``: a peer asks the victim something (the victim opens a stream to
  it for the answer, a stream the victim never reads) and pushes ``--unread-mb`` on
  it, ignoring the receive window. Own keys: ``pushed_mb`` (written before the
  victim reset the stream), ``window_exceeded``.
- ``connection_slots``: ``--slot-keys`` connections from fresh keys (py-libp2p had
  250 inbound slots), then a new node joins and deploys on the victim. Own keys:
  ``newcomer_joined_s`` (from its start to its deployment running; target <= 10 s),
  ``flood_connected`` (how many held a connection when the newcomer had joined),
  ``connection_evicted``.
- ``slow_chunks``: ``--idle-chunk-streams`` chunk streams that never send a request
  and ``--trickle-chunk-streams`` that send one byte of it, from ``--chunk-keys``
  keys, all in a process of its own (``Chunker``: in this one, its 50 trio threads
  took the honest node's interpreter lock, about half the honest invokes' extra
  latency). Own keys: ``chunk_streams_open_s`` (until the victim had ended every
  one; before: 40 s and more; paced openings take ~30 s of it),
  ``chunk_streams_opened`` (opened, and the first byte written where one is: a
  trickling stream the victim refused before its byte went is not counted),
  ``transfers_full``, ``transfer_stalled``. The honest invokes are paced, one
  every ``INVOKE_EVERY_S`` (``Plan.invoke_every_s``): back to back, the quiet
  seconds after the openings held 2-3 times as many invokes as the busy ones, and
  the median hid the burst.
- ``handshake_slots``: ``--raw-sockets`` TCP sockets that never start the handshake,
  held open, then a new node joins and deploys. Own keys: ``newcomer_joined_s``,
  ``raw_sockets_closed_s`` (until the victim had closed every one).
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import time
from typing import Any

from adversary_kit import Context, Honest, HostileProcess, Plan, Victim, say, serve
from multiaddr import Multiaddr

from dms.network.transfer import CHUNK_PROTOCOL
from dms.node.client import root_handle
from dms.sim.adversary import BarePeer, ManyKeys, closed_by_peer

ATTACKS = ["unread_stream", "connection_slots", "slow_chunks", "handshake_slots"]
MIB = 1024 * 1024
JOIN_DEADLINE_S = 60.0
PUSH_BYTES = 4 * MIB  # pushed on each stream the victim opens to the hostile
CLOSE_DEADLINE_S = 60.0
# slow_chunks' honest invokes, one every 10 ms (each takes 1-5 ms): a burst of openings
# then seconds of quiet is weighed by time, not by how many invokes fit in each part.
INVOKE_EVERY_S = 0.01


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("network attacks (bench/adversary_network.py)")
    group.add_argument("--unread-mb", type=int, default=256, help="MiB pushed on an unread stream")
    group.add_argument("--slot-keys", type=int, default=300, help="connections from fresh keys")
    group.add_argument("--idle-chunk-streams", type=int, default=3000, help="idle chunk streams")
    group.add_argument(
        "--trickle-chunk-streams", type=int, default=200, help="trickling chunk streams"
    )
    group.add_argument("--chunk-keys", type=int, default=50, help="keys the chunk streams use")
    group.add_argument("--raw-sockets", type=int, default=255, help="sockets with no handshake")


def plans(ctx: Context) -> dict[str, Plan]:
    args = ctx.args
    return {
        "unread_stream": Plan(lambda: unread_stream(ctx.victim, args.unread_mb)),
        "connection_slots": Plan(lambda: connection_slots(ctx, args.slot_keys)),
        "slow_chunks": Plan(
            lambda: slow_chunks(
                ctx.victim, args.idle_chunk_streams, args.trickle_chunk_streams, args.chunk_keys
            ),
            invoke_every_s=INVOKE_EVERY_S,
        ),
        "handshake_slots": Plan(lambda: handshake_slots(ctx, args.raw_sockets)),
    }


def refused(victim: Victim, before: Any, code: str) -> int:
    return victim.refusals()[f"network:{code}"] - before[f"network:{code}"]


def unread_stream(victim: Victim, megabytes: int) -> Any:
    hostile = BarePeer(victim.addr, actor=True)
    hostile.ask(root_handle(victim.peer_id), "/public/hello")  # the victim opens a stream to us

    def attack() -> dict[str, Any]:
        before = victim.refusals()
        pushed = 0
        current = hostile
        connections = 1
        while pushed < megabytes * MIB:  # a reset stream: ask again, push on the new one
            if not answered(current, victim):
                # The victim closed the connection: come back with a fresh key.
                current.close()
                current = BarePeer(victim.addr, actor=True)
                connections += 1
                continue
            pushed += current.push_unread(min(PUSH_BYTES, megabytes * MIB - pushed))
        return {
            "pushed_mb": round(pushed / MIB, 1),
            "window_exceeded": refused(victim, before, "window_exceeded"),
            "hostile_connections": connections,
            "_cleanup": current.close,
        }

    return attack


def answered(peer: BarePeer, victim: Victim) -> bool:
    """Whether ``victim`` answers a hello from ``peer`` (False: its connection is gone)."""
    try:
        return peer.ask(root_handle(victim.peer_id), "/public/hello", timeout=5) is not None
    except Exception:  # the stream was reset with the connection
        return False


def newcomer_joins(ctx: Context, name: str) -> float | None:
    """A new node bootstraps from the victim and deploys on it: seconds from its start
    to its deployment running, or None if not within ``JOIN_DEADLINE_S``."""
    began = time.perf_counter()
    newcomer = Honest(ctx.cluster, ctx.victim, name)  # the kit's honest peer, a new node
    if not newcomer.knows_victim(JOIN_DEADLINE_S):
        return None
    while time.perf_counter() - began < JOIN_DEADLINE_S:
        if newcomer.place() is not None:
            return round(time.perf_counter() - began, 2)
    return None


def connection_slots(ctx: Context, keys: int) -> Any:
    victim = ctx.victim

    def attack() -> dict[str, Any]:
        before = victim.refusals()
        say(f"connection_slots: {keys} connections from fresh keys")
        flood = ManyKeys(victim.addr, keys)
        joined = newcomer_joins(ctx, "newcomer-slots")
        return {
            "flood_dialed": flood.dialed,
            "flood_connected": flood.connected(),
            "newcomer_joined_s": joined,
            "connection_evicted": refused(victim, before, "connection_evicted"),
            "connections_full": refused(victim, before, "connections_full"),
            "_cleanup": flood.close,
        }

    return attack


class Chunker(HostileProcess):
    """The chunk-stream attacker of ``slow_chunks``, a process of its own (this file run
    with ``--chunker``): its ``keys`` bare peers, each on a trio thread, opening streams
    in the bench's process took the honest node's interpreter lock, so the honest
    invokes measured the attacker as much as the victim."""

    def __init__(self, victim: Victim, keys: int) -> None:
        super().__init__([sys.executable, __file__, "--chunker", victim.addr, str(keys)])
        self.ask({})  # every key connected

    def open(self, idle: int, trickling: int) -> int:
        return int(self.ask({"open": [idle, trickling]})["opened"])

    def held_open(self) -> int:
        return int(self.ask({"held_open": True})["held_open"])


def chunker_main(addr: str, keys: int) -> None:
    """``--chunker``: the attacker's side of :class:`Chunker` (stdin and stdout)."""
    peers = [BarePeer(addr) for _ in range(keys)]

    def step(ask: dict[str, Any]) -> dict[str, Any]:
        if "open" in ask:
            idle, trickling = ask["open"]
            opened = 0
            for i, peer in enumerate(peers):
                opened += peer.open_streams(CHUNK_PROTOCOL, idle // keys + (i < idle % keys))
                trickle = trickling // keys + (i < trickling % keys)
                opened += peer.open_streams(CHUNK_PROTOCOL, trickle, first=b"\x00")
            return {"opened": opened}
        if "held_open" in ask:
            return {"held_open": sum(peer.held_open() for peer in peers)}
        return {"keys": len(peers)}

    try:
        serve(step)
    finally:
        for peer in peers:
            peer.close()


def slow_chunks(victim: Victim, idle: int, trickling: int, keys: int) -> Any:
    chunker = Chunker(victim, keys)

    def attack() -> dict[str, Any]:
        before = victim.refusals()
        began = time.perf_counter()
        opened = chunker.open(idle, trickling)
        open_s: float | None = None
        while time.perf_counter() - began < CLOSE_DEADLINE_S:
            if chunker.held_open() == 0:
                open_s = round(time.perf_counter() - began, 2)
                break
            time.sleep(0.5)
        return {
            "chunk_streams_opened": opened,
            "chunk_streams_open_s": open_s,
            "chunk_streams_still_open": chunker.held_open(),
            "transfers_full": refused(victim, before, "transfers_full"),
            "transfer_stalled": refused(victim, before, "transfer_stalled"),
            "streams_full": refused(victim, before, "streams_full"),
            "_cleanup": chunker.close,
        }

    return attack


def handshake_slots(ctx: Context, count: int) -> Any:
    victim = ctx.victim
    port = int(Multiaddr(victim.addr.split("/p2p/")[0]).value_for_protocol("tcp"))

    def attack() -> dict[str, Any]:
        before = victim.refusals()
        began = time.perf_counter()
        sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
        joined = newcomer_joins(ctx, "newcomer-handshakes")
        closed_s: float | None = None
        while time.perf_counter() - began < CLOSE_DEADLINE_S:
            if all([closed_by_peer(s) for s in sockets]):  # each drained, every pass
                closed_s = round(time.perf_counter() - began, 2)
                break
            time.sleep(0.5)
        for s in sockets:
            s.close()
        return {
            "raw_sockets": count,
            "newcomer_joined_s": joined,
            "raw_sockets_closed_s": closed_s,
            "handshake_evicted": refused(victim, before, "handshake_evicted"),
            "handshake_timeout": refused(victim, before, "handshake_timeout"),
        }

    return attack


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--chunker":
        logging.getLogger("dms").setLevel(logging.ERROR)
        chunker_main(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit("run bench/adversary.py; this file is run alone only as --chunker ADDR KEYS")
