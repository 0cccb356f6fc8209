"""Actor handles: who an actor is (its public key) and where it lives."""

from __future__ import annotations

from functools import cached_property

from pydantic import BaseModel, ConfigDict, field_validator

from dms.security.identity import PUBLIC_KEY_BYTES, did_from_public_key

ROOT_INBOX = "root"


class Address(BaseModel):
    """Where an actor receives: the libp2p peer id of its host and an inbox name."""

    model_config = ConfigDict(frozen=True)

    host: str
    inbox: str


class Handle(BaseModel):
    """An actor's identity (Ed25519 public key) and address."""

    model_config = ConfigDict(frozen=True, ignored_types=(cached_property,))

    id: bytes
    address: Address

    @field_validator("id")
    @classmethod
    def _key_length(cls, value: bytes) -> bytes:
        if len(value) != PUBLIC_KEY_BYTES:
            raise ValueError(f"actor id must be a 32-byte Ed25519 public key, not {len(value)}")
        return value

    @cached_property
    def did(self) -> str:
        return did_from_public_key(self.id)

    def describe(self) -> dict[str, str]:
        """Plain strings for people and JSON output."""
        return {"did": self.did, "host": self.address.host, "inbox": self.address.inbox}
