"""py-libp2p's dial replaced by one that tries every address of a peer (dms.network.dialing).

**A dial tries every address of a peer, and is done when one connects.** py-libp2p
dials the first address of each transport class, two at most, each with a 250 ms head
start (``_HAPPY_EYEBALLS_DELAY``) that ends on its failure alone, and waits for every
dial it started: a peer advertising two TCP addresses (Wi-Fi and Ethernet, Docker's
bridge, a VPN) was dialed on its first alone, reachable or not, and every dial waited
the head start out after its last address (~0.28 s on loopback, ~0.03 s of it the
connection). ``Swarm.dial_peer`` is now ``dms.network.dialing.dial_peer``: the same
dial but for its choice and its wait, up to ``MAX_DIAL_ADDRS`` (8) addresses, ranked
(the one that connected last, then on this host's networks, public, private), the
first of each class at once and each next one 250 ms after the one before or once a
dial fails, ended by the first connection. Applied only to the ``Swarm.dial_peer``
it was copied from (its source's digest, ``DIAL_PEER_SHA256``).
"""

from __future__ import annotations

import logging

from dms.network.libp2p_patches.source import shipped_source

log = logging.getLogger("dms.network")


# The sha256 of py-libp2p's Swarm.dial_peer (its source, dedented) that the dial patch
# was written against: ``dms.network.dialing.dial_peer`` replaces it, keeping what it
# does but its choice of addresses (the first of each transport class, two at most) and
# its wait (a 250 ms head start an address, ended on the address's failure alone).
# Any other source may do what the replacement would drop: it is left as it is.
DIAL_PEER_SHA256 = "f8829e76d340f3134db7e143bbe7a47acc0554b32e008070a1bfc966a7995a7e"


def dial_peer_is_shaped() -> bool:
    """Whether ``Swarm.dial_peer`` and its constants are those the replacement copies."""
    from libp2p.network import swarm

    return (
        isinstance(getattr(swarm, "_HAPPY_EYEBALLS_DELAY", None), float)
        and getattr(swarm, "MAX_ADDRS_PER_PEER", None) == 2
        and shipped_source(swarm.Swarm.dial_peer, DIAL_PEER_SHA256) is not None
    )


def dial_every_address() -> bool:
    from libp2p.network import swarm

    from dms.network import dialing

    if swarm.Swarm.dial_peer is dialing.dial_peer:  # applied before (a test's apply_only)
        return True
    if not dial_peer_is_shaped():
        log.info("py-libp2p's dial changed shape; the addresses it dials are left as they are")
        return False
    dialing.dial_peer.__wrapped__ = swarm.Swarm.dial_peer  # type: ignore[attr-defined]
    swarm.Swarm.dial_peer = dialing.dial_peer  # type: ignore[method-assign]
    return True
