"""The mining owner's role in the node: the data owner asks its own node to mine on others.

``/dms/node/mining/new`` reads the data, builds the owner's driver and a
deployment of one ``mining`` allocation per shard, and starts a
:class:`MiningSessionActor` (a child, listed with the node's deployments).
``status`` and ``result`` read the session's row in the store, so they answer
after the session has ended too. A role of :class:`dms.node.node.NodeActor`
(:class:`MiningOwner`); see ``specs/mining.md``, "Placed on other nodes".
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from dms.actor import ErrorCode, Refusal, Request, behaviour
from dms.actor.runtime import NodeRuntime
from dms.errors import DmsError
from dms.jobs.mining_params import MiningParams
from dms.jobs.spec import (
    MAX_DEADLINE_S,
    AllocationSpec,
    Constraints,
    DeploymentSpec,
    Strategy,
)
from dms.mining.errors import MiningError
from dms.mining.settings import MiningSettings
from dms.network.host import Libp2pTransport
from dms.network.transfer import Courier
from dms.orchestrator.deployment import new_deployment_id
from dms.orchestrator.mining import MiningSessionActor, SessionLimits
from dms.orchestrator.records import MiningRow
from dms.orchestrator.requester import Sessions
from dms.orchestrator.states import SessionPhase
from dms.orchestrator.stored import UNREADABLE, describe
from dms.resources import Resources
from dms.store import STORE_ERRORS, STORE_RETRY

if TYPE_CHECKING:  # the owner's side (NumPy, TenSEAL) loads with its first job: ``_plan``
    from dms.mining.placed import Driver
    from dms.mining.schemes import OwnerKeys

log = logging.getLogger("dms.node")
MIB = 1024 * 1024
_RESULT = ("result", "labels")  # a completed session's columns its result is read from


class MiningRequest(BaseModel):
    """What the owner's CLI sends its node (``dms mine ...`` without ``--local``)."""

    model_config = ConfigDict(extra="forbid")

    settings: MiningSettings
    data: str | None = Field(default=None, description="CSV of records (k-means)")
    train: str | None = Field(default=None, description="CSV of training rows (k-NN)")
    test: str | None = Field(default=None, description="CSV of queries (k-NN)")
    label_column: str | None = None
    # The owner's secret key from --keys: it stays in this node's memory, never stored
    # and never sent on. Without it the session makes fresh keys.
    keys: bytes | None = None
    strategy: Strategy = "score"
    max_price: float | None = Field(default=None, ge=0)
    timeout_s: float = Field(default=120.0, gt=0, le=MAX_DEADLINE_S)
    cpu: float = Field(default=1.0, gt=0, le=256)


class SessionId(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=64)


def _keys(request: MiningRequest) -> OwnerKeys | None:
    from dms.mining.schemes.ckks import CkksKeys
    from dms.mining.schemes.liu import LiuKey

    s = request.settings
    if request.keys is None or s.plaintext:
        return None
    try:
        if s.scheme == "ckks":
            return CkksKeys.from_secret_bytes(request.keys, s.level)
        return LiuKey.from_bytes(request.keys)
    except MiningError:
        raise
    except Exception as exc:
        raise MiningError(f"the keys sent are not {s.scheme} keys ({type(exc).__name__})") from None


class MiningRequestError(DmsError):
    """The data, keys or settings of a mining request cannot be used."""

    code = "bad_payload"


def plan(request: MiningRequest) -> tuple[Driver, DeploymentSpec, list[int], dict[str, Any]]:
    """Read the data and build the owner's driver and the deployment: slow (reads files,
    loads keys), so it runs off the mailbox."""
    try:
        return _plan(request)
    except MiningError as exc:
        raise MiningRequestError(str(exc)) from None


def _plan(request: MiningRequest) -> tuple[Driver, DeploymentSpec, list[int], dict[str, Any]]:
    from dms.mining.data import read_table, read_test_table
    from dms.mining.placed import ClusterDriver, KnnDriver, PlainDriver, shard_sizes

    s = request.settings
    keys = _keys(request)
    queries = 0
    if s.algorithm in ("kmeans", "skmeans", "dbskmeans"):
        if request.data is None:
            raise MiningError(f"{s.algorithm} needs --data")
        table = read_table(request.data)
        rows, attributes = table.features.shape
        if s.k > rows:
            raise MiningError(f"k = {s.k} clusters for {rows} records")
        if s.plaintext:
            driver: Driver = PlainDriver(s, table.features)
        else:
            driver = ClusterDriver(s, table.features, keys)
        records = rows
    else:
        if request.train is None or request.test is None:
            raise MiningError(f"{s.algorithm} needs --train and --test")
        training = read_table(request.train, label=True, label_column=request.label_column)
        tests = read_test_table(request.test, training)
        assert training.labels is not None
        rows, attributes = training.features.shape
        queries = tests.features.shape[0]
        if s.k > rows:
            raise MiningError(f"k = {s.k} neighbours for {rows} training records")
        if s.plaintext:
            driver = PlainDriver(s, training.features, training.labels, tests.features)
        else:
            driver = KnnDriver(s, training.features, training.labels, tests.features, keys)
        records = queries
    sizes = shard_sizes(s, rows)  # one allocation per worker
    allocations = []
    for i, n in enumerate(sizes):
        params = MiningParams(
            algorithm=s.algorithm,
            scheme="plain" if s.plaintext else s.scheme,
            level=s.level,
            k=s.k,
            n=n,
            a=attributes,
            queries=queries,
            distance=s.distance,
            protocol=s.protocol or "udm",
        )
        ram = math.ceil(params.estimated_bytes() / MIB)
        allocations.append(
            AllocationSpec(
                name=f"shard{i}",
                executor="mining",
                resources=Resources(cpu=request.cpu, ram=f"{ram}MiB", disk=f"{max(64, ram)}MiB"),
                params=params.model_dump(),
                constraints=Constraints(max_price=request.max_price),
            )
        )
    spec = DeploymentSpec(
        name=f"mine-{s.algorithm}",
        allocations=allocations,
        strategy=request.strategy,
        deadline_s=request.timeout_s,
        distinct_peers=True,
    )
    summary = {
        "algorithm": s.algorithm,
        "scheme": "plain" if s.plaintext else s.scheme,
        "distance": s.distance,
        "k": s.k,
        "records": records,
        "attributes": attributes,
        "shards": s.shards,
        "protocol": "plain" if s.plaintext else (s.protocol or "udm"),
    }
    return driver, spec, sizes, summary


class MiningOwner:
    """The data owner's mining sessions, placed on other nodes as deployments of the
    requester (``sessions``); their chunks go through ``courier``."""

    def __init__(
        self,
        node: NodeRuntime,
        *,
        sessions: Sessions,
        courier: Courier | None,
        limits: SessionLimits,
        network: Libp2pTransport | None = None,
    ) -> None:
        self.node = node
        self.sessions = sessions
        self.courier = courier
        self.limits = limits
        self.network = network

    @behaviour("/dms/node/mining/new", payload=MiningRequest, data=True)
    def mining_new(self, request: Request) -> None:
        payload: MiningRequest = request.payload
        if self.courier is None or not self.sessions.places:
            raise Refusal(ErrorCode.UNKNOWN_BEHAVIOUR, "this node cannot place mining work")
        self.node.in_background(request, lambda: plan(payload), then=self._start_session)

    def _start_session(self, planned: Any) -> dict[str, Any]:
        driver, spec, sizes, summary = planned
        session_id = new_deployment_id()
        # The row exists before the reply, so a status asked at once finds it. Refused,
        # the owner's command is refused with the store's reason, and nothing starts.
        self.sessions.orchestration().store.save_mining(
            MiningRow(session_id, summary["algorithm"], SessionPhase.PLACING.value)
        )
        try:
            self.sessions.run(
                MiningSessionActor,
                session_id,
                spec,
                driver=driver,
                courier=self.courier,
                shard_rows=sizes,
                summary=summary,
                limits=self.limits,
                path_to=self.network.path_to if self.network else None,
            )
        except Exception as exc:
            # Not started (its deployment's first save found the store busy, the owner's
            # command refused saying so): the row saved above, left as it was, read
            # ``placing`` for ever. It is failed with the reason, after the answer.
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.node.call_later(0.0, lambda: self._never_started(session_id, why))
            raise
        # What the worker learns is the session's first event, which the log has too.
        log.info(
            "mining session %s: %s (%s, %s) over %d record(s) in %d shard(s), being placed",
            session_id, summary["algorithm"], summary["scheme"], summary["protocol"],
            summary["records"], len(sizes),
        )  # fmt: skip
        return {"id": session_id, "shards": len(sizes), "rows": sizes}

    def _never_started(
        self, session_id: str, why: str, wait_s: float = STORE_RETRY.first_s
    ) -> None:
        """Fail the row of a session that never started; a store that still refuses is
        asked again later (``STORE_RETRY``), until it takes the row."""
        reason = f"the session did not start: {why}"
        row = MiningRow(
            session_id,
            phase=SessionPhase.FAILED.value,
            progress={"phase": SessionPhase.FAILED.value, "reason": reason},
        )
        try:
            self.sessions.orchestration().store.save_mining(row)
        except STORE_ERRORS as exc:
            log.warning("mining session %s: its failure not saved (%s); again in %g s",
                        session_id, exc, wait_s)  # fmt: skip
            later = STORE_RETRY.after(wait_s)
            self.node.call_later(wait_s, lambda: self._never_started(session_id, why, later))

    @behaviour("/dms/node/mining/status", payload=SessionId)
    def mining_status(self, request: Request) -> dict[str, Any]:
        row = self.sessions.orchestration().store.mining(request.payload.id)
        if row is None:
            raise Refusal(ErrorCode.NOT_FOUND, f"no mining session {request.payload.id!r}")
        return {
            "id": row.id,
            "algorithm": row.algorithm,
            "phase": row.phase,
            "progress": row.progress,
            "checkpoint": row.checkpoint,
            # Why parts of its stored row cannot be read (None: all can), those parts
            # shown empty (dms.orchestrator.stored).
            "unreadable": describe(row.unreadable) or None,
        }

    @behaviour("/dms/node/mining/result", payload=SessionId, data=True)
    def mining_result(self, request: Request) -> dict[str, Any]:
        store = self.sessions.orchestration().store
        row = store.mining(request.payload.id, labels=True)
        if row is None:
            raise Refusal(ErrorCode.NOT_FOUND, f"no mining session {request.payload.id!r}")
        if row.phase != SessionPhase.COMPLETED:
            raise Refusal("not_ready", f"the session is {row.phase}, not completed")
        problems = {c: why for c, why in (row.unreadable or {}).items() if c in _RESULT}
        if problems:
            raise Refusal(
                UNREADABLE, f"the session's stored result could not be read: {describe(problems)}"
            )
        return {"id": row.id, "result": row.result, "labels": row.labels}
