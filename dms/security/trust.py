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
  have expired. Only a token's issuer or one above it in its chain may revoke it;
  a revocation heard is kept only if the token is known here (in a chain this
  node verified or anchored) and its chain is anchored here; each issuer holds
  at most ``revocations_per_issuer`` and the store ``max_revocations`` in all.
  Nothing stored is ever pushed out by a newer revocation (only expiry removes
  one), and the revocations of this node, its roots and its authorities are
  stored past both limits: junk cannot crowd out a real revocation. Checking
  a heard revocation's signatures is budgeted (``revocation_budget``). See
  ``specs/security.md``, "Revocations".
- ``issued``: tokens this home granted, so that ``dms cap revoke ID`` finds them.

Tokens are stored as text (``dmscap1...``). Changes go through one store per
file: the running node's, or the CLI's when no node runs.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from dms.errors import DmsError
from dms.files import write_private
from dms.security.budget import WorkBudget
from dms.security.identity import did_from_public_key, public_key_from_did
from dms.security.tokens import (
    FULL,
    Chain,
    ChainVerifier,
    OverBudget,
    Revocation,
    Scope,
    TokenError,
    from_text,
    read_revocation,
    to_text,
    verify_revocation,
)

log = logging.getLogger("dms.security")

Kind = Literal["require", "provide", "issued"]


@dataclass(frozen=True)
class TrustLimits:
    """What remote peers may make the trust store hold and check (``dms.config``)."""

    max_revocations: int = 10_000  # stored in all (this node's and its authorities' apart)
    revocations_per_issuer: int = 256  # stored per revoking key (same exception)
    revocation_checks_per_s: float = 50.0  # heard revocations verified a second, all peers
    revocation_checks_per_peer_per_s: float = 5.0  # ... from one peer
    chain_checks_per_s: float = 200.0  # new token chains verified a second, all peers
    chain_checks_per_peer_per_s: float = 20.0  # ... from one peer

    def revocation_budget(self) -> WorkBudget:
        return WorkBudget(
            "revocation checks",
            rate=self.revocation_checks_per_s,
            burst=max(1, int(self.revocation_checks_per_s * 4)),
            peer_rate=self.revocation_checks_per_peer_per_s,
            peer_burst=max(1, int(self.revocation_checks_per_peer_per_s * 4)),
        )

    def chain_budget(self) -> WorkBudget:
        return WorkBudget(
            "token chain checks",
            rate=self.chain_checks_per_s,
            burst=max(1, int(self.chain_checks_per_s * 2)),
            peer_rate=self.chain_checks_per_peer_per_s,
            peer_burst=max(1, int(self.chain_checks_per_peer_per_s * 2)),
        )


@dataclass(frozen=True)
class _Held:
    """A stored revocation: its text, who made it, until when it matters."""

    text: str
    issuer: bytes
    exp: int


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
    # For /metrics: stored, already, invalid, expired, unknown_token, unanchored,
    # issuer_full, store_full, over_budget.
    outcome: str = "stored"


class TrustStore:
    """Thread-safe view of one context's anchors, written through to disk.

    ``node_key`` is the key of the node this context belongs to: always anchored.
    ``generation`` changes with every change of anchors or revocations, so callers
    can cache what they derive from them.
    """

    def __init__(
        self,
        path: Path | None,
        node_key: bytes | None = None,
        limits: TrustLimits | None = None,
    ) -> None:
        self.path = path
        self.node_key = node_key
        self.limits = limits or TrustLimits()
        self.verifier = ChainVerifier()
        self.revocation_budget = self.limits.revocation_budget()
        self.chain_budget = self.limits.chain_budget()  # used by dms.actor.policy
        self.revocation_outcomes: Counter[str] = Counter()
        self._lock = threading.RLock()
        self._anchors = self._read() if path is not None else TrustAnchors()
        self.generation = 0
        self._root_keys: frozenset[bytes] = frozenset()
        self._provide: list[Chain] = []
        self._authorities: dict[bytes, list[tuple[Chain, Scope]]] = {}
        self._revoked_ids: frozenset[bytes] = frozenset()
        self._held: dict[bytes, _Held] = {}  # revoked token id -> its revocation
        self._per_issuer: Counter[bytes] = Counter()
        self._load_revocations()
        self._rebuild()

    @classmethod
    def for_context(
        cls,
        home: Path,
        context: str,
        node_key: bytes | None = None,
        limits: TrustLimits | None = None,
    ) -> TrustStore:
        return cls(Path(home) / "cap" / f"{context}.json", node_key, limits)

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
        with self._lock:
            held = list(self._held.items())
        revocations = [
            {"id": target.hex(), "by": did_from_public_key(h.issuer), "until": h.exp}
            for target, h in held
        ]
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

    def privileged(self, key: bytes) -> bool:
        """This node, a root or an authority anchored here: its revocations are stored
        past the limits, and its envelopes' revocations are checked outside the
        budget for the others."""
        return self.scopes(key) is not None

    def add_revocation(
        self, raw: bytes, *, local: bool = False, peer: str | None = None
    ) -> RevocationOutcome:
        """Store a revocation if it is valid and concerns this node: the chain it revokes
        is anchored here (a chain that is not would be refused anyway), or it revokes a
        token of a chain this node shows (which it then stops showing).

        ``local``: made on this node (``dms cap revoke``): kept even if the token was
        never seen here. Else the token must be known here, and ``peer`` (who sent
        it; None: outside any budget) is charged before any signature is checked.
        Everything that needs no signature is checked first, so junk costs no
        signature work; nothing stored is ever dropped to make room."""
        outcome = self._add_revocation(raw, local, peer)
        self.revocation_outcomes[outcome.outcome] += 1
        return outcome

    def _add_revocation(self, raw: bytes, local: bool, peer: str | None) -> RevocationOutcome:
        try:
            claim = read_revocation(raw)
        except TokenError as err:
            return RevocationOutcome(False, f"{err.rule}: {err.message}", outcome="invalid")
        target = claim.target.id
        now = time.time()
        if target in self._revoked_ids:
            return RevocationOutcome(False, "already revoked", outcome="already")
        if claim.token.exp <= now:
            return RevocationOutcome(
                False, "the revoked chain has expired anyway", outcome="expired"
            )
        shown = any(target in c.ids for c in self._provide)
        if not local and not shown and not self.verifier.is_known(target):
            return RevocationOutcome(
                False,
                f"token {target.hex()[:16]} is not known here (revocations of tokens this "
                "node never saw are not kept)",
                outcome="unknown_token",
            )
        if self.scopes(claim.root, now) is None and not shown:
            return RevocationOutcome(
                False, "the revoked chain concerns nothing here", outcome="unanchored"
            )
        issuer = claim.token.iss
        privileged = local or self.privileged(issuer)
        if not privileged and self._per_issuer[issuer] >= self.limits.revocations_per_issuer:
            log.warning(
                "revocation of %s not stored: %s holds %d revocations already",
                target.hex()[:16],
                did_from_public_key(issuer),
                self.limits.revocations_per_issuer,
            )
            return RevocationOutcome(
                False,
                f"{did_from_public_key(issuer)} holds {self.limits.revocations_per_issuer} "
                "revocations here already (revocations_per_issuer)",
                outcome="issuer_full",
            )

        def charge() -> None:
            why = self.revocation_budget.take(peer)
            if why is not None:
                raise OverBudget(why)

        try:
            rev = verify_revocation(self.verifier, raw, charge)
        except OverBudget as err:
            return RevocationOutcome(False, f"{err.rule}: {err.message}", outcome="over_budget")
        except TokenError as err:
            return RevocationOutcome(False, f"{err.rule}: {err.message}", outcome="invalid")
        with self._lock:
            if target in self._held:
                return RevocationOutcome(False, "already revoked", rev, outcome="already")
            self._prune_revocations(now)
            if not privileged and len(self._held) >= self.limits.max_revocations:
                log.warning(
                    "revocation of %s not stored: %d held (max_revocations)",
                    target.hex()[:16],
                    len(self._held),
                )
                return RevocationOutcome(
                    False,
                    f"this node holds {len(self._held)} revocations (max_revocations)",
                    rev,
                    outcome="store_full",
                )
            self._hold(target, _Held(to_text(raw), rev.token.iss, rev.token.exp))
            self._changed()
        return RevocationOutcome(True, f"token {target.hex()[:16]} revoked", rev)

    def revocations(self) -> list[bytes]:
        with self._lock:
            return [from_text(h.text) for h in self._held.values()]

    def revocations_by(self, keys: set[bytes]) -> list[bytes]:
        """The stored revocations made by one of ``keys`` (verified when stored)."""
        with self._lock:
            return [from_text(h.text) for h in self._held.values() if h.issuer in keys]

    def _hold(self, target: bytes, held: _Held) -> None:
        self._held[target] = held
        self._per_issuer[held.issuer] += 1

    def _prune_revocations(self, now: float) -> None:
        """Drop the revocations whose chain has expired anyway (no signature check)."""
        for target, held in list(self._held.items()):
            if held.exp <= now:
                del self._held[target]
                self._per_issuer[held.issuer] -= 1
                if self._per_issuer[held.issuer] <= 0:
                    del self._per_issuer[held.issuer]

    def _load_revocations(self) -> None:
        """Verify the stored revocations once, at start."""
        for text in self._anchors.revoke:
            try:
                rev = verify_revocation(self.verifier, from_text(text))
            except TokenError as err:
                log.warning("stored revocation ignored: %s", err)
                continue
            self._hold(rev.revoked_id, _Held(text, rev.token.iss, rev.token.exp))

    # ---- internals ---------------------------------------------------------------------

    def _changed(self) -> None:
        with self._lock:
            self._anchors.revoke = [h.text for h in self._held.values()]
            self._write()
            self._rebuild()

    def _rebuild(self) -> None:
        """Derive the lookups the pipeline uses from the stored anchors."""
        with self._lock:
            anchors = self._anchors
            root_keys = self._keys(anchors.root)
            provide = [c for c in (self._chain(t) for t in anchors.provide) if c is not None]
            authorities: dict[bytes, list[tuple[Chain, Scope]]] = {}
            for text in anchors.require:
                chain = self._chain(text)
                if chain is not None:
                    scope = Scope(caps=chain.token.cap, topics=chain.token.topic)
                    authorities.setdefault(chain.root, []).append((chain, scope))
            self._root_keys = root_keys
            self._revoked_ids = frozenset(self._held)
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
        write_private(self.path, json.dumps(self._anchors.model_dump(), indent=2))

    @staticmethod
    def _keys(dids: list[str]) -> frozenset[bytes]:
        return frozenset(public_key_from_did(d) for d in dids)
