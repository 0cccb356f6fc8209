"""A node's home folder: its keys and trust anchors (no network code, so the CLI loads fast)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dms.config import Settings
from dms.errors import DmsError
from dms.security import Identity, Keystore, TrustStore
from dms.security.keystore import PassphraseSource

NODE_KEY = "dms"
USER_KEY = "user"


class NodeError(DmsError):
    """The node cannot start as configured; the message says what to do."""


def load_node_identity(settings: Settings) -> Identity:
    keystore = Keystore(settings.home)
    if not keystore.exists(NODE_KEY):
        raise NodeError(f"{settings.home} holds no node key yet: run 'dms init' first")
    return keystore.load(NODE_KEY)


def init_home(home: Path, passphrase: PassphraseSource | None = None) -> dict[str, Any]:
    """Create the node and user keys if missing and anchor the user as root; idempotent.
    Both keys are sealed with ``passphrase`` (the CLI asks for it once)."""
    keystore = Keystore(home, passphrase=passphrase)
    created = []
    for context in (NODE_KEY, USER_KEY):
        if not keystore.exists(context):
            keystore.new(context)
            created.append(context)
    user = keystore.info(USER_KEY)
    node = keystore.info(NODE_KEY)
    anchored = TrustStore.for_context(home, NODE_KEY).anchor_root(user.did)
    return {
        "home": str(home),
        "created": created,
        "node_did": node.did,
        "peer_id": node.peer_id,
        "user_did": user.did,
        "root_anchored": anchored,
    }
