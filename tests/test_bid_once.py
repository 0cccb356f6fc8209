"""A provider answers a round's bid request once (specs/orchestration.md, "The flow").

A round that knows fewer fitting peers than open slots asks those directly and also
publishes the request on the deployment topic; a peer asked directly heard both and
answered both, locking a second set of leases. The published request now names the
peers the round asked directly (``BidRequest.asked``), and those answer only the direct
one. Here the rounds alone and the message's bound; on real nodes in
``tests/test_orchestrator.py``
(``test_a_provider_asked_directly_and_on_the_topic_in_one_round_bids_once``).
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

import tests.test_twin_slots as twins
from dms.actor.handle import Address, Handle
from dms.jobs.spec import MAX_SLOTS
from dms.orchestrator.messages import BidRequest

REPLY_TO = Handle(id=bytes(32), address=Address(host="requester", inbox="dep-1"))


def gossip_request(asked: list[str]) -> dict[str, Any]:
    slot = {"slot": "w.0", "executor": "compute", "resources": {"cpu": "100m", "ram": "16MiB"}}
    return {"deployment_id": "d", "slots": [slot], "lease_s": 10,
            "reply_to": REPLY_TO.model_dump(), "asked": asked}  # fmt: skip


def test_a_published_request_names_at_most_max_slots_peers_asked_directly() -> None:
    """The names are the only thing a provider goes by to leave a published request to
    the direct one, so what they cost is bounded by the message: a round publishes only
    when it asks fewer peers than it has open slots, at most ``MAX_SLOTS``."""
    peers = [f"12D3KooW{i:044d}" for i in range(MAX_SLOTS + 1)]
    named = BidRequest.model_validate(gossip_request(peers[:MAX_SLOTS]))
    assert named.asked == peers[:MAX_SLOTS]
    with pytest.raises(ValidationError, match="asked"):
        BidRequest.model_validate(gossip_request(peers))
    for name in ("", "x" * 129):
        with pytest.raises(ValidationError, match="asked"):
            BidRequest.model_validate(gossip_request([name]))
    # Absent (a request of a node before the field): it names none.
    plain = gossip_request([])
    del plain["asked"]
    assert BidRequest.model_validate(plain).asked == []


class _Publishing(twins._Messenger):
    """Records what the round publishes; its request cannot reach peer ``q``."""

    def __init__(self) -> None:
        super().__init__()
        self.handle = REPLY_TO  # type: ignore[assignment]
        self.direct: dict[str, Any] = {}  # peer -> the payload asked of it
        self.published: list[Any] = []

    def invoke(self, to: str, behaviour: str, payload: Any, **kw: Any) -> None:
        super().invoke(to, behaviour, payload, **kw)
        if to == "q":
            raise ConnectionError("no known address")
        self.direct[to] = payload

    def publish(self, topic: str, behaviour: str, payload: Any, **kw: Any) -> None:
        self.published.append(payload)


def test_a_round_that_also_publishes_names_the_peers_its_request_reached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(twins, "_Messenger", _Publishing)
    # Four slots, three fitting peers of which one cannot be reached: the round asks
    # fewer peers than slots, so it publishes too.
    r = twins.Round(monkeypatch, ["p", "q", "s"], count=4)
    messenger = r.messenger
    assert isinstance(messenger, _Publishing)
    (published,) = messenger.published
    request = BidRequest.model_validate(published)
    assert request.reply_to is not None
    # Those it reached answer the direct request; ``q`` may hear only this one.
    assert sorted(request.asked) == ["p", "s"]
    # The direct request is as before: no ``asked`` (an older provider refuses a field
    # it does not know).
    assert all("asked" not in payload for payload in messenger.direct.values())


def test_a_round_that_asks_nobody_publishes_the_request_as_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(twins, "_Messenger", _Publishing)
    r = twins.Round(monkeypatch, [], count=2)
    messenger = r.messenger
    assert isinstance(messenger, _Publishing)
    (published,) = messenger.published
    assert "asked" not in published
    assert BidRequest.model_validate(published).reply_to == REPLY_TO
