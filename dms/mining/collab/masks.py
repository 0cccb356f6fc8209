"""Keys and masks: X25519 agreement, per-round seeds (HKDF), a ChaCha20 stream, sealed shares.

Each owner holds three keys for one collaboration (Bonawitz et al. 2017): an
Ed25519 key that signs its messages, an X25519 key ``c`` that seals the
secret shares it sends to each other owner, and an X25519 key ``s`` whose
agreement with each other owner's ``s`` gives the pairwise mask secret.
Neither is ever split or rebuilt: a dropout stops the collaboration rather
than have an owner's pairwise masks removed (``specs/mining.md``).
"""

from __future__ import annotations

import hashlib

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dms.mining.errors import MiningError

_RAW = serialization.Encoding.Raw
_RAW_PUBLIC = serialization.PublicFormat.Raw
_RAW_PRIVATE = serialization.PrivateFormat.Raw
_NONE = serialization.NoEncryption()
NONCE_BYTES = 12


def public_bytes(key: X25519PrivateKey | Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(_RAW, _RAW_PUBLIC)


def private_bytes(key: X25519PrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(_RAW, _RAW_PRIVATE, _NONE)


def x25519_public(raw: bytes, what: str) -> X25519PublicKey:
    try:
        return X25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise MiningError(f"{what} is not an X25519 public key") from None


def agree(private: X25519PrivateKey, public: X25519PublicKey) -> bytes:
    try:
        return private.exchange(public)
    except ValueError:  # a low-order point gives the all-zero secret
        raise MiningError("key agreement with a degenerate X25519 public key") from None


def derive(secret: bytes, *parts: object) -> bytes:
    """32 bytes bound to ``parts`` (a label, the collaboration id, a round, ...)."""
    info = "/".join(["dms-collab", *(str(p) for p in parts)]).encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def stream(seed: bytes, length: int) -> np.ndarray:
    """``length`` pseudo-random ring elements (ChaCha20 keystream) from a 32-byte seed."""
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(encryptor.update(b"\0" * (8 * length)), dtype="<u8").astype(np.uint64)


def commitment(seed: bytes, *parts: object) -> bytes:
    """A binding hash of a self-mask seed, so a rebuilt seed can be checked."""
    return hashlib.sha256(derive(seed, "commit", *parts)).digest()


def seal(key: bytes, plaintext: bytes, aad: bytes, nonce: bytes) -> bytes:
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, sealed: bytes, aad: bytes, what: str) -> bytes:
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    except (InvalidTag, ValueError):
        raise MiningError(f"{what} does not open (forged, altered or meant for another)") from None


def verify(public: bytes, signature: bytes, payload: bytes, what: str) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, payload)
    except (InvalidSignature, ValueError):
        raise MiningError(f"{what}: bad signature") from None
