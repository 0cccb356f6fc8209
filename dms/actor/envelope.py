"""The signed envelope and its binary wire format.

Wire format (all integers big-endian)::

    b"DMS1" | u32 header length | header | payload | signature (64 bytes)

``header`` is a MessagePack array of the routing fields in a fixed order and
``payload`` is the MessagePack encoding of the message body with map keys
sorted, so the encoding is a function of the envelope (canonical) and large
``bytes`` travel as raw binary, never base64. The Ed25519 signature covers
every byte before it.

A receiver reads a frame in this order (:func:`open_frame`, :func:`check_signature`,
:func:`decode_payload`; :func:`unseal` does all three): the total size, then
the header alone (at most 64 KiB, decoded with tight limits) to learn the
signer and the behaviour, then the signature over the raw bytes it received
(it never re-encodes to verify), and only then the payload. The payload is
decoded with explicit MessagePack limits and a budget of items, so a frame
built to blow up when decoded costs bounded memory whoever signed it.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from functools import lru_cache
from typing import Any, NamedTuple

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dms.actor.codes import ErrorCode, Refusal
from dms.actor.handle import Address, Handle
from dms.security.identity import SIGNATURE_BYTES, Identity, verify_signature

MAGIC = b"DMS1"
_PREFIX = struct.Struct(">4sI")
PREFIX_BYTES = _PREFIX.size
MAX_HEADER_BYTES = 64 * 1024
NONCE_BYTES = 16
# The most containers and container items a header may hold (it is 14 fields and caps).
MAX_HEADER_ITEMS = 1024
# The default most containers plus container items in one payload. An item costs at
# most ~70 bytes decoded (an empty map in a list), so this bounds a payload's decoded
# size at ~10 MiB plus its raw strings and bytes, whatever the frame was built as.
MAX_PAYLOAD_ITEMS = 128 * 1024

MAX_BEHAVIOUR_CHARS = 512

REPLY_PREFIX = "/dms/actor/replyto/"


class Envelope(BaseModel):
    """One message to a behaviour of an actor (``to``) or of a topic's subscribers."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    to: Handle | None = None
    sender: Handle = Field(alias="from")
    signer: bytes
    behaviour: str = Field(min_length=1, max_length=MAX_BEHAVIOUR_CHARS)
    payload: Any = None
    nonce: bytes = Field(min_length=NONCE_BYTES, max_length=NONCE_BYTES)
    issued_at: int  # unix ns
    expiry: int  # unix ns
    reply_to: str | None = None
    topic: str | None = None
    caps: list[bytes] = []

    @property
    def expects_reply(self) -> bool:
        return self.reply_to is not None


class Sealed(NamedTuple):
    """A decoded envelope with the exact bytes its signature covers.

    (A named tuple, like :class:`Opened`: immutable, and built in a third of the time
    a frozen dataclass takes; two of each are built for every invoke.)"""

    envelope: Envelope
    signed: bytes
    signature: bytes
    size: int
    verified: bool = False  # the signature over ``signed`` was checked before decoding

    @property
    def frame(self) -> bytes:
        """The envelope as it travelled, signature included (to keep or relay)."""
        return self.signed + self.signature


class Opened(NamedTuple):
    """A frame whose header is decoded and whose payload is not, yet.

    ``envelope`` has every routing field and ``payload=None``: enough to check
    time, size class, peer binding and signature before any payload byte is read.
    """

    envelope: Envelope
    frame: bytes
    payload_start: int

    @property
    def size(self) -> int:
        return len(self.frame)


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def now_ns() -> int:
    return time.time_ns()


def reply_path(nonce: bytes) -> str:
    return REPLY_PREFIX + nonce.hex()


def make_envelope(
    sender: Handle,
    signer: bytes,
    behaviour: str,
    payload: Any = None,
    *,
    to: Handle | None = None,
    ttl_s: float,
    expect_reply: bool = False,
    topic: str | None = None,
    caps: list[bytes] | None = None,
    nonce: bytes | None = None,
) -> Envelope:
    nonce = nonce or new_nonce()
    issued = now_ns()
    return _envelope(
        to,
        sender,
        signer,
        behaviour,
        payload,
        nonce,
        issued,
        issued + int(ttl_s * 1e9),
        reply_path(nonce) if expect_reply else None,
        topic,
        caps or [],
    )


_ALL_SET = frozenset(Envelope.model_fields)


def _envelope(
    to: Any,
    sender: Any,
    signer: Any,
    behaviour: Any,
    payload: Any,
    nonce: Any,
    issued_at: Any,
    expiry: Any,
    reply_to: Any,
    topic: Any,
    caps: Any,
) -> Envelope:
    """An :class:`Envelope` of these fields, validated.

    Every envelope on the hot path (each one sent, each header received) is built
    here. When each field already has exactly its declared type and bounds (what
    this module's encoder writes and its callers pass), those checks are the
    validation and the model is filled in directly (pydantic's own validation
    costs ~3 us, and ``model_construct`` more); anything else goes through
    pydantic, which converts what it may and refuses the rest as before.
    """
    if (
        type(sender) is Handle
        and (to is None or type(to) is Handle)
        and type(signer) is bytes
        and type(behaviour) is str
        and 0 < len(behaviour) <= MAX_BEHAVIOUR_CHARS
        and type(nonce) is bytes
        and len(nonce) == NONCE_BYTES
        and type(issued_at) is int
        and type(expiry) is int
        and (reply_to is None or type(reply_to) is str)
        and (topic is None or type(topic) is str)
        and type(caps) is list
        and all(type(c) is bytes for c in caps)
    ):
        return _filled(
            {
                "to": to,
                "sender": sender,
                "signer": signer,
                "behaviour": behaviour,
                "payload": payload,
                "nonce": nonce,
                "issued_at": issued_at,
                "expiry": expiry,
                "reply_to": reply_to,
                "topic": topic,
                "caps": caps,
            }
        )
    return Envelope(
        to=to,
        sender=sender,
        signer=signer,
        behaviour=behaviour,
        payload=payload,
        nonce=nonce,
        issued_at=issued_at,
        expiry=expiry,
        reply_to=reply_to,
        topic=topic,
        caps=caps,
    )


def _filled(values: dict[str, Any]) -> Envelope:
    """The model holding ``values`` (every field, already valid), as ``model_construct``
    builds it, without its per-field Python loop."""
    env = object.__new__(Envelope)
    object.__setattr__(env, "__dict__", values)
    object.__setattr__(env, "__pydantic_fields_set__", set(_ALL_SET))
    object.__setattr__(env, "__pydantic_extra__", None)
    object.__setattr__(env, "__pydantic_private__", None)
    return env


def with_payload(envelope: Envelope, payload: Any) -> Envelope:
    """``envelope`` with ``payload`` (``model_copy(update=...)``, for the hot path)."""
    values = dict(envelope.__dict__)
    values["payload"] = payload
    return _filled(values)


_SCALARS = frozenset({str, bytes, int, float, bool, type(None)})


def _canonical(value: Any) -> Any:
    """Sort map keys recursively so equal payloads encode to equal bytes."""
    kind = type(value)
    if kind in _SCALARS:
        return value
    if isinstance(value, dict):
        for key in value:
            if type(key) is not str:
                raise TypeError(f"payload map keys must be strings, not {type(key).__name__}")
        return {k: v if type(v) in _SCALARS else _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [v if type(v) in _SCALARS else _canonical(v) for v in value]
    if isinstance(value, BaseModel):
        return _canonical(value.model_dump(mode="python", by_alias=True))
    return value


_NO_HANDLE = (None, None, None)


def _handle_fields(handle: Handle | None) -> tuple[Any, ...]:
    if handle is None:
        return _NO_HANDLE
    address = handle.address
    return (handle.id, address.host, address.inbox)


_packers = threading.local()


def _pack(value: Any) -> bytes:
    """``msgpack.packb(value, use_bin_type=True)`` with this thread's packer (a packer
    is not thread-safe; making one per call cost as much as the packing)."""
    try:
        packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(value)  # resets its buffer after each value, and on an error


def encode_payload(payload: Any) -> bytes:
    try:
        return _pack(_canonical(payload))
    except (TypeError, ValueError, OverflowError) as exc:
        raise Refusal(ErrorCode.BAD_PAYLOAD, f"payload cannot be encoded: {exc}") from None


def seal(envelope: Envelope, identity: Identity) -> bytes:
    """Encode and sign; ``identity`` should be the key of ``envelope.signer``."""
    header = _pack(
        [
            *_handle_fields(envelope.to),
            *_handle_fields(envelope.sender),
            envelope.signer,
            envelope.behaviour,
            envelope.nonce,
            envelope.issued_at,
            envelope.expiry,
            envelope.reply_to,
            envelope.topic,
            envelope.caps,
        ]
    )
    body = b"".join((_PREFIX.pack(MAGIC, len(header)), header, encode_payload(envelope.payload)))
    return body + identity.sign(body)


def _split(frame: bytes, max_header: int = MAX_HEADER_BYTES) -> tuple[bytes, int]:
    """The header bytes and where the payload starts; raises ``Refusal(MALFORMED)``,
    or ``Refusal(TOO_LARGE)`` for a header over ``max_header`` (a long token chain)."""
    if len(frame) < PREFIX_BYTES + SIGNATURE_BYTES:
        raise Refusal(ErrorCode.MALFORMED, f"frame of {len(frame)} bytes is too short")
    magic, header_len = _PREFIX.unpack_from(frame)
    if magic != MAGIC:
        raise Refusal(ErrorCode.MALFORMED, "not a dms envelope (bad magic)")
    end = PREFIX_BYTES + header_len
    if end > len(frame) - SIGNATURE_BYTES:
        raise Refusal(ErrorCode.MALFORMED, "header length out of range")
    if header_len > max_header:
        raise Refusal(
            ErrorCode.TOO_LARGE,
            f"a header of {header_len} bytes exceeds {max_header} (tokens it carries included: "
            "a token chain holds at most 8 tokens of 16 KiB in all)",
        )
    return frame[PREFIX_BYTES:end], end


class _Budget:
    """Counts the containers and their items as MessagePack builds them.

    msgpack calls the hooks as each list or map is completed, so a nest of small
    containers is stopped once it holds ``items`` of them, not at the end.
    """

    __slots__ = ("left",)

    def __init__(self, items: int) -> None:
        self.left = items

    def take(self, container: Any) -> Any:
        self.left -= len(container) + 1
        if self.left < 0:
            raise ValueError("too many items")
        return container


def _unpack(data: bytes, max_items: int = MAX_HEADER_ITEMS) -> Any:
    """Decode with explicit limits: no string, bytes, list or map longer than the data
    or than ``max_items``, no extension types, at most ``max_items`` items in all.

    Every object takes at least one byte and the budget counts each container once for
    itself and once in its parent: ``data`` of at most ``max_items // 2`` bytes cannot
    pass the budget, and is decoded without counting (most frames: the hooks cost more
    than the decoding)."""
    size = len(data)
    hooks: dict[str, Any] = {}
    if 2 * size > max_items:
        budget = _Budget(max_items)
        hooks = {"list_hook": budget.take, "object_hook": budget.take}
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=size,
            max_bin_len=size,
            max_array_len=min(size, max_items),
            max_map_len=min(size, max_items),
            max_ext_len=0,
            **hooks,
        )
    except ValueError as exc:
        if "too many items" in str(exc):
            raise Refusal(
                ErrorCode.MALFORMED, f"undecodable: more than {max_items} items"
            ) from None
        if "exceeds max_" in str(exc):
            raise Refusal(ErrorCode.MALFORMED, f"undecodable: {exc}") from None
        raise Refusal(ErrorCode.MALFORMED, f"undecodable: {type(exc).__name__}") from None
    except Exception as exc:  # msgpack raises several unrelated types
        raise Refusal(ErrorCode.MALFORMED, f"undecodable: {type(exc).__name__}") from None


def _handle_from(fields: list[Any]) -> Handle | None:
    key, host, inbox = fields
    if key is None and host is None and inbox is None:
        return None
    if type(key) is not bytes or type(host) is not str or type(inbox) is not str:
        raise Refusal(ErrorCode.MALFORMED, "bad handle in header")
    return _cached_handle(key, host, inbox)


# Handles recur (a node talks to few actors) and are immutable: build each once.
@lru_cache(maxsize=4096)
def _cached_handle(key: bytes, host: str, inbox: str) -> Handle:
    try:
        return Handle(id=key, address=Address(host=host, inbox=inbox))
    except ValidationError as exc:
        raise Refusal(ErrorCode.MALFORMED, f"bad handle: {str(exc).splitlines()[0]}") from None


def _envelope_from_header(header: list[Any], payload: Any) -> Envelope:
    if not isinstance(header, list) or len(header) != 14:
        raise Refusal(ErrorCode.MALFORMED, "header is not a 14-field array")
    try:
        return _envelope(
            _handle_from(header[0:3]),
            _handle_from(header[3:6]),
            header[6],
            header[7],
            payload,
            *header[8:],
        )
    except (ValidationError, TypeError, ValueError) as exc:
        raise Refusal(ErrorCode.MALFORMED, f"bad header: {str(exc).splitlines()[0]}") from None


def peek(frame: bytes) -> Envelope | None:
    """Best effort: the routing fields of a frame that will not be decoded in full.

    Used to address an error reply to the sender of an oversized frame; the
    payload is not read and the result is not authenticated.
    """
    try:
        header, _ = _split(frame, max_header=len(frame))  # an oversized header too
        return _envelope_from_header(_unpack(header), None)
    except Refusal:
        return None


def open_frame(frame: bytes, max_bytes: int) -> Opened:
    """Size check, then the header alone; the payload is left as bytes."""
    if len(frame) > max_bytes:
        raise Refusal(ErrorCode.TOO_LARGE, f"envelope of {len(frame)} bytes exceeds {max_bytes}")
    header, payload_start = _split(frame)
    envelope = _envelope_from_header(_unpack(header), None)
    return Opened(envelope=envelope, frame=frame, payload_start=payload_start)


def check_signature(opened: Opened) -> None:
    """The signature by ``signer`` over the raw bytes received; nothing is re-encoded."""
    frame = opened.frame
    signed = memoryview(frame)[:-SIGNATURE_BYTES]
    if not verify_signature(opened.envelope.signer, frame[-SIGNATURE_BYTES:], signed):
        raise Refusal(ErrorCode.BAD_SIGNATURE, "signature does not match the envelope")


def decode_payload(opened: Opened, *, verified: bool, max_items: int = MAX_PAYLOAD_ITEMS) -> Sealed:
    """The payload, decoded within ``max_items``; ``verified``: the signature was checked."""
    frame = opened.frame
    payload = _unpack(frame[opened.payload_start : -SIGNATURE_BYTES], max_items)
    return Sealed(
        envelope=with_payload(opened.envelope, payload),
        signed=frame[:-SIGNATURE_BYTES],
        signature=frame[-SIGNATURE_BYTES:],
        size=len(frame),
        verified=verified,
    )


def unseal(
    frame: bytes,
    max_bytes: int,
    *,
    signature_checked: bool = False,
    max_items: int = MAX_PAYLOAD_ITEMS,
) -> Sealed:
    """Size, header, signature over the raw bytes, then the payload (bounded).

    ``signature_checked``: the caller verified these very bytes already. The
    binding of signer to sender is checked by :func:`verify`.
    """
    opened = open_frame(frame, max_bytes)
    if not signature_checked:
        check_signature(opened)
    return decode_payload(opened, verified=True, max_items=max_items)


def verify(sealed: Sealed, *, signature_checked: bool = False) -> None:
    """Signature by ``signer`` over the received bytes, and ``signer`` is the sender.

    ``signature_checked``: the caller already verified these very bytes (the
    gossip validator), so only the binding of signer to sender is checked; so is
    an envelope whose signature :func:`unseal` checked before decoding it.
    """
    env = sealed.envelope
    if not (signature_checked or sealed.verified) and not verify_signature(
        env.signer, sealed.signature, sealed.signed
    ):
        raise Refusal(ErrorCode.BAD_SIGNATURE, "signature does not match the envelope")
    check_signer(env)


def check_signer(env: Envelope) -> None:
    if env.signer != env.sender.id:
        raise Refusal(ErrorCode.WRONG_SIGNER, "envelope is signed by a key other than its sender")


def check_time(envelope: Envelope, now: int, max_ttl_s: float, clock_skew_s: float) -> None:
    if envelope.expiry <= now:
        raise Refusal(ErrorCode.EXPIRED, "envelope has expired")
    if envelope.expiry - now > max_ttl_s * 1e9:
        raise Refusal(ErrorCode.EXPIRY_TOO_FAR, f"expiry is more than {max_ttl_s:g} s away")
    if envelope.issued_at - now > clock_skew_s * 1e9:
        raise Refusal(ErrorCode.CLOCK_SKEW, "envelope is issued in the future")
