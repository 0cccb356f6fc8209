"""Talk to this home's running node as its user: signed envelopes through the local API.

The user key signs; the node's receive pipeline authorizes (the user DID is a
root anchor of the node after ``dms init``). The sender handle names the node
as its host, so replies from remote nodes come back to it and are matched to
the relayed request.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from dms.actor import ROOT_INBOX, Address, Handle, RemoteError, make_envelope, seal
from dms.node.api import ApiClient, ApiError, WrongNodeError
from dms.node.home import NODE_KEY, USER_KEY, NodeError
from dms.security import Identity, Keystore
from dms.security.identity import (
    IdentityError,
    peer_id_from_public_key,
    public_key_from_did,
    public_key_from_peer_id,
)


def root_handle(dest: str) -> Handle:
    """The root actor of the node named by a DID or a peer id."""
    try:
        if dest.startswith("did:"):
            public_key = public_key_from_did(dest)
        else:
            public_key = public_key_from_peer_id(dest)
    except IdentityError:
        raise NodeError(f"--dest {dest!r} is neither a did:key nor a peer id") from None
    return Handle(
        id=public_key, address=Address(host=peer_id_from_public_key(public_key), inbox=ROOT_INBOX)
    )


class NodeClient:
    def __init__(self, home: Path, user: Identity | None = None) -> None:
        keystore = Keystore(home)
        if not keystore.exists(NODE_KEY) or not keystore.exists(USER_KEY):
            raise NodeError(f"{home} has no node or user key yet: run 'dms init' first")
        self.node_peer_id = keystore.info(NODE_KEY).peer_id
        self.api = ApiClient(home, self.node_peer_id)
        self.user = user or keystore.load(USER_KEY)
        self._inbox = f"cli-{secrets.token_hex(4)}"

    @property
    def me(self) -> Handle:
        return Handle(
            id=self.user.public_key, address=Address(host=self.node_peer_id, inbox=self._inbox)
        )

    def target(self, dest: str | None) -> Handle:
        return root_handle(dest or self.node_peer_id)

    def invoke(
        self, behaviour: str, payload: Any = None, *, dest: str | None = None, timeout: float = 10.0
    ) -> Any:
        """The reply's result; ``RemoteError`` with the node's code and reason otherwise."""
        env = make_envelope(
            self.me,
            self.user.public_key,
            behaviour,
            payload,
            to=self.target(dest),
            ttl_s=timeout,
            expect_reply=True,
        )
        return _result(self.api.relay("invoke", seal(env, self.user), timeout))

    def send(
        self, behaviour: str, payload: Any = None, *, dest: str | None = None, timeout: float = 10.0
    ) -> Any:
        env = make_envelope(
            self.me, self.user.public_key, behaviour, payload, to=self.target(dest), ttl_s=timeout
        )
        return _result(self.api.relay("send", seal(env, self.user), timeout))

    def broadcast(
        self, topic: str, behaviour: str, payload: Any = None, *, timeout: float = 10.0
    ) -> Any:
        env = make_envelope(
            self.me, self.user.public_key, behaviour, payload, ttl_s=timeout, topic=topic
        )
        return _result(self.api.relay("broadcast", seal(env, self.user), timeout))

    def health(self) -> dict[str, Any]:
        return self.api.health()


def _result(answer: dict[str, Any]) -> Any:
    if answer.get("ok"):
        return answer.get("result")
    rule = answer.get("rule")
    raise RemoteError(
        str(answer.get("code", "error")),
        str(answer.get("reason", "")),
        rule=rule if isinstance(rule, str) else None,
    )


def running_node(home: Path) -> NodeClient | None:
    """A client of this home's daemon if one answers, else None (the CLI then works on
    the store directly). A daemon of another node on the recorded port is an error."""
    keystore = Keystore(home)
    if not keystore.exists(NODE_KEY) or not keystore.exists(USER_KEY):
        return None
    try:
        client = NodeClient(home)
        client.health()
    except WrongNodeError:
        raise
    except ApiError:
        return None
    return client
