"""What owners and the aggregator send each other (pydantic, carried as MessagePack bytes).

Every message names its collaboration and round; those an owner sends are
signed with its collaboration key (Ed25519) over the MessagePack encoding of
the message without its signature, so the aggregator can neither alter nor
replay them into another round or collaboration unnoticed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import StrEnum
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dms.mining.wire import encode


class Init(StrEnum):
    SUPPLIED = "supplied"  # the proposer's centroids, announced in the proposal
    MOMENTS = "moments"  # a seeded draw around the aggregated mean and spread


class Privacy(BaseModel):
    """Gaussian noise on every round's totals: (epsilon, delta) per round; rows are
    clipped to L2 norm ``clip``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    epsilon: float = Field(gt=0, lt=1)
    delta: float = Field(gt=0, lt=1)
    clip: float = Field(gt=0)

    def sigma(self) -> float:
        """The total noise's standard deviation: one row moves one cluster's sum by at most
        ``clip`` and its count by 1, so the sensitivity is sqrt(clip^2 + 1)."""
        sensitivity = math.sqrt(self.clip**2 + 1.0)
        return sensitivity * math.sqrt(2.0 * math.log(1.25 / self.delta)) / self.epsilon


class Proposal(BaseModel):
    """Everything fixed before the first round; every owner checks it before it joins."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    collab_id: str = Field(min_length=1, max_length=128)
    owners: list[str] = Field(min_length=2, max_length=1000)
    a: int = Field(ge=1, le=10_000)
    k: int = Field(ge=1, le=10_000)
    rounds: int = Field(ge=1, le=1000)
    threshold: int
    scale_bits: int = Field(default=32, ge=0, le=52)
    init: Init = Init.SUPPLIED
    centroids: list[list[float]] | None = None
    seed: int = 0
    privacy: Privacy | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        m = len(self.owners)
        if len(set(self.owners)) != m:
            raise ValueError("an owner is listed twice")
        if not m // 2 < self.threshold <= m:
            raise ValueError(
                f"threshold {self.threshold} with {m} owners: it must be more than half "
                f"({m // 2 + 1}..{m}). Each owner takes one set of live owners, of at least "
                "the threshold, and opens self-mask shares for that set only; two such sets "
                "share an owner only above half, so with less an aggregator could give "
                "disjoint sets of owners different live lists and sum each apart, a "
                "smaller crowd than all the owners (with two, each reads the other's "
                "statistics)"
            )
        if self.init is Init.SUPPLIED:
            import numpy as np  # here, not at the top: a node that relays messages needs none

            grid = np.asarray(self.centroids if self.centroids is not None else [], dtype=float)
            if grid.shape != (self.k, self.a) or not np.all(np.isfinite(grid)):
                raise ValueError(
                    f"init supplied needs k x a = {self.k} x {self.a} finite centroids"
                )
        elif self.centroids is not None:
            raise ValueError("init moments draws the centroids; do not supply them")
        if self.privacy is not None and self.init is Init.MOMENTS:
            raise ValueError("privacy needs init supplied (the moments round is not noised)")
        return self

    def position(self, owner: str) -> int:
        """1-based place in the owner list: the Shamir x and the pairwise mask's sign."""
        return self.owners.index(owner) + 1

    def length(self, round_: int) -> int:
        """Ring elements per contribution: round 0 (moments) count, sums, squares;
        later rounds k x a sums then k counts."""
        return 1 + 2 * self.a if round_ == 0 else self.k * self.a + self.k

    def first_round(self) -> int:
        return 0 if self.init is Init.MOMENTS else 1


class Signed(BaseModel):
    model_config = ConfigDict(extra="forbid")
    signature: bytes = b""

    def payload(self) -> bytes:
        return encode(self.model_copy(update={"signature": b""}))


class KeysAdvert(Signed):
    collab_id: str
    owner: str
    sign_key: bytes
    c_key: bytes
    s_key: bytes
    # By the owner's node key (the one its id in the proposal names), over payload(): the
    # aggregator, which relays the roster, cannot put keys of its own in an owner's name.
    node_signature: bytes = b""

    def payload(self) -> bytes:
        """What both signatures cover: the advert without either of them."""
        return encode(self.model_copy(update={"signature": b"", "node_signature": b""}))


# Checks that ``signature`` over ``payload`` is by the node whose id is ``owner``; raises
# MiningError with the reason. On nodes, ``dms.jobs.collab.node_signed``; None in one
# process (no node keys there).
NodeCheck = Callable[[str, bytes, bytes], None]


class Roster(BaseModel):
    """The aggregator's list of the adverts it received (owners check every signature)."""

    model_config = ConfigDict(extra="forbid")
    collab_id: str
    adverts: list[KeysAdvert]


class RosterAccepted(Signed):
    """Setup: the owner checked the roster and takes part with exactly these owners (its
    shared sealing keys and pairwise secrets are made). The owners whose acceptance
    arrived are the first round's live owners. No share of any key travels: no mask key
    is ever opened, so none is split."""

    collab_id: str
    owner: str
    roster: list[str]  # the roster's owners, in the proposal's order


class RoundStart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    collab_id: str
    round: int
    live: list[str]


class MaskedInput(Signed):
    collab_id: str
    round: int
    owner: str
    vector: bytes  # little-endian uint64 ring elements
    commitment: bytes  # of this round's self-mask seed
    shares: dict[str, bytes]  # shares of the self-mask seed, one sealed to each live owner


class UnmaskRequest(BaseModel):
    """Sent once every live owner's input arrived: ``survivors`` are all of them."""

    model_config = ConfigDict(extra="forbid")
    collab_id: str
    round: int
    survivors: list[str]
    self_shares: dict[str, bytes]  # survivor -> its self-mask share sealed to this owner


class UnmaskReply(Signed):
    collab_id: str
    round: int
    owner: str
    self_shares: dict[str, bytes]  # survivor -> opened share


class RoundTotals(BaseModel):
    model_config = ConfigDict(extra="forbid")
    collab_id: str
    round: int
    survivors: list[str]
    values: list[float]


class Dropout(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    owner: str
    round: int


class Resume(BaseModel):
    """Where a new aggregator takes over, once the adverts and roster acceptances the
    proposer's session relayed have been replayed to it (each checked again)."""

    model_config = ConfigDict(extra="forbid")
    collab_id: str
    round: int  # the next round to run (restarted if it was under way)
    live: list[str] | None = None  # after a completed round: its survivors
    dropped: list[Dropout] = Field(default_factory=list)  # dropped at setup


class Restore(Resume):
    """Everything a new aggregator needs to take over between rounds, in one message
    (in-process; on nodes the adverts and shares are replayed one by one)."""

    adverts: list[KeysAdvert]
    accepted: list[RosterAccepted]


class OwnerResult(BaseModel):
    """What one owner ends with: the shared centroids and its own labels, nothing else."""

    model_config = ConfigDict(extra="forbid")
    collab_id: str
    owner: str
    rounds: int
    initial_centroids: list[list[float]]
    centroids: list[list[float]]
    labels: list[int]
    dropped: list[Dropout]
    epsilon_spent: float | None = None
    delta_spent: float | None = None


class OwnerState(BaseModel):
    """An owner's whole state between two messages, to carry it over a restart of its
    node (``CollabOwner.snapshot``/``restored``; its rows are read again). It holds the
    owner's private keys: the node seals it before it touches the disk. A seat kept by
    an earlier version (with ``opened_self``, ``opened_keys``, mask-key shares) does not
    load: it is logged and not resumed."""

    model_config = ConfigDict(extra="forbid")
    sign: bytes
    c: bytes
    s: bytes
    share_keys: dict[str, bytes]
    pair_secrets: dict[str, bytes]
    roster: list[str]
    dropped: list[Dropout]
    next: int
    pending: RoundStart | None
    sent: MaskedInput | None = None  # its input of the pending round, sent again on a restart
    answer: tuple[UnmaskRequest, UnmaskReply] | None
    labels: list[int]
    candidate_labels: list[int]
    initial: list[list[float]] | None
    centroids: list[list[float]] | None
