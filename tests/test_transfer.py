"""Bulk transfer between real libp2p nodes: manifests, verified chunks, resumption, quotas."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dms.network.transfer import Courier, Manifest, Parcel, TransferError
from dms.node.daemon import Node
from dms.sim.cluster import LocalCluster
from dms.store.chunks import CHUNK_BYTES, ChunkError, ChunkStore, QuotaExceeded


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, Node, Node]]:
    """Three real nodes on loopback: a source, its audience, and a stranger."""
    with LocalCluster(tmp_path_factory.mktemp("transfer")) as cluster:
        nodes = cluster.start(3)
        cluster.wait_linked()
        yield nodes[0], nodes[1], nodes[2]


def courier(node: Node, root: Path, quota: int = 256 * CHUNK_BYTES) -> Courier:
    """A courier of its own on ``node``'s transport (it serves what it offers)."""
    assert node.transport is not None
    made = Courier(ChunkStore(root, quota), node.transport, retry_s=0.01)
    node.transport.offers = made.offers
    return made


def test_a_large_payload_arrives_whole_and_small_ones_travel_inline(
    pair: tuple[Node, Node, Node], tmp_path: Path
) -> None:
    source, audience, _ = pair
    sender, receiver = courier(source, tmp_path / "s"), courier(audience, tmp_path / "r")
    data = os.urandom(5 * CHUNK_BYTES + 12345)
    parcel = sender.pack(data, audience.peer_id, "job")
    assert parcel.inline is None and parcel.manifest is not None
    assert len(parcel.manifest.chunks) == 6 and parcel.manifest.size == len(data)
    assert receiver.unpack(parcel, source.peer_id, "job") == data
    assert receiver.traffic("job").fetched == len(data)
    small = sender.pack(b"tiny", audience.peer_id, "job")
    assert small.inline == b"tiny" and small.manifest is None
    assert receiver.unpack(small, source.peer_id, "job") == b"tiny"


def test_chunks_the_receiver_holds_are_not_fetched_again(
    pair: tuple[Node, Node, Node], tmp_path: Path
) -> None:
    """The same public context for a second shard on one node costs nothing."""
    source, audience, _ = pair
    sender, receiver = courier(source, tmp_path / "s"), courier(audience, tmp_path / "r")
    context = os.urandom(3 * CHUNK_BYTES)
    first = sender.pack(context, audience.peer_id, "shard0")
    assert receiver.unpack(first, source.peer_id, "alloc0") == context
    served = sender.offers.served_chunks
    second = sender.pack(context, audience.peer_id, "shard1")
    assert receiver.unpack(second, source.peer_id, "alloc1") == context
    assert sender.offers.served_chunks == served
    assert receiver.traffic("alloc1").fetched == 0


def test_a_corrupted_chunk_is_refused_and_fetched_again(
    pair: tuple[Node, Node, Node], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, audience, _ = pair
    sender, receiver = courier(source, tmp_path / "s"), courier(audience, tmp_path / "r")
    data = os.urandom(3 * CHUNK_BYTES)
    parcel = sender.pack(data, audience.peer_id, "job")
    genuine = sender.store.get
    spoiled: list[str] = []

    def corrupt_once(h: str) -> bytes:
        chunk = genuine(h)
        if not spoiled:  # one bit flipped on the way, once
            spoiled.append(h)
            return bytes([chunk[0] ^ 1]) + chunk[1:]
        return chunk

    monkeypatch.setattr(sender.store, "get", corrupt_once)
    assert receiver.unpack(parcel, source.peer_id, "job") == data
    assert spoiled and sender.offers.served_chunks == 4  # 3 chunks, one of them twice


def test_an_interrupted_transfer_resumes_with_only_the_missing_chunks(
    pair: tuple[Node, Node, Node], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, audience, _ = pair
    sender, receiver = courier(source, tmp_path / "s"), courier(audience, tmp_path / "r")
    data = os.urandom(6 * CHUNK_BYTES)
    parcel = sender.pack(data, audience.peer_id, "job")
    assert parcel.manifest is not None
    genuine = sender.store.get
    calls: list[str] = []

    def break_after_two(h: str) -> bytes:
        calls.append(h)
        if len(calls) == 3:  # the source loses the third chunk once: the stream ends there
            raise ChunkError("gone for a moment")
        return genuine(h)

    monkeypatch.setattr(sender.store, "get", break_after_two)
    assert receiver.unpack(parcel, source.peer_id, "job") == data
    # Two chunks came in the first attempt; the second attempt asked only for the rest.
    assert calls[:2] == parcel.manifest.chunks[:2]
    assert calls[3:] == parcel.manifest.chunks[2:]


def test_only_the_peer_a_manifest_names_may_pull_it(
    pair: tuple[Node, Node, Node], tmp_path: Path
) -> None:
    source, audience, stranger = pair
    sender = courier(source, tmp_path / "s")
    thief = courier(stranger, tmp_path / "t")
    parcel = sender.pack(os.urandom(2 * CHUNK_BYTES), audience.peer_id, "job")
    assert parcel.manifest is not None
    # The stranger rewrites the audience to itself: the source still refuses it.
    forged = Parcel(manifest=parcel.manifest.model_copy(update={"audience": stranger.peer_id}))
    with pytest.raises(TransferError, match="for another peer"):
        thief.unpack(forged, source.peer_id, "job")
    assert thief.store.used_bytes == 0
    # And the genuine manifest is refused by the stranger's own courier.
    with pytest.raises(TransferError, match="for another peer"):
        thief.unpack(parcel, source.peer_id, "job")


def test_a_manifest_from_an_unexpected_source_is_refused(
    pair: tuple[Node, Node, Node], tmp_path: Path
) -> None:
    source, audience, stranger = pair
    sender, receiver = courier(source, tmp_path / "s"), courier(audience, tmp_path / "r")
    parcel = sender.pack(os.urandom(2 * CHUNK_BYTES), audience.peer_id, "job")
    with pytest.raises(TransferError, match="names source"):
        receiver.unpack(parcel, stranger.peer_id, "job")


def test_a_full_chunk_store_refuses_clearly_and_stores_nothing(
    pair: tuple[Node, Node, Node], tmp_path: Path
) -> None:
    source, audience, _ = pair
    sender = courier(source, tmp_path / "s")
    receiver = courier(audience, tmp_path / "r", quota=2 * CHUNK_BYTES)
    parcel = sender.pack(os.urandom(3 * CHUNK_BYTES), audience.peer_id, "job")
    with pytest.raises(QuotaExceeded, match="quota"):
        receiver.unpack(parcel, source.peer_id, "job")
    assert receiver.store.used_bytes == 0 and receiver.store.reserved_bytes == 0
    assert not [p for p in (tmp_path / "r").rglob("*") if p.is_file()]
    assert sender.offers.served_chunks == 0  # refused before a byte was asked for


def test_release_withdraws_offers_and_frees_chunks(
    pair: tuple[Node, Node, Node], tmp_path: Path
) -> None:
    source, audience, _ = pair
    sender, receiver = courier(source, tmp_path / "s"), courier(audience, tmp_path / "r")
    parcel = sender.pack(os.urandom(2 * CHUNK_BYTES), audience.peer_id, "job")
    assert sender.store.used_bytes == 2 * CHUNK_BYTES
    sender.release("job")
    assert sender.store.used_bytes == 0
    with pytest.raises(TransferError, match="no such manifest"):
        receiver.unpack(parcel, source.peer_id, "job")


def test_a_manifest_whose_count_does_not_match_its_size_is_refused(
    pair: tuple[Node, Node, Node], tmp_path: Path
) -> None:
    source, audience, _ = pair
    receiver = courier(audience, tmp_path / "r")
    lying = Manifest(
        id="0" * 32,
        source=source.peer_id,
        audience=audience.peer_id,
        size=10 * CHUNK_BYTES,
        chunk_bytes=CHUNK_BYTES,
        chunks=["a" * 64],
    )
    with pytest.raises(TransferError, match="chunk count"):
        receiver.unpack(Parcel(manifest=lying), source.peer_id, "job")
