"""The receive pipeline, end to end between real actor systems on the in-memory transport."""

from __future__ import annotations

import threading

import pytest
from pydantic import BaseModel

from dms.actor import (
    ROOT_INBOX,
    Actor,
    ErrorCode,
    InvokeTimeout,
    Limits,
    Outcome,
    Refusal,
    RemoteError,
    Request,
    behaviour,
    make_envelope,
    seal,
)
from dms.actor.envelope import PREFIX_BYTES, Sealed
from dms.actor.policy import Role
from dms.security import Identity
from tests.conftest import raised_by, wait_for


class Greeting(BaseModel):
    name: str


class Service(Actor):
    def __init__(self, context, peer=None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(context)
        self.peer = peer
        self.calls = 0

    @behaviour("/test/echo", public=True)
    def echo(self, request: Request) -> object:
        self.calls += 1
        return request.payload

    @behaviour("/test/greet", public=True, payload=Greeting)
    def greet(self, request: Request) -> str:
        return f"hello {request.payload.name}"

    @behaviour("/test/boom", public=True)
    def boom(self, request: Request) -> None:
        raise RuntimeError("handler exploded")

    @behaviour("/test/refuse", public=True)
    def refuse(self, request: Request) -> None:
        raise Refusal(ErrorCode.BAD_PAYLOAD, "no thanks")

    @behaviour("/test/private")
    def private(self, request: Request) -> str:
        return "secret"

    @behaviour("/test/silent", public=True)
    def silent(self, request: Request) -> None:
        request.defer()  # never answers

    @behaviour("/test/blob", public=True, data=True)
    def blob(self, request: Request) -> int:
        return len(request.payload)

    @behaviour("/test/relay", public=True)
    def relay(self, request: Request) -> None:
        """Ask the peer, which asks us back; answer when its answer arrives."""
        responder = request.defer()

        def done(outcome: Outcome) -> None:
            if outcome.ok:
                responder.ok({"peer_said": outcome.result})
            else:
                assert outcome.error is not None
                responder.fail(outcome.error.code, outcome.error.reason)

        self.invoke(self.peer, "/test/callback", request.payload, timeout=30, on_reply=done)

    @behaviour("/test/callback", public=True)
    def callback(self, request: Request) -> None:
        responder = request.defer()
        self.invoke(
            request.sender,
            "/test/echo",
            {"back": request.payload},
            timeout=30,
            on_reply=lambda outcome: responder.ok(outcome.value()),
        )


@pytest.fixture
def pair(make_node):  # type: ignore[no-untyped-def]
    a, b = make_node(), make_node()
    ra = a.spawn(Service, inbox=ROOT_INBOX, identity=a.identity)
    rb = b.spawn(Service, inbox=ROOT_INBOX, identity=b.identity)
    return ra, rb


def code_of(future, timeout: float = 30.0) -> str:  # type: ignore[no-untyped-def]
    """The error code ``future`` fails with; ``timeout``, how long to wait for it (a
    wait, not a measure: a loaded machine pauses a process for seconds)."""
    with pytest.raises(RemoteError) as info:
        future.result(timeout)
    return info.value.code


def test_invoke_round_trip_carries_bytes(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    payload = {"blob": bytes(range(256)), "n": [1, 2.5, None, True], "s": "é"}
    assert a.ask(b.handle, "/test/echo", payload) == payload


def test_payload_model_is_validated(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    assert a.ask(b.handle, "/test/greet", {"name": "ada"}) == "hello ada"
    assert code_of(a.invoke(b.handle, "/test/greet", {"nom": "ada"})) == ErrorCode.BAD_PAYLOAD


def test_tampered_payload_is_refused(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    env = a.envelope("/test/echo", {"amount": 10}, to=b.handle, expect_reply=True)
    frame = bytearray(a.seal(env))
    frame[-64 - 2] ^= 0x01  # inside the payload, just before the signature
    future = a.system.invoke_frame(bytes(frame), env, 30)
    assert code_of(future) == ErrorCode.BAD_SIGNATURE


def test_wrong_signer_is_refused(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    mallory = Identity.generate()
    forged = make_envelope(
        a.handle,
        mallory.public_key,
        "/test/echo",
        {"x": 1},
        to=b.handle,
        ttl_s=30,
        expect_reply=True,
    )
    future = a.system.invoke_frame(seal(forged, mallory), forged, 30)
    assert code_of(future) == ErrorCode.WRONG_SIGNER


def test_expired_envelope_is_refused(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    env = a.envelope("/test/echo", 1, to=b.handle, expect_reply=True, ttl_s=5)
    past = env.model_copy(update={"issued_at": env.issued_at - 10**10, "expiry": env.issued_at - 1})
    future = a.system.invoke_frame(a.seal(past), past, 30)
    assert code_of(future) == ErrorCode.EXPIRED


def test_replayed_nonce_is_refused(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    env = a.envelope("/test/echo", "once", to=b.handle, expect_reply=True)
    frame = a.seal(env)
    assert a.system.invoke_frame(frame, env, 30).result(30) == "once"
    assert code_of(a.system.invoke_frame(frame, env, 30)) == ErrorCode.REPLAYED
    assert b.pykka_ref.proxy().calls.get() == 1  # the handler ran once


def test_unknown_behaviour_gets_error_reply(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    assert code_of(a.invoke(b.handle, "/test/nothing-here")) == ErrorCode.UNKNOWN_BEHAVIOUR


def test_unknown_actor_gets_error_reply(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    ghost = b.handle.model_copy(
        update={"address": b.handle.address.model_copy(update={"inbox": "x"})}
    )
    assert code_of(a.invoke(ghost, "/test/echo")) == ErrorCode.UNKNOWN_ACTOR


def test_handler_error_is_replied_and_actor_survives(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    future = a.invoke(b.handle, "/test/boom")
    with pytest.raises(RemoteError) as info:
        future.result(30)
    assert info.value.code == ErrorCode.HANDLER_ERROR
    assert "handler exploded" in info.value.reason
    assert a.ask(b.handle, "/test/echo", "still here") == "still here"


def test_handler_refusal_keeps_its_code(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    future = a.invoke(b.handle, "/test/refuse")
    with pytest.raises(RemoteError) as info:
        future.result(30)
    assert (info.value.code, info.value.reason) == (ErrorCode.BAD_PAYLOAD, "no thanks")


def test_private_behaviour_needs_local_or_root_sender(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    assert code_of(a.invoke(b.handle, "/test/private")) == ErrorCode.FORBIDDEN
    b.system.trust.anchor_root(a.did)
    assert a.ask(b.handle, "/test/private") == "secret"


def test_child_actor_holds_only_its_role(make_node) -> None:  # type: ignore[no-untyped-def]
    node = make_node()
    root = node.spawn(Service, inbox=ROOT_INBOX, identity=node.identity)
    child = node.spawn(Service, role=Role(caps=("/test/private",)))
    assert child.ask(root.handle, "/test/private") == "secret"
    assert child.handle.id != root.handle.id
    bare = node.spawn(Service)  # least privilege: a child with no role holds nothing
    with pytest.raises(RemoteError) as info:
        bare.ask(root.handle, "/test/private")
    assert (info.value.code, info.value.rule) == (ErrorCode.FORBIDDEN, "beyond_role")
    assert "/test/private" in info.value.reason
    assert bare.ask(root.handle, "/test/echo", 1) == 1  # public stays open


def test_invoke_to_silent_actor_times_out_clearly(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    future = a.invoke(b.handle, "/test/silent", timeout=0.3)
    with pytest.raises(InvokeTimeout) as info:
        future.result(60)  # ends by itself: its own deadline, which the error names
    assert info.value.code == ErrorCode.TIMEOUT
    assert "/test/silent" in str(info.value) and "within 0.3 s" in str(info.value)


def test_actors_invoking_each_other_from_handlers_do_not_deadlock(make_node) -> None:  # type: ignore[no-untyped-def]
    a_sys, b_sys = make_node(), make_node()
    b = b_sys.spawn(Service, inbox=ROOT_INBOX, identity=b_sys.identity)
    a = a_sys.spawn(Service, b.handle, inbox=ROOT_INBOX, identity=a_sys.identity)
    # a.relay -> b.callback -> a.echo -> (b answers) -> (a answers)
    results = [a.invoke(a.handle, "/test/relay", i, timeout=30) for i in range(20)]
    assert [r.result(60) for r in results] == [{"peer_said": {"back": i}} for i in range(20)]


def test_oversized_envelope_is_refused_before_decoding(make_node, memnet) -> None:  # type: ignore[no-untyped-def]
    small = Limits(max_data_bytes=64 * 1024, max_control_bytes=8 * 1024)
    a_sys, b_sys = make_node(), make_node(limits=small)
    a = a_sys.spawn(Service, inbox=ROOT_INBOX, identity=a_sys.identity)
    b = b_sys.spawn(Service, inbox=ROOT_INBOX, identity=b_sys.identity)
    env = a.envelope("/test/blob", b"\x00" * 100_000, to=b.handle, expect_reply=True)
    frame = a.seal(env)  # the sender's own limit is the default 16 MiB
    # Garble the payload: if the receiver decoded it, it would fail as malformed.
    garbled = frame[: len(frame) - 64 - 50_000] + b"\xc1" * 50_000 + frame[-64:]
    future = a_sys.invoke_frame(garbled, env, 30)
    assert code_of(future) == ErrorCode.TOO_LARGE


def test_sender_refuses_its_own_oversized_envelope_at_once(make_node) -> None:  # type: ignore[no-untyped-def]
    a_sys = make_node(limits=Limits(max_data_bytes=4096))
    a = a_sys.spawn(Service, inbox=ROOT_INBOX, identity=a_sys.identity)
    with pytest.raises(RemoteError) as info:
        a.invoke(a.handle, "/test/blob", b"x" * 10_000)
    assert info.value.code == ErrorCode.TOO_LARGE


def test_control_behaviour_has_a_lower_limit(make_node) -> None:  # type: ignore[no-untyped-def]
    limits = Limits(max_data_bytes=1024 * 1024, max_control_bytes=4096)
    a_sys, b_sys = make_node(limits=limits), make_node(limits=limits)
    a = a_sys.spawn(Service, inbox=ROOT_INBOX, identity=a_sys.identity)
    b = b_sys.spawn(Service, inbox=ROOT_INBOX, identity=b_sys.identity)
    big = b"y" * 10_000
    assert a.ask(b.handle, "/test/blob", big) == len(big)  # data behaviour
    assert code_of(a.invoke(b.handle, "/test/echo", big)) == ErrorCode.TOO_LARGE


def test_unreachable_host_fails_at_once(pair, memnet) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    b.system.transport.stop()
    assert code_of(a.invoke(b.handle, "/test/echo", timeout=5), timeout=1) == ErrorCode.UNREACHABLE


def test_envelope_from_wrong_peer_is_refused(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    env = a.envelope("/test/echo", 1, to=b.handle, expect_reply=True)
    frame = a.seal(env)
    # Delivered as if a third host had sent it: the root actor's key is not that peer's.
    b.system.receive(frame, Identity.generate().peer_id)
    # No reply can be awaited for a spoofed path, but the handler must not have run.
    assert b.pykka_ref.proxy().calls.get() == 0


def test_broadcast_reaches_every_subscriber(make_node) -> None:  # type: ignore[no-untyped-def]
    seen: list[tuple[str, object]] = []
    lock = threading.Lock()
    done = threading.Event()

    class Listener(Actor):
        def on_start(self) -> None:
            self.subscribe("news")
            self.register("/broadcast/hello", self.hello, public=True, topic="news")

        def hello(self, request: Request) -> None:
            with lock:
                seen.append((self.handle.address.host, request.payload))
                if len(seen) == 4:
                    done.set()

    systems = [make_node() for _ in range(4)]
    refs = [s.spawn(Listener, inbox=ROOT_INBOX, identity=s.identity) for s in systems]
    for ref in refs:  # on_start has run once the actor answers
        ref.pykka_ref.proxy().handle.get()
    refs[0].publish("news", "/broadcast/hello", {"v": 1})
    assert done.wait(30)
    assert sorted(h for h, _ in seen) == sorted(s.peer_id for s in systems)
    assert all(p == {"v": 1} for _, p in seen)


def test_lossy_network_is_reproducible() -> None:
    """The same seed loses the same frames. Sent from one thread on a network without
    latency, each frame is handed over or lost before its send returns, so which ones
    arrive does not depend on the machine's speed (asks with a 0.2 s deadline did: on
    a loaded machine a reply came late in one run and in time in the other)."""
    from dms.actor import MemoryNetwork

    def run(seed: int) -> list[int]:
        net = MemoryNetwork(loss=0.3, seed=seed)
        sender, receiver = net.transport("a"), net.transport("b")
        arrived: list[int] = []
        receiver.start(lambda frame, src, **_: arrived.append(int(frame)))
        for i in range(40):
            sender.send("b", b"%d" % i)
        net.close()
        return arrived

    first, second = run(7), run(7)
    assert first == second
    assert 0 < len(first) < 40
    assert run(8) != first  # the seed decides


def test_latency_is_injected(make_node) -> None:  # type: ignore[no-untyped-def]
    """A network with latency holds each frame and hands it over later on its own timer
    thread, never on the sender's thread during the send; without latency it is handed
    over on the sender's thread before the send returns. An ask crosses it there and
    back. (Which thread delivers is decided by the code, not by how the test thread is
    scheduled: a pause between the send and the check cannot change it.)"""
    from dms.actor import MemoryNetwork

    for latency_s, thread_name in ((0.0, threading.current_thread().name), (0.5, "dms-memnet")):
        net = MemoryNetwork(latency_s=latency_s)
        sender, receiver = net.transport("a"), net.transport("b")
        arrived: list[tuple[bytes, str | None, str]] = []
        receiver.start(
            lambda frame, src, into=arrived, **_: into.append(
                (frame, src, threading.current_thread().name)
            )
        )
        sender.send("b", b"frame")
        if not latency_s:
            assert arrived == [(b"frame", "a", thread_name)]  # before the send returned
        wait_for(lambda into=arrived: into, 30, "the held frame")
        assert arrived == [(b"frame", "a", thread_name)]
        net.close()
    net = MemoryNetwork(latency_s=0.5)
    a_sys, b_sys = make_node(network=net), make_node(network=net)
    a = a_sys.spawn(Service, inbox=ROOT_INBOX, identity=a_sys.identity)
    b = b_sys.spawn(Service, inbox=ROOT_INBOX, identity=b_sys.identity)
    assert a.ask(b.handle, "/test/echo", "slow", timeout=30) == "slow"
    net.close()


def test_an_invoke_its_transport_failed_to_send_leaves_nothing_behind(pair) -> None:  # type: ignore[no-untyped-def]
    """A transport that fails with anything unforeseen fails the invoke at once, and
    the invoke is not left pending until its deadline."""
    a, b = pair
    transport = a.system.transport
    send = transport.send

    def broken(peer_id: str, frame: bytes) -> None:
        raise OSError("connection reset under us")

    transport.send = broken  # type: ignore[method-assign]
    with pytest.raises(OSError):
        a.invoke(b.handle, "/test/echo", 1, timeout=30)
    assert not a.system._pending
    transport.send = send  # type: ignore[method-assign]
    assert a.ask(b.handle, "/test/echo", 2) == 2
    assert not a.system._pending


def test_a_blocking_ask_ends_with_its_invoke(pair) -> None:  # type: ignore[no-untyped-def]
    """ask waits on a lock that completing the invoke releases: a reply, a timeout and
    a stopped system each end it at once, with the invoke's own error."""
    a, b = pair
    assert a.ask(b.handle, "/test/echo", {"n": 1}) == {"n": 1}
    with pytest.raises(RemoteError) as refused:
        a.ask(b.handle, "/test/refuse")
    assert refused.value.code == ErrorCode.BAD_PAYLOAD
    with pytest.raises(InvokeTimeout):
        a.ask(b.handle, "/test/silent", timeout=0.3)
    a.system.stop()
    # With its lock never released, this ask would wait out its 120 s; the stop ends it.
    ended = raised_by(
        lambda: a.ask(b.handle, "/test/echo", timeout=120), 60, "the ask on a stopped system"
    )
    assert isinstance(ended, RemoteError)
    assert ended.code == ErrorCode.STOPPED


def test_stopped_system_fails_pending_invokes(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    future = a.invoke(b.handle, "/test/silent", timeout=30)
    a.system.stop()
    assert code_of(future, timeout=2) == ErrorCode.STOPPED


class SlowToStop(Actor):
    """An actor whose stop waits for ``release``: its system's stop is held there."""

    def __init__(self, context, release: threading.Event) -> None:  # type: ignore[no-untyped-def]
        super().__init__(context)
        self.release = release

    def stopping(self) -> None:
        self.release.wait(30)


def test_a_stopping_system_answers_stopped_for_the_actors_it_stopped(pair) -> None:  # type: ignore[no-untyped-def]
    """A request to an actor its stopping node has stopped already is answered
    'stopped', not 'unknown_actor: no actor root with that key here': a requester's
    bid round that asked a provider in its stop took that refusal for the provider's
    answer to the slot, and the job that timed out said so, not what it had declined
    (tests/test_orchestrator.py, under load)."""
    a, b = pair
    release = threading.Event()
    b.system.spawn(SlowToStop, release, inbox="slow")  # started after b: stops after it
    stopper = threading.Thread(target=b.system.stop, kwargs={"timeout": 30})
    stopper.start()
    try:
        wait_for(lambda: b.system.actor(ROOT_INBOX) is None, 30, "b's root stopped")
        future = a.invoke(b.handle, "/test/echo", "anyone?")
        with pytest.raises(RemoteError) as info:
            future.result(30)
        assert info.value.code == ErrorCode.STOPPED, info.value
        assert "stopping" in info.value.reason
    finally:
        release.set()
        stopper.join(30)


def test_prefix_size_is_stable() -> None:
    # The wire format is an interface: magic + u32 header length.
    assert PREFIX_BYTES == 8
    # What a handler is given as the signed bytes cannot be changed under it.
    sealed = Sealed(envelope=None, signed=b"body", signature=b"sig", size=7)  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        sealed.signed = b"other"  # type: ignore[misc]
    assert sealed.frame == b"bodysig"


class Counter:
    """A role an actor is composed of: its behaviours run on it, through the actor."""

    def __init__(self) -> None:
        self.count = 0

    @behaviour("/test/count", public=True, payload=Greeting)
    def count_up(self, request: Request) -> dict[str, object]:
        self.count += 1
        return {"name": request.payload.name, "count": self.count}


class Composed(Actor):
    def __init__(self, context, *roles: object) -> None:  # type: ignore[no-untyped-def]
        super().__init__(context)
        for role in roles:
            self.route(role)


def test_an_actor_routes_the_behaviours_its_services_declare(make_node) -> None:  # type: ignore[no-untyped-def]
    """The node is composed of role services (DESIGN decision 14): a service's
    behaviours answer through the actor as its own would, payload checked; two
    services answering one path is refused when the actor is built."""
    node, other = make_node(), make_node()
    counter = Counter()
    composed = node.spawn(Composed, counter, inbox=ROOT_INBOX, identity=node.identity)
    asker = other.spawn(Service, inbox=ROOT_INBOX, identity=other.identity)
    assert asker.ask(composed.handle, "/test/count", {"name": "ada"}) == {"name": "ada", "count": 1}
    assert code_of(asker.invoke(composed.handle, "/test/count", {"nom": 1})) == "bad_payload"
    assert counter.count == 1
    with pytest.raises(ValueError, match="/test/count is routed twice"):
        node.spawn(Composed, Counter(), Counter())


def test_an_actor_whose_start_fails_answers_what_waited_and_leaves_its_system(
    make_node,  # type: ignore[no-untyped-def]
) -> None:
    """pykka stops an actor whose ``on_start`` raises without running its ``on_stop``:
    the requests already in its mailbox (a spawn returns before ``on_start`` runs) were
    dropped unanswered, each sender waiting out its deadline and each remote one keeping
    its place in the admission budgets, and the actor stayed listed in its system, its
    inbox taken for good. They are answered ``stopped`` now, and it leaves its system."""
    started, fail = threading.Event(), threading.Event()

    class Broken(Actor):
        def on_start(self) -> None:
            started.set()
            fail.wait(30)
            raise RuntimeError("a bug at start")

        @behaviour("/test/echo", public=True)
        def echo(self, request: Request) -> object:
            return request.payload

    system, caller = make_node(), make_node()
    asker = caller.spawn(Actor)
    ref = system.spawn(Broken, inbox="broken")
    assert started.wait(30)
    waiting = asker.invoke(ref.handle, "/test/echo", 1, timeout=20)
    wait_for(lambda: used(system, "inflight") == 1, 30, "the request in its mailbox")
    fail.set()
    with pytest.raises(RemoteError) as answer:
        waiting.result(30)
    assert answer.value.code == ErrorCode.STOPPED, answer.value
    assert used(system, "inflight") == 0
    assert system.actor("broken") is None
    system.spawn(Actor, inbox="broken")  # its inbox is free again


def test_an_actor_whose_start_fails_before_its_spawn_returns_leaves_its_system(
    make_node,  # type: ignore[no-untyped-def]
) -> None:
    """An actor whose ``on_start`` raises asks its system to drop it, but a spawn lists
    the actor only once its thread has been handed the loop: an ``on_start`` that failed
    first (its thread ran at once, the spawning one lost the GIL) found nothing to
    drop, and the spawn then listed the stopped actor for good, its inbox taken and its
    key counted as local. Here the spawn waits for the failure before it returns."""
    failed = threading.Event()

    class FailsAtOnce(Actor):
        @classmethod
        def start(cls, *args, **kwargs):  # type: ignore[no-untyped-def]
            ref = super().start(*args, **kwargs)
            assert failed.wait(30), "on_start never failed"  # the spawner is the slower
            return ref

        def on_start(self) -> None:
            raise RuntimeError("a bug at start")

        def _handle_failure(self, *exc_info) -> None:  # type: ignore[no-untyped-def]
            super()._handle_failure(*exc_info)
            failed.set()

    system = make_node()
    ref = system.spawn(FailsAtOnce, inbox="fails")
    assert system.actor("fails") is None
    assert not system.is_local(ref.handle.id)
    system.spawn(Actor, inbox="fails")  # its inbox is free again


def used(system, budget: str) -> float:  # type: ignore[no-untyped-def]
    return next(u.used for u in system.admission.usage() if u.name == budget)


def _count_verifications(monkeypatch) -> list[bytes]:  # type: ignore[no-untyped-def]
    """The signers of every envelope signature checked from now on (any thread)."""
    import dms.actor.envelope as envelope_module

    checked: list[bytes] = []
    real = envelope_module.verify_signature

    def counting(public_key: bytes, signature: bytes, data: object) -> bool:
        checked.append(public_key)
        return real(public_key, signature, data)  # type: ignore[arg-type]

    monkeypatch.setattr(envelope_module, "verify_signature", counting)
    return checked


def test_a_reply_from_the_invoked_host_is_taken_on_its_session_alone(  # type: ignore[no-untyped-def]
    pair, monkeypatch
) -> None:
    """An invoke costs one verification, the request's: its reply came from the host
    the transport authenticated as the invoked actor's, which holds that actor's key
    (specs/security.md, "Signatures and sessions")."""
    a, b = pair
    checked = _count_verifications(monkeypatch)
    held_a, held_b = len(a.system.replay), len(b.system.replay)
    for i in range(3):
        assert a.ask(b.handle, "/test/echo", {"i": i}) == {"i": i}
    assert checked == [a.handle.id] * 3  # b checked each request; a no reply
    # Nor does a reply take a place in the replay cache: it resolved its invoke, once.
    assert (len(a.system.replay), len(b.system.replay)) == (held_a, held_b + 3)


def test_a_reply_from_another_peer_is_checked_and_refused(  # type: ignore[no-untyped-def]
    pair, monkeypatch
) -> None:
    """A third peer cannot answer someone else's invoke: its reply is not vouched for
    by the invoked host's session, so it is checked (and refused), and the invoke
    stays pending for the real answer."""
    a, b = pair
    future = a.invoke(b.handle, "/test/silent", None, timeout=30)
    (nonce,) = [n for n, p in a.system._pending.items() if p.future is future]
    checked = _count_verifications(monkeypatch)
    mallory = Identity.generate()
    refused_before = dict(a.system.refusals)

    def reply_from(sender, key: Identity, peer: str) -> None:  # type: ignore[no-untyped-def]
        env = make_envelope(
            sender,
            key.public_key,
            f"/dms/actor/replyto/{nonce.hex()}",
            {"ok": True, "result": "forged"},
            to=a.handle,
            ttl_s=30,
        )
        a.system.receive(seal(env, key), peer)

    # As b's root, delivered by mallory: peer binding refuses it before any signature.
    reply_from(b.handle, mallory, mallory.peer_id)
    # As mallory's own root, from mallory, signed with a bad key: checked, refused.
    other = Identity.generate()
    mallory_root = type(b.handle)(
        id=mallory.public_key,
        address=b.handle.address.model_copy(update={"host": mallory.peer_id}),
    )
    reply_from(mallory_root, other, mallory.peer_id)
    assert not future.done()
    refused = {k: a.system.refusals[k] - refused_before.get(k, 0) for k in a.system.refusals}
    assert refused.get(ErrorCode.WRONG_SIGNER) == 2  # mallory's own root, another key too
    assert checked == []  # both refused on the header, before a signature
    # Signed properly as mallory's root: checked, and still not an answer to b's invoke.
    reply_from(mallory_root, mallory, mallory.peer_id)
    assert checked == [mallory.public_key]
    assert not future.done()
    # As an actor of mallory's host that claims b's root key, its signature forged: the
    # host delivering it is not the invoked one, so it is checked, and refused.
    posing = type(b.handle)(
        id=b.handle.id,
        address=b.handle.address.model_copy(update={"host": mallory.peer_id, "inbox": "x"}),
    )
    env = make_envelope(
        posing,
        b.handle.id,
        f"/dms/actor/replyto/{nonce.hex()}",
        {"ok": True, "result": "forged"},
        to=a.handle,
        ttl_s=30,
    )
    frame = bytearray(seal(env, mallory))  # signed with mallory's key: not b's signature
    before_bad = a.system.refusals[ErrorCode.BAD_SIGNATURE]
    a.system.receive(bytes(frame), mallory.peer_id)
    assert a.system.refusals[ErrorCode.BAD_SIGNATURE] == before_bad + 1
    assert not future.done()


def test_a_vouched_reply_resolves_once_and_a_copy_is_checked(  # type: ignore[no-untyped-def]
    pair, monkeypatch
) -> None:
    """The rule's edges: a reply from the invoked host is taken on its session (its
    decoded envelope marked unverified), once; a copy of it finds no invoke pending and
    is checked as any frame, so a bad signature is refused then."""
    import dms.actor.system as system_module

    a, b = pair
    decoded: list[bool] = []  # Sealed.verified of each reply decoded
    real_decode = system_module.decode_payload

    def recording(opened, *, verified: bool, max_items: int):  # type: ignore[no-untyped-def]
        sealed = real_decode(opened, verified=verified, max_items=max_items)
        if sealed.envelope.behaviour.startswith("/dms/actor/replyto/"):
            decoded.append(sealed.verified)
        return sealed

    monkeypatch.setattr(system_module, "decode_payload", recording)
    future = a.invoke(b.handle, "/test/silent", None, timeout=30)
    (nonce,) = [n for n, p in a.system._pending.items() if p.future is future]
    env = make_envelope(
        b.handle,
        b.handle.id,
        f"/dms/actor/replyto/{nonce.hex()}",
        {"ok": True, "result": "answer"},
        to=a.handle,
        ttl_s=30,
    )
    frame = bytearray(seal(env, b.identity))
    frame[-1] ^= 0x01  # a bad signature: the session, not the signature, vouches for it
    a.system.receive(bytes(frame), b.system.peer_id)
    assert future.result(5) == "answer"
    assert decoded == [False]
    before_bad = a.system.refusals[ErrorCode.BAD_SIGNATURE]
    a.system.receive(bytes(frame), b.system.peer_id)  # the same bytes again
    assert a.system.refusals[ErrorCode.BAD_SIGNATURE] == before_bad + 1
