"""Mining placed on other nodes vs the same job run --local, and chunks vs a bare stream.

How the nodes run: one process. ``LocalCluster`` starts an owner and two
providers (real dms nodes: libp2p hosts over TCP + Noise + Yamux on loopback,
their own keys, stores and chunk stores), each on a trio thread of its own
(``shared_loop=False``, as bench/rtt.py runs them; ``--shared-loop`` puts them
on one loop, as the tests do). Owner and workers share this process's GIL and
the machine's cores: two shards compute at the same time only where TenSEAL
lets go of the GIL. Every JSON line says how in ``nodes``.

One JSON line per case (with ``--json``):

- ``local_s``: ``run_clustering`` / ``run_classification`` of the same job with
  the same settings, in this process (what ``dms mine --local`` runs), measured
  just before the placed run.
- ``network_s``: from the ``/dms/node/mining/new`` invoke to the session's
  phase ``completed``, polling ``/dms/node/mining/status`` every 50 ms
  (placement, encryption, shipping, every round, decryption). ``ratio`` =
  network_s / local_s.
- ``mb_shipped``: every payload byte between owner and workers, both ways (the
  session result's per-shard ``mb_sent`` + ``mb_received``).
- ``transfer_mb_per_s``: the bytes that moved as chunks (``chunk_mb``, counted
  at every node's transport) over the time spent fetching them (``fetch_s``):
  the seconds during which any courier, owner's or worker's, was fetching a
  parcel's missing chunks (the span ``Traffic.fetch_s`` times: pull, verify,
  store). Two shards' transfers overlap; the time they overlap counts once, so
  this is the rate the bytes moved at (``fetch_overlap`` = summed fetch time
  over ``fetch_s``). The bench logs the spans itself: a courier forgets an
  owner's ``Traffic`` when it releases the owner (the session, every step).
  ``wire_mb_per_s``: the same bytes over the time inside the transports'
  ``fetch_chunks`` only (no hash check, no disk).
- ``raw_stream_mb_per_s``: two bare py-libp2p hosts (TCP + Noise + Yamux, each
  on its own trio thread, as bench/rtt.py builds them) move ``mb_shipped`` bytes
  one way on a new stream, in 1 MiB writes, timed from opening the stream to
  the receiver's one-byte acknowledgement of the last byte; measured right after
  each case. They run in a child process: py-libp2p as it ships, since a dms
  node corrects py-libp2p process-wide (dms/network/libp2p_patches/yamux.py, Yamux credit
  returned at half a window). ``raw_tuned_mb_per_s``: the same two hosts in
  this process, under those corrections. ``transfer_ratio`` =
  transfer_mb_per_s / raw_stream_mb_per_s.
- ``owner_cpu_s``, ``worker_cpu_s``: from the session result.
- ``agreement``: the fraction of labels (predictions) equal to the local run's.
- ``phases_s``: when a poll first saw each phase (placing, shipping, mining,
  completed), from the invoke; ``owner_timings``: the owner's own timings.

Cases (n = 10,000, a = 8, k = 5): skmeans ckks with 1 and 2 shards, protocol
blind (the default), then the same two with protocol udm; sknn ckks (blind,
the default) with 10,000 training rows and 50 queries; dbskmeans liu. The data
come from ``dms.mining.data`` (seeded) through a temporary CSV, which the
owner's node reads and the local run reads too. DBSKMeans draws its OPE keys
at random on every run, so its data are well-separated seeded blobs (std 0.3)
with a seeded k-means++ start, where the local and the placed run both find
plaintext k-means' clusters (``agreement_plain``, ``local_agreement_plain``).

The last line, ``{"bench": "control_during_transfer", ...}``: the p50 (and
p95, max) of a signed invoke round trip (``/public/status``, owner to a
provider) while that provider pulls 50 MB parcels from the owner through the
nodes' own couriers, against the p50 with no transfer, in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from rawhosts import HostPair, read_exactly

from dms.mining import ClusteringParams, run_classification, run_clustering
from dms.mining.data import blobs, classification, read_table, read_test_table
from dms.network.transfer import Courier
from dms.node.client import root_handle
from dms.node.daemon import Node
from dms.orchestrator.states import DEPLOYMENT, SESSION
from dms.resources import Resources
from dms.sim.cluster import LocalCluster
from dms.store.chunks import CHUNK_BYTES

A, K, QUERIES, CLASSES = 8, 5, 50, 3
POLL_S = 0.05
CONTROL_MB = 50
SINK = TProtocol("/bench/sink/1.0.0")


def say(what: str) -> None:
    """Progress on stderr (stdout holds the JSON lines)."""
    print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


def emit(figures: dict[str, Any], as_json: bool) -> None:
    print(json.dumps(figures) if as_json else "  ".join(f"{k}={v}" for k, v in figures.items()))
    sys.stdout.flush()


# ---- what the couriers move (instrumentation of this process's couriers) ---------------


def covered(spans: list[tuple[float, float]]) -> float:
    """Seconds during which at least one of ``spans`` was running."""
    total, reach = 0.0, float("-inf")
    for began, ended in sorted(spans):
        if ended > reach:
            total += ended - max(began, reach)
            reach = ended
    return total


@dataclass
class ChunkLog:
    """What moved as chunks during a case, on owner and workers alike: the bytes the
    transports fetched, and when couriers and transports were fetching."""

    wire_bytes: int = 0
    fetches: list[tuple[float, float]] = field(default_factory=list)  # Courier fetches
    wires: list[tuple[float, float]] = field(default_factory=list)  # transport fetches
    couriers: dict[str, Courier] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self._lock:
            self.wire_bytes = 0
            self.fetches, self.wires = [], []

    def install(self) -> None:
        """Before any node starts: every Courier registers itself and its fetches of
        missing chunks (what ``Traffic.fetch_s`` times: pull, verify, store) are logged."""
        log = self
        init, fetch_missing = Courier.__init__, Courier._fetch_missing

        def registering_init(courier: Courier, *args: Any, **kwargs: Any) -> None:
            init(courier, *args, **kwargs)
            log.couriers[courier.peer_id] = courier

        def logged_fetch(courier: Courier, *args: Any, **kwargs: Any) -> None:
            began = time.perf_counter()
            try:
                fetch_missing(courier, *args, **kwargs)
            finally:
                with log._lock:
                    log.fetches.append((began, time.perf_counter()))

        Courier.__init__ = registering_init  # type: ignore[method-assign]
        Courier._fetch_missing = logged_fetch  # type: ignore[method-assign]

    def time_wire(self, node: Node) -> None:
        """Log the transport's own fetches (the network only: no hash check, no disk)."""
        transport = node.transport
        assert transport is not None
        fetch = transport.fetch_chunks
        log = self

        def timed(
            peer_id: str, manifest_id: str, hashes: list[str], max_chunk_bytes: int
        ) -> list[tuple[str, bytes]]:
            began = time.perf_counter()
            arrived = fetch(peer_id, manifest_id, hashes, max_chunk_bytes)
            with log._lock:
                log.wires.append((began, time.perf_counter()))
                log.wire_bytes += sum(len(data) for _, data in arrived)
            return arrived

        transport.fetch_chunks = timed  # type: ignore[method-assign]

    def figures(self) -> dict[str, Any]:
        with self._lock:
            fetch_s, wire_s = covered(self.fetches), covered(self.wires)
            summed = sum(b - a for a, b in self.fetches)
            mb = self.wire_bytes / 1e6
        return {
            "chunk_mb": round(mb, 2),
            "fetch_s": round(fetch_s, 3),
            "transfer_mb_per_s": round(mb / fetch_s, 1) if fetch_s else None,
            "wire_s": round(wire_s, 3),
            "wire_mb_per_s": round(mb / wire_s, 1) if wire_s else None,
            "fetches": len(self.fetches),
            "fetch_overlap": round(summed / fetch_s, 2) if fetch_s else None,
        }


# ---- the bare stream baseline ----------------------------------------------------------


class RawStream:
    """Two bare py-libp2p hosts on two trio threads; ``send(n)`` moves n bytes one way on
    a new stream and returns the seconds until the receiver acknowledged the last byte."""

    def __init__(self) -> None:
        self.block = os.urandom(CHUNK_BYTES)
        self.pair = HostPair(SINK, self._sink)

    async def _sink(self, stream: INetStream) -> None:
        """One transfer per stream: an 8-byte size, then that many bytes; answer one byte."""
        size = int.from_bytes(await read_exactly(stream, 8), "big")
        left = size
        while left:
            chunk = await stream.read(min(left, CHUNK_BYTES))
            if not chunk:
                return
            left -= len(chunk)
        await stream.write(b"\x01")
        await stream.close()

    async def _send(self, size: int) -> float:
        """A new stream (its window starts where every stream's does), ``size`` bytes in
        1 MiB writes, then the receiver's acknowledgement."""
        began = time.perf_counter()
        stream = await self.pair.new_stream()
        await stream.write(size.to_bytes(8, "big"))
        left = size
        while left:
            piece = self.block if left >= len(self.block) else self.block[:left]
            await stream.write(piece)
            left -= len(piece)
        await read_exactly(stream, 1)
        took = time.perf_counter() - began
        await stream.close()
        return took

    def send(self, size: int) -> float:
        return self.pair.run(self._send, size)

    def close(self) -> None:
        self.pair.close()


class RawChild:
    """The same two bare hosts in a child Python process: py-libp2p as it ships, without
    the Yamux corrections a dms node applies to its whole process
    (dms/network/libp2p_patches/yamux.py).
    One line in (a size), one line out (the seconds)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--raw-child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if self._line() != "ready":
            raise RuntimeError("the raw child did not start")

    def _line(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def send(self, size: int) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{size}\n")
        self.process.stdin.flush()
        return float(self._line())

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(30)


def raw_child() -> int:
    raw = RawStream()
    print("ready", flush=True)
    for line in sys.stdin:
        print(raw.send(int(line)), flush=True)
    raw.close()
    return 0


# ---- the cases --------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    algorithm: str
    scheme: str
    protocol: str | None
    shards: int
    data: str  # which data set

    @property
    def clustering(self) -> bool:
        return self.algorithm != "sknn"


CASES = [
    Case("skmeans", "ckks", "blind", 1, "blobs"),
    Case("skmeans", "ckks", "blind", 2, "blobs"),
    Case("skmeans", "ckks", "udm", 1, "blobs"),
    Case("skmeans", "ckks", "udm", 2, "blobs"),
    Case("sknn", "ckks", "blind", 1, "classes"),
    Case("dbskmeans", "liu", None, 1, "separated"),
]
SEEDED: dict[str, Any] = {"init": "kmeans++", "seed": 1}  # dbskmeans: see the docstring


def write_csv(path: Path, features: np.ndarray, labels: np.ndarray | None = None) -> Path:
    with path.open("w") as fh:
        header = [f"x{i}" for i in range(features.shape[1])]
        fh.write(",".join(header + (["label"] if labels is not None else [])) + "\n")
        for i, row in enumerate(features):
            cells = [repr(float(v)) for v in row]
            if labels is not None:
                cells.append(f"class{labels[i]}")
            fh.write(",".join(cells) + "\n")
    return path


def make_data(kind: str, n: int, folder: Path) -> dict[str, Path]:
    """The seeded data set ``kind`` as CSV files (what the owner's node reads)."""
    if kind == "blobs":
        data, _ = blobs(n, A, K, seed=n, std=2.0)
        return {"data": write_csv(folder / "blobs.csv", data)}
    if kind == "separated":
        data, _ = blobs(n, A, K, seed=5, std=0.3)
        return {"data": write_csv(folder / "separated.csv", data)}
    x, y = classification(n + QUERIES, A, CLASSES, seed=n + 1, std=4.0)
    return {
        "train": write_csv(folder / "train.csv", x[:n], y[:n]),
        "test": write_csv(folder / "test.csv", x[n:]),
    }


def run_local(case: Case, files: dict[str, Path]) -> tuple[list[Any], float, dict[str, Any]]:
    """The same job with --local's code path: labels, seconds, extra figures."""
    extra: dict[str, Any] = {}
    protocol = {"protocol": case.protocol} if case.protocol else {}
    if case.clustering:
        features = read_table(files["data"]).features
        seeded = SEEDED if case.algorithm == "dbskmeans" else {}
        params = ClusteringParams(K, **seeded)
        began = time.perf_counter()
        result = run_clustering(case.algorithm, features, params, scheme=case.scheme, **protocol)
        took = time.perf_counter() - began
        if case.algorithm == "dbskmeans":
            plain = run_clustering("kmeans", features, ClusteringParams(K, **SEEDED)).labels
            extra["plain_labels"] = plain
        return list(result.labels), took, extra
    training = read_table(files["train"], label=True)
    queries = read_test_table(files["test"], training)
    assert training.labels is not None
    began = time.perf_counter()
    result = run_classification(
        "sknn", training.features, training.labels, queries.features, K, **protocol
    )
    return list(result.labels), time.perf_counter() - began, extra


class Bench:
    def __init__(self, cluster: LocalCluster, chunks: ChunkLog) -> None:
        self.cluster = cluster
        self.chunks = chunks
        self.owner = cluster.add("owner")
        self.providers = [cluster.add(f"provider{i}") for i in range(2)]
        for node in self.providers:
            assert node.ledger is not None
            node.ledger.onboard(Resources(cpu=2, ram=4, disk=8))
        for node in [self.owner, *self.providers]:
            chunks.time_wire(node)
        deadline = time.monotonic() + 60
        while not self.knows_providers():
            if time.monotonic() > deadline:
                raise TimeoutError("the owner did not learn every provider's resources")
            time.sleep(0.1)

    def knows_providers(self) -> bool:
        for node in self.providers:
            record = self.owner.peer_table.get(node.peer_id)
            if record is None or record.heartbeat is None or record.status != "alive":
                return False
            if not record.heartbeat.onboarded.get("cpu"):
                return False
        return True

    def ask(self, behaviour: str, payload: Any = None, timeout: float = 60) -> Any:
        assert self.owner.node is not None
        return self.owner.node.ask(self.owner.node.handle, behaviour, payload, timeout=timeout)

    def leases(self) -> int:
        return sum(len(n.ledger.live()) for n in self.providers if n.ledger is not None)

    def place(self, case: Case, files: dict[str, Path]) -> tuple[dict[str, Any], float, dict]:
        """Run ``case`` placed; the result, network_s and when each phase was first seen."""
        settings: dict[str, Any] = {
            "algorithm": case.algorithm,
            "scheme": case.scheme,
            "protocol": case.protocol,
            "k": K,
            "shards": case.shards,
        }
        if case.algorithm == "dbskmeans":
            settings.update(SEEDED)
        request: dict[str, Any] = {"settings": settings, "timeout_s": 300}
        request.update({name: str(path) for name, path in files.items()})
        seen: dict[str, float] = {}
        began = time.perf_counter()
        session = self.ask("/dms/node/mining/new", request)["id"]
        deadline = began + 1800
        while True:
            phase = self.ask("/dms/node/mining/status", {"id": session})["phase"]
            seen.setdefault(phase, round(time.perf_counter() - began, 3))
            if phase in SESSION.terminal:
                network_s = time.perf_counter() - began
                break
            if time.perf_counter() > deadline:
                raise TimeoutError(f"session {session} did not end")
            time.sleep(POLL_S)
        if phase != "completed":
            status = self.ask("/dms/node/mining/status", {"id": session})
            raise RuntimeError(f"{case}: the session failed: {status['progress'].get('reason')}")
        answer = self.ask("/dms/node/mining/result", {"id": session})
        self.settle(session)
        return answer, network_s, seen

    def settle(self, session: str) -> None:
        """The workers finish and release their leases (and with them their chunks, whose
        traffic the log reads); the deployment ends."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = self.ask("/dms/node/deployment/status", {"id": session})["state"]
            if self.leases() == 0 and state in DEPLOYMENT.terminal:
                return
            time.sleep(0.1)
        say(f"warning: session {session} not settled within 60 s")

    # ---- control messages during a transfer ---------------------------------------------

    def status_rtt(self, to: Node) -> float:
        assert self.owner.node is not None
        began = time.perf_counter()
        self.owner.node.ask(root_handle(to.peer_id), "/public/status", timeout=30)
        return time.perf_counter() - began

    def control_during_transfer(self, samples: int, nodes_note: str) -> dict[str, Any]:
        provider = self.providers[0]
        source = self.chunks.couriers[self.owner.peer_id]
        audience = self.chunks.couriers[provider.peer_id]
        for _ in range(20):  # warm: the control stream is open
            self.status_rtt(provider)
        quiet = [self.status_rtt(provider) for _ in range(samples // 2)]
        during: list[float] = []
        transfers: list[float] = []
        pool = ThreadPoolExecutor(1, thread_name_prefix="bench-pull")
        for i in range(5):  # fresh bytes each time (nothing deduplicated), >= samples taken
            tag = f"bench:control:{i}"
            data = os.urandom(CONTROL_MB * 1_000_000)
            parcel = source.pack(data, provider.peer_id, tag)
            began = time.perf_counter()
            pull = pool.submit(audience.unpack, parcel, self.owner.peer_id, tag)
            time.sleep(0.05)  # the fetch has begun
            while not pull.done():
                rtt = self.status_rtt(provider)
                if not pull.done():
                    during.append(rtt)
            try:
                pull.result()
            finally:
                source.release(tag)
                audience.release(tag)
            transfers.append(time.perf_counter() - began)
            if len(during) >= samples:
                break
        pool.shutdown()
        quiet += [self.status_rtt(provider) for _ in range(samples - samples // 2)]
        quiet_p50, during_p50 = statistics.median(quiet), statistics.median(during)
        return {
            "bench": "control_during_transfer",
            "quiet_p50_ms": round(quiet_p50 * 1e3, 2),
            "during_p50_ms": round(during_p50 * 1e3, 2),
            "ratio": round(during_p50 / quiet_p50, 2),
            "quiet_p95_ms": round(statistics.quantiles(quiet, n=20)[-1] * 1e3, 2),
            "during_p95_ms": round(statistics.quantiles(during, n=20)[-1] * 1e3, 2),
            "during_max_ms": round(max(during) * 1e3, 1),
            "transfer_mb": CONTROL_MB,
            "transfers": len(transfers),
            "transfer_mb_per_s": round(CONTROL_MB / statistics.median(transfers), 1),
            "samples_quiet": len(quiet),
            "samples_during": len(during),
            "load_1m": round(os.getloadavg()[0], 2),
            "nodes": nodes_note,
        }


def case_figures(
    case: Case,
    n: int,
    local: tuple[list[Any], float, dict[str, Any]],
    placed: tuple[dict[str, Any], float, dict[str, float]],
    chunks: ChunkLog,
    raw_s: float,
    tuned_s: float,
    nodes_note: str,
) -> dict[str, Any]:
    local_labels, local_s, extra = local
    answer, network_s, seen = placed
    result, labels = answer["result"], answer["labels"]
    shipped = sum(p["mb_sent"] + p["mb_received"] for p in result["placement"])
    moved = chunks.figures()
    transfer = moved.pop("transfer_mb_per_s")
    raw = shipped / raw_s
    figures: dict[str, Any] = {
        "algorithm": case.algorithm,
        "scheme": case.scheme,
        "n": n,
        "a": A,
        "k": K,
        "shards": case.shards,
        "local_s": round(local_s, 3),
        "network_s": round(network_s, 3),
        "ratio": round(network_s / local_s, 2),
        "mb_shipped": round(shipped, 2),
        "transfer_mb_per_s": round(transfer, 1) if transfer else None,
        "raw_stream_mb_per_s": round(raw, 1),
        "transfer_ratio": round(transfer / raw, 2) if transfer else None,
        "owner_cpu_s": result["owner_cpu_s"],
        "worker_cpu_s": result["worker_cpu_s"],
        "agreement": float(np.mean(np.array(labels) == np.array(local_labels))),
        "nodes": nodes_note,
        "protocol": result.get("protocol"),
        "queries": QUERIES if case.algorithm == "sknn" else None,
        **moved,
        "raw_tuned_mb_per_s": round(shipped / tuned_s, 1),
        "wall_s": result["wall_s"],
        "phases_s": seen,
        "iterations": result.get("iterations"),
        "owner_timings": result.get("timings"),
        "replacements": result["replacements"],
        "load_1m": round(os.getloadavg()[0], 2),  # the machine may be shared
    }
    if "plain_labels" in extra:
        plain = np.array(extra["plain_labels"])
        figures["agreement_plain"] = float(np.mean(np.array(labels) == plain))
        figures["local_agreement_plain"] = float(np.mean(np.array(local_labels) == plain))
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=10_000, help="records (training rows for sknn)")
    parser.add_argument(
        "--case",
        action="append",
        help="only these algorithm[:protocol[:shards]], e.g. skmeans:blind:1, sknn, dbskmeans",
    )
    parser.add_argument("--control-samples", type=int, default=400)
    parser.add_argument("--no-control", action="store_true")
    parser.add_argument("--shared-loop", action="store_true", help="every node on one trio loop")
    parser.add_argument("--json", action="store_true", help="one JSON line per case")
    parser.add_argument("--raw-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_child:
        return raw_child()

    nodes_note = (
        "one process (LocalCluster, shared trio loop)"
        if args.shared_loop
        else "one process (LocalCluster, each node on its own trio thread)"
    )
    cases = [c for c in CASES if not args.case or any(_matches(c, want) for want in args.case)]
    chunks = ChunkLog()
    chunks.install()
    root = Path(tempfile.mkdtemp(prefix="dms-mine-network-"))
    code = 0
    with LocalCluster(root / "nodes", shared_loop=args.shared_loop) as cluster:
        say("starting the owner and two providers")
        bench = Bench(cluster, chunks)
        raw, tuned = RawChild(), RawStream()
        say("linked; every provider known")
        files: dict[str, dict[str, Path]] = {}
        for case in cases:
            if case.data not in files:
                folder = root / case.data
                folder.mkdir()
                files[case.data] = make_data(case.data, args.n, folder)
            name = f"{case.algorithm} {case.scheme} {case.protocol or ''} x{case.shards}"
            say(f"{name}: local")
            local = run_local(case, files[case.data])
            say(f"{name}: placed (local took {local[1]:.2f} s)")
            chunks.reset()
            try:
                placed = bench.place(case, files[case.data])
            except Exception as exc:
                say(f"{name}: {exc}")
                code = 1
                continue
            answer = placed[0]["result"]
            shipped = sum(p["mb_sent"] + p["mb_received"] for p in answer["placement"])
            raw_s, tuned_s = raw.send(int(shipped * 1e6)), tuned.send(int(shipped * 1e6))
            figures = case_figures(case, args.n, local, placed, chunks, raw_s, tuned_s, nodes_note)
            emit(figures, args.json)
            if figures["agreement"] != 1.0:
                code = 1
        if not args.no_control:
            say("control messages during a 50 MB transfer")
            emit(bench.control_during_transfer(args.control_samples, nodes_note), args.json)
        raw.close()
        tuned.close()
    return code


def _matches(case: Case, want: str) -> bool:
    parts = want.split(":")
    if parts[0] != case.algorithm:
        return False
    if len(parts) > 1 and parts[1] and parts[1] != (case.protocol or ""):
        return False
    return len(parts) < 3 or int(parts[2]) == case.shards


if __name__ == "__main__":
    sys.exit(main())
