"""The content-addressed chunk store: bulk bytes on disk, named by their sha256.

Ciphertexts, public contexts and data shards do not travel in envelopes
(DESIGN.md, decision 9). They are cut into chunks, and each chunk is stored
under the sha256 of its bytes in ``DMS_HOME/chunks``. See specs/chunks.md.

**Chunk size: 1 MiB.** It is the unit of verification, deduplication and
resumption. A chunk lost or spoiled in transit costs at most 1 MiB to fetch
again. One chunk fits in memory per stream at once, and a transfer yields to
the control stream between chunks. It is also large enough that the cost per
chunk stays small: one file, one hash in the manifest, one request. At the
default 2 GiB quota a store holds at most 2048 chunks. A manifest of the whole
quota lists 2048 hex hashes, 132 KiB in MessagePack, which fits well within a
1 MiB control envelope. With 64 KiB chunks it would be 2.06 MiB and would not
fit. Chunks are fixed-size, not
content-defined: what is deduplicated is a whole blob sent again (the same
public context for several allocations on one provider), and fixed cuts find
that.

**Layout.** A chunk lives at ``chunks/<h[:2]>/<h>``: 256 fan-out folders keep
each folder small at any quota. Folders are 0700 and files are 0600. A chunk
is written to a temporary file ``.<h[:12]>.<random>.tmp`` in its own folder,
then moved into place with ``os.replace``. So no reader ever sees half a chunk
under a real name. The store does not fsync, because nothing on disk outlives
the process: :meth:`ChunkStore.clean` wipes the store at start, and
:meth:`ChunkStore.get` verifies every read.

**Accounting.** The state lives in three maps, and each is changed only under
the store's one lock:

- ``_sizes``: hash -> size of each chunk on disk;
- ``_reserved``: hash -> size of each chunk that an owner expects but that has
  not arrived yet;
- ``_owners``: owner -> the hashes it references (held or reserved).

``used_bytes`` is the sum of ``_sizes`` and ``reserved_bytes`` is the sum of
``_reserved``. Both are derived, never counted. ``free_bytes`` is the quota
minus both. A write first takes a reservation, under the lock, after checking
that it fits. The write then fills the reservation. So two threads cannot both
take the last free bytes, and a refused put leaves nothing behind. A chunk
that no owner references any more is deleted at once.

Hashes come from peers, so they are checked (exactly 64 lowercase hex digits)
before they are used anywhere, and before they become file names.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
from pathlib import Path

from dms.errors import DmsError

log = logging.getLogger("dms.store")

CHUNK_BYTES = 1 * 1024 * 1024

_HASH = re.compile(r"[0-9a-f]{64}")
_FANOUT = re.compile(r"[0-9a-f]{2}")


class ChunkError(DmsError):
    """A chunk refused or missing: bad hash, bad size, absent, spoiled on disk."""

    code = "bad_chunk"


class QuotaExceeded(ChunkError):
    """The new bytes do not fit the quota; nothing was stored or reserved."""

    code = "quota_exceeded"

    def __init__(self, needed: int, free: int, quota: int) -> None:
        super().__init__(
            f"chunk store needs {needed} bytes but only {free} are free (quota {quota} bytes)"
        )
        self.needed = needed
        self.free = free
        self.quota = quota


def chunk_hash(data: bytes) -> str:
    """The sha256 of ``data`` as 64 lowercase hex digits: a chunk's name."""
    return hashlib.sha256(data).hexdigest()


def split(data: bytes, chunk_bytes: int = CHUNK_BYTES) -> list[bytes]:
    """``data`` cut into ``chunk_bytes`` pieces (the last may be shorter); ``[]`` for ``b""``."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be at least 1, not {chunk_bytes}")
    return [bytes(data[i : i + chunk_bytes]) for i in range(0, len(data), chunk_bytes)]


def check_hash(h: object) -> str:
    """``h`` if it is a chunk name (64 lowercase hex digits), else :class:`ChunkError`."""
    if not isinstance(h, str) or not _HASH.fullmatch(h):
        shown = repr(h)[:80]
        raise ChunkError(f"{shown} is not a chunk hash (64 lowercase hex digits)")
    return h


def _check_owner(owner: object) -> str:
    if not isinstance(owner, str) or not owner:
        raise ChunkError(f"chunk owner must be a non-empty string, not {owner!r}")
    return owner


class ChunkStore:
    """Chunks under ``root``, at most ``quota_bytes`` of them held or reserved.

    Every method is thread-safe. Only one store may use a given ``root`` at a
    time. A store opened on a folder that already holds chunks counts them in
    ``used_bytes``, with no owner. The node calls :meth:`clean` at start to
    delete them.
    """

    def __init__(self, root: Path, quota_bytes: int, chunk_bytes: int = CHUNK_BYTES) -> None:
        if quota_bytes < 0:
            raise ValueError(f"quota_bytes must be >= 0, not {quota_bytes}")
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be at least 1, not {chunk_bytes}")
        self.root = Path(root)
        self.quota_bytes = quota_bytes
        self.chunk_bytes = chunk_bytes
        self._lock = threading.Lock()
        self._sizes: dict[str, int] = {}
        self._reserved: dict[str, int] = {}
        self._owners: dict[str, set[str]] = {}
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root.chmod(0o700)
        self._sizes.update(self._scan())

    # ---- accounting (derived) ---------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        """Bytes of the chunks on disk."""
        with self._lock:
            return sum(self._sizes.values())

    @property
    def reserved_bytes(self) -> int:
        """Bytes set aside for chunks that owners expect but do not hold yet."""
        with self._lock:
            return sum(self._reserved.values())

    @property
    def free_bytes(self) -> int:
        """What the quota leaves after used and reserved bytes."""
        with self._lock:
            return self._free()

    def _free(self) -> int:
        return max(0, self.quota_bytes - sum(self._sizes.values()) - sum(self._reserved.values()))

    def references(self, owner: str) -> frozenset[str]:
        """The hashes ``owner`` references, held or reserved."""
        with self._lock:
            return frozenset(self._owners.get(owner, ()))

    def audit(self) -> list[str]:
        """Where memory and disk disagree, or the quota is exceeded (empty when all holds)."""
        with self._lock:
            on_disk = self._scan()
            sizes, reserved = dict(self._sizes), dict(self._reserved)
            referenced = set().union(*self._owners.values())
        problems = []
        if on_disk != sizes:
            extra = sorted(set(on_disk.items()) - set(sizes.items()))
            lost = sorted(set(sizes.items()) - set(on_disk.items()))
            problems.append(f"disk and memory differ: on disk only {extra}, in memory only {lost}")
        if both := set(sizes) & set(reserved):
            problems.append(f"held and reserved at once: {sorted(both)}")
        if dangling := referenced - set(sizes) - set(reserved):
            problems.append(f"referenced but neither held nor reserved: {sorted(dangling)}")
        total = sum(sizes.values()) + sum(reserved.values())
        if total > self.quota_bytes:
            problems.append(f"used + reserved {total} > quota {self.quota_bytes}")
        return problems

    # ---- queries ----------------------------------------------------------------------

    def has(self, h: str) -> bool:
        """True when chunk ``h`` is on disk (a reservation does not count)."""
        check_hash(h)
        with self._lock:
            return h in self._sizes

    def missing(self, hashes: list[str]) -> list[str]:
        """The hashes not held, in order, each once."""
        wanted = list(dict.fromkeys(check_hash(h) for h in hashes))
        with self._lock:
            return [h for h in wanted if h not in self._sizes]

    def get(self, h: str) -> bytes:
        """Chunk ``h``'s bytes, verified.

        A chunk spoiled on disk is deleted. If an owner still references it,
        its space stays reserved, so that :meth:`missing` lists it and it can
        be fetched again. The error says so.
        """
        check_hash(h)
        path = self._path(h)
        with self._lock:
            if h not in self._sizes:
                raise ChunkError(f"chunk {h[:12]} is not held")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = None
        if data is not None and chunk_hash(data) == h:
            return data
        with self._lock:
            if h not in self._sizes:  # released while we read
                raise ChunkError(f"chunk {h[:12]} is not held") from None
            self._drop_if_spoiled(h)
            if h in self._sizes:  # replaced by a good copy meanwhile
                return path.read_bytes()
        raise ChunkError(f"chunk {h[:12]} was spoiled on disk and is dropped; fetch it again")

    def assemble(self, hashes: list[str]) -> bytes:
        """The blob made of ``hashes``' chunks, in order."""
        return b"".join(self.get(h) for h in hashes)

    # ---- writes -----------------------------------------------------------------------

    def put_blob(self, data: bytes, owner: str) -> list[str]:
        """Store ``data`` as chunks referenced by ``owner``; the hashes, in order.

        It raises :class:`QuotaExceeded` when the chunks not yet held do not
        fit. In that case nothing is stored or reserved. If a write fails (a
        disk error), the chunks reserved so far stay reserved under ``owner``
        until :meth:`release`.
        """
        _check_owner(owner)
        chunks = split(data, self.chunk_bytes)
        hashes = [chunk_hash(c) for c in chunks]
        distinct = dict(zip(hashes, chunks, strict=True))
        with self._lock:
            self._reserve({h: len(c) for h, c in distinct.items()}, owner, exact=True)
        for h, chunk in distinct.items():
            self._fill(h, chunk)
        return hashes

    def reserve(self, hashes_and_sizes: list[tuple[str, int]], owner: str) -> None:
        """Set room aside for the chunks of a manifest that ``owner`` is about to pull.

        Chunks already held or reserved just get the owner's reference. It
        raises :class:`QuotaExceeded`, with nothing reserved, when the others do
        not fit. The sizes are the manifest's claim: the chunk's verified bytes
        correct its reservation when it arrives.
        """
        _check_owner(owner)
        sizes: dict[str, int] = {}
        for h, size in hashes_and_sizes:
            check_hash(h)
            if not isinstance(size, int) or not 0 <= size <= self.chunk_bytes:
                raise ChunkError(
                    f"chunk {h[:12]} size {size!r} is not within 0..{self.chunk_bytes} bytes"
                )
            if sizes.setdefault(h, size) != size:
                raise ChunkError(f"chunk {h[:12]} is listed with two sizes")
        with self._lock:
            self._reserve(sizes, owner, exact=False)

    def put_chunk(self, expected_hash: str, data: bytes, owner: str) -> None:
        """Verify and store one chunk for ``owner``, using its reservation if there is one.

        It raises :class:`ChunkError` if the bytes do not match
        ``expected_hash`` or are larger than a chunk, and
        :class:`QuotaExceeded` if an unreserved chunk does not fit.
        """
        h = check_hash(expected_hash)
        _check_owner(owner)
        if len(data) > self.chunk_bytes:
            raise ChunkError(f"chunk {h[:12]} is {len(data)} bytes, over {self.chunk_bytes}")
        if chunk_hash(data) != h:
            raise ChunkError(f"chunk {h[:12]} does not match its hash")
        with self._lock:
            self._reserve({h: len(data)}, owner, exact=True)
        self._fill(h, bytes(data))

    def add_owner(self, hashes: list[str], owner: str) -> None:
        """``owner`` references ``hashes`` too; each must be held or reserved already."""
        _check_owner(owner)
        wanted = {check_hash(h) for h in hashes}
        with self._lock:
            known = self._sizes.keys() | self._reserved.keys()
            if unknown := sorted(wanted - known):
                raise ChunkError(
                    f"{len(unknown)} chunk(s) neither held nor reserved, e.g. {unknown[0][:12]}"
                )
            self._owners.setdefault(owner, set()).update(wanted)

    def release(self, owner: str) -> int:
        """Drop ``owner``'s references, and delete what no one references now.

        It returns the bytes deleted from disk. Reservations that no one
        references are dropped too, and they free quota but no disk.
        """
        with self._lock:
            gone = self._owners.pop(owner, set())
            if not gone:
                return 0
            still = set().union(*self._owners.values())
            freed = 0
            for h in gone - still:
                self._reserved.pop(h, None)
                freed += self._delete(h)
        return freed

    def clean(self) -> int:
        """Delete everything in the store (chunks, temporary files, anything else).

        It is meant for start-up: no session or allocation survives a restart,
        so every chunk on disk is an orphan. All references and reservations
        are forgotten too. It returns the bytes of the files it deleted.
        """
        with self._lock:
            freed = 0
            for entry in os.scandir(self.root):
                if entry.is_dir(follow_symlinks=False):
                    for folder, _dirs, files in os.walk(entry.path):
                        for name in files:
                            freed += _file_bytes(os.path.join(folder, name))
                    shutil.rmtree(entry.path)
                else:
                    freed += _file_bytes(entry.path)
                    os.unlink(entry.path)
            self._sizes.clear()
            self._reserved.clear()
            self._owners.clear()
        if freed:
            log.info("chunk store: cleaned %d bytes of orphans from %s", freed, self.root)
        return freed

    # ---- internals: every state change is one of these, under the lock ---------------

    def _reserve(self, sizes: dict[str, int], owner: str, *, exact: bool) -> None:
        """Reserve what is neither held nor reserved, if it fits; then reference all.

        ``exact`` sizes come from verified bytes. They also correct an existing
        reservation made from a manifest's claim, and a larger correction must
        fit the quota too.
        """
        needed = 0
        changes: dict[str, int] = {}
        for h, size in sizes.items():
            if h in self._sizes:
                continue
            before = self._reserved.get(h)
            if before is None:
                changes[h] = size
                needed += size
            elif exact and before != size:
                changes[h] = size
                needed += size - before
        free = self._free()
        if needed > free:
            raise QuotaExceeded(needed, free, self.quota_bytes)
        self._reserved.update(changes)
        self._owners.setdefault(owner, set()).update(sizes)

    def _fill(self, h: str, data: bytes) -> None:
        """Write reserved chunk ``h`` (temporary file, then rename) and count it as held."""
        path = self._path(h)
        with self._lock:
            if h in self._sizes:
                return
        path.parent.mkdir(mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{h[:12]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            with self._lock:
                if h in self._sizes:  # another writer of the same bytes won
                    return
                if h not in self._reserved:
                    raise ChunkError(f"chunk {h[:12]} was released while it was being written")
                os.replace(tmp, path)
                del self._reserved[h]
                self._sizes[h] = len(data)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _delete(self, h: str) -> int:
        size = self._sizes.pop(h, None)
        if size is None:
            return 0
        with contextlib.suppress(FileNotFoundError):
            self._path(h).unlink()
        return size

    def _drop_if_spoiled(self, h: str) -> None:
        """Re-read held chunk ``h``; if it is bad, delete it, keeping its space reserved."""
        try:
            good = chunk_hash(self._path(h).read_bytes()) == h
        except FileNotFoundError:
            good = False
        if good:
            return
        size = self._sizes[h]
        self._delete(h)
        if any(h in hashes for hashes in self._owners.values()):
            self._reserved[h] = size
        log.warning("chunk store: chunk %s was spoiled on disk and is dropped", h[:12])

    def _path(self, h: str) -> Path:
        return self.root / h[:2] / h

    def _scan(self) -> dict[str, int]:
        """The chunk files on disk (well-named regular files only) and their sizes."""
        found: dict[str, int] = {}
        for folder in os.scandir(self.root):
            if not (folder.is_dir(follow_symlinks=False) and _FANOUT.fullmatch(folder.name)):
                continue
            for entry in os.scandir(folder.path):
                if (
                    _HASH.fullmatch(entry.name)
                    and entry.name[:2] == folder.name
                    and entry.is_file(follow_symlinks=False)
                ):
                    found[entry.name] = entry.stat(follow_symlinks=False).st_size
        return found


def _file_bytes(path: str) -> int:
    info = os.lstat(path)
    return info.st_size if stat.S_ISREG(info.st_mode) else 0
