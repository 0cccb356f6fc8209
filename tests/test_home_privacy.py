"""Item 12 of issue 24: a node's home is readable by its user only.

The owner's ``dms.db`` (plaintext centroids, labels, checkpoints) was 0644 in a
0755 home: any local user could read it. Now the home is 0700, every folder in it
0700 and every file 0600, on creation and, for an existing home, at start.
"""

from __future__ import annotations

import stat
from pathlib import Path

from dms.node.daemon import Node
from dms.orchestrator.store import DeploymentStore
from dms.security import Identity
from dms.sim.cluster import LocalCluster
from dms.store import ChunkStore


def lax_entries(home: Path) -> dict[str, str]:
    """Every path under ``home`` (itself included) that group or others may use."""
    found = {}
    for path in [home, *home.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if not path.is_symlink() and mode & 0o077:
            found[str(path.relative_to(home))] = oct(mode)
    return found


def use_home(node: Node) -> None:
    """What a running node writes: the database (with its WAL), trust anchors, chunks,
    an unsaved deployment end (one the store refused)."""
    assert node.db is not None and node.system is not None
    node.db.record("test.event", note="plaintext result")
    node.system.trust.anchor_root(Identity.generate().did)
    home = node.settings.home
    chunks = ChunkStore(home / "chunks", 1 << 20)
    chunks.put_blob(b"an encrypted shard", owner="job")
    DeploymentStore(node.db, home / "unsaved")._keep_unsaved({"id": "d1", "state": "failed"})


def test_a_fresh_home_is_private(cluster: LocalCluster) -> None:
    (node,) = cluster.start(1)
    use_home(node)
    home = node.settings.home
    for name in ("dms.db", "dms.db-wal", "dms.db-shm", "cap/dms.json", "chunks", "unsaved"):
        assert (home / name).exists(), name
    assert lax_entries(home) == {}


def test_a_lax_home_is_made_private_at_start(cluster: LocalCluster) -> None:
    (node,) = cluster.start(1)
    use_home(node)
    home = node.settings.home
    node.stop()
    (home / "logs").mkdir(exist_ok=True)
    (home / "logs" / "run.log").write_text("a log line\n")
    for path in [home, *home.rglob("*")]:  # as a umask of 022 leaves them
        path.chmod(0o755 if path.is_dir() else 0o644)
    assert "dms.db" in lax_entries(home)
    cluster.restart(node)
    assert lax_entries(home) == {}
