"""What an actor system needs from a network: frames to hosts and topics.

A transport moves opaque frames. It calls ``receiver(frame, from_peer)`` for
every inbound frame (``from_peer`` is the authenticated peer id where the
transport knows it, else None); the actor system does everything else. A
transport that has itself verified a frame's signature (a gossip validator)
says so with ``signature_checked=True``, and the check is not repeated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Receiver(Protocol):
    def __call__(
        self, frame: bytes, from_peer: str | None, *, signature_checked: bool = False
    ) -> None: ...


# Called with a frame a transport accepted but could not deliver after all, and why.
Undeliverable = Callable[[bytes, str], None]


class Transport(Protocol):
    @property
    def peer_id(self) -> str: ...

    def start(self, receiver: Receiver, undeliverable: Undeliverable | None = None) -> None:
        """Attach; ``undeliverable`` hears of frames lost after ``send`` returned."""

    def send(self, peer_id: str, frame: bytes) -> None:
        """Hand a frame to ``peer_id``'s host; raise ``Unreachable`` if it cannot."""

    def publish(self, topic: str, frame: bytes) -> None:
        """Deliver to every other host subscribed to ``topic``."""

    def subscribe(self, topic: str) -> None: ...

    def unsubscribe(self, topic: str) -> None: ...

    def stop(self) -> None: ...


class RemoteAddresses(Protocol):
    """A transport that knows where a peer's connection comes from (the libp2p host):
    the admission budgets give peers at one IP address only a share of what unknown
    peers may hold (``dms.actor.admission``, ``ip_share``)."""

    def remote_ip(self, peer_id: str) -> str | None:
        """The IP address of ``peer_id``'s connection to this node; None if unknown."""
