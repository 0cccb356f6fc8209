"""The chunk store: verified, deduplicated, within its quota, and nothing left behind."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from dms.config import Settings
from dms.errors import DmsError
from dms.store.chunks import (
    CHUNK_BYTES,
    ChunkError,
    ChunkStore,
    QuotaExceeded,
    chunk_hash,
    split,
)

SMALL = 16  # chunk size for tests: several chunks from a few bytes


def make_store(tmp_path: Path, quota: int = 1000, chunk_bytes: int = SMALL) -> ChunkStore:
    return ChunkStore(tmp_path / "chunks", quota, chunk_bytes=chunk_bytes)


def listing(root: Path) -> dict[str, int]:
    """Every file under ``root`` (relative path -> size), temporary files included."""
    return {
        str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()
    }


def chunk_files(root: Path) -> dict[str, int]:
    """The chunk files under ``root`` (name -> size), read independently of the store."""
    return {
        p.name: p.stat().st_size
        for p in root.glob("??/*")
        if p.is_file() and len(p.name) == 64 and p.parent.name == p.name[:2]
    }


# ---- split and hash ------------------------------------------------------------------


@given(data=st.binary(max_size=200), size=st.integers(1, 50))
def test_split_cuts_into_full_chunks_and_joins_back(data: bytes, size: int) -> None:
    chunks = split(data, size)
    assert b"".join(chunks) == data
    assert all(len(c) == size for c in chunks[:-1])
    assert all(0 < len(c) <= size for c in chunks)


def test_split_edges() -> None:
    assert split(b"") == []
    assert split(b"abc", 3) == [b"abc"]
    assert split(b"abcd", 3) == [b"abc", b"d"]
    assert split(b"x" * (CHUNK_BYTES + 1)) == [b"x" * CHUNK_BYTES, b"x"]
    with pytest.raises(ValueError):
        split(b"abc", 0)


def test_chunk_hash_is_sha256_hex() -> None:
    empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert chunk_hash(b"") == empty


def test_errors_carry_their_codes() -> None:
    assert issubclass(QuotaExceeded, ChunkError) and issubclass(ChunkError, DmsError)
    assert ChunkError("x").code == "bad_chunk"
    err = QuotaExceeded(needed=300, free=100, quota=1000)
    assert err.code == "quota_exceeded"
    assert "300" in str(err) and "100" in str(err) and "1000" in str(err)


def test_chunk_quota_setting_defaults_to_2_gib() -> None:
    assert Settings().chunk_quota == 2 * 1024**3
    assert Settings(chunk_quota=0).chunk_quota == 0


# ---- layout --------------------------------------------------------------------------


def test_layout_fans_out_by_hash_prefix_with_private_modes(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    root = tmp_path / "chunks"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    [h] = store.put_blob(b"hello", "s1")
    path = root / h[:2] / h
    assert path.read_bytes() == b"hello"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert listing(root) == {f"{h[:2]}/{h}": 5}  # no temporary file left


def test_an_existing_root_is_made_private(tmp_path: Path) -> None:
    root = tmp_path / "chunks"
    root.mkdir(mode=0o755)
    ChunkStore(root, 10)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


# ---- put, get, dedup -----------------------------------------------------------------


def test_put_blob_round_trip(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    blob = bytes(range(100))
    hashes = store.put_blob(blob, "s1")
    assert len(hashes) == 7  # 6 × 16 + 4
    assert store.assemble(hashes) == blob
    assert store.used_bytes == 100 and store.free_bytes == 900
    assert store.missing(hashes) == []
    assert store.put_blob(b"", "s1") == [] and store.assemble([]) == b""


def test_dedup_same_blob_twice_uses_space_once(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    blob = os.urandom(40)
    first = store.put_blob(blob, "s1")
    second = store.put_blob(blob, "s2")
    assert first == second
    assert store.used_bytes == 40
    assert sum(chunk_files(tmp_path / "chunks").values()) == 40


def test_dedup_repeated_chunks_within_a_blob(tmp_path: Path) -> None:
    store = make_store(tmp_path, quota=SMALL + 1)
    hashes = store.put_blob(b"z" * SMALL * 5 + b"!", "s1")  # 6 chunks, 2 distinct
    assert len(hashes) == 6 and len(set(hashes)) == 2
    assert store.used_bytes == SMALL + 1 and store.free_bytes == 0


def test_put_chunk_verifies_and_stores(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    data = b"a chunk"
    h = chunk_hash(data)
    store.put_chunk(h, data, "s1")
    assert store.has(h) and store.get(h) == data and store.used_bytes == len(data)
    store.put_chunk(h, data, "s2")  # again, for another owner: no more space
    assert store.used_bytes == len(data)
    assert store.references("s2") == {h}


def test_a_chunk_that_does_not_match_its_hash_is_refused(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    h = chunk_hash(b"the real bytes")
    with pytest.raises(ChunkError, match=f"chunk {h[:12]} does not match its hash"):
        store.put_chunk(h, b"other bytes", "s1")
    assert not store.has(h)
    assert listing(tmp_path / "chunks") == {}
    assert store.used_bytes == 0 and store.reserved_bytes == 0
    assert store.references("s1") == frozenset()


def test_a_chunk_larger_than_the_chunk_size_is_refused(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    data = b"x" * (SMALL + 1)
    with pytest.raises(ChunkError, match="over"):
        store.put_chunk(chunk_hash(data), data, "s1")
    assert listing(tmp_path / "chunks") == {}


def test_get_of_an_absent_chunk_is_an_error(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    with pytest.raises(ChunkError, match="not held"):
        store.get(chunk_hash(b"nothing"))


def test_missing_keeps_order_and_drops_duplicates(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    [held] = store.put_blob(b"held", "s1")
    a, b = chunk_hash(b"a"), chunk_hash(b"b")
    assert store.missing([b, held, a, b, a, held]) == [b, a]


# ---- spoiled on disk -----------------------------------------------------------------


def test_a_chunk_spoiled_on_disk_is_detected_on_get_and_can_be_fetched_again(
    tmp_path: Path,
) -> None:
    store = make_store(tmp_path)
    data = b"0123456789abcdef"
    [h] = store.put_blob(data, "s1")
    (tmp_path / "chunks" / h[:2] / h).write_bytes(b"0123456789abcdeX")
    with pytest.raises(ChunkError, match="spoiled"):
        store.get(h)
    assert not store.has(h)
    assert store.missing([h]) == [h]
    assert store.used_bytes == 0 and store.reserved_bytes == len(data)  # its room stays
    with pytest.raises(ChunkError):
        store.assemble([h])
    store.put_chunk(h, data, "s1")
    assert store.get(h) == data
    assert store.audit() == []


def test_a_chunk_file_deleted_behind_the_store_is_detected(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    [h] = store.put_blob(b"gone", "s1")
    (tmp_path / "chunks" / h[:2] / h).unlink()
    with pytest.raises(ChunkError):
        store.get(h)
    assert store.missing([h]) == [h] and store.audit() == []


# ---- quota ---------------------------------------------------------------------------


def test_quota_refusal_stores_nothing(tmp_path: Path) -> None:
    store = make_store(tmp_path, quota=50)
    store.put_blob(b"a" * 30, "s1")
    before = listing(tmp_path / "chunks")
    with pytest.raises(QuotaExceeded) as caught:
        store.put_blob(os.urandom(40), "s2")
    assert caught.value.needed == 40 and caught.value.free == 20 and caught.value.quota == 50
    assert "40" in str(caught.value) and "20" in str(caught.value) and "50" in str(caught.value)
    assert listing(tmp_path / "chunks") == before
    assert store.used_bytes == 30 and store.reserved_bytes == 0
    assert store.references("s2") == frozenset()


def test_quota_counts_only_the_new_bytes(tmp_path: Path) -> None:
    store = make_store(tmp_path, quota=48)
    old = os.urandom(32)
    store.put_blob(old, "s1")
    store.put_blob(old + os.urandom(16), "s2")  # 32 held + 16 new: fits exactly
    assert store.used_bytes == 48 and store.free_bytes == 0


def test_a_zero_quota_holds_nothing_but_empty_blobs(tmp_path: Path) -> None:
    store = make_store(tmp_path, quota=0)
    assert store.put_blob(b"", "s1") == []
    with pytest.raises(QuotaExceeded):
        store.put_chunk(chunk_hash(b"x"), b"x", "s1")


def test_an_unreserved_put_chunk_counts_against_the_quota(tmp_path: Path) -> None:
    store = make_store(tmp_path, quota=10)
    with pytest.raises(QuotaExceeded):
        store.put_chunk(chunk_hash(b"x" * 11), b"x" * 11, "s1")
    assert listing(tmp_path / "chunks") == {}


# ---- reservations --------------------------------------------------------------------


def manifest(*chunks: bytes) -> list[tuple[str, int]]:
    return [(chunk_hash(c), len(c)) for c in chunks]


def test_reserve_then_pull(tmp_path: Path) -> None:
    store = make_store(tmp_path, quota=40)
    a, b = b"a" * 16, b"b" * 10
    store.reserve(manifest(a, b), "alloc")
    assert store.reserved_bytes == 26 and store.used_bytes == 0 and store.free_bytes == 14
    assert store.missing([chunk_hash(a), chunk_hash(b)]) == [chunk_hash(a), chunk_hash(b)]
    # someone else cannot take the reserved room
    with pytest.raises(QuotaExceeded):
        store.put_blob(os.urandom(15), "other")
    store.put_chunk(chunk_hash(a), a, "alloc")
    store.put_chunk(chunk_hash(b), b, "alloc")
    assert store.reserved_bytes == 0 and store.used_bytes == 26 and store.free_bytes == 14
    assert store.assemble([chunk_hash(a), chunk_hash(b)]) == a + b


def test_reserve_refusal_reserves_nothing(tmp_path: Path) -> None:
    store = make_store(tmp_path, quota=20)
    with pytest.raises(QuotaExceeded) as caught:
        store.reserve(manifest(b"a" * 16, b"b" * 16), "alloc")
    assert caught.value.needed == 32 and caught.value.free == 20
    assert store.reserved_bytes == 0 and store.references("alloc") == frozenset()


def test_reserve_of_held_chunks_only_adds_the_owner(tmp_path: Path) -> None:
    store = make_store(tmp_path, quota=20)
    context = b"public context!!"
    store.put_blob(context, "alloc1")
    store.reserve(manifest(context), "alloc2")  # already held: no new room needed
    assert store.reserved_bytes == 0 and store.used_bytes == 16
    store.release("alloc1")
    assert store.get(chunk_hash(context)) == context  # alloc2 still holds it


def test_reserve_refuses_bad_sizes(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    h = chunk_hash(b"x")
    for size in (-1, SMALL + 1):
        with pytest.raises(ChunkError, match="size"):
            store.reserve([(h, size)], "alloc")
    with pytest.raises(ChunkError, match="two sizes"):
        store.reserve([(h, 1), (h, 2)], "alloc")
    assert store.reserved_bytes == 0


def test_a_wrong_size_in_a_manifest_is_corrected_by_the_verified_bytes(tmp_path: Path) -> None:
    store = make_store(tmp_path, quota=16)
    data = b"x" * 12
    store.reserve([(chunk_hash(data), 2)], "liar")  # claims 2 bytes
    assert store.free_bytes == 14
    store.put_chunk(chunk_hash(data), data, "honest")
    assert store.used_bytes == 12 and store.reserved_bytes == 0 and store.audit() == []
    # a correction that does not fit is refused
    big = b"y" * 16
    store.reserve([(chunk_hash(big), 1)], "liar")
    with pytest.raises(QuotaExceeded):
        store.put_chunk(chunk_hash(big), big, "liar")
    assert not store.has(chunk_hash(big)) and store.audit() == []


def test_add_owner_needs_held_or_reserved_chunks(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    [h] = store.put_blob(b"shared", "s1")
    store.add_owner([h], "s2")
    with pytest.raises(ChunkError, match="neither held nor reserved"):
        store.add_owner([h, chunk_hash(b"unknown")], "s3")
    assert store.references("s3") == frozenset()
    store.release("s1")
    assert store.has(h)
    assert store.release("s2") == len(b"shared")
    assert not store.has(h)


# ---- release and clean ---------------------------------------------------------------


def test_release_frees_only_unshared_chunks(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    shared = b"s" * SMALL
    mine = store.put_blob(shared + b"only one", "s1")
    store.put_blob(shared, "s2")
    assert store.release("s1") == len(b"only one")
    assert store.has(mine[0]) and not store.has(mine[1])
    assert store.used_bytes == SMALL
    assert store.release("s1") == 0  # twice is harmless
    assert store.release("s2") == SMALL
    assert store.used_bytes == 0 and chunk_files(tmp_path / "chunks") == {}


def test_release_drops_reservations(tmp_path: Path) -> None:
    store = make_store(tmp_path, quota=40)
    store.reserve(manifest(b"a" * 16, b"b" * 16), "alloc")
    assert store.release("alloc") == 0  # nothing on disk yet
    assert store.free_bytes == 40 and store.reserved_bytes == 0


def test_a_chunk_arriving_after_its_release_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(tmp_path)
    data = b"late"
    h = chunk_hash(data)
    real_fdopen = os.fdopen

    def release_meanwhile(fd: int, mode: str):  # the write races a session's end
        store.release("alloc")
        return real_fdopen(fd, mode)

    store.reserve([(h, len(data))], "alloc")
    monkeypatch.setattr(os, "fdopen", release_meanwhile)
    with pytest.raises(ChunkError, match="released while it was being written"):
        store.put_chunk(h, data, "alloc")
    monkeypatch.undo()
    assert not store.has(h) and listing(tmp_path / "chunks") == {}
    assert store.audit() == []


def test_clean_removes_orphans_and_temporary_files(tmp_path: Path) -> None:
    root = tmp_path / "chunks"
    old = make_store(tmp_path)
    hashes = old.put_blob(os.urandom(40), "before the restart")
    [h] = hashes[:1]
    (root / h[:2] / f".{h[:12]}.abc123.tmp").write_bytes(b"half a ch")  # a crash mid-write
    (root / "stray").write_bytes(b"??")
    # a restarted node: the chunks on disk are counted but no one owns them
    store = make_store(tmp_path)
    assert store.used_bytes == 40 and store.audit() == []
    assert store.clean() == 40 + 9 + 2
    assert list(root.iterdir()) == []
    assert store.used_bytes == 0 and store.free_bytes == 1000
    assert store.missing(hashes) == hashes
    assert store.clean() == 0
    assert store.assemble(store.put_blob(b"again", "s1")) == b"again"  # usable after


# ---- hostile hashes ------------------------------------------------------------------

BAD_HASHES = [
    "../x",
    "../" + "a" * 61,
    "a" * 62 + "/.",
    "A" * 64,
    chunk_hash(b"x").upper(),
    "a" * 63,
    "a" * 65,
    "a" * 64 + "\n",
    "g" * 64,
    "",
    None,
    b"a" * 64,
]


@pytest.mark.parametrize("bad", BAD_HASHES, ids=repr)
def test_bad_hashes_are_refused_everywhere(tmp_path: Path, bad: object) -> None:
    store = make_store(tmp_path)
    calls = [
        lambda: store.has(bad),  # type: ignore[arg-type]
        lambda: store.get(bad),  # type: ignore[arg-type]
        lambda: store.put_chunk(bad, b"x", "s1"),  # type: ignore[arg-type]
        lambda: store.missing([bad]),  # type: ignore[list-item]
        lambda: store.reserve([(bad, 1)], "s1"),  # type: ignore[list-item]
        lambda: store.add_owner([bad], "s1"),  # type: ignore[list-item]
        lambda: store.assemble([bad]),  # type: ignore[list-item]
    ]
    for call in calls:
        with pytest.raises(ChunkError, match="not a chunk hash"):
            call()
    assert list((tmp_path / "chunks").iterdir()) == []
    assert not (tmp_path / "x").exists()


def test_a_hash_that_matches_but_is_not_lowercase_is_refused(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    with pytest.raises(ChunkError):
        store.put_chunk(chunk_hash(b"x").upper(), b"x", "s1")


# ---- threads -------------------------------------------------------------------------


def run_threads(target, args: list[tuple]) -> list[BaseException | None]:
    results: list[BaseException | None] = [None] * len(args)

    def run(i: int) -> None:
        try:
            target(*args[i])
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_puts_cannot_both_take_the_last_bytes(tmp_path: Path) -> None:
    store = make_store(tmp_path, quota=100)
    blobs = [os.urandom(30) for _ in range(8)]
    results = run_threads(store.put_blob, [(b, f"s{i}") for i, b in enumerate(blobs)])
    assert all(r is None or isinstance(r, QuotaExceeded) for r in results)
    stored = sum(r is None for r in results)
    assert stored == 3
    assert store.used_bytes == 90 == sum(chunk_files(tmp_path / "chunks").values())
    assert store.audit() == []


def test_concurrent_puts_of_the_same_blob_all_succeed_once(tmp_path: Path) -> None:
    store = make_store(tmp_path, quota=64)
    blob = os.urandom(64)
    results = run_threads(store.put_blob, [(blob, f"s{i}") for i in range(8)])
    assert results == [None] * 8
    assert store.used_bytes == 64 and store.audit() == []
    assert listing(tmp_path / "chunks").keys() == {f"{h[:2]}/{h}" for h in split_hashes(blob)}


def split_hashes(blob: bytes) -> list[str]:
    return [chunk_hash(c) for c in split(blob, SMALL)]


# ---- the accounting under any sequence of operations ---------------------------------

POOL = [os.urandom(n) for n in (3, 16, 16, 7, 12)]  # chunks; blobs are made of them
OWNERS = ["a", "b", "c"]


class ChunkStoreMachine(RuleBasedStateMachine):
    """Random puts, reservations, releases: disk, memory and quota always agree."""

    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp())
        self.root = self.folder / "chunks"
        self.store = ChunkStore(self.root, 48, chunk_bytes=SMALL)
        self.refs: dict[str, set[str]] = {}  # the model: owner -> hashes it references
        self.sizes = {chunk_hash(c): len(c) for c in POOL}  # every chunk seen

    def teardown(self) -> None:
        shutil.rmtree(self.folder)

    def _needed(self, sizes: dict[str, int]) -> int:
        return sum(s for h, s in sizes.items() if not self.store.has(h) and not self._reserved(h))

    def _reserved(self, h: str) -> bool:
        return any(h in r for r in self.refs.values()) and not self.store.has(h)

    @rule(owner=st.sampled_from(OWNERS), parts=st.lists(st.sampled_from(POOL), max_size=4))
    def put_blob(self, owner: str, parts: list[bytes]) -> None:
        blob = b"".join(parts)
        sizes = {chunk_hash(c): len(c) for c in split(blob, SMALL)}
        self.sizes.update(sizes)
        needed, free = self._needed(sizes), self.store.free_bytes
        before = listing(self.root)
        try:
            hashes = self.store.put_blob(blob, owner)
        except QuotaExceeded:
            assert needed > free
            assert listing(self.root) == before
            return
        assert needed <= free
        assert self.store.assemble(hashes) == blob
        self.refs.setdefault(owner, set()).update(hashes)

    @rule(owner=st.sampled_from(OWNERS), chunk=st.sampled_from(POOL), spoil=st.booleans())
    def put_chunk(self, owner: str, chunk: bytes, spoil: bool) -> None:
        h = chunk_hash(chunk)
        needed, free = self._needed({h: len(chunk)}), self.store.free_bytes
        try:
            self.store.put_chunk(h, chunk[::-1] + b"!" if spoil else chunk, owner)
        except QuotaExceeded:
            assert not spoil and needed > free
            return
        except ChunkError:
            assert spoil
            return
        assert not spoil and needed <= free
        assert self.store.get(h) == chunk
        self.refs.setdefault(owner, set()).add(h)

    @rule(owner=st.sampled_from(OWNERS), chunks=st.lists(st.sampled_from(POOL), max_size=3))
    def reserve(self, owner: str, chunks: list[bytes]) -> None:
        sizes = {chunk_hash(c): len(c) for c in chunks}
        needed, free = self._needed(sizes), self.store.free_bytes
        try:
            self.store.reserve(list(sizes.items()), owner)
        except QuotaExceeded:
            assert needed > free
            return
        assert needed <= free
        self.refs.setdefault(owner, set()).update(sizes)

    @rule(owner=st.sampled_from(OWNERS))
    def release(self, owner: str) -> None:
        gone = self.refs.pop(owner, set())
        still = set().union(*self.refs.values())
        on_disk = chunk_files(self.root)
        expected = sum(on_disk.get(h, 0) for h in gone - still)
        assert self.store.release(owner) == expected

    @invariant()
    def accounting_holds(self) -> None:
        on_disk = chunk_files(self.root)
        assert self.store.used_bytes == sum(on_disk.values()) <= self.store.quota_bytes
        assert self.store.used_bytes + self.store.reserved_bytes <= self.store.quota_bytes
        assert self.store.free_bytes == (
            self.store.quota_bytes - self.store.used_bytes - self.store.reserved_bytes
        )
        referenced = set().union(*self.refs.values())
        for owner, hashes in self.refs.items():
            assert self.store.references(owner) == hashes
        # every chunk on disk is referenced, and only reservations are not on disk
        assert set(on_disk) <= referenced
        reserved = referenced - set(on_disk)
        assert self.store.reserved_bytes == sum(self.sizes[h] for h in reserved)
        assert listing(self.root) == {f"{h[:2]}/{h}": n for h, n in on_disk.items()}  # no temp
        assert self.store.audit() == []


TestChunkStoreModel = ChunkStoreMachine.TestCase
TestChunkStoreModel.settings = settings(
    max_examples=60, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
