"""Trust anchors of one context, stored in ``DMS_HOME/cap/<context>.json``.

``root`` DIDs are trusted fully: their envelopes pass every capability check
of this node. ``require`` and ``provide`` hold capability tokens (verified by
the capability issue; stored as they come until then).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from pydantic import BaseModel, ValidationError

from dms.errors import DmsError
from dms.security.identity import public_key_from_did


class TrustError(DmsError):
    """A trust file that cannot be read or a DID that cannot be anchored."""


class TrustAnchors(BaseModel):
    root: list[str] = []
    require: list[str] = []
    provide: list[str] = []


class TrustStore:
    """Thread-safe view of one context's anchors, written through to disk."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._anchors = self._read() if path is not None else TrustAnchors()
        self._root_keys = self._keys(self._anchors.root)

    @classmethod
    def for_context(cls, home: Path, context: str) -> TrustStore:
        return cls(Path(home) / "cap" / f"{context}.json")

    @property
    def anchors(self) -> TrustAnchors:
        with self._lock:
            return self._anchors.model_copy(deep=True)

    def is_root(self, public_key: bytes) -> bool:
        return public_key in self._root_keys

    def anchor_root(self, did: str) -> bool:
        """Trust ``did`` fully; returns False if it already was."""
        public_key_from_did(did)  # refuses anything that is not an Ed25519 did:key
        with self._lock:
            if did in self._anchors.root:
                return False
            self._anchors.root.append(did)
            self._root_keys = self._keys(self._anchors.root)
            self._write()
            return True

    def _read(self) -> TrustAnchors:
        assert self.path is not None
        if not self.path.exists():
            return TrustAnchors()
        try:
            anchors = TrustAnchors.model_validate_json(self.path.read_bytes())
            self._keys(anchors.root)
        except (ValidationError, ValueError, DmsError) as exc:
            first = str(exc).splitlines()[0]
            raise TrustError(f"trust file {self.path} is corrupted: {first}") from None
        return anchors

    def _write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._anchors.model_dump(), indent=2))
        os.replace(tmp, self.path)

    @staticmethod
    def _keys(dids: list[str]) -> frozenset[bytes]:
        return frozenset(public_key_from_did(d) for d in dids)
