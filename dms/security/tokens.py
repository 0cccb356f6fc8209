"""Capability tokens: UCAN-style signed delegations, their chains, and the rules they obey.

A token says: ``iss`` lets ``aud`` (acting for ``sub``) use the capabilities
``cap`` (behaviour paths; a path implies every path below it, ``/`` implies
all) and, for broadcasts, the topics ``topic``, until ``exp`` (unix seconds).
``act`` is what the audience may do with it: ``invoke`` (call behaviours),
``broadcast`` (publish on topics), ``delegate`` (both, and issue narrower
tokens to others while ``depth`` allows), or ``revoke`` (a revocation, see
below). ``prf`` holds the parent token as it travelled (its bytes, signature
included), so a token carries its whole chain up to the first issuer.

Wire format: a MessagePack array ``[body, sig]``. ``body`` is the MessagePack
encoding of the fields as a map with sorted keys (``act, aud, cap, depth, exp,
iss, nonce, prf, sub, topic, v``; keys are 32-byte Ed25519 public keys), and
``sig`` is the issuer's Ed25519 signature over those exact bytes. A token's id
is the sha256 of its body. For people it is written ``dmscap1`` + base58.

:class:`ChainVerifier` checks what a chain says about itself (signatures,
expiry order, issuer continuity, narrowing, delegation links, depth), once per
distinct chain: results are cached by the token's bytes, so a chain seen
before costs one dictionary lookup. What depends on the receiving node (its
anchors, its revocations, who signed the envelope, what the behaviour needs)
is checked at each use, by :func:`check_use` and :func:`grants`, in a few set
lookups. Every failure has a :class:`Rule`, the reason code a denial carries.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import base58
import msgpack

from dms.errors import DmsError
from dms.security.identity import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    Identity,
    did_from_public_key,
    verify_signature,
)

TOKEN_VERSION = 1
TEXT_PREFIX = "dmscap1"
NONCE_BYTES = 16
MAX_CHAIN = 8  # tokens in one chain, the leaf included
MAX_PATHS = 32  # capabilities (or topics) in one token
MAX_PATH_LEN = 512
MAX_DEPTH = 16
MAX_TOKEN_BYTES = 16 * 1024
CACHE_SIZE = 4096
KNOWN_TOKENS = 65_536  # ids of tokens seen in verified chains (revocations of others are not kept)


class Action(StrEnum):
    INVOKE = "invoke"
    DELEGATE = "delegate"
    BROADCAST = "broadcast"
    REVOKE = "revoke"


class Rule(StrEnum):
    """Why a token does not grant: the ``rule`` of a ``forbidden`` refusal."""

    MALFORMED = "malformed"  # not a token (or a revocation where a token belongs)
    BAD_SIGNATURE = "bad_signature"  # a token is not signed by its issuer
    EXPIRED = "expired"  # a token of the chain has expired
    OUTLIVES_PARENT = "outlives_parent"  # a token expires after its parent
    BROKEN_CHAIN = "broken_chain"  # an issuer is neither audience nor subject of the parent
    WIDENED = "widened"  # a delegation names a capability or topic its parent lacks
    NOT_DELEGATION = "not_delegation"  # a token chained below one that is not a delegation
    DEPTH_EXCEEDED = "depth_exceeded"  # more delegations than the parent allows
    UNANCHORED = "unanchored"  # the first issuer is not trusted here (root, require)
    REVOKED = "revoked"  # a token of the chain was revoked by an issuer above it
    WRONG_AUDIENCE = "wrong_audience"  # the token is for another key than the signer's
    NOT_GRANTED = "not_granted"  # a valid chain that does not cover this behaviour
    NO_TOKEN = "no_token"  # the signer is not anchored and showed no token
    BEYOND_ROLE = "beyond_role"  # a child actor outside its role's capabilities
    NOT_REQUESTER = "not_requester"  # an allocation managed by someone else than its requester
    TOO_LARGE = "too_large"  # a token over MAX_TOKEN_BYTES, its chain included
    OVER_BUDGET = "over_budget"  # this node's budget for chain checks is spent for now


class TokenError(DmsError):
    """A token that fails a rule; ``rule`` is the reason code."""

    code = "forbidden"

    def __init__(self, rule: Rule, message: str) -> None:
        super().__init__(message)
        self.rule = rule


class OverBudget(TokenError):
    """No budget left for the signature checks a new chain needs: a fact about this
    moment, not about the chain, so it is never cached."""

    def __init__(self, message: str) -> None:
        super().__init__(Rule.OVER_BUDGET, message)


# ---- paths -------------------------------------------------------------------------------


def covers(granted: str, path: str) -> bool:
    """``granted`` implies ``path``: equal, ``/``, or a parent of it (``/dms`` covers
    ``/dms/node/peers/list``, not ``/dmsx``)."""
    if granted == "/" or granted == path:
        return True
    return path.startswith(granted) and path[len(granted)] == "/"


def covered(path: str, granted: Iterable[str]) -> bool:
    return any(covers(g, path) for g in granted)


def narrows(child: Iterable[str], parent: Sequence[str]) -> bool:
    """Every path of ``child`` is implied by some path of ``parent``."""
    return all(covered(c, parent) for c in child)


def intersect(a: Sequence[str], b: Sequence[str]) -> tuple[str, ...]:
    """The paths both sets imply, as few as possible (``/dms`` and ``/dms/node/x`` give
    ``/dms/node/x``)."""
    found = [x for x in a if covered(x, b)] + [y for y in b if covered(y, a)]
    out: list[str] = []
    for p in sorted(set(found), key=len):
        if not covered(p, out):
            out.append(p)
    return tuple(sorted(out))


def normalize_path(path: str) -> str:
    """``/dms/deployment/`` -> ``/dms/deployment``; refuses what is not a path."""
    path = path.strip()
    if not path.startswith("/") or len(path) > MAX_PATH_LEN or "//" in path:
        raise TokenError(Rule.MALFORMED, f"not a capability path: {path!r} (use /like/this)")
    return path.rstrip("/") or "/"


# ---- the token ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Token:
    act: str
    iss: bytes
    aud: bytes
    sub: bytes
    cap: tuple[str, ...]
    topic: tuple[str, ...]
    exp: int  # unix seconds
    nonce: bytes
    depth: int  # further delegations allowed below this token
    prf: tuple[bytes, ...]  # the parent token as it travelled (at most one)
    body: bytes  # the signed bytes
    sig: bytes
    raw: bytes  # the token as it travels
    id: bytes  # sha256 of the body

    @property
    def short_id(self) -> str:
        return self.id.hex()[:16]

    @property
    def text(self) -> str:
        return to_text(self.raw)

    def describe(self) -> dict[str, Any]:
        """Plain data for people and ``--json``."""
        return {
            "id": self.id.hex(),
            "act": self.act,
            "iss": did_from_public_key(self.iss),
            "aud": did_from_public_key(self.aud),
            "sub": did_from_public_key(self.sub),
            "cap": list(self.cap),
            "topic": list(self.topic),
            "exp": self.exp,
            "expires": datetime.fromtimestamp(self.exp, UTC).isoformat(timespec="seconds"),
            "depth": self.depth,
        }


def _check_paths(values: Any, what: str) -> tuple[str, ...]:
    if not isinstance(values, list) or len(values) > MAX_PATHS:
        raise TokenError(Rule.MALFORMED, f"{what} must be a list of at most {MAX_PATHS} paths")
    for v in values:
        if type(v) is not str or not v.startswith("/") or len(v) > MAX_PATH_LEN:
            raise TokenError(Rule.MALFORMED, f"{what} holds something that is not a path")
    return tuple(values)


def _key(value: Any, what: str) -> bytes:
    if type(value) is not bytes or len(value) != PUBLIC_KEY_BYTES:
        raise TokenError(Rule.MALFORMED, f"{what} is not a 32-byte Ed25519 key")
    return value


def _unpack(data: bytes) -> Any:
    size = len(data)
    return msgpack.unpackb(
        data,
        raw=False,
        strict_map_key=True,
        max_str_len=size,
        max_bin_len=size,
        max_array_len=min(size, 256),
        max_map_len=min(size, 32),
        max_ext_len=0,
    )


_FIELDS = ("act", "aud", "cap", "depth", "exp", "iss", "nonce", "prf", "sub", "topic", "v")


def decode(raw: bytes) -> Token:
    """Parse a token's bytes (the signature is not checked here: see ChainVerifier)."""
    if type(raw) is not bytes:
        raise TokenError(Rule.MALFORMED, "a token is bytes")
    if len(raw) > MAX_TOKEN_BYTES:
        raise TokenError(
            Rule.TOO_LARGE,
            f"a token of {len(raw)} bytes (its chain included) exceeds {MAX_TOKEN_BYTES}",
        )
    try:
        outer = _unpack(raw)
        if not (isinstance(outer, list) and len(outer) == 2):
            raise ValueError("not a [body, sig] pair")
        body, sig = outer
        if type(body) is not bytes or type(sig) is not bytes or len(sig) != SIGNATURE_BYTES:
            raise ValueError("bad body or signature")
        fields = _unpack(body)
    except Exception as exc:  # msgpack raises several unrelated types
        raise TokenError(Rule.MALFORMED, f"not a token: {exc}") from None
    if not isinstance(fields, dict) or sorted(fields) != list(_FIELDS):
        raise TokenError(Rule.MALFORMED, "a token's body has the wrong fields")
    if fields["v"] != TOKEN_VERSION:
        raise TokenError(Rule.MALFORMED, f"token version {fields['v']!r} is not supported")
    act = fields["act"]
    if act not in Action.__members__.values():
        raise TokenError(Rule.MALFORMED, f"unknown token action {act!r}")
    exp, depth, nonce, prf = fields["exp"], fields["depth"], fields["nonce"], fields["prf"]
    if type(exp) is not int or exp < 0:
        raise TokenError(Rule.MALFORMED, "a token's exp is unix seconds")
    if type(depth) is not int or not 0 <= depth <= MAX_DEPTH:
        raise TokenError(Rule.MALFORMED, f"a token's depth is 0..{MAX_DEPTH}")
    if type(nonce) is not bytes or len(nonce) != NONCE_BYTES:
        raise TokenError(Rule.MALFORMED, f"a token's nonce has {NONCE_BYTES} bytes")
    if not isinstance(prf, list) or len(prf) > 1 or any(type(p) is not bytes for p in prf):
        raise TokenError(Rule.MALFORMED, "a token has at most one parent, as bytes")
    return Token(
        act=act,
        iss=_key(fields["iss"], "iss"),
        aud=_key(fields["aud"], "aud"),
        sub=_key(fields["sub"], "sub"),
        cap=_check_paths(fields["cap"], "cap"),
        topic=_check_paths(fields["topic"], "topic"),
        exp=exp,
        nonce=nonce,
        depth=depth,
        prf=tuple(prf),
        body=body,
        sig=sig,
        raw=raw,
        id=hashlib.sha256(body).digest(),
    )


def issue(
    issuer: Identity,
    audience: bytes,
    caps: Sequence[str],
    *,
    expires_at: int,
    act: Action | str = Action.DELEGATE,
    topics: Sequence[str] = (),
    depth: int = 0,
    subject: bytes | None = None,
    proofs: Sequence[bytes] = (),
    nonce: bytes | None = None,
) -> Token:
    """Sign a token. Nothing is checked against the parent: :class:`ChainVerifier` does
    that (so tests can build every kind of bad chain)."""
    fields = {
        "act": str(act),
        "aud": audience,
        "cap": list(caps),
        "depth": depth,
        "exp": int(expires_at),
        "iss": issuer.public_key,
        "nonce": nonce or os.urandom(NONCE_BYTES),
        "prf": list(proofs),
        "sub": subject or audience,
        "topic": list(topics),
        "v": TOKEN_VERSION,
    }
    body = msgpack.packb({k: fields[k] for k in sorted(fields)}, use_bin_type=True)
    raw = msgpack.packb([body, issuer.sign(body)], use_bin_type=True)
    return decode(raw)


def grant(
    issuer: Identity,
    audience: bytes,
    caps: Sequence[str],
    *,
    expires_in_s: float,
    topics: Sequence[str] | None = None,
    depth: int = 0,
    act: Action | str = Action.DELEGATE,
    parent: Chain | None = None,
) -> Token:
    """What ``dms cap grant`` and ``dms cap delegate`` issue. Paths are normalized; the
    topics default to the capabilities' own paths (``/dms/deployment`` is also the topic
    of bid requests); below ``parent``, the token may not outlive, widen or deepen it,
    and the chain is checked before it is returned."""
    caps = [normalize_path(c) for c in caps]
    topics = list(caps) if topics is None else [normalize_path(t) for t in topics]
    if not caps:
        raise TokenError(Rule.MALFORMED, "name at least one capability (--cap /path)")
    if not 0 <= depth <= MAX_DEPTH:
        raise TokenError(Rule.MALFORMED, f"depth is 0..{MAX_DEPTH}")
    expires_at = int(time.time() + expires_in_s)
    proofs: list[bytes] = []
    if parent is not None:
        up = parent.token
        if up.act != Action.DELEGATE or up.depth < 1:
            raise TokenError(
                Rule.DEPTH_EXCEEDED if up.act == Action.DELEGATE else Rule.NOT_DELEGATION,
                f"token {up.short_id} allows no further delegation "
                f"({up.act}, depth {up.depth}): ask its issuer for one with --depth 1",
            )
        if depth > up.depth - 1:
            raise TokenError(
                Rule.DEPTH_EXCEEDED,
                f"depth {depth} is more than its parent allows ({up.depth - 1})",
            )
        expires_at = min(expires_at, parent.exp)
        topics = [t for t in topics if covered(t, up.topic)]
        proofs = [parent.raw]
    token = issue(
        issuer,
        audience,
        caps,
        expires_at=expires_at,
        act=act,
        topics=topics,
        depth=depth,
        proofs=proofs,
    )
    if parent is not None:
        ChainVerifier().verify(token.raw)  # widening or depth: raised with its rule
    return token


def to_text(raw: bytes) -> str:
    return TEXT_PREFIX + base58.b58encode(raw).decode()


def from_text(text: str) -> bytes:
    """The bytes of a token written for people (``dmscap1...``)."""
    text = "".join(text.split())
    if not text.startswith(TEXT_PREFIX):
        raise TokenError(Rule.MALFORMED, f"not a dms token (it starts with {TEXT_PREFIX})")
    try:
        return base58.b58decode(text[len(TEXT_PREFIX) :])
    except ValueError:
        raise TokenError(Rule.MALFORMED, "not a dms token (bad base58)") from None


def when(exp: int) -> str:
    return datetime.fromtimestamp(exp, UTC).isoformat(timespec="seconds")


# ---- chains -----------------------------------------------------------------------------


def chain_tokens(raw: bytes) -> list[Token]:
    """The tokens of ``raw``'s chain, leaf first, from decoding alone: a chain over
    ``MAX_TOKEN_BYTES`` or ``MAX_CHAIN`` tokens is refused (``too_large``,
    ``depth_exceeded``) before any signature is checked, so a long chain costs as
    little as a short one. At most ``MAX_CHAIN + 1`` decodes of at most
    ``MAX_TOKEN_BYTES`` each. Nothing here is verified."""
    tokens: list[Token] = []
    while True:
        tok = decode(raw)
        tokens.append(tok)
        if len(tokens) > MAX_CHAIN:
            raise TokenError(
                Rule.DEPTH_EXCEEDED, f"a chain of more than {MAX_CHAIN} tokens (the most allowed)"
            )
        if not tok.prf:
            return tokens
        raw = tok.prf[0]


@dataclass(frozen=True, slots=True)
class Chain:
    """A token whose chain passed every check that needs nothing but its bytes."""

    token: Token  # the leaf: the token shown
    parent: Chain | None
    ids: frozenset[bytes]  # every token of the chain (for revocations)
    issuers: frozenset[bytes]
    root: bytes  # the first issuer: whose authority the chain carries
    exp: int  # the earliest expiry in the chain
    length: int
    # The leaf respects its parent's depth. When it does not, the chain may still be
    # used by an actor certificate: a node's token to one of its own actors (see
    # check_use), which is no delegation to another principal.
    depth_ok: bool = True

    @property
    def raw(self) -> bytes:
        return self.token.raw


class ChainVerifier:
    """Intrinsic checks of token chains, cached by the token's bytes.

    Thread-safe: lookups take no lock; a miss verifies and stores under one. Both
    outcomes are cached, a failure included, so the same bad bytes cost no second
    signature check. At most ``capacity`` entries; the oldest go first.

    A miss checks the chain's size and length first (:func:`chain_shape`, no
    signature), then calls ``charge`` if given: the caller's budget for signature
    work, which raises :class:`OverBudget` when it is spent. The ids of every token
    of a verified chain are remembered (the last ``KNOWN_TOKENS``): :meth:`is_known`.
    """

    def __init__(self, capacity: int = CACHE_SIZE, known: int = KNOWN_TOKENS) -> None:
        self.capacity = capacity
        self._cache: dict[bytes, Chain | TokenError] = {}
        self._lock = threading.Lock()
        self.misses = 0
        self._known_cap = known
        self._known: dict[bytes, None] = {}  # insertion order: the oldest go first

    def verify(self, raw: bytes, charge: Callable[[], None] | None = None) -> Chain:
        hit = self._cache.get(raw)
        if hit is None:
            try:
                chain_tokens(raw)
                if charge is not None:
                    charge()  # OverBudget is not cached: raised as it is
                hit = self._verify(raw, 0)
            except OverBudget:
                raise
            except TokenError as err:
                hit = err
            self._store(raw, hit)
        if isinstance(hit, TokenError):
            raise hit
        return hit

    def signed(self, token: Token) -> Chain:
        """The chain of a parentless token this node has just signed itself (a
        certificate for one of its own actors, rooted at it), kept as a verified one
        is: what :meth:`verify` would return, without checking the signature this
        process has just made over bytes it has just built."""
        if token.prf or token.act == Action.REVOKE:
            raise ValueError("signed() takes a parentless token that grants something")
        chain = Chain(
            token=token,
            parent=None,
            ids=frozenset((token.id,)),
            issuers=frozenset((token.iss,)),
            root=token.iss,
            exp=token.exp,
            length=1,
        )
        self._store(token.raw, chain)
        return chain

    def is_known(self, token_id: bytes) -> bool:
        """A token of a chain this verifier passed (recently: the last ``known``)."""
        return token_id in self._known

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def _store(self, raw: bytes, result: Chain | TokenError) -> None:
        with self._lock:
            self.misses += 1
            if len(self._cache) >= self.capacity:
                for old in list(self._cache)[: max(1, self.capacity // 8)]:
                    del self._cache[old]
            self._cache[raw] = result
            if isinstance(result, Chain):
                known = self._known
                for token_id in result.ids:
                    known.pop(token_id, None)
                    known[token_id] = None
                if len(known) > self._known_cap:
                    for old in list(known)[: len(known) - self._known_cap]:
                        del known[old]

    def _verify(self, raw: bytes, below: int) -> Chain:
        """``below``: tokens under this one in the chain being verified."""
        if below >= MAX_CHAIN:
            raise _TooLong(Rule.DEPTH_EXCEEDED, f"a chain longer than {MAX_CHAIN} tokens")
        tok = decode(raw)
        if not verify_signature(tok.iss, tok.sig, tok.body):
            raise TokenError(
                Rule.BAD_SIGNATURE,
                f"token {tok.short_id} is not signed by its issuer {did_from_public_key(tok.iss)}",
            )
        if tok.act == Action.REVOKE and below == 0:
            raise TokenError(Rule.MALFORMED, "a revocation grants nothing")
        if not tok.prf:
            return Chain(
                token=tok,
                parent=None,
                ids=frozenset((tok.id,)),
                issuers=frozenset((tok.iss,)),
                root=tok.iss,
                exp=tok.exp,
                length=1,
            )
        parent = self._parent(tok.prf[0], below + 1)
        up = parent.token
        sid = tok.short_id
        if up.act != Action.DELEGATE:
            raise TokenError(
                Rule.NOT_DELEGATION,
                f"token {sid} is chained below {up.short_id}, which is an {up.act}, "
                "not a delegation",
            )
        if tok.iss not in (up.aud, up.sub):
            raise TokenError(
                Rule.BROKEN_CHAIN,
                f"the issuer of token {sid} is neither audience nor subject of its parent",
            )
        if tok.exp > up.exp:
            raise TokenError(
                Rule.OUTLIVES_PARENT,
                f"token {sid} expires at {when(tok.exp)}, after its parent ({when(up.exp)})",
            )
        if not narrows(tok.cap, up.cap):
            extra = [c for c in tok.cap if not covered(c, up.cap)]
            raise TokenError(
                Rule.WIDENED, f"token {sid} widens {', '.join(extra)} beyond {', '.join(up.cap)}"
            )
        if not narrows(tok.topic, up.topic):
            extra = [t for t in tok.topic if not covered(t, up.topic)]
            raise TokenError(Rule.WIDENED, f"token {sid} widens topics {', '.join(extra)}")
        if not parent.depth_ok:
            raise TokenError(
                Rule.DEPTH_EXCEEDED,
                f"token {up.short_id} was delegated beyond what its parent allows",
            )
        return Chain(
            token=tok,
            parent=parent,
            ids=parent.ids | {tok.id},
            issuers=parent.issuers | {tok.iss},
            root=parent.root,
            exp=min(tok.exp, parent.exp),
            length=parent.length + 1,
            depth_ok=up.depth >= 1 and tok.depth <= up.depth - 1,
        )

    def _parent(self, raw: bytes, below: int) -> Chain:
        """A parent's chain, cached like any; a chain too long from this leaf is not a
        fact about the parent, so that failure is not stored for it."""
        hit = self._cache.get(raw)
        if isinstance(hit, TokenError):
            raise hit
        if hit is None:
            try:
                hit = self._verify(raw, below)
            except _TooLong:
                raise
            except TokenError as err:
                self._store(raw, err)
                raise
            self._store(raw, hit)
        if below + hit.length > MAX_CHAIN:
            raise _TooLong(Rule.DEPTH_EXCEEDED, f"a chain longer than {MAX_CHAIN} tokens")
        return hit


class _TooLong(TokenError):
    """Too many tokens from the leaf being verified: not cached for its parents."""


# ---- use ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scope:
    """What an anchored authority may grant on this node: its caps and topics."""

    caps: tuple[str, ...]
    topics: tuple[str, ...]


FULL = Scope(caps=("/",), topics=("/",))


def check_use(
    chain: Chain,
    *,
    signer: bytes,
    host_key: bytes | None,
    now: float,
    revoked: frozenset[bytes] | set[bytes],
    scopes: Sequence[Scope] | None,
) -> None:
    """The checks that depend on this node and this envelope, in this order: expiry,
    revocation, anchor (``scopes``: what the chain's first issuer may grant here; None
    if nothing), audience, depth of the last link."""
    tok = chain.token
    if chain.exp <= now:
        raise TokenError(Rule.EXPIRED, f"token {tok.short_id}'s chain expired at {when(chain.exp)}")
    if revoked and not chain.ids.isdisjoint(revoked):
        which = sorted(i.hex()[:16] for i in chain.ids & revoked)
        raise TokenError(Rule.REVOKED, f"token {', '.join(which)} was revoked")
    if scopes is None:
        raise TokenError(
            Rule.UNANCHORED,
            f"its first issuer {did_from_public_key(chain.root)} is not anchored here",
        )
    if tok.aud != signer:
        raise TokenError(
            Rule.WRONG_AUDIENCE,
            f"token {tok.short_id} is for {did_from_public_key(tok.aud)}, not its signer",
        )
    if not chain.depth_ok and not (tok.iss == host_key and tok.aud == signer):
        raise TokenError(
            Rule.DEPTH_EXCEEDED,
            f"token {tok.short_id} was delegated beyond what its parent allows",
        )


def grants(
    chain: Chain, path: str, topic: str | None, scopes: Sequence[Scope]
) -> TokenError | None:
    """None if the chain's leaf covers ``path`` (and, for a broadcast, ``topic``) for
    the right action, within what its anchor may grant; else why not."""
    tok = chain.token
    if topic is None:
        if tok.act not in (Action.INVOKE, Action.DELEGATE):
            return TokenError(Rule.NOT_GRANTED, f"token {tok.short_id} is for {tok.act} only")
    elif tok.act not in (Action.BROADCAST, Action.DELEGATE):
        return TokenError(Rule.NOT_GRANTED, f"token {tok.short_id} does not allow broadcasts")
    if not covered(path, tok.cap):
        return TokenError(
            Rule.NOT_GRANTED, f"token {tok.short_id} grants {', '.join(tok.cap) or 'nothing'}"
        )
    if topic is not None and not covered(topic, tok.topic):
        return TokenError(Rule.NOT_GRANTED, f"token {tok.short_id} does not cover topic {topic}")
    for scope in scopes:
        if covered(path, scope.caps) and (topic is None or covered(topic, scope.topics)):
            return None
    return TokenError(
        Rule.NOT_GRANTED,
        f"its first issuer {did_from_public_key(chain.root)} may not grant {path} here",
    )


# ---- revocations --------------------------------------------------------------------------


def revoke(revoker: Identity, target: Chain) -> Token:
    """A revocation of ``target``'s leaf, signed by ``revoker`` (an issuer of its chain);
    it lasts as long as the chain would have."""
    if revoker.public_key not in target.issuers:
        raise TokenError(
            Rule.BROKEN_CHAIN,
            f"{revoker.did} issued no token of that chain: only its issuers may revoke it",
        )
    return issue(
        revoker,
        revoker.public_key,
        [],
        act=Action.REVOKE,
        expires_at=target.exp,
        proofs=[target.raw],
    )


@dataclass(frozen=True, slots=True)
class Revocation:
    token: Token  # the revocation itself
    target: Chain  # the chain whose leaf it revokes

    @property
    def revoked_id(self) -> bytes:
        return self.target.token.id


@dataclass(frozen=True, slots=True)
class RevocationClaim:
    """What a revocation says, read without checking a signature (see
    :func:`read_revocation`): enough to drop junk before any signature work."""

    token: Token  # the revocation
    target: Token  # the token it revokes (the leaf of the chain it carries)
    issuers: frozenset[bytes]  # the issuers its chain names
    root: bytes  # the first issuer its chain names


def read_revocation(raw: bytes) -> RevocationClaim:
    """Decode a revocation and its chain (sizes and length checked), no signature."""
    tok = decode(raw)
    if tok.act != Action.REVOKE or len(tok.prf) != 1:
        raise TokenError(Rule.MALFORMED, "not a revocation")
    chain = chain_tokens(tok.prf[0])
    issuers = frozenset(t.iss for t in chain)
    if tok.iss not in issuers:
        raise TokenError(
            Rule.BROKEN_CHAIN,
            f"{did_from_public_key(tok.iss)} issued no token of the chain it revokes",
        )
    return RevocationClaim(token=tok, target=chain[0], issuers=issuers, root=chain[-1].iss)


def verify_revocation(
    verifier: ChainVerifier, raw: bytes, charge: Callable[[], None] | None = None
) -> Revocation:
    """A revocation is valid when it is signed by an issuer of the revoked chain.
    ``charge``: the caller's budget, taken once before any signature is checked."""
    tok = read_revocation(raw).token
    if charge is not None:
        charge()
    if not verify_signature(tok.iss, tok.sig, tok.body):
        raise TokenError(Rule.BAD_SIGNATURE, "the revocation is not signed by its issuer")
    target = verifier.verify(tok.prf[0])
    if tok.iss not in target.issuers:
        raise TokenError(
            Rule.BROKEN_CHAIN,
            f"{did_from_public_key(tok.iss)} issued no token of the chain it revokes",
        )
    return Revocation(token=tok, target=target)


def now_s() -> float:
    return time.time()
