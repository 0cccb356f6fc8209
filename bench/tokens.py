"""What capability tokens cost a signed invoke, over the in-memory transport.

Two callers invoke the same non-public behaviour of one node, in the same run:
``plain`` is a root anchor of that node (no token), ``chain3`` carries a chain of
three tokens (the node -> k1 -> k2 -> the caller), which its wallet attaches by
itself. With the cache warm a repeated chain costs a lookup; ``chain3_cold``
clears the receiver's cache before every invoke, so every signature of the chain
is checked again (what a new chain costs once). Blocks of the measurements are
interleaved, so each sees the same machine at the same time. Prints one JSON
line with --json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from dms.actor import ROOT_INBOX, Actor, ActorRef, ActorSystem, MemoryNetwork, behaviour
from dms.security import Identity
from dms.security.tokens import issue
from dms.security.trust import TrustStore

PATH = "/bench/private"


class Service(Actor):
    @behaviour(PATH)
    def private(self, request):  # type: ignore[no-untyped-def]
        return request.payload


def _p50_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def _node(net: MemoryNetwork) -> tuple[ActorSystem, ActorRef]:
    ident = Identity.generate()
    system = ActorSystem(ident, net.transport(ident.peer_id), trust=TrustStore(None))
    return system, system.spawn(Service, inbox=ROOT_INBOX, identity=ident)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=3000, help="invokes per measurement")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()

    net = MemoryNetwork()
    (target, target_ref), (plain, plain_ref), (holder, holder_ref) = (_node(net) for _ in range(3))
    systems = [target, plain, holder]
    target.trust.anchor_root(plain.identity.did)
    k1, k2 = Identity.generate(), Identity.generate()
    exp = int(time.time() + 3600)
    t1 = issue(target.identity, k1.public_key, ["/bench"], expires_at=exp, depth=2)
    t2 = issue(k1, k2.public_key, ["/bench"], expires_at=exp, depth=1, proofs=[t1.raw])
    t3 = issue(k2, holder.identity.public_key, [PATH], expires_at=exp, proofs=[t2.raw])
    holder.trust.anchor(t3.raw, "provide")
    payload = {"job": "bench", "seq": 0, "blob": b"\x00" * 64}
    to = target_ref.handle

    def envelope_bytes(ref: ActorRef) -> int:
        return len(ref.seal(ref.envelope(PATH, payload, to=to, expect_reply=True)))

    carried = holder_ref.envelope(PATH, payload, to=to).caps
    assert carried == [t3.raw], "the wallet should attach the chain by itself"

    def once(ref: ActorRef, cold: bool = False) -> float:
        if cold:
            target.trust.verifier.clear()
        start = time.perf_counter()
        ref.ask(to, PATH, payload)
        return time.perf_counter() - start

    try:
        for _ in range(max(1, args.n // 10)):  # warm-up
            once(plain_ref)
            once(holder_ref)
        plain_s: list[float] = []
        chain_s: list[float] = []
        cold_s: list[float] = []
        block = max(1, args.n // 20)
        for i in range(0, args.n, block):
            payload["seq"] = i
            plain_s.extend(once(plain_ref) for _ in range(block))
            chain_s.extend(once(holder_ref) for _ in range(block))
            cold_s.extend(once(holder_ref, cold=True) for _ in range(max(1, block // 5)))
        refused = sum(target.refusals.values())
    finally:
        for system in systems:
            system.stop()
        net.close()

    plain_p50, chain_p50, cold_p50 = _p50_us(plain_s), _p50_us(chain_s), _p50_us(cold_s)
    figures = {
        "bench": "tokens",
        "plain_p50_us": round(plain_p50, 1),
        "chain3_p50_us": round(chain_p50, 1),
        "cached_ratio": round(chain_p50 / plain_p50, 3),
        "chain3_cold_p50_us": round(cold_p50, 1),
        "cold_ratio": round(cold_p50 / plain_p50, 3),
        "plain_envelope_bytes": envelope_bytes(plain_ref),
        "chain3_envelope_bytes": envelope_bytes(holder_ref),
        "refused": refused,
        "n": args.n,
    }
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:>22}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
