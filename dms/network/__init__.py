"""The node's py-libp2p host and what it is made of (specs/network.md)."""

from dms.network.deferred import defer

# Before any module of this package imports libp2p: what a host does not use by
# default (QUIC, WebSocket, mDNS, ...) is imported when used (dms.network.deferred).
defer()
