"""The node's collaboration behaviours: several owners' joint k-means (secure aggregation).

``/dms/node/collab/propose`` (the proposer's CLI): join with its own CSV and
start a :class:`CollabSessionActor`, which places the aggregator (one
``collab`` allocation) by the ordinary bid rounds and runs the announced rounds.
``/dms/node/collab/join`` (each other owner's CLI): its own CSV, kept on its
node; only masked vectors and sealed shares leave it. ``/dms/node/collab/owner``
is what the proposer's session calls, and only it: the next message of this
node's owner. ``/dms/node/collab/result`` answers this node's centroids, its
own labels and who dropped. A role of :class:`dms.node.node.NodeActor`
(:class:`Collab`); see ``specs/mining.md``, "Collaborative k-means".
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from dms.actor import ErrorCode, Refusal, Request, behaviour
from dms.actor.runtime import NodeRuntime
from dms.errors import DmsError
from dms.files import write_private
from dms.jobs.collab import CollabParams, node_signed
from dms.jobs.mining_params import count_objects
from dms.jobs.spec import MAX_DEADLINE_S, AllocationSpec, Constraints, DeploymentSpec, Strategy
from dms.mining.collab.messages import (
    OwnerState,
    Proposal,
    Roster,
    RoundStart,
    RoundTotals,
    UnmaskRequest,
)
from dms.mining.errors import MiningError
from dms.mining.wire import decode, encode
from dms.orchestrator.collab import CollabSessionActor, OwnerCall, SessionState
from dms.orchestrator.deployment import new_deployment_id
from dms.orchestrator.requester import Sessions
from dms.orchestrator.states import COLLAB
from dms.resources import Resources

if TYPE_CHECKING:  # an owner's arithmetic (NumPy) loads when this node takes a seat
    from dms.mining.collab.owner import CollabOwner

log = logging.getLogger("dms.collab")
# An ended seat (completed, failed) or one its proposer stopped calling is kept this long
# after its last write, for its result; then its file (the owner's keys) is deleted at
# the node's next start. Neither counts against collab_max_seats.
SEAT_RETENTION_S = 7 * 24 * 3600
ROUND_OPS = frozenset({"start", "unmask", "totals"})  # an owner's work in each round


class JoinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    proposal: Proposal
    proposer: str = Field(min_length=1, max_length=128, description="the proposer's peer id")
    data: str = Field(min_length=1, description="this owner's CSV, read on its own node")


class ProposeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    proposal: Proposal
    data: str = Field(min_length=1)
    cpu: float = Field(default=1.0, gt=0, le=256)
    ram: str = "256MiB"
    strategy: Strategy = "score"
    max_price: float | None = Field(default=None, ge=0)
    timeout_s: float = Field(default=600.0, gt=0, le=MAX_DEADLINE_S)
    owner_timeout_s: float | None = Field(
        default=None, gt=0, le=3600, description="default: the collab_owner_timeout_s setting"
    )
    join_timeout_s: float | None = Field(
        default=None, gt=0, le=24 * 3600, description="default: collab_join_timeout_s"
    )
    aggregator_on_owner: bool = Field(
        default=False, description="allow the aggregator on an owner's node"
    )


class CollabId(BaseModel):
    model_config = ConfigDict(extra="forbid")
    collab_id: str = Field(min_length=1, max_length=128)


class CollabRefusal(DmsError):
    code = "bad_payload"


@dataclass
class Seat:
    """This node's owner in one collaboration."""

    owner: CollabOwner
    proposer: str
    data: str = ""  # the owner's CSV, read again after a restart
    propose: ProposeRequest | None = None  # on the proposer's node: how it was proposed
    kept: SessionState | None = None  # on the proposer's node: the session's last state
    lock: threading.Lock = field(default_factory=threading.Lock)
    error: str | None = None
    session: dict[str, Any] = field(default_factory=dict)  # the proposer's progress
    last_call: float = field(default_factory=time.monotonic)  # the proposer's latest
    cpu_s: float = 0.0  # this node's CPU on the owner's round answers (thread time)

    def ended(self) -> bool:
        phase = self.session.get("phase") or (self.kept.phase if self.kept else None)
        return self.owner.done or phase in COLLAB.terminal


class SeatFile(BaseModel):
    """One seat as kept on disk (sealed: it holds the owner's private keys)."""

    model_config = ConfigDict(extra="forbid")
    proposer: str
    data: str
    proposal: Proposal
    owner: OwnerState
    propose: ProposeRequest | None = None
    session: SessionState | None = None


class SeatStore:
    """Each seat in ``DMS_HOME/collab/<collab id>.seat`` (0600), written before each
    answer of its owner leaves: the owner's keys and where it stands, sealed (AES-GCM,
    the collaboration id as associated data) under a key that only this node's identity
    derives (HKDF of its deterministic Ed25519 signature of a fixed label). ``folder``
    None: nothing is kept (a node without a home)."""

    def __init__(self, folder: Path | None, node: NodeRuntime) -> None:
        self.folder = folder
        self.node = node
        self._key = b""

    def key(self) -> bytes:
        from dms.mining.collab import masks

        if not self._key:
            self._key = masks.derive(self.node.identity.sign(b"dms/collab/seats"), "seats")
        return self._key

    def path(self, collab_id: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{hashlib.sha256(collab_id.encode()).hexdigest()[:32]}.seat"

    def write(self, seat: Seat) -> None:
        """The seat as it is now (the caller holds its lock); a refusal if the disk
        refuses, so the answer that depends on it does not leave."""
        if self.folder is None:
            return
        from dms.mining.collab import masks

        p = seat.owner.proposal
        kept = SeatFile(
            proposer=seat.proposer,
            data=seat.data,
            proposal=p,
            owner=seat.owner.snapshot(),
            propose=seat.propose,
            session=seat.kept,
        )
        nonce = os.urandom(masks.NONCE_BYTES)
        sealed = masks.seal(self.key(), encode(kept), p.collab_id.encode(), nonce)
        text = json.dumps({"collab_id": p.collab_id, "sealed": base64.b64encode(sealed).decode()})
        try:
            write_private(self.path(p.collab_id), text)
        except OSError as exc:
            raise CollabRefusal(f"this owner's state cannot be kept: {exc}") from None

    def read_all(self) -> list[tuple[Seat | None, str]]:
        """Every kept seat, or None and why it cannot be used."""
        if self.folder is None or not self.folder.is_dir():
            return []
        paths = sorted(self.folder.glob("*.seat"))
        if not paths:
            return []
        from dms.mining.collab import masks
        from dms.mining.collab.owner import CollabOwner
        from dms.mining.data import read_table

        out: list[tuple[Seat | None, str]] = []
        for path in paths:
            try:
                if time.time() - path.stat().st_mtime > SEAT_RETENTION_S:
                    path.unlink()  # its result was there to read for a week; its keys go
                    log.info("collaboration seat %s deleted: past its retention", path.name)
                    continue
                doc = json.loads(path.read_text())
                sealed, aad = base64.b64decode(doc["sealed"]), doc["collab_id"].encode()
                kept = decode(SeatFile, masks.unseal(self.key(), sealed, aad, "the kept seat"))
                rows = read_table(kept.data).features
                me = self.node.system.peer_id
                owner = CollabOwner.restored(kept.proposal, me, rows, kept.owner, node_signed)
            except (OSError, ValueError, KeyError, TypeError, MiningError) as exc:
                out.append((None, f"{path.name}: {str(exc).splitlines()[0][:200]}"))
                continue
            seat = Seat(owner, kept.proposer, data=kept.data, propose=kept.propose)
            seat.kept = kept.session
            out.append((seat, ""))
        return out


class Collab:
    """This node's owner in collaborations: its seats, and the sessions it proposed
    (run as deployments of the requester, ``sessions``). With a ``home`` each seat is
    kept there (``SeatStore``), and :meth:`start` takes them back after a restart."""

    def __init__(
        self,
        node: NodeRuntime,
        *,
        sessions: Sessions,
        max_seats: int = 32,
        owner_timeout_s: float = 20.0,
        join_timeout_s: float = 120.0,
        home: Path | None = None,
    ) -> None:
        self.node = node
        self.seats = SeatStore(home / "collab" if home is not None else None, node)
        self.sessions = sessions
        self.max_seats = max_seats
        self.owner_timeout_s = owner_timeout_s
        self.join_timeout_s = join_timeout_s
        self._seats: dict[str, Seat] = {}

    def _seat_for(self, proposal: Proposal, proposer: str, data: str) -> Seat:
        me = self.node.system.peer_id
        if me not in proposal.owners:
            raise CollabRefusal(f"this node ({me}) is not among the proposal's owners")
        if proposal.collab_id in self._seats:
            raise CollabRefusal(f"collaboration {proposal.collab_id!r} is already joined here")
        most = self.max_seats
        if sum(self._active(seat) for seat in self._seats.values()) >= most:
            raise CollabRefusal(
                f"this node takes part in {most} collaborations already (collab_max_seats)"
            )
        from dms.mining.collab.owner import CollabOwner
        from dms.mining.data import read_table

        try:
            rows = read_table(data).features
            owner = CollabOwner(proposal, me, rows, check_node=node_signed)
            return Seat(owner, proposer, data=data)
        except MiningError as exc:
            raise CollabRefusal(str(exc)) from None

    def _active(self, seat: Seat) -> bool:
        """Whether ``seat`` holds one of this node's collab_max_seats: not ended, and its
        proposer called within the time a round may take (one that stopped calling
        may still come back: the seat stays, it just holds no place)."""
        quiet_s = max(self.join_timeout_s, 10 * self.owner_timeout_s)
        return not seat.ended() and time.monotonic() - seat.last_call < quiet_s

    def _seat(self, seat: Seat, collab_id: str) -> dict[str, Any]:
        if collab_id in self._seats:  # joined twice at once: the first one stands
            raise CollabRefusal(f"collaboration {collab_id!r} is already joined here")
        with seat.lock:
            self.seats.write(seat)  # its keys are made: they outlive a restart
        # Only once kept: a seat the disk refused is not joined (a retry may join).
        self._seats[collab_id] = seat
        return {"collab_id": collab_id, "owner": self.node.system.peer_id}

    @behaviour("/dms/node/collab/join", payload=JoinRequest)
    def collab_join(self, request: Request) -> None:
        p: JoinRequest = request.payload
        self.node.in_background(
            request,
            lambda: self._seat_for(p.proposal, p.proposer, p.data),
            then=lambda seat: self._seat(seat, p.proposal.collab_id),
        )

    @behaviour("/dms/node/collab/propose", payload=ProposeRequest)
    def collab_propose(self, request: Request) -> None:
        p: ProposeRequest = request.payload
        self.sessions.orchestration()  # no deployment store: refused before reading data
        self.node.in_background(
            request,
            lambda: self._seat_for(p.proposal, self.node.system.peer_id, p.data),
            then=lambda seat: self._start_collab(p, seat),
        )

    @staticmethod
    def _spec(p: ProposeRequest) -> DeploymentSpec:
        """The aggregator's deployment: one ``collab`` allocation, off the owners' nodes."""
        proposal = p.proposal
        params = CollabParams(proposal=proposal)
        exclude = [] if p.aggregator_on_owner else list(proposal.owners)
        return DeploymentSpec(
            name=f"collab-{proposal.collab_id}"[:64],
            allocations=[
                AllocationSpec(
                    name="aggregator",
                    executor="collab",
                    resources=Resources(cpu=p.cpu, ram=p.ram, disk="64MiB"),
                    params=params.model_dump(mode="json"),
                    constraints=Constraints(max_price=p.max_price, exclude_peers=exclude),
                )
            ],
            strategy=p.strategy,
            deadline_s=p.timeout_s,
        )

    def _start_collab(self, p: ProposeRequest, seat: Seat) -> dict[str, Any]:
        seat.propose = p
        answer = self._seat(seat, p.proposal.collab_id)
        return {**answer, "deployment": self._run_session(seat, self._spec(p), None)}

    def _run_session(self, seat: Seat, spec: DeploymentSpec, resume: SessionState | None) -> str:
        """The proposer's session, new or (``resume``) after a restart of this node."""
        assert seat.propose is not None
        p, session_id = seat.propose, new_deployment_id()

        def progress(state: dict[str, Any]) -> None:
            seat.session = state

        def keep(state: SessionState) -> None:
            with seat.lock:
                seat.kept = state
                try:
                    self.seats.write(seat)
                except CollabRefusal as exc:  # the session goes on; a restart resumes earlier
                    log.error("collaboration %s: %s", p.proposal.collab_id, exc)

        self.sessions.run(
            CollabSessionActor,
            session_id,
            spec,
            proposal=p.proposal,
            owner_timeout_s=p.owner_timeout_s or self.owner_timeout_s,
            join_timeout_s=p.join_timeout_s or self.join_timeout_s,
            on_progress=progress,
            keep=keep,
            resume=resume,
        )
        return session_id

    def start(self) -> None:
        """Take the seats kept before a restart back (each owner where it answered last);
        the proposer's collaborations that had not ended go on in a new session."""
        for seat, problem in self.seats.read_all():
            if seat is None:
                log.warning("a collaboration kept here cannot resume: %s", problem)
                continue
            collab_id = seat.owner.proposal.collab_id
            self._seats[collab_id] = seat
            kept = seat.kept
            if kept is not None and kept.phase in COLLAB.terminal:
                seat.session = {"phase": kept.phase.value, "reason": kept.reason}
                continue
            if seat.propose is None or seat.owner.done:
                continue
            if not self.sessions.places:
                log.warning("collaboration %s cannot resume: no deployment store", collab_id)
                continue
            where = f"at round {kept.next_round}" if kept else "from its setup"
            log.info("collaboration %s resumes after a restart, %s", collab_id, where)
            self._run_session(seat, self._spec(seat.propose), kept)

    @behaviour("/dms/node/collab/owner", public=True, payload=OwnerCall)
    def collab_owner(self, request: Request) -> None:
        """The proposer's session asks for this owner's next message; only it may."""
        call: OwnerCall = request.payload
        seat = self._seats.get(call.collab_id)
        if seat is None:
            raise Refusal("not_joined", f"collaboration {call.collab_id!r} is not joined here")
        if request.sender.address.host != seat.proposer:
            raise Refusal(
                ErrorCode.FORBIDDEN,
                f"only the proposer {seat.proposer} drives collaboration {call.collab_id!r}",
            )
        self.node.in_background(request, lambda: {"body": self._owner_step(seat, call)})

    def _owner_step(self, seat: Seat, call: OwnerCall) -> bytes:
        seat.last_call = time.monotonic()
        with seat.lock:
            began = time.thread_time()
            try:
                out = self._answer(seat.owner, call)
            except MiningError as exc:
                raise CollabRefusal(str(exc)) from None
            except ValueError as exc:  # a body that does not decode
                raise CollabRefusal(f"{call.op}: {str(exc).splitlines()[0]}") from None
            if call.op in ROUND_OPS:
                seat.cpu_s += time.thread_time() - began
            self.seats.write(seat)  # before the answer leaves (survives a restart)
            return out

    def _answer(self, owner: CollabOwner, call: OwnerCall) -> bytes:
        if call.body:  # counted before anything decodes it: the proposer's bytes
            p = owner.proposal
            limit = 1024 + 32 * len(p.owners) + 2 * p.length(1)
            try:
                count_objects(call.body, limit)
            except ValueError as exc:
                raise CollabRefusal(f"{call.op}: {exc}") from None
        if call.op == "advert":  # this node vouches for the owner's keys
            advert = owner.advert()
            signed = self.node.identity.sign(advert.payload())
            return encode(advert.model_copy(update={"node_signature": signed}))
        if call.op == "roster":
            return encode(owner.receive_roster(decode(Roster, call.body)))
        if call.op == "start":
            return encode(owner.contribute(decode(RoundStart, call.body)))
        if call.op == "unmask":
            return encode(owner.unmask(decode(UnmaskRequest, call.body)))
        if call.op == "totals":
            owner.receive_totals(decode(RoundTotals, call.body))
            return b""
        raise CollabRefusal(f"unknown collaboration operation {call.op!r}")

    @behaviour("/dms/node/collab/result", payload=CollabId)
    def collab_result(self, request: Request) -> dict[str, Any]:
        collab_id = request.payload.collab_id
        seat = self._seats.get(collab_id)
        if seat is None:
            raise Refusal(
                ErrorCode.NOT_FOUND,
                f"no collaboration {collab_id!r} is joined on this node: its id is the one "
                "'dms mine collab propose' printed, the proposal file's collab_id",
            )
        owner = seat.owner
        answer: dict[str, Any] = {
            "collab_id": collab_id,
            "session": seat.session,
            # The owner's own cost in the rounds since this node started: statistics,
            # masks, unmasking and their encoding (not the setup, not the seat's writes).
            "owner_cpu_s": round(seat.cpu_s, 6),
        }
        if owner.done:
            answer["phase"] = "completed"
            answer["result"] = owner.result().model_dump()
        else:
            answer["phase"] = seat.session.get("phase", "joined")
        return answer
