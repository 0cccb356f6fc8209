"""The ``mining`` executor: the worker side of encrypted mining, driven by the data owner.

It is interactive. The allocation stays running while the owner's mining
session invokes ``/dms/allocation/session`` with one operation at a time
(``specs/mining.md``, "Placed on other nodes"):

    start   the opening message (ClusterStart / KnnStart) -> builds the worker
    step    an optional ClusterUpdate -> applies it, computes the next round
    query   a KnnQuery -> the encrypted distances
    run     plaintext kmeans / knn placed as they are (the worker sees the data)
    finish  the session is over: the executor returns and the allocation completes

The parameters are small and say what the worker must expect
(``dms.jobs.mining_params``). Everything it receives is checked against them: a
context at another security level, a context that holds a secret key, or rows,
attributes or clusters other than announced are refused with a reason, before any
work. The worker itself (``dms.jobs.mining_worker``: NumPy and TenSEAL) loads when a
session starts, so a node that only bids, or never mines, does not load them.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from dms.jobs.base import ExecutorError, InteractiveExecutor, Log, register_executor
from dms.jobs.mining_params import MIB, MiningParams, admit_context, count_objects, parse_params
from dms.mining.errors import MiningError

OPS = ("start", "step", "query", "run", "finish")


class MiningSession:
    """One allocation's worker: operations in, answers out, until ``finish`` or stop."""

    def __init__(self, params: MiningParams, log: Log) -> None:
        from dms.jobs.mining_worker import Ops  # NumPy and TenSEAL: when a session starts

        self.params = params
        self._ops = Ops(params)
        self._log = log
        self.finished = threading.Event()
        self.compute_s = 0.0
        self.cpu_s = 0.0

    def admit(self, op: str, size: int, context_size: int | None, ram_bytes: int | None) -> None:
        """Declared sizes, before anything is fetched: a context only with a CKKS start,
        within what the job's level needs; the whole call within the lease's memory."""
        if context_size is not None:
            if op != "start" or self.params.scheme != "ckks":
                raise ExecutorError(f"a context comes only with a CKKS job's start, not {op!r}")
            admit_context(context_size, self.params.level, ram_bytes)
        total = size + (context_size or 0)
        if ram_bytes is not None and total > ram_bytes:
            raise ExecutorError(
                f"a '{op}' of {total / MIB:.1f} MiB, more than the lease's "
                f"{ram_bytes / MIB:.0f} MiB of memory: refused before fetching it"
            )

    def check_body(self, body: bytes) -> None:
        """An operation's body, fetched, before anything decodes it: no more MessagePack
        objects than the job's shape holds (a hostile owner's decode bomb is refused for
        what walking it costs, not for what decoding it would)."""
        if not body:
            return
        try:
            count_objects(body, self.params.message_objects())
        except ValueError as exc:
            raise ExecutorError(f"the owner's message: {exc}") from None

    def call(self, op: str, body: bytes) -> bytes:
        if op not in OPS:
            raise ExecutorError(f"unknown session operation {op!r} (known: {', '.join(OPS)})")
        if self.finished.is_set():
            raise ExecutorError("the session has finished")
        if op == "finish":
            self.finished.set()
            return b""
        began, cpu = time.perf_counter(), time.thread_time()
        try:
            out: bytes = getattr(self._ops, op)(body)
        except MiningError as exc:
            raise ExecutorError(str(exc)) from None
        finally:
            self.compute_s += time.perf_counter() - began
            self.cpu_s += time.thread_time() - cpu
        if op == "step":
            self._log(f"round {self._ops.rounds} computed")
        elif op in ("start", "run"):
            self._log(f"{op}: {len(body) / MIB:.1f} MiB received")
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "rounds": self._ops.rounds,
            "queries": self._ops.queries,
            "compute_s": round(self.compute_s, 3),
            "cpu_s": round(self.cpu_s, 3),
        }


@register_executor
class MiningExecutor(InteractiveExecutor[MiningSession]):
    kind = "mining"
    role = "job"

    def params(self, params: dict[str, Any]) -> MiningParams:
        return parse_params(params)

    def session(self, params: dict[str, Any], log: Log) -> MiningSession:
        return MiningSession(parse_params(params), log)
