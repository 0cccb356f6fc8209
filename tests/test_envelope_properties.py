"""Property tests: the wire format round-trips and the signature covers every byte."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dms.actor import ErrorCode, Handle, Refusal
from dms.actor.envelope import Envelope, make_envelope, seal, unseal, verify
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
