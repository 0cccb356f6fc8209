"""Ed25519 identities: one key gives the DID, the actor id and the libp2p peer id.

The DID is ``did:key:z<base58btc(0xed01 || public key)>``. The peer id is the
libp2p identity multihash of the protobuf-encoded public key, written in
base58btc (``12D3KooW...``); it is computed here so that the lower layers do
not import libp2p, and a test checks it against py-libp2p's own derivation.

Envelope signing and verification, the per-message hot path, use libsodium
(PyNaCl): on this project's 2-core machine it verifies in ~70 us against
~120 us for OpenSSL through ``cryptography``, and signs in half the time.
Key storage and sealing stay on ``cryptography``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import base58
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
)
from nacl import bindings as sodium
from nacl.exceptions import BadSignatureError, CryptoError

from dms.errors import DmsError

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
_DID_KEY_PREFIX = "did:key:z"
_ED25519_MULTICODEC = b"\xed\x01"
# protobuf PublicKey{Type: Ed25519 (1), Data: <32 bytes>}
_LIBP2P_KEY_PREFIX = b"\x08\x01\x12\x20"
# identity multihash (code 0x00) of 36 bytes
_IDENTITY_MULTIHASH_PREFIX = b"\x00\x24"


class IdentityError(DmsError):
    """A DID, peer id or key that cannot be parsed."""


# base58 is pure Python (~70 us a call); the keys a node meets are few, so cache.
@lru_cache(maxsize=4096)
def did_from_public_key(public_key: bytes) -> str:
    _check_public_key(public_key)
    return _DID_KEY_PREFIX + base58.b58encode(_ED25519_MULTICODEC + public_key).decode()


@lru_cache(maxsize=4096)
def public_key_from_did(did: str) -> bytes:
    if not did.startswith(_DID_KEY_PREFIX):
        raise IdentityError(f"not an Ed25519 did:key: {did!r}")
    try:
        raw = base58.b58decode(did[len(_DID_KEY_PREFIX) :])
    except ValueError as exc:
        raise IdentityError(f"not an Ed25519 did:key: {did!r}") from exc
    if not raw.startswith(_ED25519_MULTICODEC) or len(raw) != 2 + PUBLIC_KEY_BYTES:
        raise IdentityError(f"not an Ed25519 did:key: {did!r}")
    return raw[2:]


@lru_cache(maxsize=4096)
def peer_id_from_public_key(public_key: bytes) -> str:
    _check_public_key(public_key)
    multihash = _IDENTITY_MULTIHASH_PREFIX + _LIBP2P_KEY_PREFIX + public_key
    return base58.b58encode(multihash).decode()


# A libp2p peer id's multihash: the key itself (identity, code 0x00: Ed25519's
# '12D3KooW...', secp256k1's '16Uiu2...') or its SHA-256 (0x12, 32 bytes: RSA's 'Qm...').
_IDENTITY_MULTIHASH, _SHA256_MULTIHASH = 0x00, 0x12
_MAX_INLINE_KEY_BYTES = 42  # the spec's bound on a key kept inline (identity)


def is_peer_id(text: str) -> bool:
    """Whether ``text`` is a libp2p peer id of any key type (a peer dms pings or dials
    need not be a dms node): a mistyped one is not, and a peer id is not only Ed25519."""
    try:
        raw = base58.b58decode(text)
    except ValueError:
        return False
    if len(raw) < 2 or raw[1] != len(raw) - 2:
        return False
    if raw[0] == _IDENTITY_MULTIHASH:
        return 0 < raw[1] <= _MAX_INLINE_KEY_BYTES
    return raw[0] == _SHA256_MULTIHASH and raw[1] == 32


@lru_cache(maxsize=4096)
def public_key_from_peer_id(peer_id: str) -> bytes:
    """The Ed25519 public key embedded in a ``12D3KooW...`` peer id."""
    try:
        raw = base58.b58decode(peer_id)
    except ValueError as exc:
        raise IdentityError(f"not a peer id: {peer_id!r}") from exc
    prefix = _IDENTITY_MULTIHASH_PREFIX + _LIBP2P_KEY_PREFIX
    if not raw.startswith(prefix) or len(raw) != len(prefix) + PUBLIC_KEY_BYTES:
        raise IdentityError(f"not an Ed25519 peer id: {peer_id!r}")
    return raw[len(prefix) :]


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        sodium.crypto_sign_open(signature + message, public_key)
    except (BadSignatureError, CryptoError, ValueError):
        return False
    return True


def _check_public_key(public_key: bytes) -> None:
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise IdentityError(f"an Ed25519 public key has 32 bytes, not {len(public_key)}")


@dataclass(frozen=True)
class Identity:
    """A private Ed25519 key and the names derived from it (named when first asked: a
    node makes a key for every actor it starts, an allocation's among them, and most
    are never named; their two base58 names cost as much as the key)."""

    private_key: Ed25519PrivateKey = field(repr=False)
    public_key: bytes
    _sodium_secret: bytes = field(repr=False, default=b"", compare=False)

    @cached_property
    def did(self) -> str:
        return did_from_public_key(self.public_key)

    @cached_property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls.from_private_key(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> Identity:
        if len(raw) != 32:
            raise IdentityError(f"an Ed25519 private key has 32 bytes, not {len(raw)}")
        return cls.from_private_key(Ed25519PrivateKey.from_private_bytes(raw))

    @classmethod
    def from_private_key(cls, key: Ed25519PrivateKey) -> Identity:
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        _check_public_key(public)
        return cls(private_key=key, public_key=public, _sodium_secret=seed + public)

    def private_bytes(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def sign(self, message: bytes) -> bytes:
        return sodium.crypto_sign(message, self._sodium_secret)[:SIGNATURE_BYTES]
