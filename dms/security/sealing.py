"""Passphrase sealing: scrypt key derivation + AES-256-GCM, shared by every secret at rest."""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from pydantic import BaseModel

from dms.errors import DmsError

DEFAULT_SCRYPT_N = 2**15


class WrongPassphrase(DmsError):
    """The passphrase does not open the box (or the box was altered)."""


class ScryptParams(BaseModel):
    n: int = DEFAULT_SCRYPT_N
    r: int = 8
    p: int = 1
    salt: str  # hex


class SealedBox(BaseModel):
    kdf: str = "scrypt"
    kdf_params: ScryptParams
    cipher: str = "aes-256-gcm"
    nonce: str  # hex
    ciphertext: str  # hex


def _derive(passphrase: str, params: ScryptParams) -> bytes:
    kdf = Scrypt(salt=bytes.fromhex(params.salt), length=32, n=params.n, r=params.r, p=params.p)
    return kdf.derive(passphrase.encode())


def seal(
    passphrase: str, plaintext: bytes, associated: bytes, n: int = DEFAULT_SCRYPT_N
) -> SealedBox:
    params = ScryptParams(n=n, salt=os.urandom(16).hex())
    nonce = os.urandom(12)
    ciphertext = AESGCM(_derive(passphrase, params)).encrypt(nonce, plaintext, associated)
    return SealedBox(kdf_params=params, nonce=nonce.hex(), ciphertext=ciphertext.hex())


def unseal(passphrase: str, box: SealedBox, associated: bytes) -> bytes:
    try:
        return AESGCM(_derive(passphrase, box.kdf_params)).decrypt(
            bytes.fromhex(box.nonce), bytes.fromhex(box.ciphertext), associated
        )
    except InvalidTag:
        raise WrongPassphrase("wrong passphrase (or the sealed data was altered)") from None
