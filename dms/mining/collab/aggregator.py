"""The aggregator: relays sealed shares, sums masked vectors, removes the masks, learns totals.

It never holds an owner's statistics in the clear: each input carries a self
mask only that owner's seed removes, and pairwise masks that cancel only in
the sum over all the live owners. After the inputs of a round close, if an
owner's input is missing the collaboration stops (no mask key is ever opened,
and no round is summed over fewer owners than another). Otherwise it asks each
owner for its shares of every owner's self-mask seed; with ``threshold``
answers it rebuilds those (checking each against a commitment), and the total
is ``sum(inputs) - self masks``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from dms.mining.collab import masks, ring, shamir
from dms.mining.collab.errors import CollabFailed, Refused
from dms.mining.collab.messages import (
    Dropout,
    KeysAdvert,
    MaskedInput,
    NodeCheck,
    Proposal,
    Restore,
    Resume,
    Roster,
    RosterAccepted,
    RoundStart,
    RoundTotals,
    UnmaskReply,
    UnmaskRequest,
)
from dms.mining.collab.owner import self_seed
from dms.mining.errors import MiningError


class CollabAggregator:
    def __init__(self, proposal: Proposal, check_node: NodeCheck | None = None) -> None:
        self.proposal = proposal
        self._check_node = check_node  # each advert signed by its owner's node
        self.adverts: dict[str, KeysAdvert] = {}
        self._roster: list[str] | None = None
        self._accepted: set[str] = set()  # owners that took the roster
        self.dropped: list[Dropout] = []
        self.round = proposal.first_round()
        self._live: list[str] | None = None
        self._open = False
        self._inputs: dict[str, MaskedInput] = {}
        self._request: dict[str, UnmaskRequest] | None = None
        self._replies: dict[str, UnmaskReply] = {}
        self.totals: list[RoundTotals] = []

    # -- setup -----------------------------------------------------------------

    def receive_advert(self, advert: KeysAdvert) -> None:
        p = self.proposal
        self._check_collab(advert.collab_id, advert.owner)
        if advert.owner not in p.owners:
            raise Refused("not an owner in the proposal", advert.owner)
        if self._roster is not None:
            raise Refused("keys after the roster closed", advert.owner)
        if advert.owner in self.adverts:
            raise Refused("keys advertised twice", advert.owner)
        with refusing(advert.owner):
            masks.x25519_public(advert.c_key, "the sealing key")
            masks.x25519_public(advert.s_key, "the mask key")
            masks.verify(advert.sign_key, advert.signature, advert.payload(), "keys")
            if self._check_node is not None:
                self._check_node(advert.owner, advert.payload(), advert.node_signature)
        self.adverts[advert.owner] = advert

    def roster(self) -> Roster:
        p = self.proposal
        if self._roster is None:
            self._require(len(self.adverts), "advertised keys", setup=True)
            self._roster = [o for o in p.owners if o in self.adverts]
            self.dropped += [Dropout(owner=o, round=-1) for o in p.owners if o not in self.adverts]
        return Roster(collab_id=p.collab_id, adverts=[self.adverts[o] for o in self._roster])

    def receive_accept(self, message: RosterAccepted) -> None:
        self._check_collab(message.collab_id, message.owner)
        if self._roster is None or message.owner not in self._roster:
            raise Refused("a roster accepted by an owner not in it", message.owner)
        if self._live is not None:
            raise Refused("the roster accepted after the first round started", message.owner)
        if message.owner in self._accepted:
            raise Refused("the roster accepted twice", message.owner)
        if message.roster != self._roster:
            raise Refused("accepted another roster than this one", message.owner)
        self._check_signature(message)
        self._accepted.add(message.owner)

    def restore(self, state: Restore) -> None:
        """Take over from a lost aggregator between rounds (the round under way starts
        again: each owner sends a fresh input with a fresh self mask)."""
        self._check_collab(state.collab_id, "restore")
        if self.adverts or self._roster is not None:
            raise MiningError("restore only into a fresh aggregator")
        for advert in state.adverts:
            self.receive_advert(advert)
        self.roster()
        for accepted in state.accepted:
            self.receive_accept(accepted)
        self.resume(state)

    def resume(self, state: Resume) -> None:
        """After the adverts, the roster and the acceptances were replayed into this fresh
        aggregator: go on at ``state.round`` with the live owners so far."""
        p = self.proposal
        self._check_collab(state.collab_id, "resume")
        if self._roster is None or self._live is not None or self.totals:
            raise MiningError("resume only a fresh aggregator, after its roster and acceptances")
        if not p.first_round() <= state.round <= p.rounds:
            raise MiningError(f"resume at round {state.round}, outside the announced rounds")
        if state.live is not None:
            if not set(state.live) <= set(self._roster):
                raise MiningError("resume names live owners outside the roster")
            self._live = list(state.live)
            self.dropped += state.dropped
        self.round = state.round

    # -- a round ---------------------------------------------------------------

    def start_round(self) -> RoundStart:
        p = self.proposal
        if self._open:
            raise MiningError(f"round {self.round} is still open")
        if self.round > p.rounds:
            raise MiningError(f"all {p.rounds} announced rounds are done")
        if self._live is None:  # the first round: owners that accepted the roster
            assert self._roster is not None
            live = [o for o in self._roster if o in self._accepted]
            self.dropped += [Dropout(owner=o, round=-1) for o in self._roster if o not in live]
        else:
            gone = {d.owner for d in self.dropped}
            live = [o for o in self._live if o not in gone]
        self._live = live
        self._require(len(live), "owners are live")
        self._inputs, self._replies, self._request = {}, {}, None
        self._open = True
        return RoundStart(collab_id=p.collab_id, round=self.round, live=live)

    def receive_input(self, message: MaskedInput) -> None:
        p = self.proposal
        self._check_collab(message.collab_id, message.owner)
        self._check_round(message.round, message.owner)
        assert self._live is not None
        if message.owner not in self._live:
            raise Refused(f"not a live owner of round {self.round}", message.owner)
        if self._request is not None:
            raise Refused(f"input after round {self.round}'s inputs closed", message.owner)
        if message.owner in self._inputs:
            raise Refused(f"a second input for round {self.round} (replay)", message.owner)
        length = p.length(self.round)
        if len(message.vector) != 8 * length:
            raise Refused(
                f"input of {len(message.vector)} bytes, expected {8 * length} "
                f"({length} ring elements)",
                message.owner,
            )
        if set(message.shares) != set(self._live):
            raise Refused("self-mask shares must go to exactly the live owners", message.owner)
        if len(message.commitment) != 32:
            raise Refused("the self-mask commitment is not 32 bytes", message.owner)
        self._check_signature(message)
        self._inputs[message.owner] = message

    def close_inputs(self) -> dict[str, UnmaskRequest]:
        """The unmask request for each live owner, once every one's input arrived. A
        missing input ends the collaboration (:class:`CollabFailed`, naming who did not
        send): a round summed without an owner, beside a round summed with it, would give
        that owner's statistics (its row count and attribute sums at least), and the
        owners refuse such a round anyway."""
        p = self.proposal
        assert self._live is not None
        survivors = [o for o in self._live if o in self._inputs]
        missing = [o for o in self._live if o not in self._inputs]
        if missing:
            self.dropped += [Dropout(owner=o, round=self.round) for o in missing]
            self._open = False
            raise CollabFailed(
                f"round {self.round}: no input from {', '.join(missing)} "
                f"({len(survivors)} of {len(self._live)} live owners sent theirs); a round is "
                "summed only over all its live owners, so the collaboration stops"
            )
        self._request = {
            holder: UnmaskRequest(
                collab_id=p.collab_id,
                round=self.round,
                survivors=survivors,
                self_shares={u: self._inputs[u].shares[holder] for u in survivors},
            )
            for holder in survivors
        }
        return self._request

    def receive_unmask(self, reply: UnmaskReply) -> None:
        self._check_collab(reply.collab_id, reply.owner)
        self._check_round(reply.round, reply.owner)
        if self._request is None or reply.owner not in self._request:
            raise Refused(f"an unmask reply not asked for in round {self.round}", reply.owner)
        if reply.owner in self._replies:
            raise Refused(f"a second unmask reply for round {self.round}", reply.owner)
        request = self._request[reply.owner]
        if set(reply.self_shares) != set(request.survivors):
            raise Refused("the reply does not answer for exactly the owners asked", reply.owner)
        for share in reply.self_shares.values():
            if len(share) != shamir.SHARE_BYTES:
                raise Refused(f"a share of {len(share)} bytes", reply.owner)
        self._check_signature(reply)
        self._replies[reply.owner] = reply

    def finish_round(self) -> RoundTotals:
        p = self.proposal
        if self._request is None:
            raise MiningError(f"round {self.round}'s inputs are not closed")
        survivors = next(iter(self._request.values())).survivors
        silent = [o for o in survivors if o not in self._replies]
        self._require(len(self._replies), "survivors answered the unmask request", silent)
        holders = sorted(self._replies, key=p.position)[: p.threshold]
        weights = shamir.lagrange_at_zero(p.position(h) for h in holders)
        total = np.zeros(p.length(self.round), dtype=np.uint64)
        for u in survivors:
            total += ring.from_bytes(self._inputs[u].vector, total.size)
            seed = self._rebuild({h: self._replies[h].self_shares[u] for h in holders}, weights, u)
            if masks.commitment(seed, p.collab_id, self.round, u) != self._inputs[u].commitment:
                raise CollabFailed(
                    f"round {self.round}: {u}'s self-mask seed does not rebuild "
                    f"(a share from one of {', '.join(holders)} is wrong)"
                )
            total -= masks.stream(self_seed(seed, p.collab_id, self.round, u), total.size)
        totals = RoundTotals(
            collab_id=p.collab_id,
            round=self.round,
            survivors=survivors,
            values=ring.decode(total, p.scale_bits).tolist(),
        )
        self.totals.append(totals)
        self.round += 1
        self._request = None
        self._open = False
        self._live = survivors
        return totals

    @property
    def done(self) -> bool:
        return self.round > self.proposal.rounds

    # -- helpers ---------------------------------------------------------------

    def _rebuild(self, shares: dict[str, bytes], weights: dict[int, int], owner: str) -> bytes:
        p = self.proposal
        try:
            return shamir.combine({p.position(h): s for h, s in shares.items()}, weights)
        except MiningError as exc:
            raise CollabFailed(
                f"round {self.round}: {owner}'s secret does not rebuild: {exc}"
            ) from None

    def _require(
        self, count: int, what: str, silent: list[str] | None = None, *, setup: bool = False
    ) -> None:
        p = self.proposal
        if count >= p.threshold:
            return
        when = "setup" if setup else f"round {self.round}"
        gone = ", ".join(sorted({d.owner for d in self.dropped}, key=p.position)) or "none"
        quiet = f"; no answer from: {', '.join(silent)}" if silent else ""
        raise CollabFailed(
            f"{when}: only {count} {what}, below the threshold {p.threshold} "
            f"(dropped: {gone}{quiet})"
        )

    def _check_collab(self, collab_id: str, sender: str) -> None:
        if collab_id != self.proposal.collab_id:
            raise Refused(
                f"for collaboration {collab_id!r}, not {self.proposal.collab_id!r}", sender
            )

    def _check_round(self, round_: int, sender: str) -> None:
        if self._live is None or round_ != self.round:
            raise Refused(f"for round {round_}, but round {self.round} is open", sender)

    def _check_signature(self, message: RosterAccepted | MaskedInput | UnmaskReply) -> None:
        advert = self.adverts[message.owner]
        with refusing(message.owner):
            masks.verify(advert.sign_key, message.signature, message.payload(), "message")


@contextmanager
def refusing(sender: str) -> Iterator[None]:
    """A check that fails inside becomes a refusal of ``sender``'s message."""
    try:
        yield
    except MiningError as exc:
        raise Refused(str(exc), sender) from None
