"""Refusal codes and the exceptions that carry them.

Every refusal of the receive pipeline has its own code, so a caller (or a
script reading ``--json``) can tell a bad signature from an expired message
without parsing prose. See ``specs/actor.md``.
"""

from __future__ import annotations

from enum import StrEnum

from dms.errors import DmsError


class ErrorCode(StrEnum):
    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    EXPIRED = "expired"
    EXPIRY_TOO_FAR = "expiry_too_far"
    CLOCK_SKEW = "clock_skew"
    BAD_SIGNATURE = "bad_signature"
    WRONG_SIGNER = "wrong_signer"
    REPLAYED = "replayed"
    UNKNOWN_ACTOR = "unknown_actor"
    UNKNOWN_BEHAVIOUR = "unknown_behaviour"
    FORBIDDEN = "forbidden"
    BAD_PAYLOAD = "bad_payload"
    HANDLER_ERROR = "handler_error"
    UNREACHABLE = "unreachable"
    TIMEOUT = "timeout"
    STOPPED = "stopped"
    # A broadcast for a behaviour that its subscribers did not declare for that topic.
    NOT_FOR_TOPIC = "not_for_topic"
    # A broadcast that asks for a reply (every subscriber would answer: amplification).
    BROADCAST_REPLY = "broadcast_reply"
    # Issued before the oldest envelope the full replay cache still remembers.
    REPLAY_WINDOW = "replay_window"
    # The transport: a peer sent more frames a second than it may (max_frames_per_s).
    RATE_LIMITED = "rate_limited"
    # The transport: the queue to a peer is full (it is not reading); the frame failed.
    OUTBOX_FULL = "outbox_full"
    # The local API: the caller did not prove it can read DMS_HOME (no or a wrong token).
    UNAUTHORIZED = "unauthorized"
    # The local API: a Host header that is not a loopback name (a browser page's request).
    BAD_HOST = "bad_host"
    # The local API: as many connections are open as it serves (api_max_connections).
    BUSY = "busy"
    # What a request names is not on this node (a deployment, a collaboration): a
    # user's mistake, said with where the right name is found.
    NOT_FOUND = "not_found"


class Refusal(Exception):
    """Raised inside the runtime or a handler to refuse a message with a code.

    A handler may raise it with any code (usually ``BAD_PAYLOAD`` or
    ``FORBIDDEN``); the caller receives it as a :class:`RemoteError`. ``rule``
    names the capability rule that failed, for a ``forbidden`` refusal
    (``dms.security.tokens.Rule``): it travels in the error reply.
    """

    def __init__(self, code: ErrorCode | str, reason: str, rule: str | None = None) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = str(code)
        self.reason = reason
        self.rule = None if rule is None else str(rule)


class RemoteError(DmsError):
    """An error reply: the receiver (or the runtime on the way) refused the request."""

    def __init__(self, code: str, reason: str, rule: str | None = None) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
        self.rule = rule


class InvokeTimeout(RemoteError):
    """No reply came before the request expired."""

    def __init__(self, reason: str) -> None:
        super().__init__(ErrorCode.TIMEOUT, reason)


class Unreachable(RemoteError):
    """The transport could not hand the message to the destination's host."""

    def __init__(self, reason: str) -> None:
        super().__init__(ErrorCode.UNREACHABLE, reason)
