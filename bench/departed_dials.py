"""Dials a node makes to fresh keys after they left (specs/security.md, "Budgets and
priority", departed keys dialed again and again).

A real dms node on loopback; ``--keys`` bare py-libp2p hosts with fresh keys (each
listening, as ``sybil_flood``'s do) connect one after the other, say hello and
leave. Then, for ``--window-s``, every dial of the node's swarm to one of them is
counted (py-libp2p's auto-connector dials every peer it holds addresses of), and
the ERROR lines py-libp2p logs for failed TCP dials.

Keys: ``departed_keys``, ``window_s``, ``dials_to_departed`` (after they left),
``departed_keys_dialed``, ``failed_dial_log_lines``, ``peerstore_peers`` (entries
at the end, the node's own included). Prints one JSON line with --json.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from dms.sim.adversary import BarePeer, root_of
from dms.sim.cluster import LocalCluster


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "Failed to open TCP stream" in record.getMessage():
            self.lines += 1


def measure(keys: int, window_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(Path(tmp) / "cluster") as cluster:
        victim = cluster.add("victim", bootstrap=[])
        transport: Any = victim.transport
        swarm: Any = transport._host.get_network()
        departed: set[str] = set()
        dials: Counter[str] = Counter()
        dial = swarm.dial_peer

        async def counted(peer_id: Any) -> Any:
            if peer_id.to_base58() in departed:
                dials[peer_id.to_base58()] += 1
            return await dial(peer_id)

        async def install() -> None:
            swarm.dial_peer = counted

        transport._call(install)
        left = []
        for _ in range(keys):
            peer = BarePeer(victim.addrs()[0], actor=True)
            if peer.ask(root_of(victim.identity), "/public/hello") is None:
                raise SystemExit("a key's hello went unanswered")
            peer.close()
            left.append(peer.peer_id)
        counter = _Count()
        logging.getLogger("libp2p").addHandler(counter)
        departed.update(left)  # dials from now on: all of them have left
        time.sleep(window_s)
        logging.getLogger("libp2p").removeHandler(counter)
        return {
            "departed_keys": keys,
            "window_s": window_s,
            "dials_to_departed": sum(dials.values()),
            "departed_keys_dialed": len(dials),
            "failed_dial_log_lines": counter.lines,
            "peerstore_peers": transport.budget_usage()["peerstore_peers"][0],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=30, help="fresh keys that connect and leave")
    parser.add_argument("--window-s", type=float, default=150.0, help="how long dials are counted")
    parser.add_argument("--json", action="store_true", help="one JSON line")
    args = parser.parse_args()
    result = measure(args.keys, args.window_s)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
