"""Trust anchors of one context, stored in ``DMS_HOME/cap/<context>.json``.

- ``root``: DIDs trusted fully. Their envelopes pass every capability check of
  this node, and a token chain whose first issuer is a root (or the node
  itself) is anchored here for everything it grants.
- ``require``: tokens that anchor another trust domain. A require token's first
  issuer becomes an authority of this node within the token's capabilities and
  topics, for as long as the token lives: chains it starts are accepted here
  (within that scope), and so are its own envelopes. Joining a group is
  anchoring the token its founder granted you (``dms cap anchor --provide``
  anchors it as both, unless ``--one-way``).
- ``provide``: tokens this node shows. Outgoing envelopes carry the ones that
  cover their behaviour (see ``dms.actor.wallet``).
- ``revoke``: revocations heard or made, kept until the chain they revoke would
  have expired.
- ``issued``: tokens this home granted, so that ``dms cap revoke ID`` finds them.

Tokens are stored as text (``dmscap1...``). Changes go through one store per
file: the running node's, or the CLI's when no node runs.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from dms.errors import DmsError
from dms.security.identity import did_from_public_key, public_key_from_did
from dms.security.tokens import (
    FULL,
    Chain,
    ChainVerifier,
    Revocation,
    Scope,
    TokenError,
    from_text,
    to_text,
    verify_revocation,
)

log = logging.getLogger("dms.security")

MAX_REVOCATIONS = 10_000
Kind = Literal["require", "provide", "issued"]


class TrustError(DmsError):
    """A trust file that cannot be read or a DID that cannot be anchored."""


class TrustAnchors(BaseModel):
    root: list[str] = []
    require: list[str] = []
    provide: list[str] = []
    revoke: list[str] = []
    issued: list[str] = []


@dataclass(frozen=True)
class RevocationOutcome:
    stored: bool
    reason: str  # why not, or what it revoked
    revocation: Revocation | None = None


class TrustStore:
    """Thread-safe view of one context's anchors, written through to disk.

    ``node_key`` is the key of the node this context belongs to: always anchored.
    ``generation`` changes with every change of anchors or revocations, so callers
    can cache what they derive from them.
    """

    def __init__(self, path: Path | None, node_key: bytes | None = None) -> None:
        self.path = path
        self.node_key = node_key
        self.verifier = ChainVerifier()
        self._lock = threading.RLock()
        self._anchors = self._read() if path is not None else TrustAnchors()
        self.generation = 0
        self._root_keys: frozenset[bytes] = frozenset()
        self._provide: list[Chain] = []
        self._authorities: dict[bytes, list[tuple[Chain, Scope]]] = {}
        self._revoked: dict[bytes, int] = {}  # revoked token id -> when the entry may go
        self._rebuild()

    @classmethod
    def for_context(cls, home: Path, context: str, node_key: bytes | None = None) -> TrustStore:
        return cls(Path(home) / "cap" / f"{context}.json", node_key)

    # ---- reading -----------------------------------------------------------------------

    @property
    def anchors(self) -> TrustAnchors:
        with self._lock:
            return self._anchors.model_copy(deep=True)

    def is_root(self, public_key: bytes) -> bool:
        return public_key in self._root_keys

    @property
    def revoked(self) -> frozenset[bytes]:
        return self._revoked_ids

    def is_revoked(self, token_id: bytes) -> bool:
        return token_id in self._revoked_ids

    def provide(self) -> list[Chain]:
        """The chains this node shows, as verified when anchored."""
        return self._provide

    def scopes(self, issuer: bytes, now: float | None = None) -> list[Scope] | None:
        """What a chain first issued by ``issuer`` may grant here; None: not anchored."""
        if issuer == self.node_key or issuer in self._root_keys:
            return [FULL]
        found = self._authorities.get(issuer)
        if not found:
            return None
        now = time.time() if now is None else now
        revoked = self._revoked_ids
        live = [s for c, s in found if c.exp > now and c.ids.isdisjoint(revoked)]
        return live or None

    def listing(self) -> dict[str, Any]:
        """Every anchor with its state, as ``dms cap list`` shows it."""
        now = time.time()
        with self._lock:
            anchors = self._anchors.model_copy(deep=True)
        tokens: list[dict[str, Any]] = []
        kinds: dict[str, list[str]] = {}
        for kind in ("require", "provide", "issued"):
            for text in getattr(anchors, kind):
                kinds.setdefault(text, []).append(kind)
        for text, found in kinds.items():
            tokens.append(self._describe(text, "+".join(found), now))
        revocations = []
        for text in anchors.revoke:
            try:
                rev = verify_revocation(self.verifier, from_text(text))
            except TokenError:
                continue
            revocations.append(
                {
                    "id": rev.revoked_id.hex(),
                    "by": did_from_public_key(rev.token.iss),
                    "until": rev.token.exp,
                }
            )
        return {"root": anchors.root, "tokens": tokens, "revoked": revocations}

    def _describe(self, text: str, kind: str, now: float) -> dict[str, Any]:
        try:
            chain = self.verifier.verify(from_text(text))
        except TokenError as err:
            return {"kind": kind, "status": f"{err.rule}: {err.message}", "token": text}
        status = "valid"
        if chain.exp <= now:
            status = "expired"
        elif not chain.ids.isdisjoint(self._revoked_ids):
            status = "revoked"
        return {
            "kind": kind,
            **chain.token.describe(),
            "chain": chain.length,
            "root": did_from_public_key(chain.root),
            "status": status,
            "token": text,
        }

    def find(self, prefix: str) -> list[Chain]:
        """Anchored or issued tokens whose id starts with ``prefix`` (hex)."""
        prefix = prefix.lower()
        found: dict[bytes, Chain] = {}
        with self._lock:
            texts = [*self._anchors.require, *self._anchors.provide, *self._anchors.issued]
        for text in texts:
            try:
                chain = self.verifier.verify(from_text(text))
            except TokenError:
                continue
            if chain.token.id.hex().startswith(prefix):
                found[chain.token.id] = chain
        return list(found.values())

    # ---- changing ----------------------------------------------------------------------

    def anchor_root(self, did: str) -> bool:
        """Trust ``did`` fully; returns False if it already was."""
        public_key_from_did(did)  # refuses anything that is not an Ed25519 did:key
        with self._lock:
            if did in self._anchors.root:
                return False
            self._anchors.root.append(did)
            self._changed()
            return True

    def remove_root(self, did: str) -> bool:
        with self._lock:
            if did not in self._anchors.root:
                return False
            self._anchors.root.remove(did)
            self._changed()
            return True

    def anchor(self, raw: bytes, kind: Kind) -> tuple[Chain, bool]:
        """Add a token as ``kind``; its chain must pass its own checks (the rule of a
        failure is raised as TokenError). Returns the chain and whether it was new."""
        chain = self.verifier.verify(raw)
        text = to_text(raw)
        with self._lock:
            entries: list[str] = getattr(self._anchors, kind)
            if text in entries:
                return chain, False
            entries.append(text)
            self._changed()
        return chain, True

    def anchor_token(self, raw: bytes, kind: Kind, *, one_way: bool = False) -> dict[str, Any]:
        """What ``dms cap anchor --require|--provide|--issued`` does. A provide token must
        be for this node (or one of its roots); it is anchored as require too (its first
        issuer's chains are accepted here: joining its group) unless ``one_way``."""
        try:
            chain = self.verifier.verify(raw)
        except TokenError as err:
            raise TrustError(f"this token fails {err.rule}: {err.message}") from None
        token = chain.token
        if kind == "provide" and token.aud != self.node_key and not self.is_root(token.aud):
            mine = did_from_public_key(self.node_key) if self.node_key else "this node"
            raise TrustError(
                f"this token is for {did_from_public_key(token.aud)}, not this node ({mine})"
            )
        kinds: list[str] = [kind]
        _, new = self.anchor(raw, kind)
        if kind == "provide" and not one_way:
            self.anchor(raw, "require")
            kinds.append("require")
        return {
            "anchored": "+".join(kinds),
            "new": new,
            "accepts": did_from_public_key(chain.root) if "require" in kinds else None,
            **token.describe(),
            "chain": chain.length,
        }

    def remove_anchor(
        self, *, root: str | None = None, prefix: str | None = None
    ) -> dict[str, Any]:
        """What ``dms cap remove`` does: a root DID, or a token by the start of its id."""
        if root is not None:
            return {"removed": ["root"] if self.remove_root(root) else [], "root": root}
        if not prefix:
            raise TrustError("give a root DID or a token id")
        found = self.find(prefix)
        if len(found) != 1:
            what = "no anchored token" if not found else f"{len(found)} tokens"
            raise TrustError(f"{what} with an id starting {prefix}")
        token_id = found[0].token.id
        return {"removed": self.remove(token_id), "id": token_id.hex()}

    def remove(self, token_id: bytes) -> list[str]:
        """Drop a token from every list that holds it; returns those lists' names."""
        removed: list[str] = []
        with self._lock:
            for kind in ("require", "provide", "issued"):
                entries: list[str] = getattr(self._anchors, kind)
                for text in list(entries):
                    try:
                        chain = self.verifier.verify(from_text(text))
                    except TokenError:
                        continue
                    if chain.token.id == token_id:
                        entries.remove(text)
                        removed.append(kind)
            if removed:
                self._changed()
        return removed

    def add_revocation(self, raw: bytes) -> RevocationOutcome:
        """Store a revocation if it is valid and concerns this node: the chain it revokes
        is anchored here (a chain that is not would be refused anyway), or it revokes a
        token of a chain this node shows (which it then stops showing)."""
        try:
            rev = verify_revocation(self.verifier, raw)
        except TokenError as err:
            return RevocationOutcome(False, f"{err.rule}: {err.message}")
        target = rev.revoked_id
        now = time.time()
        if rev.token.exp <= now:
            return RevocationOutcome(False, "the revoked chain has expired anyway", rev)
        if target in self._revoked_ids:
            return RevocationOutcome(False, "already revoked", rev)
        if self.scopes(rev.target.root, now) is None and not any(
            target in c.ids for c in self._provide
        ):
            return RevocationOutcome(False, "the revoked chain concerns nothing here", rev)
        with self._lock:
            self._prune_revocations(now)
            if len(self._anchors.revoke) >= MAX_REVOCATIONS:
                log.warning("revocation of %s not stored: %d held", target.hex(), MAX_REVOCATIONS)
                return RevocationOutcome(False, "too many revocations held", rev)
            self._anchors.revoke.append(to_text(raw))
            self._changed()
        return RevocationOutcome(True, f"token {target.hex()[:16]} revoked", rev)

    def revocations(self) -> list[bytes]:
        with self._lock:
            return [from_text(t) for t in self._anchors.revoke]

    def _prune_revocations(self, now: float) -> None:
        keep = []
        for text in self._anchors.revoke:
            try:
                if verify_revocation(self.verifier, from_text(text)).token.exp > now:
                    keep.append(text)
            except TokenError:
                continue
        self._anchors.revoke = keep

    # ---- internals ---------------------------------------------------------------------

    def _changed(self) -> None:
        self._write()
        self._rebuild()

    def _rebuild(self) -> None:
        """Derive the lookups the pipeline uses from the stored anchors."""
        with self._lock:
            anchors = self._anchors
            root_keys = self._keys(anchors.root)
            revoked: dict[bytes, int] = {}
            for text in anchors.revoke:
                try:
                    rev = verify_revocation(self.verifier, from_text(text))
                except TokenError as err:
                    log.warning("stored revocation ignored: %s", err)
                    continue
                revoked[rev.revoked_id] = rev.token.exp
            provide = [c for c in (self._chain(t) for t in anchors.provide) if c is not None]
            authorities: dict[bytes, list[tuple[Chain, Scope]]] = {}
            for text in anchors.require:
                chain = self._chain(text)
                if chain is not None:
                    scope = Scope(caps=chain.token.cap, topics=chain.token.topic)
                    authorities.setdefault(chain.root, []).append((chain, scope))
            self._root_keys = root_keys
            self._revoked = revoked
            self._revoked_ids = frozenset(revoked)
            self._provide = provide
            self._authorities = authorities
            self.generation += 1

    def _chain(self, text: str) -> Chain | None:
        try:
            return self.verifier.verify(from_text(text))
        except TokenError as err:
            log.warning("anchored token ignored: %s: %s", err.rule, err.message)
            return None

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
