"""A hostile peer for the adversarial tests and ``bench/adversary.py``.

:class:`BarePeer` is a bare py-libp2p host (TCP + Noise + Yamux) with an Ed25519
key of its own, on a trio thread of its own, dialed to one node: no dms node
runs behind it, so nothing of ours filters what it sends. It can

- write u32-prefixed frames on ``/dms/actor/1.0.0``, as ``dms/network/host.py``
  frames them, and read the node's replies (``actor=True``);
- run gossipsub (``gossip=True``). With ``strict_signing=True`` it behaves as go-
  and js-libp2p do by default (StrictSign: it signs its messages and drops any
  message without a valid signature); with ``strict_signing=False`` it can hand
  its router any message it builds (:meth:`BarePeer.forge`), a ``from`` that is
  not its own included.

Its envelopes are built with our own envelope code (or by hand where they must
be malformed, :func:`with_payload_bytes`) and signed by its own key, so they pass
the peer binding: the node cannot tell them from a real node's.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import msgpack
import trio
from libp2p import create_yamux_muxer_option, new_host
from libp2p.abc import INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from dms.actor import ROOT_INBOX, Address, Envelope, Handle, make_envelope, seal
from dms.actor.envelope import PREFIX_BYTES, REPLY_PREFIX, unseal
from dms.network.closing import close_host, close_hosts
from dms.network.frames import FrameReader
from dms.network.host import ACTOR_PROTOCOL
from dms.network.libp2p_patches import apply_libp2p_patches
from dms.security import Identity
from dms.security.tokens import Action, issue

T = TypeVar("T")
HOUR_S = 3600
MIB = 1024 * 1024
WRITE_BATCH_BYTES = 256 * 1024
FINISH_RETRY_S = 5.0
# How long a write waits for the node to grant window on the actor stream (a node resets
# an inbound stream with no frame for stream_idle_s, 120 s).
WINDOW_WAIT_S = 120.0
WINDOW_POLL_S = 0.01


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the node closed ``sock``, a raw TCP socket to it (what it sent before,
    its multistream header, is read and dropped)."""
    sock.settimeout(0.001)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


def with_payload_bytes(
    key: Identity, env: Envelope, payload: bytes, *, signed: bool = True
) -> bytes:
    """A frame for ``env`` whose payload is ``payload`` as given (any bytes, even
    undecodable), signed by ``key``; ``signed=False``: a signature of zeros."""
    plain = seal(env.model_copy(update={"payload": None}), key)
    (header_len,) = struct.unpack_from(">I", plain, 4)
    body = plain[: PREFIX_BYTES + header_len] + payload
    return body + (key.sign(body) if signed else b"\x00" * 64)


def token_chain(length: int, audience: bytes, caps: list[str] | None = None) -> bytes:
    """A delegation chain of ``length`` tokens, each signed by a fresh key, the last
    for ``audience``: built by hand (``issue`` refuses a token over 16 KiB), so a
    chain of 1,000 tokens (~280 KB) can be shown to a node."""
    raw: bytes | None = None
    key = Identity.generate()
    expires = int(time.time()) + HOUR_S
    for i in range(length):
        below = Identity.generate() if i < length - 1 else None
        fields = {
            "act": "delegate",
            "aud": below.public_key if below else audience,
            "cap": caps or ["/"],
            "depth": min(16, length - 1 - i),
            "exp": expires,
            "iss": key.public_key,
            "nonce": os.urandom(16),
            "prf": [raw] if raw is not None else [],
            "sub": below.public_key if below else audience,
            "topic": caps or ["/"],
            "v": 1,
        }
        body = msgpack.packb({k: fields[k] for k in sorted(fields)}, use_bin_type=True)
        raw = msgpack.packb([body, key.sign(body)], use_bin_type=True)
        key = below or key
    assert raw is not None
    return raw


def junk_revocations(member: Identity, member_token: bytes, count: int) -> list[bytes]:
    """What one group member can publish at no cost: revocations, signed by itself, of
    tokens it issues below its own to fresh keys (each valid, none ever used)."""
    out = []
    expires = int(time.time()) + HOUR_S
    for _ in range(count):
        stranger = Identity.generate().public_key
        sub = issue(member, stranger, ["/dms/deployment"], expires_at=expires,
                    proofs=[member_token])  # fmt: skip
        rev = issue(member, member.public_key, [], act=Action.REVOKE, expires_at=expires,
                    proofs=[sub.raw])  # fmt: skip
        out.append(rev.raw)
    return out


def root_of(identity: Identity) -> Handle:
    """The root actor of the host whose key is ``identity``."""
    return Handle(id=identity.public_key, address=Address(host=identity.peer_id, inbox=ROOT_INBOX))


def bare_host(identity: Identity) -> Any:
    """A plain py-libp2p host (Noise, yamux) for ``identity``: none of a node's budgets,
    patches or behaviours, as an attacker's own host would be."""
    key_pair = create_new_key_pair(identity.private_bytes())
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    return new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt=create_yamux_muxer_option(),
    )


async def connect(host: Any, info: Any) -> None:
    """``host.connect(info)``, back as soon as the connection is up: py-libp2p's dial
    waited out a 250 ms head start after a dial's last address, connection up or not
    (every bare host's connect took 0.26 s on loopback, a test making 30 keys 8 s).
    The process's patches to py-libp2p end it (``dial_every_address``; applied
    once a process, and on already beside any node of it): they change the library's
    code, not a host, so a bare host still has none of a node's budgets."""
    apply_libp2p_patches()
    await host.connect(info)


class BarePeer:
    """A bare py-libp2p host on a trio thread of its own, dialed to ``addr``."""

    def __init__(
        self,
        addr: str,
        *,
        actor: bool = False,
        gossip: bool = False,
        strict_signing: bool = True,
    ) -> None:
        self.identity = Identity.generate()
        self.peer_id = self.identity.peer_id
        self.heard: dict[str, list[rpc_pb2.Message]] = {}
        self.pubsub: Pubsub | None = None
        self.router: GossipSub | None = None
        self._addr = addr
        self._actor, self._gossip, self._strict = actor, gossip, strict_signing
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stream: INetStream | None = None
        self.host: Any = None
        # Streams the node opened to us (it writes its replies there), and streams we
        # opened and hold (open_streams).
        self.inbound: list[INetStream] = []
        self.held: list[INetStream] = []
        # Hosts of other keys run on this peer's loop (_another_key), closed with it:
        # cancelled alone, their connections stayed open at the node.
        self._extra_hosts: list[Any] = []
        self._replies: dict[bytes, Any] = {}  # request nonce -> reply payload
        self.received: Counter[str] = Counter()  # requests the node sent us, by behaviour
        self._replied = threading.Condition()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError(f"the bare peer did not start: {self._error!r}")

    # ---- the host ----------------------------------------------------------------------

    async def _main(self) -> None:
        host = bare_host(self.identity)
        self.host = host
        try:
            async with contextlib.AsyncExitStack() as stack:
                await stack.enter_async_context(host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]))
                if self._gossip:
                    router = GossipSub(
                        protocols=[PROTOCOL_ID_V11],
                        degree=6,
                        degree_low=4,
                        degree_high=12,
                        heartbeat_interval=1,
                        heartbeat_initial_delay=0.1,
                        max_messages_per_topic_per_second=10_000,
                    )
                    pubsub = Pubsub(host, router, strict_signing=self._strict)
                    self.pubsub, self.router = pubsub, router
                    await stack.enter_async_context(background_trio_service(pubsub))
                    await stack.enter_async_context(background_trio_service(router))
                    await pubsub.wait_until_ready()
                if self._actor:
                    host.set_stream_handler(ACTOR_PROTOCOL, self._on_stream)
                info = info_from_p2p_addr(Multiaddr(self._addr))
                await connect(host, info)
                if self._actor:
                    self._stream = await host.new_stream(info.peer_id, [ACTOR_PROTOCOL])
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self._token = trio.lowlevel.current_trio_token()
                    self._ready.set()
                    await trio.to_thread.run_sync(self._stop.wait)
                    # The other keys' hosts first, side by side, while their tasks run.
                    await close_hosts(self._extra_hosts)
                    nursery.cancel_scope.cancel()
                # Close every connection, so the node sees this peer leave at once.
                await close_host(host)
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``fn(*args)`` on the peer's trio loop and return its result (blocking)."""
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def close(self) -> None:
        BarePeer.close_all([self])

    @staticmethod
    def close_all(peers: Iterable[BarePeer]) -> None:
        """Close ``peers`` side by side, each on its own thread (one after another,
        the 30 keys of a flood took 6.5 s to close)."""
        closing = list(peers)
        for peer in closing:
            peer._stop.set()
        for peer in closing:
            peer._thread.join(10)

    # ---- envelopes -------------------------------------------------------------------

    def me(self) -> Handle:
        return root_of(self.identity)

    def envelope(
        self,
        to: Handle | None,
        behaviour: str,
        payload: Any = None,
        *,
        reply: bool = False,
        topic: str | None = None,
        ttl_s: float = 600,
    ) -> Envelope:
        """An envelope from this peer's root actor (its host key), to ``to`` or on ``topic``."""
        return make_envelope(
            self.me(),
            self.identity.public_key,
            behaviour,
            payload,
            to=to,
            ttl_s=ttl_s,
            expect_reply=reply,
            topic=topic,
        )

    def seal(self, env: Envelope) -> bytes:
        return seal(env, self.identity)

    def with_payload_bytes(self, env: Envelope, payload: bytes, *, signed: bool = True) -> bytes:
        return with_payload_bytes(self.identity, env, payload, signed=signed)

    # ---- the actor protocol ----------------------------------------------------------

    async def _on_stream(self, stream: INetStream) -> None:
        """What the node sends us (it opens its own stream for it): replies, kept by the
        nonce of their request, and requests, counted by behaviour (never answered)."""
        self.inbound.append(stream)
        reader = FrameReader(stream, 17 * MIB)
        try:
            while True:
                sealed = unseal(await reader.next(), 17 * MIB)
                path = sealed.envelope.behaviour
                with self._replied:
                    if path.startswith(REPLY_PREFIX):
                        nonce = bytes.fromhex(path[len(REPLY_PREFIX) :])
                        self._replies[nonce] = sealed.envelope.payload
                        self._replied.notify_all()
                    else:
                        self.received[path] += 1
        except Exception:
            return

    async def _write(self, frames: list[bytes], pace_s: float) -> None:
        assert self._stream is not None, "a BarePeer made with actor=True"
        batch: list[bytes] = []
        size = 0
        for frame in frames:
            batch.append(struct.pack(">I", len(frame)) + frame)
            size += len(frame) + 4
            if size >= WRITE_BATCH_BYTES or pace_s:
                await self._send(b"".join(batch))
                batch, size = [], 0
                if pace_s:
                    await trio.sleep(pace_s)
        if batch:
            await self._send(b"".join(batch))

    async def _send(self, data: bytes) -> None:
        """``data`` on the actor stream, waiting up to ``WINDOW_WAIT_S`` whenever the node
        grants no window, as a sender that keeps to Yamux's flow control does (go-yamux
        waits as long as the stream's deadline, none by default).

        py-libp2p's own write gives up after 5 s without window (``MuxedStreamError``,
        its stream taken as reset from then on): a victim reading 100 keys' floods on a
        loaded machine (10 busy processes beside it on 2 cores) left a key that long
        without window, and the flood failed on the attacker's side, not the node's,
        which reads a flooder more slowly by design (``bytes_throttled``). Each piece
        written here fits the window granted, so py-libp2p's write never waits."""
        assert self._stream is not None, "a BarePeer made with actor=True"
        muxed: Any = self._stream.muxed_stream
        sent = 0
        while sent < len(data):
            try:
                with trio.fail_after(WINDOW_WAIT_S):
                    while muxed.send_window <= 0 and not (muxed.closed or muxed.send_closed):
                        await trio.sleep(WINDOW_POLL_S)
            except trio.TooSlowError:
                raise RuntimeError(
                    f"the node granted no window for {WINDOW_WAIT_S:g} s on the actor stream"
                ) from None
            piece = data[sent : sent + max(muxed.send_window, 1)]  # closed: the write raises
            await self._stream.write(piece)
            sent += len(piece)

    def write(self, frames: list[bytes], pace_s: float = 0.0) -> None:
        """Write every frame on the actor stream (blocking; paced by ``pace_s`` if given)."""
        self.call(self._write, frames, pace_s)

    def reply(self, nonce: bytes, timeout: float) -> Any:
        """The node's reply payload to the request with ``nonce`` (None if none came)."""
        with self._replied:
            self._replied.wait_for(lambda: nonce in self._replies, timeout)
            return self._replies.get(nonce)

    def ask(self, to: Handle, behaviour: str, payload: Any = None, timeout: float = 10) -> Any:
        """One request on the actor stream; the reply payload (``{"ok": ...}``) or None."""
        env = self.envelope(to, behaviour, payload, reply=True)
        self.write([self.seal(env)])
        answer = self.reply(env.nonce, timeout)
        self.forget([env.nonce])
        return answer

    def answers(self, nonces: list[bytes]) -> list[Any]:
        """The node's reply payloads to these requests so far (None where none came)."""
        with self._replied:
            return [self._replies.get(nonce) for nonce in nonces]

    def refusal_codes(self, nonces: list[bytes]) -> dict[str, int]:
        """How the node answered these requests: ``ok``, a refusal's code, or ``no_reply``."""
        codes: dict[str, int] = {}
        with self._replied:
            for nonce in nonces:
                answer = self._replies.get(nonce)
                code = "no_reply" if answer is None else answer.get("code", "ok")
                codes[code] = codes.get(code, 0) + 1
        return codes

    def forget(self, nonces: list[bytes]) -> None:
        with self._replied:
            for nonce in nonces:
                self._replies.pop(nonce, None)

    def finish(self, to: Handle, timeout: float = 600) -> bool:
        """One last invoke on the same stream: its answer (its result, or a refusal such
        as ``rate_limited``) comes once the node has read every frame sent before it.
        A node over this peer's budget drops what it cannot answer, so the invoke is
        sent again every few seconds until one is answered."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            env = self.envelope(to, "/public/hello", reply=True)
            self.write([self.seal(env)])
            if self.reply(env.nonce, FINISH_RETRY_S) is not None:
                return True
        return False

    # ---- streams and windows ---------------------------------------------------------

    def push_unread(self, total: int, chunk: int = 64 * 1024) -> int:
        """Write ``total`` bytes back on the stream the node opened to us (one it never
        reads), ignoring the receive window it granted; the bytes written before the
        node reset the stream."""

        async def go() -> int:
            assert self.inbound, "the node has opened no stream to this peer (ask it first)"
            stream = self.inbound[-1]  # the latest (an earlier one may have been reset)
            sent = 0
            with contextlib.suppress(Exception):
                while sent < total:
                    stream.muxed_stream.send_window = 1 << 40  # type: ignore[attr-defined]
                    await stream.write(b"\x00" * min(chunk, total - sent))
                    sent += min(chunk, total - sent)
            return sent

        return self.call(go)

    def open_streams(
        self,
        protocol: str,
        count: int,
        first: bytes = b"",
        timeout_s: float = 10,
        *,
        at_once: bool = False,
    ) -> int:
        """Open ``count`` streams to the node on ``protocol``, one after another (or all
        side by side, ``at_once``), and hold them (writing ``first`` on each); how many
        opened (one not open within ``timeout_s`` is given up)."""
        info = info_from_p2p_addr(Multiaddr(self._addr))
        opened = [0]

        async def one() -> None:
            try:
                with trio.fail_after(timeout_s):
                    stream = await self.host.new_stream(info.peer_id, [protocol])
                    if first:
                        await stream.write(first)
            except Exception:
                return
            self.held.append(stream)
            opened[0] += 1

        async def go() -> int:
            if at_once:
                async with trio.open_nursery() as nursery:
                    for _ in range(count):
                        nursery.start_soon(one)
            else:
                for _ in range(count):
                    await one()
            return opened[0]

        return self.call(go)

    def relayed_keys(self, count: int) -> int:
        """Pose as a relay: open ``count`` connections to the node through this peer's
        own connection (a STOP stream each, as a relay sends), each from a fresh key;
        how many the node accepted."""
        from libp2p.abc import ConnectionType
        from libp2p.network.connection.raw_connection import RawConnection
        from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId, StopMessage
        from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID
        from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

        node = info_from_p2p_addr(Multiaddr(self._addr)).peer_id

        async def one() -> None:
            host = await self._another_key()
            with trio.fail_after(10):
                stream = await self.host.new_stream(node, [STOP_PROTOCOL_ID])
                connect = StopMessage(
                    type=StopMessage.CONNECT, peer=PeerId(id=host.get_id().to_bytes())
                )
                await write_delimited_msg(stream, connect)
                await read_delimited_msg(stream, StopMessage)
                raw = RawConnection(stream, initiator=True, connection_type=ConnectionType.RELAYED)
                await host.upgrade_outbound_connection(raw, node)

        async def go() -> int:
            made = 0
            for _ in range(count):
                with contextlib.suppress(Exception):
                    await one()
                    made += 1
            return made

        return self.call(go)

    async def _another_key(self) -> Any:
        """A bare host of a fresh key, running on this peer's loop (its nursery) until
        the peer closes, which closes it too (``_extra_hosts``)."""
        host = bare_host(Identity.generate())
        self._extra_hosts.append(host)
        running = trio.Event()

        async def run() -> None:
            async with host.run([]):
                running.set()
                await trio.sleep_forever()

        assert self._nursery is not None
        self._nursery.start_soon(run)
        await running.wait()
        return host

    def keys_opening_at_once(self, protocol: str, keys: int, streams: int) -> list[str]:
        """Dial the node from ``keys`` fresh keys in turn (bare hosts on this peer's
        loop), each opening ``streams`` streams on ``protocol`` side by side the moment
        its connection is up, and holding those that open; the keys' peer ids."""
        node = info_from_p2p_addr(Multiaddr(self._addr))

        async def open_one(host: Any) -> None:
            with contextlib.suppress(Exception), trio.fail_after(10):
                self.held.append(await host.new_stream(node.peer_id, [protocol]))

        async def one() -> str:
            host = await self._another_key()
            with trio.fail_after(10):
                await connect(host, node)
            async with trio.open_nursery() as nursery:
                for _ in range(streams):
                    nursery.start_soon(open_one, host)
            return str(host.get_id().to_base58())

        async def go() -> list[str]:
            return [await one() for _ in range(keys)]

        return self.call(go)

    def held_open(self) -> int:
        """How many of the held streams the node has not reset or closed."""
        return sum(1 for stream in self.held if not _ended(stream))

    def connected(self) -> bool:
        """Whether this peer still has a connection to the node."""
        info = info_from_p2p_addr(Multiaddr(self._addr))

        async def go() -> bool:
            return bool(self.host.get_network().get_connections(info.peer_id))

        return self.call(go)

    # ---- gossip ------------------------------------------------------------------------

    def subscribe(self, topic: str) -> None:
        heard = self.heard.setdefault(topic, [])

        async def go() -> None:
            assert self.pubsub is not None and self._nursery is not None
            subscription = await self.pubsub.subscribe(topic)

            async def pump() -> None:
                while True:
                    heard.append(await subscription.get())

            self._nursery.start_soon(pump)

        self.call(go)

    def publish(self, topic: str, data: bytes) -> None:
        async def go() -> None:
            assert self.pubsub is not None, "a BarePeer made with gossip=True"
            await self.pubsub.publish(topic, data)

        self.call(go)

    def publish_many(self, topic: str, frames: list[bytes], pace_s: float = 0.0) -> None:
        """Publish every frame on ``topic`` in one go (blocking; paced by ``pace_s``).
        Unpaced, py-libp2p's queue to each peer drops most of a burst of hundreds."""

        async def go() -> None:
            assert self.pubsub is not None, "a BarePeer made with gossip=True"
            for frame in frames:
                await self.pubsub.publish(topic, frame)
                if pace_s:
                    await trio.sleep(pace_s)

        self.call(go)

    def mesh_peers(self, topic: str) -> list[str]:
        """Peers this peer knows to be subscribed to ``topic``."""

        async def go() -> list[str]:
            assert self.pubsub is not None
            return [p.to_base58() for p in self.pubsub.peer_topics.get(topic, set())]

        return self.call(go)

    def forge(self, msg: rpc_pb2.Message) -> None:
        """Hand ``msg`` to the router as it is (no validation, no signature of ours):
        it goes to the peers subscribed to its topics."""

        async def go() -> None:
            assert self.pubsub is not None and self.router is not None
            await self.router.publish(self.pubsub.my_id, msg)

        self.call(go)


def _ended(stream: INetStream) -> bool:
    muxed = stream.muxed_stream
    return bool(
        getattr(muxed, "closed", False)
        or getattr(muxed, "reset_received", False)
        or getattr(muxed, "recv_closed", False)
        or getattr(stream.muxed_conn, "is_closed", False)
    )


class ManyKeys:
    """``count`` bare hosts, each with a fresh key, all on one trio thread, each dialed
    to ``addr`` and holding its connection: one process posing as many peers."""

    def __init__(self, addr: str, count: int) -> None:
        self._addr = addr
        self._count = count
        self.hosts: list[Any] = []
        self.dialed = 0
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        if not self._ready.wait(600):
            raise RuntimeError("the hosts did not start")

    async def _main(self) -> None:
        info = info_from_p2p_addr(Multiaddr(self._addr))
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(self._count):
                host = bare_host(Identity.generate())
                await stack.enter_async_context(host.run([]))
                self.hosts.append(host)
                try:
                    with trio.fail_after(10):
                        await connect(host, info)
                    self.dialed += 1
                except Exception:
                    pass
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await trio.to_thread.run_sync(self._stop.wait)
            await close_hosts(self.hosts)

    def connected(self) -> int:
        """How many of the hosts still hold a connection to the node."""
        info = info_from_p2p_addr(Multiaddr(self._addr))

        async def go() -> int:
            return sum(1 for h in self.hosts if h.get_network().get_connections(info.peer_id))

        return trio.from_thread.run(go, trio_token=self._token)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(60)
