"""The optional OS keyring (``pip install 'dms[keyring]'``): ``dms unlock --keyring``.

The passphrase goes to the user's keyring (Secret Service, KWallet, macOS Keychain,
Windows Credential Locker) through the ``keyring`` package, and only to a backend
that keyring itself recommends (priority >= 1) and that does not keep secrets in
plain text. Lookups ask the keyring only for a home whose user opted in: the
marker ``DMS_HOME/keyring.json`` (service and account, never the secret), so a
home that never did costs no keyring call, and no desktop unlock prompt.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from dms.errors import DmsError
from dms.security.agent import home_key

SERVICE = "dms"
MARKER = "keyring.json"
# Backends that keep secrets nowhere, or on disk in the clear (or merely encoded).
_UNSAFE = ("fail", "null", "plaintext", "insecure", "uncrypted")


class KeyringError(DmsError):
    """The OS keyring cannot be used as asked."""


class OptIn(BaseModel):
    """The marker file: where the passphrase of this home is, not what it is."""

    service: str = SERVICE
    account: str
    backend: str
    stored_at: str


def account(home: Path | str) -> str:
    return f"passphrase:{home_key(home)}"


def _keyring() -> Any:
    try:
        import keyring
    except ImportError:
        raise KeyringError(
            "--keyring needs the keyring package: pip install 'dms[keyring]'"
        ) from None
    return keyring


def describe(backend: Any) -> str:
    kind = type(backend)
    return f"{kind.__module__}.{kind.__name__}"


def _unsafe(backend: Any) -> bool:
    name = describe(backend).lower()
    try:
        priority = float(backend.priority)
    except Exception:  # a backend that cannot tell is not one to trust
        return True
    return priority < 1 or any(word in name for word in _UNSAFE)


def secure_backend() -> Any:
    """The configured keyring backend, if it is safe to hold a passphrase."""
    keyring = _keyring()
    backend = keyring.get_keyring()
    # A chain writes to the first backend that accepts; each must be safe.
    chained = list(getattr(backend, "backends", None) or []) or [backend]
    bad = [b for b in chained if _unsafe(b)]
    if bad:
        raise KeyringError(
            f"keyring backend {describe(bad[0])} keeps secrets in plain text or nowhere: "
            "nothing stored (install a secure one, or dms unlock without --keyring)"
        )
    return backend


def marker_path(home: Path) -> Path:
    return Path(home).expanduser() / MARKER


def opted_in(home: Path) -> OptIn | None:
    path = marker_path(home)
    if not path.exists():
        return None
    try:
        return OptIn.model_validate_json(path.read_bytes())
    except (ValidationError, ValueError, OSError):
        return None  # a damaged marker: as if not opted in; 'dms unlock --keyring' rewrites it


def store(home: Path, passphrase: str) -> OptIn:
    backend = secure_backend()
    try:
        backend.set_password(SERVICE, account(home), passphrase)
    except Exception as exc:  # keyring backends raise their own kinds (locked, D-Bus gone)
        raise KeyringError(f"the keyring refused: {exc}".splitlines()[0]) from None
    marker = OptIn(
        account=account(home),
        backend=describe(backend),
        stored_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    path = marker_path(home)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(marker.model_dump_json(indent=2) + "\n")
    os.replace(tmp, path)
    return marker


def fetch(home: Path) -> str | None:
    """The passphrase from the keyring, only if this home opted in; None otherwise,
    and None (not an error) when the keyring cannot be asked: the caller asks elsewhere."""
    marker = opted_in(home)
    if marker is None:
        return None
    try:
        value = _keyring().get_keyring().get_password(marker.service, marker.account)
    except Exception:  # KeyringError included: no package, a locked or absent backend
        return None
    return value if isinstance(value, str) and value else None


def delete(home: Path) -> bool:
    """Remove the passphrase from the keyring and the marker; whether one was stored.
    Without the marker, a keyring that cannot be asked holds nothing of ours."""
    marker = opted_in(home)
    found = False
    try:
        backend = _keyring().get_keyring()
        if backend.get_password(SERVICE, account(home)) is not None:
            backend.delete_password(SERVICE, account(home))
            found = True
    except Exception as exc:  # KeyringError included, and each backend's own kinds
        if marker is not None:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise KeyringError(f"the keyring refused, nothing deleted: {reason}") from None
    path = marker_path(home)
    if path.exists():
        path.unlink()
        found = True
    return found
