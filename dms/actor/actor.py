"""The actor base: behaviours, replies, callbacks and children on a pykka thread.

The actor's thread finishes the receive pipeline that the system started:
behaviour lookup -> size class -> capability -> payload validation -> handler.
A handler returns its result (sent as the reply), raises :class:`Refusal`
(an error reply with that code), raises anything else (an error reply with
``handler_error``; the actor keeps running), or calls ``request.defer()`` to
answer later, typically from an ``invoke(..., on_reply=...)`` callback. No
handler ever blocks on another actor's reply, so actors that invoke each other
cannot deadlock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any, ClassVar

import pykka
from pydantic import BaseModel, ValidationError

from dms.actor.admission import Ticket
from dms.actor.behaviour import Behaviour, declared_behaviours
from dms.actor.codes import ErrorCode, Refusal
from dms.actor.envelope import Envelope, Sealed
from dms.actor.handle import Handle
from dms.actor.inbox import LanedInbox
from dms.actor.policy import Role
from dms.actor.system import ActorContext, ActorRef, ActorSystem, Call, Inbound, Outcome
from dms.actor.threads import PARK, next_name
from dms.actor.timers import TimerHandle
from dms.errors import DmsError
from dms.security.identity import Identity

log = logging.getLogger("dms.actor")


class Responder:
    """Answers a deferred request once, from any thread."""

    def __init__(self, actor: ActorRef, envelope: Envelope) -> None:
        self._actor = actor
        self._envelope = envelope
        self._done = False
        self._lock = threading.Lock()

    def _claim(self) -> bool:
        with self._lock:
            if self._done:
                return False
            self._done = True
            return True

    def ok(self, result: Any = None) -> None:
        if self._claim():
            self._actor.system.reply(self._envelope, result, self._actor)

    def fail(self, code: ErrorCode | str, reason: str) -> None:
        if self._claim():
            self._actor.system.refuse(self._envelope, Refusal(code, reason), self._actor)


class Request:
    """What a handler receives: the verified envelope and its (validated) payload."""

    def __init__(
        self, actor: ActorRef, envelope: Envelope, payload: Any, sealed: Sealed | None = None
    ) -> None:
        self.envelope = envelope
        self.payload = payload
        self.sealed = sealed  # the signed bytes, for handlers that keep or relay them
        self._actor = actor
        self.responder: Responder | None = None

    @property
    def sender(self) -> Handle:
        return self.envelope.sender

    @property
    def deferred(self) -> bool:
        return self.responder is not None

    def defer(self) -> Responder:
        """Answer later: the handler's return value is then ignored."""
        if self.responder is None:
            self.responder = Responder(self._actor, self.envelope)
        return self.responder


class Actor(pykka.ThreadingActor):
    """Base of every dms actor. Subclasses declare behaviours with ``@behaviour``.

    Override :meth:`stopping` (not ``on_stop``) for clean-up; children are
    stopped after it. Actor threads are daemon threads: an actor still busy when
    its system gave up waiting for it (``ActorSystem.stop``) never keeps the
    process alive.

    ``role``: the capabilities an actor of this class holds when it is not the
    node's own actor (least privilege). ``spawn(..., role=...)`` and the system's
    role table (``ActorSystem.roles``, which the node fills) come first.
    """

    use_daemon_thread = True
    role: ClassVar[Role] = Role()

    @staticmethod
    def _create_actor_inbox() -> LanedInbox:  # type: ignore[override]
        """Requests of peers without a stake here wait behind everything else."""
        return LanedInbox()

    def __init__(self, context: ActorContext) -> None:
        super().__init__()
        self.context = context
        # Shared with the system, which reads a behaviour's topic and size class
        # before it decodes a payload (see ActorSystem.receive).
        self._behaviours: dict[str, Behaviour] = context.behaviours
        self._behaviours.update(
            {
                path: dataclasses.replace(spec, handler=spec.handler.__get__(self))
                for path, spec in declared_behaviours(type(self)).items()
            }
        )
        self._children: list[ActorRef] = []
        self._ref: ActorRef | None = None

    # ---- who am I ----------------------------------------------------------------

    @property
    def system(self) -> ActorSystem:
        return self.context.system

    @property
    def identity(self) -> Identity:
        return self.context.identity

    @property
    def handle(self) -> Handle:
        return self.context.handle

    @property
    def ref(self) -> ActorRef:
        if self._ref is None:
            self._ref = ActorRef(self.system, self.identity, self.handle, self.actor_ref)
        return self._ref

    # ---- messaging (any of these may be called from handlers) -------------------

    def send(self, to: Handle, behaviour: str, payload: Any = None, **kw: Any) -> None:
        self.ref.send(to, behaviour, payload, **kw)

    def invoke(
        self,
        to: Handle,
        behaviour: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        on_reply: Callable[[Outcome], None] | None = None,
    ) -> None:
        """Request/reply without blocking: ``on_reply(outcome)`` runs in this actor."""
        self.ref.invoke(to, behaviour, payload, timeout=timeout, on_reply=on_reply)

    def publish(self, topic: str, behaviour: str, payload: Any = None, **kw: Any) -> bytes:
        return self.ref.publish(topic, behaviour, payload, **kw)

    def subscribe(self, topic: str) -> None:
        self.system.subscribe(topic, self.handle.address.inbox)

    def unsubscribe(self, topic: str) -> None:
        self.system.unsubscribe(topic, self.handle.address.inbox)

    def register(
        self,
        path: str,
        handler: Callable[[Request], Any],
        *,
        public: bool = False,
        payload: type[BaseModel] | None = None,
        data: bool = False,
        topic: str | None = None,
    ) -> None:
        self._behaviours[path] = Behaviour(
            path=path, handler=handler, public=public, payload=payload, data=data, topic=topic
        )

    def route(self, service: object) -> None:
        """Route the behaviours ``service`` declares (its methods marked ``@behaviour``)
        to it: an actor composed of services answers for them. A path this actor
        answers already is an error (two handlers for one behaviour)."""
        for path, spec in declared_behaviours(type(service)).items():
            if path in self._behaviours:
                raise ValueError(f"{path} is routed twice ({type(service).__name__})")
            self._behaviours[path] = dataclasses.replace(
                spec, handler=spec.handler.__get__(service)
            )

    def unregister(self, path: str) -> None:
        self._behaviours.pop(path, None)

    def spawn(self, cls: type[Actor], *args: Any, inbox: str | None = None, **kw: Any) -> ActorRef:
        """Start a child actor with its own key; it stops when this actor stops. The
        children that stopped meanwhile are let go (a node spawns one a job)."""
        child = self.system.spawn(cls, *args, inbox=inbox, **kw)
        self._children = [c for c in self._children if c.is_alive()]
        self._children.append(child)
        return child

    def call_later(self, delay_s: float, fn: Callable[[], Any]) -> TimerHandle:
        """Run ``fn`` in this actor's thread after ``delay_s``. With no delay it goes to
        the mailbox at once, not through the timer thread (a wake-up and a turn at the
        GIL fewer); cancelling it before it runs still keeps it from running."""
        pykka_ref = self.actor_ref
        if delay_s <= 0:
            handle = TimerHandle(None)

            def unless_cancelled() -> None:
                if not handle.cancelled:
                    fn()

            with contextlib.suppress(pykka.ActorDeadError):
                pykka_ref.tell(Call(unless_cancelled))
            return handle

        def fire() -> None:
            with contextlib.suppress(pykka.ActorDeadError):
                pykka_ref.tell(Call(fn))

        return self.system.timers.call_later(delay_s, fire)

    # ---- hooks -------------------------------------------------------------------

    def on_message(self, message: Any) -> Any:
        """Messages told to the actor that are not envelopes; override to use."""
        log.warning("%s ignored a %s", self.handle.address.inbox, type(message).__name__)

    def stopping(self) -> None:
        """Clean-up before the actor's children stop and it leaves its system."""

    # ---- pykka -------------------------------------------------------------------

    def _start_actor_loop(self) -> None:
        """On a parked thread if there is one (``dms.actor.threads``): creating a thread,
        and waiting for it to run, cost more than the rest of a spawn."""
        PARK.run(self._bounded_loop, next_name(type(self).__name__))

    def store_bound(self) -> contextlib.AbstractContextManager[Any]:
        """What bounds this actor's thread's waits for the store, its whole life (start,
        messages, stop): none here. An actor that saves state overrides it with its
        store's ``waiting_at_most(store_wait_s)`` (specs/node.md, "A store another
        process holds locked")."""
        return contextlib.nullcontext()

    def _bounded_loop(self) -> None:
        with self.store_bound():
            self._actor_loop()

    def _actor_loop_setup(self) -> None:
        """pykka's start, with the actor's say when its ``on_start`` raises
        (``start_failed``): pykka stops it then, without ``on_stop``."""
        try:
            self.on_start()
        except Exception as exc:
            try:
                handled = self.start_failed(exc)
            except Exception:
                log.exception("%s: its start failed, and so did its handling", self)
                handled = False
            if not handled:
                self._handle_failure(type(exc), exc, exc.__traceback__)

    def start_failed(self, exc: Exception) -> bool:
        """Its ``on_start`` raised ``exc`` (a bug): whether the actor dealt with it and
        carries on (it ends itself, saying why). By default it stops, as pykka has it."""
        return False

    def on_receive(self, message: Any) -> Any:
        try:
            if isinstance(message, Inbound):
                self._handle(message.sealed, message.ticket)
            elif isinstance(message, Call):
                message.fn(*message.args)
            else:
                return self.on_message(message)
        except Exception:
            # The actor must outlive any bug in a callback or hook.
            log.exception("%s failed on %s", self.handle.address.inbox, type(message).__name__)
        return None

    def on_stop(self) -> None:
        try:
            self.stopping()
        finally:
            self._let_go()

    def _let_go(self) -> None:
        """The end of a stop: the children stop, and what waits in the mailbox is
        answered. Idempotent (the inbox is closed once; a stopped child is gone)."""
        for child in self._children:
            child.stop()
        # Requests still waiting are never handled now: each goes to the stand-in
        # that answers for this actor once it stopped, if one does (an ended
        # allocation's record), else is answered 'stopped' (its sender would
        # otherwise wait out its own deadline) and no longer counts in the
        # admission budgets (else a peer's share would shrink with every stop);
        # one put after this is refused, its ticket given back by its sender.
        inbox = self.actor_inbox
        if isinstance(inbox, LanedInbox):
            for dropped in inbox.close():
                if self.system.to_stand_in(dropped):
                    continue
                self.system.admission.release(dropped.ticket)
                if dropped.sealed.envelope.reply_to is not None:
                    stopped = f"actor {self.handle.address.inbox} stopped before handling it"
                    refusal = Refusal(ErrorCode.STOPPED, stopped)
                    with contextlib.suppress(Exception):  # the node may be stopping too
                        self.system.refuse(dropped.sealed.envelope, refusal, self.ref)

    def _handle_failure(self, *exc_info: Any) -> None:
        """pykka stops an actor whose ``on_start`` (or ``on_stop``) raised, logged, without
        its ``on_stop``: what waited in its mailbox was dropped unanswered (its senders
        waited out their deadlines, remote ones kept their places in the admission
        budgets) and it stayed listed in its system. It ends as any stop does now."""
        super()._handle_failure(*exc_info)
        try:
            self._let_go()
        finally:
            self.system.stop_actor(self.handle.address.inbox, timeout=0, block=False)

    def _handle(self, sealed: Sealed, ticket: Ticket | None = None) -> None:
        env = sealed.envelope
        try:
            try:
                result, request = self._run(env, sealed)
            finally:
                # Handled: it no longer counts in the admission budgets. Given back before
                # the answer goes out, so that once the answer wakes the caller up this
                # thread has nothing left to do but wait for its next message.
                self.system.admission.release(ticket)
        except Refusal as refusal:
            self.system.refuse(env, refusal, self.ref)
            return
        except DmsError as exc:  # a request the handler declined, with a reason people read
            self.system.refuse(env, Refusal(exc.code, exc.message), self.ref)
            return
        except Exception as exc:
            log.exception("handler of %s raised", env.behaviour)
            refusal = Refusal(ErrorCode.HANDLER_ERROR, f"{type(exc).__name__}: {exc}")
            self.system.refuse(env, refusal, self.ref)
            return
        if not request.deferred:
            self.system.reply(env, result, self.ref)

    def _run(self, env: Envelope, sealed: Sealed) -> tuple[Any, Request]:
        """Behaviour lookup, size class, capability, payload validation, then the handler:
        its result and the request it was given; a refusal is raised."""
        spec = self._behaviours.get(env.behaviour)
        if spec is None:
            raise Refusal(
                ErrorCode.UNKNOWN_BEHAVIOUR,
                f"{self.handle.address.inbox} has no behaviour {env.behaviour}",
            )
        if env.to is None and spec.topic != env.topic:
            raise Refusal(
                ErrorCode.NOT_FOR_TOPIC,
                f"{env.behaviour} is not a behaviour for broadcasts on {env.topic}",
            )
        if not spec.data and sealed.size > self.system.limits.max_control_bytes:
            raise Refusal(
                ErrorCode.TOO_LARGE,
                f"{sealed.size} bytes exceed the control limit "
                f"{self.system.limits.max_control_bytes} of {env.behaviour}",
            )
        self.system.policy.authorize(env, spec)
        payload = env.payload
        if spec.payload is not None:
            try:
                payload = spec.payload.model_validate(payload)
            except ValidationError as exc:
                raise Refusal(ErrorCode.BAD_PAYLOAD, _first_error(exc)) from None
        request = Request(self.ref, env, payload, sealed)
        return spec.handler(request), request


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "payload"
    return f"{where}: {err['msg']}"
