"""``dms sim`` and the hostile peer of the adversarial tests.

``dms.network`` first, before any module of this package imports libp2p:
importing it defers what a dms host does not use of py-libp2p (QUIC, WebSocket,
mDNS, ...: ``dms.network.deferred``), which works only if it comes before
``import libp2p``. ``dms.sim.adversary`` imports libp2p above its own ``dms``
imports (isort's order), so a process that imported it first loaded every
transport.
"""

import dms.network  # noqa: F401
