"""Keys encrypted at rest under ``DMS_HOME/key/<context>.json``.

The private key is sealed with AES-256-GCM under a key derived from the
passphrase by scrypt. The public key, DID and peer id are stored in clear so
that ``dms key did`` and ``dms key list`` need no passphrase; they are bound to
the ciphertext as associated data, so a file whose public part was swapped
fails to open.

By default the passphrase comes from this terminal's agent (``dms unlock``), the OS
keyring if this home opted in, ``DMS_PASSPHRASE``, then a prompt, in that order
(:mod:`dms.security.passphrase`).
"""

from __future__ import annotations

import getpass
import os
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ValidationError

from dms.errors import DmsError
from dms.security.identity import Identity, did_from_public_key, peer_id_from_public_key
from dms.security.passphrase import PassphraseLookup, open_with
from dms.security.sealing import (
    DEFAULT_SCRYPT_N,
    ScryptParams,
    SealedBox,
    WrongPassphrase,
    seal,
    unseal,
)

KEYSTORE_VERSION = 1
CONTEXT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
PASSPHRASE_ENV = "DMS_PASSPHRASE"


class KeystoreError(DmsError):
    """A key that cannot be created, found or opened."""


class KeyFile(BaseModel):
    """The JSON document of one key file."""

    version: int = KEYSTORE_VERSION
    context: str
    did: str
    peer_id: str
    public_key: str  # hex
    created_at: str
    kdf: str = "scrypt"
    kdf_params: ScryptParams
    cipher: str = "aes-256-gcm"
    nonce: str  # hex
    ciphertext: str  # hex


class KeyInfo(BaseModel):
    context: str
    did: str
    peer_id: str
    created_at: str
    path: str


PassphraseSource = Callable[[str, bool], str]


def passphrase_from_env_or_prompt(context: str, confirm: bool, *, what: str = "") -> str:
    """``DMS_PASSPHRASE`` if set, else an interactive prompt; never empty. ``what`` names
    what it seals when that is more than key ``context`` (``dms init``: both keys)."""
    what = what or f"key '{context}'"
    value = os.environ.get(PASSPHRASE_ENV)
    if value is None:
        if not sys.stdin.isatty():
            raise KeystoreError(
                f"no passphrase for {what}: set {PASSPHRASE_ENV} or run in a terminal"
            )
        value = getpass.getpass(f"Passphrase for {what}: ")
        if confirm and getpass.getpass("Repeat passphrase: ") != value:
            raise KeystoreError("the two passphrases differ")
    if not value:
        raise KeystoreError(f"the passphrase for {what} must not be empty")
    return value


def session_passphrase(home: Path) -> PassphraseLookup:
    """What every command asks: the agent, the keyring (opted in), the env, a prompt."""
    return PassphraseLookup(home, passphrase_from_env_or_prompt)


def _associated_data(context: str, public_key_hex: str) -> bytes:
    return f"dms-keystore/v{KEYSTORE_VERSION}/{context}/{public_key_hex}".encode()


class Keystore:
    """The key folder of one ``DMS_HOME``."""

    def __init__(
        self,
        home: Path,
        passphrase: PassphraseSource | None = None,
        scrypt_n: int = DEFAULT_SCRYPT_N,
    ) -> None:
        self.folder = Path(home) / "key"
        self._passphrase = passphrase or session_passphrase(Path(home))
        self._scrypt_n = scrypt_n

    def path(self, context: str) -> Path:
        if not CONTEXT_PATTERN.match(context):
            raise KeystoreError(
                f"invalid key context {context!r}: use lowercase letters, digits, '-' or '_'"
            )
        return self.folder / f"{context}.json"

    def exists(self, context: str) -> bool:
        return self.path(context).exists()

    def new(self, context: str, identity: Identity | None = None) -> KeyInfo:
        path = self.path(context)
        if path.exists():
            info = self.info(context)
            raise KeystoreError(f"key '{context}' already exists ({info.did}); not overwritten")
        passphrase = self._passphrase(context, True)
        identity = identity or Identity.generate()
        public_hex = identity.public_key.hex()
        box = seal(
            passphrase,
            identity.private_bytes(),
            _associated_data(context, public_hex),
            n=self._scrypt_n,
        )
        doc = KeyFile(
            context=context,
            did=identity.did,
            peer_id=identity.peer_id,
            public_key=public_hex,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            kdf_params=box.kdf_params,
            nonce=box.nonce,
            ciphertext=box.ciphertext,
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        tmp = path.with_suffix(".tmp")
        # Created with 0600 from the start: the file never exists world-readable.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(doc.model_dump_json(indent=2))
        os.replace(tmp, path)
        return self._info(doc, path)

    def load(self, context: str) -> Identity:
        """Decrypt the key of ``context``; a wrong passphrase is a clean error."""
        doc = self._read(context)
        box = SealedBox(kdf_params=doc.kdf_params, nonce=doc.nonce, ciphertext=doc.ciphertext)
        associated = _associated_data(context, doc.public_key)
        try:
            raw = open_with(self._passphrase, context, lambda p: unseal(p, box, associated))
        except WrongPassphrase:
            raise KeystoreError(
                f"wrong passphrase for key '{context}' (or its file was altered)"
            ) from None
        except ValueError as exc:
            raise KeystoreError(f"key file {self.path(context)} is corrupted: {exc}") from None
        identity = Identity.from_private_bytes(raw)
        if identity.public_key.hex() != doc.public_key:
            raise KeystoreError(f"key file {self.path(context)} is corrupted: key mismatch")
        return identity

    def info(self, context: str) -> KeyInfo:
        return self._info(self._read(context), self.path(context))

    def list(self) -> list[KeyInfo]:
        if not self.folder.is_dir():
            return []
        return [self.info(p.stem) for p in sorted(self.folder.glob("*.json"))]

    def _read(self, context: str) -> KeyFile:
        path = self.path(context)
        if not path.exists():
            raise KeystoreError(f"no key '{context}' in {self.folder}; run `dms key new {context}`")
        try:
            doc = KeyFile.model_validate_json(path.read_bytes())
        except (ValidationError, ValueError) as exc:
            first = str(exc).splitlines()[0]
            raise KeystoreError(f"key file {path} is corrupted: {first}") from None
        if doc.version != KEYSTORE_VERSION:
            raise KeystoreError(f"key file {path} has unsupported version {doc.version}")
        try:
            public = bytes.fromhex(doc.public_key)
            consistent = (
                did_from_public_key(public) == doc.did
                and peer_id_from_public_key(public) == doc.peer_id
            )
        except (ValueError, DmsError):
            consistent = False
        if not consistent:
            raise KeystoreError(f"key file {path} is corrupted: names do not match the key")
        return doc

    @staticmethod
    def _info(doc: KeyFile, path: Path) -> KeyInfo:
        return KeyInfo(
            context=doc.context,
            did=doc.did,
            peer_id=doc.peer_id,
            created_at=doc.created_at,
            path=str(path),
        )
