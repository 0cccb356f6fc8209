"""One data owner's side: its rows stay here; only masked vectors and sealed shares leave.

Per round the owner computes its statistics in the clear, encodes them in the
ring, adds a fresh self mask and, for every other live owner, a pairwise mask
(+ towards owners listed after it, - towards those before), so the pairwise
masks cancel in the total. It Shamir-shares the self-mask seed among the live
owners. When every live owner sent its input, it opens each one's self-mask
share; an unmask request that leaves a live owner out is refused. No mask key
is split or opened: the pairwise seeds never leave the two owners that share
them. Once the first round began, every round runs over the same owners: a
round start (or a restart) that leaves one out is refused, since a sum without
an owner beside a sum with it is that owner's statistics. A round restarted
over the same owners gets the very message this owner sent in it before (the
same self mask, noise and statistics), and an unmask request the same answer.
"""

from __future__ import annotations

import hashlib
import os
from typing import TypeVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from dms.mining.collab import masks, ring, shamir
from dms.mining.collab.errors import Refused
from dms.mining.collab.messages import (
    Dropout,
    KeysAdvert,
    MaskedInput,
    NodeCheck,
    OwnerResult,
    OwnerState,
    Proposal,
    Roster,
    RosterAccepted,
    RoundStart,
    RoundTotals,
    UnmaskReply,
    UnmaskRequest,
)
from dms.mining.collab.stats import (
    drawn_centroids,
    kmeans_statistics,
    moments_statistics,
    next_centroids,
)
from dms.mining.errors import MiningError

S = TypeVar("S", KeysAdvert, RosterAccepted, MaskedInput, UnmaskReply)


def self_aad(collab_id: str, round_: int, live: list[str], sender: str, holder: str) -> bytes:
    """Bound to the round's live owners (the same in every attempt of it: a restart
    that leaves one out is refused)."""
    attempt = hashlib.sha256("\0".join(live).encode()).hexdigest()
    return f"{collab_id}|self|{round_}|{attempt}|{sender}|{holder}".encode()


def pair_seed(secret: bytes, collab_id: str, round_: int) -> bytes:
    return masks.derive(secret, "pair", collab_id, round_)


def self_seed(seed: bytes, collab_id: str, round_: int, owner: str) -> bytes:
    return masks.derive(seed, "self", collab_id, round_, owner)


class CollabOwner:
    def __init__(
        self,
        proposal: Proposal,
        owner: str,
        rows: np.ndarray,
        check_node: NodeCheck | None = None,
    ) -> None:
        if owner not in proposal.owners:
            raise MiningError(f"{owner} is not among the proposal's owners")
        rows = np.asarray(rows, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != proposal.a or rows.shape[0] < 1:
            raise MiningError(
                f"the proposal needs rows of {proposal.a} attributes, not shape {rows.shape}"
            )
        if not np.all(np.isfinite(rows)):
            raise MiningError("a row holds a value that is not a finite number")
        if proposal.privacy is not None:
            norms = np.linalg.norm(rows, axis=1)
            rows = (
                rows * np.minimum(1.0, proposal.privacy.clip / np.maximum(norms, 1e-300))[:, None]
            )
        self.proposal = proposal
        self.owner = owner
        self._rows = rows
        self._check_node = check_node  # each roster entry signed by that owner's node
        self._sign = Ed25519PrivateKey.generate()
        self._c = X25519PrivateKey.generate()
        self._s = X25519PrivateKey.generate()
        self._share_keys: dict[str, bytes] = {}
        self._pair_secrets: dict[str, bytes] = {}
        self._roster: set[str] = set()
        self._dropped: list[Dropout] = []
        self._next = proposal.first_round()
        self._pending: RoundStart | None = None  # contributed, awaiting the unmask request
        self._sent: MaskedInput | None = None  # what it sent in the pending round
        self._answer: tuple[UnmaskRequest, UnmaskReply] | None = None
        self._labels = np.zeros(rows.shape[0], dtype=np.int64)
        self._candidate_labels = self._labels
        self._initial: np.ndarray | None = None
        self.centroids: np.ndarray | None = None
        if proposal.centroids is not None:
            self._initial = np.asarray(proposal.centroids, dtype=np.float64)
            self.centroids = self._initial.copy()
        self._noise = np.random.default_rng(int.from_bytes(os.urandom(16), "big"))

    # -- setup ---------------------------------------------------------------

    def advert(self) -> KeysAdvert:
        message = KeysAdvert(
            collab_id=self.proposal.collab_id,
            owner=self.owner,
            sign_key=masks.public_bytes(self._sign),
            c_key=masks.public_bytes(self._c),
            s_key=masks.public_bytes(self._s),
        )
        return self._signed(message)

    def receive_roster(self, roster: Roster) -> RosterAccepted:
        p = self.proposal
        if roster.collab_id != p.collab_id:
            raise Refused(f"roster for collaboration {roster.collab_id!r}, not {p.collab_id!r}")
        if self._roster:
            raise Refused("a second roster (the first one stands)")
        seen: dict[str, KeysAdvert] = {}
        for advert in roster.adverts:
            if advert.owner not in p.owners or advert.owner in seen:
                raise Refused(f"the roster lists {advert.owner!r} twice or outside the proposal")
            if advert.collab_id != p.collab_id:
                raise Refused(f"{advert.owner}'s advert is for another collaboration")
            masks.verify(advert.sign_key, advert.signature, advert.payload(), advert.owner)
            if self._check_node is not None:
                try:
                    self._check_node(advert.owner, advert.payload(), advert.node_signature)
                except MiningError as exc:
                    raise Refused(f"the roster's entry for {advert.owner}: {exc}") from None
            seen[advert.owner] = advert
        mine = seen.get(self.owner)
        if mine is None or mine.payload() != self.advert().payload():
            raise Refused("the roster does not carry this owner's own keys unchanged")
        if len(seen) < p.threshold:
            raise Refused(f"the roster has {len(seen)} owners, below the threshold {p.threshold}")
        for other, advert in seen.items():
            c_pub = masks.x25519_public(advert.c_key, f"{other}'s sealing key")
            self._share_keys[other] = masks.derive(
                masks.agree(self._c, c_pub), "share-key", p.collab_id
            )
            if other != self.owner:
                s_pub = masks.x25519_public(advert.s_key, f"{other}'s mask key")
                self._pair_secrets[other] = masks.agree(self._s, s_pub)
        self._roster = set(seen)
        self._dropped += [Dropout(owner=o, round=-1) for o in p.owners if o not in seen]
        listed = sorted(seen, key=p.position)
        return self._signed(RosterAccepted(collab_id=p.collab_id, owner=self.owner, roster=listed))

    # -- a round ---------------------------------------------------------------

    def contribute(self, start: RoundStart) -> MaskedInput:
        """This owner's masked input for ``start``. A restart of the pending round (a new
        aggregator, the proposer's node restarted) gets the message sent before, byte for
        byte: a second input of one round, under another self mask, would differ from the
        first by whatever changed in between (fresh noise, an edited row), and the
        aggregator that rebuilt both self masks would read that difference."""
        p = self.proposal
        if self._check_start(start):
            if self._sent is None:  # kept by a version that did not keep it
                raise Refused(
                    f"round {start.round} restarts, but the input this owner sent in it was "
                    "not kept: it sends no second, different one"
                )
            return self._sent
        if start.round == 0:
            vector = moments_statistics(self._rows)
        else:
            assert self.centroids is not None
            self._candidate_labels, vector = kmeans_statistics(self._rows, self.centroids)
            if p.privacy is not None:
                sigma = p.privacy.sigma() / np.sqrt(p.threshold)
                vector = vector + self._noise.normal(0.0, sigma, size=vector.shape)
        masked = ring.encode(vector, p.scale_bits, len(p.owners))
        seed = os.urandom(shamir.SECRET_BYTES)
        masked += masks.stream(self_seed(seed, p.collab_id, start.round, self.owner), masked.size)
        me = p.position(self.owner)
        for other in start.live:
            if other == self.owner:
                continue
            pad = masks.stream(
                pair_seed(self._pair_secrets[other], p.collab_id, start.round), masked.size
            )
            if me < p.position(other):
                masked += pad
            else:
                masked -= pad
        shares = self._split(seed, start.live)
        sealed = {
            holder: masks.seal(
                self._share_keys[holder],
                share,
                self_aad(p.collab_id, start.round, start.live, self.owner, holder),
                os.urandom(masks.NONCE_BYTES),
            )
            for holder, share in shares.items()
        }
        self._pending = start
        self._answer = None
        message = MaskedInput(
            collab_id=p.collab_id,
            round=start.round,
            owner=self.owner,
            vector=ring.to_bytes(masked),
            commitment=masks.commitment(seed, p.collab_id, start.round, self.owner),
            shares=sealed,
        )
        self._sent = self._signed(message)
        return self._sent

    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        p = self.proposal
        start = self._pending
        if request.collab_id != p.collab_id:
            raise Refused(f"unmask request for collaboration {request.collab_id!r}")
        if start is None or request.round != start.round:
            raise Refused(f"unmask request for round {request.round}, which this owner is not in")
        if self._answer is not None:
            previous, reply = self._answer
            if previous == request:
                return reply  # the same question again gets the same answer
            raise Refused(f"a second, different unmask request for round {request.round}")
        survivors = set(request.survivors)
        if len(request.survivors) != len(survivors):
            raise Refused("an owner is named twice in the unmask request")
        if survivors != set(start.live):
            # A round is unmasked only with every live owner's input in: a sum over fewer
            # owners would differ from the other rounds' by the missing owners' statistics.
            missing = ", ".join(sorted(set(start.live) - survivors, key=p.position))
            raise Refused(
                f"the unmask request leaves out {missing or 'none'} or names an owner not "
                "live: a round is unmasked only over all its live owners"
            )
        if set(request.self_shares) != survivors:
            raise Refused("the unmask request does not carry one share for each owner named")
        opened_self = {
            u: masks.unseal(
                self._share_keys[u],
                sealed,
                self_aad(p.collab_id, request.round, start.live, u, self.owner),
                f"{u}'s self-mask share",
            )
            for u, sealed in request.self_shares.items()
        }
        reply = self._signed(
            UnmaskReply(
                collab_id=p.collab_id,
                round=request.round,
                owner=self.owner,
                self_shares=opened_self,
            )
        )
        self._answer = (request, reply)
        return reply

    def receive_totals(self, totals: RoundTotals) -> None:
        p = self.proposal
        start = self._pending
        if totals.collab_id != p.collab_id:
            raise Refused(f"totals for collaboration {totals.collab_id!r}")
        if start is None or self._answer is None or totals.round != start.round:
            raise Refused(f"totals for round {totals.round}, which this owner did not unmask")
        request = self._answer[0]
        if totals.survivors != request.survivors:
            raise Refused("the totals name other survivors than the unmask request did")
        values = np.asarray(totals.values, dtype=np.float64)
        if values.shape != (p.length(totals.round),) or not np.all(np.isfinite(values)):
            raise Refused(f"totals of {values.size} values, expected {p.length(totals.round)}")
        if totals.round == 0:
            self._initial = drawn_centroids(values, p.k, p.a, p.seed)
            self.centroids = self._initial.copy()
        else:
            assert self.centroids is not None
            self.centroids = next_centroids(values, self.centroids)
            self._labels = self._candidate_labels
        self._pending = self._sent = None
        self._next = totals.round + 1

    @property
    def done(self) -> bool:
        return self._next > self.proposal.rounds

    def result(self) -> OwnerResult:
        p = self.proposal
        if not self.done or self.centroids is None or self._initial is None:
            raise MiningError(f"the collaboration is at round {self._next} of {p.rounds}")
        spent = p.privacy
        return OwnerResult(
            collab_id=p.collab_id,
            owner=self.owner,
            rounds=p.rounds,
            initial_centroids=self._initial.tolist(),
            centroids=self.centroids.tolist(),
            labels=self._labels.tolist(),
            dropped=self._dropped,
            epsilon_spent=None if spent is None else spent.epsilon * p.rounds,
            delta_spent=None if spent is None else spent.delta * p.rounds,
        )

    # -- a restart of the owner's node ---------------------------------------------

    def snapshot(self) -> OwnerState:
        """Everything but the rows: taken after each message, before the answer leaves,
        so a restarted owner never answers twice differently (never opens self-mask
        shares for two different unmask requests of a round)."""
        return OwnerState(
            sign=masks.private_bytes(self._sign),
            c=masks.private_bytes(self._c),
            s=masks.private_bytes(self._s),
            share_keys=self._share_keys,
            pair_secrets=self._pair_secrets,
            roster=sorted(self._roster, key=self.proposal.position),
            dropped=self._dropped,
            next=self._next,
            pending=self._pending,
            sent=self._sent,
            answer=self._answer,
            labels=self._labels.tolist(),
            candidate_labels=self._candidate_labels.tolist(),
            initial=None if self._initial is None else self._initial.tolist(),
            centroids=None if self.centroids is None else self.centroids.tolist(),
        )

    @classmethod
    def restored(
        cls,
        proposal: Proposal,
        owner: str,
        rows: np.ndarray,
        state: OwnerState,
        check_node: NodeCheck | None = None,
    ) -> CollabOwner:
        """The owner as :meth:`snapshot` left it, with its rows read again."""
        me = cls(proposal, owner, rows, check_node)
        if len(state.labels) != me._rows.shape[0]:
            raise MiningError(
                f"the rows changed while the node was down: {me._rows.shape[0]} rows, "
                f"the collaboration has labels for {len(state.labels)}"
            )
        me._sign = Ed25519PrivateKey.from_private_bytes(state.sign)
        me._c = X25519PrivateKey.from_private_bytes(state.c)
        me._s = X25519PrivateKey.from_private_bytes(state.s)
        me._share_keys, me._pair_secrets = state.share_keys, state.pair_secrets
        me._roster = set(state.roster)
        me._dropped = list(state.dropped)
        me._next, me._pending, me._answer = state.next, state.pending, state.answer
        me._sent = state.sent
        me._labels = np.asarray(state.labels, dtype=np.int64)
        me._candidate_labels = np.asarray(state.candidate_labels, dtype=np.int64)
        if state.initial is not None:
            me._initial = np.asarray(state.initial, dtype=np.float64)
        me.centroids = None if state.centroids is None else np.asarray(state.centroids)
        return me

    # -- helpers ---------------------------------------------------------------

    def _check_start(self, start: RoundStart) -> bool:
        """Whether ``start`` restarts the pending round (refused with the reason if it
        does not fit). The first start of the first round may leave out roster owners
        (they never sent anything: dropped at setup); no later start may leave anyone
        out. A sum over fewer owners beside a sum over all of them is the left-out
        owners' statistics: the counts and the sums over clusters do not depend on the
        centroids, so two rounds differ in those by exactly what the left-out owners
        hold; two attempts of one round, in all of them. The aggregator can claim a
        dropout, and one owner colluding with it can open the first attempt with the
        left-out owner's own shares, so no rerun over fewer owners is safe."""
        p = self.proposal
        if start.collab_id != p.collab_id:
            raise Refused(f"round start for collaboration {start.collab_id!r}")
        if not self._roster:
            raise Refused("a round start before the roster")
        restart = self._pending is not None and start.round == self._pending.round
        if not restart and (self._pending is not None or start.round != self._next):
            raise Refused(f"round {start.round} starts, but this owner expects round {self._next}")
        if start.round > p.rounds:
            raise Refused(f"round {start.round} after the announced {p.rounds}")
        live = set(start.live)
        gone = {d.owner for d in self._dropped}
        if len(live) != len(start.live) or not live <= self._roster or live & gone:
            raise Refused("the live owners include one twice, unknown or already dropped")
        if self.owner not in live:
            raise Refused("this owner is not among the round's live owners")
        left_out = sorted(self._roster - live - gone, key=p.position)
        if left_out and (restart or start.round != p.first_round()):
            raise Refused(
                f"round {start.round} leaves out {', '.join(left_out)}: once the first round "
                "began every round runs over the same owners (a sum without an owner beside "
                "a sum with it is that owner's statistics)"
            )
        if len(live) < p.threshold:
            raise Refused(f"{len(live)} live owners, below the threshold {p.threshold}")
        self._dropped += [Dropout(owner=o, round=-1) for o in left_out]
        return restart

    def _split(self, secret: bytes, holders: list[str]) -> dict[str, bytes]:
        p = self.proposal
        by_x = shamir.split(secret, [p.position(h) for h in holders], p.threshold)
        return {h: by_x[p.position(h)] for h in holders}

    def _signed(self, message: S) -> S:
        return message.model_copy(update={"signature": self._sign.sign(message.payload())})
