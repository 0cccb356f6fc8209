"""Actors that reach each other by signed envelopes to named behaviours.

Public surface: :class:`ActorSystem` (one per node), :class:`Actor` (base
class), :func:`behaviour` (declare a handler), :class:`ActorRef` (talk as an
actor from any thread), the transports, and the error types.
"""

from dms.actor.actor import Actor, Request, Responder
from dms.actor.behaviour import Behaviour, behaviour
from dms.actor.codes import ErrorCode, InvokeTimeout, Refusal, RemoteError, Unreachable
from dms.actor.envelope import Envelope, Sealed, make_envelope, seal, unseal, verify
from dms.actor.handle import ROOT_INBOX, Address, Handle
from dms.actor.memory import MemoryNetwork, MemoryTransport
from dms.actor.policy import Role
from dms.actor.system import ActorContext, ActorRef, ActorSystem, Limits, Outcome
from dms.actor.transport import Transport

__all__ = [
    "ROOT_INBOX",
    "Actor",
    "ActorContext",
    "ActorRef",
    "ActorSystem",
    "Address",
    "Behaviour",
    "Envelope",
    "ErrorCode",
    "Handle",
    "InvokeTimeout",
    "Limits",
    "MemoryNetwork",
    "MemoryTransport",
    "Outcome",
    "Refusal",
    "RemoteError",
    "Request",
    "Responder",
    "Role",
    "Sealed",
    "Transport",
    "Unreachable",
    "behaviour",
    "make_envelope",
    "seal",
    "unseal",
    "verify",
]
