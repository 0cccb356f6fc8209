"""One actor system per node: the receive pipeline, routing and pending replies.

Inbound frames from any transport enter :meth:`ActorSystem.receive`:

    size -> header -> expiry -> peer binding -> broadcast rules -> size class
         -> signature -> replay -> payload (bounded)
         -> (reply? resolve the pending invoke) -> route to inbox or topic

Everything before the payload reads the header alone: a frame is verified before
a byte of its payload is decoded (see ``dms.actor.envelope``).

and the target actor's thread finishes the pipeline (behaviour lookup ->
capability -> payload validation -> handler; see ``dms.actor.actor``). A
refusal anywhere produces a signed error reply when the sender asked for one,
and a log line always.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import pykka
from pydantic import BaseModel, Field

from dms.actor.admission import (
    LATE_ANSWER_S,
    Admission,
    BehaviourLimits,
    HoldingLimits,
    LateAnswers,
    LateBatch,
    Ticket,
    Verdict,
)
from dms.actor.behaviour import Behaviour
from dms.actor.codes import ErrorCode, InvokeTimeout, Refusal, RemoteError, Unreachable
from dms.actor.envelope import (
    MAX_PAYLOAD_ITEMS,
    REPLY_PREFIX,
    Envelope,
    Opened,
    Sealed,
    check_signature,
    check_signer,
    check_time,
    decode_payload,
    make_envelope,
    now_ns,
    open_frame,
    peek,
    seal,
)
from dms.actor.handle import ROOT_INBOX, Address, Handle
from dms.actor.policy import CapabilityPolicy, DeploymentPolicy, Role
from dms.actor.replay import DEFAULT_CAPACITY, ReplayCache
from dms.actor.timers import TimerHandle, Timers
from dms.actor.transport import Transport
from dms.actor.wakes import flush_deferred_wakes
from dms.actor.wallet import Wallet
from dms.security.identity import Identity, IdentityError, public_key_from_peer_id
from dms.security.trust import TrustStore

log = logging.getLogger("dms.actor")

MIB = 1024 * 1024
REFUSAL_TTL_S = 5.0
# The most requests one refusal may answer besides its own (``also``).
MAX_ALSO = 4096
# Counted in ``refusals``: a refusal past the late answers' bounds, not answered.
UNANSWERED = "unanswered"


class Limits(BaseModel):
    """The pipeline's bounds; ``dms.config.Settings`` holds the user's values."""

    max_data_bytes: int = Field(default=16 * MIB, ge=1024)
    max_control_bytes: int = Field(default=1 * MIB, ge=1024)
    max_ttl_s: float = Field(default=3600.0, gt=0)
    clock_skew_s: float = Field(default=60.0, ge=0)
    invoke_timeout_s: float = Field(default=10.0, gt=0)
    # Containers plus their items in one decoded payload (bounds its decoded size).
    max_payload_items: int = Field(default=MAX_PAYLOAD_ITEMS, ge=1024)
    # Envelopes remembered against replay; when full, older ones are refused.
    replay_cache_size: int = Field(default=DEFAULT_CAPACITY, ge=1)
    # How long ActorSystem.stop waits for its actors, and then for its transport.
    stop_timeout_s: float = Field(default=10.0, gt=0)
    # Requests of remote peers admitted and not yet handled by their actor, in all and
    # per peer, and their bytes (still to be validated); see dms.actor.admission.
    max_inflight: int = Field(default=512, ge=1)
    max_inflight_per_peer: int = Field(default=64, ge=1)
    max_pending_decode_bytes: int = Field(default=4 * MIB, ge=1024)
    max_pending_decode_bytes_per_peer: int = Field(default=1 * MIB, ge=1024)
    # Of each global budget, what peers this node has no stake in may use together,
    # and what those at one IP address may use of that.
    unknown_share: float = Field(default=0.5, gt=0, le=1)
    ip_share: float = Field(default=0.25, gt=0, le=1)

    def holdings(self) -> HoldingLimits:
        return HoldingLimits(
            max_inflight=self.max_inflight,
            max_inflight_per_peer=self.max_inflight_per_peer,
            max_pending_decode_bytes=self.max_pending_decode_bytes,
            max_pending_decode_bytes_per_peer=self.max_pending_decode_bytes_per_peer,
            unknown_share=self.unknown_share,
            ip_share=self.ip_share,
        )


class Outcome(NamedTuple):
    """What an invoke came to: a result or an error, handed to callbacks."""

    result: Any = None
    error: RemoteError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def value(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


class Inbound(NamedTuple):
    """A verified envelope on its way to an actor's mailbox; ``ticket``: its place in
    the admission budgets, given back once the actor has handled it."""

    sealed: Sealed
    ticket: Ticket | None = None


@dataclass(frozen=True)
class Call:
    """Run ``fn(*args)`` in the receiving actor's thread."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()


@dataclass
class _Pending:
    target: Handle
    behaviour: str
    future: Future[Any]
    timer: TimerHandle | None = None
    callback: Callable[[Outcome], None] | None = None
    callback_actor: pykka.ActorRef[Any] | None = None
    # Released once the future is completed: the lock a blocking ask waits on.
    wake: threading.Lock | None = None


@dataclass(frozen=True)
class _StandIn:
    ref: ActorRef
    holds: Callable[[str, bytes], bool]
    gone: str


@dataclass(frozen=True)
class ActorContext:
    """What a new actor is given: its system, key and handle.

    ``behaviours`` is the actor's table of behaviours, which the system reads too:
    a broadcast is delivered only to the behaviour declared for its topic.
    """

    system: ActorSystem
    identity: Identity
    handle: Handle
    behaviours: dict[str, Behaviour] = field(default_factory=dict)


def reply_payload(result: Any = None, error: Refusal | None = None) -> dict[str, Any]:
    if error is None:
        return {"ok": True, "result": result}
    if error.rule is not None:  # a capability denial names the rule that failed
        return {"ok": False, "code": error.code, "reason": error.reason, "rule": error.rule}
    return {"ok": False, "code": error.code, "reason": error.reason}


class ActorRef:
    """A thread-safe handle on a local actor: send, invoke and publish as it.

    The same object serves code outside the actor (tests, the CLI relay,
    benchmarks) and the actor itself (``Actor.ref``).
    """

    def __init__(
        self,
        system: ActorSystem,
        identity: Identity,
        handle: Handle,
        pykka_ref: pykka.ActorRef[Any],
    ) -> None:
        self.system = system
        self.identity = identity
        self.handle = handle
        self.pykka_ref = pykka_ref

    @property
    def did(self) -> str:
        return self.handle.did

    def envelope(
        self,
        behaviour: str,
        payload: Any = None,
        *,
        to: Handle | None = None,
        ttl_s: float | None = None,
        expect_reply: bool = False,
        topic: str | None = None,
    ) -> Envelope:
        """A new envelope from this actor, carrying the tokens it needs (``dms.actor.wallet``)."""
        caps = self.system.wallet.tokens_for(
            self.identity.public_key, to.address.host if to else None, behaviour, topic
        )
        return make_envelope(
            self.handle,
            self.identity.public_key,
            behaviour,
            payload,
            to=to,
            ttl_s=ttl_s or self.system.limits.invoke_timeout_s,
            expect_reply=expect_reply,
            topic=topic,
            caps=caps,
        )

    def seal(self, envelope: Envelope) -> bytes:
        return self.system.seal(envelope, self.identity)

    def send(
        self, to: Handle, behaviour: str, payload: Any = None, *, ttl_s: float | None = None
    ) -> None:
        """Fire and forget. A destination that turns out unreachable is logged by the
        transport; ``Unreachable`` is raised only when the network is stopped."""
        self.system.route(self.seal(self.envelope(behaviour, payload, to=to, ttl_s=ttl_s)), to)

    def invoke(
        self,
        to: Handle,
        behaviour: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        on_reply: Callable[[Outcome], None] | None = None,
    ) -> Future[Any]:
        """Request/reply. The future fails with ``RemoteError`` or ``InvokeTimeout``.

        With ``on_reply``, the outcome is also handed to that callback in this
        actor's own thread, which is how handlers wait without blocking.
        """
        timeout = timeout or self.system.limits.invoke_timeout_s
        env = self.envelope(behaviour, payload, to=to, ttl_s=timeout, expect_reply=True)
        return self.system.invoke_frame(
            self.seal(env),
            env,
            timeout,
            callback=on_reply,
            callback_actor=self.pykka_ref if on_reply else None,
        )

    def ask(
        self, to: Handle, behaviour: str, payload: Any = None, *, timeout: float | None = None
    ) -> Any:
        """Blocking invoke, for code outside actors. Never call it inside a handler.

        It waits on a plain lock that completing the invoke releases, not in
        ``Future.result`` (a condition): the request has woken the receiving actor
        by then, and every step this thread takes before it blocks delays that actor.
        """
        timeout = timeout or self.system.limits.invoke_timeout_s
        env = self.envelope(behaviour, payload, to=to, ttl_s=timeout, expect_reply=True)
        wake = threading.Lock()
        wake.acquire()
        future = self.system.invoke_frame(self.seal(env), env, timeout, wake=wake)
        flush_deferred_wakes()  # on a loop's thread: the target's wake, before we block
        wake.acquire(True, timeout + 1.0)
        return future.result(0)

    def publish(
        self, topic: str, behaviour: str, payload: Any = None, *, ttl_s: float | None = None
    ) -> bytes:
        """Broadcast on ``topic``; returns the sealed envelope as it was sent."""
        frame = self.seal(self.envelope(behaviour, payload, ttl_s=ttl_s, topic=topic))
        self.system.publish(topic, frame)
        return frame

    def tell(self, message: Any) -> None:
        self.pykka_ref.tell(message)

    def tell_call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in the actor's thread (from any thread); dropped if it stopped."""
        with contextlib.suppress(pykka.ActorDeadError):
            self.pykka_ref.tell(Call(fn, args))

    def stop_soon(self) -> None:
        """Stop without waiting: safe from the actor's own thread."""
        self.system.stop_actor(self.handle.address.inbox, timeout=0, block=False)

    def is_alive(self) -> bool:
        return self.pykka_ref.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        self.system.stop_actor(self.handle.address.inbox, timeout)


class ActorSystem:
    """The actors of one node, their transport and their shared pipeline state."""

    def __init__(
        self,
        identity: Identity,
        transport: Transport,
        *,
        limits: Limits | None = None,
        trust: TrustStore | None = None,
        deployment_policy: DeploymentPolicy = "open",
    ) -> None:
        if transport.peer_id != identity.peer_id:
            raise ValueError("the transport's peer id must be the node key's peer id")
        self.identity = identity
        self.peer_id = identity.peer_id
        self.transport = transport
        self.limits = limits or Limits()
        self.trust = trust or TrustStore(None)
        if self.trust.node_key is None:
            self.trust.node_key = identity.public_key
        self.timers = Timers(f"dms-timers-{self.peer_id[-6:]}")
        self._lock = threading.Lock()
        self._actors: dict[str, ActorRef] = {}
        # Who answers for actors that stopped, by inbox prefix (``stand_in``).
        self._stand_ins: dict[str, _StandIn] = {}
        self._local_keys: set[bytes] = {identity.public_key}
        # What each child actor may do (least privilege); the node key holds everything.
        self._roles: dict[bytes, Role] = {}
        # The role of each kind of actor this node spawns (the node fills it); a class
        # not in it (nor a base of it) has its own ``role`` attribute.
        self.roles: dict[type, Role] = {}
        self.policy = CapabilityPolicy(
            self.trust, identity.public_key, self.role_of, deployment_policy
        )
        self.wallet = Wallet(identity, self.trust, self.role_of)
        self._subscribers: dict[str, set[str]] = defaultdict(set)
        self._behaviours: dict[str, dict[str, Behaviour]] = {}  # inbox -> its behaviours
        self._pending: dict[bytes, _Pending] = {}
        self.replay = ReplayCache(self.limits.replay_cache_size)
        # Requests a second per peer for some behaviours (bid requests), checked
        # before a frame's signature or payload (dms.actor.admission).
        self.behaviour_limits = BehaviourLimits()
        self.behaviour_limits.unknown_share = self.limits.unknown_share
        # Requests remote peers make this node hold until an actor handled them, and
        # their bytes: global, per peer and per IP budgets (dms.actor.admission).
        self.admission = Admission(self.limits.holdings())
        # Refusals past the answer budget, answered together (one reply per sender).
        self.late_answers = LateAnswers()
        self._root_handle = Handle(
            id=identity.public_key, address=Address(host=self.peer_id, inbox=ROOT_INBOX)
        )
        self._stopped = False  # no new actors; the actors are being stopped
        self._closed = False  # pending invokes have failed: a new one fails at once
        # Refusals by code, for status pages and tests: a refusal is never silent.
        self.refusals: Counter[str] = Counter()
        # Called with (behaviour, "ok" or the refusal's code) for every invoke this
        # node answers, on the answering thread (dms.node.metrics counts them).
        self.answer_observers: list[Callable[[str, str], None]] = []
        transport.start(self.receive, self.undeliverable)

    # ---- actors -----------------------------------------------------------------

    @property
    def stopped(self) -> bool:
        """Whether it is stopping (or stopped): it spawns no new actor."""
        return self._stopped

    def spawn(
        self,
        cls: type[pykka.ThreadingActor],  # a dms.actor.Actor (not imported: it imports this)
        *args: Any,
        inbox: str | None = None,
        identity: Identity | None = None,
        role: Role | None = None,
        **kwargs: Any,
    ) -> ActorRef:
        """Start an actor of ``cls`` with its own key (or ``identity``) at ``inbox``.

        An actor with the node's key holds every capability; any other holds only
        ``role`` (else its class's entry in ``roles``, else the class's ``role``) on
        this node, and shows certificates for it to other nodes.
        """
        identity = identity or Identity.generate()
        inbox = inbox or f"{cls.__name__.lower()}-{identity.public_key[:6].hex()}"
        handle = Handle(id=identity.public_key, address=Address(host=self.peer_id, inbox=inbox))
        with self._lock:
            if self._stopped:
                raise RuntimeError("actor system is stopped")
            if inbox in self._actors:
                raise ValueError(f"inbox {inbox!r} is taken")
            self._local_keys.add(identity.public_key)
            if identity.public_key != self.identity.public_key:
                self._roles[identity.public_key] = role or self._role_of_class(cls)
        context = ActorContext(system=self, identity=identity, handle=handle)
        with self._lock:
            self._behaviours[inbox] = context.behaviours
        try:
            pykka_ref = cls.start(context, *args, **kwargs)
        except BaseException:
            with self._lock:
                self._behaviours.pop(inbox, None)
                self._local_keys.discard(identity.public_key)
                self._roles.pop(identity.public_key, None)
            raise
        ref = ActorRef(self, identity, handle, pykka_ref)
        with self._lock:
            self._actors[inbox] = ref
        if not pykka_ref.is_alive():
            # Its on_start failed before it was listed (its thread ran first): the stop
            # it asked for found nothing to drop, so it is dropped now (stop_actor once).
            self.stop_actor(inbox, timeout=0, block=False)
        return ref

    def stand_in(
        self, prefix: str, ref: ActorRef, holds: Callable[[str, bytes], bool], gone: str
    ) -> None:
        """``ref`` answers requests to a stopped actor whose inbox starts with ``prefix``
        while ``holds(inbox, key)`` (called on the receiving thread): it handles them as
        its own, with its own behaviours, and reads the inbox from the envelope (an ended
        allocation's final answers, ``dms.provider.bidding``). Past that, such a request
        is refused ``unknown_actor`` as for any actor that is not here, with ``gone``
        added to the reason."""
        with self._lock:
            self._stand_ins[prefix] = _StandIn(ref, holds, gone)

    def _stand_in_for(self, to: Handle) -> tuple[ActorRef | None, str]:
        """The actor that answers for ``to`` (an actor of this node that stopped), if
        any; else the reason to add to the refusal."""
        inbox = to.address.inbox
        with self._lock:
            stand_ins = [s for p, s in self._stand_ins.items() if inbox.startswith(p)]
        for stand_in in stand_ins:
            if stand_in.holds(inbox, to.id):
                return stand_in.ref, ""
        return None, "".join(f" ({s.gone})" for s in stand_ins)

    def to_stand_in(self, inbound: Inbound) -> bool:
        """Hand a request its actor will never handle (it stopped as the request came,
        or with it still in its mailbox) to the stand-in that answers for that actor
        now, if one holds it; False if none does (then it is answered ``stopped``). An
        allocation that ended keeps its record before it stops: a poll caught in its
        stop gets the record's answer, not ``stopped``."""
        to = inbound.sealed.envelope.to
        if to is None or to.address.host != self.peer_id:
            return False
        ref, _ = self._stand_in_for(to)
        if ref is None:
            return False
        try:
            ref.pykka_ref.tell(inbound)
        except pykka.ActorDeadError:  # the stand-in stopped too (the node is stopping)
            return False
        return True

    def actor(self, inbox: str) -> ActorRef | None:
        with self._lock:
            return self._actors.get(inbox)

    def stop_actor(self, inbox: str, timeout: float = 5.0, block: bool = True) -> None:
        with self._lock:
            ref = self._actors.pop(inbox, None)
            if ref is None:
                return
            self._behaviours.pop(inbox, None)
            if ref.identity.public_key != self.identity.public_key:
                self._local_keys.discard(ref.identity.public_key)
                self._roles.pop(ref.identity.public_key, None)
                self.wallet.forget(ref.identity.public_key)
            for members in self._subscribers.values():
                members.discard(inbox)
        try:
            stopped = ref.pykka_ref.stop(block=False)
            if block:
                flush_deferred_wakes()  # on a loop's thread: the stop's wake, before we block
                stopped.get(timeout=timeout)
        except pykka.ActorDeadError:
            pass
        except pykka.Timeout:
            log.warning("actor %s did not stop within %g s", inbox, timeout)

    def is_local(self, public_key: bytes) -> bool:
        return public_key in self._local_keys

    def _role_of_class(self, cls: type) -> Role:
        for klass in cls.__mro__:
            if klass in self.roles:
                return self.roles[klass]
        return getattr(cls, "role", Role())

    def role_of(self, public_key: bytes) -> Role | None:
        """The role of a child actor of this node; None for the node key and strangers."""
        return self._roles.get(public_key)

    @property
    def deployment_policy(self) -> DeploymentPolicy:
        return self.policy.deployment_policy

    def subscribe(self, topic: str, inbox: str) -> None:
        with self._lock:
            first = not self._subscribers[topic]
            self._subscribers[topic].add(inbox)
        if first:
            self.transport.subscribe(topic)

    def unsubscribe(self, topic: str, inbox: str) -> None:
        """``inbox`` no longer hears ``topic``; the node leaves the topic's mesh once no
        actor of it listens (it no longer validates, delivers nor forwards what is
        published there)."""
        with self._lock:
            members = self._subscribers.get(topic)
            if not members or inbox not in members:
                return
            members.discard(inbox)
            last = not members
            if last:
                del self._subscribers[topic]
        if last:
            self.transport.unsubscribe(topic)

    def stop(self, timeout: float | None = None) -> None:
        """Stop every actor, fail every pending invoke, detach from the network.

        Bounded: the actors get ``timeout`` (``limits.stop_timeout_s``) in all, one
        after another in the order they started (a parent stops its children); an
        actor still busy then is left to finish on its own (daemon) thread. Every
        pending invoke then fails with ``stopped``, and the transport gets as long
        again to stop.
        """
        budget = self.limits.stop_timeout_s if timeout is None else timeout
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            inboxes = list(self._actors)
        deadline = time.monotonic() + budget
        for inbox in inboxes:
            left = deadline - time.monotonic()
            # Past the deadline, the rest are only told to stop.
            self.stop_actor(inbox, timeout=max(left, 0.0), block=left > 0)
        with self._lock:
            self._closed = True
            pending = list(self._pending.values())
            self._pending.clear()
        for p in pending:
            self._complete(p, Outcome(error=RemoteError(ErrorCode.STOPPED, "actor system stopped")))
        self._stop_transport(budget)
        self.timers.stop()

    def _stop_transport(self, timeout: float) -> None:
        stopper = threading.Thread(
            target=self.transport.stop, name=f"dms-stop-{self.peer_id[-6:]}", daemon=True
        )
        stopper.start()
        stopper.join(timeout)
        if stopper.is_alive():
            log.warning("the transport did not stop within %g s; left to finish", timeout)

    # ---- outbound ----------------------------------------------------------------

    def seal(self, envelope: Envelope, identity: Identity) -> bytes:
        try:
            frame = seal(envelope, identity)
        except Refusal as r:
            raise RemoteError(r.code, r.reason) from None
        if len(frame) > self.limits.max_data_bytes:
            raise RemoteError(
                ErrorCode.TOO_LARGE,
                f"envelope of {len(frame)} bytes exceeds {self.limits.max_data_bytes}",
            )
        return frame

    def route(self, frame: bytes, to: Handle) -> None:
        if to.address.host == self.peer_id:
            self.receive(frame, self.peer_id)
        else:
            self.transport.send(to.address.host, frame)

    def publish(self, topic: str, frame: bytes) -> None:
        self.transport.publish(topic, frame)
        with self._lock:
            local = bool(self._subscribers.get(topic))
        if local:
            self.receive(frame, self.peer_id)

    def invoke_frame(
        self,
        frame: bytes,
        envelope: Envelope,
        timeout: float,
        *,
        callback: Callable[[Outcome], None] | None = None,
        callback_actor: pykka.ActorRef[Any] | None = None,
        wake: threading.Lock | None = None,
    ) -> Future[Any]:
        """Send a sealed request and await its reply (used by relays and tests too);
        ``wake``, a held lock, is released once the future is completed."""
        if envelope.to is None or envelope.reply_to is None:
            raise ValueError("invoke needs a destination and a reply path")
        future: Future[Any] = Future()
        pending = _Pending(
            target=envelope.to,
            behaviour=envelope.behaviour,
            future=future,
            callback=callback,
            callback_actor=callback_actor,
            wake=wake,
        )
        nonce = envelope.nonce
        with self._lock:
            closed = self._closed
            if not closed:
                self._pending[nonce] = pending
        if closed:
            self._complete(
                pending, Outcome(error=RemoteError(ErrorCode.STOPPED, "actor system stopped"))
            )
            return future
        pending.timer = self.timers.call_later(timeout, lambda: self._expire(nonce, timeout))
        try:
            self.route(frame, envelope.to)
        except RemoteError as err:
            self._take_and_complete(nonce, Outcome(error=err))
        except BaseException:  # the caller sees the error: nothing is left pending
            with self._lock:
                self._pending.pop(nonce, None)
            pending.timer.cancel()
            raise
        return future

    def _send_reply(self, request: Envelope, payload: dict[str, Any], as_: ActorRef | None) -> None:
        if request.reply_to is None or request.behaviour.startswith(REPLY_PREFIX):
            return
        if request.to is None:
            return  # a broadcast is never answered: every subscriber would answer
        for observe in self.answer_observers:
            observe(request.behaviour, "ok" if payload["ok"] else str(payload["code"]))
        ttl_s = (request.expiry - now_ns()) / 1e9
        if not payload["ok"]:
            # A refusal must reach the caller even when the request itself had expired.
            ttl_s = max(ttl_s, REFUSAL_TTL_S)
        if ttl_s <= 0:
            log.info("reply to %s dropped: the request expired", request.behaviour)
            return
        sender = as_.handle if as_ else self._root_handle
        identity = as_.identity if as_ else self.identity
        env = make_envelope(
            sender, identity.public_key, request.reply_to, payload, to=request.sender, ttl_s=ttl_s
        )
        try:
            frame = self.seal(env, identity)
        except RemoteError as err:
            env = env.model_copy(
                update={"payload": reply_payload(error=Refusal(err.code, err.reason))}
            )
            frame = self.seal(env, identity)
        try:
            self.route(frame, request.sender)
        except RemoteError as err:
            log.info("reply to %s not delivered: %s", request.sender.did, err)

    def reply(self, request: Envelope, result: Any, as_: ActorRef) -> None:
        self._send_reply(request, reply_payload(result), as_)

    def refuse(self, request: Envelope, refusal: Refusal, as_: ActorRef | None = None) -> None:
        """Log a refusal and, if the sender expects a reply, tell it why."""
        self.refusals[str(refusal.code)] += 1
        log.warning(
            "refused %s from %s: %s: %s",
            request.behaviour,
            request.sender.did,
            refusal.code,
            refusal.reason,
        )
        self._send_reply(request, reply_payload(error=refusal), as_)

    def undeliverable(self, frame: bytes, reason: str) -> None:
        """A frame the transport took but lost: fail its invoke now, not at the timeout."""
        env = peek(frame)
        if env is None or env.reply_to is None:
            return
        self._take_and_complete(env.nonce, Outcome(error=Unreachable(reason)))

    # ---- inbound -----------------------------------------------------------------

    def receive(
        self, frame: bytes, from_peer: str | None, *, signature_checked: bool = False
    ) -> None:
        """Entry point for transports: run the system half of the pipeline.

        ``signature_checked``: the transport verified these very bytes already.
        """
        limits = self.limits
        try:
            opened = open_frame(frame, limits.max_data_bytes)
        except Refusal as refusal:
            claimed = peek(frame) if refusal.code == ErrorCode.TOO_LARGE else None
            if claimed is not None and self._answerable(claimed, from_peer):
                self.refuse(claimed, refusal)
            else:
                self.refusals[str(refusal.code)] += 1
                log.warning(
                    "dropped frame from %s: %s: %s", from_peer, refusal.code, refusal.reason
                )
            return
        env = opened.envelope
        try:
            check_time(env, now_ns(), limits.max_ttl_s, limits.clock_skew_s)
            self._check_peer(env, from_peer)
            if env.to is None:
                self._check_broadcast(env)
            if env.behaviour in self.behaviour_limits and self._over_limit(
                env, from_peer, opened.size
            ):
                return
            self._check_size_class(opened)
            ticket = self._admit(env, from_peer, opened.size)
            if ticket is False:
                return
            try:
                vouched = self._vouched_reply(env, from_peer)
                if not (vouched or signature_checked):
                    check_signature(opened)
                check_signer(env)
                if not vouched:  # a vouched reply resolves its invoke once: no replay
                    self.replay.check(env.signer, env.nonce, env.issued_at, env.expiry, now_ns())
                sealed = decode_payload(
                    opened, verified=not vouched, max_items=limits.max_payload_items
                )
                env = sealed.envelope
                if env.behaviour.startswith(REPLY_PREFIX):
                    self._resolve(env)
                elif env.to is None:
                    self._deliver_topic(sealed, ticket)
                else:
                    self._deliver_direct(sealed, ticket)
            except BaseException:
                self.admission.release(ticket)
                raise
        except Refusal as refusal:
            if self._answerable(env, from_peer):
                self.refuse(env, refusal)
            else:
                self.refusals[str(refusal.code)] += 1
                log.warning(
                    "refused %s from %s via %s (not answered: it names another host): %s: %s",
                    env.behaviour,
                    env.sender.did,
                    from_peer,
                    refusal.code,
                    refusal.reason,
                )

    def _vouched_reply(self, env: Envelope, from_peer: str | None) -> bool:
        """Whether ``env`` is a reply to an invoke pending here that came over the
        connection of the invoked actor's host (``from_peer``: the peer the transport
        authenticated, libp2p's Noise session; this node itself for its own frames).

        Such a reply needs no signature check: the session already proves that host
        sent these bytes, and the host holds the keys of its actors, so a signature
        could prove nothing more (``_resolve`` still takes it only if signed as the
        target or its host). A reply is consumed here, never kept or forwarded as
        evidence. Every other frame's signature is checked (specs/security.md,
        "Signatures and sessions")."""
        if from_peer is None or not env.behaviour.startswith(REPLY_PREFIX):
            return False
        try:
            nonce = bytes.fromhex(env.behaviour[len(REPLY_PREFIX) :])
        except ValueError:
            return False
        pending = self._pending.get(nonce)  # a dict read is atomic; _resolve looks again
        return pending is not None and pending.target.address.host == from_peer

    def _over_limit(self, env: Envelope, from_peer: str | None, size: int = 0) -> bool:
        """Whether ``env`` is over a rate for its behaviour, its sender's or all peers'
        (its host is ``from_peer``: checked already). Such a request is counted, logged
        once a second and answered a few times a second; this node's own are not
        limited."""
        if from_peer is None or from_peer == self.peer_id:
            return False
        verdict = self.behaviour_limits.check(env.behaviour, from_peer, size)
        if verdict is None:
            return False
        self._refused_unverified(env, from_peer, verdict)
        return True

    def _admit(
        self, env: Envelope, from_peer: str | None, size: int
    ) -> Ticket | Literal[False] | None:
        """A ticket in the admission budgets for a request of a remote peer (None for
        replies and this node's own frames, which wait on nothing), or False: refused."""
        if from_peer is None or from_peer == self.peer_id or env.behaviour.startswith(REPLY_PREFIX):
            return None
        admitted = self.admission.admit(from_peer, size)
        if isinstance(admitted, Ticket):
            return admitted
        self._refused_unverified(env, from_peer, admitted)
        return False

    def _refused_unverified(self, env: Envelope, from_peer: str, verdict: Verdict) -> None:
        """A request refused on its header (``rate_limited``): counted, logged at most
        once a second with the count, answered only as often as the verdict allows."""
        self.refusals[ErrorCode.RATE_LIMITED] += 1
        if verdict.log_count:
            log.warning(
                "refused %d %s from %s: rate_limited: %s",
                verdict.log_count,
                env.behaviour,
                from_peer,
                verdict.reason,
            )
        if verdict.answer:
            self._send_reply(
                env, reply_payload(error=Refusal(ErrorCode.RATE_LIMITED, verdict.reason)), None
            )
        elif env.reply_to is not None and env.to is not None:
            kept = self.late_answers.add(from_peer, env, verdict.reason)
            if kept == "first":
                self.timers.call_later(LATE_ANSWER_S, self._answer_late)
            elif kept == "dropped":  # /metrics: dms_refusals_total{code="unanswered"}
                self.refusals[UNANSWERED] += 1

    def _answer_late(self) -> None:
        """The refusals past the answer budget, one reply per sender: the first request's
        reply, naming the others (``also``), which the sender's node fails alike."""
        batches, more = self.late_answers.due()
        for batch in batches:
            self._answer_batch(batch)
        if more:
            self.timers.call_later(LATE_ANSWER_S, self._answer_late)

    def _answer_batch(self, batch: LateBatch) -> None:
        payload = reply_payload(error=Refusal(ErrorCode.RATE_LIMITED, batch.reason))
        if batch.nonces:
            payload["also"] = batch.nonces
        try:
            self._send_reply(batch.first, payload, None)
        except Exception:  # stopping; a late answer is best effort
            log.debug("late refusals to %s not sent", batch.peer, exc_info=True)

    @staticmethod
    def _answerable(env: Envelope, from_peer: str | None) -> bool:
        """An error reply goes only to the host that delivered the frame: a frame that
        names another host as its sender cannot make this node answer a third party."""
        return from_peer is None or env.sender.address.host == from_peer

    def _check_size_class(self, opened: Opened) -> None:
        """Over ``max_control_bytes`` only for a data behaviour, or the reply to a pending
        invoke; read from the header and the local behaviours, before any decoding."""
        limit = self.limits.max_control_bytes
        if opened.size <= limit:
            return
        env = opened.envelope
        path = env.behaviour
        with self._lock:
            if path.startswith(REPLY_PREFIX):
                try:
                    allowed = bytes.fromhex(path[len(REPLY_PREFIX) :]) in self._pending
                except ValueError:
                    allowed = False
            elif env.to is None:
                allowed = any(
                    (spec := self._behaviours.get(i, {}).get(path)) is not None and spec.data
                    for i in self._subscribers.get(env.topic or "", ())
                )
            else:
                local = env.to.address.host == self.peer_id
                spec = self._behaviours.get(env.to.address.inbox, {}).get(path) if local else None
                allowed = spec is not None and spec.data
        if not allowed:
            raise Refusal(
                ErrorCode.TOO_LARGE,
                f"{opened.size} bytes exceed the control limit {limit} of {path}",
            )

    def _check_peer(self, env: Envelope, from_peer: str | None) -> None:
        """The envelope came from the host it names, and a root actor is its host's key."""
        if from_peer is None:
            return
        if env.sender.address.host != from_peer:
            raise Refusal(ErrorCode.WRONG_SIGNER, "sender's host is not the peer it came from")
        if env.sender.address.inbox == ROOT_INBOX:
            try:
                host_key = public_key_from_peer_id(from_peer)
            except IdentityError:
                host_key = None
            if host_key != env.signer:
                raise Refusal(ErrorCode.WRONG_SIGNER, "root actor is not signed by its peer's key")

    def _deliver_direct(self, sealed: Sealed, ticket: Ticket | None = None) -> None:
        to = sealed.envelope.to
        assert to is not None
        local = to.address.host == self.peer_id
        with self._lock:
            ref = self._actors.get(to.address.inbox) if local else None
        gone = ""
        if ref is None and local:
            ref, gone = self._stand_in_for(to)
            if ref is None and self._stopped:  # it stopped with the others: no wrong address
                raise Refusal(ErrorCode.STOPPED, f"this node is stopping ({to.address.inbox})")
        elif ref is not None and ref.handle.id != to.id:
            ref = None
        if ref is None:
            raise Refusal(
                ErrorCode.UNKNOWN_ACTOR, f"no actor {to.address.inbox} with that key here{gone}"
            )
        try:
            ref.pykka_ref.tell(Inbound(sealed, ticket))
        except pykka.ActorDeadError:
            # Found just before it stopped: its stand-in may answer for it by now.
            if not self.to_stand_in(Inbound(sealed, ticket)):
                raise Refusal(ErrorCode.STOPPED, f"actor {to.address.inbox} has stopped") from None

    @staticmethod
    def _check_broadcast(env: Envelope) -> None:
        if env.topic is None:
            raise Refusal(ErrorCode.MALFORMED, "envelope has neither a destination nor a topic")
        if env.reply_to is not None:
            raise Refusal(ErrorCode.BROADCAST_REPLY, "a broadcast may not ask for a reply")

    def _deliver_topic(self, sealed: Sealed, ticket: Ticket | None = None) -> None:
        """To every subscriber of the topic that declared the behaviour for that topic."""
        env = sealed.envelope
        topic, path = env.topic, env.behaviour
        with self._lock:
            inboxes = [i for i in self._subscribers.get(topic or "", ()) if i in self._actors]
            refs = [
                self._actors[i]
                for i in inboxes
                if (spec := self._behaviours.get(i, {}).get(path)) is not None
                and spec.topic == topic
            ]
        if inboxes and not refs:
            raise Refusal(ErrorCode.NOT_FOR_TOPIC, f"{path} is not a behaviour for {topic}")
        if not refs:
            self.admission.release(ticket)
            return
        if ticket is not None:
            ticket.holders = len(refs)
        for ref in refs:
            try:
                ref.pykka_ref.tell(Inbound(sealed, ticket))
            except pykka.ActorDeadError:
                self.admission.release(ticket)

    def _resolve(self, reply: Envelope) -> None:
        try:
            nonce = bytes.fromhex(reply.behaviour[len(REPLY_PREFIX) :])
        except ValueError:
            raise Refusal(ErrorCode.MALFORMED, "bad reply path") from None
        with self._lock:
            pending = self._pending.get(nonce)
            if pending is None:
                log.debug("late or unknown reply %s dropped", reply.behaviour)
                return
            if not self._answers(pending.target, reply.signer):
                log.warning("reply for %s signed by an unexpected key dropped", pending.behaviour)
                return
            del self._pending[nonce]
        payload = reply.payload
        if not isinstance(payload, dict) or "ok" not in payload:
            outcome = Outcome(error=RemoteError(ErrorCode.MALFORMED, "malformed reply"))
        elif payload["ok"]:
            outcome = Outcome(result=payload.get("result"))
        else:
            code = str(payload.get("code", ErrorCode.MALFORMED))
            reason = str(payload.get("reason", ""))
            rule = payload.get("rule")
            outcome = Outcome(
                error=RemoteError(code, reason, rule=rule if isinstance(rule, str) else None)
            )
            also = payload.get("also")
            if isinstance(also, list):
                self._fail_also(also[:MAX_ALSO], reply.signer, code, reason)
        self._complete(pending, outcome)

    def _fail_also(self, nonces: list[Any], signer: bytes, code: str, reason: str) -> None:
        """A refusal that answers several requests at once (the receiver's late answers,
        ``dms.actor.admission.LateAnswers``): each pending invoke it names fails alike,
        if this signer may answer it (its target, or the target's host)."""
        for nonce in nonces:
            if not isinstance(nonce, bytes):
                continue
            with self._lock:
                pending = self._pending.get(nonce)
                if pending is None or not self._answers(pending.target, signer):
                    continue
                del self._pending[nonce]
            self._complete(pending, Outcome(error=RemoteError(code, reason)))

    @staticmethod
    def _answers(target: Handle, signer: bytes) -> bool:
        """A reply may come from the target actor or from its host node (refusals)."""
        if signer == target.id:
            return True
        try:
            return public_key_from_peer_id(target.address.host) == signer
        except IdentityError:
            return False

    def _expire(self, nonce: bytes, timeout: float) -> None:
        with self._lock:
            pending = self._pending.get(nonce)
        if pending is None:
            return
        err = InvokeTimeout(
            f"no reply from {pending.target.did} to {pending.behaviour} within {timeout:g} s"
        )
        self._take_and_complete(nonce, Outcome(error=err))

    def _take_and_complete(self, nonce: bytes, outcome: Outcome) -> None:
        with self._lock:
            pending = self._pending.pop(nonce, None)
        if pending is not None:
            self._complete(pending, outcome)

    @staticmethod
    def _complete(pending: _Pending, outcome: Outcome) -> None:
        if pending.timer is not None:
            pending.timer.cancel()
        if outcome.error is not None:
            pending.future.set_exception(outcome.error)
        else:
            pending.future.set_result(outcome.result)
        if pending.wake is not None:
            pending.wake.release()
        if pending.callback is not None and pending.callback_actor is not None:
            try:
                pending.callback_actor.tell(Call(pending.callback, (outcome,)))
            except pykka.ActorDeadError:
                log.info("reply for %s arrived after its actor stopped", pending.behaviour)
