"""Property tests: the wire format round-trips and the signature covers every byte."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from dms.actor import ErrorCode, Handle, Refusal
from dms.actor.envelope import (
    MAGIC,
    MAX_BEHAVIOUR_CHARS,
    NONCE_BYTES,
    Envelope,
    _unpack,
    encode_payload,
    make_envelope,
    now_ns,
    open_frame,
    seal,
    unseal,
    verify,
)
from dms.actor.handle import Address
from dms.security import Identity

KEY = Identity.generate()
OTHER = Identity.generate()
LIMIT = 16 * 1024 * 1024

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=200)
)
payloads = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
inboxes = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-0123456789", min_size=1, max_size=20)


@st.composite
def envelopes(draw: Any) -> Envelope:
    sender = Handle(id=KEY.public_key, address=Address(host=KEY.peer_id, inbox=draw(inboxes)))
    topic = draw(st.none() | st.text(min_size=1, max_size=30))
    to = (
        None
        if topic is not None and draw(st.booleans())
        else Handle(id=OTHER.public_key, address=Address(host=OTHER.peer_id, inbox=draw(inboxes)))
    )
    return make_envelope(
        sender,
        KEY.public_key,
        draw(st.text(min_size=1, max_size=60)),
        draw(payloads),
        to=to,
        ttl_s=draw(st.floats(min_value=0.001, max_value=3600)),
        expect_reply=draw(st.booleans()),
        topic=topic,
        caps=draw(st.lists(st.binary(max_size=50), max_size=3)),
    )


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(envelopes())
def test_encode_decode_round_trips(envelope: Envelope) -> None:
    sealed = unseal(seal(envelope, KEY), LIMIT)
    verify(sealed)
    assert sealed.envelope == envelope


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(envelopes(), st.data())
def test_any_one_byte_change_is_refused(envelope: Envelope, data: st.DataObject) -> None:
    frame = bytearray(seal(envelope, KEY))
    index = data.draw(st.integers(min_value=0, max_value=len(frame) - 1), label="index")
    flip = data.draw(st.integers(min_value=1, max_value=255), label="xor")
    frame[index] ^= flip
    with pytest.raises(Refusal) as info:
        verify(unseal(bytes(frame), LIMIT))
    assert info.value.code in {ErrorCode.MALFORMED, ErrorCode.BAD_SIGNATURE, ErrorCode.WRONG_SIGNER}


def test_equal_payloads_encode_identically() -> None:
    sender = Handle(id=KEY.public_key, address=Address(host=KEY.peer_id, inbox="root"))
    env = make_envelope(sender, KEY.public_key, "/x", {"b": 1, "a": {"d": 2, "c": 3}}, ttl_s=5)
    same = env.model_copy(update={"payload": {"a": {"c": 3, "d": 2}, "b": 1}})
    assert seal(env, KEY)[:-64] == seal(same, KEY)[:-64]


def test_large_bytes_travel_raw() -> None:
    sender = Handle(id=KEY.public_key, address=Address(host=KEY.peer_id, inbox="root"))
    blob = bytes(range(256)) * 4096  # 1 MiB
    frame = seal(make_envelope(sender, KEY.public_key, "/x", {"ct": blob}, ttl_s=5), KEY)
    assert len(frame) < len(blob) + 1024  # no base64 (which would add a third)
    assert blob in frame


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(envelopes())
def test_envelopes_built_without_pydantic_are_the_validated_ones(envelope: Envelope) -> None:
    """make_envelope and the header decoder fill the model directly when every field
    has its declared type; the result is what pydantic's validation builds."""
    validated = Envelope.model_validate(envelope.model_dump(by_alias=True))
    decoded = unseal(seal(envelope, KEY), LIMIT).envelope
    for env in (envelope, decoded):
        assert env == validated
        assert env.model_dump() == validated.model_dump()
        assert env.model_fields_set == validated.model_fields_set
        assert env.model_copy(update={"payload": 1}).payload == 1
        with pytest.raises(ValidationError):
            env.payload = 2  # type: ignore[misc]  # still frozen


def _header_frame(**changes: Any) -> bytes:
    """A frame signed by KEY whose header fields are the usual ones with ``changes``."""
    fields: dict[str, Any] = {
        "to": [OTHER.public_key, OTHER.peer_id, "root"],
        "sender": [KEY.public_key, KEY.peer_id, "root"],
        "signer": KEY.public_key,
        "behaviour": "/x",
        "nonce": b"n" * NONCE_BYTES,
        "issued_at": now_ns(),
        "expiry": now_ns() + 10**10,
        "reply_to": None,
        "topic": None,
        "caps": [],
    }
    fields.update(changes)
    header = msgpack.packb(
        [*fields.pop("to"), *fields.pop("sender"), *fields.values()], use_bin_type=True
    )
    body = MAGIC + len(header).to_bytes(4, "big") + header + msgpack.packb(None)
    return body + KEY.sign(body)


@pytest.mark.parametrize(
    "changes",
    [
        {"behaviour": ""},
        {"behaviour": "/" + "x" * MAX_BEHAVIOUR_CHARS},
        {"behaviour": 7},
        {"nonce": b"n" * (NONCE_BYTES - 1)},
        {"issued_at": "soon"},
        {"expiry": None},
        {"reply_to": 3},
        {"caps": [b"ok", 5]},
        {"caps": b"not a list"},
        {"sender": [None, None, None]},
        {"sender": [KEY.public_key[:31], KEY.peer_id, "root"]},
    ],
    # Named, not shown: KEY is made fresh in each process, and ids that differ between
    # xdist workers stop the whole run.
    ids=[
        "empty-behaviour",
        "long-behaviour",
        "int-behaviour",
        "short-nonce",
        "str-issued-at",
        "no-expiry",
        "int-reply-to",
        "int-cap",
        "caps-not-a-list",
        "sender-of-nones",
        "short-sender-key",
    ],
)
def test_a_header_field_of_the_wrong_type_or_size_is_refused(changes: dict[str, Any]) -> None:
    assert open_frame(_header_frame(), LIMIT).envelope.behaviour == "/x"  # the frame is sound
    with pytest.raises(Refusal) as info:
        open_frame(_header_frame(**changes), LIMIT)
    assert info.value.code == ErrorCode.MALFORMED
    assert info.value.reason.startswith("bad h")


def test_a_payload_that_cannot_be_encoded_leaves_the_next_one_whole() -> None:
    """Encoding reuses one packer per thread: a failure midway must not leave its
    bytes in front of the next envelope's."""
    sender = Handle(id=KEY.public_key, address=Address(host=KEY.peer_id, inbox="root"))
    with pytest.raises(Refusal) as info:
        encode_payload({"a": [1, 2, object()]})
    assert info.value.code == ErrorCode.BAD_PAYLOAD
    env = make_envelope(sender, KEY.public_key, "/x", {"a": [1, 2, 3]}, ttl_s=5)
    assert encode_payload(env.payload) == msgpack.packb({"a": [1, 2, 3]})
    assert unseal(seal(env, KEY), LIMIT).envelope == env


@pytest.mark.parametrize("n", [1, 3, 10, 200, 5000])
def test_the_item_budget_holds_for_small_data_too(n: int) -> None:
    """Data of at most half the budget in bytes is decoded without counting; the count
    must still refuse anything over it (n empty lists in one: 2n + 1 items)."""
    data = msgpack.packb([[] for _ in range(n)])
    assert _unpack(data, max_items=2 * n + 1) == [[] for _ in range(n)]
    with pytest.raises(Refusal) as info:
        _unpack(data, max_items=2 * n)
    assert info.value.code == ErrorCode.MALFORMED
    assert "items" in info.value.reason
