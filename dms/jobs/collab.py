"""The ``collab`` executor: the aggregator of a collaborative k-means, placed like any allocation.

It is interactive, like ``mining``: the proposer's collaboration session (the
requester that placed it) relays each owner's signed messages to it, one
operation at a time on ``/dms/allocation/session`` (``specs/mining.md``,
"Collaborative k-means"). It runs :class:`dms.mining.collab.CollabAggregator`,
so it sees only masked vectors, sealed shares and the totals:

    advert   KeysAdvert            -> ""
    roster   ""                    -> Roster (the adverts so far; closes them)
    accept   RosterAccepted        -> "" (the first round's live owners: those accepted)
    start    ""                    -> RoundStart of the next announced round
    input    MaskedInput           -> ""
    close    ""                    -> Closed (every live owner sent: each is asked ``request``)
    request  a survivor's id       -> that survivor's UnmaskRequest
    unmask   UnmaskReply           -> ""
    totals   ""                    -> RoundTotals (after the last round the session ends)
    resume   Resume                -> "" (a new aggregator, after adverts, roster, accepts)
    end      ""                    -> "" (the session is over)

Every message is O(m) bytes for m owners, so it travels inline in its envelope at
any size the proposal allows (the unmask requests of all survivors together are
O(m^2): each is asked for alone).

A message that breaks the protocol is refused with the reason and never
summed; too few owners left fails the allocation with the reason, naming who
dropped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from dms.errors import EXTRA_KEY
from dms.jobs.base import ExecutorError, InteractiveExecutor, Log, register_executor
from dms.jobs.mining_params import count_objects, decode_message
from dms.mining.collab.errors import CollabFailed
from dms.mining.collab.messages import (
    KeysAdvert,
    MaskedInput,
    Proposal,
    Resume,
    RosterAccepted,
    RoundTotals,
    UnmaskReply,
    UnmaskRequest,
)
from dms.mining.errors import MiningError
from dms.mining.wire import encode
from dms.security.identity import IdentityError, public_key_from_peer_id, verify_signature

M = TypeVar("M", bound=BaseModel)
MIB = 1024 * 1024
BASE_BYTES = 64 * MIB


class CollabParams(BaseModel):
    """What the aggregator allocation will run: the announced proposal, nothing else."""

    model_config = ConfigDict(extra="forbid")
    proposal: Proposal

    def estimated_bytes(self) -> int:
        p = self.proposal
        m = len(p.owners)
        per_round = m * (8 * (p.k * p.a + p.k) + 200 * m)  # inputs and sealed shares
        return BASE_BYTES + 2 * per_round


class CollabEnded(ExecutorError):
    """The collaboration cannot go on: replied as ``collab_failed``, not as a refused
    message (``bad_payload``) nor a lost allocation."""

    code = "collab_failed"


class Closed(BaseModel):
    """A round's inputs are closed, every live owner's in (a missing one ends the
    collaboration instead): each is asked ``request`` for its unmask request."""

    model_config = ConfigDict(extra="forbid")
    survivors: list[str]


def node_signed(owner: str, payload: bytes, signature: bytes) -> None:
    """``signature`` over ``payload`` is by the node key whose peer id is ``owner`` (an
    owner's keys advert: its node vouches for them), else ``MiningError`` with why."""
    try:
        public = public_key_from_peer_id(owner)
    except IdentityError:
        raise MiningError(f"{owner[:64]!r} is not a node's peer id") from None
    if not verify_signature(public, signature, payload):
        raise MiningError(f"its keys are not signed by the node {owner}")


def parse_params(params: dict[str, Any]) -> CollabParams:
    try:
        return CollabParams.model_validate(params)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ExecutorError(
            f"collab params: {where}: {err['msg']}",
            field=f"params.{where}",
            key=err["type"] == EXTRA_KEY,
        ) from None


class CollabSession:
    """The aggregator's side of one collaboration: operations in, answers out."""

    def __init__(self, params: CollabParams, log: Log) -> None:
        from dms.mining.collab.aggregator import CollabAggregator  # NumPy: when one runs

        self.proposal = params.proposal
        self.aggregator = CollabAggregator(params.proposal, check_node=node_signed)
        self._log = log
        self.finished = threading.Event()
        self.failure: str | None = None
        self.cpu_s = 0.0
        self._ops: dict[str, Callable[[bytes], bytes]] = {
            "advert": self._advert,
            "roster": lambda _: encode(self.aggregator.roster()),
            "accept": self._accept,
            "start": lambda _: encode(self.aggregator.start_round()),
            "input": self._input,
            "close": self._close,
            "request": self._request,
            "unmask": self._unmask,
            "totals": self._totals,
            "end": self._end,
            "resume": self._resume,
        }
        self._requests: dict[str, UnmaskRequest] = {}

    def admit(self, op: str, size: int, context_size: int | None, ram_bytes: int | None) -> None:
        """Declared sizes, before anything is fetched: no context, and no message larger
        than the proposal allows (a vector, a sealed share and key per owner, a margin)."""
        if context_size is not None:
            raise ExecutorError(f"a collaboration takes no context (sent with {op!r})")
        p = self.proposal
        largest = 8 * max(p.length(0), p.length(1)) + 512 * len(p.owners) + 64 * 1024
        if size > largest or (ram_bytes is not None and size > ram_bytes):
            raise ExecutorError(
                f"a {op!r} of {size} bytes; this collaboration's messages are at most "
                f"{largest}: refused before fetching it"
            )

    def check_body(self, body: bytes) -> None:
        """A fetched body, before anything decodes it: no more MessagePack objects than
        this collaboration's largest message holds (a restore: every owner's keys and a
        share to each owner)."""
        if not body:
            return
        m = len(self.proposal.owners)
        try:
            count_objects(body, 1024 + 32 * m + 4 * m * m)
        except ValueError as exc:
            raise ExecutorError(f"the relayed message: {exc}") from None

    def call(self, op: str, body: bytes) -> bytes:
        handler = self._ops.get(op)
        if handler is None:
            known = ", ".join(self._ops)
            raise ExecutorError(f"unknown collab operation {op!r} (known: {known})")
        if self.failure is not None or self.finished.is_set():
            raise CollabEnded(self.failure or "the collaboration has ended")
        cpu = time.thread_time()
        try:
            return handler(body)
        except CollabFailed as exc:
            # The allocation keeps running until the session that placed it has this
            # answer and stops it: ended at once, it could be taken for a lost aggregator.
            self.failure = exc.reason
            self._log(f"failed: {exc.reason}")
            raise CollabEnded(exc.reason) from None
        except MiningError as exc:  # a refusal: the message is not used
            self._log(f"{op} refused: {exc}")
            raise ExecutorError(str(exc)) from None
        finally:
            self.cpu_s += time.thread_time() - cpu

    def _advert(self, body: bytes) -> bytes:
        self.aggregator.receive_advert(decode_message(KeysAdvert, body))
        return b""

    def _accept(self, body: bytes) -> bytes:
        self.aggregator.receive_accept(decode_message(RosterAccepted, body))
        return b""

    def _input(self, body: bytes) -> bytes:
        self.aggregator.receive_input(decode_message(MaskedInput, body))
        return b""

    def _unmask(self, body: bytes) -> bytes:
        self.aggregator.receive_unmask(decode_message(UnmaskReply, body))
        return b""

    def _close(self, _: bytes) -> bytes:
        self._requests = self.aggregator.close_inputs()  # CollabFailed if an input is missing
        return encode(Closed(survivors=list(self._requests)))

    def _request(self, body: bytes) -> bytes:
        owner = body.decode(errors="replace")
        request = self._requests.get(owner)
        if request is None:
            raise MiningError(f"no unmask request for {owner[:64]!r} in this round")
        return encode(request)

    def _resume(self, body: bytes) -> bytes:
        self.aggregator.resume(decode_message(Resume, body))
        self._log(f"resumed: round {self.aggregator.round} starts again")
        return b""

    def _totals(self, _: bytes) -> bytes:
        totals: RoundTotals = self.aggregator.finish_round()
        self._log(f"round {totals.round}: {len(totals.survivors)} owners summed")
        return encode(totals)

    def _end(self, _: bytes) -> bytes:
        self.finished.set()
        return b""

    def summary(self) -> dict[str, Any]:
        a = self.aggregator
        return {
            "rounds": len(a.totals),
            "dropped": [d.model_dump() for d in a.dropped],
            "cpu_s": round(self.cpu_s, 3),
        }


@register_executor
class CollabExecutor(InteractiveExecutor[CollabSession]):
    kind = "collab"
    role = "aggregator"

    def params(self, params: dict[str, Any]) -> CollabParams:
        return parse_params(params)

    def session(self, params: dict[str, Any], log: Log) -> CollabSession:
        return CollabSession(parse_params(params), log)

    def failure(self, session: CollabSession) -> str | None:
        return session.failure
