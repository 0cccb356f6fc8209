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

import threading
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dms.actor import ErrorCode, Refusal, Request, behaviour
from dms.actor.runtime import NodeRuntime
from dms.errors import DmsError
from dms.jobs.collab import CollabParams, node_signed
from dms.jobs.spec import AllocationSpec, Constraints, DeploymentSpec, Strategy
from dms.mining.collab import CollabOwner, Proposal
from dms.mining.collab.messages import Roster, RoundStart, RoundTotals, UnmaskRequest
from dms.mining.data import read_table
from dms.mining.errors import MiningError
from dms.mining.wire import decode, encode
from dms.orchestrator.collab import CollabSessionActor, OwnerCall
from dms.orchestrator.deployment import new_deployment_id
from dms.orchestrator.requester import Sessions
from dms.resources import Resources


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
    timeout_s: float = Field(default=600.0, gt=0, le=7 * 24 * 3600)
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
    lock: threading.Lock = field(default_factory=threading.Lock)
    error: str | None = None
    session: dict[str, Any] = field(default_factory=dict)  # the proposer's progress


class Collab:
    """This node's owner in collaborations: its seats, and the sessions it proposed
    (run as deployments of the requester, ``sessions``)."""

    def __init__(
        self,
        node: NodeRuntime,
        *,
        sessions: Sessions,
        max_seats: int = 32,
        owner_timeout_s: float = 20.0,
        join_timeout_s: float = 120.0,
    ) -> None:
        self.node = node
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
        if len(self._seats) >= most:
            raise CollabRefusal(
                f"this node takes part in {most} collaborations already (collab_max_seats)"
            )
        try:
            rows = read_table(data).features
            return Seat(CollabOwner(proposal, me, rows, check_node=node_signed), proposer)
        except MiningError as exc:
            raise CollabRefusal(str(exc)) from None

    def _seat(self, seat: Seat, collab_id: str) -> dict[str, Any]:
        if collab_id in self._seats:  # joined twice at once: the first one stands
            raise CollabRefusal(f"collaboration {collab_id!r} is already joined here")
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

    def _start_collab(self, p: ProposeRequest, seat: Seat) -> dict[str, Any]:
        proposal = p.proposal
        params = CollabParams(proposal=proposal)
        exclude = [] if p.aggregator_on_owner else list(proposal.owners)
        spec = DeploymentSpec(
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
        answer = self._seat(seat, proposal.collab_id)
        session_id = new_deployment_id()

        def progress(state: dict[str, Any]) -> None:
            seat.session = state

        self.sessions.run(
            CollabSessionActor,
            session_id,
            spec,
            proposal=proposal,
            owner_timeout_s=p.owner_timeout_s or self.owner_timeout_s,
            join_timeout_s=p.join_timeout_s or self.join_timeout_s,
            on_progress=progress,
        )
        return {**answer, "deployment": session_id}

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
        owner = seat.owner
        with seat.lock:
            try:
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
            except MiningError as exc:
                raise CollabRefusal(str(exc)) from None
            except ValueError as exc:  # a body that does not decode
                raise CollabRefusal(f"{call.op}: {str(exc).splitlines()[0]}") from None
        raise CollabRefusal(f"unknown collaboration operation {call.op!r}")

    @behaviour("/dms/node/collab/result", payload=CollabId)
    def collab_result(self, request: Request) -> dict[str, Any]:
        collab_id = request.payload.collab_id
        seat = self._seats.get(collab_id)
        if seat is None:
            raise Refusal("unknown", f"collaboration {collab_id!r} is not joined here")
        owner = seat.owner
        answer: dict[str, Any] = {"collab_id": collab_id, "session": seat.session}
        if owner.done:
            answer["phase"] = "completed"
            answer["result"] = owner.result().model_dump()
        else:
            answer["phase"] = seat.session.get("phase", "joined")
        return answer
