"""A node's home folder: its keys and trust anchors (no network code, so the CLI loads fast).

The home is private: it holds plaintext mining results and checkpoints in
``dms.db``, the chunk store, logs and the API token. It is 0700, with every
folder in it 0700 and every file 0600, from ``dms init`` on; a node that starts
tightens an existing home (and a SQLite database kept elsewhere) that is laxer,
and says so in its log. See ``specs/security.md``, "Home privacy".
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dms.config import Settings
from dms.errors import DmsError
from dms.files import PRIVATE_DIR, make_private, sqlite_path
from dms.security import Identity, Keystore, TrustStore
from dms.security.keystore import PassphraseSource
from dms.security.sealing import DEFAULT_SCRYPT_N

log = logging.getLogger("dms.node")

NODE_KEY = "dms"
USER_KEY = "user"


class NodeError(DmsError):
    """The node cannot start as configured; the message says what to do."""


def load_node_identity(settings: Settings) -> Identity:
    keystore = Keystore(settings.home)
    if not keystore.exists(NODE_KEY):
        raise NodeError(f"{settings.home} holds no node key yet: run 'dms init' first")
    return keystore.load(NODE_KEY)


def private_home(home: Path, database_url: str | None = None) -> list[str]:
    """Create ``home`` (0700) if missing and make what is in it private (see above); a
    SQLite database outside the home too, with its ``-wal`` and ``-shm`` files.
    Returns the paths whose modes were tightened."""
    home = Path(home)
    home.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    changed = make_private(home)
    path = sqlite_path(database_url or "")
    if path and path != ":memory:" and not path.startswith("file:"):
        db = Path(path).expanduser()
        if not db.is_relative_to(home):
            for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
                changed += make_private(path)
    if changed:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" * (len(changed) > 8))
        log.warning("%s was open to other users: made private (%s)", home, shown)
    return changed


def init_home(
    home: Path, passphrase: PassphraseSource | None = None, scrypt_n: int = DEFAULT_SCRYPT_N
) -> dict[str, Any]:
    """Create the node and user keys if missing and anchor the user as root; idempotent.
    Both keys are sealed with ``passphrase`` (the CLI asks for it once), by scrypt of cost
    ``scrypt_n`` (the CLI's is always the default; the tests' throwaway homes take less)."""
    private_home(home)
    keystore = Keystore(home, passphrase=passphrase, scrypt_n=scrypt_n)
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
