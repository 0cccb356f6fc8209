"""A hostile peer attacks one node while an honest peer keeps invoking it (issue 17).

- victim: a real ``dms run`` in a process of its own (its own home), so its
  memory is its own: ``victim_rss_growth_mb`` is its RSS after the attack
  (once it has worked through everything sent) minus its RSS just before;
  ``victim_rss_peak_growth_mb`` is the highest RSS seen during the attack minus
  the same baseline. ``victim_alive``: the process still runs and answers.
- honest: a dms node in this process (its own trio thread) that invokes
  ``/public/hello`` on the victim's root actor, one signed invoke after another.
  ``baseline_p50_ms``: with no attack, just before it, same run;
  ``honest_p50_ms`` and ``honest_success_rate``: while the attack runs.
- hostile: a bare py-libp2p host (TCP + Noise + Yamux, its own trio thread and
  Ed25519 key) that writes u32-prefixed frames on ``/dms/actor/1.0.0``, as
  ``dms/network/host.py`` frames them. Its envelopes are built with our envelope
  code (or by hand where they must be malformed) and signed by its own key, so
  they pass the peer binding: the victim cannot tell them from a real node's.
  Every frame is built before the attack starts, so building them costs the
  honest peer nothing.

Attacks:

- ``decode_bomb``: frames built to blow up when decoded (nested empty maps: one
  byte becomes ~70): signed 16 MiB ones for a control behaviour (refused by their
  size class, undecoded), signed ones just under the 1 MiB control limit
  (decoded within the item budget, refused as malformed) and unsigned ones
  (refused by their signature, undecoded), interleaved, ``--bombs`` of each.
- ``replay_cache_fill``: ``--fill`` (100,000) unique, correctly signed envelopes
  as fast as the victim takes them, then the first thousand again (replays).
  The victim takes ``max_frames_per_s`` a second from one peer (``frame_burst``
  at once) and refuses the rest undecoded (``rate_limited``);
  ``--frames-per-s`` sets it (a huge value: no limit, every envelope verified).

Besides the figures above, each line says whether the victim worked through
everything (``victim_caught_up``: the reply to one last invoke on the same
stream came back) and how it answered: ``refusals`` (decode bomb), and
``first_sends`` / ``replays`` (replay-cache fill; the first thousand envelopes
ask for a reply, so their replays are answered with the refusal's code).

Prints one JSON line per attack with --json; exits 1 if a target is missed
(victim alive, RSS growth <= 50 MB, honest success >= 0.95, p50 <= 2 x baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import psutil
import trio
from libp2p import create_yamux_muxer_option, new_host
from libp2p.abc import INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from multiaddr import Multiaddr

from dms.actor import ROOT_INBOX, Address, Envelope, Handle, make_envelope, seal
from dms.actor.envelope import PREFIX_BYTES, REPLY_PREFIX, unseal
from dms.config import Settings
from dms.network.frames import FrameReader
from dms.network.host import ACTOR_PROTOCOL
from dms.node.client import root_handle
from dms.security import Identity
from dms.sim.cluster import LocalCluster

MIB = 1024 * 1024
PASSPHRASE = "adversary bench"
WRITE_BATCH_BYTES = 256 * 1024
FINISH_RETRY_S = 5.0


# ---- the victim: a real daemon in its own process ----------------------------------


class Victim:
    def __init__(self, root: Path, settings: dict[str, str] | None = None) -> None:
        self.home = root / "victim"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DMS_")}
        env.update(DMS_HOME=str(self.home), DMS_PASSPHRASE=PASSPHRASE, DMS_LOG_LEVEL="ERROR")
        env.update(settings or {})
        dms = [sys.executable, "-m", "dms"]
        subprocess.run([*dms, "init"], env=env, check=True, capture_output=True)
        self.log = open(root / "victim.log", "w")  # noqa: SIM115 (open for the run)
        self.proc = subprocess.Popen(
            [*dms, "run", "--listen", "/ip4/127.0.0.1/tcp/0", "--api-port", "0", "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the victim did not start: see {root / 'victim.log'}")
        self.info = json.loads(line)
        self.peer_id: str = self.info["peer_id"]
        self.addr: str = self.info["addrs"][0]
        self.process = psutil.Process(self.proc.pid)

    def rss_mb(self) -> float:
        return self.process.memory_info().rss / MIB

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


# ---- the hostile peer: a bare py-libp2p host -------------------------------------


class Hostile:
    """A bare host with its own key, one stream to the victim's actor protocol."""

    def __init__(self, victim_addr: str) -> None:
        self.identity = Identity.generate()
        self.peer_id = self.identity.peer_id
        self._addr = victim_addr
        self._token: trio.lowlevel.TrioToken | None = None
        self._stream: INetStream | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._replies: dict[bytes, Any] = {}  # request nonce -> reply payload
        self._replied = threading.Condition()
        threading.Thread(target=trio.run, args=(self._main,), daemon=True).start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError(f"the hostile host did not connect: {self._error}")

    async def _main(self) -> None:
        key_pair = create_new_key_pair(self.identity.private_bytes())
        noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
        host = new_host(
            key_pair=key_pair,
            sec_opt={NOISE_PROTOCOL_ID: noise},
            muxer_opt=create_yamux_muxer_option(),
        )
        try:
            async with host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
                host.set_stream_handler(ACTOR_PROTOCOL, self._on_stream)
                info = info_from_p2p_addr(Multiaddr(self._addr))
                await host.connect(info)
                self._stream = await host.new_stream(info.peer_id, [ACTOR_PROTOCOL])
                self._token = trio.lowlevel.current_trio_token()
                self._ready.set()
                await trio.to_thread.run_sync(self._stop.wait)
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _on_stream(self, stream: INetStream) -> None:
        """The victim's replies (it opens its own stream to us for them)."""
        reader = FrameReader(stream, 17 * MIB)
        try:
            while True:
                sealed = unseal(await reader.next(), 17 * MIB)
                path = sealed.envelope.behaviour
                if path.startswith(REPLY_PREFIX):
                    with self._replied:
                        self._replies[bytes.fromhex(path[len(REPLY_PREFIX) :])] = (
                            sealed.envelope.payload
                        )
                        self._replied.notify_all()
        except Exception:
            return

    def reply(self, nonce: bytes, timeout: float) -> Any:
        """The victim's reply payload to the request with ``nonce`` (None if none came)."""
        with self._replied:
            self._replied.wait_for(lambda: nonce in self._replies, timeout)
            return self._replies.get(nonce)

    def refusal_codes(self, nonces: list[bytes]) -> dict[str, int]:
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

    def me(self) -> Handle:
        return Handle(
            id=self.identity.public_key, address=Address(host=self.peer_id, inbox=ROOT_INBOX)
        )

    def envelope(
        self, to: Handle, behaviour: str, payload: Any = None, *, reply: bool = False
    ) -> Envelope:
        return make_envelope(
            self.me(),
            self.identity.public_key,
            behaviour,
            payload,
            to=to,
            ttl_s=600,
            expect_reply=reply,
        )

    def finish(self, to: Handle, timeout: float = 600) -> bool:
        """One last invoke on the same stream: its answer (its result, or a refusal such
        as ``rate_limited``) comes once the victim has read every frame sent before it.
        A victim over this peer's budget drops what it cannot answer, so the invoke is
        sent again every few seconds until one is answered."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            env = self.envelope(to, "/public/hello", reply=True)
            self.write([self.seal(env)])
            if self.reply(env.nonce, FINISH_RETRY_S) is not None:
                return True
        return False

    def seal(self, env: Envelope) -> bytes:
        return seal(env, self.identity)

    def with_payload_bytes(self, env: Envelope, payload: bytes, *, signed: bool = True) -> bytes:
        """A frame whose payload is these bytes as given; ``signed=False``: a bad signature."""
        plain = self.seal(env.model_copy(update={"payload": None}))
        (header_len,) = struct.unpack_from(">I", plain, 4)
        body = plain[: PREFIX_BYTES + header_len] + payload
        return body + (self.identity.sign(body) if signed else b"\x00" * 64)

    async def _write(self, frames: list[bytes], pace_s: float) -> None:
        assert self._stream is not None
        batch: list[bytes] = []
        size = 0
        for frame in frames:
            batch.append(struct.pack(">I", len(frame)) + frame)
            size += len(frame) + 4
            if size >= WRITE_BATCH_BYTES or pace_s:
                await self._stream.write(b"".join(batch))
                batch, size = [], 0
                if pace_s:
                    await trio.sleep(pace_s)
        if batch:
            await self._stream.write(b"".join(batch))

    def write(self, frames: list[bytes], pace_s: float = 0.0) -> None:
        """Write every frame on the stream (blocking; paced by ``pace_s`` if given)."""
        trio.from_thread.run(self._write, frames, pace_s, trio_token=self._token)

    def close(self) -> None:
        self._stop.set()


# ---- the honest peer and the measurement -----------------------------------------


class Honest:
    def __init__(self, cluster: LocalCluster, victim: Victim) -> None:
        (self.node,) = [cluster.add("honest", bootstrap=[victim.addr])]
        assert self.node.node is not None
        self.ref = self.node.node
        self.target = root_handle(victim.peer_id)

    def invoke(self) -> float | None:
        """One signed invoke; its round trip in seconds, or None if it failed."""
        start = time.perf_counter()
        try:
            self.ref.ask(self.target, "/public/hello", timeout=10)
        except Exception:
            return None
        return time.perf_counter() - start

    def samples(self, n: int) -> list[float]:
        return [t for t in (self.invoke() for _ in range(n)) if t is not None]


def p50_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 3) if samples else float("nan")


def run_attack(
    name: str,
    victim: Victim,
    honest: Honest,
    attack: Any,
    *,
    baseline_n: int,
    settle_s: float,
) -> dict[str, Any]:
    """Baseline, then the attack in a thread while the honest peer keeps invoking."""
    baseline = honest.samples(baseline_n)
    rss_before = victim.rss_mb()
    peak = [rss_before]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if victim.alive():
                peak[0] = max(peak[0], victim.rss_mb())
            time.sleep(0.05)

    extra: dict[str, Any] = {}

    def attacker() -> None:
        try:
            extra.update(attack() or {})
        finally:
            done.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.perf_counter()
    threading.Thread(target=attacker, daemon=True).start()
    during: list[float | None] = []
    while not done.is_set():
        during.append(honest.invoke())
    attack_s = time.perf_counter() - started
    time.sleep(settle_s)
    watcher.join(1)
    alive = victim.alive() and honest.invoke() is not None
    ok = [t for t in during if t is not None]
    return {
        "attack": name,
        "victim_rss_growth_mb": round(victim.rss_mb() - rss_before, 1) if alive else None,
        "victim_alive": alive,
        "honest_success_rate": round(len(ok) / len(during), 4) if during else None,
        "honest_p50_ms": p50_ms(ok),
        "baseline_p50_ms": p50_ms(baseline),
        "victim_rss_peak_growth_mb": round(peak[0] - rss_before, 1),
        "honest_invokes": len(during),
        "attack_s": round(attack_s, 2),
        **extra,
    }


# ---- the attacks -------------------------------------------------------------------


def bomb_payload(max_bytes: int) -> bytes:
    """Nested empty maps within ``max_bytes``: each byte decodes to ~70 bytes."""
    return msgpack.packb([[{}] * 1000] * (max_bytes // 1003 - 1))


def decode_bomb(hostile: Hostile, victim: Victim, bombs: int, pace_s: float) -> Any:
    to = root_handle(victim.peer_id)
    big = bomb_payload(16 * MIB - 64 * 1024)  # under the 16 MiB frame limit
    control = bomb_payload(MIB - 8 * 1024)  # under the 1 MiB control limit
    frames, nonces = [], []
    for _ in range(bombs):
        for payload, signed in ((big, True), (control, True), (control, False)):
            env = hostile.envelope(to, "/public/hello", reply=True)
            frames.append(hostile.with_payload_bytes(env, payload, signed=signed))
            nonces.append(env.nonce)

    def attack() -> dict[str, Any]:
        hostile.write(frames, pace_s)
        finished = hostile.finish(to)
        return {"victim_caught_up": finished, "refusals": hostile.refusal_codes(nonces)}

    return attack


def replay_cache_fill(hostile: Hostile, victim: Victim, count: int, refill_s: float) -> Any:
    to = root_handle(victim.peer_id)
    replayed = min(1000, count)
    # The first ones ask for replies, so their replays are answered with the refusal.
    envelopes = [
        hostile.envelope(to, "/public/hello", {"n": i}, reply=i < replayed) for i in range(count)
    ]
    frames = [hostile.seal(env) for env in envelopes]

    def attack() -> dict[str, Any]:
        hostile.write(frames)
        finished = hostile.finish(to)
        firsts = hostile.refusal_codes([env.nonce for env in envelopes[:replayed]])
        hostile.forget([env.nonce for env in envelopes[:replayed]])  # for the replays' replies
        time.sleep(refill_s)  # the victim's budget for this peer refills: every replay is read
        hostile.write(frames[:replayed])
        finished = hostile.finish(to) and finished
        return {
            "victim_caught_up": finished,
            "first_sends": firsts,
            "replays": hostile.refusal_codes([env.nonce for env in envelopes[:replayed]]),
        }

    return attack


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bombs", type=int, default=10, help="decode bombs of each kind")
    parser.add_argument("--pace", type=float, default=0.3, help="seconds between bombs")
    parser.add_argument("--fill", type=int, default=100_000, help="unique envelopes")
    parser.add_argument("--baseline", type=int, default=300, help="honest invokes, no attack")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before RSS after")
    parser.add_argument(
        "--frames-per-s", type=float, default=None, help="the victim's max_frames_per_s"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = {}
        fields = Settings.model_fields
        rate = args.frames_per_s or fields["max_frames_per_s"].default
        burst = fields["frame_burst"].default
        if args.frames_per_s is not None:
            burst = max(1, int(min(args.frames_per_s * 2, 10**9)))
            settings["DMS_MAX_FRAMES_PER_S"] = f"{args.frames_per_s:g}"
            settings["DMS_FRAME_BURST"] = str(burst)
        refill_s = min(burst / rate, 10.0)
        victim = Victim(root, settings)
        try:
            with LocalCluster(root / "cluster", shared_loop=False) as cluster:
                honest = Honest(cluster, victim)
                honest.samples(50)  # warm-up: connection, streams, caches
                hostile = Hostile(victim.addr)
                try:
                    plans = [
                        ("decode_bomb", decode_bomb(hostile, victim, args.bombs, args.pace)),
                        (
                            "replay_cache_fill",
                            replay_cache_fill(hostile, victim, args.fill, refill_s),
                        ),
                    ]
                    for name, attack in plans:
                        result = run_attack(
                            name,
                            victim,
                            honest,
                            attack,
                            baseline_n=args.baseline,
                            settle_s=args.settle,
                        )
                        result["victim_max_frames_per_s"] = rate
                        results.append(result)
                        if args.json:
                            print(json.dumps(result), flush=True)
                        else:
                            for key, value in result.items():
                                print(f"{key:>26}: {value}")
                            print()
                finally:
                    hostile.close()
        finally:
            victim.stop()
    targets_met = all(
        r["victim_alive"]
        and (r["victim_rss_growth_mb"] or 0) <= 50
        and (r["honest_success_rate"] or 0) >= 0.95
        and r["honest_p50_ms"] <= 2 * r["baseline_p50_ms"]
        for r in results
    )
    return 0 if targets_met else 1


if __name__ == "__main__":
    sys.exit(main())
