"""``dms cap``: capability tokens and this node's trust anchors.

A private group in two commands::

    a$ dms cap grant did:key:zB... --cap /dms/deployment --expiry 30d    # prints a token
    b$ dms cap anchor --provide dmscap1...

Node b then shows the token when it asks a for bids, and accepts the chains a's
key starts (a's group). Tokens are signed here with the key of ``--context``
(``dms``, the node, by default; ``user``, you). While this home's node runs,
anchors change through it (``/dms/cap/*``), so the file has one writer and the
change applies at once; otherwise ``DMS_HOME/cap/dms.json`` is changed here. A
revocation made while no node runs is published when the node next starts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer

from dms.cli.common import JsonOption, settings
from dms.cli.output import emit_fields, emit_json, emit_table, err_console
from dms.node.client import NodeClient, running_node
from dms.node.home import NODE_KEY, USER_KEY, NodeError
from dms.security import Identity, Keystore
from dms.security.identity import IdentityError, public_key_from_did
from dms.security.tokens import (
    Action,
    Chain,
    ChainVerifier,
    TokenError,
    covered,
    from_text,
    grant,
    revoke,
    to_text,
    when,
)
from dms.security.trust import TrustStore

app = typer.Typer(help="Capability tokens: grant, delegate, anchor, revoke.", no_args_is_help=True)

CapOption = Annotated[
    list[str],
    typer.Option("--cap", help="Behaviour path granted, with all below it (repeatable)."),
]
TopicOption = Annotated[
    list[str] | None,
    typer.Option("--topic", help="Topic it may broadcast on (repeatable; default: the caps)."),
]
ExpiryOption = Annotated[
    str, typer.Option("--expiry", help="How long it lasts: 90m, 12h, 30d, 2w.")
]
DepthOption = Annotated[
    int, typer.Option("--depth", min=0, max=16, help="Further delegations allowed below it.")
]
ContextOption = Annotated[
    str, typer.Option("--context", help="The key that signs: dms (this node) or user (you).")
]
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_expiry(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if match is None or float(match.group(1)) <= 0:
        raise NodeError(f"--expiry {text!r}: give a duration like 90m, 12h, 30d or 2w")
    return float(match.group(1)) * _UNITS[match.group(2)]


class Anchors:
    """This home's anchors: through the running node, or in the file when none runs."""

    def __init__(self, home: Path) -> None:
        self.home = home
        keystore = Keystore(home)
        if not keystore.exists(NODE_KEY):
            raise NodeError(f"{home} holds no node key yet: run 'dms init' first")
        self.keystore = keystore
        self.node_did = keystore.info(NODE_KEY).did
        self.client: NodeClient | None = running_node(home)
        self._trust: TrustStore | None = None

    @property
    def trust(self) -> TrustStore:
        if self._trust is None:
            node_key = public_key_from_did(self.node_did)
            self._trust = TrustStore.for_context(self.home, NODE_KEY, node_key)
        return self._trust

    def call(self, behaviour: str, payload: Any = None) -> Any:
        assert self.client is not None
        return self.client.invoke(behaviour, payload, timeout=15)

    def listing(self) -> dict[str, Any]:
        if self.client is not None:
            return dict(self.call("/dms/cap/list"))
        policy = settings().deployment_policy  # what the node will run with
        return {"did": self.node_did, "deployment_policy": policy, **self.trust.listing()}

    def anchor(self, payload: dict[str, Any]) -> dict[str, Any]:
        if self.client is not None:
            return dict(self.call("/dms/cap/anchor", payload))
        if payload.get("root"):
            return {"anchored": "root", "did": payload["root"],
                    "new": self.trust.anchor_root(payload["root"])}  # fmt: skip
        kind = next(k for k in ("require", "provide", "issued") if payload.get(k))
        return self.trust.anchor_token(payload[kind], kind, one_way=payload.get("one_way", False))  # type: ignore[arg-type]

    def remove(self, root: str | None, prefix: str | None) -> dict[str, Any]:
        if self.client is not None:
            return dict(self.call("/dms/cap/remove", {"root": root, "id": prefix}))
        return self.trust.remove_anchor(root=root, prefix=prefix)

    def revoke(self, raw: bytes) -> dict[str, Any]:
        if self.client is not None:
            return dict(self.call("/dms/cap/revoke", {"revocation": raw}))
        outcome = self.trust.add_revocation(raw, local=True)
        if outcome.revocation is None:
            raise NodeError(f"revocation refused: {outcome.reason}")
        return {
            "revoked": outcome.revocation.revoked_id.hex(),
            "stored": outcome.stored,
            "note": outcome.reason,
            "published": None,  # by the node, a few seconds after it starts
        }

    def tokens(self, kind: str | None = None) -> list[dict[str, Any]]:
        rows = self.listing()["tokens"]
        return [t for t in rows if kind is None or kind in str(t["kind"]).split("+")]


def _key(home: Path, context: str) -> Identity:
    if context not in (NODE_KEY, USER_KEY):
        raise NodeError(f"--context {context!r}: use dms (this node) or user (you)")
    return Keystore(home).load(context)


def _audience(did: str) -> bytes:
    try:
        return public_key_from_did(did)
    except IdentityError as err:
        raise NodeError(str(err)) from None


def _issued(anchors: Anchors, token_raw: bytes, json_out: bool, hint: str) -> None:
    anchors.anchor({"issued": token_raw})
    chain = ChainVerifier().verify(token_raw)
    info = {**chain.token.describe(), "chain": chain.length, "token": to_text(token_raw)}
    if json_out:
        emit_json(info)
        return
    typer.echo(info["token"])  # alone on stdout: TOKEN=$(dms cap grant ...)
    err_console.print(
        f"{info['act']} {', '.join(info['cap'])} to {info['aud']} until {info['expires']} "
        f"(id {info['id'][:16]}). {hint}",
        soft_wrap=True,
    )


@app.command("grant")
def grant_cmd(
    did: Annotated[str, typer.Argument(help="The DID that receives it (a node or a person).")],
    cap: CapOption,
    expiry: ExpiryOption = "30d",
    topic: TopicOption = None,
    depth: DepthOption = 0,
    act: Annotated[
        str, typer.Option("--act", help="delegate (default), invoke or broadcast.")
    ] = "delegate",
    context: ContextOption = NODE_KEY,
    json_out: JsonOption = False,
) -> None:
    """Grant capabilities of this node to DID; prints the token to hand over."""
    home = settings().home
    if act not in (Action.DELEGATE, Action.INVOKE, Action.BROADCAST):
        raise NodeError(f"--act {act!r}: use delegate, invoke or broadcast")
    anchors = Anchors(home)
    token = _grant(
        lambda: grant(
            _key(home, context), _audience(did), cap, expires_in_s=parse_expiry(expiry),
            topics=topic, depth=depth, act=act,
        )
    )  # fmt: skip
    _issued(anchors, token, json_out, "On that node: dms cap anchor --provide <token>")


@app.command("delegate")
def delegate_cmd(
    did: Annotated[str, typer.Argument(help="The DID that receives it.")],
    cap: CapOption,
    expiry: ExpiryOption = "7d",
    topic: TopicOption = None,
    depth: DepthOption = 0,
    parent: Annotated[
        str | None,
        typer.Option("--from", help="Id (or its start) of the provide token to delegate from."),
    ] = None,
    context: ContextOption = NODE_KEY,
    json_out: JsonOption = False,
) -> None:
    """Pass on part of a token this node holds (a provide anchor) to DID."""
    home = settings().home
    anchors = Anchors(home)
    signer = _key(home, context)
    verifier = ChainVerifier()
    held: list[Chain] = []
    for row in anchors.tokens("provide"):
        if parent is not None and not str(row.get("id", "")).startswith(parent.lower()):
            continue
        try:
            chain = verifier.verify(from_text(row["token"]))
        except TokenError:
            continue
        if chain.token.aud == signer.public_key and all(covered(c, chain.token.cap) for c in cap):
            held.append(chain)
    if not held:
        raise NodeError(
            f"no provide token for {signer.did} covers {', '.join(cap)}"
            + (f" with an id starting {parent}" if parent else "")
            + ": see dms cap list"
        )
    chosen = max(held, key=lambda c: (c.token.depth, c.exp))
    token = _grant(
        lambda: grant(
            signer, _audience(did), cap, expires_in_s=parse_expiry(expiry), topics=topic,
            depth=depth, parent=chosen,
        )
    )  # fmt: skip
    _issued(anchors, token, json_out, "On that node: dms cap anchor --provide <token>")


def _grant(make: Any) -> bytes:
    try:
        return bytes(make().raw)
    except TokenError as err:
        raise NodeError(f"{err.rule}: {err.message}") from None


@app.command("anchor")
def anchor_cmd(
    root: Annotated[
        str | None, typer.Option("--root", help="Trust this DID fully on this node.")
    ] = None,
    require: Annotated[
        str | None,
        typer.Option("--require", help="Accept the chains this token's first issuer starts."),
    ] = None,
    provide: Annotated[
        str | None,
        typer.Option(
            "--provide", help="A token granted to this node: shown, and its group joined."
        ),
    ] = None,
    one_way: Annotated[
        bool,
        typer.Option(
            "--one-way", help="With --provide: show it, but accept nothing from its issuer."
        ),
    ] = False,
    json_out: JsonOption = False,
) -> None:
    """Add a trust anchor: a root DID, a require token or a provide token."""
    given = [v for v in (root, require, provide) if v]
    if len(given) != 1:
        raise NodeError("give exactly one of --root DID, --require TOKEN, --provide TOKEN")
    anchors = Anchors(settings().home)
    payload: dict[str, Any] = {"one_way": one_way}
    try:
        if root:
            payload = {"root": root}
        elif require:
            payload["require"] = from_text(require)
        else:
            payload["provide"] = from_text(provide or "")
    except TokenError as err:
        raise NodeError(err.message) from None
    result = anchors.anchor(payload)
    if json_out:
        emit_json(result)
        return
    emit_fields({k: _cell(v) for k, v in result.items()}, title=f"anchored {result['anchored']}")
    if result.get("accepts"):
        err_console.print(
            f"chains from {result['accepts']} for {', '.join(result['cap'])} are accepted here",
            soft_wrap=True,
        )


@app.command("remove")
def remove_cmd(
    token_id: Annotated[
        str | None, typer.Argument(help="Id (or its start) of an anchored token.")
    ] = None,
    root: Annotated[str | None, typer.Option("--root", help="A root DID to remove.")] = None,
    json_out: JsonOption = False,
) -> None:
    """Remove a root DID or an anchored token (from every list that holds it)."""
    if (token_id is None) == (root is None):
        raise NodeError("give a token id, or --root DID")
    result = Anchors(settings().home).remove(root, token_id)
    if json_out:
        emit_json(result)
    elif not result["removed"]:
        raise NodeError(f"{root} is not a root of this node")
    else:
        emit_fields({k: _cell(v) for k, v in result.items()}, title="removed")


@app.command("revoke")
def revoke_cmd(
    token: Annotated[str, typer.Argument(help="Id (or its start) of a token here, or a token.")],
    json_out: JsonOption = False,
) -> None:
    """Revoke a token this home issued (or one below it); every node that hears it refuses it."""
    home = settings().home
    anchors = Anchors(home)
    verifier = ChainVerifier()
    try:
        if token.startswith("dmscap1"):
            chain = verifier.verify(from_text(token))
        else:
            rows = [r for r in anchors.tokens() if str(r.get("id", "")).startswith(token.lower())]
            if len(rows) != 1:
                what = "no token" if not rows else f"{len(rows)} tokens"
                raise NodeError(f"{what} here with an id starting {token}: see dms cap list")
            chain = verifier.verify(from_text(rows[0]["token"]))
    except TokenError as err:
        raise NodeError(f"{err.rule}: {err.message}") from None
    keystore = Keystore(home)
    mine = [c for c in (NODE_KEY, USER_KEY) if keystore.exists(c)]
    signer = next(
        (c for c in mine if public_key_from_did(keystore.info(c).did) in chain.issuers), None
    )
    if signer is None:
        raise NodeError("neither this node's key nor yours issued a token of that chain")
    result = anchors.revoke(revoke(keystore.load(signer), chain).raw)
    if json_out:
        emit_json(result)
    else:
        emit_fields({k: _cell(v) for k, v in result.items()}, title="revoked")


@app.command("list")
def list_cmd(json_out: JsonOption = False) -> None:
    """This node's roots, tokens (issued, provided, required) and revocations."""
    listing = Anchors(settings().home).listing()
    if json_out:
        emit_json(listing)
        return
    fields = {
        "node": listing["did"],
        "deployment_policy": listing["deployment_policy"],
        "roots": ", ".join(listing["root"]) or "(none)",
    }
    emit_fields(fields, title="trust anchors")
    rows = [
        [t["kind"], t.get("id", "")[:16], t.get("act", ""), ", ".join(t.get("cap", [])),
         t.get("iss", ""), t.get("aud", ""), t.get("expires", ""), t["status"]]
        for t in listing["tokens"]
    ]  # fmt: skip
    if rows:
        emit_table(
            "tokens",
            ["kind", "id", "act", "cap", "from", "to", "expires", "status"],
            rows,
            whole=["id"],
            hideable=["act", "from", "to"],
        )
    if listing["revoked"]:
        emit_table(
            "revoked",
            ["id", "by", "until"],
            [[r["id"][:16], r["by"], when(r["until"])] for r in listing["revoked"]],
            whole=["id"],
        )


def _cell(value: Any) -> Any:
    return ", ".join(value) if isinstance(value, list) else value
