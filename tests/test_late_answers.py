"""Refusals past the answer budget wait to be answered together (dms.actor.admission):
what they may keep, per peer and in all."""

from __future__ import annotations

import os

from dms.actor.admission import (
    MAX_LATE_BYTES,
    MAX_LATE_BYTES_PER_PEER,
    LateAnswers,
)
from dms.actor.envelope import Envelope, make_envelope
from dms.actor.handle import Address, Handle

BIG = 60_000  # a sender's own strings, within the 64 KiB header


def request(peer: str, inbox: str = "root", token: bytes = b"") -> Envelope:
    sender = Handle(id=os.urandom(32), address=Address(host=peer, inbox=inbox))
    to = Handle(id=os.urandom(32), address=Address(host="victim", inbox="root"))
    return make_envelope(
        sender, sender.id, "/public/hello", {"pad": "x" * 1000}, to=to, ttl_s=10,
        expect_reply=True, caps=[token] if token else None,
    )  # fmt: skip


def test_a_kept_refusal_holds_neither_payload_nor_token_chain() -> None:
    late = LateAnswers()
    assert late.add("p", request("p", token=b"t" * 50_000), "rate_limited") == "first"
    [batch], more = late.due()
    assert not more and batch.first.caps == [] and batch.first.payload is None
    assert batch.first.reply_to is not None and batch.first.to is not None  # still answerable
    assert late.held_bytes == 0 and len(late) == 0


def test_senders_with_huge_handles_fill_a_byte_budget_per_peer_then_in_all() -> None:
    """Each request from a fresh sender handle with a 60 KB inbox name: one peer keeps
    at most MAX_LATE_BYTES_PER_PEER of them, many peers at most MAX_LATE_BYTES (the
    count bounds alone let 16,384 of them hold about 1 GB)."""
    late = LateAnswers()
    one = [late.add("p0", request("p0", inbox="i" * BIG), "r") for _ in range(100)]
    assert "dropped" in one and late.held_bytes <= MAX_LATE_BYTES_PER_PEER
    for n in range(1, 400):
        peer = f"p{n}"
        for _ in range(20):
            late.add(peer, request(peer, inbox="i" * BIG), "r")
    assert MAX_LATE_BYTES - 2 * BIG < late.held_bytes <= MAX_LATE_BYTES
    while len(late):
        late.due()
    assert late.held_bytes == 0
    # Emptied, the budget serves again.
    assert late.add("p0", request("p0"), "r") == "first"


def test_more_requests_of_one_sender_cost_a_nonce_each() -> None:
    late = LateAnswers()
    first = request("p")
    assert late.add("p", first, "r") == "first"
    again = make_envelope(
        first.sender, first.signer, "/public/hello", None, to=first.to, ttl_s=10,
        expect_reply=True,
    )  # fmt: skip
    for _ in range(500):
        assert late.add("p", again, "r") == "kept"
    [batch], _ = late.due()
    assert len(batch.nonces) == 500 and batch.size < 600 * 50
