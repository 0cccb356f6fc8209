"""A hostile mining provider for the tests and ``bench/adversary_mining.py``.

:class:`HostileExecutor` stands in for the ``mining`` executor of every node of the
process (``EXECUTORS["mining"]``). Each session it makes takes the next behaviour of
its script (``honest`` included); once the script is spent it is honest. Every session
keeps what the owner sent it (``received``). A hostile session does its ``start``
honestly (it takes the job's data as any worker would), then at its first step or query:

- ``stall``: never answers (until :meth:`HostileExecutor.release`);
- ``size_bomb``: answers ``bomb_mb`` MiB of zeros, one chunk repeated in its manifest;
- ``decode_bomb``: 3 MB of MessagePack that decode to 3 million dicts;
- ``garbage``: the answer's fields, with ciphertexts that are not.

The lies (blind k-means) compute each step honestly, then rewrite the answer; they are
well-formed enough to pass the owner's size checks unless said otherwise:

- ``doubled``: every ciphertext added to itself (same size, level, scale; every
  distance wrong: only the owner's spot checks, after decryption, can tell);
- ``shift_one_record``: record 17's distance to cluster 1 pulled down (it would change
  cluster);
- ``replay``: from round 2 on, the first round's distances under the current round;
- ``top_level``: a ciphertext at the top level (two primes, the wrong size);
- ``other_scale``: a product left unrescaled (two primes, scale 2^100).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import msgpack
import numpy as np
import tenseal as ts

from dms.jobs.base import Log
from dms.jobs.mining import MiningExecutor, MiningSession
from dms.jobs.mining_params import MiningParams
from dms.mining.blind_kmeans import BlindClusterRound, BlindClusterWorker
from dms.mining.wire import decode, encode

# A lie rewrites ``answer`` in place; ``kept`` holds this session's earlier honest answers.
Lie = Callable[[BlindClusterWorker, BlindClusterRound, list[BlindClusterRound]], None]


def doubled(worker: BlindClusterWorker, answer: BlindClusterRound, _: Any) -> None:
    answer.ciphertexts = [
        [(v + v).serialize() for v in (ts.ckks_vector_from(worker.context, c) for c in row)]
        for row in answer.ciphertexts
    ]


def shift_one_record(worker: BlindClusterWorker, answer: BlindClusterRound, _: Any) -> None:
    cipher = ts.ckks_vector_from(worker.context, answer.ciphertexts[1][0])
    bump = np.zeros(worker.slots)
    bump[17] = -0.5
    answer.ciphertexts[1][0] = (cipher + bump.tolist()).serialize()


def replay(worker: BlindClusterWorker, answer: BlindClusterRound, kept: list[Any]) -> None:
    if kept:
        answer.ciphertexts = kept[0].ciphertexts


def top_level(worker: BlindClusterWorker, answer: BlindClusterRound, _: Any) -> None:
    answer.ciphertexts[0][0] = worker.columns[0][0].serialize()  # two primes, 251 KB


def other_scale(worker: BlindClusterWorker, answer: BlindClusterRound, _: Any) -> None:
    worker.context.auto_rescale = False
    try:
        answer.ciphertexts[0][0] = (worker.columns[0][0] * worker.columns[1][0]).serialize()
    finally:
        worker.context.auto_rescale = True


LIES: dict[str, Lie] = {
    "doubled": doubled,
    "shift_one_record": shift_one_record,
    "replay": replay,
    "top_level": top_level,
    "other_scale": other_scale,
}
BEHAVIOURS = ("stall", "size_bomb", "decode_bomb", "garbage", *LIES)


class HostileSession(MiningSession):
    def __init__(
        self, params: MiningParams, log: Log, how: str, release: threading.Event, bomb_mb: int
    ) -> None:
        super().__init__(params, log)
        self.how, self.release, self.bomb_mb = how, release, bomb_mb
        self.received: list[tuple[str, bytes]] = []  # every (op, body) the owner sent
        self.kept: list[BlindClusterRound] = []  # this session's honest step answers

    def call(self, op: str, body: bytes) -> bytes:
        self.received.append((op, body))
        if op not in ("step", "query") or self.how == "honest":
            return super().call(op, body)
        if self.how == "stall":
            self.release.wait(600)
            return b""
        if self.how == "size_bomb":
            return bytes(self.bomb_mb * 1024 * 1024)
        if self.how == "decode_bomb":
            return b"\xdd" + (3_000_000).to_bytes(4, "big") + b"\x80" * 3_000_000
        if self.how in LIES:
            return self._lie(LIES[self.how], super().call(op, body))
        answer = {"exchange": 1, "ciphertexts": [[b"not a ciphertext"]] * self.params.k}
        return msgpack.packb(answer, use_bin_type=True)

    def _lie(self, lie: Lie, honest: bytes) -> bytes:
        worker = self._ops.cluster
        assert isinstance(worker, BlindClusterWorker), "the lies are for blind k-means"
        answer = decode(BlindClusterRound, honest)
        kept = answer.model_copy(deep=True)
        lie(worker, answer, self.kept)
        self.kept.append(kept)
        return encode(answer)


class HostileExecutor(MiningExecutor):
    def __init__(self, script: Iterable[str], bomb_mb: int = 64) -> None:
        self.script = deque(script)
        unknown = set(self.script) - {*BEHAVIOURS, "honest"}
        if unknown:
            raise ValueError(f"unknown behaviours {sorted(unknown)}: known {BEHAVIOURS}")
        self.bomb_mb = bomb_mb
        self.made: list[str] = []  # each session's behaviour, 'honest' or the script's
        self.sessions: list[HostileSession] = []  # in the order they were made
        self._release = threading.Event()
        self._lock = threading.Lock()

    def session(self, params: dict[str, Any], log: Log) -> MiningSession:
        honest = super().session(params, log)
        with self._lock:
            how = self.script.popleft() if self.script else "honest"
            made = HostileSession(honest.params, log, how, self._release, self.bomb_mb)
            self.made.append(how)
            self.sessions.append(made)
        return made

    def release(self) -> None:
        """Let every stalled session go (they answer nothing)."""
        self._release.set()
