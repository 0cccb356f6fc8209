"""A bare py-libp2p gossipsub peer: no dms code on the wire, only the library.

With ``strict_signing=True`` it behaves as go- and js-libp2p do by default
(StrictSign: it signs its messages and drops any message without a valid
signature). With ``strict_signing=False`` it is a hostile peer that can hand
its router any message it builds (``forge``), a ``from`` that is not its own
included. The host itself is ``dms.sim.adversary.BarePeer``, shared with
``bench/adversary.py``.
"""

from __future__ import annotations

from dms.sim import adversary


class BarePeer(adversary.BarePeer):
    """A bare host with gossipsub, dialed to ``addr``."""

    def __init__(self, addr: str, *, strict_signing: bool) -> None:
        super().__init__(addr, gossip=True, strict_signing=strict_signing)
