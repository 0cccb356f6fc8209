"""Files of a node's home that only its user may read: 0600 files in 0700 folders.

The home holds plaintext mining results and checkpoints (``dms.db``), the chunk
store, logs and the API token. :func:`write_private` creates a file with mode
0600 from its first byte; :func:`make_private` tightens what exists (a home made
before, or by a tool with a lax umask); :func:`create_private` makes an empty
file 0600 if it is missing (SQLite then gives its ``-wal`` and ``-shm`` files the
database file's mode).

Below every layer: the store, the trust anchors, the local API and the home use it,
and writing a private file loads no SQLAlchemy (a ``dms`` command that only talks to
the daemon starts without it).
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def sqlite_path(url: str) -> str | None:
    """The path a SQLite database URL names ('' for none; may be ``:memory:`` or a
    ``file:`` URI), None for a URL of another database."""
    if not url.startswith("sqlite"):
        return None
    return url.split("///", 1)[-1] if "///" in url else ""


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable by this user only (0600) from its first byte."""
    path.parent.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


def create_private(path: Path) -> None:
    """An empty file at ``path``, 0600, unless one is there already."""
    path.parent.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE))


def make_private(root: Path) -> list[str]:
    """``root`` and every folder below it 0700, every file 0600, where group or others
    had any access; only what this user owns, links are not followed. ``root`` may be
    a single file. Returns the paths changed."""
    changed: list[str] = []
    uid = os.getuid()

    def tighten(path: Path, mode: int) -> None:
        try:
            st = path.lstat()
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode) or st.st_uid != uid or not st.st_mode & 0o077:
            return
        with contextlib.suppress(OSError):
            path.chmod(mode)
            changed.append(str(path))

    if root.is_file():
        tighten(root, PRIVATE_FILE)
    elif root.is_dir():
        tighten(root, PRIVATE_DIR)
        for folder, dirs, files in os.walk(root):
            here = Path(folder)
            for name in dirs:
                tighten(here / name, PRIVATE_DIR)
            for name in files:
                tighten(here / name, PRIVATE_FILE)
    return changed
