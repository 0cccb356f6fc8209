"""Messages as bytes: what the network will carry between data owner and worker."""

from __future__ import annotations

from typing import TypeVar

import msgpack
from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


def encode(message: BaseModel) -> bytes:
    return msgpack.packb(message.model_dump(mode="python"), use_bin_type=True)


def decode(kind: type[M], raw: bytes) -> M:
    return kind.model_validate(msgpack.unpackb(raw, raw=False))


class Wire:
    """Carries each message through its byte encoding, counting (and optionally keeping) bytes."""

    def __init__(self, keep_to_worker: bool = False) -> None:
        self.bytes_to_worker = 0
        self.bytes_to_owner = 0
        self.keep_to_worker = keep_to_worker
        self.to_worker_log: list[bytes] = []

    def to_worker(self, message: M) -> M:
        raw = encode(message)
        self.bytes_to_worker += len(raw)
        if self.keep_to_worker:
            self.to_worker_log.append(raw)
        return decode(type(message), raw)

    def to_owner(self, message: M) -> M:
        raw = encode(message)
        self.bytes_to_owner += len(raw)
        return decode(type(message), raw)
