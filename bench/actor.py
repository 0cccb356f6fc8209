"""Signed invoke between two actors over the in-memory transport vs the unavoidable floor.

The floor, measured in the same run, is a bare pykka ``ask`` plus two Ed25519
signs and two verifies of an envelope-sized message: what any signed
request/reply between two actors must pay. The crypto runs where a real
exchange must run it: the caller signs the request and verifies the reply, the
receiving actor verifies the request and signs the reply, each in its own
thread (on a 2-core machine the same work costs more when it hops between
cores, and both measurements pay that alike). Prints one JSON line with --json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from concurrent.futures import wait

import pykka

from dms.actor import Actor, ActorSystem, Limits, MemoryNetwork, behaviour
from dms.security import Identity, verify_signature


class Echo(Actor):
    @behaviour("/bench/echo", public=True)
    def echo(self, request):  # type: ignore[no-untyped-def]
        return request.payload


class _Bare(pykka.ThreadingActor):
    """Verifies a signed request and signs the reply: no routing, no encoding."""

    def __init__(self, key: Identity) -> None:
        super().__init__()
        self.key = key

    def on_receive(self, message):  # type: ignore[no-untyped-def]
        public_key, signature, body = message
        if not verify_signature(public_key, signature, body):
            raise ValueError("bad signature")
        return self.key.sign(body)


def _p50_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


class Floor:
    """The floor exchange: caller signs, actor verifies and signs, caller verifies."""

    def __init__(self, frame_size: int) -> None:
        self.caller, callee = Identity.generate(), Identity.generate()
        self.callee_key = callee.public_key
        self.message = b"\x01" * frame_size
        self.actor = _Bare.start(callee)

    def once(self) -> float:
        start = time.perf_counter()
        reply_sig = self.actor.ask(
            (self.caller.public_key, self.caller.sign(self.message), self.message)
        )
        if not verify_signature(self.callee_key, reply_sig, self.message):
            raise RuntimeError("floor reply signature failed")
        return time.perf_counter() - start

    def stop(self) -> None:
        self.actor.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=3000, help="invokes per measurement")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()

    net = MemoryNetwork()
    nodes = []
    for _ in range(2):
        ident = Identity.generate()
        nodes.append(ActorSystem(ident, net.transport(ident.peer_id)))
    a = nodes[0].spawn(Echo, inbox="root", identity=nodes[0].identity)
    b = nodes[1].spawn(Echo, inbox="root", identity=nodes[1].identity)
    payload = {"job": "bench", "seq": 0, "blob": b"\x00" * 64}
    frame_size = len(a.seal(a.envelope("/bench/echo", payload, to=b.handle, expect_reply=True)))
    floor = Floor(frame_size)
    try:
        for _ in range(args.n // 10):  # warm-up
            a.ask(b.handle, "/bench/echo", payload)
            floor.once()
        # Interleaved blocks, so both figures see the same machine at the same time.
        samples: list[float] = []
        floor_samples: list[float] = []
        block = max(1, args.n // 20)
        for i in range(args.n):
            payload["seq"] = i
            start = time.perf_counter()
            a.ask(b.handle, "/bench/echo", payload)
            samples.append(time.perf_counter() - start)
            if (i + 1) % block == 0:
                floor_samples.extend(floor.once() for _ in range(block))
        invoke_p50 = _p50_us(samples)
        floor_p50 = _p50_us(floor_samples)

        # Throughput: many invokes in flight from one caller, as many as the callee
        # admits from one peer at once (its in-flight budget; past it, it refuses).
        window = threading.BoundedSemaphore(Limits().max_inflight_per_peer)
        start = time.perf_counter()
        futures = []
        for _ in range(args.n):
            window.acquire()
            future = a.invoke(b.handle, "/bench/echo", payload)
            future.add_done_callback(lambda _: window.release())
            futures.append(future)
        wait(futures, timeout=60)
        failed = sum(1 for f in futures if f.exception() is not None)
        per_s = (args.n - failed) / (time.perf_counter() - start)
    finally:
        floor.stop()
        for node in nodes:
            node.stop()

    figures = {
        "bench": "actor",
        "invoke_p50_us": round(invoke_p50, 1),
        "floor_us": round(floor_p50, 1),
        "ratio": round(invoke_p50 / floor_p50, 3),
        "invokes_per_s": round(per_s, 1),
        "failed": failed,
        "envelope_bytes": frame_size,
        "n": args.n,
    }
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:>16}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
