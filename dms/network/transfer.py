"""Bulk data between nodes: signed manifests, content-addressed chunks, a stream of their own.

An envelope stays small (DESIGN.md decision 9). A payload larger than
``INLINE_BYTES`` travels as a :class:`Parcel` that holds a :class:`Manifest`
instead of the bytes: the manifest names the source peer (which holds the
chunks), the one audience peer that may pull them, the total size and the
sha256 of each chunk. The manifest rides in a signed envelope, so the receiver
knows who vouches for every chunk hash.

The receiver pulls the chunks it lacks on protocol ``/dms/chunks/1.0.0``, on a
stream of its own, so a transfer never queues behind or in front of the control
stream to the same peer (yamux multiplexes the two with separate windows). On
opening it, the receiver grants the source credit for the whole batch
(``STREAM_WINDOW_BYTES``), so the source never waits for credit mid-batch:

    request   u32 len | msgpack {"m": manifest id, "c": [chunk hash, ...]}
    response  per requested chunk, in order:
              u32 len | 0x00 | chunk bytes        (the chunk)
              u32 len | 0x01 | reason (utf-8)     (a refusal; the stream ends)

Every chunk is checked against its hash before it is stored; a bad one is
refused and asked for again. An interrupted transfer resumes with only the
missing chunks, and chunks the receiver already holds (the same public context
for a second shard) are never asked for. The source serves a manifest only to
its audience, authenticated by the libp2p connection; a chunk stream from a
peer no manifest offered here is for is refused at once (``chunks_unoffered``),
before it takes a transfer slot or is waited on.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import msgpack
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from pydantic import BaseModel, ConfigDict, Field

from dms.errors import DmsError
from dms.network.budgets import Budget
from dms.network.frames import FrameError, FrameReader, encode_frame
from dms.store.chunks import CHUNK_BYTES, ChunkError, ChunkStore

log = logging.getLogger("dms.transfer")

CHUNK_PROTOCOL = TProtocol("/dms/chunks/1.0.0")
INLINE_BYTES = 256 * 1024  # a payload up to this travels inside its envelope
MAX_PARCEL_BYTES = 4 * 1024**3
MAX_CHUNKS = MAX_PARCEL_BYTES // (64 * 1024)
BATCH_CHUNKS = 16  # chunks asked for on one stream (16 MiB)
# A chunk stream's receive window: one batch. py-libp2p's Yamux opens every stream at
# 256 KiB and a writer out of credit polls every 10 ms; with credit returned at half a
# window (dms.network.libp2p_patches) the window rarely grew, and 17 MB parcels between two
# nodes on loopback moved at ~30 MB/s. Granted at once: ~95 MB/s, as fast as a bare
# py-libp2p stream in the same run (bench/mine_network.py).
STREAM_WINDOW_BYTES = 16 * 1024 * 1024  # the largest window py-libp2p and go-yamux allow
REQUEST_MAX_BYTES = 64 * 1024
WIRE_OVERHEAD = 0.01  # Noise tags, Yamux headers, chunk frames: under 1 % of the chunks
FETCH_ATTEMPTS = 6
CHUNK_OK = b"\x00"
CHUNK_REFUSED = b"\x01"
MANIFEST_ID_PATTERN = r"^[0-9a-f]{32}$"
TRANSFERS_FULL = Budget.TRANSFERS_FULL
TRANSFER_STALLED = Budget.TRANSFER_STALLED
CHUNKS_UNOFFERED = Budget.CHUNKS_UNOFFERED


class TransferError(DmsError):
    """A parcel could not be fetched (source unreachable, refused, or chunks kept failing)."""

    code = "transfer_failed"


class Manifest(BaseModel):
    """What a receiver may pull, from whom; signed as part of the envelope that carries it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=MANIFEST_ID_PATTERN)
    source: str = Field(min_length=1, max_length=128)  # the peer that serves the chunks
    audience: str = Field(min_length=1, max_length=128)  # the only peer that may pull them
    size: int = Field(ge=0, le=MAX_PARCEL_BYTES)
    chunk_bytes: int = Field(ge=1024, le=CHUNK_BYTES)
    chunks: list[str] = Field(max_length=MAX_CHUNKS)

    def chunk_sizes(self) -> list[tuple[str, int]]:
        """Each chunk's hash with its size (all full but the last)."""
        out = []
        for i, h in enumerate(self.chunks):
            out.append((h, min(self.chunk_bytes, self.size - i * self.chunk_bytes)))
        return out


class Parcel(BaseModel):
    """A payload as a message field: its bytes inline, or the manifest to pull them by."""

    model_config = ConfigDict(extra="forbid")

    inline: bytes | None = None
    manifest: Manifest | None = None

    @property
    def size(self) -> int:
        if self.manifest is not None:
            return self.manifest.size
        return len(self.inline or b"")


class ChunkNetwork(Protocol):
    """What the courier needs from a transport (``Libp2pTransport`` provides it)."""

    @property
    def peer_id(self) -> str: ...

    def fetch_chunks(
        self, peer_id: str, manifest_id: str, hashes: list[str], max_chunk_bytes: int
    ) -> list[tuple[str, bytes]]: ...

    def relay_room(self, peer_id: str) -> tuple[int, int] | None:
        """(byte limit, bytes left) of the relayed connection to ``peer_id`` when it is
        reached only through a relay that limits it; else None."""
        ...


def relay_refusal(need: int, source: str, room: tuple[int, int] | None) -> str | None:
    """Why ``need`` bytes cannot be fetched from ``source`` through its relay, or None.
    What crosses the circuit is a little more than the chunks (Noise, Yamux and chunk
    framing: ``WIRE_OVERHEAD``)."""
    if room is None:
        return None
    limit, _left = room
    wire = int(need * (1 + WIRE_OVERHEAD)) + REQUEST_MAX_BYTES
    if wire <= limit:
        return None
    return (
        f"{need / 1e6:.1f} MB from {source[-8:]} cannot fit through the relay between us: "
        f"a relayed connection carries at most {limit / 1e6:.1f} MB (the relay's limit); "
        "refused before fetching"
    )


@dataclass
class _Offer:
    manifest: Manifest
    owner: str


@dataclass
class Offers:
    """The manifests this node serves, by id; shared by the courier and the stream handler."""

    store: ChunkStore
    _offers: dict[str, _Offer] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _audiences: Counter[str] = field(default_factory=Counter)  # offers for each peer
    served_chunks: int = 0
    served_bytes: int = 0

    def add(self, manifest: Manifest, owner: str) -> None:
        with self._lock:
            self._drop(manifest.id)
            self._offers[manifest.id] = _Offer(manifest, owner)
            self._audiences[manifest.audience] += 1

    def offered_to(self, peer: str) -> bool:
        """Whether any manifest served here is for ``peer`` (the only peers that may
        pull anything, so the only ones a chunk stream is worth a slot for)."""
        with self._lock:
            return peer in self._audiences

    def _drop(self, manifest_id: str) -> None:
        offer = self._offers.pop(manifest_id, None)
        if offer is not None:
            self._audiences[offer.manifest.audience] -= 1
            if self._audiences[offer.manifest.audience] <= 0:
                del self._audiences[offer.manifest.audience]

    def get(self, manifest_id: str) -> Manifest | None:
        with self._lock:
            offer = self._offers.get(manifest_id)
        return offer.manifest if offer else None

    def withdraw(self, owner: str) -> None:
        with self._lock:
            for mid in [m for m, o in self._offers.items() if o.owner == owner]:
                self._drop(mid)

    def count_served(self, size: int) -> None:
        with self._lock:
            self.served_chunks += 1
            self.served_bytes += size


@dataclass
class TransferBudget:
    """Chunk requests served at once, per peer and in total, and how long a chunk may
    take: ``idle_s`` plus its size at ``min_bytes_per_s`` (a request, ``idle_s``).
    One trio thread uses it (no lock). Refusals and stalls are counted in ``refusals``."""

    max_per_peer: int = 8
    max_total: int = 64
    idle_s: float = 10.0
    min_bytes_per_s: int = 256 * 1024
    refusals: Counter[str] = field(default_factory=Counter)
    by_peer: Counter[str] = field(default_factory=Counter)
    serving: int = 0

    def admit(self, peer: str) -> str | None:
        """Take a slot for ``peer``; or why there is none."""
        if self.by_peer[peer] >= self.max_per_peer:
            held = self.by_peer[peer]
            return f"{held} chunk requests of yours in progress (at most {self.max_per_peer})"
        if self.serving >= self.max_total:
            return f"{self.serving} chunk requests in progress (at most {self.max_total})"
        self.by_peer[peer] += 1
        self.serving += 1
        return None

    def release(self, peer: str) -> None:
        self.serving -= 1
        self.by_peer[peer] -= 1
        if self.by_peer[peer] <= 0:
            del self.by_peer[peer]

    def deadline_s(self, size: int) -> float:
        """How long moving ``size`` bytes may take on a chunk stream."""
        return self.idle_s + size / self.min_bytes_per_s

    def stalled(self, peer: str, what: str) -> None:
        self.refusals[TRANSFER_STALLED] += 1
        log.info("chunk stream with %s ended: %s: %s", peer, TRANSFER_STALLED, what)


def refusal_for(manifest: Manifest | None, peer: str, hashes: list[str]) -> str | None:
    """Why ``peer`` may not pull ``hashes`` of ``manifest``, or None."""
    if manifest is None:
        return "no such manifest here (withdrawn, or never offered)"
    if peer != manifest.audience:
        return "this manifest is for another peer"
    allowed = set(manifest.chunks)
    if any(h not in allowed for h in hashes):
        return "a requested chunk is not in the manifest"
    return None


async def serve_chunks(
    stream: INetStream,
    offers: Offers,
    tap: Callable[[str, bytes], None] | None = None,
    budget: TransferBudget | None = None,
) -> None:
    """The source side of one request: check the asker and the budget, then stream the
    chunks, each within the budget's deadline."""
    budget = budget or TransferBudget()
    peer = stream.muxed_conn.peer_id.to_base58()
    if not offers.offered_to(peer):
        # Before a slot or a wait: a stranger's streams cannot keep an audience's out.
        await _refuse(stream, peer, CHUNKS_UNOFFERED, UNOFFERED, budget)
        return
    full = budget.admit(peer)
    if full is not None:
        await _refuse(stream, peer, TRANSFERS_FULL, full, budget)
        return
    try:
        await _serve(stream, offers, tap, budget, peer)
    finally:
        budget.release(peer)


UNOFFERED = (
    "no such manifest here for this peer: none is offered to it (withdrawn, never "
    "offered, or each is for another peer)"
)


async def _refuse(
    stream: INetStream, peer: str, code: str, why: str, budget: TransferBudget
) -> None:
    """Answer a chunk stream with a refusal (``code: why``), counted and logged, and
    end it."""
    budget.refusals[code] += 1
    log.info("chunk request from %s refused: %s: %s", peer, code, why)
    with contextlib.suppress(Exception), trio.move_on_after(budget.idle_s):
        await stream.write(encode_frame(CHUNK_REFUSED + f"{code}: {why}".encode()))
        await stream.close()
    await _reset(stream)


async def _serve(
    stream: INetStream,
    offers: Offers,
    tap: Callable[[str, bytes], None] | None,
    budget: TransferBudget,
    peer: str,
) -> None:
    reader = FrameReader(stream, REQUEST_MAX_BYTES)
    try:
        with trio.fail_after(budget.idle_s):
            raw = await reader.next()
        request = msgpack.unpackb(
            raw, raw=False, max_bin_len=0, max_str_len=256, max_array_len=4096
        )
        if tap is not None:
            tap(peer, msgpack.packb(request))
        manifest_id, hashes = str(request["m"]), [str(h) for h in request["c"]]
    except trio.TooSlowError:
        budget.stalled(peer, f"no request within {budget.idle_s:g} s")
        await _reset(stream)
        return
    except (FrameError, EOFError, ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        log.info("bad chunk request from %s: %s", peer, exc)
        await _reset(stream)
        return
    manifest = offers.get(manifest_id)
    reason = refusal_for(manifest, peer, hashes)
    try:
        if reason is not None:
            log.warning("chunk request from %s refused: %s", peer, reason)
            with trio.fail_after(budget.idle_s):
                await stream.write(encode_frame(CHUNK_REFUSED + reason.encode()))
        else:
            for h in hashes:
                try:
                    # Disk reads (and the hash check on read) stay off the trio thread.
                    data = await trio.to_thread.run_sync(offers.store.get, h)
                except ChunkError as exc:  # gone, or corrupted on disk
                    with trio.fail_after(budget.idle_s):
                        await stream.write(encode_frame(CHUNK_REFUSED + str(exc).encode()))
                    break
                with trio.fail_after(budget.deadline_s(len(data))):
                    await stream.write(encode_frame(CHUNK_OK + data))
                offers.count_served(len(data))
        with trio.fail_after(budget.idle_s):
            await stream.close()
    except trio.TooSlowError:
        budget.stalled(
            peer, f"the asker reads slower than {budget.min_bytes_per_s} bytes/s, or not at all"
        )
        await _reset(stream)
    except Exception as exc:  # the asker went away mid-transfer: it will resume
        log.info("chunk stream to %s ended: %s", peer, exc)
        await _reset(stream)


async def read_chunks(
    stream: INetStream,
    manifest_id: str,
    hashes: list[str],
    max_chunk_bytes: int,
    budget: TransferBudget | None = None,
) -> list[tuple[str, bytes]]:
    """The receiving side of one request: what arrived, in order (possibly fewer). A
    source that sends a chunk slower than the budget allows is left: what came is kept."""
    budget = budget or TransferBudget()
    await _open_window(stream, len(hashes) * (max_chunk_bytes + 5))
    await stream.write(encode_frame(msgpack.packb({"m": manifest_id, "c": hashes})))
    reader = FrameReader(stream, max_chunk_bytes + 1)
    out: list[tuple[str, bytes]] = []
    peer = stream.muxed_conn.peer_id.to_base58()
    try:
        for h in hashes:
            with trio.fail_after(budget.deadline_s(max_chunk_bytes)):
                frame = await reader.next()
            if frame[:1] == CHUNK_REFUSED:
                reason = frame[1:].decode(errors="replace")
                if not out:
                    raise TransferError(f"the source refused: {reason}")
                break
            out.append((h, frame[1:]))
    except (EOFError, FrameError) as exc:  # interrupted: keep what came, resume later
        log.info("chunk stream for %s ended early: %s", manifest_id, exc)
    except trio.TooSlowError:
        budget.stalled(peer, f"a chunk of {manifest_id} took longer than its deadline")
        await _reset(stream)
    return out


async def _open_window(stream: INetStream, size: int) -> None:
    """Grant the source up to ``size`` bytes of credit at once (within
    ``STREAM_WINDOW_BYTES``). Yamux streams only; any other stream is left as it is."""
    muxed = getattr(stream, "muxed_stream", None)
    needed = ("window_lock", "recv_window", "target_recv_window", "send_window_update")
    if muxed is None or not all(hasattr(muxed, name) for name in needed):
        return
    async with muxed.window_lock:
        extra = min(size, STREAM_WINDOW_BYTES) - muxed.target_recv_window
        if extra <= 0:
            return
        muxed.target_recv_window += extra
        muxed.recv_window += extra
    # Never hold window_lock across the write (py-libp2p's rule, see dms.network.libp2p_patches).
    await muxed.send_window_update(extra, skip_lock=True)


async def _reset(stream: INetStream) -> None:
    with contextlib.suppress(Exception):
        await stream.reset()


@dataclass
class Traffic:
    """Bytes moved by a courier for one owner (a session, an allocation)."""

    sent: int = 0  # parcels packed for others (inline or offered)
    received: int = 0  # parcels unpacked (inline or fetched)
    fetched: int = 0  # chunk bytes actually pulled over the network
    fetch_s: float = 0.0


class Courier:
    """Packs payloads into parcels and unpacks them, fetching and verifying chunks.

    Blocking: called from worker threads, never from an actor's mailbox or trio.
    Each parcel belongs to an ``owner`` (a mining session, an allocation);
    :meth:`release` withdraws its offers and frees its chunks.
    """

    def __init__(
        self,
        store: ChunkStore,
        network: ChunkNetwork,
        *,
        inline_bytes: int = INLINE_BYTES,
        retry_s: float = 0.2,
    ) -> None:
        self.store = store
        self.network = network
        self.offers = Offers(store)
        self.inline_bytes = inline_bytes
        self.retry_s = retry_s
        self._traffic: dict[str, Traffic] = {}
        self._lock = threading.Lock()

    @property
    def peer_id(self) -> str:
        return self.network.peer_id

    def traffic(self, owner: str) -> Traffic:
        with self._lock:
            return self._traffic.setdefault(owner, Traffic())

    def pack(self, data: bytes, audience: str, owner: str) -> Parcel:
        """``data`` as a parcel for ``audience``: inline if small, else stored and offered.

        Raises ``QuotaExceeded`` (nothing stored) when the chunk store is full.
        """
        self.traffic(owner).sent += len(data)
        if len(data) <= self.inline_bytes:
            return Parcel(inline=data)
        hashes = self.store.put_blob(data, owner)
        manifest = Manifest(
            id=secrets.token_hex(16),
            source=self.peer_id,
            audience=audience,
            size=len(data),
            chunk_bytes=self.store.chunk_bytes,
            chunks=hashes,
        )
        self.offers.add(manifest, owner)
        return Parcel(manifest=manifest)

    def unpack(
        self,
        parcel: Parcel,
        source: str,
        owner: str,
        progress: Callable[[int, int], None] | None = None,
    ) -> bytes:
        """The parcel's bytes; chunks this node lacks are pulled from ``source``.

        ``source`` is the peer the caller expects the data from (the session or
        the allocation it talks to): a manifest naming another source, or
        another audience than this node, is refused.
        """
        traffic = self.traffic(owner)
        if parcel.manifest is None:
            data = parcel.inline or b""
            traffic.received += len(data)
            return data
        m = parcel.manifest
        if m.source != source:
            raise TransferError(f"the manifest names source {m.source}, not {source}")
        if m.audience != self.peer_id:
            raise TransferError("the manifest is for another peer")
        if len(m.chunks) != -(-m.size // m.chunk_bytes):
            raise TransferError("the manifest's chunk count does not match its size")
        self.store.reserve(m.chunk_sizes(), owner)  # QuotaExceeded: nothing fetched
        began = time.perf_counter()
        self._fetch_missing(m, owner, progress)
        traffic.fetch_s += time.perf_counter() - began
        data = self.store.assemble(m.chunks)
        if len(data) != m.size:
            raise TransferError(f"assembled {len(data)} bytes, the manifest says {m.size}")
        traffic.received += len(data)
        return data

    def _fetch_missing(
        self, m: Manifest, owner: str, progress: Callable[[int, int], None] | None
    ) -> None:
        failures = 0
        last_error = ""
        sizes = dict(m.chunk_sizes())
        need = sum(sizes[h] for h in self.store.missing(m.chunks))
        refused = relay_refusal(need, m.source, self.network.relay_room(m.source))
        if refused is not None:
            raise TransferError(refused)
        while True:
            missing = self.store.missing(m.chunks)
            if progress is not None:
                progress(m.size - sum(sizes[h] for h in missing), m.size)
            if not missing:
                self.store.add_owner(m.chunks, owner)
                return
            if failures >= FETCH_ATTEMPTS:
                raise TransferError(
                    f"{len(missing)} of {len(m.chunks)} chunks not fetched from "
                    f"{m.source[-8:]} after {failures} attempts: {last_error}"
                )
            batch = missing[:BATCH_CHUNKS]
            try:
                arrived = self.network.fetch_chunks(m.source, m.id, batch, m.chunk_bytes)
            except TransferError:
                raise
            except Exception as exc:  # unreachable, reset: try again, resuming
                failures += 1
                last_error = str(exc)
                time.sleep(self.retry_s * failures)
                continue
            good = 0
            for h, data in arrived:
                try:
                    self.store.put_chunk(h, data, owner)
                    good += 1
                    self.traffic(owner).fetched += len(data)
                except ChunkError as exc:  # it does not match its hash
                    last_error = str(exc)
                    log.warning("chunk from %s refused: %s", m.source[-8:], exc)
            if good < len(batch):
                failures += 1

    def release(self, owner: str) -> int:
        """Withdraw ``owner``'s offers and free the chunks only it needed."""
        self.offers.withdraw(owner)
        with self._lock:
            self._traffic.pop(owner, None)
        return self.store.release(owner)
