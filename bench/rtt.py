"""Signed invoke between two dms nodes over libp2p vs a bare py-libp2p echo, same run.

- ``raw_p50_ms``: two bare py-libp2p hosts (TCP + Noise + Yamux), each on its
  own trio thread as dms runs them, echo an envelope-sized message over one
  persistent stream.
- ``dms_p50_ms``: an invoke from one dms node's root actor to an echo actor on
  another: sign, frame, stream, verify, actor mailbox, reply, verify.
- ``floor_p50_ms`` and ``floor_ratio``: the same bare echo plus only what the
  design asks of every invoke (DESIGN.md decisions 1 and 2), with no dms code
  but the outbox: the caller is a thread outside trio and signs the request;
  the peer's trio thread verifies it and hands it to an actor thread, which
  signs the reply; the caller's trio thread verifies the reply and wakes the
  caller. What dms adds on top of the floor is its own cost.
- ``dms_msgs_per_s``: one-way sends, pipelined up to ``SEND_WINDOW`` unhandled at
  the receiver (under its in-flight budget per peer, which refuses the excess),
  counted when the receiving actor has handled the last one.

Samples alternate in blocks between raw, floor and dms so all see the same
machine load. Prints one JSON line with --json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pykka
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from rawhosts import HostPair, read_exactly

from dms.actor import Actor, Request, behaviour
from dms.network.outbox import Outbox
from dms.node.client import root_handle
from dms.security import Identity, verify_signature
from dms.security.identity import SIGNATURE_BYTES
from dms.sim.cluster import LocalCluster

ECHO = TProtocol("/bench/echo/1.0.0")


class Echo(Actor):
    @behaviour("/bench/echo", public=True)
    def echo(self, request: Request) -> Any:
        return request.payload


# Sends not yet handled at the receiver: below its max_inflight_per_peer (64), which
# refuses the rest (a flood from one peer is what that budget is for).
SEND_WINDOW = 48


class Counter(Actor):
    def __init__(
        self,
        context: Any,
        expected: int,
        done: threading.Event,
        window: threading.Semaphore,
    ) -> None:
        super().__init__(context)
        self.expected = expected
        self.done = done
        self.window = window
        self.count = 0

    @behaviour("/bench/count", public=True)
    def count_one(self, request: Request) -> None:
        self.count += 1
        self.window.release()
        if self.count == self.expected:
            self.done.set()


class RawEcho:
    """Two bare hosts on two trio threads; ``block(n)`` runs n echoes on the client side."""

    def __init__(self, size: int) -> None:
        self.message = b"\x01" * size
        self._stream: INetStream | None = None
        self.pair = HostPair(ECHO, self._echo, self._on_client)

    async def _echo(self, stream: INetStream) -> None:
        while data := await stream.read(65536):
            await stream.write(data)

    async def _on_client(self, pair: HostPair, nursery: trio.Nursery) -> None:
        self._stream = await pair.new_stream()
        self._client_tasks(nursery)

    def _client_tasks(self, nursery: trio.Nursery) -> None:
        """Background tasks of the client's loop; the bare echo has none."""

    async def _echoes(self, n: int) -> list[float]:
        assert self._stream is not None
        out = []
        for _ in range(n):
            start = time.perf_counter()
            await self._stream.write(self.message)
            await read_exactly(self._stream, len(self.message))
            out.append(time.perf_counter() - start)
        return out

    def block(self, n: int) -> list[float]:
        return self.pair.run(self._echoes, n)

    def close(self) -> None:
        self.pair.close()


async def _write_from(outbox: Outbox, stream: INetStream) -> None:
    try:
        while batch := await outbox.take():
            await stream.write(b"".join(batch))
    finally:
        outbox.release()


class _Signer(pykka.ThreadingActor):
    """The peer's actor: signs the reply to each (already verified) request."""

    use_daemon_thread = True  # a bench that fails must still exit

    def __init__(self, key: Identity, replies: Outbox) -> None:
        super().__init__()
        self.key = key
        self.replies = replies

    def on_receive(self, body: bytes) -> None:
        self.replies.put(body + self.key.sign(body))


def _verified_body(message: bytes, public_key: bytes) -> bytes:
    body, signature = message[:-SIGNATURE_BYTES], message[-SIGNATURE_BYTES:]
    if not verify_signature(public_key, signature, body):
        raise RuntimeError("floor signature failed")
    return body


class FloorEcho(RawEcho):
    """The bare echo plus the design's fixed costs: a caller thread outside trio, an
    actor thread at the peer, an Ed25519 signature on each leg and its check."""

    def __init__(self, size: int) -> None:
        self.caller, self.callee = Identity.generate(), Identity.generate()
        self._requests = Outbox()
        self._waiting: Future[bytes] | None = None
        super().__init__(size)
        self.body = self.message[:-SIGNATURE_BYTES]

    async def _echo(self, stream: INetStream) -> None:
        # As DESIGN.md has it: the network thread verifies, then tells the actor.
        replies = Outbox()
        actor = _Signer.start(self.callee, replies)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_write_from, replies, stream)
                while True:
                    request = await read_exactly(stream, len(self.message))
                    actor.tell(_verified_body(request, self.caller.public_key))
        finally:
            actor.stop(block=False)
            replies.close()

    def _client_tasks(self, nursery: trio.Nursery) -> None:
        assert self._stream is not None
        nursery.start_soon(_write_from, self._requests, self._stream)
        nursery.start_soon(self._read_replies)

    async def _read_replies(self) -> None:
        assert self._stream is not None
        while True:
            reply = await read_exactly(self._stream, len(self.message))
            _verified_body(reply, self.callee.public_key)
            assert self._waiting is not None
            self._waiting.set_result(reply)

    def block(self, n: int) -> list[float]:
        out = []
        for _ in range(n):
            start = time.perf_counter()
            self._waiting = Future()
            self._requests.put(self.body + self.caller.sign(self.body))
            self._waiting.result(10)
            out.append(time.perf_counter() - start)
        return out

    def close(self) -> None:
        self._requests.close()
        super().close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=1500, help="round trips of each kind")
    parser.add_argument("--sends", type=int, default=5000, help="pipelined one-way sends")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    # Each node on a trio thread of its own, as in production (one node per process)
    # and as the raw pair runs.
    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalCluster(Path(tmp), shared_loop=False) as cluster,
    ):
        caller_node, callee_node = cluster.start(2)
        cluster.wait_linked()
        assert caller_node.node is not None and callee_node.system is not None
        caller = caller_node.node
        echo = callee_node.system.spawn(Echo)
        done = threading.Event()
        window = threading.Semaphore(SEND_WINDOW)
        counter = callee_node.system.spawn(Counter, args.sends, done, window)
        payload = {"seq": 0, "data": "x" * 64}
        caller.ask(root_handle(callee_node.peer_id), "/public/hello", timeout=30)
        envelope_bytes = len(caller.seal(caller.envelope("/bench/echo", payload, to=echo.handle)))
        raw = RawEcho(envelope_bytes)
        floor = FloorEcho(envelope_bytes)

        raw_samples: list[float] = []
        floor_samples: list[float] = []
        dms_samples: list[float] = []
        failed = 0
        block = 50
        for _ in range(max(1, args.n // block)):
            raw_samples += raw.block(block)
            floor_samples += floor.block(block)
            for _ in range(block):
                start = time.perf_counter()
                try:
                    caller.ask(echo.handle, "/bench/echo", payload, timeout=10)
                except Exception:
                    failed += 1
                    continue
                dms_samples.append(time.perf_counter() - start)
        raw.close()
        floor.close()

        start = time.perf_counter()
        for i in range(args.sends):
            if not window.acquire(timeout=30):
                break  # a send was lost: delivered stays False
            caller.send(counter.handle, "/bench/count", {"seq": i})
        delivered = done.wait(120)
        send_s = time.perf_counter() - start

    raw_p50 = statistics.median(raw_samples) * 1e3
    dms_p50 = statistics.median(dms_samples) * 1e3
    floor_p50 = statistics.median(floor_samples) * 1e3
    result = {
        "bench": "rtt",
        "raw_p50_ms": round(raw_p50, 3),
        "dms_p50_ms": round(dms_p50, 3),
        "ratio": round(dms_p50 / raw_p50, 3),
        "dms_msgs_per_s": round(args.sends / send_s, 1) if delivered else 0.0,
        "floor_p50_ms": round(floor_p50, 3),
        "floor_ratio": round(floor_p50 / raw_p50, 3),
        "dms_p95_ms": round(statistics.quantiles(dms_samples, n=20)[-1] * 1e3, 3),
        "raw_p95_ms": round(statistics.quantiles(raw_samples, n=20)[-1] * 1e3, 3),
        "envelope_bytes": envelope_bytes,
        "failed": failed,
        "n": len(dms_samples),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>16}: {value}")
    return 0 if delivered and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
