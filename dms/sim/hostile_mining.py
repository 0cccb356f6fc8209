"""A hostile mining provider for the tests and ``bench/adversary_mining.py``.

:class:`HostileExecutor` stands in for the ``mining`` executor of every node of the
process (``EXECUTORS["mining"]``). Each session it makes takes the next behaviour of
its script (``honest`` included); once the script is spent it is honest. A hostile session does its
``start`` honestly (it takes the job's data as any worker would), then at its first
step or query:

- ``stall``: never answers (until :meth:`HostileExecutor.release`);
- ``size_bomb``: answers ``bomb_mb`` MiB of zeros, one chunk repeated in its manifest;
- ``decode_bomb``: 3 MB of MessagePack that decode to 3 million dicts;
- ``garbage``: the answer's fields, with ciphertexts that are not;
- ``doubled`` (blind k-means): its honest answer with every ciphertext added to itself,
  well-formed (same size, level, scale) but every distance wrong: only the owner's spot
  checks, after decryption, can tell.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from typing import Any

import msgpack
import tenseal as ts

from dms.jobs.base import Log
from dms.jobs.mining import MiningExecutor, MiningParams, MiningSession
from dms.mining.blind_kmeans import BlindClusterWorker

BEHAVIOURS = ("stall", "size_bomb", "decode_bomb", "garbage", "doubled")


class HostileSession(MiningSession):
    def __init__(
        self, params: MiningParams, log: Log, how: str, release: threading.Event, bomb_mb: int
    ) -> None:
        super().__init__(params, log)
        self.how, self.release, self.bomb_mb = how, release, bomb_mb

    def call(self, op: str, body: bytes) -> bytes:
        if op not in ("step", "query"):
            return super().call(op, body)
        if self.how == "stall":
            self.release.wait(600)
            return b""
        if self.how == "size_bomb":
            return bytes(self.bomb_mb * 1024 * 1024)
        if self.how == "decode_bomb":
            return b"\xdd" + (3_000_000).to_bytes(4, "big") + b"\x80" * 3_000_000
        if self.how == "doubled":
            return self._doubled(super().call(op, body))
        answer = {"exchange": 1, "ciphertexts": [[b"not a ciphertext"]] * self.params.k}
        return msgpack.packb(answer, use_bin_type=True)

    def _doubled(self, honest: bytes) -> bytes:
        worker = self._ops.cluster
        assert isinstance(worker, BlindClusterWorker), "doubled is for blind k-means"
        answer = msgpack.unpackb(honest, raw=False)
        answer["ciphertexts"] = [
            [(v + v).serialize() for v in (ts.ckks_vector_from(worker.context, c) for c in row)]
            for row in answer["ciphertexts"]
        ]
        return msgpack.packb(answer, use_bin_type=True)


class HostileExecutor(MiningExecutor):
    def __init__(self, script: Iterable[str], bomb_mb: int = 64) -> None:
        self.script = deque(script)
        unknown = set(self.script) - {*BEHAVIOURS, "honest"}
        if unknown:
            raise ValueError(f"unknown behaviours {sorted(unknown)}: known {BEHAVIOURS}")
        self.bomb_mb = bomb_mb
        self.made: list[str] = []  # each session's behaviour, 'honest' or the script's
        self._release = threading.Event()
        self._lock = threading.Lock()

    def session(self, params: dict[str, Any], log: Log) -> MiningSession:
        honest = super().session(params, log)
        with self._lock:
            how = self.script.popleft() if self.script else "honest"
            self.made.append(how)
        if how == "honest":
            return honest
        return HostileSession(honest.params, log, how, self._release, self.bomb_mb)

    def release(self) -> None:
        """Let every stalled session go (they answer nothing)."""
        self._release.set()
